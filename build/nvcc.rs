//! Finds nvcc and compiles kernels/*.cu into fatbins that the library embeds.
//!
//! One fatbin per kernel file (`nvcc -fatbin` takes one input), each holding SASS for every
//! architecture in VPPO_CUDA_ARCHS (default sm_80, sm_86, sm_89, sm_90) and PTX for the lowest of
//! them (compute_80 by default; PTX lets a newer card JIT the kernels, but only when its driver is at
//! least as new as this nvcc, which is why SASS is there for every card we target).
//!
//! Writes to OUT_DIR:
//! - `<stem>.fatbin` for each kernels/<stem>.cu;
//! - `resource_report.txt`: registers, barriers, shared memory, stack frame and spills of every kernel
//!   on every architecture (ptxas `-v`), followed by nvcc's raw output;
//! - `fatbins.rs`: `FATBINS` (name, bytes) pairs through `include_bytes!`, `RESOURCE_REPORT`,
//!   `CUDA_ARCHS`, `CUDA_PTX_ARCH`, `NVCC_VERSION`. Empty when no nvcc was found.
//!
//! Emits `cargo:rustc-cfg=vppo_kernels_built` when the kernels were compiled.
//!
//! Variables: NVCC (path of nvcc), CUDA_HOME, CUDA_PATH, PATH, VPPO_NVCC_VENV (default
//! ~/.cache/vppo/nvcc-venv), VPPO_CUDA_ARCHS, VPPO_REQUIRE_NVCC. nvcc itself also reads NVCC_CCBIN,
//! NVCC_PREPEND_FLAGS and NVCC_APPEND_FLAGS, so changes to them rerun the build too.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Stops the build with `msg` (printed without a panic's backtrace noise).
fn fail(msg: &str) -> ! {
    eprintln!("\nerror: {msg}\n");
    std::process::exit(1)
}

/// Architectures built when VPPO_CUDA_ARCHS is not set: Ampere (A100, A10/RTX 30), Ada (L4/L40/RTX 40),
/// Hopper (H100/H200).
const DEFAULT_ARCHS: &str = "80,86,89,90";

/// The pinned PyPI wheels that make a working nvcc without a CUDA installation (same pins as .ci/run).
const NVCC_WHEELS: &str = "nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
                           nvidia-cuda-runtime==13.0.96 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85";

/// Variables whose change must rerun the build script.
const WATCHED_VARS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
    "HOME",
    "VPPO_NVCC_VENV",
    "VPPO_CUDA_ARCHS",
    "VPPO_REQUIRE_NVCC",
    "NVCC_CCBIN",
    "NVCC_PREPEND_FLAGS",
    "NVCC_APPEND_FLAGS",
];

