//! Tests of the pure parts of build/nvcc.rs (architecture list and ptxas report parsing), compiled
//! here from the same source file the build script uses.

#[allow(dead_code)]
#[path = "../build/nvcc.rs"]
mod nvcc;

use nvcc::{parse_archs, parse_ptxas_report, Archs};

fn archs(sass: &[&str], ptx: &str) -> Archs {
    Archs {
        sass: sass.iter().map(|s| s.to_string()).collect(),
        ptx: ptx.to_string(),
    }
}

#[test]
fn default_architectures_are_ampere_ada_hopper_with_compute_80_ptx() {
    assert_eq!(
        parse_archs(None).unwrap(),
        archs(&["80", "86", "89", "90"], "80")
    );
    assert_eq!(
        parse_archs(Some("  ")).unwrap(),
        archs(&["80", "86", "89", "90"], "80")
    );
    assert_eq!(parse_archs(None).unwrap().ptx_arch(), "compute_80");
}

#[test]
fn architecture_lists_accept_the_usual_spellings() {
    assert_eq!(parse_archs(Some("90")).unwrap(), archs(&["90"], "90"));
    assert_eq!(
        parse_archs(Some("sm_86; 8.0 90,86")).unwrap(),
        archs(&["80", "86", "90"], "80")
    );
    assert_eq!(
        parse_archs(Some("90a,90")).unwrap(),
        archs(&["90", "90a"], "90")
    );
    assert_eq!(
        parse_archs(Some("120,100")).unwrap(),
        archs(&["100", "120"], "100")
    );
}

#[test]
fn bad_architecture_lists_are_errors() {
    for bad in ["ampere", "9", "sm_", "90b", ",,", "12345", "30x"] {
        let e = parse_archs(Some(bad)).unwrap_err();
        assert!(e.contains("VPPO_CUDA_ARCHS"), "{bad}: {e}");
    }
}

const PTXAS: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'perception_bf16' for 'sm_80'
ptxas info    : Function properties for perception_bf16
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 416 bytes cmem[0]
ptxas info    : Compile time = 8.858 ms
ptxas info    : Function properties for helper_fn
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Compiling entry function 'backward' for 'sm_90'
ptxas info    : Function properties for backward
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 0 barriers, 16 bytes cumulative stack size
";

#[test]
fn ptxas_report_is_parsed_per_function_and_architecture() {
    let e = parse_ptxas_report(PTXAS);
    assert_eq!(e.len(), 3, "{e:#?}");
    assert_eq!(
        (e[0].function.as_str(), e[0].arch.as_str(), e[0].entry),
        ("perception_bf16", "sm_80", true)
    );
    assert_eq!((e[0].registers, e[0].barriers, e[0].smem), (40, 1, 2048));
    assert_eq!((e[0].stack, e[0].spill_stores, e[0].spill_loads), (0, 0, 0));
    assert_eq!((e[1].function.as_str(), e[1].entry), ("helper_fn", false));
    assert_eq!(
        (e[1].stack, e[1].spill_stores, e[1].spill_loads),
        (24, 8, 12)
    );
    assert_eq!(
        (e[2].function.as_str(), e[2].arch.as_str()),
        ("backward", "sm_90")
    );
    assert_eq!((e[2].registers, e[2].smem, e[2].stack), (128, 0, 16));
}

#[test]
fn a_spill_error_from_ptxas_is_kept_as_a_spill() {
    let out = "ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
               ptxas error   : Registers are spilled to local memory in function 'k', 6940 bytes spill stores, 8140 bytes spill loads\n";
    let e = parse_ptxas_report(out);
    assert!(
        e.iter()
            .any(|x| x.function == "k" && x.spill_stores == 6940 && x.spill_loads == 8140),
        "{e:#?}"
    );
}
