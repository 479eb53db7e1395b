"""The extension's CUDA path (``_vppo.forward_cuda`` / ``backward_cuda``, what ``vppo.torch`` calls for
CUDA tensors) on the fake CUDA driver of the Rust tests (tests/fake_cuda/libcuda.c: the driver API on
the SIMT executor, device memory in host memory with guard pages, streams that run only when waited
for). The PyPI torch wheel here has no CUDA, so device memory is made through the fake driver itself
(ctypes) and handed to the extension as raw (address, count) pairs and a raw stream, exactly as
``vppo.torch`` hands over ``tensor.data_ptr()`` and ``torch.cuda.current_stream().cuda_stream``.

Each test runs in a fresh Python process (the fake driver must be loaded before the extension first
loads libcuda, and cannot be unloaded). Compared with the extension's CPU path on the SIMT executor
(the same kernels, same lane order): bit-identical outputs and gradients, with and without rows, in
place, and bad input refused before anything is written. The same for the KL op's CUDA path
(``_vppo.kl_forward_cuda`` / ``kl_backward_cuda``, what ``vppo.torch.kl`` calls for CUDA tensors).
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "fake_cuda" / "libcuda.c"

# Everything the child needs: the fake driver loaded, device memory helpers, the CPU reference run.
PRELUDE = r'''
import ctypes, sys
import torch
import vppo.torch as vt
from vppo import _vppo

lib = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
lib.vppo_fake_cuda_install.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
assert lib.vppo_fake_cuda_install(*_vppo._fake_cuda_hooks(), 0) == 0
u64 = ctypes.c_uint64
def ok(rc, what):
    assert rc == 0, f"{what}: CUresult {rc}"
ok(lib.cuInit(0), "cuInit")
dev, ctx = ctypes.c_int(), ctypes.c_void_p()
ok(lib.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ok(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "retain")
ok(lib.cuCtxSetCurrent(ctx), "set current")
stream = ctypes.c_void_p()
ok(lib.cuStreamCreate(ctypes.byref(stream), 1), "cuStreamCreate")  # non-blocking, as torch's
STREAM = stream.value
lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(u64), ctypes.c_size_t]
lib.cuMemcpyHtoDAsync_v2.argtypes = [u64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
lib.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, u64, ctypes.c_size_t]
lib.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
KEEP = []  # host tensors whose queued uploads have not run yet

def upload(t):
    """A device copy of CPU tensor t, queued on STREAM (it runs only when something waits)."""
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return (0, 0)
    p = u64()
    ok(lib.cuMemAlloc_v2(ctypes.byref(p), nbytes), "cuMemAlloc")
    ok(lib.cuMemcpyHtoDAsync_v2(p.value, t.data_ptr(), nbytes, STREAM), "upload")
    KEEP.append(t)
    return (p.value, t.numel())

def empty(numel, dtype):
    """A device buffer of numel elements of dtype holding 0xFF bytes (NaN), as garbage would."""
    if numel == 0:
        return (0, 0)
    size = torch.tensor([], dtype=dtype).element_size()
    return (upload(torch.full((numel * size,), 255, dtype=torch.uint8))[0], numel)

def download(raw, dtype):
    out = torch.empty(raw[1], dtype=dtype)
    if raw[1]:
        ok(lib.cuMemcpyDtoH_v2(out.data_ptr(), raw[0], out.numel() * out.element_size()), "download")
    return out

def batch(lengths=(5, 0, 7, 4), vocab=33, dtype=torch.float32, seed=0, rows_total=None):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    r = n if rows_total is None else rows_total
    logits = (torch.randn(r, vocab, generator=g) * 2).to(dtype)
    masked = (logits.float() + torch.randn(r, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g).to(torch.int32)
    old_logp = (torch.randn(n, generator=g) * 0.3 - 3.0).float()
    adv = torch.randn(len(lengths), generator=g).float()
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    rows = None
    if rows_total is not None:
        rows = torch.sort(torch.randperm(rows_total, generator=g)[:n]).values
    return logits, masked, targets, old_logp, adv, cu, rows

TOKEN = [torch.uint8 if name == "mask" else torch.float32 for name in vt.TOKEN_OUTPUTS]
RESP = [torch.int32 if name == "k" else torch.float32 for name in vt.RESPONSE_OUTPUTS]

def raw(t):
    return (t.data_ptr(), t.numel())

def cpu_forward(options, b):
    logits, masked, targets, old_logp, adv, cu, rows = b
    n, nb = targets.numel(), adv.numel()
    outs = [torch.empty(n, dtype=d) for d in TOKEN] + [torch.empty(nb, dtype=d) for d in RESP]
    scalars = _vppo.forward("simt", options, vt._dtype_name(logits.dtype), logits.shape[1],
                            raw(logits), raw(masked), raw(targets), raw(old_logp), raw(adv), raw(cu),
                            None if rows is None else raw(rows), None, [raw(o) for o in outs])
    return scalars, outs

def cuda_forward(options, b):
    logits, masked, targets, old_logp, adv, cu, rows = b
    n, nb = targets.numel(), adv.numel()
    dev = [upload(t) for t in (logits, masked, targets, old_logp, adv, cu)]
    drows = None if rows is None else upload(rows)
    outs = [empty(n, d) for d in TOKEN] + [empty(nb, d) for d in RESP]
    scalars = _vppo.forward_cuda(0, STREAM, options, vt._dtype_name(logits.dtype), logits.shape[1],
                                 *dev, drows, None, outs)
    return scalars, [download(o, d) for o, d in zip(outs, TOKEN + RESP)], dev, drows

def same(a, b):
    a, b = a.contiguous(), b.contiguous()
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
'''

FORWARD_AND_BACKWARD = r'''
options = vt._options_json({})
for dtype, rows_total, grad_dtype in [(torch.float32, None, torch.float32),
                                      (torch.bfloat16, None, torch.bfloat16),
                                      (torch.float16, 40, torch.float32),
                                      (torch.bfloat16, 23, torch.bfloat16)]:
    b = batch(dtype=dtype, seed=3, rows_total=rows_total)
    want, want_outs = cpu_forward(options, b)
    got, got_outs, dev, drows = cuda_forward(options, b)
    assert got == want, (got, want)
    for name, x, y in zip(vt.TOKEN_OUTPUTS + vt.RESPONSE_OUTPUTS, got_outs, want_outs):
        assert same(x, y), name
    logits, targets = b[0], b[2]
    lse, dlogp = want_outs[vt.TOKEN_OUTPUTS.index("lse")], want_outs[vt.TOKEN_OUTPUTS.index("dlogp")]
    rows = b[6]
    # The CPU backward.
    grad_want = torch.empty(logits.shape, dtype=grad_dtype)
    _vppo.backward("simt", options, vt._dtype_name(dtype), logits.shape[1], raw(logits),
                   vt._dtype_name(grad_dtype), raw(grad_want), raw(targets), raw(lse), raw(dlogp),
                   None if rows is None else raw(rows))
    # The CUDA backward from the saved tensors on the device, into a buffer of NaN bytes.
    dlse, ddlogp = upload(lse), upload(dlogp)
    grad = empty(logits.numel(), grad_dtype)
    _vppo.backward_cuda(0, STREAM, options, vt._dtype_name(dtype), logits.shape[1], dev[0],
                        vt._dtype_name(grad_dtype), grad, dev[2], dlse, ddlogp, drows)
    assert same(download(grad, grad_dtype).view(logits.shape), grad_want), (dtype, rows_total)
    if rows is not None:
        hit = torch.zeros(logits.shape[0], dtype=torch.bool)
        hit[rows] = True
        assert (grad_want[~hit] == 0).all()
    if grad_dtype == dtype:
        # In place: the device logits become the gradient.
        _vppo.backward_cuda(0, STREAM, options, vt._dtype_name(dtype), logits.shape[1], None,
                            vt._dtype_name(dtype), dev[0], dev[2], dlse, ddlogp, drows)
        assert same(download(dev[0], dtype).view(logits.shape), grad_want)
print("ok")
'''

ERRORS = r'''
options = vt._options_json({})
b = list(batch(seed=5))
b[2] = b[2].clone()
b[2][3] = 33  # a target outside [0, V)
logits, masked, targets, old_logp, adv, cu, rows = b
dev = [upload(t) for t in (logits, masked, targets, old_logp, adv, cu)]
outs = [empty(targets.numel(), d) for d in TOKEN] + [empty(adv.numel(), d) for d in RESP]
try:
    _vppo.forward_cuda(0, STREAM, options, "float32", logits.shape[1], *dev, None, None, outs)
    raise SystemExit("no error for a bad target")
except ValueError as e:
    assert "targets" in str(e), e
# Nothing was written: every output still holds its NaN bytes.
for o, d in zip(outs, TOKEN + RESP):
    assert (download(o, d).view(torch.uint8) == 255).all()
# A bad saved tensor (lse not finite) is refused before the backward writes anything.
lse = torch.full((targets.numel(),), float("inf"))
grad = empty(logits.numel(), torch.float32)
good = upload(torch.zeros(targets.numel(), dtype=torch.int32))
try:
    _vppo.backward_cuda(0, STREAM, options, "float32", logits.shape[1], dev[0], "float32", grad,
                        good, upload(lse), upload(torch.zeros(targets.numel())), None)
    raise SystemExit("no error for an infinite lse")
except ValueError as e:
    assert "lse" in str(e), e
assert (download(grad, torch.float32).view(torch.uint8) == 255).all()
# Length mismatches are refused before any device memory is touched.
try:
    _vppo.forward_cuda(0, STREAM, options, "float32", logits.shape[1], *dev[:3], (dev[3][0], 1),
                       *dev[4:], None, None, outs)
    raise SystemExit("no error for a short old_logp")
except ValueError as e:
    assert "old_logp" in str(e), e
print("ok")
'''

ALLOCATIONS = r'''
# What the crate allocates on the device across a forward and backward (_vppo.cuda_allocated_bytes,
# what test_cuda.py reads on a GPU) equals what the driver was asked for, and is O(N + B): no [N, V]
# buffer besides the caller's gradient. The caller's buffers are made through the driver directly.
class Stats(ctypes.Structure):
    _fields_ = [(f, ctypes.c_uint64) for f in ("launches", "htod_copies", "dtoh_copies", "htod_bytes",
                "dtoh_bytes", "dtod_bytes", "memset_bytes", "allocs", "live_allocs", "live_bytes",
                "alloc_bytes")]
def driver_alloc_bytes():
    ok(lib.cuStreamSynchronize(STREAM), "sync")
    st = Stats()
    lib.vppo_fake_cuda_stats(ctypes.byref(st))
    return st.alloc_bytes
options = vt._options_json({})
b = batch(lengths=(60, 0, 40), vocab=4096, dtype=torch.bfloat16, seed=7)
logits, targets = b[0], b[2]
n, nb = targets.numel(), b[4].numel()
dev = [upload(t) for t in b[:6]]
outs = [empty(n, d) for d in TOKEN] + [empty(nb, d) for d in RESP]
grad = empty(logits.numel(), torch.bfloat16)
lse, dlogp = empty(n, torch.float32), empty(n, torch.float32)
ok(lib.cuStreamSynchronize(STREAM), "sync")
ours, driver = _vppo.cuda_allocated_bytes(0), driver_alloc_bytes()
_vppo.forward_cuda(0, STREAM, options, "bfloat16", logits.shape[1], *dev, None, None, outs)
lse, dlogp = outs[vt.TOKEN_OUTPUTS.index("lse")], outs[vt.TOKEN_OUTPUTS.index("dlogp")]
_vppo.backward_cuda(0, STREAM, options, "bfloat16", logits.shape[1], dev[0], "bfloat16", grad,
                    dev[2], lse, dlogp, None)
took, asked = _vppo.cuda_allocated_bytes(0) - ours, driver_alloc_bytes() - driver
assert took == asked, (took, asked)
assert 0 < took <= 256 * (n + nb) + 65536, (took, n, nb)
assert took < logits.numel() * logits.element_size() // 8, (took, logits.numel())
print("ok")
'''


KL = r"""
def opt(t):
    return None if t is None else raw(t)

