//! Tests of the GPU plumbing. The ones that need a GPU run when VPPO_TEST_DEVICE=cuda (then a
//! missing GPU is a failure); without it they check that asking for the GPU gives a clean error.

use super::*;

/// True when the tests were asked to run on a real GPU.
fn on_gpu() -> bool {
    std::env::var("VPPO_TEST_DEVICE").as_deref() == Ok("cuda")
}

/// The GPU, when the tests run on one.
fn gpu() -> Option<Arc<Gpu>> {
    if !on_gpu() {
        return None;
    }
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) => panic!("VPPO_TEST_DEVICE=cuda but Gpu::new(0) failed: {e}"),
    }
}

#[test]
fn asking_for_the_gpu_gives_a_gpu_or_a_clear_error() {
    match Gpu::new(0) {
        Ok(g) => {
            assert!(kernels_built());
            assert_eq!(g.modules().len(), FATBINS.len());
            assert!(!g.name().is_empty());
        }
        Err(e) => {
            assert!(
                !on_gpu(),
                "VPPO_TEST_DEVICE=cuda but Gpu::new(0) failed: {e}"
            );
            match (&e, kernels_built()) {
                (VppoError::KernelsNotBuilt, false) => {
                    assert!(e.to_string().contains("kernels not built"), "{e}")
                }
                (VppoError::NoCudaDriver | VppoError::NoGpu(_) | VppoError::Cuda(_), true) => {}
                _ => panic!(
                    "unexpected error for kernels_built = {}: {e:?}",
                    kernels_built()
                ),
            }
        }
    }
}

#[test]
fn generated_constants_agree_with_the_cfg() {
    if kernels_built() {
        assert!(!NVCC_VERSION.is_empty());
        assert!(!CUDA_ARCHS.is_empty());
        assert!(CUDA_ARCHS.iter().all(|a| a.starts_with("sm_")));
        assert!(CUDA_PTX_ARCH.starts_with("compute_"));
        assert!(RESOURCE_REPORT.contains("nvcc:"), "{RESOURCE_REPORT}");
        for (name, bytes) in FATBINS {
            assert!(!bytes.is_empty(), "empty fatbin {name}");
            assert!(
                RESOURCE_REPORT.contains(&format!("kernels/{name}.cu")),
                "{name} not in report"
            );
        }
    } else {
        assert!(FATBINS.is_empty());
        assert!(CUDA_ARCHS.is_empty());
        assert!(NVCC_VERSION.is_empty());
        assert!(RESOURCE_REPORT.contains("no nvcc"));
    }
}

#[test]
fn launch_shapes_are_checked_before_the_driver() {
    assert!(check_launch_shape("k", [1, 1, 1], [1, 1, 1]).is_ok());
    assert!(check_launch_shape("k", [2_147_483_647, 65535, 65535], [1024, 1, 1]).is_ok());
    assert!(check_launch_shape("k", [19, 1, 1], [32, 32, 1]).is_ok());
    for (grid, block) in [
        ([0, 1, 1], [32, 1, 1]),
        ([1, 1, 1], [0, 1, 1]),
        ([1, 1, 1], [1025, 1, 1]),
        ([1, 1, 1], [64, 32, 1]),
        ([1, 1, 1], [1, 1, 65]),
        ([1, 65536, 1], [32, 1, 1]),
        ([2_147_483_648, 1, 1], [32, 1, 1]),
    ] {
        let e = check_launch_shape("perception", grid, block).unwrap_err();
        assert!(
            matches!(e, VppoError::Cuda(ref m) if m.what().contains("perception")),
            "{e:?}"
        );
    }
}

#[test]
fn zero_length_buffers_are_an_error() {
    assert!(check_len::<f32>("upload", 0).is_err());
    assert!(check_len::<f32>("upload", 19).is_ok());
    assert!(check_len::<f64>("upload", usize::MAX / 4).is_err());
}

#[test]
fn gpu_is_shared_per_ordinal_and_bad_ordinals_fail() {
    let Some(g) = gpu() else { return };
    let again = Gpu::new(0).unwrap();
    assert!(Arc::ptr_eq(&g, &again));
    match Gpu::new(4096) {
        Err(VppoError::NoGpu(m)) => assert!(m.contains("4096"), "{m}"),
        other => panic!("expected NoGpu for ordinal 4096, got {other:?}"),
    }
}

