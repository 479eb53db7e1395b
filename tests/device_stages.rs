//! The GPU-resident API and the stage launches the benchmarks time (`vppo::hooks::DeviceStages`).
//! They need a GPU: with VPPO_TEST_DEVICE=cuda they run (and a missing GPU is a failure); without it
//! they check that asking for the GPU is a clean error, and `all_tests_through_the_fake_cuda_driver`
//! runs them again on the fake CUDA driver (tests/common/fake_cuda.rs), where the kernels run on the
//! SIMT executor behind the driver API.

mod common;

use cudarc::driver::CudaSlice;
use half::bf16;
use vppo::bench::{parse_synthetic, synthetic_batch, UploadedBatch};
use vppo::cuda::{copy_bandwidth, Gpu};
use vppo::hooks::DeviceStages;
use vppo::{
    Device, DeviceBatch, DeviceLogits, DeviceLogitsMut, GradMut, OwnedLogits, Vppo, VppoConfig,
    VppoError,
};

/// True on a GPU (VPPO_TEST_DEVICE=cuda) or on the fake driver (VPPO_TEST_DEVICE=fake-cuda).
fn on_gpu() -> bool {
    if common::fake_cuda::active() {
        common::fake_cuda::install();
        return true;
    }
    std::env::var("VPPO_TEST_DEVICE").as_deref() == Ok("cuda")
}

#[test]
fn all_tests_through_the_fake_cuda_driver() {
    common::fake_cuda::rerun_self("all_tests_through_the_fake_cuda_driver");
}