def dopt(t):
    return None if t is None else upload(t)

def kl_cpu(tau, p, q, p_rows, q_rows, u):
    n = p.shape[0] if p_rows is None else p_rows.numel()
    outs = [torch.empty(n) for _ in range(3)]
    name, v = vt._dtype_name(p.dtype), p.shape[1]
    _vppo.kl_forward("simt", tau, name, v, raw(p), raw(q), opt(p_rows), opt(q_rows),
                     *[raw(o) for o in outs])
    gp, gq = torch.empty(p.shape, dtype=p.dtype), torch.empty(q.shape, dtype=q.dtype)
    _vppo.kl_backward("simt", tau, name, v, raw(p), raw(q), opt(p_rows), opt(q_rows),
                      *[raw(o) for o in outs], raw(u), raw(gp), raw(gq))
    return outs, gp, gq

g = torch.Generator().manual_seed(7)
n, v = 7, 37
for dtype, rows, own_q_rows, tau in [(torch.float32, False, False, 1.0),
                                     (torch.bfloat16, True, False, 0.7),
                                     (torch.float16, True, True, 1.6),
                                     (torch.float32, True, True, 1.0)]:
    rp, rq = (11, 13 if own_q_rows else 11) if rows else (n, n)
    p = (torch.randn(rp, v, generator=g) * 2).to(dtype)
    q = (torch.randn(rq, v, generator=g) + (p.float() if rq == rp else 0.0)).to(dtype)
    p_rows = torch.sort(torch.randperm(rp, generator=g)[:n]).values if rows else None
    q_rows = torch.sort(torch.randperm(rq, generator=g)[:n]).values if own_q_rows else None
    u = torch.randn(n, generator=g)
    u[2] = 0.0
    want, want_gp, want_gq = kl_cpu(tau, p, q, p_rows, q_rows, u)
    dp, dq, dpr, dqr = upload(p), upload(q), dopt(p_rows), dopt(q_rows)
    outs = [empty(n, torch.float32) for _ in range(3)]
    name = vt._dtype_name(dtype)
    _vppo.kl_forward_cuda(0, STREAM, tau, name, v, dp, dq, dpr, dqr, *outs)
    for what, o, w in zip(("kl", "lse_p", "lse_q"), outs, want):
        assert same(download(o, torch.float32), w), (what, dtype, rows)
    # The backward from the saved tensors on the device, into buffers of NaN bytes.
    gp, gq = empty(p.numel(), dtype), empty(q.numel(), dtype)
    _vppo.kl_backward_cuda(0, STREAM, tau, name, v, dp, dq, dpr, dqr, *outs, upload(u), gp, gq)
    assert same(download(gp, dtype).view(p.shape), want_gp), (dtype, rows)
    assert same(download(gq, dtype).view(q.shape), want_gq), (dtype, rows)
    if rows:
        hit = torch.zeros(rp, dtype=torch.bool)
        hit[p_rows] = True
        assert (want_gp[~hit] == 0).all()

