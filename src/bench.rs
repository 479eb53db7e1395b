//! `vppo bench`: times the loss through the public [`Vppo`] API, so that another program (the PyTorch
//! comparison, bench/compare_torch.py) can measure this crate without writing Rust.
//!
//! What is timed and what is not:
//! - The batch is read from the safetensors file (or generated, with `--synthetic`) once, before any
//!   timing; file I/O and parsing are reported separately as `load_ms` and never enter a timing.
//! - [`Vppo`] is built once. Each sample is the wall-clock time ([`std::time::Instant`]) of one call.
//! - On `cpu` and `simt` the calls are the host API: `forward` for the forward timing, `forward` then
//!   `backward_into` for forward + backward.
//! - On `cuda` the batch is uploaded to the GPU once, before any timing (as a trainer's logits already
//!   live there), and the calls are the GPU-resident API: `forward_device` for the forward timing,
//!   `forward_device` then `backward_device` (into a device gradient buffer) for forward + backward.
//!   Each returns once its work on the GPU is done (the forward's outputs are in host memory, the
//!   backward synchronizes), so the times are synchronized. They include what that API copies: the
//!   O(N + B) small tensors (targets, old_logp, advantages, cu_seqlens) copied back for validation and
//!   the O(N + B) outputs downloaded by each forward; they include no copy of the logits or of the
//!   gradient (`includes_host_device_copies: false` in the report).
//! - The gradient buffer (`[N, V]`, f32 or the logits dtype; in GPU memory on `cuda`) is allocated
//!   once per measurement and reused by every iteration, as a trainer reuses its buffer (and as
//!   PyTorch's caching allocator reuses a freed block on a GPU).
//! - `--warmup W` untimed iterations come first, then `--iters R` timed ones; the report gives the
//!   median, minimum and mean of the R samples.
//!
//! Memory: on Linux the peak resident set (VmHWM in /proc/self/status) is reset before each
//! measurement by writing `5` to /proc/self/clear_refs, and `peak_extra_bytes` is VmHWM at the end minus
//! VmRSS at the start. It counts every host byte the calls touched beyond what was resident before (the
//! inputs were already resident): the output vectors, the executor's workspaces and, for forward +
//! backward on the CPU devices, the gradient buffer. It is host memory: on `cuda`, device memory (the
//! uploaded batch, the workspaces, the gradient buffer) is not seen by it (the report's
//! `model_extra_bytes` gives the O(N + B) + gradient figure the kernels need by construction).
//! Where the reset or the file is not available the measured figure is `null`.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use half::{bf16, f16};
use serde::Serialize;

use cudarc::driver::CudaSlice;

use crate::api::{Device, Vppo};
use crate::batch::{Batch, Dtype, Logits};
use crate::cuda::Gpu;
use crate::error::{Result, VppoError};
use crate::exec::DeviceBatch;
use crate::io::{self, OwnedBatch, OwnedLogits};
use crate::options::LossOptions;
use crate::tensor::DeviceTensor;

/// `--grad`: which gradient the forward + backward timing produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GradArg {
    /// dloss/dlogits in f32.
    F32,
    /// dloss/dlogits in the dtype of the logits (what autograd gives for a bf16 leaf).
    LogitsDtype,
    /// No backward: time the forward only.
    None,
}

impl GradArg {
    fn name(self) -> &'static str {
        match self {
            GradArg::F32 => "f32",
            GradArg::LogitsDtype => "logits-dtype",
            GradArg::None => "none",
        }
    }
}

/// `--synthetic N,V,B,DTYPE`: a random batch made in the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticSpec {
    /// N, response tokens.
    pub n_tokens: usize,
    /// V, the vocabulary.
    pub vocab: usize,
    /// B, responses (N is split as evenly as possible; B >= 1).
    pub n_responses: usize,
    /// The logits dtype.
    pub dtype: Dtype,
}