/// The GPU, or None after checking that its absence is a clean error (off VPPO_TEST_DEVICE=cuda).
/// Tests that use the GPU hold `common::fake_cuda::serial()` (see `host_path_traffic_on_the_fake_driver`).
fn gpu() -> Option<std::sync::Arc<Gpu>> {
    let wanted = on_gpu();
    match Gpu::new(0) {
        Ok(g) if wanted => Some(g),
        Ok(_) => None,
        Err(e) => {
            assert!(!wanted, "VPPO_TEST_DEVICE=cuda but Gpu::new(0) failed: {e}");
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
    let _serial = common::fake_cuda::serial();
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

    let on_device = UploadedBatch::new(&gpu, &host).unwrap();
    let db = on_device.batch();
    let DeviceLogits::Bf16(logits) = db.logits else {
        panic!("bf16 logits")
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
    gpu.copy_on_device(logits, &mut copy).unwrap();
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
    let _serial = common::fake_cuda::serial();
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

/// `vppo bench` as a library call, for the fake driver (a child process would not have it loaded).
#[derive(clap::Parser)]
struct BenchCli {
    #[command(flatten)]
    args: vppo::bench::BenchArgs,
}

/// `vppo bench --device cuda`: the batch is uploaded once and the report says no [N, V] copies are
/// timed; without a GPU it is the clean no-GPU error. On the fake driver the same arguments go
/// through `run_bench` in this process.
#[test]
fn vppo_bench_on_cuda() {
    let _serial = common::fake_cuda::serial();
    let args = [
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
    ];
    let r: serde_json::Value = if common::fake_cuda::active() {
        common::fake_cuda::install();
        let cli = <BenchCli as clap::Parser>::parse_from(args);
        serde_json::to_value(vppo::bench::run_bench(&cli.args).unwrap()).unwrap()
    } else {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppo"))
            .args(args)
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
        serde_json::from_slice(&out.stdout).unwrap()
    };
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

/// What the CUDA host path moves, counted by the fake driver: the host API uploads each logits tensor
/// once and copies its outputs back in one transfer; the GPU-resident API moves no [N, V] tensor, waits
/// twice per forward and validates before it launches; the backward downloads the gradient once and
/// zeroes nothing; every buffer is freed. Needs the fake driver's counters, so it runs only there (and
/// serially: the counters are per process). Frees are queued on the stream, so the counters are read
/// after a synchronize.
#[test]
fn host_path_traffic_on_the_fake_driver() {
    if !common::fake_cuda::active() {
        eprintln!("skipped: runs on the fake CUDA driver (VPPO_TEST_DEVICE=fake-cuda)");
        return;
    }
    let _serial = common::fake_cuda::serial();
    let gpu = gpu().expect("the fake driver is loaded");
    assert!(gpu.name().contains("fake"), "{}", gpu.name());
    let stats = || {
        gpu.synchronize().unwrap();
        common::fake_cuda::stats()
    };
    let spec = parse_synthetic("200,3001,6,bf16").unwrap();
    let owned = synthetic_batch(&spec, 9).unwrap();
    let host = owned.batch();
    let (n, v, b) = (
        host.n_tokens() as u64,
        host.vocab as u64,
        host.n_responses() as u64,
    );
    let nv_bytes = n * v * 2;
    let small = 256 * n + 65536; // per-token and per-response vectors, never a row of V
    let vppo = Vppo::new(VppoConfig::default(), Device::Cuda(0)).unwrap();

    // Host forward: five kernels (perception, select, and the loss's prep, tiles and finish); six inputs uploaded (each logits tensor once) into six buffers plus
    // one workspace arena, whose status word is the seventh copy up; one copy back (the arena, pass 1's
    // status word in it).
    // Gpu::allocated_bytes (what python/tests/test_cuda.py reads across a call on a GPU, where torch's
    // allocator does not see the crate's buffers) counts every byte the driver was asked for.
    let allocated = || gpu.allocated_bytes();
    let s0 = stats();
    let a0 = allocated();
    let out = vppo.forward(&host).unwrap();
    let s1 = stats();
    let d = s1.since(&s0);
    eprintln!("forward: {d:?}");
    assert_eq!(allocated() - a0, d.alloc_bytes, "{d:?}");
    assert!(d.alloc_bytes >= 2 * nv_bytes, "{d:?}");
    assert_eq!(
        (d.launches, d.allocs, d.htod_copies, d.dtoh_copies),
        (5, 7, 7, 1),
        "{d:?}"
    );
    assert!(
        d.htod_bytes >= 2 * nv_bytes && d.htod_bytes <= 2 * nv_bytes + small,
        "{d:?}"
    );
    assert!(d.dtoh_bytes <= small, "{d:?}");
    assert_eq!(s1.live_allocs, s0.live_allocs, "forward leaked a buffer");

    // Host backward into f32: one kernel, the gradient copied back once, nothing zeroed.
    let mut grad = vec![0.0f32; (n * v) as usize];
    vppo.backward_into(&host, &out, GradMut::F32(&mut grad))
        .unwrap();
    let s2 = stats();
    let d = s2.since(&s1);
    eprintln!("backward_into f32: {d:?}");
    assert_eq!(
        (d.launches, d.dtoh_copies, d.memset_bytes),
        (1, 1, 0),
        "{d:?}"
    );
    assert_eq!(d.dtoh_bytes, n * v * 4, "{d:?}");
    assert!(d.htod_bytes <= nv_bytes + small, "{d:?}");
    assert_eq!(s2.live_allocs, s1.live_allocs, "backward leaked a buffer");

    // GPU-resident forward: no [N, V] copy; the four small tensors gathered on the device (4 (2N + 2B
    // + 1) bytes) into one copy back, validated before any launch, then the outputs in one more.
    let on_device = UploadedBatch::new(&gpu, &host).unwrap();
    let db = on_device.batch();
    let mut grad_dev: CudaSlice<bf16> = gpu.alloc_zeros((n * v) as usize).unwrap();
    let s3 = stats();
    let a3 = allocated();
    let fwd = vppo.forward_device(&db).unwrap();
    let s4 = stats();
    let d = s4.since(&s3);
    eprintln!("forward_device: {d:?}");
    assert_eq!(allocated() - a3, d.alloc_bytes, "{d:?}");
    assert!(d.alloc_bytes <= small, "an [N, V] buffer: {d:?}");
    assert_eq!(fwd.output, out);
    assert_eq!(
        (d.launches, d.allocs, d.dtoh_copies, d.htod_bytes),
        (5, 2, 2, 8),
        "{d:?}"
    );
    assert_eq!(d.dtod_bytes, 4 * (2 * n + 2 * b + 1), "{d:?}");
    assert!(d.dtoh_bytes <= small, "{d:?}");

    // GPU-resident backward: one kernel, nothing copied or zeroed.
    vppo.backward_device(&fwd, &db, DeviceLogitsMut::Bf16(&mut grad_dev))
        .unwrap();
    let s5 = stats();
    let d = s5.since(&s4);
    eprintln!("backward_device: {d:?}");
    assert_eq!(
        (allocated() - a3, d.alloc_bytes),
        (s4.since(&s3).alloc_bytes, 0)
    );
    assert_eq!(
        (
            d.launches,
            d.htod_bytes,
            d.dtoh_bytes,
            d.dtod_bytes,
            d.memset_bytes
        ),
        (1, 0, 0, 0, 0),
        "{d:?}"
    );

    // A bad device batch (cu_seqlens not ending at N) is refused before any launch.
    let mut bad_cu = owned.cu_seqlens.clone();
    *bad_cu.last_mut().unwrap() -= 1;
    let bad_cu = gpu.upload(&bad_cu).unwrap();
    let bad = DeviceBatch {
        cu_seqlens: &bad_cu,
        ..on_device.batch()
    };
    let s6 = stats();
    assert!(vppo.forward_device(&bad).is_err());
    let d = stats().since(&s6);
    assert_eq!(d.launches, 0, "{d:?}");

    drop((fwd, grad_dev, on_device, bad_cu));
    assert_eq!(
        stats().live_allocs,
        s0.live_allocs,
        "a device buffer was not freed"
    );
}

/// The trainer's steps with the loss on `Device::Cuda` equal those on the SIMT executor: two steps bit
/// for bit on the fake driver (the same kernels, whose sums are fixed-order in either lane order), the
/// first step closely on a GPU.
#[test]
fn trainer_steps_on_cuda_match_simt() {
    use vppo::options::DeviceArg;
    use vppo::train::{Algo, TrainConfig, Trainer};
    let _serial = common::fake_cuda::serial();
    if gpu().is_none() {
        eprintln!("skipped: needs VPPO_TEST_DEVICE=cuda or fake-cuda");
        return;
    }
    let config = |device| TrainConfig {
        algo: Algo::Vppo,
        seed: 5,
        steps: 2,
        prompts: 4,
        warmup_steps: 20,
        eval_problems: 20,
        device,
        ..TrainConfig::easy()
    };
    let mut on_cuda = Trainer::new(config(DeviceArg::Cuda)).unwrap();
    let mut on_simt = Trainer::new(config(DeviceArg::Simt)).unwrap();
    // On a GPU only the first step is compared: after it the parameters differ in the last bits, and
    // the next rollouts, sampled from them, may differ in a token.
    let steps = if common::fake_cuda::active() { 2 } else { 1 };
    for _ in 0..steps {
        let (a, b) = (on_cuda.step().unwrap(), on_simt.step().unwrap());
        if common::fake_cuda::active() {
            assert_eq!(a, b);
        } else {
            // The same rollouts (sampled before the loss); the loss within 1%: the GPU's exp differs
            // in the last bits, which can flip a near-tie at the top-k threshold (one token of a few
            // hundred).
            assert_eq!(a.reward, b.reward);
            assert!(
                (a.loss - b.loss).abs() <= 1e-2 * (1.0 + b.loss.abs()),
                "{a:?} {b:?}"
            );
        }
    }
}

/// The host API from threads that never touched the GPU before: every call makes the context current
/// where it runs (the fake driver, like a GPU, fails a call on a thread without a current context).
#[test]
fn forward_from_fresh_threads() {
    let _serial = common::fake_cuda::serial();
    if gpu().is_none() {
        eprintln!("skipped: needs VPPO_TEST_DEVICE=cuda or fake-cuda");
        return;
    }
    let spec = parse_synthetic("120,517,4,f16").unwrap();
    let owned = synthetic_batch(&spec, 2).unwrap();
    let vppo = Vppo::new(VppoConfig::default(), Device::Cuda(0)).unwrap();
    let want = vppo.forward(&owned.batch()).unwrap();
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let v = Vppo::new(VppoConfig::default(), Device::Cuda(0)).unwrap();
                    let out = v.forward(&owned.batch()).unwrap();
                    let mut grad = vec![0.0f32; owned.batch().n_tokens() * owned.batch().vocab];
                    v.backward_into(&owned.batch(), &out, GradMut::F32(&mut grad))
                        .unwrap();
                    (out, grad)
                })
            })
            .collect();
        let results: Vec<_> = runs.into_iter().map(|h| h.join().unwrap()).collect();
        for (out, grad) in &results {
            assert_eq!(out, &want);
            assert_eq!(grad, &results[0].1);
        }
    });
}