# Bad input: ValueError naming the tensor, nothing written.
p = torch.randn(4, 5, generator=g)
q = torch.randn(4, 5, generator=g)
bad = p.clone()
bad[2, 1] = float("nan")
outs = [empty(4, torch.float32) for _ in range(3)]
for args, named in [((upload(bad), upload(q), None, None), "p_logits"),
                    ((upload(p), upload(q), upload(torch.tensor([0, 2, 1, 3])), None), "p_rows"),
                    ((upload(p), upload(q[:3]), None, None), "q_logits")]:
    try:
        _vppo.kl_forward_cuda(0, STREAM, 1.0, "float32", 5, *args, *outs)
        raise SystemExit(f"no error naming {named}")
    except ValueError as e:
        assert named in str(e), (named, e)
    for o in outs:
        assert (download(o, torch.float32).view(torch.uint8) == 255).all(), named
# An output of the wrong length.
try:
    _vppo.kl_forward_cuda(0, STREAM, 1.0, "float32", 5, upload(p), upload(q), None, None,
                          empty(3, torch.float32), *outs[1:])
    raise SystemExit("no error for a short kl")
except ValueError as e:
    assert "kl" in str(e), e
# The backward refuses a non-finite saved lse_p before writing either gradient.
(kl, lse_p, lse_q), _, _ = kl_cpu(1.0, p, q, None, None, torch.ones(4))
lse_p[1] = float("inf")
gp, gq = empty(20, torch.float32), empty(20, torch.float32)
try:
    _vppo.kl_backward_cuda(0, STREAM, 1.0, "float32", 5, upload(p), upload(q), None, None,
                           upload(kl), upload(lse_p), upload(lse_q), upload(torch.ones(4)), gp, gq)
    raise SystemExit("no error for an infinite lse_p")
