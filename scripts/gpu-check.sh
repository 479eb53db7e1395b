#!/usr/bin/env bash
# gpu-check.sh: everything that needs a GPU, in one call on a GPU machine.
#
#   detect the card (nvidia-smi) -> build with VPPO_CUDA_ARCHS = that card's arch and VPPO_REQUIRE_NVCC=1
#   -> GPU tests (VPPO_TEST_DEVICE=cuda cargo test --release; the NCCL tests with a group of one rank
#   when libnccl is found) -> the Python package on CUDA tensors (pytest python/tests/test_cuda.py:
#   against the SIMT executor, the reference and eager PyTorch, in place, a side stream, opcheck,
#   torch.compile, and no [N, V] allocation besides the gradient) -> compute-sanitizer memcheck and
#   racecheck on the test binaries -> examples/copy_bandwidth -> cargo bench -> Nsight Compute on passes
#   1 and 3 -> bench/compare_torch.py (vt.vppo_loss in-process against eager PyTorch, and Liger-Kernel's
#   GRPO loss + a KL pass when importable; skipped without torch) -> a docs/PERFORMANCE.md section named
#   after the card. Logs and results also go to $OUT (default target/gpu-check).
#
# Usage: scripts/gpu-check.sh [MODE] [--steps LIST] [--out DIR]
#   (no mode)          on a GPU machine with cargo: build there and run every step.
#   --cpu-only         no GPU: the CPU-side steps (build, tests, benches at small size; copy_bandwidth
#                      must fail with a clean "no GPU" error). Writes $OUT/PERFORMANCE.md only.
#   --bundle DIR       on a machine with cargo and nvcc (no GPU needed): build the release test, bench
#                      and example binaries (for VPPO_CUDA_ARCHS, default 90 = H100/H200) and copy them,
#                      stripped, into DIR, for a GPU machine without Rust; and the Python package's
#                      wheel (abi3, with the same kernels) into DIR/wheels, built with the Python that
#                      has maturin ($VPPO_TORCH_VENV/bin/python, default ~/.cache/vppo/torch-venv, as
#                      .ci/run installs it, or python3).
#   --from-bundle DIR  on the GPU machine: run the steps with the binaries from DIR instead of cargo.
#                      Chosen automatically when cargo is missing and .gpu-bundle exists.
#   --steps LIST       comma-separated subset of: build,tests,pytest,sanitizer,bandwidth,bench,ncu,torch,report
#                      (default: all), e.g. to split the work over several calls.
#   --out DIR          where logs and results go (default: $OUT if set, else target/gpu-check).
#
# nvcc on the GPU machine (only for the default mode, which builds there): $NVCC, $CUDA_HOME/bin,
# PATH, /usr/local/cuda/bin, the venv $VPPO_NVCC_VENV (default ~/.cache/vppo/nvcc-venv), or wheels in
# .whl/ of the repository (a machine without network: download them here with `pip download`, see
# docs/BUILD.md), installed with pip --no-index into ~/.cache/vppo/nvcc-site.
# compute-sanitizer: PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin, python site-packages or .whl/
# (PyPI wheel nvidia-cuda-sanitizer-api, which installs nvidia/cu13/bin/compute-sanitizer). When none
# is found the sanitizer step says so and is skipped (it does not fail the run).
# Nsight Compute (step ncu): ncu on PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin or /opt/nvidia/nsight-compute*;
# it profiles pass 1 and pass 3 (bf16) once each at N = 16,384 inside the bench binary and reports DRAM
# throughput (% of peak), issue-active % and achieved occupancy, to confirm or correct the static SASS
# model of docs/PERFORMANCE.md. Skipped (with a note) without a GPU or without ncu.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

MODE=gpu
BUNDLE=""
STEPS="build,tests,pytest,sanitizer,bandwidth,bench,ncu,torch,report"
RESULTS=${OUT:-$ROOT/target/gpu-check}
while [ $# -gt 0 ]; do
    case "$1" in
    --cpu-only) MODE=cpu ;;
    --bundle) MODE=bundle; BUNDLE=${2:?--bundle needs a directory}; shift ;;
    --from-bundle) BUNDLE=${2:?--from-bundle needs a directory}; shift ;;
    --steps) STEPS=${2:?--steps needs a list}; shift ;;
    --out) RESULTS=${2:?--out needs a directory}; shift ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$MODE" != bundle ] && [ -z "$BUNDLE" ] && ! command -v cargo >/dev/null && [ -d .gpu-bundle ]; then
    BUNDLE=.gpu-bundle
fi
FROM_BUNDLE=0
if [ "$MODE" != bundle ] && [ -n "$BUNDLE" ]; then
    FROM_BUNDLE=1
    BUNDLE=$(cd "$BUNDLE" && pwd) || { echo "gpu-check: no bundle directory $BUNDLE" >&2; exit 2; }
fi

mkdir -p "$RESULTS"
LOG="$RESULTS/gpu-check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