/// Entry point, called from build.rs.
pub fn build() {
    for var in WATCHED_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let kernel_dir = manifest_dir.join("kernels");

    let require = match env::var("VPPO_REQUIRE_NVCC").as_deref() {
        Err(_) | Ok("") | Ok("0") => false,
        Ok("1") => true,
        Ok(other) => fail(&format!("VPPO_REQUIRE_NVCC must be 0 or 1, not {other:?}")),
    };
    let archs = match parse_archs(env::var("VPPO_CUDA_ARCHS").ok().as_deref()) {
        Ok(a) => a,
        Err(e) => fail(&e),
    };

    let nvcc = match find_nvcc() {
        Ok(Some(found)) => found,
        Ok(None) => {
            if require {
                fail(&format!(
                    "VPPO_REQUIRE_NVCC=1 but no nvcc was found. Looked at $NVCC, $CUDA_HOME/bin, \
                     $CUDA_PATH/bin, PATH, the venv {} and python3's site-packages. {}",
                    default_venv().map_or("(no HOME)".into(), |p| p.display().to_string()),
                    how_to_get_nvcc()
                ));
            }
            println!(
                "cargo:warning=vppo: nvcc not found, so the CUDA kernels are not built and \
                 Device::Cuda will fail with `kernels not built` (the CPU reference and the SIMT \
                 executor work). {}",
                how_to_get_nvcc()
            );
            write_generated(
                &out_dir,
                &[],
                "",
                &archs,
                "",
                "(no nvcc: kernels not built)\n",
            );
            return;
        }
        Err(e) => fail(&e),
    };

    let version = nvcc_version(&nvcc.path).unwrap_or_else(|e| fail(&e));
    let sources = kernel_sources(&kernel_dir);
    let jobs = env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);

    let started = std::time::Instant::now();
    let compiled = compile_all(&nvcc.path, &kernel_dir, &out_dir, &sources, &archs, jobs);
    let elapsed = started.elapsed().as_secs_f64();

    let mut report = String::new();
    let _ = writeln!(report, "vppo kernel resource report (ptxas -v)");
    let _ = writeln!(
        report,
        "nvcc: {} ({}, found via {})",
        nvcc.path.display(),
        version,
        nvcc.how
    );
    let _ = writeln!(
        report,
        "targets: SASS {}, PTX {}",
        archs
            .sass
            .iter()
            .map(|a| format!("sm_{a}"))
            .collect::<Vec<_>>()
            .join(" "),
        archs.ptx_arch()
    );
    let _ = writeln!(
        report,
        "nvcc flags: {}",
        nvcc_flags(&archs, &kernel_dir).join(" ")
    );
    let _ = writeln!(
        report,
        "compile time: {elapsed:.1} s for {} file(s)",
        sources.len()
    );
    let _ = writeln!(report);
    let mut entries = Vec::new();
    let mut raw = String::new();
    for c in &compiled {
        let parsed = parse_ptxas_report(&c.output);
        entries.extend(parsed.into_iter().map(|e| (c.stem.clone(), e)));
        let _ = writeln!(raw, "==== nvcc output for kernels/{}.cu ====", c.stem);
        raw.push_str(&c.output);
        if !c.output.ends_with('\n') {
            raw.push('\n');
        }
    }
    report.push_str(&format_table(&entries));
    let _ = writeln!(report);
    report.push_str(&raw);

    let spills: Vec<String> = entries
        .iter()
        .filter(|(_, e)| e.spill_stores > 0 || e.spill_loads > 0)
        .map(|(file, e)| {
            format!(
                "{file}.cu: {} on {}: {} bytes spill stores, {} bytes spill loads",
                e.function, e.arch, e.spill_stores, e.spill_loads
            )
        })
        .collect();
    fs::write(out_dir.join("resource_report.txt"), &report).expect("write resource_report.txt");
    if !spills.is_empty() {
        fail(&format!(
            "register spills in the kernels (the kernels must not spill; see {}):\n{}",
            out_dir.join("resource_report.txt").display(),
            spills.join("\n")
        ));
    }

    let fatbins: Vec<(String, PathBuf)> = compiled
        .iter()
        .map(|c| (c.stem.clone(), c.fatbin.clone()))
        .collect();
    write_generated(&out_dir, &fatbins, &version, &archs, &report, "");
    println!("cargo:rustc-cfg=vppo_kernels_built");
}

/// How to get a working nvcc, for the warning and the errors.
fn how_to_get_nvcc() -> String {
    format!(
        "To build the kernels, install the CUDA toolkit (or set NVCC=/path/to/nvcc), or get nvcc \
         from PyPI: `python3 -m venv ~/.cache/vppo/nvcc-venv && ~/.cache/vppo/nvcc-venv/bin/pip \
         install {NVCC_WHEELS}`, then rebuild."
    )
}

/// The SASS architectures (numbers like "90" or "90a") and the PTX one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archs {
    /// SASS targets, as given (sorted, deduplicated), e.g. ["80", "86", "89", "90"].
    pub sass: Vec<String>,
    /// PTX target: the numeric part of the lowest SASS target, e.g. "80".
    pub ptx: String,
}

impl Archs {
    /// "compute_80".
    pub fn ptx_arch(&self) -> String {
        format!("compute_{}", self.ptx)
    }
}