/// What a GPU refuses, the fake driver refuses too: a kernel that is in no fatbin (the SIMT-only
/// mutants) is not found, and (fake driver only) a launch whose parameters hold a host address fails
/// instead of "working" because the fake's device memory is host memory.
#[test]
fn refused_like_on_a_gpu() {
    let _serial = common::fake_cuda::serial();
    let Some(gpu) = gpu() else {
        eprintln!("skipped: needs VPPO_TEST_DEVICE=cuda or fake-cuda");
        return;
    };
    let err = gpu.function("vppo_perception_bf16_mutant").unwrap_err();
    assert!(
        err.to_string().contains("none of the loaded modules"),
        "{err}"
    );
    assert!(gpu.function("vppo_perception_bf16").is_ok());
    if !common::fake_cuda::active() {
        return;
    }
    let scores = [0.5f32; 8];
    let cu = gpu.upload(&[0i32, 8]).unwrap();
    let mask = gpu.alloc_zeros::<u8>(8).unwrap();
    let k = gpu.alloc_zeros::<i32>(1).unwrap();
    let sbar = gpu.alloc_zeros::<f32>(1).unwrap();
    let params = vppo::params::VppoSelectParams {
        score: scores.as_ptr(), // a host address
        cu_seqlens: gpu.device_ptr(&cu),
        mask: gpu.device_ptr_mut(&mask),
        k: gpu.device_ptr_mut(&k),
        sbar: gpu.device_ptr_mut(&sbar),
        n_responses: 1,
        frac_num: 2,
        frac_den: 5,
        ..Default::default()
    };
    let threads = vppo::params::VPPO_SELECT_THREADS;
    let shared = vppo::params::VPPO_SELECT_SHARED_BYTES;
    // SAFETY: on the fake driver no kernel runs when a parameter is not a device address, which is
    // what this checks; the other pointers are live device buffers of the sizes vppo_select reads.
    let res = unsafe { gpu.launch("vppo_select", [1, 1, 1], [threads, 1, 1], shared, &params) };
    let res = res.and_then(|()| gpu.synchronize());
    assert!(
        res.is_err(),
        "a host address in the parameters was accepted"
    );
    assert_eq!(gpu.download(&mask).unwrap(), vec![0u8; 8], "the kernel ran");
}

/// The fake driver's guard pages catch a kernel that writes past its buffer: the backward launched
/// with N = 8 rows into a gradient buffer of 7 rows must end the process with the fault report. The
/// bad launch runs in a child process (the fault ends it); the parent checks how it ended.
#[test]
fn guard_page_catches_an_out_of_bounds_kernel() {
    const CHILD: &str = "VPPO_FAKE_CUDA_OOB_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let gpu = gpu().expect("the fake driver");
        let (n, v) = (8usize, 64usize);
        let logits = gpu.upload(&vec![0.25f32; n * v]).unwrap();
        let lse = gpu.upload(&vec![4.2f32; n]).unwrap();
        let dlogp = gpu.upload(&vec![0.5f32; n]).unwrap();
        let targets = gpu.upload(&vec![3i32; n]).unwrap();
        let grad = gpu.alloc_zeros::<f32>((n - 1) * v).unwrap();
        let params = vppo::params::VppoBackwardParams {
            logits: gpu.device_ptr_void(&logits),
            lse: gpu.device_ptr(&lse),
            dlogp: gpu.device_ptr(&dlogp),
            targets: gpu.device_ptr(&targets),
            grad: gpu.device_ptr_mut(&grad).cast(),
            rows: std::ptr::null(),
            n_rows: n as i64,
            n_tokens: n as i64,
            vocab: v as i64,
            inv_temperature: 1.0,
            ..Default::default()
        };
        let threads = vppo::params::VPPO_BACKWARD_THREADS;
        // SAFETY: deliberately not: the last row of grad is outside its buffer. This runs only in a
        // child process on the fake driver, whose guard page ends the process at that write.
        let res = unsafe {
            gpu.launch(
                "vppo_backward_f32_f32",
                [n as u32, 1, 1],
                [threads, 1, 1],
                0,
                &params,
            )
        };
        let res = res.and_then(|()| gpu.synchronize());
        panic!("the out-of-bounds write did not fault: {res:?}");
    }
    if std::env::var_os("VPPO_TEST_DEVICE").is_some() || !vppo::cuda::kernels_built() {
        eprintln!("skipped: runs from a plain `cargo test` with the kernels built");
        return;
    }
    let run = common::run_this_binary(
        &[("VPPO_TEST_DEVICE", common::fake_cuda::MODE), (CHILD, "1")],
        &[
            "--exact",
            "guard_page_catches_an_out_of_bounds_kernel",
            "--test-threads",
            "1",
            "--nocapture",
        ],
        std::time::Duration::from_secs(120),
    );
    let stderr = &run.stderr;
    assert!(run.status.is_some_and(|s| !s.success()), "{stderr}");
    assert!(
        stderr.contains("kernel vppo_backward_f32_f32 accessed")
            && stderr.contains("outside every device allocation"),
        "{stderr}"
    );
}