/// Parses `N,V,B,DTYPE`, e.g. `4096,151936,8,bf16`; the dtype is f32, f16 or bf16.
pub fn parse_synthetic(s: &str) -> std::result::Result<SyntheticSpec, String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() != 4 {
        return Err(format!(
            "`{s}` is not N,V,B,DTYPE (e.g. 4096,151936,8,bf16)"
        ));
    }
    let num = |i: usize, what: &str| -> std::result::Result<usize, String> {
        parts[i]
            .replace('_', "")
            .parse::<usize>()
            .map_err(|_| format!("{what} `{}` is not a whole number", parts[i]))
    };
    let (n_tokens, vocab, n_responses) = (num(0, "N")?, num(1, "V")?, num(2, "B")?);
    if vocab == 0 {
        return Err("V must be at least 1".into());
    }
    if n_responses == 0 {
        return Err("B must be at least 1".into());
    }
    if n_tokens > i32::MAX as usize {
        return Err(format!(
            "N = {n_tokens} exceeds the i32 range of cu_seqlens"
        ));
    }
    let dtype = match parts[3].to_ascii_lowercase().as_str() {
        "f32" | "float32" => Dtype::F32,
        "f16" | "float16" => Dtype::F16,
        "bf16" | "bfloat16" => Dtype::Bf16,
        d => return Err(format!("dtype `{d}` is not f32, f16 or bf16")),
    };
    Ok(SyntheticSpec {
        n_tokens,
        vocab,
        n_responses,
        dtype,
    })
}

/// The options of `vppo bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Input safetensors file, as for `vppo loss` (read once, outside every timing).
    #[arg(
        long,
        value_name = "IN.safetensors",
        required_unless_present = "synthetic",
        conflicts_with = "synthetic"
    )]
    pub input: Option<PathBuf>,
    /// Make a random batch in the process instead of reading a file: N tokens, vocabulary V, B
    /// responses, dtype f32|f16|bf16 (e.g. `4096,151936,8,bf16`).
    #[arg(
        long,
        value_name = "N,V,B,DTYPE",
        allow_hyphen_values = true,
        value_parser = parse_synthetic
    )]
    pub synthetic: Option<SyntheticSpec>,
    /// Seed of `--synthetic`.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "S",
        default_value_t = 0
    )]
    pub seed: u64,
    /// Untimed iterations before the timed ones.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "W",
        default_value_t = 1
    )]
    pub warmup: usize,
    /// Timed iterations (at least 1).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "R",
        default_value_t = 5
    )]
    pub iters: usize,
    /// The gradient of the forward + backward timing: f32, the logits dtype, or none (forward only).
    #[arg(long, value_enum, default_value_t = GradArg::F32)]
    pub grad: GradArg,
    /// Print the report as one line of JSON (otherwise as a few lines of text).
    #[arg(long)]
    pub json: bool,
    /// The loss options and the device, as for `vppo loss`.
    #[command(flatten)]
    pub options: LossOptions,
}

/// Wall-clock samples of one measurement, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timing {
    /// Median of the samples (the mean of the two middle ones for an even count).
    pub median_ms: f64,
    /// Fastest sample.
    pub min_ms: f64,
    /// Mean of the samples.
    pub mean_ms: f64,
    /// Every sample, in the order taken.
    pub samples_ms: Vec<f64>,
}

impl Timing {
    /// Summarizes `samples_ms` (at least one sample).
    pub fn from_samples(samples_ms: Vec<f64>) -> Timing {
        let mut sorted = samples_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let k = sorted.len();
        let median_ms = if k % 2 == 1 {
            sorted[k / 2]
        } else {
            0.5 * (sorted[k / 2 - 1] + sorted[k / 2])
        };
        Timing {
            median_ms,
            min_ms: sorted[0],
            mean_ms: sorted.iter().sum::<f64>() / k as f64,
            samples_ms,
        }
    }
}

/// What `vppo bench` reports (printed as one JSON line with `--json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// N.
    pub n_tokens: usize,
    /// B.
    pub n_responses: usize,
    /// V.
    pub vocab: usize,
    /// The logits dtype.
    pub dtype: &'static str,
    /// cpu (the f64 reference), simt or cuda.
    pub device: &'static str,
    /// f32, logits-dtype or none.
    pub grad: &'static str,
    /// Untimed iterations per measurement.
    pub warmup: usize,
    /// Timed iterations per measurement.
    pub iters: usize,
    /// Where the batch came from: the file's path, or `synthetic:N,V,B,dtype,seed=S`.
    pub source: String,
    /// Time to read and parse the file, or to generate the batch (never part of a timing).
    pub load_ms: f64,
    /// Bytes of the two logits tensors.
    pub input_bytes: u64,
    /// The loss of the last forward (a check that the timed calls did the work).
    pub loss: f64,
    /// `forward` per call (on cuda `forward_device`).
    pub forward: Timing,
    /// `forward` + `backward_into` per call (on cuda `forward_device` + `backward_device`; absent
    /// with `--grad none`).
    pub forward_backward: Option<Timing>,
    /// Measured peak extra host bytes during the forward iterations (see the module docs), or null.
    pub peak_extra_bytes_forward: Option<u64>,
    /// Measured peak extra host bytes during the forward + backward iterations (the gradient buffer
    /// included on the CPU devices; on cuda it is in GPU memory), or null.
    pub peak_extra_bytes_forward_backward: Option<u64>,
    /// How the peak was measured.
    pub memory_method: &'static str,
    /// The extra memory the API needs by construction: the output vectors (10 f32 and 1 u8 per token,
    /// 3 values per response) plus, for forward + backward, the `[N, V]` gradient. No `[N, V]`
    /// temporary is made by the kernels; the CPU reference does hold one f64 row at a time.
    pub model_extra_bytes_forward: u64,
    /// As `model_extra_bytes_forward`, plus the gradient buffer.
    pub model_extra_bytes_forward_backward: u64,
    /// True when the timed calls copy the [N, V] logits or gradient between host and device. Always
    /// false now: on cuda the batch is uploaded once before the timings and the gradient stays on the
    /// GPU (the timed calls still copy the O(N + B) small tensors and outputs; see the module docs).
    pub includes_host_device_copies: bool,
}

