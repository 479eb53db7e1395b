//! The GPU-resident API and the stage launches the benchmarks time (`vppo::kernels::DeviceStages`).
//! They need a GPU: with VPPO_TEST_DEVICE=cuda they run (and a missing GPU is a failure); without it
//! they check that asking for the GPU is a clean error.

use cudarc::driver::CudaSlice;
use half::bf16;
use vppo::bench::{parse_synthetic, synthetic_batch};
use vppo::cuda::{copy_bandwidth, Gpu};
use vppo::kernels::DeviceStages;
use vppo::{
    Device, DeviceBatch, DeviceLogits, DeviceLogitsMut, GradMut, OwnedLogits, Vppo, VppoConfig,
    VppoError,
};

fn on_gpu() -> bool {
    std::env::var("VPPO_TEST_DEVICE").as_deref() == Ok("cuda")
}

/// The GPU, or None after checking that its absence is a clean error (off VPPO_TEST_DEVICE=cuda).
fn gpu() -> Option<std::sync::Arc<Gpu>> {
    match Gpu::new(0) {
        Ok(g) if on_gpu() => Some(g),
        Ok(_) => None,
        Err(e) => {
            assert!(
                !on_gpu(),
                "VPPO_TEST_DEVICE=cuda but Gpu::new(0) failed: {e}"
            );
            assert!(
                matches!(
                    e,
                    VppoError::KernelsNotBuilt
                        | VppoError::NoCudaDriver
                        | VppoError::NoGpu(_)
                        | VppoError::Cuda(_)
                ),
                "{e}"
            );
            None
        }
    }
}

fn bf16s(l: &OwnedLogits) -> &[bf16] {
    match l {
        OwnedLogits::Bf16(x) => x,
        other => panic!("expected bf16 logits, got {:?}", other.view().dtype()),
    }
}

#[test]
fn stage_launches_match_the_api() {
    let Some(gpu) = gpu() else {
        eprintln!("skipped: needs VPPO_TEST_DEVICE=cuda");
        return;
    };
    let spec = parse_synthetic("300,2053,7,bf16").unwrap();
    let owned = synthetic_batch(&spec, 5).unwrap();
    let host = owned.batch();
    let cfg = VppoConfig::default();
    let vppo = Vppo::new(cfg.clone(), Device::Cuda(0)).unwrap();
    let (n, v) = (host.n_tokens(), host.vocab);

    let logits: CudaSlice<bf16> = gpu.upload(bf16s(&owned.logits)).unwrap();
    let masked: CudaSlice<bf16> = gpu.upload(bf16s(&owned.logits_masked)).unwrap();
    let targets = gpu.upload(&owned.targets).unwrap();
    let old_logp = gpu.upload(&owned.old_logp).unwrap();
    let advantages = gpu.upload(&owned.advantages).unwrap();
    let cu_seqlens = gpu.upload(&owned.cu_seqlens).unwrap();
    let db = DeviceBatch {
        logits: DeviceLogits::Bf16(&logits),
        logits_masked: DeviceLogits::Bf16(&masked),
        targets: &targets,
        old_logp: &old_logp,
        advantages: &advantages,
        cu_seqlens: &cu_seqlens,
        vocab: v,
    };

    // The GPU-resident forward equals the host API's on the same GPU, and is close to the reference.
    let fwd = vppo.forward_device(&db).unwrap();
    let host_out = vppo.forward(&host).unwrap();
    assert_eq!(fwd.output, host_out);
    let reference = Vppo::new(cfg.clone(), Device::Reference)
        .unwrap()
        .forward(&host)
        .unwrap();
    assert!(
        (fwd.output.loss - reference.loss).abs() <= 1e-4 * (1.0 + reference.loss.abs()),
        "{} vs {}",
        fwd.output.loss,
        reference.loss
    );

    // The API's backward into a bf16 buffer equals the host API's bf16 gradient.
    let mut grad_api: CudaSlice<bf16> = gpu.alloc_zeros(n * v).unwrap();
    vppo.backward_device(&fwd, &db, DeviceLogitsMut::Bf16(&mut grad_api))
        .unwrap();
    let mut grad_host = vec![bf16::ZERO; n * v];
    vppo.backward_into(&host, &host_out, GradMut::Bf16(&mut grad_host))
        .unwrap();
    let api = gpu.download(&grad_api).unwrap();
    assert!(api
        .iter()
        .zip(&grad_host)
        .all(|(a, b)| a.to_bits() == b.to_bits()));

    // Each stage rerun on the stage workspace, then the backward into a poisoned buffer, in place over
    // a copy of the logits, and in f32: the same gradient as the API's.
    let stages = DeviceStages::new(&gpu, &db, &cfg).unwrap();
    assert_eq!(stages.forward().output, fwd.output);
    for _ in 0..3 {
        stages.perception().unwrap();
        stages.select_loss().unwrap();
    }
    let mut grad: CudaSlice<bf16> = gpu.upload(&vec![bf16::NAN; n * v]).unwrap();
    stages.backward(DeviceLogitsMut::Bf16(&mut grad)).unwrap();
    let mut copy: CudaSlice<bf16> = gpu.alloc_zeros(n * v).unwrap();
    gpu.copy_on_device(&logits, &mut copy).unwrap();
    stages
        .backward_in_place(DeviceLogitsMut::Bf16(&mut copy))
        .unwrap();
    let mut grad32: CudaSlice<f32> = gpu.upload(&vec![f32::NAN; n * v]).unwrap();
    stages.backward(DeviceLogitsMut::F32(&mut grad32)).unwrap();
    gpu.synchronize().unwrap();
    let (g, c, g32) = (
        gpu.download(&grad).unwrap(),
        gpu.download(&copy).unwrap(),
        gpu.download(&grad32).unwrap(),
    );
    assert!(g.iter().zip(&api).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(c.iter().zip(&api).all(|(a, b)| a.to_bits() == b.to_bits()));
    let scale = g32.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.0);
    for (x, y) in g32.iter().zip(&g) {
        assert!(
            (x - y.to_f32()).abs() <= 1e-2 * x.abs() + 1e-6 * scale,
            "{x} {y}"
        );
    }

    // Shapes are checked before a launch.
    let mut short: CudaSlice<bf16> = gpu.alloc_zeros(n * v - 1).unwrap();
    assert!(stages.backward(DeviceLogitsMut::Bf16(&mut short)).is_err());
    assert!(stages
        .backward_in_place(DeviceLogitsMut::Bf16(&mut short))
        .is_err());
    let mut wrong: CudaSlice<half::f16> = gpu.alloc_zeros(n * v).unwrap();
    assert!(stages.backward(DeviceLogitsMut::F16(&mut wrong)).is_err());
}