/// Buffers that live on the caller's own streams (cudarc streams are non-blocking: no implicit order
/// with the crate's): the API orders its work after what is queued there, and `backward_device`
/// returns only once the gradient is written, so the caller may read it on its stream at once. On the
/// fake driver a stream runs its work only when something waits for it. Without the forward's wait it
/// would validate and read tensors not uploaded yet (0xFF bytes); without the backward's, the caller's
/// zeroing of the gradient, queued after the forward, would land after the kernel wrote it; and
/// without the final synchronize the caller would read a gradient not written yet.
#[test]
fn caller_streams_are_waited_for() {
    let _serial = common::fake_cuda::serial();
    let Some(gpu) = gpu() else {
        eprintln!("skipped: needs VPPO_TEST_DEVICE=cuda or fake-cuda");
        return;
    };
    let (s, s_logits) = (
        gpu.context().new_stream().unwrap(),
        gpu.context().new_stream().unwrap(),
    );
    let spec = parse_synthetic("150,1999,5,bf16").unwrap();
    let owned = synthetic_batch(&spec, 4).unwrap();
    let host = owned.batch();
    let (n, v) = (host.n_tokens(), host.vocab);
    // The logits on one stream, the rest on another.
    let logits = s_logits.clone_htod(bf16s(&owned.logits)).unwrap();
    let masked = s.clone_htod(bf16s(&owned.logits_masked)).unwrap();
    let targets = s.clone_htod(&owned.targets).unwrap();
    let old_logp = s.clone_htod(&owned.old_logp).unwrap();
    let advantages = s.clone_htod(&owned.advantages).unwrap();
    let cu_seqlens = s.clone_htod(&owned.cu_seqlens).unwrap();
    let db = DeviceBatch {
        logits: DeviceLogits::Bf16(&logits),
        logits_masked: DeviceLogits::Bf16(&masked),
        targets: &targets,
        old_logp: &old_logp,
        advantages: &advantages,
        cu_seqlens: &cu_seqlens,
        vocab: v,
        ref_logp: None,
        rows: None,
        masked_rows: None,
        ref_logits: None,
    };
    let vppo = Vppo::new(VppoConfig::default(), Device::Cuda(0)).unwrap();
    let fwd = vppo.forward_device(&db).unwrap();
    let want = vppo.forward(&host).unwrap();
    assert_eq!(fwd.output, want);
    let mut grad = s.alloc_zeros::<bf16>(n * v).unwrap();
    vppo.backward_device(&fwd, &db, DeviceLogitsMut::Bf16(&mut grad))
        .unwrap();
    let got = s.clone_dtoh(&grad).unwrap();
    let mut grad_host = vec![bf16::ZERO; n * v];
    vppo.backward_into(&host, &want, GradMut::Bf16(&mut grad_host))
        .unwrap();
    assert!(got
        .iter()
        .zip(&grad_host)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    s.synchronize().unwrap();
    s_logits.synchronize().unwrap();
}

/// The fake driver's streams really are unordered: an upload queued on a created stream is not there
/// yet for a read on the default stream that does not wait for it (so the test above can fail).
#[test]
fn fake_streams_expose_a_missing_wait() {
    if !common::fake_cuda::active() {
        eprintln!("skipped: runs on the fake CUDA driver (VPPO_TEST_DEVICE=fake-cuda)");
        return;
    }
    let _serial = common::fake_cuda::serial();
    let gpu = gpu().expect("the fake driver");
    let s = gpu.context().new_stream().unwrap();
    let buf = s.clone_htod(&[7u32; 4]).unwrap();
    // Read on the default stream with no wait: the upload has not run.
    let mut early = [0u32; 4];
    gpu.stream().memcpy_dtoh(&buf, &mut early).unwrap();
    assert_eq!(early, [u32::MAX; 4]);
    // With the wait, it has.
    gpu.stream().join(&s).unwrap();
    assert_eq!(gpu.stream().clone_dtoh(&buf).unwrap(), vec![7u32; 4]);
    s.synchronize().unwrap();
}

/// The ranged copies of `Gpu` move exactly the bytes asked for and refuse ranges outside the buffer
/// with an error (cudarc's slicing would panic).
#[test]
fn ranged_copies_move_the_bytes_asked_for() {
    let _serial = common::fake_cuda::serial();
    let Some(gpu) = gpu() else {
        eprintln!("skipped: needs VPPO_TEST_DEVICE=cuda or fake-cuda");
        return;
    };
    let mut buf = gpu.upload(&(0u8..100).collect::<Vec<_>>()).unwrap();
    gpu.upload_range(&[200, 201, 202], &mut buf, 97).unwrap();
    assert_eq!(
        gpu.download_range(&buf, 95, 5).unwrap(),
        vec![95, 96, 200, 201, 202]
    );
    let words = gpu.upload(&[0x0403_0201u32, 0x0807_0605]).unwrap();
    gpu.copy_bytes_on_device(&words, &mut buf, 10).unwrap();
    assert_eq!(
        gpu.download_range(&buf, 9, 10).unwrap(),
        vec![9, 1, 2, 3, 4, 5, 6, 7, 8, 18]
    );
    let fresh = gpu.alloc_uninit::<f32>(7).unwrap();
    assert_eq!(fresh.len(), 7);
    assert!(gpu.download_range(&buf, 96, 5).is_err());
    assert!(gpu.download_range(&buf, usize::MAX, 2).is_err());
    assert!(gpu.upload_range(&[1, 2], &mut buf, 99).is_err());
    assert!(gpu.copy_bytes_on_device(&words, &mut buf, 93).is_err());
    assert!(gpu.alloc_uninit::<f32>(0).is_err());
    assert_eq!(gpu.download(&buf).unwrap()[..5], [0, 1, 2, 3, 4]);
}

/// A small random f32 batch (the generator of tests/common) and the rng that drew it.
fn small_f32_batch(seed: u64) -> (vppo::OwnedBatch, rand_chacha::ChaCha8Rng) {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let spec = common::BatchSpec {
        vocab: (1, 37),
        max_len: 9,
        ..Default::default()
    };
    (common::random_batch(&mut rng, &spec).to_f32(), rng)
}

/// Rows (SPEC section 10) on the GPU path: a device batch reading [R, V] logits through `rows` and
/// `masked_rows` (the unread rows hold junk, NaN included) gives the outputs of the same batch on the
/// host path, bit for bit; the backward writes an [R, V] gradient with zero rows where no token
/// reads, equal to the host's; and the stateless backward from the saved tensors
/// (`backward_saved_device`, the Python op's CUDA path) equals the host's `backward_saved`, into a
/// new buffer and in place.
#[test]
fn device_rows_and_saved_backward_match_the_host_path() {
    let _serial = common::fake_cuda::serial();
    let Some(gpu) = gpu() else {
        eprintln!("skipped: needs VPPO_TEST_DEVICE=cuda or fake-cuda");
        return;
    };
    let s = gpu.stream();
    let vppo = Vppo::new(VppoConfig::default(), Device::Cuda(0)).unwrap();
    for seed in 0..4 {
        let (owned, mut rng) = small_f32_batch(seed);
        let spread = common::spread(&owned, &mut rng);
        let host = vppo::Batch {
            logits: vppo::Logits::F32(&spread.logits),
            logits_masked: vppo::Logits::F32(&spread.masked),
            rows: Some(&spread.rows),
            masked_rows: Some(&spread.masked_rows),
            ..owned.batch()
        };
        let v = owned.vocab;
        let up = |x: &[f32]| s.clone_htod(x).unwrap();
        let (logits, masked) = (up(&spread.logits), up(&spread.masked));
        let (old_logp, advantages) = (up(&owned.old_logp), up(&owned.advantages));
        let targets = s.clone_htod(&owned.targets).unwrap();
        let cu_seqlens = s.clone_htod(&owned.cu_seqlens).unwrap();
        let rows = s.clone_htod(&spread.rows).unwrap();
        let masked_rows = s.clone_htod(&spread.masked_rows).unwrap();
        let db = DeviceBatch {
            logits: DeviceLogits::F32(&logits),
            logits_masked: DeviceLogits::F32(&masked),
            targets: &targets,
            old_logp: &old_logp,
            advantages: &advantages,
            cu_seqlens: &cu_seqlens,
            vocab: v,
            ref_logp: None,
            rows: Some(&rows),
            masked_rows: Some(&masked_rows),
            ref_logits: None,
        };
        let fwd = vppo.forward_device(&db).unwrap();
        let want = vppo.forward(&host).unwrap();
        assert_eq!(fwd.output, want, "seed {seed}");

        let mut want_grad = vec![0.0f32; spread.r * v];
        vppo.backward_into(&host, &want, GradMut::F32(&mut want_grad))
            .unwrap();
        let bits = |x: &[f32]| x.iter().map(|g| g.to_bits()).collect::<Vec<_>>();
        // Every element of the device gradient is written (it starts as NaN bytes).
        let mut grad = s.clone_htod(&vec![f32::NAN; spread.r * v]).unwrap();
        vppo.backward_device(&fwd, &db, DeviceLogitsMut::F32(&mut grad))
            .unwrap();
        assert_eq!(
            bits(&s.clone_dtoh(&grad).unwrap()),
            bits(&want_grad),
            "seed {seed}"
        );

        // The stateless backward from the saved tensors, as the Python op calls it.
        let lse = up(&want.tokens.lse);
        let dlogp = up(&want.tokens.dlogp);
        let saved = vppo::DeviceSaved {
            targets: &targets,
            lse: &lse,
            dlogp: &dlogp,
            rows: Some(&rows),
        };
        let host_saved = vppo::SavedForward {
            targets: &owned.targets,
            lse: &want.tokens.lse,
            dlogp: &want.tokens.dlogp,
            rows: Some(&spread.rows),
        };
        let mut saved_want = vec![0.0f32; spread.r * v];
        vppo.backward_saved(
            Some(vppo::Logits::F32(&spread.logits)),
            v,
            &host_saved,
            GradMut::F32(&mut saved_want),
        )
        .unwrap();
        let mut grad = s.clone_htod(&vec![f32::NAN; spread.r * v]).unwrap();
        vppo.backward_saved_device(
            Some(DeviceLogits::F32(&logits)),
            v,
            &saved,
            DeviceLogitsMut::F32(&mut grad),
        )
        .unwrap();
        assert_eq!(bits(&s.clone_dtoh(&grad).unwrap()), bits(&saved_want));
        // In place: the logits buffer becomes the gradient (the unread junk rows become zeros).
        let mut in_place = up(&spread.logits);
        vppo.backward_saved_device(None, v, &saved, DeviceLogitsMut::F32(&mut in_place))
            .unwrap();
        assert_eq!(bits(&s.clone_dtoh(&in_place).unwrap()), bits(&saved_want));
    }
}

/// The saved backward on the GPU checks what it indexes with before any launch, as the host one:
/// rows out of order, a target outside [0, V), a non-finite lse, and a gradient of another shape are
/// errors naming the tensor, and nothing is launched. No token (N = 0) with rows gives an all-zero
/// [R, V] gradient.
#[test]
fn device_saved_backward_refuses_bad_saved_tensors() {
    let _serial = common::fake_cuda::serial();
    let Some(gpu) = gpu() else {
        eprintln!("skipped: needs VPPO_TEST_DEVICE=cuda or fake-cuda");
        return;
    };
    let s = gpu.stream();
    let vppo = Vppo::new(VppoConfig::default(), Device::Cuda(0)).unwrap();
    let (v, r) = (8usize, 5usize);
    let logits = s.clone_htod(&vec![0.5f32; r * v]).unwrap();
    let run = |targets: &[i32], lse: &[f32], rows: &[i64], grad_rows: usize| {
        let targets = s.clone_htod(targets).unwrap();
        let lse = s.clone_htod(lse).unwrap();
        let dlogp = s.clone_htod(&vec![0.25f32; rows.len()]).unwrap();
        let rows = s.clone_htod(rows).unwrap();
        let mut grad = s.clone_htod(&vec![f32::NAN; grad_rows * v]).unwrap();
        let saved = vppo::DeviceSaved {
            targets: &targets,
            lse: &lse,
            dlogp: &dlogp,
            rows: Some(&rows),
        };
        let result = vppo.backward_saved_device(
            Some(DeviceLogits::F32(&logits)),
            v,
            &saved,
            DeviceLogitsMut::F32(&mut grad),
        );
        (result, s.clone_dtoh(&grad).unwrap())
    };
    let ok_lse = [2.5f32, 2.5];
    // (targets, lse, rows, rows of the gradient, the tensor the error names)
    type Case<'a> = (&'a [i32], &'a [f32], &'a [i64], usize, &'a str);
    let cases: [Case; 4] = [
        (&[1, 2], &ok_lse, &[3, 1], r, "rows"),
        (&[1, 8], &ok_lse, &[1, 3], r, "targets"),
        (&[1, 2], &[2.5, f32::INFINITY], &[1, 3], r, "lse"),
        (&[1, 2], &ok_lse, &[1, 3], r + 1, "grad"),
    ];
    for (targets, lse, rows, grad_rows, named) in cases {
        let (result, grad) = run(targets, lse, rows, grad_rows);
        let e = result.expect_err(named).to_string();
        assert!(e.contains(named), "{named}: {e}");
        assert!(
            grad.iter().all(|g| g.is_nan()),
            "{named}: the gradient was written"
        );
    }
    let (ok, grad) = run(&[1, 2], &ok_lse, &[1, 3], r);
    ok.unwrap();
    assert!(grad.iter().all(|g| g.is_finite()));
    for row in [0, 2, 4] {
        assert!(grad[row * v..(row + 1) * v].iter().all(|&g| g == 0.0));
    }
    // N = 0: empty tensors (address 0, as a framework's empty tensors may have) and an all-zero
    // [R, V] gradient.
    // SAFETY: empty views: no memory is behind them and none is read.
    let (t0, f0, r0) = unsafe {
        use vppo::cuda::Borrowed;
        (
            Borrowed::<i32>::new(&gpu, 0, 0),
            Borrowed::<f32>::new(&gpu, 0, 0),
            Borrowed::<i64>::new(&gpu, 0, 0),
        )
    };
    let saved = vppo::DeviceSaved {
        targets: &t0,
        lse: &f0,
        dlogp: &f0,
        rows: Some(&r0),
    };
    let mut grad = s.clone_htod(&vec![f32::NAN; r * v]).unwrap();
    vppo.backward_saved_device(
        Some(DeviceLogits::F32(&logits)),
        v,
        &saved,
        DeviceLogitsMut::F32(&mut grad),
    )
    .unwrap();
    assert!(
        s.clone_dtoh(&grad).unwrap().iter().all(|&g| g == 0.0),
        "N = 0: all zeros"
    );
}

/// Memory and a stream the crate does not own, as the PyTorch entry point hands them over: raw
/// addresses viewed as `vppo::cuda::Borrowed` slices and the caller's raw stream handle. On the fake
/// driver a stream runs its work only when something waits for it, so the uploads queued on the
/// caller's stream are not there until the crate joins that stream: without the join the forward
/// reads 0xFF bytes (an error); with it, the result of the host path. Dropping a `Borrowed` frees
/// nothing (the caller's buffers still read back), and the caller's stream is ordered after the
/// crate's writes.
#[test]
fn foreign_memory_and_stream_are_used_in_place() {
    let _serial = common::fake_cuda::serial();
    let Some(gpu) = gpu() else {
        eprintln!("skipped: needs VPPO_TEST_DEVICE=cuda or fake-cuda");
        return;
    };
    let theirs = gpu.context().new_stream().unwrap();
    let (owned, _) = small_f32_batch(11);
    let host = owned.batch();
    let (n, v) = (host.n_tokens(), host.vocab);
    let logits = theirs.clone_htod(&owned.logits.to_f32()).unwrap();
    let masked = theirs.clone_htod(&owned.logits_masked.to_f32()).unwrap();
    let targets = theirs.clone_htod(&owned.targets).unwrap();
    let old_logp = theirs.clone_htod(&owned.old_logp).unwrap();
    let advantages = theirs.clone_htod(&owned.advantages).unwrap();
    let cu_seqlens = theirs.clone_htod(&owned.cu_seqlens).unwrap();
    let mut grad = theirs.alloc_zeros::<f32>(n * v).unwrap();
    let raw = |len: usize, ptr: u64| (ptr, len);
    let addr = |x: &CudaSlice<f32>| raw(x.len(), gpu.device_ptr_u64(x));
    let (l_ptr, m_ptr, o_ptr, a_ptr) = (
        addr(&logits),
        addr(&masked),
        addr(&old_logp),
        addr(&advantages),
    );
    let t_ptr = raw(targets.len(), gpu.device_ptr_u64(&targets));
    let c_ptr = raw(cu_seqlens.len(), gpu.device_ptr_u64(&cu_seqlens));
    let g_ptr = addr(&grad);
    // Frees are queued on the stream they were made on: run the crate's stream's before counting.
    gpu.synchronize().unwrap();
    let live = common::fake_cuda::active().then(|| common::fake_cuda::stats().live_allocs);
    let vppo = Vppo::new(VppoConfig::default(), Device::Cuda(0)).unwrap();
    let want = vppo.forward(&host).unwrap();
    let mut want_grad = vec![0.0f32; n * v];
    vppo.backward_into(&host, &want, GradMut::F32(&mut want_grad))
        .unwrap();
    {
        // SAFETY: each (address, length) is a live allocation above of that many elements of the
        // type, in this GPU's context, alive until after this block.
        let (bl, bm, bt, bo, ba, bc, mut bg) = unsafe {
            use vppo::cuda::Borrowed;
            (
                Borrowed::<f32>::new(&gpu, l_ptr.0, l_ptr.1),
                Borrowed::<f32>::new(&gpu, m_ptr.0, m_ptr.1),
                Borrowed::<i32>::new(&gpu, t_ptr.0, t_ptr.1),
                Borrowed::<f32>::new(&gpu, o_ptr.0, o_ptr.1),
                Borrowed::<f32>::new(&gpu, a_ptr.0, a_ptr.1),
                Borrowed::<i32>::new(&gpu, c_ptr.0, c_ptr.1),
                Borrowed::<f32>::new(&gpu, g_ptr.0, g_ptr.1),
            )
        };
        let db = DeviceBatch {
            logits: DeviceLogits::F32(&bl),
            logits_masked: DeviceLogits::F32(&bm),
            targets: &bt,
            old_logp: &bo,
            advantages: &ba,
            cu_seqlens: &bc,
            vocab: v,
            ref_logp: None,
            rows: None,
            masked_rows: None,
            ref_logits: None,
        };
        if common::fake_cuda::active() && n > 0 {
            // Not joined: the caller's uploads have not run yet.
            assert!(vppo.forward_device(&db).is_err());
        }
        // SAFETY: `theirs` is a live stream of this GPU's context.
        unsafe { gpu.wait_for_foreign_stream(theirs.cu_stream() as u64) }.unwrap();
        let fwd = vppo.forward_device(&db).unwrap();
        assert_eq!(fwd.output, want);
        vppo.backward_device(&fwd, &db, DeviceLogitsMut::F32(&mut bg))
            .unwrap();
        // SAFETY: as above.
        unsafe { gpu.order_foreign_stream_after(theirs.cu_stream() as u64) }.unwrap();
    }
    gpu.synchronize().unwrap();
    if let Some(live) = live {
        assert_eq!(
            common::fake_cuda::stats().live_allocs,
            live,
            "a Borrowed freed memory"
        );
    }
    let bits = |x: &[f32]| x.iter().map(|g| g.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&theirs.clone_dtoh(&grad).unwrap()), bits(&want_grad));
    assert_eq!(theirs.clone_dtoh(&targets).unwrap(), owned.targets);
    grad = theirs.alloc_zeros::<f32>(1).unwrap();
    drop(grad);
    theirs.synchronize().unwrap();
}

