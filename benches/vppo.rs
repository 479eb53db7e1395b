//! Benchmarks (criterion): each kernel pass and the whole forward + backward.
//!
//! On a GPU (`Vppo::new(.., Device::Cuda(0))` succeeds), at N = 4,096 and 16,384 tokens, V = 151,936,
//! bf16 (N = 1,024 only with `VPPO_BENCH_SIZE=small`; with `VPPO_BENCH_SIZE=tiny` and
//! `VPPO_TEST_DEVICE=fake-cuda`, a smoke run of this code on the fake CUDA driver, N = 256, V = 4,096,
//! which CI does: its times are the CPU's and mean nothing):
//!
//! - `pass1_perception`: pass 1 alone (both logits tensors read once).
//! - `pass2_select_loss`: pass 2 alone (`vppo_select` + `vppo_loss`, O(N + B) work).
//! - `pass3_backward_bf16`, `pass3_backward_f32`: pass 3 alone into a separate gradient buffer;
//!   `pass3_backward_in_place`: pass 3 over a fresh copy of the logits (the copy is made before each
//!   iteration, outside the timing).
//! - `api_forward_device`, `api_forward_backward_device`: the GPU-resident API as a trainer calls it,
//!   [`Vppo::forward_device`] then [`Vppo::backward_device`] (bf16 gradient). These include what the
//!   API does besides the kernels: the O(N + B) small tensors copied back for validation, the workspace
//!   allocation, the O(N + B) outputs downloaded, the synchronizations.
//!
//! The pass benches use `vppo::hooks::DeviceStages`, which queues one pass without copies or waits;
//! every GPU time is taken with CUDA events ([`Gpu::time_ms`]) around a batch of iterations
//! (criterion's `iter_custom`). The logits are random bf16 (not zeros), made once per size on the host
//! and uploaded once. Throughput is reported against the bytes each pass must move: 2 N V x 2 bytes
//! read for pass 1; N V x 2 read plus N V x (2 or 4) written for pass 3. After each bench a line gives
//! the median time per iteration, GB/s and the percentage of the device-to-device copy bandwidth
//! measured in the same process ([`vppo::cuda::copy_bandwidth`], bytes read + written); pass 2 is
//! given as a share of the kernel total (pass 1 + pass 2 + pass 3 bf16). Targets: pass 1 >= 90 % of
//! the copy bandwidth, pass 3 >= 85 %, pass 2 < 3 % of the total.
//!
//! Always (and alone on a machine without a GPU, after a line saying why the GPU benches were
//! skipped): the CPU reference's forward and forward + backward at N = 256, V = 32,000, bf16, and the
//! SIMT executor's forward at N = 64, V = 4,096 (N = 64, V = 4,096 and N = 16, V = 1,024 with
//! `VPPO_BENCH_SIZE=small`); and the SIMT executor's passes one at a time
//! (`vppo::hooks::HostStages`) at N = 2,048, V = 4,096, 32 responses (N = 512, V = 1,024, 8 with
//! `small`): `pass1_perception`, `pass2a_select` and `pass2b_loss` (the three loss kernels), then a
//! line `vppo-simt ...` with the medians and each part of pass 2 as a share of pass 1. The SIMT
//! executor runs one thread of one block at a time on one CPU core: this measures the kernels' total
//! work on a CPU, not a GPU's time (no parallelism, no memory latency, no launch gaps); pass 1's work
//! grows with V, the loss's does not.

use std::sync::Arc;
use std::time::{Duration, Instant};

/// The tests' helpers (the module allows its own dead code), for the fake CUDA driver: a smoke run
/// of the GPU benches without a GPU.
#[path = "../tests/common/mod.rs"]
mod common;
use common::fake_cuda;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use cudarc::driver::CudaSlice;
use half::bf16;
use vppo::bench::{parse_synthetic, synthetic_batch, UploadedBatch};
use vppo::cuda::{copy_bandwidth, Gpu};
use vppo::error::CudaError;
use vppo::hooks::{DeviceStages, HostStages};
use vppo::{
    Device, DeviceBatch, DeviceLogits, DeviceLogitsMut, GradMut, LaneOrder, Vppo, VppoConfig,
    VppoError,
};

/// The vocabulary of Qwen2.5 / Qwen2.5-VL, the models VPPO was trained with.
const QWEN_VOCAB: usize = 151_936;