T0=$(date +%s)
FAILED=()
NOTES=()
step_enabled() { [[ ",$STEPS," == *",$1,"* ]]; }
section() {
    printf '\n==============================================================================\n'
    printf '== [%4ds] %s\n' "$(($(date +%s) - T0))" "$1"
    printf '==============================================================================\n'
}
fail() { FAILED+=("$1"); printf '!! FAILED: %s\n' "$1"; }
note() { NOTES+=("$1"); printf -- '-- %s\n' "$1"; }

# ------------------------------------------------------------------------------------------------
section "Card"
CARD="" CARD_ARCH="" DRIVER=""
if [ "$MODE" = gpu ]; then
    if ! command -v nvidia-smi >/dev/null; then
        echo "nvidia-smi not found: is this a GPU machine? (use --cpu-only to run the CPU-side steps)"
        exit 1
    fi
    nvidia-smi --query-gpu=index,name,compute_cap,driver_version,memory.total,clocks.max.sm --format=csv
    IFS=',' read -r CARD CC DRIVER < <(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | head -1)
    CARD=$(echo "$CARD" | xargs) CC=$(echo "$CC" | xargs) DRIVER=$(echo "$DRIVER" | xargs)
    CARD_ARCH=${CC/./}
    [ -n "$CARD_ARCH" ] || { echo "could not read the compute capability"; exit 1; }
    echo "card: $CARD, sm_$CARD_ARCH, driver $DRIVER"
else
    CARD="CPU only ($(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | xargs), $(nproc) cores)"
    echo "mode: $MODE; $CARD"
fi

# The card's arch for a build here; a bundle defaults to Hopper (the lent H100/H200 machines).
if [ -z "${VPPO_CUDA_ARCHS:-}" ]; then
    if [ -n "$CARD_ARCH" ]; then export VPPO_CUDA_ARCHS=$CARD_ARCH; fi
    if [ "$MODE" = bundle ]; then export VPPO_CUDA_ARCHS=90; fi
fi
echo "VPPO_CUDA_ARCHS=${VPPO_CUDA_ARCHS:-(default: all)}"