/// Parses VPPO_CUDA_ARCHS: numbers separated by commas, semicolons or spaces, each optionally written
/// `sm_90` or `9.0`, optionally with an `a` or `f` suffix (`90a`). None or empty gives the default.
pub fn parse_archs(spec: Option<&str>) -> Result<Archs, String> {
    let spec = match spec.map(str::trim) {
        None | Some("") => DEFAULT_ARCHS,
        Some(s) => s,
    };
    let mut sass: Vec<(u32, String)> = Vec::new();
    for item in spec
        .split([',', ';', ' '])
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let raw = item
            .strip_prefix("sm_")
            .or_else(|| item.strip_prefix("compute_"))
            .unwrap_or(item);
        let raw = raw.replace('.', "");
        let (digits, suffix) = match raw.strip_suffix('a') {
            Some(d) => (d.to_string(), "a"),
            None => match raw.strip_suffix('f') {
                Some(d) => (d.to_string(), "f"),
                None => (raw.clone(), ""),
            },
        };
        let number: u32 = match digits.parse() {
            Ok(n) if (2..=4).contains(&digits.len()) && n >= 50 => n,
            _ => {
                return Err(format!(
                    "VPPO_CUDA_ARCHS: {item:?} is not a CUDA architecture (write e.g. \"90\", \
                     \"sm_86\" or \"80,86,89,90\")"
                ))
            }
        };
        let name = format!("{number}{suffix}");
        if !sass.iter().any(|(_, n)| *n == name) {
            sass.push((number, name));
        }
    }
    if sass.is_empty() {
        return Err(format!("VPPO_CUDA_ARCHS={spec:?} names no architecture"));
    }
    sass.sort();
    let ptx = sass[0].0.to_string();
    Ok(Archs {
        sass: sass.into_iter().map(|(_, n)| n).collect(),
        ptx,
    })
}

/// An nvcc that was found, and where.
struct Nvcc {
    path: PathBuf,
    how: String,
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn default_venv() -> Option<PathBuf> {
    match env::var_os("VPPO_NVCC_VENV") {
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/vppo/nvcc-venv")),
    }
}

/// nvcc inside a site-packages directory: the CUDA 13 wheels put it in nvidia/cu13/bin, the CUDA 12
/// ones in nvidia/cuda_nvcc/bin.
fn nvcc_in_site_packages(site: &Path) -> Option<PathBuf> {
    ["nvidia/cu13/bin/nvcc", "nvidia/cuda_nvcc/bin/nvcc"]
        .iter()
        .map(|rel| site.join(rel))
        .find(|p| is_executable(p))
}

/// Looks for nvcc in the documented order. Err when the user pointed at an nvcc that is not there.
fn find_nvcc() -> Result<Option<Nvcc>, String> {
    if let Some(v) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(&v);
        if is_executable(&p) {
            return Ok(Some(Nvcc {
                path: p,
                how: "$NVCC".into(),
            }));
        }
        // NVCC=nvcc: a bare name is looked up on PATH.
        if p.components().count() == 1 {
            if let Some(found) = search_path(&p.to_string_lossy()) {
                return Ok(Some(Nvcc {
                    path: found,
                    how: "$NVCC on PATH".into(),
                }));
            }
        }
        return Err(format!("NVCC={} is not an executable file", p.display()));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var).filter(|v| !v.is_empty()) {
            let p = PathBuf::from(home).join("bin/nvcc");
            if is_executable(&p) {
                return Ok(Some(Nvcc {
                    path: p,
                    how: format!("${var}"),
                }));
            }
        }
    }
    if let Some(p) = search_path("nvcc") {
        return Ok(Some(Nvcc {
            path: p,
            how: "PATH".into(),
        }));
    }
    if let Some(venv) = default_venv() {
        if let Ok(libs) = fs::read_dir(venv.join("lib")) {
            let mut dirs: Vec<PathBuf> = libs.flatten().map(|e| e.path()).collect();
            dirs.sort();
            for d in dirs {
                if let Some(p) = nvcc_in_site_packages(&d.join("site-packages")) {
                    return Ok(Some(Nvcc {
                        path: p,
                        how: format!("venv {}", venv.display()),
                    }));
                }
            }
        }
    }
    for site in python_site_packages() {
        if let Some(p) = nvcc_in_site_packages(&site) {
            return Ok(Some(Nvcc {
                path: p,
                how: format!("python3 site-packages {}", site.display()),
            }));
        }
    }
    Ok(None)
}