/// VPPO_BENCH_SIZE=small: shorter CPU benches and N = 1,024 on a GPU.
fn small() -> bool {
    matches!(
        std::env::var("VPPO_BENCH_SIZE").as_deref(),
        Ok("small") | Ok("tiny")
    )
}

/// VPPO_BENCH_SIZE=tiny: a smoke run of the GPU benches' code on the fake CUDA driver
/// (VPPO_TEST_DEVICE=fake-cuda, see tests/common/fake_cuda.rs), where kernels run on the CPU:
/// N = 256, V = 4,096, a 16 MiB copy. Its figures mean nothing; it checks the code runs.
fn tiny() -> bool {
    std::env::var("VPPO_BENCH_SIZE").as_deref() == Ok("tiny")
}

/// V of the GPU benches.
fn vocab() -> usize {
    if tiny() {
        4_096
    } else {
        QWEN_VOCAB
    }
}

// -------------------------------------------------------------------------------------------------
// CPU: the reference and the SIMT executor
// -------------------------------------------------------------------------------------------------

fn cpu_benches(c: &mut Criterion) {
    let (ref_size, simt_size) = if small() {
        ((64, 4_096), (16, 1_024))
    } else {
        ((256, 32_000), (64, 4_096))
    };
    let cfg = VppoConfig::default();

    let (n, v) = ref_size;
    let spec = parse_synthetic(&format!("{n},{v},{},bf16", (n / 64).max(1))).expect("spec");
    let owned = synthetic_batch(&spec, 1).expect("synthetic batch");
    let batch = owned.batch();
    let reference = Vppo::new(cfg.clone(), Device::Reference).expect("reference");
    let fwd_bytes = (2 * n * v * 2) as u64;
    let bwd_bytes = (n * v * 2 + n * v * 2) as u64;
    let mut g = c.benchmark_group(format!("cpu/reference/N={n},V={v},bf16"));
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Bytes(fwd_bytes));
    g.bench_function("forward", |b| {
        b.iter(|| reference.forward(&batch).expect("forward").loss)
    });
    let mut grad = vec![bf16::ZERO; n * v];
    g.throughput(Throughput::Bytes(fwd_bytes + bwd_bytes));
    g.bench_function("forward_backward_bf16", |b| {
        b.iter(|| {
            let out = reference.forward(&batch).expect("forward");
            reference
                .backward_into(&batch, &out, GradMut::Bf16(&mut grad))
                .expect("backward");
            out.loss
        })
    });
    g.finish();

    let (n, v) = simt_size;
    let spec = parse_synthetic(&format!("{n},{v},{},bf16", (n / 16).max(1))).expect("spec");
    let owned = synthetic_batch(&spec, 2).expect("synthetic batch");
    let batch = owned.batch();
    let simt = Vppo::new(cfg, Device::Simt(LaneOrder::Forward)).expect("simt");
    let mut g = c.benchmark_group(format!("cpu/simt/N={n},V={v},bf16"));
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Bytes((2 * n * v * 2) as u64));
    g.bench_function("forward", |b| {
        b.iter(|| simt.forward(&batch).expect("forward").loss)
    });
    g.finish();

    simt_stages(c);
}