/// The KL op on device buffers (`KlDiv::forward_device` / `backward_device`, the Python op's CUDA
/// path) moves only O(N) bytes between host and device (the indices, the saved values, the
/// forward's row states; never a logits or gradient row), and bad input is refused before any
/// launch: indices out of order or of the wrong length, saved values that are not finite, a
/// gradient of the wrong shape.
#[test]
fn kl_on_device_buffers_copies_no_rows_and_refuses_before_launching() {
    let _serial = common::fake_cuda::serial();
    let Some(gpu) = gpu() else {
        eprintln!("skipped: needs VPPO_TEST_DEVICE=cuda or fake-cuda");
        return;
    };
    let counting = common::fake_cuda::active();
    let stats = || counting.then(common::fake_cuda::stats);
    let s = gpu.stream();
    let (n, r, v) = (6usize, 9usize, 1031usize);
    let p: Vec<f32> = (0..r * v).map(|i| ((i * 37 % 101) as f32) / 25.0).collect();
    let q: Vec<f32> = (0..r * v).map(|i| ((i * 53 % 97) as f32) / 30.0).collect();
    let (dp, dq) = (s.clone_htod(&p).unwrap(), s.clone_htod(&q).unwrap());
    let rows = s.clone_htod(&[0i64, 2, 3, 5, 7, 8]).unwrap();
    let op = vppo::KlDiv::new(1.0, Device::Cuda(0)).unwrap();
    let batch = vppo::DeviceKlBatch {
        p_logits: DeviceLogits::F32(&dp),
        q_logits: DeviceLogits::F32(&dq),
        vocab: v,
        p_rows: Some(&rows),
        q_rows: None,
    };
    gpu.synchronize().unwrap();
    let before = stats();
    let out = op.forward_device(&batch).unwrap();
    let row_bytes = (v * 4) as u64;
    if let (Some(a), Some(b)) = (before, stats()) {
        let d = b.since(&a);
        assert!(d.launches >= 1, "{d:?}");
        assert!(
            d.dtoh_bytes < row_bytes && d.htod_bytes < row_bytes,
            "the forward copied O(V) bytes: {d:?}"
        );
    }
    let up = |x: &[f32]| s.clone_htod(x).unwrap();
    let (kl, lse_p, lse_q, u) = (
        up(&out.kl),
        up(&out.lse_p),
        up(&out.lse_q),
        up(&vec![1.0; n]),
    );
    let saved = vppo::DeviceKlSaved {
        kl: &kl,
        lse_p: &lse_p,
        lse_q: &lse_q,
    };
    let mut gp = s.alloc_zeros::<f32>(r * v).unwrap();
    let mut gq = s.alloc_zeros::<f32>(r * v).unwrap();
    gpu.synchronize().unwrap();
    let before = stats();
    op.backward_device(
        &batch,
        &saved,
        &u,
        DeviceLogitsMut::F32(&mut gp),
        DeviceLogitsMut::F32(&mut gq),
    )
    .unwrap();
    if let (Some(a), Some(b)) = (before, stats()) {
        let d = b.since(&a);
        assert_eq!(d.launches, 1, "{d:?}");
        assert!(
            d.dtoh_bytes < row_bytes && d.htod_bytes < row_bytes,
            "the backward copied O(V) bytes: {d:?}"
        );
    }
    // Refused before any launch.
    let dec = s.clone_htod(&[0i64, 3, 2, 5, 7, 8]).unwrap();
    let short = s.clone_htod(&[0i64, 2, 3]).unwrap();
    let bad_lse = up(&[1.0, 2.0, f32::INFINITY, 1.0, 1.0, 1.0]);
    let mut small = s.alloc_zeros::<f32>(r * v - 1).unwrap();
    gpu.synchronize().unwrap();
    let before = stats();
    let e = op
        .forward_device(&vppo::DeviceKlBatch {
            p_rows: Some(&dec),
            ..batch
        })
        .unwrap_err();
    assert!(e.to_string().contains("p_rows position 2"), "{e}");
    let e = op
        .forward_device(&vppo::DeviceKlBatch {
            q_rows: Some(&short),
            ..batch
        })
        .unwrap_err();
    assert!(e.to_string().contains("q_rows"), "{e}");
    let e = op
        .backward_device(
            &batch,
            &vppo::DeviceKlSaved {
                lse_p: &bad_lse,
                ..saved
            },
            &u,
            DeviceLogitsMut::F32(&mut gp),
            DeviceLogitsMut::F32(&mut gq),
        )
        .unwrap_err();
    assert!(e.to_string().contains("lse_p"), "{e}");
    let e = op
        .backward_device(
            &batch,
            &saved,
            &u,
            DeviceLogitsMut::F32(&mut small),
            DeviceLogitsMut::F32(&mut gq),
        )
        .unwrap_err();
    assert!(e.to_string().contains("grad_p"), "{e}");
    if let (Some(a), Some(b)) = (before, stats()) {
        assert_eq!(b.since(&a).launches, 0, "a refused call launched a kernel");
    }
}

