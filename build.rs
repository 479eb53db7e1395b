//! Build script: compiles the kernels twice from the same sources.
//!
//! 1. `build/simt.rs`: kernels/*.cu as host C++ against the SIMT executor (kernels/simt/), through the
//!    `cc` crate. Always; this is what runs the kernels on machines without a GPU (CI included).
//! 2. `build/nvcc.rs`: kernels/*.cu with nvcc into fatbins embedded in the library, when nvcc is found
//!    (or required by VPPO_REQUIRE_NVCC=1).
//! 3. With `--features bindgen`: regenerates the Rust mirror of kernels/vppo_params.h and fails when the
//!    committed src/params.rs differs.

#[path = "build/nvcc.rs"]
mod nvcc;
#[path = "build/simt.rs"]
mod simt;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rustc-check-cfg=cfg(vppo_kernels_built)");
    simt::build();
    nvcc::build();
    #[cfg(feature = "bindgen")]
    check_params_bindings();
}

#[cfg(feature = "bindgen")]
fn check_params_bindings() {
    let generated = bindgen::Builder::default()
        .header("kernels/vppo_params.h")
        .allowlist_type("Vppo.*")
        .allowlist_var("VPPO_.*")
        .rustified_enum("Vppo.*")
        .derive_default(true)
        .layout_tests(true)
        .generate_comments(true)
        .generate()
        .expect("bindgen could not parse kernels/vppo_params.h")
        .to_string();
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("params_bindgen.rs");
    std::fs::write(&out, &generated).unwrap();
    let committed = std::fs::read_to_string("src/params_bindgen.rs").unwrap_or_default();
    if committed != generated {
        panic!(
            "src/params_bindgen.rs is out of date with kernels/vppo_params.h: copy {} over it",
            out.display()
        );
    }
}