/// Reads a decimal `kB` field (`VmRSS`, `VmHWM`) of /proc/self/status, in bytes.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// Resets the peak resident set (VmHWM) to the current resident set; false where Linux refuses.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Measures the host peak of `f` beyond the resident set at its start (None where not measurable).
fn with_peak<R>(f: impl FnOnce() -> Result<R>) -> Result<(R, Option<u64>)> {
    let armed = reset_peak_rss();
    let base = proc_status_bytes("VmRSS");
    let r = f()?;
    let peak = proc_status_bytes("VmHWM");
    let extra = match (armed, base, peak) {
        (true, Some(b), Some(p)) => Some(p.saturating_sub(b)),
        _ => None,
    };
    Ok((r, extra))
}

/// The machine's memory in bytes (`MemTotal` of /proc/meminfo; None where not readable).
fn machine_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    info.lines().find_map(|line| {
        let kb: u64 = line
            .strip_prefix("MemTotal:")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        kb.checked_mul(1024)
    })
}

/// SplitMix64: a small, fast generator whose streams are cheap to seed per row, so a synthetic batch
/// is the same whatever the number of threads that made it.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64, stream: u64) -> SplitMix64 {
        let mut g = SplitMix64(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        g.next();
        g
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Roughly standard normal: the sum of four 16-bit uniforms (Irwin-Hall), centred and scaled to
    /// variance 1. Cheap enough for 10^10 draws; the tails are bounded at +-3.46.
    fn normalish(&mut self) -> f32 {
        let x = self.next();
        let s = (x & 0xFFFF) + ((x >> 16) & 0xFFFF) + ((x >> 32) & 0xFFFF) + (x >> 48);
        // four U(0,1) summed: mean 2, variance 1/3
        ((s as f32 / 65536.0) - 2.0) * 1.732_050_8
    }
}

/// One synthetic row pair and its target, rounded to the dtype; returns old_logp for the row.
///
/// logits = 2 z (z roughly standard normal); logits_masked = logits + eps_t z' with eps_t uniform in
/// [0, 1.5) per token, so the per-token KL (the score) varies across tokens and the top-k mask is not
/// decided by ties; the target is uniform; old_logp is the row's own logp (computed from the rounded
/// values) plus a uniform offset in [-0.3, 0.3], so ratios fall on both sides of the clip range.
fn synthetic_row(
    seed: u64,
    t: usize,
    vocab: usize,
    round: fn(f32) -> f32,
    a: &mut [f32],
    b: &mut [f32],
) -> (i32, f32) {
    let mut g = SplitMix64::new(seed, t as u64);
    let eps = 1.5 * g.uniform() as f32;
    let y = (g.next() % vocab as u64) as usize;
    let shift = (0.6 * g.uniform() - 0.3) as f32;
    let mut m = f32::NEG_INFINITY;
    for (av, bv) in a.iter_mut().zip(b.iter_mut()) {
        let x = round(2.0 * g.normalish());
        *av = x;
        *bv = round(x + eps * g.normalish());
        m = m.max(x);
    }
    let s: f64 = a.iter().map(|&x| ((x - m) as f64).exp()).sum();
    let logp = a[y] as f64 - (m as f64 + s.ln());
    (y as i32, (logp + shift as f64) as f32)
}