except ValueError as e:
    assert "lse_p" in str(e), e
for x in (gp, gq):
    assert (download(x, torch.float32).view(torch.uint8) == 255).all()
print("ok")
"""


FULL_KL = r"""
# kl_penalty = full with ref_logits (SPEC section 12) on the CUDA path: the forward's outputs and the
# [3, N] lse_ref, ref_kl, dref_kl, and the backward's gradient (new buffer and in place), equal to
# the CPU path's on the SIMT executor bit for bit.
options = vt._options_json({"kl_penalty": "full", "kl_coef": 0.25})
for dtype, rows_total in [(torch.float32, None), (torch.bfloat16, 23)]:
    b = batch(dtype=dtype, seed=4, rows_total=rows_total)
    logits, masked, targets, old_logp, adv, cu, rows = b
    g = torch.Generator().manual_seed(9)
    ref = (logits.float() + torch.randn(logits.shape, generator=g)).to(dtype)
    n, nb = targets.numel(), adv.numel()
    name, v = vt._dtype_name(dtype), logits.shape[1]
    outs = [torch.empty(n, dtype=d) for d in TOKEN] + [torch.empty(nb, dtype=d) for d in RESP]
    full_want = torch.zeros(3, n)
    want = _vppo.forward("simt", options, name, v, raw(logits), raw(masked), raw(targets),
                         raw(old_logp), raw(adv), raw(cu), None if rows is None else raw(rows), None,
                         [raw(o) for o in outs], ref_logits=raw(ref), full_out=raw(full_want))
    assert (full_want[1] > 0).any()
    dev = [upload(t) for t in (logits, masked, targets, old_logp, adv, cu)]
    drows = None if rows is None else upload(rows)
    dref = upload(ref)
    douts = [empty(n, d) for d in TOKEN] + [empty(nb, d) for d in RESP]
    dfull = upload(torch.zeros(3, n))
    got = _vppo.forward_cuda(0, STREAM, options, name, v, *dev, drows, None, douts,
                             ref_logits=dref, full_out=dfull)
    assert got == want, (got, want)
    for o, d, w in zip(douts, TOKEN + RESP, outs):
        assert same(download(o, d), w)
    assert same(download(dfull, torch.float32).view(3, n), full_want)
    lse = outs[vt.TOKEN_OUTPUTS.index("lse")]
    dlogp = outs[vt.TOKEN_OUTPUTS.index("dlogp")]
    grad_want = torch.empty(logits.shape, dtype=dtype)
    _vppo.backward("simt", options, name, v, raw(logits), name, raw(grad_want), raw(targets),
                   raw(lse), raw(dlogp), None if rows is None else raw(rows), None, raw(ref),
                   raw(full_want))
    grad = empty(logits.numel(), dtype)
    dlse, ddlogp = upload(lse), upload(dlogp)
    _vppo.backward_cuda(0, STREAM, options, name, v, dev[0], name, grad, dev[2], dlse, ddlogp,
                        drows, dref, dfull)
    assert same(download(grad, dtype).view(logits.shape), grad_want), (dtype, rows_total)
    _vppo.backward_cuda(0, STREAM, options, name, v, None, name, dev[0], dev[2], dlse, ddlogp,
                        drows, dref, dfull)
    assert same(download(dev[0], dtype).view(logits.shape), grad_want)
    # ref_logits without its saved tensors, and a missing ref_logits, are refused.
    for args in [(dref, None), (None, dfull)]:
        try:
            _vppo.backward_cuda(0, STREAM, options, name, v, dev[1], name, grad, dev[2], dlse,
                                ddlogp, drows, *args)
            raise SystemExit("no error for half of the full KL's tensors")
        except ValueError as e:
            assert "go together" in str(e), e
    try:
        _vppo.forward_cuda(0, STREAM, options, name, v, *dev, drows, None, douts)
        raise SystemExit("no error for a missing ref_logits")
    except ValueError as e:
        assert "ref_logits" in str(e), e
