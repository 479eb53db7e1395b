//! Compiles the kernel sources as host C++ against the SIMT executor (kernels/simt/), with the `cc`
//! crate, into one static library linked into the crate.
//!
//! - kernels/simt/simt.cpp (the scheduler) and kernels/simt/tests/*.cu (the executor's self-test
//!   kernels): warnings are errors.
//! - kernels/*.cu (the VPPO kernels): each its own translation unit, `-x c++ -DVPPO_SIMT`.
//! - The race-check twins of every .cu above (kernels/simt/simt.h, "Race check"): each file again, with
//!   -fsanitize=thread instrumentation (no sanitizer runtime: the executor defines the hooks), line
//!   tables, and every kernel `k` renamed `k_racecheck`, inside a namespace of its own so that its
//!   inline helpers (common.cuh's templates) cannot be merged with the plain build's by the linker.
//!
//! All as C++17 at -O2 with kernels/ on the include path, whatever the cargo profile: the executor
//! runs the real kernels over large batches in the tests.

use std::path::{Path, PathBuf};

/// The files in `dir` whose name ends in `.ext`, sorted (so the build does not depend on readdir order).
fn sources(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == ext))
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// The common compiler settings: host C++17, -O2, kernels/ included, VPPO_SIMT defined.
fn base(kernels: &Path) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .opt_level(2)
        .include(kernels)
        .define("VPPO_SIMT", None)
        .warnings(true)
        .extra_warnings(true)
        // The .cu files are C++ for this build: -x applies to the source file that follows the flags.
        .flag("-x")
        .flag("c++");
    b
}

/// The kernels a source file defines: the `k` of every `vppo_simt_k` entry that `VPPO_EXPORT_KERNEL`
/// expands to, found in the preprocessed source (so kernels named through a macro, as in backward.cu,
/// are found too).
fn kernel_names(kernels: &Path, src: &Path) -> Vec<String> {
    let expanded = base(kernels)
        .flag("-Wno-unknown-pragmas")
        .file(src)
        .expand();
    let text = String::from_utf8_lossy(&expanded);
    let squeezed: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let pattern = "int vppo_simt_";
    let mut names = Vec::new();
    let mut rest = squeezed.as_str();
    while let Some(at) = rest.find(pattern) {
        rest = &rest[at + pattern.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let (name, after) = rest.split_at(end);
        // The entry's definition (its parameters are named), not the twin's declaration.
        if after
            .trim_start()
            .starts_with("(const VppoSimtLaunch *launch")
        {
            names.push(name.to_string());
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Compiles the race-check twin of each of `sources` (see the module comment) into objects.
fn race_check_objects(kernels: &Path, sources: &[PathBuf]) -> Vec<PathBuf> {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("racecheck");
    std::fs::create_dir_all(&out).expect("creating OUT_DIR/racecheck");
    let mut build = base(kernels);
    build
        .flag("-Wno-unknown-pragmas")
        .flag("-fsanitize=thread")
        .flag("-g1")
        .define("VPPO_SIMT_RACECHECK", None)
        .out_dir(out.join("obj"));
    let mut any = false;
    for src in sources {
        let names = kernel_names(kernels, src);
        if names.is_empty() {
            continue;
        }
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a UTF-8 file name");
        let ident: String = stem
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let wrapper = out.join(format!("{ident}.cpp"));
        let renames: String = names
            .iter()
            .map(|n| format!("#define {n} {n}_racecheck\n"))
            .collect();
        let text = format!(
            "/* The race-check twin of {src} (build/simt.rs): generated, do not edit. */\n\
             #include \"vppo_portable.cuh\"\n#include \"vppo_params.h\"\n{renames}\
             namespace vppo_racecheck_{ident} {{\n#include \"{src}\"\n}}\n",
            src = src.display()
        );
        if std::fs::read_to_string(&wrapper).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&wrapper, &text).expect("writing a race-check wrapper");
        }
        build.file(&wrapper);
        any = true;
    }
    if any {
        build.compile_intermediates()
    } else {
        Vec::new()
    }
}

/// Builds the static library `vppo_simt` (executor, self tests and kernels).
pub fn build() {
    println!("cargo:rerun-if-changed=kernels");
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let kernels = root.join("kernels");
    for dir in [
        kernels.clone(),
        kernels.join("simt"),
        kernels.join("simt/tests"),
    ] {
        println!("cargo:rerun-if-changed={}", dir.display());
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }
    }

    // The VPPO kernels, warnings as errors (but `#pragma unroll`, which only nvcc knows).
    let kernel_sources = sources(&kernels, "cu");
    let mut kernel_objects = Vec::new();
    if !kernel_sources.is_empty() {
        kernel_objects = base(&kernels)
            .flag("-Werror")
            .flag("-Wno-unknown-pragmas")
            .files(&kernel_sources)
            .compile_intermediates();
    }
    // The mutant: perception.cu with every exp times 1.001 (VPPO_MUTANT, kernels/common.cuh), under
    // renamed kernels, so tests/kernels.rs can show that its checks catch a wrong kernel.
    let perception = kernels.join("perception.cu");
    if perception.exists() {
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("mutant");
        std::fs::create_dir_all(&out).expect("creating OUT_DIR/mutant");
        let mut mutant = base(&kernels);
        mutant
            .flag("-Wno-unknown-pragmas")
            .define("VPPO_MUTANT", None)
            .define("VPPO_SIMT_NO_RACECHECK", None)
            .out_dir(&out);
        for dtype in ["f32", "f16", "bf16"] {
            let name = format!("vppo_perception_{dtype}");
            mutant.define(&name, Some(format!("{name}_mutant").as_str()));
        }
        kernel_objects.extend(mutant.file(&perception).compile_intermediates());
    }

    // The race-check twins of the kernels and of the self tests.
    let selftests = sources(&kernels.join("simt/tests"), "cu");
    let mut twins = kernel_sources.clone();
    twins.extend(selftests.iter().cloned());
    kernel_objects.extend(race_check_objects(&kernels, &twins));

    // The executor and its self tests, warnings as errors; the kernels' objects join the same library,
    // so there is no link-order question between them.
    let mut exec = base(&kernels);
    exec.flag("-Werror").file(kernels.join("simt/simt.cpp"));
    exec.files(selftests);
    exec.objects(&kernel_objects);
    exec.compile("vppo_simt");
}