/// A random batch (see [`synthetic_row`]), made on every core; the same for a given spec and seed.
///
/// The memory it needs (two f32 [N, V] rows sets while generating, then the two tensors in the
/// dtype) is checked before anything is allocated: against the address space, and against the
/// machine's memory (`MemTotal` of /proc/meminfo, where there is one). An impossible size is an
/// error, never an allocation that aborts the process.
pub fn synthetic_batch(spec: &SyntheticSpec, seed: u64) -> Result<OwnedBatch> {
    let (n, v, nb) = (spec.n_tokens, spec.vocab, spec.n_responses);
    let too_big = |expected| VppoError::Config {
        field: "synthetic",
        value: format!("{n},{v},{nb},{}", spec.dtype.name()),
        expected,
    };
    let nv = n
        .checked_mul(v)
        .ok_or_else(|| too_big("N * V within the address space"))?;
    let bytes = nv
        .checked_mul(2 * 4 + 2 * spec.dtype.size())
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| too_big("N * V * (8 + 2 * dtype size) bytes within the address space"))?;
    if let Some(total) = machine_memory_bytes() {
        if bytes as u64 > total {
            return Err(too_big(
                "a batch that fits in this machine's memory (N * V * (8 + 2 * dtype size) bytes \
                 to generate, at most MemTotal)",
            ));
        }
    }
    let round: fn(f32) -> f32 = match spec.dtype {
        Dtype::F32 => |x| x,
        Dtype::F16 => |x| f16::from_f32(x).to_f32(),
        Dtype::Bf16 => |x| bf16::from_f32(x).to_f32(),
    };
    let zeros = |len: usize| -> Result<Vec<f32>> {
        let mut x = Vec::new();
        x.try_reserve_exact(len)
            .map_err(|_| too_big("a batch whose logits can be allocated"))?;
        x.resize(len, 0.0);
        Ok(x)
    };
    let mut a = zeros(nv)?;
    let mut b = zeros(nv)?;
    let mut targets = vec![0i32; n];
    let mut old_logp = vec![0.0f32; n];
    if n > 0 {
        let threads = std::thread::available_parallelism().map_or(1, |c| c.get());
        let rows_per = n.div_ceil(threads);
        std::thread::scope(|scope| {
            for (chunk, (((ac, bc), tc), oc)) in a
                .chunks_mut(rows_per * v)
                .zip(b.chunks_mut(rows_per * v))
                .zip(targets.chunks_mut(rows_per))
                .zip(old_logp.chunks_mut(rows_per))
                .enumerate()
            {
                scope.spawn(move || {
                    for (i, ((ar, br), (tv, ov))) in ac
                        .chunks_mut(v)
                        .zip(bc.chunks_mut(v))
                        .zip(tc.iter_mut().zip(oc.iter_mut()))
                        .enumerate()
                    {
                        let (y, old) = synthetic_row(seed, chunk * rows_per + i, v, round, ar, br);
                        *tv = y;
                        *ov = old;
                    }
                });
            }
        });
    }
    let mut g = SplitMix64::new(seed, u64::MAX);
    let advantages: Vec<f32> = (0..nb).map(|_| (2.0 * g.uniform() - 1.0) as f32).collect();
    // N split as evenly as possible: the first N % B responses get one more token
    let mut cu_seqlens = Vec::with_capacity(nb + 1);
    cu_seqlens.push(0i32);
    for r in 0..nb {
        let len = n / nb + usize::from(r < n % nb);
        cu_seqlens.push(cu_seqlens[r] + len as i32);
    }
    let to_dtype = |x: Vec<f32>| match spec.dtype {
        Dtype::F32 => OwnedLogits::F32(x),
        Dtype::F16 => OwnedLogits::F16(x.into_iter().map(f16::from_f32).collect()),
        Dtype::Bf16 => OwnedLogits::Bf16(x.into_iter().map(bf16::from_f32).collect()),
    };
    Ok(OwnedBatch {
        logits: to_dtype(a),
        logits_masked: to_dtype(b),
        targets,
        old_logp,
        advantages,
        cu_seqlens,
        vocab: v,
        ref_logp: None,
        ref_logits: None,
    })
}

/// An [N, V] tensor in GPU memory ([`DeviceTensor`]): the uploaded logits, or a gradient buffer.
impl DeviceTensor {
    fn upload(gpu: &Gpu, logits: &Logits) -> Result<DeviceTensor> {
        Ok(match *logits {
            Logits::F32(x) => DeviceTensor::F32(gpu.upload(x)?),
            Logits::F16(x) => DeviceTensor::F16(gpu.upload(x)?),
            Logits::Bf16(x) => DeviceTensor::Bf16(gpu.upload(x)?),
        })
    }