print("ok")
"""


def _cc():
    cc = os.environ.get("CC", "").split() or ["cc"]
    return cc if shutil.which(cc[0]) else None


def _run(tmp_path, body):
    from vppo import _vppo  # noqa: F401  (the extension must be importable)

    cc = _cc()
    if not FAKE.exists() or cc is None:
        pytest.skip("needs the repository's tests/fake_cuda/libcuda.c and a C compiler")
    so = tmp_path / "libcuda.so"
    subprocess.run([*cc, "-shared", "-fPIC", "-O1", "-std=c11", "-pthread",
                    "-Wl,-soname,libcuda.so", "-o", str(so), str(FAKE)], check=True)
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(PRELUDE) + textwrap.dedent(body))
    run = subprocess.run([sys.executable, str(script), str(so)], capture_output=True, text=True,
                         timeout=600)
    text = run.stdout + run.stderr
    if "kernels not built" in text:
        pytest.skip("this build of the extension has no CUDA kernels (no nvcc at build time)")
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), text


def test_cuda_forward_and_backward_on_the_fake_driver(tmp_path):
    _run(tmp_path, FORWARD_AND_BACKWARD)


def test_cuda_errors_on_the_fake_driver(tmp_path):
    _run(tmp_path, ERRORS)


def test_cuda_allocations_are_o_of_n_on_the_fake_driver(tmp_path):
    _run(tmp_path, ALLOCATIONS)


def test_kl_forward_and_backward_on_the_fake_driver(tmp_path):
    _run(tmp_path, KL)


def test_full_kl_on_the_fake_driver(tmp_path):
    _run(tmp_path, FULL_KL)