/// Pass 1, pass 2a and pass 2b one at a time on the SIMT executor (issue 12: the loss benchmarked
/// against pass 1 where CI can run it), and the loss's share of pass 1; then pass 1 once more with
/// `logits_masked` one element (2 bytes) off the 16-byte phase of `logits`, the cliff of the `Batch`
/// docs: its rows take the element-at-a-time path (the executor's CPU work, a proxy for the
/// instruction count, not a GPU's time).
fn simt_stages(c: &mut Criterion) {
    let (n, v, b) = if small() {
        (512, 1_024, 8)
    } else {
        (2_048, 4_096, 32)
    };
    let spec = parse_synthetic(&format!("{n},{v},{b},bf16")).expect("spec");
    let owned = synthetic_batch(&spec, 3).expect("synthetic batch");
    let batch = owned.batch();
    let cfg = VppoConfig::default();
    let stages = HostStages::new(&batch, &cfg, LaneOrder::Forward).expect("SIMT stages");
    let want = stages.loss_value().expect("loss");
    // The same values one bf16 element into a bigger buffer: every row 2 bytes out of phase.
    let masked = owned.logits_masked.to_f32();
    let mut shifted = vec![bf16::ZERO; masked.len() + 1];
    for (d, &x) in shifted[1..].iter_mut().zip(&masked) {
        *d = bf16::from_f32(x);
    }
    let off_phase = vppo::Batch {
        logits_masked: vppo::Logits::Bf16(&shifted[1..]),
        ..batch
    };
    let off_stages = HostStages::new(&off_phase, &cfg, LaneOrder::Forward).expect("SIMT stages");
    // The same values, summed in another order by the scalar path: equal to rounding.
    let off_loss = off_stages.loss_value().expect("loss");
    assert!(
        (off_loss - want).abs() <= 1e-5 * (1.0 + want.abs()),
        "the out-of-phase batch has the same values: loss {off_loss} vs {want}"
    );
    let mut g = c.benchmark_group(format!("cpu/simt_stages/N={n},V={v},B={b},bf16"));
    g.sampling_mode(SamplingMode::Flat);
    let mut samples: [Samples; 4] = Default::default();
    type Stage<'s> = &'s dyn Fn() -> vppo::Result<()>;
    let (pass1, select, loss, off): (Stage, Stage, Stage, Stage) = (
        &|| stages.perception(),
        &|| stages.select(),
        &|| stages.loss(),
        &|| off_stages.perception(),
    );
    let names = [
        "pass1_perception",
        "pass2a_select",
        "pass2b_loss",
        "pass1_perception_out_of_phase",
    ];
    for ((name, run), s) in names
        .iter()
        .zip([pass1, select, loss, off])
        .zip(&mut samples)
    {
        g.bench_function(*name, |bch| {
            bch.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    run().expect("SIMT stage");
                }
                s.record(t.elapsed().as_secs_f64() * 1e3, iters)
            })
        });
    }
    g.finish();
    // rerunning a pass rewrites the workspace with the same values: the loss is unchanged
    let got = stages.loss_value().expect("loss");
    assert_eq!(
        got.to_bits(),
        want.to_bits(),
        "SIMT stages: loss {got} after the reruns, {want} before"
    );
    if let [Some(p1), Some(sel), Some(l), Some(o)] = samples.each_ref().map(Samples::median) {
        println!(
            "vppo-simt N={n},V={v},B={b}: median pass 1 {p1:.3} ms, pass 2a (select) {sel:.3} ms = {:.2}% of pass 1, pass 2b (loss: prep, tiles, finish) {l:.3} ms = {:.2}% of pass 1 (the SIMT executor's CPU work, not a GPU's time)",
            100.0 * sel / p1,
            100.0 * l / p1
        );
        println!(
            "vppo-simt N={n},V={v},B={b}: pass 1 with logits_masked out of 16-byte phase {o:.3} ms = {:.2}x the in-phase pass 1 (element-at-a-time loads for every row)",
            o / p1
        );
    }
}

// -------------------------------------------------------------------------------------------------
// GPU: random bf16 batches made once per size
// -------------------------------------------------------------------------------------------------

/// SplitMix64, seeded per row so that the batch does not depend on the number of threads.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Roughly standard normal: four 16-bit uniforms summed, centred, scaled to variance 1.
    fn normalish(&mut self) -> f32 {
        let x = self.next();
        let s = (x & 0xFFFF) + ((x >> 16) & 0xFFFF) + ((x >> 32) & 0xFFFF) + (x >> 48);
        (s as f32 / 65536.0 - 2.0) * 1.732_050_8
    }
}

/// A random batch on the host: logits = 2 z, logits_masked = logits + eps_t z' (eps_t uniform in
/// [0, 1.5) per token, so scores vary), both rounded to bf16; uniform targets; old_logp = the row's
/// own logp + a uniform offset in [-0.3, 0.3]; responses of 256 to 767 tokens; advantages in [-1, 1).
struct HostBatch {
    logits: Vec<bf16>,
    logits_masked: Vec<bf16>,
    targets: Vec<i32>,
    old_logp: Vec<f32>,
    advantages: Vec<f32>,
    cu_seqlens: Vec<i32>,
}