    /// A zeroed gradient buffer for `--grad` (f32, or the logits dtype).
    fn grad(gpu: &Gpu, grad: GradArg, logits: Dtype, len: usize) -> Result<DeviceTensor> {
        Ok(match (grad, logits) {
            (GradArg::LogitsDtype, Dtype::F16) => DeviceTensor::F16(gpu.alloc_zeros(len)?),
            (GradArg::LogitsDtype, Dtype::Bf16) => DeviceTensor::Bf16(gpu.alloc_zeros(len)?),
            _ => DeviceTensor::F32(gpu.alloc_zeros(len)?),
        })
    }
}

/// A host batch copied to the GPU once (on the GPU's own stream), lent as a [`DeviceBatch`]: what
/// `vppo bench --device cuda` times, and what the GPU tests feed the device-resident API.
pub struct UploadedBatch {
    logits: DeviceTensor,
    logits_masked: DeviceTensor,
    targets: CudaSlice<i32>,
    old_logp: CudaSlice<f32>,
    advantages: CudaSlice<f32>,
    cu_seqlens: CudaSlice<i32>,
    vocab: usize,
}

impl UploadedBatch {
    /// Every tensor must be non-empty (N >= 1 and B >= 1; CUDA has no buffers of 0 bytes).
    pub fn new(gpu: &Gpu, batch: &Batch) -> Result<UploadedBatch> {
        Ok(UploadedBatch {
            logits: DeviceTensor::upload(gpu, &batch.logits)?,
            logits_masked: DeviceTensor::upload(gpu, &batch.logits_masked)?,
            targets: gpu.upload(batch.targets)?,
            old_logp: gpu.upload(batch.old_logp)?,
            advantages: gpu.upload(batch.advantages)?,
            cu_seqlens: gpu.upload(batch.cu_seqlens)?,
            vocab: batch.vocab,
        })
    }

    /// The device batch, borrowing these buffers.
    pub fn batch(&self) -> DeviceBatch<'_> {
        DeviceBatch {
            logits: self.logits.view(),
            logits_masked: self.logits_masked.view(),
            targets: &self.targets,
            old_logp: &self.old_logp,
            advantages: &self.advantages,
            cu_seqlens: &self.cu_seqlens,
            vocab: self.vocab,
            ref_logp: None,
            rows: None,
            masked_rows: None,
            ref_logits: None,
        }
    }
}

/// Runs `f` `warmup` times untimed, then `iters` times timed; returns the samples in ms.
fn time_calls(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        f()?;
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Timing::from_samples(samples))
}