fn search_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// The site-packages directories of python3 (system and user), if python3 runs.
fn python_site_packages() -> Vec<PathBuf> {
    let script = "import site, sys\n\
                  dirs = list(getattr(site, 'getsitepackages', lambda: [])())\n\
                  dirs.append(site.getusersitepackages())\n\
                  print('\\n'.join(dirs))";
    match Command::new("python3").arg("-c").arg(script).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .collect(),
        _ => Vec::new(),
    }
}

/// "13.0.88" from `nvcc --version`; an nvcc that does not run is an error.
fn nvcc_version(nvcc: &Path) -> Result<String, String> {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .map_err(|e| format!("could not run {} --version: {e}", nvcc.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "{} --version failed ({}): {}{}",
            nvcc.display(),
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // "Cuda compilation tools, release 13.0, V13.0.88"
    Ok(text
        .lines()
        .find_map(|l| l.split(", V").nth(1).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| "unknown version".into()))
}

/// kernels/*.cu, sorted by name.
fn kernel_sources(kernel_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match fs::read_dir(kernel_dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "cu"))
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// The flags of every nvcc call, without the input and output names.
fn nvcc_flags(archs: &Archs, kernel_dir: &Path) -> Vec<String> {
    let mut f: Vec<String> = vec![
        "-fatbin".into(),
        "-std=c++17".into(),
        "-O3".into(),
        "-lineinfo".into(),
        // Flush f32 denormals to zero: exp2f is then one MUFU.EX2 instead of six instructions of
        // denormal handling, which took pass 1's bf16 loop from ~37 to ~25 instructions per (a, b)
        // pair (SASS of vppo_perception_bf16, sm_90); 3 TB/s of bf16 pairs leaves ~40 per SM clock.
        // A probability below 1.2e-38 becoming 0 changes no sum. Not fast math: expf, logf and the
        // divisions stay IEEE-accurate, and the loss pass works in double.
        "-ftz=true".into(),
        // Every warning (front end, cicc and ptxas) is an error...
        "-Werror".into(),
        "all-warnings".into(),
        // ...and ptxas -warn-spills turns a register spill into a warning, so a spill fails the
        // build with ptxas's own message. -v prints the resource report parsed below.
        "-Xptxas".into(),
        "-v,-warn-spills".into(),
        // Compressed fatbins need a 12.4+ driver; uncompressed SASS loads on older ones too.
        "-no-compress".into(),
        // One ptxas at a time per nvcc, so the -v lines of different architectures never interleave;
        // the files are compiled in parallel instead.
        "--threads".into(),
        "1".into(),
        format!("-I{}", kernel_dir.display()),
    ];
    for a in &archs.sass {
        let digits = a.trim_end_matches(['a', 'f']);
        // sm_90a needs compute_90a; plain sm_XX uses compute_XX.
        let virt = if a.ends_with(['a', 'f']) {
            a.as_str()
        } else {
            digits
        };
        f.push("-gencode".into());
        f.push(format!("arch=compute_{virt},code=sm_{a}"));
    }
    f.push("-gencode".into());
    f.push(format!("arch=compute_{0},code=compute_{0}", archs.ptx));
    f
}

/// One compiled kernel file.
struct Compiled {
    stem: String,
    fatbin: PathBuf,
    output: String,
}

/// Compiles every source, `jobs` at a time; the first failure stops the build with nvcc's message.
fn compile_all(
    nvcc: &Path,
    kernel_dir: &Path,
    out_dir: &Path,
    sources: &[PathBuf],
    archs: &Archs,
    jobs: usize,
) -> Vec<Compiled> {
    let flags = nvcc_flags(archs, kernel_dir);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<(usize, Result<Compiled, String>)>> = Default::default();
    std::thread::scope(|s| {
        for _ in 0..jobs.min(sources.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(src) = sources.get(i) else { break };
                let r = compile_one(nvcc, &flags, src, out_dir);
                results.lock().unwrap().push((i, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(i, _)| *i);
    let mut errors = Vec::new();
    let mut ok = Vec::new();
    for (_, r) in results {
        match r {
            Ok(c) => ok.push(c),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        fail(&format!(
            "nvcc failed to compile the kernels:\n{}",
            errors.join("\n")
        ));
    }
    ok
}

fn compile_one(
    nvcc: &Path,
    flags: &[String],
    src: &Path,
    out_dir: &Path,
) -> Result<Compiled, String> {
    let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
    if !stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "kernels/{stem}.cu: kernel file names must be letters, digits and '_' (they name modules)"
        ));
    }
    let fatbin = out_dir.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.args(flags).arg("-o").arg(&fatbin).arg(src);
    let out = cmd
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!(
            "==== kernels/{stem}.cu: nvcc exited with {} ====\ncommand: {:?}\n{output}",
            out.status, cmd
        ));
    }
    if !fatbin.is_file() {
        return Err(format!(
            "nvcc reported success but wrote no {}",
            fatbin.display()
        ));
    }
    Ok(Compiled {
        stem,
        fatbin,
        output,
    })
}

/// One function's resources on one architecture, from ptxas -v.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceEntry {
    /// "sm_90".
    pub arch: String,
    /// Kernel (entry) or non-inlined device function name.
    pub function: String,
    /// True for a `__global__` entry point.
    pub entry: bool,
    /// Registers per thread.
    pub registers: u32,
    /// Named barriers used.
    pub barriers: u32,
    /// Static shared memory in bytes.
    pub smem: u64,
    /// Stack frame in bytes.
    pub stack: u64,
    /// Spill stores in bytes.
    pub spill_stores: u64,
    /// Spill loads in bytes.
    pub spill_loads: u64,
}

/// The first integer before `unit` in `text` ("12 bytes smem" with unit " bytes smem" gives 12).
fn number_before(text: &str, unit: &str) -> Option<u64> {
    let at = text.find(unit)?;
    let head = text[..at].trim_end();
    let digits: String = head
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.chars().rev().collect::<String>().parse().ok()
}

/// Parses ptxas -v output into one entry per (architecture, function).
///
/// The lines come in this order for each architecture:
/// `Compiling entry function 'k' for 'sm_90'`, then for each function
/// `Function properties for f`, `N bytes stack frame, N bytes spill stores, N bytes spill loads`,
/// and for entries `Used N registers, used N barriers, N bytes smem, N bytes cmem[0]`.
pub fn parse_ptxas_report(output: &str) -> Vec<ResourceEntry> {
    let mut entries: Vec<ResourceEntry> = Vec::new();
    let mut arch = String::new();
    let mut current: Option<usize> = None;
    for line in output.lines() {
        let l = line.trim();
        if let Some(rest) = l.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let name = parts.next().unwrap_or("").to_string();
            arch = parts.nth(1).unwrap_or("").to_string();
            entries.push(ResourceEntry {
                arch: arch.clone(),
                function: name,
                entry: true,
                ..Default::default()
            });
            current = Some(entries.len() - 1);
        } else if let Some(name) = l.split("Function properties for ").nth(1) {
            let name = name.trim().to_string();
            let found = entries
                .iter()
                .rposition(|e| e.arch == arch && e.function == name);
            current = Some(match found {
                Some(i) => i,
                None => {
                    entries.push(ResourceEntry {
                        arch: arch.clone(),
                        function: name,
                        entry: false,
                        ..Default::default()
                    });
                    entries.len() - 1
                }
            });
        } else if l.contains("bytes stack frame") {
            if let Some(e) = current.and_then(|i| entries.get_mut(i)) {
                e.stack = number_before(l, " bytes stack frame").unwrap_or(0);
                e.spill_stores = number_before(l, " bytes spill stores").unwrap_or(0);
                e.spill_loads = number_before(l, " bytes spill loads").unwrap_or(0);
            }
        } else if l.contains("Used ") && l.contains(" registers") {
            if let Some(e) = current.and_then(|i| entries.get_mut(i)) {
                let after = &l[l.find("Used ").unwrap()..];
                e.registers = number_before(after, " registers").unwrap_or(0) as u32;
                e.barriers = number_before(after, " barriers").unwrap_or(0) as u32;
                e.smem = number_before(after, " bytes smem").unwrap_or(0);
            }
        } else if let Some(rest) = l
            .split("error   : Registers are spilled to local memory in function '")
            .nth(1)
        {
            // With -warn-spills and -Werror ptxas stops here; keep the spill visible in the table.
            let name = rest.split('\'').next().unwrap_or("").to_string();
            entries.push(ResourceEntry {
                arch: arch.clone(),
                function: name,
                entry: false,
                spill_stores: number_before(l, " bytes spill stores").unwrap_or(0),
                spill_loads: number_before(l, " bytes spill loads").unwrap_or(0),
                ..Default::default()
            });
        }
    }
    entries
}