/// `kl_penalty = full` on the GPU path: a device batch with `ref_logits` (read through the same
/// rows as the logits; the unread rows hold junk) gives the host path's outputs bit for bit
/// (ref_kl, lse_ref, dref_kl, kl_loss, the loss), `backward_device` its gradient, and the stateless
/// `backward_saved_full_device` (the Python op's CUDA path) that of `backward_saved_full`, into a
/// new buffer and in place. Missing or misshapen ref_logits, and a non-finite saved dref_kl, are
/// errors naming ref_logits before any launch; the in-place stateful backward refuses `full` as the
/// host one does.
#[test]
fn device_full_kl_matches_the_host_path() {
    let _serial = common::fake_cuda::serial();
    let Some(gpu) = gpu() else {
        eprintln!("skipped: needs VPPO_TEST_DEVICE=cuda or fake-cuda");
        return;
    };
    use rand::Rng;
    let s = gpu.stream();
    let cfg = VppoConfig {
        kl_penalty: vppo::KlPenalty::Full,
        kl_coef: 0.25,
        ..VppoConfig::default()
    };
    let vppo = Vppo::new(cfg, Device::Cuda(0)).unwrap();
    let bits = |x: &[f32]| x.iter().map(|g| g.to_bits()).collect::<Vec<_>>();
    for seed in 0..4u64 {
        let (owned, mut rng) = small_f32_batch(seed + 40);
        let with_rows = seed % 2 == 1;
        let spread = common::spread(&owned, &mut rng);
        let (logits, masked, r) = if with_rows {
            (spread.logits.clone(), spread.masked.clone(), spread.r)
        } else {
            let n = owned.targets.len();
            (owned.logits.to_f32(), owned.logits_masked.to_f32(), n)
        };
        let reference: Vec<f32> = logits
            .iter()
            .map(|&x| x + rng.gen_range(-1.0f32..1.0))
            .collect();
        let v = owned.vocab;
        let host = vppo::Batch {
            logits: vppo::Logits::F32(&logits),
            logits_masked: vppo::Logits::F32(&masked),
            rows: with_rows.then_some(&spread.rows[..]),
            masked_rows: with_rows.then_some(&spread.masked_rows[..]),
            ref_logits: Some(vppo::Logits::F32(&reference)),
            ..owned.batch()
        };
        let up = |x: &[f32]| s.clone_htod(x).unwrap();
        let (dl, dm, dr) = (up(&logits), up(&masked), up(&reference));
        let (old_logp, advantages) = (up(&owned.old_logp), up(&owned.advantages));
        let targets = s.clone_htod(&owned.targets).unwrap();
        let cu_seqlens = s.clone_htod(&owned.cu_seqlens).unwrap();
        let rows = s.clone_htod(&spread.rows).unwrap();
        let masked_rows = s.clone_htod(&spread.masked_rows).unwrap();
        let db = DeviceBatch {
            logits: DeviceLogits::F32(&dl),
            logits_masked: DeviceLogits::F32(&dm),
            targets: &targets,
            old_logp: &old_logp,
            advantages: &advantages,
            cu_seqlens: &cu_seqlens,
            vocab: v,
            ref_logp: None,
            rows: with_rows.then_some(&rows),
            masked_rows: with_rows.then_some(&masked_rows),
            ref_logits: Some(DeviceLogits::F32(&dr)),
        };
        let want = vppo.forward(&host).unwrap();
        let mut fwd = vppo.forward_device(&db).unwrap();
        assert_eq!(fwd.output, want, "seed {seed}");
        assert!(want.kl_loss > 0.0 && want.tokens.ref_kl.len() == owned.targets.len());

        let mut want_grad = vec![0.0f32; r * v];
        vppo.backward_into(&host, &want, GradMut::F32(&mut want_grad))
            .unwrap();
        let mut grad = s.clone_htod(&vec![f32::NAN; r * v]).unwrap();
        // backward_device reads the forward's lse_ref, ref_kl and dref_kl from its output, which
        // is the caller's to change: too few of them, or one not finite, is refused before any
        // launch (the kernel reads N of each).
        let spoilers: [fn(&mut vppo::TokenOutputs); 3] = [
            |t| {
                t.dref_kl.pop();
            },
            |t| t.lse_ref[0] = f32::NAN,
            |t| t.ref_kl[0] = f32::INFINITY,
        ];
        for spoil in spoilers {
            spoil(&mut fwd.output.tokens);
            let before = common::fake_cuda::active().then(common::fake_cuda::stats);
            let e = vppo
                .backward_device(&fwd, &db, DeviceLogitsMut::F32(&mut grad))
                .unwrap_err();
            assert!(
                e.to_string().contains("ref_kl") || e.to_string().contains("ref_logits"),
                "{e}"
            );
            if let Some(before) = before {
                let d = common::fake_cuda::stats().since(&before);
                assert_eq!(d.launches, 0, "a refused backward launched a kernel: {d:?}");
            }
            fwd.output.tokens = want.tokens.clone();
        }
        vppo.backward_device(&fwd, &db, DeviceLogitsMut::F32(&mut grad))
            .unwrap();
        assert_eq!(
            bits(&s.clone_dtoh(&grad).unwrap()),
            bits(&want_grad),
            "seed {seed}"
        );
        let mut in_place = up(&logits);
        let e = vppo
            .backward_device_in_place(&fwd, DeviceLogitsMut::F32(&mut in_place), &targets)
            .unwrap_err();
        assert!(e.to_string().contains("ref_logits"), "{e}");

        // The stateless backward from the saved tensors, as the Python op calls it.
        let host_saved = vppo::SavedForward {
            targets: &owned.targets,
            lse: &want.tokens.lse,
            dlogp: &want.tokens.dlogp,
            rows: host.rows,
        };
        let host_full = vppo::FullKlSaved {
            ref_logits: vppo::Logits::F32(&reference),
            lse_ref: &want.tokens.lse_ref,
            ref_kl: &want.tokens.ref_kl,
            dref_kl: &want.tokens.dref_kl,
        };
        let mut saved_want = vec![0.0f32; r * v];
        vppo.backward_saved_full(
            Some(vppo::Logits::F32(&logits)),
            v,
            &host_saved,
            &host_full,
            GradMut::F32(&mut saved_want),
        )
        .unwrap();
        let (lse, dlogp) = (up(&want.tokens.lse), up(&want.tokens.dlogp));
        let (lse_ref, ref_kl, dref_kl) = (
            up(&want.tokens.lse_ref),
            up(&want.tokens.ref_kl),
            up(&want.tokens.dref_kl),
        );
        let saved = vppo::DeviceSaved {
            targets: &targets,
            lse: &lse,
            dlogp: &dlogp,
            rows: db.rows,
        };
        let full = vppo::DeviceFullKlSaved {
            ref_logits: DeviceLogits::F32(&dr),
            lse_ref: &lse_ref,
            ref_kl: &ref_kl,
            dref_kl: &dref_kl,
        };
        let mut grad = s.clone_htod(&vec![f32::NAN; r * v]).unwrap();
        vppo.backward_saved_full_device(
            Some(DeviceLogits::F32(&dl)),
            v,
            &saved,
            &full,
            DeviceLogitsMut::F32(&mut grad),
        )
        .unwrap();
        assert_eq!(
            bits(&s.clone_dtoh(&grad).unwrap()),
            bits(&saved_want),
            "seed {seed}"
        );
        let mut in_place = up(&logits);
        vppo.backward_saved_full_device(
            None,
            v,
            &saved,
            &full,
            DeviceLogitsMut::F32(&mut in_place),
        )
        .unwrap();
        assert_eq!(bits(&s.clone_dtoh(&in_place).unwrap()), bits(&saved_want));

        // Refused before any launch, naming ref_logits.
        let counting = common::fake_cuda::active();
        let before = counting.then(common::fake_cuda::stats);
        let short = up(&reference[..reference.len() - 1]);
        for bad in [
            DeviceBatch {
                ref_logits: None,
                ..db
            },
            DeviceBatch {
                ref_logits: Some(DeviceLogits::F32(&short)),
                ..db
            },
        ] {
            let e = vppo.forward_device(&bad).unwrap_err();
            assert!(e.to_string().contains("ref_logits"), "{e}");
        }
        let mut bad_dkl = want.tokens.dref_kl.clone();
        bad_dkl[0] = f32::NAN;
        let bad_dkl = up(&bad_dkl);
        let mut grad = s.clone_htod(&vec![f32::NAN; r * v]).unwrap();
        let e = vppo
            .backward_saved_full_device(
                Some(DeviceLogits::F32(&dl)),
                v,
                &saved,
                &vppo::DeviceFullKlSaved {
                    dref_kl: &bad_dkl,
                    ..full
                },
                DeviceLogitsMut::F32(&mut grad),
            )
            .unwrap_err();
        assert!(e.to_string().contains("ref_kl"), "{e}");
        if let Some(before) = before {
            let d = common::fake_cuda::stats().since(&before);
            assert_eq!(d.launches, 0, "a refused call launched a kernel: {d:?}");
        }
        assert!(s.clone_dtoh(&grad).unwrap().iter().all(|g| g.is_nan()));
    }
}