/// Times an already loaded batch (see the module docs). `source` and `load_ms` are copied into the
/// report.
pub fn bench_batch(
    vppo: &Vppo,
    batch: &Batch,
    args: &BenchArgs,
    source: String,
    load_ms: f64,
) -> Result<BenchReport> {
    if args.iters == 0 {
        return Err(VppoError::Config {
            field: "iters",
            value: "0".into(),
            expected: "at least 1",
        });
    }
    let (n, b, v) = (batch.n_tokens(), batch.n_responses(), batch.vocab);
    let dtype = batch.logits.dtype();
    let grad_elem = match args.grad {
        GradArg::F32 => 4,
        GradArg::LogitsDtype => dtype.size(),
        GradArg::None => 0,
    };
    let outputs_bytes = (n * (10 * 4 + 1) + b * 3 * 4) as u64;

    let mut loss = 0.0;
    // The GPU-resident path needs non-empty device buffers; a batch with N = 0 is answered on the CPU
    // by every API (no copies either way).
    let on_gpu = match vppo.device() {
        Device::Cuda(ordinal) if n > 0 => {
            batch.validate(vppo.config())?;
            Some(Gpu::new(ordinal)?)
        }
        _ => None,
    };
    let ((forward, peak_fwd), (forward_backward, peak_fwd_bwd)) = match on_gpu {
        None => {
            let fwd = with_peak(|| {
                time_calls(args.warmup, args.iters, || {
                    loss = vppo.forward(batch)?.loss;
                    Ok(())
                })
            })?;
            let fwd_bwd = if args.grad == GradArg::None {
                (None, None)
            } else {
                let (t, peak) = with_peak(|| {
                    let grad_dtype = match args.grad {
                        GradArg::LogitsDtype => dtype,
                        _ => Dtype::F32,
                    };
                    let mut grad = OwnedLogits::zeros(grad_dtype, n * v)?;
                    time_calls(args.warmup, args.iters, || {
                        let out = vppo.forward(batch)?;
                        vppo.backward_into(batch, &out, grad.as_grad_mut())
                    })
                })?;
                (Some(t), peak)
            };
            (fwd, fwd_bwd)
        }
        Some(gpu) => {
            // Uploaded once, outside every timing.
            let uploaded = UploadedBatch::new(&gpu, batch)?;
            let db = uploaded.batch();
            let fwd = with_peak(|| {
                time_calls(args.warmup, args.iters, || {
                    loss = vppo.forward_device(&db)?.output.loss;
                    Ok(())
                })
            })?;
            let fwd_bwd = if args.grad == GradArg::None {
                (None, None)
            } else {
                let mut grad = DeviceTensor::grad(&gpu, args.grad, dtype, n * v)?;
                let (t, peak) = with_peak(|| {
                    time_calls(args.warmup, args.iters, || {
                        let out = vppo.forward_device(&db)?;
                        vppo.backward_device(&out, &db, grad.as_mut())
                    })
                })?;
                (Some(t), peak)
            };
            (fwd, fwd_bwd)
        }
    };
    let measured = peak_fwd.is_some();
    Ok(BenchReport {
        n_tokens: n,
        n_responses: b,
        vocab: v,
        dtype: dtype.name(),
        device: args.options.device.name(),
        grad: args.grad.name(),
        warmup: args.warmup,
        iters: args.iters,
        source,
        load_ms,
        input_bytes: 2 * (n * v * dtype.size()) as u64,
        loss,
        forward,
        forward_backward,
        peak_extra_bytes_forward: peak_fwd,
        peak_extra_bytes_forward_backward: peak_fwd_bwd,
        memory_method: if measured {
            "host VmHWM after a clear_refs reset minus VmRSS before (Linux /proc/self)"
        } else {
            "not measured (no /proc/self/clear_refs)"
        },
        model_extra_bytes_forward: outputs_bytes,
        model_extra_bytes_forward_backward: outputs_bytes + (n * v * grad_elem) as u64,
        includes_host_device_copies: false,
    })
}

/// Runs `vppo bench`: builds the [`Vppo`], loads or generates the batch (timed apart, as `load_ms`),
/// then times it ([`bench_batch`]).
pub fn run_bench(args: &BenchArgs) -> Result<BenchReport> {
    let vppo = Vppo::new(args.options.config(), args.options.device.device())?;
    let start = Instant::now();
    let (owned, source) = match (&args.input, &args.synthetic) {
        (Some(path), _) => (io::read_batch(path)?, path.display().to_string()),
        (None, Some(spec)) => (
            synthetic_batch(spec, args.seed)?,
            format!(
                "synthetic:{},{},{},{},seed={}",
                spec.n_tokens,
                spec.vocab,
                spec.n_responses,
                spec.dtype.name(),
                args.seed
            ),
        ),
        (None, None) => {
            return Err(VppoError::Io(
                "vppo bench needs --input FILE or --synthetic N,V,B,DTYPE".into(),
            ))
        }
    };
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    bench_batch(&vppo, &owned.batch(), args, source, load_ms)
}

/// The report as a few lines of text.
pub fn format_text(r: &BenchReport) -> String {
    let mib = |x: Option<u64>| {
        x.map_or("n/a".to_string(), |b| {
            format!("{:.1} MiB", b as f64 / 1048576.0)
        })
    };
    let mut s = format!(
        "vppo bench: N = {}, B = {}, V = {}, {} on {} ({}), {} warmup + {} timed iterations; load {:.1} ms (not timed)\n",
        r.n_tokens, r.n_responses, r.vocab, r.dtype, r.device, r.source, r.warmup, r.iters, r.load_ms
    );
    s += &format!(
        "forward:            median {:.3} ms, min {:.3} ms; peak extra host memory {}\n",
        r.forward.median_ms,
        r.forward.min_ms,
        mib(r.peak_extra_bytes_forward)
    );
    if let Some(t) = &r.forward_backward {
        s += &format!(
            "forward + backward: median {:.3} ms, min {:.3} ms; peak extra host memory {} (grad {})\n",
            t.median_ms,
            t.min_ms,
            mib(r.peak_extra_bytes_forward_backward),
            r.grad
        );
    }
    s += &format!("loss {}", r.loss);
    s
}