fn host_batch(n: usize, v: usize, seed: u64) -> HostBatch {
    let mut logits = vec![bf16::ZERO; n * v];
    let mut logits_masked = vec![bf16::ZERO; n * v];
    let mut targets = vec![0i32; n];
    let mut old_logp = vec![0.0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |c| c.get());
    let rows = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (chunk, (((a, b), y), old)) in logits
            .chunks_mut(rows * v)
            .zip(logits_masked.chunks_mut(rows * v))
            .zip(targets.chunks_mut(rows))
            .zip(old_logp.chunks_mut(rows))
            .enumerate()
        {
            s.spawn(move || {
                for (i, (((ar, br), yt), ot)) in a
                    .chunks_mut(v)
                    .zip(b.chunks_mut(v))
                    .zip(y.iter_mut())
                    .zip(old.iter_mut())
                    .enumerate()
                {
                    let mut g = Rng::new(seed, (chunk * rows + i) as u64);
                    let eps = 1.5 * g.uniform();
                    let target = (g.next() % v as u64) as usize;
                    let shift = 0.6 * g.uniform() - 0.3;
                    let mut m = f32::NEG_INFINITY;
                    for (av, bv) in ar.iter_mut().zip(br.iter_mut()) {
                        let x = bf16::from_f32(2.0 * g.normalish());
                        *av = x;
                        *bv = bf16::from_f32(x.to_f32() + eps * g.normalish());
                        m = m.max(x.to_f32());
                    }
                    let sum: f32 = ar.iter().map(|x| (x.to_f32() - m).exp()).sum();
                    *yt = target as i32;
                    *ot = ar[target].to_f32() - (m + sum.ln()) + shift;
                }
            });
        }
    });
    let mut g = Rng::new(seed, u64::MAX);
    let mut cu_seqlens = vec![0i32];
    while (*cu_seqlens.last().unwrap() as usize) < n {
        let len = 256 + (g.next() % 512) as usize;
        let end = (*cu_seqlens.last().unwrap() as usize + len).min(n);
        cu_seqlens.push(end as i32);
    }
    let advantages = (1..cu_seqlens.len())
        .map(|_| 2.0 * g.uniform() - 1.0)
        .collect();
    HostBatch {
        logits,
        logits_masked,
        targets,
        old_logp,
        advantages,
        cu_seqlens,
    }
}

/// The batch in GPU memory, and the first rows kept on the host to check the kernels read it right.
struct GpuBatch {
    uploaded: UploadedBatch,
    /// Responses in the batch.
    responses: usize,
    /// Rows 0..CHECK_ROWS of logits and logits_masked, and their targets.
    check: (Vec<bf16>, Vec<bf16>, Vec<i32>),
}

const CHECK_ROWS: usize = 4;

impl GpuBatch {
    fn new(gpu: &Gpu, n: usize, seed: u64) -> vppo::Result<GpuBatch> {
        let h = host_batch(n, vocab(), seed);
        let k = CHECK_ROWS.min(n);
        let batch = vppo::Batch {
            logits: vppo::Logits::Bf16(&h.logits),
            logits_masked: vppo::Logits::Bf16(&h.logits_masked),
            targets: &h.targets,
            old_logp: &h.old_logp,
            advantages: &h.advantages,
            cu_seqlens: &h.cu_seqlens,
            vocab: vocab(),
            ..Default::default()
        };
        Ok(GpuBatch {
            uploaded: UploadedBatch::new(gpu, &batch)?,
            responses: h.advantages.len(),
            check: (
                h.logits[..k * vocab()].to_vec(),
                h.logits_masked[..k * vocab()].to_vec(),
                h.targets[..k].to_vec(),
            ),
        })
    }

    fn batch(&self) -> DeviceBatch<'_> {
        self.uploaded.batch()
    }

    /// The uploaded bf16 logits.
    fn logits(&self) -> &CudaSlice<bf16> {
        match self.uploaded.batch().logits {
            DeviceLogits::Bf16(x) => x,
            _ => unreachable!("the bench batch is bf16"),
        }
    }
}

/// log-sum-exp of a bf16 row, in f64.
fn lse_f64(row: &[bf16]) -> f64 {
    let m = row
        .iter()
        .map(|x| x.to_f64())
        .fold(f64::NEG_INFINITY, f64::max);
    m + row.iter().map(|x| (x.to_f64() - m).exp()).sum::<f64>().ln()
}