#[test]
fn copies_round_trip_with_awkward_sizes() {
    let Some(g) = gpu() else { return };
    for n in [1usize, 19, 111, 989, 1 << 20 | 7] {
        let host: Vec<f32> = (0..n).map(|i| (i as f32).sin() * 1e3 + 0.25).collect();
        let dev = g.upload(&host).unwrap();
        assert_eq!(dev.len(), n);
        assert_eq!(g.download(&dev).unwrap(), host);

        let mut copy = g.alloc_zeros::<f32>(n).unwrap();
        assert!(g.download(&copy).unwrap().iter().all(|&x| x == 0.0));
        g.copy_on_device(&dev, &mut copy).unwrap();
        let mut back = vec![f32::NAN; n];
        g.download_into(&copy, &mut back).unwrap();
        assert_eq!(back, host);

        let doubled: Vec<f32> = host.iter().map(|x| x * 2.0).collect();
        g.upload_into(&doubled, &mut copy).unwrap();
        assert_eq!(g.download(&copy).unwrap(), doubled);
    }
    let totals = g.alloc_zeros::<VppoLossTotals>(1).unwrap();
    let t = g.download(&totals).unwrap();
    assert_eq!((t[0].loss, t[0].n_selected), (0.0, 0));
    g.synchronize().unwrap();
}

#[test]
fn mismatched_lengths_and_empty_buffers_fail_cleanly() {
    let Some(g) = gpu() else { return };
    let mut a = g.alloc_zeros::<i32>(19).unwrap();
    let b = g.alloc_zeros::<i32>(20).unwrap();
    assert!(g.upload_into(&[1, 2, 3], &mut a).is_err());
    assert!(g.download_into(&a, &mut [0; 3]).is_err());
    assert!(g.copy_on_device(&b, &mut a).is_err());
    assert!(g.upload::<f32>(&[]).is_err());
    assert!(g.alloc_zeros::<f32>(0).is_err());
}

#[test]
fn device_pointers_are_distinct_and_aligned() {
    let Some(g) = gpu() else { return };
    let a = g.alloc_zeros::<f32>(989).unwrap();
    let b = g.alloc_zeros::<f32>(989).unwrap();
    let (pa, pb) = (g.device_ptr_u64(&a), g.device_ptr_u64(&b));
    assert_ne!(pa, 0);
    assert_ne!(pa, pb);
    assert_eq!(
        pa % 16,
        0,
        "device allocations are aligned for 16-byte vector loads"
    );
    assert_eq!(g.device_ptr(&a) as usize as u64, pa);
    assert_eq!(g.device_ptr_void(&b) as usize as u64, pb);
}

#[test]
fn unknown_kernels_and_bad_launches_are_errors() {
    let Some(g) = gpu() else { return };
    match g.function("vppo_no_such_kernel") {
        Err(VppoError::Cuda(m)) => assert!(m.what().contains("vppo_no_such_kernel"), "{m}"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(g.function("bad\0name").is_err());
    // SAFETY: both launches are rejected before reaching the driver (no such kernel, bad shapes).
    let e = unsafe { g.launch("vppo_no_such_kernel", [1, 1, 1], [0, 1, 1], 0, &0u32) }.unwrap_err();
    assert!(e.to_string().contains("vppo_no_such_kernel"));
    let too_much = g.max_shared_per_block() + 1;
    // SAFETY: see above.
    assert!(unsafe {
        g.launch(
            "vppo_no_such_kernel",
            [1, 1, 1],
            [32, 1, 1],
            too_much,
            &0u32,
        )
    }
    .is_err());
    g.synchronize().unwrap();
}

#[test]
fn event_timing_measures_queued_work() {
    let Some(g) = gpu() else { return };
    let n = 32 << 20; // 128 MiB of f32
    let src = g.upload(&vec![1.5f32; n]).unwrap();
    let mut dst = g.alloc_zeros::<f32>(n).unwrap();
    let ((), ms) = g.time_ms(|| g.copy_on_device(&src, &mut dst)).unwrap();
    assert!(ms > 0.0 && ms < 10_000.0, "{ms} ms");
    let err = g.time_ms(|| -> Result<()> { Err(VppoError::cuda("inner")) });
    assert!(matches!(err, Err(VppoError::Cuda(ref m)) if m.what() == "inner"));
}

#[test]
fn driver_errors_keep_the_driver_error_as_their_source() {
    use std::error::Error;
    let driver = DriverError(CUresult::CUDA_ERROR_LAUNCH_FAILED);
    let e = cuda_err("launching vppo_select", driver);
    let VppoError::Cuda(ref c) = e else {
        panic!("{e:?}")
    };
    assert_eq!(c.code(), Some(CUresult::CUDA_ERROR_LAUNCH_FAILED));
    assert_eq!(c.what(), "launching vppo_select");
    let source = e.source().expect("the driver error is the source");
    assert_eq!(source.downcast_ref::<DriverError>(), Some(&driver));
    // The message names the call, the CUresult and the driver's text (formatting it asks the driver
    // for the name and text, so only where one is loaded).
    if gpu().is_some() {
        let text = e.to_string();
        assert!(
            text.starts_with("CUDA error: launching vppo_select: CUDA_ERROR_LAUNCH_FAILED ("),
            "{text}"
        );
    }
    // A check made before any driver call has no source.
    let check = check_launch_shape("perception", [0, 1, 1], [1, 1, 1]).unwrap_err();
    assert!(check.source().is_none(), "{check:?}");
    assert!(check
        .to_string()
        .starts_with("CUDA error: kernel perception: "));
}