#[test]
fn copy_bandwidth_measures_a_checked_copy() {
    let Some(gpu) = gpu() else {
        eprintln!("skipped: needs VPPO_TEST_DEVICE=cuda");
        return;
    };
    let bw = copy_bandwidth(&gpu, 64 << 20, 5).unwrap();
    assert_eq!(bw.bytes, 64 << 20);
    assert_eq!(bw.samples_ms.len(), 5);
    assert!(bw.best_ms() > 0.0 && bw.best_ms() <= bw.median_ms());
    assert!(bw.median_ms() <= bw.worst_ms());
    assert!(bw.best_gbs() >= bw.median_gbs() && bw.median_gbs() > 0.0);
    assert!(copy_bandwidth(&gpu, 1 << 20, 0).is_err());
}

/// `vppo bench --device cuda`: the batch is uploaded once and the report says no [N, V] copies are
/// timed; without a GPU it is the clean no-GPU error.
#[test]
fn vppo_bench_on_cuda() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppo"))
        .args([
            "bench",
            "--synthetic",
            "64,1000,4,bf16",
            "--iters",
            "2",
            "--grad",
            "logits-dtype",
            "--device",
            "cuda",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Err(e) = Gpu::new(0) {
        assert!(
            !on_gpu(),
            "VPPO_TEST_DEVICE=cuda but Gpu::new(0) failed: {e}"
        );
        assert!(!out.status.success());
        assert!(out.stdout.is_empty());
        assert!(
            stderr.contains("kernels not built")
                || stderr.contains("no CUDA driver")
                || stderr.contains("no GPU")
                || stderr.contains("CUDA error"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        return;
    }
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["device"], "cuda");
    assert_eq!(r["includes_host_device_copies"], false);
    let spec = parse_synthetic("64,1000,4,bf16").unwrap();
    let owned = synthetic_batch(&spec, 0).unwrap();
    let want = Vppo::new(VppoConfig::default(), Device::Cuda(0))
        .unwrap()
        .forward(&owned.batch())
        .unwrap()
        .loss;
    assert_eq!(r["loss"].as_f64().unwrap(), want);
    assert_eq!(
        r["forward_backward"]["samples_ms"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