/// The forward's lse and logp of the first rows against the host copy (f64): the kernels read the
/// uploaded data, not something else.
fn check_forward(gb: &GpuBatch, out: &vppo::VppoOutput) -> vppo::Result<()> {
    let (a, b, y) = &gb.check;
    for t in 0..y.len() {
        let (ra, rb) = (
            &a[t * vocab()..(t + 1) * vocab()],
            &b[t * vocab()..(t + 1) * vocab()],
        );
        let (lse, lse_m) = (lse_f64(ra), lse_f64(rb));
        let logp = ra[y[t] as usize].to_f64() - lse;
        for (what, got, want) in [
            ("lse", out.tokens.lse[t] as f64, lse),
            ("lse_masked", out.tokens.lse_masked[t] as f64, lse_m),
            ("logp", out.tokens.logp[t] as f64, logp),
        ] {
            let err = (got - want).abs();
            if err.is_nan() || err > 1e-4 * (1.0 + want.abs()) {
                return Err(VppoError::Kernel(format!(
                    "bench check: {what}[{t}] = {got} on the GPU, {want} on the host"
                )));
            }
        }
    }
    if !out.loss.is_finite() {
        return Err(VppoError::Kernel(format!("bench check: loss {}", out.loss)));
    }
    Ok(())
}

/// The gradient rows of the first tokens: finite, each row summing to 0 (softmax), and the in-place
/// result equal to the one written into a separate buffer (the same kernel on the same values).
fn check_grads(
    gpu: &Gpu,
    grad: &CudaSlice<bf16>,
    in_place: &CudaSlice<bf16>,
    rows: usize,
) -> vppo::Result<()> {
    let k = rows.min(CHECK_ROWS);
    let copy = |s: &CudaSlice<bf16>| {
        gpu.stream()
            .clone_dtoh(&s.slice(0..k * vocab()))
            .map_err(|e| VppoError::Cuda(CudaError::driver("copying gradient rows back", e)))
    };
    let (g, p) = (copy(grad)?, copy(in_place)?);
    if let Some(i) = g
        .iter()
        .zip(&p)
        .position(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(VppoError::Kernel(format!(
            "bench check: in-place gradient {} != separate-buffer gradient {} at element {i}",
            p[i], g[i]
        )));
    }
    for (t, row) in g.chunks(vocab()).enumerate() {
        let sum: f64 = row.iter().map(|x| x.to_f64()).sum();
        let abs: f64 = row.iter().map(|x| x.to_f64().abs()).sum();
        if !abs.is_finite() || sum.abs() > 1e-2 * abs + 1e-30 {
            return Err(VppoError::Kernel(format!(
                "bench check: gradient row {t} sums to {sum} (sum of |g| {abs})"
            )));
        }
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// GPU benches
// -------------------------------------------------------------------------------------------------

/// Per-iteration device times (ms) of one bench, from every batch criterion ran (warm-up included).
#[derive(Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn record(&mut self, total_ms: f64, iters: u64) -> Duration {
        if iters > 0 {
            self.0.push(total_ms / iters as f64);
        }
        Duration::from_secs_f64(total_ms.max(0.0) / 1e3)
    }

    fn median(&self) -> Option<f64> {
        let mut s = self.0.clone();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        Some(s[s.len() / 2])
    }
}

fn ok<T>(what: &str, r: vppo::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("GPU bench {what}: {e}"))
}

/// Prints the line of one bench: median ms, GB/s of `bytes`, % of the copy bandwidth.
fn report(label: &str, s: &Samples, bytes: f64, copy_gbs: f64, target: &str) -> Option<f64> {
    let ms = s.median()?;
    let gbs = bytes / (ms * 1e-3) / 1e9;
    println!(
        "vppo-gpu {label}: median {ms:.4} ms/iter, {gbs:.1} GB/s = {:.1}% of the copy bandwidth ({copy_gbs:.1} GB/s){target}",
        100.0 * gbs / copy_gbs
    );
    Some(ms)
}

