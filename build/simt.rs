//! Compiles the kernel sources as host C++ against the SIMT executor (kernels/simt/), with the `cc`
//! crate, into one static library linked into the crate.
//!
//! - kernels/simt/simt.cpp (the scheduler) and kernels/simt/tests/*.cu (the executor's self-test
//!   kernels): warnings are errors.
//! - kernels/*.cu (the VPPO kernels): each its own translation unit, `-x c++ -DVPPO_SIMT`.
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

    // The VPPO kernels: warnings shown, not fatal.
    let kernel_sources = sources(&kernels, "cu");
    let mut kernel_objects = Vec::new();
    if !kernel_sources.is_empty() {
        kernel_objects = base(&kernels)
            .files(&kernel_sources)
            .compile_intermediates();
    }

    // The executor and its self tests, warnings as errors; the kernels' objects join the same library,
    // so there is no link-order question between them.
    let mut exec = base(&kernels);
    exec.flag("-Werror").file(kernels.join("simt/simt.cpp"));
    exec.files(sources(&kernels.join("simt/tests"), "cu"));
    exec.objects(&kernel_objects);
    exec.compile("vppo_simt");
}