# ------------------------------------------------------------------------------------------------
find_nvcc() {
    local c
    for c in "${NVCC:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "${CUDA_PATH:+$CUDA_PATH/bin/nvcc}" \
        "$(command -v nvcc 2>/dev/null)" /usr/local/cuda/bin/nvcc; do
        if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    local venv=${VPPO_NVCC_VENV:-$HOME/.cache/vppo/nvcc-venv}
    for c in "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc "$HOME/.cache/vppo/nvcc-site/nvidia/cu13/bin/nvcc"; do
        if [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    if compgen -G ".whl/nvidia_cuda_nvcc-*.whl" >/dev/null; then
        echo "installing the nvcc wheels from .whl/ (no network needed)" >&2
        python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
            --target "$HOME/.cache/vppo/nvcc-site" .whl/nvidia_cuda_nvcc-*.whl .whl/nvidia_cuda_crt-*.whl \
            .whl/nvidia_cuda_runtime-*.whl .whl/nvidia_nvvm-*.whl .whl/nvidia_cuda_cccl-*.whl >&2 || return 1
        c="$HOME/.cache/vppo/nvcc-site/nvidia/cu13/bin/nvcc"
        if [ -x "$c" ]; then echo "$c"; return 0; fi
    fi
    return 1
}

find_sanitizer() {
    local c
    for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}" \
        /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer \
        /usr/local/cuda*/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer; do
        if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    local site
    for site in $(python3 -c 'import site; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null) \
        "$HOME/.cache/vppo/sanitizer-site"; do
        c="$site/nvidia/cu13/bin/compute-sanitizer"
        if [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    if compgen -G ".whl/nvidia_cuda_sanitizer_api-*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --upgrade \
            --target "$HOME/.cache/vppo/sanitizer-site" .whl/nvidia_cuda_sanitizer_api-*.whl >&2 || return 1
        c="$HOME/.cache/vppo/sanitizer-site/nvidia/cu13/bin/compute-sanitizer"
        if [ -x "$c" ]; then echo "$c"; return 0; fi
    fi
    return 1
}

# Cargo's JSON messages on stdin -> "kind name path" for each executable, kind in test/bench/example/bin;
# with an argument, only that kind.
executables() {
    python3 -c '
import json, sys
only = sys.argv[1] if len(sys.argv) > 1 else None
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if m.get("reason") != "compiler-artifact" or not exe:
        continue
    t = m["target"]
    if "bench" in t["kind"]:
        kind, name = "bench", t["name"]
    elif "example" in t["kind"]:
        kind, name = "example", t["name"]
    elif m["profile"]["test"]:
        # unit tests of the lib and of binaries share the crate name: prefix the target kind
        kind = "test"
        name = t["name"] if "test" in t["kind"] else t["kind"][0] + "-" + t["name"]
    else:
        kind, name = "bin", t["name"]
    if only is None or kind == only:
        print(kind, name, exe)
' "$@"
}

# The OUT_DIR of vppo's build script, from a file of cargo JSON messages.
vppo_out_dir() {
    python3 -c '
import json, sys
out = ""
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "build-script-executed" and "vppo" in m.get("package_id", ""):
        out = m.get("out_dir", "")
print(out)' "$1"
}

# ------------------------------------------------------------------------------------------------
if [ "$MODE" = bundle ]; then
    section "Bundle: release binaries for a GPU machine without Rust -> $BUNDLE"
    NVCC_FOUND=$(find_nvcc) || { echo "no nvcc: the bundle must carry compiled kernels (see docs/BUILD.md)"; exit 1; }
    export NVCC=$NVCC_FOUND VPPO_REQUIRE_NVCC=1
    echo "nvcc: $NVCC"
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/bin"
    set -e
    cargo test --release --no-run --message-format=json-render-diagnostics | tee "$BUNDLE/build.json" |
        executables test >"$BUNDLE/artifacts.txt"
    cargo build --release --examples --message-format=json-render-diagnostics | executables example >>"$BUNDLE/artifacts.txt"
    cargo bench --bench '*' --no-run --message-format=json-render-diagnostics | executables bench >>"$BUNDLE/artifacts.txt"
    cargo build --release --bin vppo --message-format=json-render-diagnostics | executables bin >>"$BUNDLE/artifacts.txt"
    set +e
    : >"$BUNDLE/manifest.txt"
    while read -r kind name exe; do
        cp "$exe" "$BUNDLE/bin/$kind-$name"
        strip --strip-debug "$BUNDLE/bin/$kind-$name" 2>/dev/null || true
        echo "$kind $name bin/$kind-$name" >>"$BUNDLE/manifest.txt"
    done < <(sort -u "$BUNDLE/artifacts.txt")
    rm "$BUNDLE/artifacts.txt"
    # The Python package: one abi3 wheel (any CPython >= 3.9, any torch >= 2.4), the same kernels.
    WHEEL_PY=${VPPO_TORCH_VENV:-$HOME/.cache/vppo/torch-venv}/bin/python
    [ -x "$WHEEL_PY" ] || WHEEL_PY=python3
    if "$WHEEL_PY" -c 'import maturin' 2>/dev/null; then
        # Release profile (pyproject.toml installs in dev for CI's reuse of its build): the host code
        # around the kernels is what compare_torch.py times against eager PyTorch.
        MATURIN_PEP517_ARGS="--profile release" PATH="$(dirname "$WHEEL_PY"):$PATH" \
            "$WHEEL_PY" -m pip wheel --no-deps --no-build-isolation \
            -w "$BUNDLE/wheels" ./python || { echo "the wheel did not build"; exit 1; }
        ls -l "$BUNDLE"/wheels/*.whl
    else
        echo "warning: no Python with maturin ($WHEEL_PY): the bundle has no wheel, and the GPU's"
        echo "pytest and compare_torch steps will be skipped (install maturin, or run .ci/run once)"
    fi
    {
        echo "manifest_dir $ROOT"
        echo "archs ${VPPO_CUDA_ARCHS}"
        echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    } >"$BUNDLE/build-info.txt"
    REPORT="$(vppo_out_dir "$BUNDLE/build.json")/resource_report.txt"
    rm "$BUNDLE/build.json"
    [ -f "$REPORT" ] && cp "$REPORT" "$BUNDLE/resource_report.txt"
    cat "$BUNDLE/manifest.txt"
    # The binaries share most of their bytes (the SIMT executor, the fatbins, the crate): one solid
    # xz archive is about a twentieth of them (119 MiB -> 5.6 MiB in December 2026), which the
    # device tool's 64 MiB can carry. --from-bundle unpacks it.
    du -sh "$BUNDLE/bin"
    tar -C "$BUNDLE" -cf - bin | xz -9 -T2 >"$BUNDLE/bin.tar.xz" || { echo "packing the binaries failed"; exit 1; }
    rm -rf "$BUNDLE/bin"
    du -sh "$BUNDLE"
    SIZE_MB=$(du -sm "$BUNDLE" | cut -f1)
    if [ "$SIZE_MB" -gt 60 ]; then
        echo "warning: the bundle is ${SIZE_MB} MiB; the device tool carries at most 64 MiB with the tree"
    fi
    echo
    echo "Next, on the GPU machine, from the repository root (the bundle must travel with the tree:"
    echo "ignore it in .git/info/exclude and name it in the device tool's carry):"
    echo "    bash scripts/gpu-check.sh --from-bundle ${BUNDLE#"$ROOT"/}"
    exit 0
fi

# ------------------------------------------------------------------------------------------------
# The Python package for the pytest and torch steps: the bundle's wheel, or `pip install ./python` here
# (cargo and maturin needed), into $RESULTS/py-site, put first on PYTHONPATH. Once per run.
PY_SITE_STATE=""
python_site() {
    if [ -n "$PY_SITE_STATE" ]; then [ "$PY_SITE_STATE" = ok ]; return; fi
    PY_SITE_STATE=failed
    local site="$RESULTS/py-site"
    rm -rf "$site"
    if [ $FROM_BUNDLE = 1 ]; then
        local whl
        whl=$(ls "$BUNDLE"/wheels/vppo-*.whl 2>/dev/null | head -1)
        [ -n "$whl" ] || { echo "the bundle has no wheel (built without maturin?)"; return 1; }
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$whl" || return 1
    else
        python3 -m pip install -q --no-deps --no-build-isolation --target "$site" ./python || return 1
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    python3 -c 'import vppo.torch' || return 1
    PY_SITE_STATE=ok
}

# NCCL for the NCCL tests: cudarc opens libnccl.so, while the PyPI wheel nvidia-nccl-cu13 (in the GPU
# image, with torch) ships libnccl.so.2 only: link it into $RESULTS/nccl-lib, put first on
# LD_LIBRARY_PATH. Without any libnccl the NCCL tests skip themselves.
find_nccl() {
    local d
    for d in $(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null) \
        /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64 /usr/local/nccl/lib; do
        if [ -e "$d/libnccl.so.2" ]; then echo "$d/libnccl.so.2"; return 0; fi
    done
    return 1
}

# ------------------------------------------------------------------------------------------------
# How each step runs its binaries: through cargo, or from the bundle.
if [ $FROM_BUNDLE = 1 ]; then
    if [ -f "$BUNDLE/bin.tar.xz" ] && [ ! -d "$BUNDLE/bin" ]; then
        python3 - "$BUNDLE/bin.tar.xz" "$BUNDLE" <<'EOF' || { echo "could not unpack $BUNDLE/bin.tar.xz"; exit 1; }
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    try:
        t.extractall(sys.argv[2], filter="data")
    except TypeError:  # a Python without extraction filters
        t.extractall(sys.argv[2])
EOF
    fi
    note "running the binaries of bundle $BUNDLE ($(grep '^commit' "$BUNDLE/build-info.txt" 2>/dev/null))"
    # Tests that use env!("CARGO_MANIFEST_DIR") look for files where the bundle was built.
    MANIFEST_DIR=$(awk '$1 == "manifest_dir" {print $2}' "$BUNDLE/build-info.txt")
    if [ -n "$MANIFEST_DIR" ] && [ "$MANIFEST_DIR" != "$ROOT" ] && [ ! -e "$MANIFEST_DIR" ]; then
        mkdir -p "$(dirname "$MANIFEST_DIR")" && ln -s "$ROOT" "$MANIFEST_DIR" &&
            note "linked $MANIFEST_DIR -> $ROOT (the bundle's CARGO_MANIFEST_DIR)"
    fi
    bundle_bins() { awk -v k="$1" '$1 == k {print $3}' "$BUNDLE/manifest.txt" | sed "s|^|$BUNDLE/|"; }
fi

if [ "$MODE" = gpu ]; then
    export VPPO_TEST_DEVICE=cuda
    if NCCL_SO=$(find_nccl); then
        mkdir -p "$RESULTS/nccl-lib" && ln -sf "$NCCL_SO" "$RESULTS/nccl-lib/libnccl.so"
        export LD_LIBRARY_PATH="$RESULTS/nccl-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        note "NCCL: $NCCL_SO (linked as libnccl.so): the NCCL tests run with a group of one rank per GPU"
    else
        note "NCCL: no libnccl.so.2 found: the NCCL tests skip themselves"
    fi
fi
BENCH_ARGS=()
if [ "$MODE" = cpu ]; then
    # Small sizes: the bench reads VPPO_BENCH_SIZE; criterion gets short runs.
    export VPPO_BENCH_SIZE=small
    BENCH_ARGS=(--warm-up-time 0.5 --measurement-time 1 --sample-size 10)
fi

if step_enabled build && [ $FROM_BUNDLE = 0 ]; then
    section "Build (release${VPPO_CUDA_ARCHS:+, VPPO_CUDA_ARCHS=$VPPO_CUDA_ARCHS})"
    if NVCC_FOUND=$(find_nvcc); then
        export NVCC=$NVCC_FOUND
        echo "nvcc: $NVCC"
    fi
    if [ "$MODE" = gpu ]; then
        export VPPO_REQUIRE_NVCC=1
    fi
    BUILD_START=$(date +%s)
    if cargo build --release --all-targets --message-format=json-render-diagnostics >"$RESULTS/.build.json"; then
        note "release build in $(($(date +%s) - BUILD_START)) s"
    else
        fail "cargo build --release"
        echo "the build failed; nothing else can run"
        exit 1
    fi
fi
REPORT=""
if [ $FROM_BUNDLE = 1 ]; then
    REPORT="$BUNDLE/resource_report.txt"
elif [ -f "$RESULTS/.build.json" ]; then
    OUTDIR=$(vppo_out_dir "$RESULTS/.build.json")
    REPORT="$OUTDIR/resource_report.txt"
fi
if [ -f "$REPORT" ]; then
    cp "$REPORT" "$RESULTS/resource_report.txt"
fi

# ------------------------------------------------------------------------------------------------
TEST_SUMMARY="not run"
if step_enabled tests; then
    section "Tests (${VPPO_TEST_DEVICE:+VPPO_TEST_DEVICE=$VPPO_TEST_DEVICE }cargo test --release)"
    run_tests() {
        if [ $FROM_BUNDLE = 1 ]; then
            local rc=0 b
            for b in $(bundle_bins test); do
                echo "---- $b"
                "$b" || rc=1
            done
            return $rc
        fi
        cargo test --release
    }
    run_tests 2>&1 | tee "$RESULTS/tests.txt"
    rc=${PIPESTATUS[0]}
    PASSED=$(grep -o '[0-9]* passed' "$RESULTS/tests.txt" | awk '{s += $1} END {print s + 0}')
    FAILS=$(grep -o '[0-9]* failed' "$RESULTS/tests.txt" | awk '{s += $1} END {print s + 0}')
    if [ "$rc" = 0 ] && ! grep -q '^test result: FAILED' "$RESULTS/tests.txt"; then
        TEST_SUMMARY="passed ($PASSED tests)"
    else
        TEST_SUMMARY="FAILED ($FAILS failed, $PASSED passed)"
        fail "tests"
    fi
    note "tests: $TEST_SUMMARY"
fi

# ------------------------------------------------------------------------------------------------
PYTEST_SUMMARY="not run"
if step_enabled pytest; then
    section "The Python package on CUDA tensors (pytest python/tests/test_cuda.py)"
    if ! python3 -c 'import torch, pytest' 2>/dev/null; then
        PYTEST_SUMMARY="skipped: python3 cannot import torch and pytest"
    elif ! python_site; then
        PYTEST_SUMMARY="FAILED: the package did not install"
        fail "pytest (install)"
    else
        # The rest of python/tests runs on the CPU in CI; this file is what needs the GPU (it skips
        # itself without one, as in --cpu-only mode).
        PYTHONUNBUFFERED=1 python3 -m pytest python/tests/test_cuda.py -q -rs -p no:cacheprovider \
            2>&1 | tee "$RESULTS/pytest.txt"
        rc=${PIPESTATUS[0]}
        PYTEST_SUMMARY=$(grep -E '^[0-9]+ (passed|failed|skipped)|^=+ .*(passed|failed|skipped)' \
            "$RESULTS/pytest.txt" | tail -1 | tr -d '=' | xargs)
        if [ "$rc" = 0 ]; then
            PYTEST_SUMMARY="passed: ${PYTEST_SUMMARY:-?}"
        else
            PYTEST_SUMMARY="FAILED: ${PYTEST_SUMMARY:-exit $rc}"
            fail "pytest"
        fi
    fi
    note "pytest: $PYTEST_SUMMARY"
fi

# ------------------------------------------------------------------------------------------------
SANITIZER_SUMMARY="not run"
if step_enabled sanitizer; then
    section "compute-sanitizer memcheck and racecheck on the test binaries"
    if [ "$MODE" = cpu ]; then
        SANITIZER_SUMMARY="skipped (no GPU)"
        note "sanitizer: skipped in --cpu-only mode (it needs a GPU)"
    elif ! SAN=$(find_sanitizer); then
        SANITIZER_SUMMARY="skipped: compute-sanitizer not found"
        note "compute-sanitizer not found on this machine (PATH, CUDA_HOME, /usr/local/cuda*, site-packages,"
        note "  .whl/nvidia_cuda_sanitizer_api-*.whl): install the CUDA toolkit or the PyPI wheel nvidia-cuda-sanitizer-api"
    else
        echo "compute-sanitizer: $SAN ($("$SAN" --version | tail -1))"
        if [ $FROM_BUNDLE = 1 ]; then
            TEST_BINS=$(bundle_bins test)
        else
            TEST_BINS=$(cargo test --release --no-run --message-format=json 2>/dev/null | executables test | awk '{print $3}')
        fi
        : >"$RESULTS/sanitizer.txt"
        san_rc=0
        for tool in memcheck racecheck; do
            for b in $TEST_BINS; do
                echo "---- $tool: $(basename "$b")" | tee -a "$RESULTS/sanitizer.txt"
                timeout "${VPPO_SANITIZER_TIMEOUT:-600}" "$SAN" --tool "$tool" --error-exitcode 99 \
                    "$b" --test-threads=1 2>&1 | tee -a "$RESULTS/sanitizer.txt" | grep -E '=========|test result' || true
                r=${PIPESTATUS[0]}
                if [ "$r" != 0 ]; then
                    san_rc=1
                    fail "compute-sanitizer $tool $(basename "$b") (exit $r)"
                fi
            done
        done
        if [ $san_rc = 0 ]; then SANITIZER_SUMMARY="memcheck and racecheck clean"; else SANITIZER_SUMMARY="FAILED (see sanitizer.txt)"; fi
        note "sanitizer: $SANITIZER_SUMMARY"
    fi
fi

# ------------------------------------------------------------------------------------------------
BANDWIDTH_SUMMARY="not run"
if step_enabled bandwidth; then
    section "Copy bandwidth (examples/copy_bandwidth)"
    BW_ARGS=(--mib "${VPPO_COPY_MIB:-2048}" --reps 20)
    if [ $FROM_BUNDLE = 1 ]; then
        "$(bundle_bins example | grep copy_bandwidth | head -1)" "${BW_ARGS[@]}"
    else
        cargo run --release -q --example copy_bandwidth -- "${BW_ARGS[@]}"
    fi >"$RESULTS/bandwidth.txt" 2>&1
    rc=$?
    cat "$RESULTS/bandwidth.txt"
    if [ "$MODE" = cpu ]; then
        # Without a GPU the example must stop with the crate's clean error, not a panic.
        if [ $rc = 1 ] && grep -Eq 'kernels not built|no CUDA driver|no GPU' "$RESULTS/bandwidth.txt"; then
            BANDWIDTH_SUMMARY="no GPU (clean error, as expected)"
        else
            BANDWIDTH_SUMMARY="FAILED: expected a clean no-GPU error (exit $rc)"
            fail "copy_bandwidth without a GPU"
        fi
    elif [ $rc = 0 ]; then
        BANDWIDTH_SUMMARY=$(grep -m1 'best' "$RESULTS/bandwidth.txt" | sed 's/^copy_bandwidth: //')
    else
        BANDWIDTH_SUMMARY="FAILED (exit $rc)"
        fail "copy_bandwidth"
    fi
    note "bandwidth: $BANDWIDTH_SUMMARY"
fi

# ------------------------------------------------------------------------------------------------
BENCH_SUMMARY="not run"
if step_enabled bench; then
    section "Benchmarks (cargo bench --bench '*'${BENCH_ARGS:+ -- ${BENCH_ARGS[*]}})"
    run_benches() {
        if [ $FROM_BUNDLE = 1 ]; then
            local rc=0 b
            for b in $(bundle_bins bench); do
                echo "---- $b"
                "$b" --bench "${BENCH_ARGS[@]}" || rc=1
            done
            return $rc
        fi
        # --bench '*': the bench targets only (criterion's options would confuse libtest's harness).
        cargo bench --bench '*' -- "${BENCH_ARGS[@]}"
    }
    run_benches 2>&1 | tee "$RESULTS/bench.txt"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 0 ]; then BENCH_SUMMARY="ran"; else BENCH_SUMMARY="FAILED (exit $rc)"; fail "cargo bench"; fi
    note "bench: $BENCH_SUMMARY"
fi

# ------------------------------------------------------------------------------------------------
NCU_SUMMARY="not run"
NCU_METRICS=dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__inst_issued.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active
if step_enabled ncu; then
    section "Nsight Compute: passes 1 and 3 at N = 16,384 (DRAM %, issue-active %, achieved occupancy)"
    find_ncu() {
        local c
        for c in "$(command -v ncu 2>/dev/null)" "${CUDA_HOME:+$CUDA_HOME/bin/ncu}" /usr/local/cuda/bin/ncu \
            /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute*/ncu; do
            if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
        done
        return 1
    }
    : >"$RESULTS/ncu.csv"
    ncu_cmd() { # ncu_cmd KERNEL BENCH_ID: one profiled launch of KERNEL inside the bench BENCH_ID
        NCU_CMD=("$NCU" --csv --page raw --metrics "$NCU_METRICS" -k "regex:^$1\$" -c 1
            "$NCU_BENCH" --bench --warm-up-time 0.1 --measurement-time 0.2 --sample-size 10 "$2")
    }
    NCU_JOBS=("vppo_perception_bf16 gpu/N=16384,V=151936,bf16/pass1_perception"
        "vppo_backward_bf16_bf16 gpu/N=16384,V=151936,bf16/pass3_backward_bf16")
    if [ "$MODE" = cpu ]; then
        NCU_SUMMARY="skipped (no GPU)"
        NCU=ncu NCU_BENCH=BENCH_BINARY
        for job in "${NCU_JOBS[@]}"; do
            ncu_cmd "${job%% *}" "${job#* }"
            echo "on a GPU this step runs: $(printf '%q ' "${NCU_CMD[@]}")"
        done
        note "ncu: skipped in --cpu-only mode (it needs a GPU)"
    elif ! NCU=$(find_ncu); then
        NCU_SUMMARY="skipped: ncu not found"
        note "ncu not found (PATH, CUDA_HOME, /usr/local/cuda*, /opt/nvidia/nsight-compute*): no Nsight Compute metrics"
    else
        if [ $FROM_BUNDLE = 1 ]; then
            NCU_BENCH=$(bundle_bins bench | grep -m1 vppo)
        else
            NCU_BENCH=$(cargo bench --bench vppo --no-run --message-format=json 2>/dev/null | executables bench | awk '{print $3}' | head -1)
        fi
        echo "ncu: $NCU ($("$NCU" --version | tail -1)), bench binary: ${NCU_BENCH:-none}"
        ncu_rc=0
        [ -n "$NCU_BENCH" ] || ncu_rc=1
        for job in "${NCU_JOBS[@]}"; do
            [ -n "$NCU_BENCH" ] || break
            echo "---- ncu ${job%% *} (${job#* })"
            ncu_cmd "${job%% *}" "${job#* }"
            "${NCU_CMD[@]}" >"$RESULTS/ncu-${job%% *}.txt" 2>&1 || ncu_rc=1
            grep -E '^"' "$RESULTS/ncu-${job%% *}.txt" | tee -a "$RESULTS/ncu.csv" || ncu_rc=1
        done
        if [ $ncu_rc = 0 ]; then NCU_SUMMARY="ran (table below)"; else NCU_SUMMARY="FAILED (see ncu-*.txt)"; fail "ncu"; fi
    fi
    note "ncu: $NCU_SUMMARY"
fi

# ------------------------------------------------------------------------------------------------
TORCH_SUMMARY="not run"
if step_enabled torch; then
    section "Side by side with eager PyTorch (bench/compare_torch.py)"
    if [ $FROM_BUNDLE = 1 ]; then
        VPPO_BIN=$(bundle_bins bin | head -1)
    else
        VPPO_BIN=${CARGO_TARGET_DIR:-target}/release/vppo
        [ -x "$VPPO_BIN" ] || cargo build --release --bin vppo >/dev/null 2>&1
    fi
    TORCH_IMPL=cli
    if python3 -c 'import torch' 2>/dev/null && python_site; then
        TORCH_IMPL=op  # vt.vppo_loss in-process, on the same CUDA tensors as eager PyTorch
    fi
    if ! python3 -c 'import torch, numpy, safetensors' 2>/dev/null; then
        TORCH_SUMMARY="skipped: python3 cannot import torch, numpy and safetensors"
    elif [ $TORCH_IMPL = cli ] && { [ -z "$VPPO_BIN" ] || [ ! -x "$VPPO_BIN" ]; }; then
        TORCH_SUMMARY="skipped: neither the Python package nor a vppo binary"
    else
        note "torch: the crate through $([ $TORCH_IMPL = op ] && echo 'vt.vppo_loss in-process' || echo "$VPPO_BIN")"
        if [ "$MODE" = gpu ]; then
            TORCH_ARGS=(--device cuda --sizes 1024,4096,16384 --vocab 151936 --dtype bf16 --iters 5)
        else
            TORCH_ARGS=(--device cpu --sizes 64 --vocab 4096 --dtype bf16 --iters 2)
        fi
        PYTHONUNBUFFERED=1 python3 bench/compare_torch.py "${TORCH_ARGS[@]}" --vppo-impl $TORCH_IMPL \
            --vppo-bin "${VPPO_BIN:-target/release/vppo}" \
            --json-out "$RESULTS/torch.json" 2>&1 | tee "$RESULTS/torch.txt"
        rc=${PIPESTATUS[0]}
        if [ "$rc" = 0 ]; then TORCH_SUMMARY="ran (table below)"; else TORCH_SUMMARY="FAILED (exit $rc)"; fail "compare_torch"; fi
    fi
    note "torch: $TORCH_SUMMARY"
fi

# ------------------------------------------------------------------------------------------------
if step_enabled report; then
    section "PERFORMANCE.md section for: $CARD"
    NVCC_LINE=$(grep -m1 '^nvcc: ' "$RESULTS/resource_report.txt" 2>/dev/null | sed 's/^nvcc: //')
    export CARD DRIVER TEST_SUMMARY PYTEST_SUMMARY SANITIZER_SUMMARY BANDWIDTH_SUMMARY BENCH_SUMMARY TORCH_SUMMARY NVCC_LINE NCU_SUMMARY
    export RESULTS_DIR=$RESULTS COMMIT=$(git rev-parse --short HEAD 2>/dev/null || grep '^commit' "${BUNDLE:-/dev/null}/build-info.txt" 2>/dev/null | cut -c8-15)
    TARGET_DOC="$RESULTS/PERFORMANCE.md"
    [ -f docs/PERFORMANCE.md ] && cp docs/PERFORMANCE.md "$TARGET_DOC"
    python3 - "$TARGET_DOC" <<'EOF'
import os, re, sys, datetime
path = sys.argv[1]
env = os.environ
card = env["CARD"]
res = env["RESULTS_DIR"]
def read(name):
    try:
        return open(os.path.join(res, name)).read()
    except OSError:
        return ""
table = read("resource_report.txt").split("\n==== nvcc output")[0].strip()
def ncu_table():
    # ncu --csv --page raw: a header row of names, a row of units, then one row per profiled kernel.
    import csv, io
    rows = [r for r in csv.reader(io.StringIO(read("ncu.csv"))) if r]
    out, header = [], None
    for r in rows:
        if "Kernel Name" in r:
            header = r
            continue
        if header is None or len(r) != len(header) or r[0] == "":
            continue
        d = dict(zip(header, r))
        if not d.get("ID", "").strip().isdigit():
            continue
        out.append("%-28s dram %s %%  issue-active %s %%  occupancy %s %%" % (
            d.get("Kernel Name", "?")[:28],
            d.get("dram__throughput.avg.pct_of_peak_sustained_elapsed", "?"),
            d.get("sm__inst_issued.avg.pct_of_peak_sustained_active", "?"),
            d.get("sm__warps_active.avg.pct_of_peak_sustained_active", "?")))
    return "\n".join(out)
# criterion's results: everything after cargo's first "Running" line, less the progress lines.
bench, started = [], False
for l in read("bench.txt").splitlines():
    if re.match(r"^\s*Running ", l):
        started = True
        bench.append(l.strip())
    elif started and l.strip() and not l.startswith(("Benchmarking ", "Gnuplot not found")):
        bench.append(l.rstrip())
lines = [
    f"<!-- gpu-check: {card} -->",
    f"## {card}",
    "",
    f"Measured by scripts/gpu-check.sh on {datetime.date.today()} (commit {env.get('COMMIT') or '?'}"
    + (f", driver {env['DRIVER']}" if env.get("DRIVER") else "") + ").",
    "",
    f"- nvcc: {env.get('NVCC_LINE') or 'n/a'}",
    f"- tests: {env['TEST_SUMMARY']}",
    f"- the Python package on CUDA tensors (python/tests/test_cuda.py): {env.get('PYTEST_SUMMARY', 'not run')}",
    f"- compute-sanitizer: {env['SANITIZER_SUMMARY']}",
    f"- device-to-device copy (bytes read + written): {env['BANDWIDTH_SUMMARY']}",
    f"- benchmarks: {env['BENCH_SUMMARY']}",
    "",
    "### Kernel resources (ptxas -v)",
    "",
    "```",
    table or "(no resource report)",
    "```",
    "",
    "### cargo bench",
    "",
    "```",
    "\n".join(bench) or "(no output)",
    "```",
    "",
    f"### Nsight Compute, passes 1 and 3 at N = 16,384 ({env.get('NCU_SUMMARY', 'not run')})",
    "",
    "Against the static SASS model (docs/PERFORMANCE.md, \"Static SASS model\"): DRAM throughput as % of peak,",
    "issue-active % (sm__inst_issued, % of peak while active) and achieved occupancy (warps active, % of peak).",
    "",
    "```",
    ncu_table() or "(not run)",
    "```",
    "",
    f"### Against eager PyTorch ({env.get('TORCH_SUMMARY', 'not run')})",
    "",
    "```",
    read("torch.txt").strip() or "(not run)",
    "```",
    f"<!-- /gpu-check: {card} -->",
]
section = "\n".join(lines) + "\n"
try:
    doc = open(path).read()
except OSError:
    doc = ("# Performance\n\nOne section per card, written by `scripts/gpu-check.sh` (see docs/BUILD.md).\n"
           "Numbers are from the run named in each section; rerun the script to refresh them.\n\n")
pat = re.compile(r"<!-- gpu-check: " + re.escape(card) + r" -->.*?<!-- /gpu-check: " + re.escape(card) + r" -->\n?", re.S)
doc = pat.sub(lambda m: section, doc) if pat.search(doc) else doc.rstrip("\n") + "\n\n" + section
open(path, "w").write(doc)
EOF
    if [ "$MODE" = gpu ]; then
        cp "$TARGET_DOC" docs/PERFORMANCE.md
        note "wrote the section to docs/PERFORMANCE.md and $TARGET_DOC"
    else
        note "wrote the section to $TARGET_DOC (docs/ is only updated on a GPU)"
    fi
fi

rm -f "$RESULTS/.build.json"
section "Summary"
printf '%s\n' "card:      $CARD" "tests:     $TEST_SUMMARY" "pytest:    $PYTEST_SUMMARY" "sanitizer: $SANITIZER_SUMMARY" \
    "bandwidth: $BANDWIDTH_SUMMARY" "bench:     $BENCH_SUMMARY" "ncu:       $NCU_SUMMARY" "torch:     $TORCH_SUMMARY" \
    "results:   $RESULTS"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'FAILED steps:\n'
    printf '  %s\n' "${FAILED[@]}"
    exit 1
fi
echo "gpu-check: all steps passed in $(($(date +%s) - T0)) s"