fn gpu_benches(c: &mut Criterion, gpu: &Arc<Gpu>, vppo: &Vppo) {
    let copy = ok(
        "copy bandwidth",
        copy_bandwidth(
            gpu,
            if tiny() { 16 << 20 } else { 1 << 30 },
            if tiny() { 3 } else { 20 },
        )
        .and_then(|bw| {
            gpu.synchronize()?;
            Ok(bw)
        }),
    );
    let copy_gbs = copy.median_gbs();
    let (major, minor) = gpu.compute_capability();
    println!(
        "vppo-gpu card: {} (sm_{major}{minor}, {} SMs); device-to-device copy of {} MiB: median {copy_gbs:.1} GB/s, best {:.1} GB/s (bytes read + written, {} copies)",
        gpu.name(),
        gpu.multiprocessor_count(),
        copy.bytes >> 20,
        copy.best_gbs(),
        copy.samples_ms.len()
    );
    let sizes: &[usize] = if tiny() {
        &[256]
    } else if small() {
        &[1_024]
    } else {
        &[4_096, 16_384]
    };
    let cfg = vppo.config().clone();
    for &n in sizes {
        let v = vocab();
        let nv = n * v;
        let started = std::time::Instant::now();
        let gb = ok("upload", GpuBatch::new(gpu, n, 7 + n as u64));
        let db = gb.batch();
        let stages = ok("forward", DeviceStages::new(gpu, &db, &cfg));
        ok(
            "forward check",
            check_forward(&gb, &stages.forward().output),
        );
        println!(
            "vppo-gpu N={n}: batch of {} responses made and uploaded in {:.1} s (not timed)",
            gb.responses,
            started.elapsed().as_secs_f64()
        );
        let mut grad_bf16: CudaSlice<bf16> = ok("alloc", gpu.alloc_zeros(nv));
        let mut grad_f32: CudaSlice<f32> = ok("alloc", gpu.alloc_zeros(nv));
        let mut scratch: CudaSlice<bf16> = ok("alloc", gpu.alloc_zeros(nv));

        let fwd_bytes = (2 * nv * 2) as f64;
        let bwd_bytes = |out: usize| (nv * 2 + nv * out) as f64;
        let label = |what: &str| format!("N={n},V={v},bf16 {what}");
        let mut g = c.benchmark_group(format!("gpu/N={n},V={v},bf16"));

        // Queues `iters` launches of `f` between two events.
        let timed = |iters: u64, s: &mut Samples, f: &mut dyn FnMut() -> vppo::Result<()>| {
            let ((), ms) = ok(
                "launch",
                gpu.time_ms(|| {
                    for _ in 0..iters {
                        f()?;
                    }
                    Ok(())
                }),
            );
            s.record(ms as f64, iters)
        };

        let mut s1 = Samples::default();
        g.throughput(Throughput::Bytes(fwd_bytes as u64));
        g.bench_function("pass1_perception", |b| {
            b.iter_custom(|iters| timed(iters, &mut s1, &mut || stages.perception()))
        });
        let t1 = report(
            &label("pass1_perception"),
            &s1,
            fwd_bytes,
            copy_gbs,
            "; target >= 90%",
        );

        let mut s2 = Samples::default();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function("pass2_select_loss", |b| {
            b.iter_custom(|iters| timed(iters, &mut s2, &mut || stages.select_loss()))
        });

        let mut s3 = Samples::default();
        g.throughput(Throughput::Bytes(bwd_bytes(2) as u64));
        g.bench_function("pass3_backward_bf16", |b| {
            b.iter_custom(|iters| {
                timed(iters, &mut s3, &mut || {
                    stages.backward(DeviceLogitsMut::Bf16(&mut grad_bf16))
                })
            })
        });
        let t3 = report(
            &label("pass3_backward_bf16"),
            &s3,
            bwd_bytes(2),
            copy_gbs,
            "; target >= 85%",
        );

        let mut s3f = Samples::default();
        g.throughput(Throughput::Bytes(bwd_bytes(4) as u64));
        g.bench_function("pass3_backward_f32", |b| {
            b.iter_custom(|iters| {
                timed(iters, &mut s3f, &mut || {
                    stages.backward(DeviceLogitsMut::F32(&mut grad_f32))
                })
            })
        });
        report(
            &label("pass3_backward_f32"),
            &s3f,
            bwd_bytes(4),
            copy_gbs,
            "; target >= 85%",
        );

        // In place over a fresh copy of the logits each iteration; only the kernel is timed.
        let mut s3i = Samples::default();
        g.throughput(Throughput::Bytes(bwd_bytes(2) as u64));
        g.bench_function("pass3_backward_in_place", |b| {
            b.iter_custom(|iters| {
                let mut total = 0.0;
                for _ in 0..iters {
                    ok("copy", gpu.copy_on_device(gb.logits(), &mut scratch));
                    let ((), ms) = ok(
                        "launch",
                        gpu.time_ms(|| {
                            stages.backward_in_place(DeviceLogitsMut::Bf16(&mut scratch))
                        }),
                    );
                    total += ms as f64;
                }
                s3i.record(total, iters)
            })
        });
        report(
            &label("pass3_backward_in_place"),
            &s3i,
            bwd_bytes(2),
            copy_gbs,
            "; target >= 85%",
        );
        ok("sync", gpu.synchronize());
        if !s3.0.is_empty() && !s3i.0.is_empty() {
            ok("gradient check", check_grads(gpu, &grad_bf16, &scratch, n));
        }

        if let (Some(t1), Some(t2), Some(t3)) = (t1, s2.median(), t3) {
            let total = t1 + t2 + t3;
            println!(
                "vppo-gpu {}: median {t2:.4} ms/iter = {:.2}% of the kernel total {total:.4} ms (pass 1 + pass 2 + pass 3 bf16, {:.1} GB/s = {:.1}% of the copy bandwidth); target < 3%",
                label("pass2_select_loss"),
                100.0 * t2 / total,
                (fwd_bytes + bwd_bytes(2)) / (total * 1e-3) / 1e9,
                100.0 * (fwd_bytes + bwd_bytes(2)) / (total * 1e-3) / 1e9 / copy_gbs,
            );
        }

        // The GPU-resident API, as a trainer calls it.
        let mut sf = Samples::default();
        g.throughput(Throughput::Bytes(fwd_bytes as u64));
        g.bench_function("api_forward_device", |b| {
            b.iter_custom(|iters| {
                timed(iters, &mut sf, &mut || vppo.forward_device(&db).map(|_| ()))
            })
        });
        report(
            &label("api_forward_device"),
            &sf,
            fwd_bytes,
            copy_gbs,
            " (includes the API's O(N + B) copies and syncs)",
        );
        let mut sfb = Samples::default();
        g.throughput(Throughput::Bytes((fwd_bytes + bwd_bytes(2)) as u64));
        g.bench_function("api_forward_backward_device", |b| {
            b.iter_custom(|iters| {
                timed(iters, &mut sfb, &mut || {
                    let out = vppo.forward_device(&db)?;
                    vppo.backward_device(&out, &db, DeviceLogitsMut::Bf16(&mut grad_bf16))
                })
            })
        });
        report(
            &label("api_forward_backward_device"),
            &sfb,
            fwd_bytes + bwd_bytes(2),
            copy_gbs,
            " (bf16 gradient; includes the API's O(N + B) copies and syncs)",
        );

        // Vocabulary parallel with a group of one rank (issue 13): pass 1 in partial mode, the
        // states (9 N floats) back to the host, the gather (in-process for one rank), the merge in
        // rank order and pass 2 on the host in f64. Its time less pass 1's is the merge stage.
        let group = ok("group", vppo::ThreadGroup::new(1))
            .pop()
            .expect("a group of one rank");
        let at = vppo::VocabShard { start: 0, total: v };
        let mut svp = Samples::default();
        g.throughput(Throughput::Bytes(fwd_bytes as u64));
        g.bench_function("vocab_parallel_forward_1rank", |b| {
            b.iter_custom(|iters| {
                timed(iters, &mut svp, &mut || {
                    vppo.forward_device_vocab_parallel(&db, at, &group, None)
                        .map(|_| ())
                })
            })
        });
        if let (Some(tv), Some(t1)) = (svp.median(), t1) {
            println!(
                "vppo-gpu {}: median {tv:.4} ms; the merge stage (this less pass 1's {t1:.4} ms: the states copied back, the gather, the merge and the host pass 2) = {:.4} ms = {:.2}% of pass 1; goal < 2%",
                label("vocab_parallel_forward_1rank"),
                tv - t1,
                100.0 * (tv - t1) / t1
            );
        }
        g.finish();
        ok("sync", gpu.synchronize());
    }
}

fn benches(c: &mut Criterion) {
    if fake_cuda::active() {
        fake_cuda::install();
    }
    let vppo = Vppo::new(VppoConfig::default(), Device::Cuda(0));
    if let Err(e) = &vppo {
        println!(
            "vppo-bench: GPU benchmarks skipped: Vppo::new(VppoConfig::default(), Device::Cuda(0)) failed: {e}. Running the CPU benchmarks only."
        );
    }
    cpu_benches(c);
    if let Ok(vppo) = vppo {
        let gpu = ok("open", Gpu::new(0));
        gpu_benches(c, &gpu, &vppo);
    }
}

criterion_group! {
    name = vppo_benches;
    // Defaults for a short run; criterion's command-line options (--sample-size, --measurement-time,
    // --warm-up-time) override them.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = benches
}
criterion_main!(vppo_benches);