fn format_table(entries: &[(String, ResourceEntry)]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<14} {:<40} {:<7} {:>5} {:>4} {:>8} {:>7} {:>7} {:>7}",
        "file", "function", "arch", "regs", "bar", "smem", "stack", "spill_st", "spill_ld"
    );
    for (file, e) in entries {
        let name = if e.entry {
            e.function.clone()
        } else {
            format!("{} (device fn)", e.function)
        };
        let _ = writeln!(
            s,
            "{:<14} {:<40} {:<7} {:>5} {:>4} {:>8} {:>7} {:>7} {:>7}",
            format!("{file}.cu"),
            name,
            e.arch,
            e.registers,
            e.barriers,
            e.smem,
            e.stack,
            e.spill_stores,
            e.spill_loads
        );
    }
    if entries.is_empty() {
        let _ = writeln!(s, "(no kernels)");
    }
    s
}

/// Writes OUT_DIR/fatbins.rs (and, when `report` is empty, a resource report saying why).
fn write_generated(
    out_dir: &Path,
    fatbins: &[(String, PathBuf)],
    version: &str,
    archs: &Archs,
    report: &str,
    no_report: &str,
) {
    let report_path = out_dir.join("resource_report.txt");
    if report.is_empty() {
        fs::write(&report_path, no_report).expect("write resource_report.txt");
    }
    let mut rs = String::new();
    let _ = writeln!(rs, "// Generated by build/nvcc.rs. Do not edit.");
    let _ = writeln!(
        rs,
        "/// Each compiled kernel file: (file stem, fatbin bytes). Empty without nvcc."
    );
    let _ = writeln!(rs, "pub const FATBINS: &[(&str, &[u8])] = &[");
    for (stem, path) in fatbins {
        let _ = writeln!(
            rs,
            "    ({stem:?}, include_bytes!({:?})),",
            path.display().to_string()
        );
    }
    let _ = writeln!(rs, "];");
    let _ = writeln!(
        rs,
        "/// nvcc's resource report (registers, shared memory, stack, spills per kernel and arch)."
    );
    let _ = writeln!(
        rs,
        "pub const RESOURCE_REPORT: &str = include_str!({:?});",
        report_path.display().to_string()
    );
    let built = !fatbins.is_empty() || !version.is_empty();
    let sass: Vec<String> = if built {
        archs.sass.iter().map(|a| format!("sm_{a}")).collect()
    } else {
        Vec::new()
    };
    let _ = writeln!(
        rs,
        "/// SASS architectures in the fatbins (\"sm_90\"), empty without nvcc."
    );
    let _ = writeln!(rs, "pub const CUDA_ARCHS: &[&str] = &{sass:?};");
    let ptx = if built {
        archs.ptx_arch()
    } else {
        String::new()
    };
    let _ = writeln!(
        rs,
        "/// PTX architecture in the fatbins (\"compute_80\"), empty without nvcc."
    );
    let _ = writeln!(rs, "pub const CUDA_PTX_ARCH: &str = {ptx:?};");
    let _ = writeln!(
        rs,
        "/// Version of the nvcc that built the fatbins, empty without nvcc."
    );
    let _ = writeln!(rs, "pub const NVCC_VERSION: &str = {version:?};");
    fs::write(out_dir.join("fatbins.rs"), rs).expect("write fatbins.rs");
}
