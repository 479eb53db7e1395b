//! A random packed-batch generator shared by the integration tests (and by the kernel tests).
//!
//! Use from a test file with `mod common;` then either
//!
//! ```ignore
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
//! let owned = common::random_batch(&mut rng, &common::BatchSpec::default());
//! let batch = owned.batch();
//! ```
//!
//! or, in a proptest, `common::batch_strategy(spec)` (a seed drawn by proptest drives the generator,
//! so a failure is reproduced by its seed; shrinking only shrinks the seed).
//!
//! What a batch holds: B = G * groups responses with lengths drawn from 0..=max_len (empty and
//! one-token responses are made often on purpose), logits on a grid of 1/256 in [-8, 8] (so adding a
//! small integer to a row is exact in f32), `logits_masked` a perturbed copy (sometimes equal, sometimes
//! with -inf entries), old_logp near the current logp (ratios on both sides of the clip range) and
//! advantages of both signs (and some 0). With `ties`, rows repeat within a response, so scores tie.
#![allow(dead_code)]

pub mod fake_cuda;
pub mod fake_nccl;

use half::{bf16, f16};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vppo::{Dtype, OwnedBatch, OwnedLogits};

/// What [`random_batch`] draws.
#[derive(Debug, Clone)]
pub struct BatchSpec {
    /// Range of V (inclusive).
    pub vocab: (usize, usize),
    /// Range of the number of groups (inclusive).
    pub groups: (usize, usize),
    /// G: responses per group.
    pub group_size: usize,
    /// Longest response.
    pub max_len: usize,
    /// Dtype of both logits tensors (f32 values are rounded to it).
    pub dtype: Dtype,
    /// Probability of a -inf entry (never at the target of `logits`; anywhere in `logits_masked`).
    pub neg_inf_prob: f64,
    /// Probability that a `logits_masked` row equals its `logits` row.
    pub equal_row_prob: f64,
    /// Repeat rows within a response so that scores tie.
    pub ties: bool,
    /// Scale of old_logp - logp, drawn uniformly in [-x, x].
    pub log_ratio_spread: f64,
}

impl Default for BatchSpec {
    fn default() -> Self {
        BatchSpec {
            vocab: (1, 9),
            groups: (1, 3),
            group_size: 2,
            max_len: 7,
            dtype: Dtype::F32,
            neg_inf_prob: 0.05,
            equal_row_prob: 0.1,
            ties: false,
            log_ratio_spread: 0.6,
        }
    }
}

fn logsumexp(row: &[f64]) -> f64 {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

fn to_dtype(x: Vec<f32>, dtype: Dtype) -> OwnedLogits {
    match dtype {
        Dtype::F32 => OwnedLogits::F32(x),
        Dtype::F16 => OwnedLogits::F16(x.into_iter().map(f16::from_f32).collect()),
        Dtype::Bf16 => OwnedLogits::Bf16(x.into_iter().map(bf16::from_f32).collect()),
    }
}

/// A random valid batch (see the module docs).
pub fn random_batch(rng: &mut impl Rng, spec: &BatchSpec) -> OwnedBatch {
    let v = rng.gen_range(spec.vocab.0..=spec.vocab.1);
    let g = spec.group_size.max(1);
    let b_count = g * rng.gen_range(spec.groups.0..=spec.groups.1);
    let mut cu = vec![0i32];
    for _ in 0..b_count {
        let len = match rng.gen_range(0..6) {
            0 => 0,
            1 => 1,
            _ => rng.gen_range(0..=spec.max_len),
        };
        cu.push(cu.last().unwrap() + len as i32);
    }
    let n = *cu.last().unwrap() as usize;
    let grid = |rng: &mut dyn rand::RngCore| (rng.gen_range(-2048i32..=2048) as f32) / 256.0;
    let mut logits = Vec::with_capacity(n * v);
    let mut masked = Vec::with_capacity(n * v);
    let mut targets = Vec::with_capacity(n);
    for b in 0..b_count {
        let (start, end) = (cu[b] as usize, cu[b + 1] as usize);
        for t in start..end {
            if spec.ties && t > start && rng.gen_bool(0.5) {
                // repeat an earlier row of this response (logits, masked and target), so scores tie
                let s = rng.gen_range(start..t);
                logits.extend_from_within(s * v..(s + 1) * v);
                masked.extend_from_within(s * v..(s + 1) * v);
                targets.push(targets[s]);
                continue;
            }
            let y = rng.gen_range(0..v);
            targets.push(y as i32);
            let row: Vec<f32> = (0..v)
                .map(|i| {
                    if i != y && rng.gen_bool(spec.neg_inf_prob) {
                        f32::NEG_INFINITY
                    } else {
                        grid(rng)
                    }
                })
                .collect();
            let equal = rng.gen_bool(spec.equal_row_prob);
            let mrow: Vec<f32> = row
                .iter()
                .map(|&x| {
                    if equal {
                        x
                    } else if rng.gen_bool(spec.neg_inf_prob) {
                        f32::NEG_INFINITY
                    } else if x == f32::NEG_INFINITY {
                        grid(rng)
                    } else {
                        x + (rng.gen_range(-256i32..=256) as f32) / 256.0
                    }
                })
                .collect();
            let mrow = if mrow.iter().all(|x| *x == f32::NEG_INFINITY) {
                row.clone()
            } else {
                mrow
            };
            logits.extend_from_slice(&row);
            masked.extend_from_slice(&mrow);
        }
    }
    let logits = to_dtype(logits, spec.dtype);
    let masked = to_dtype(masked, spec.dtype);
    // old_logp: the current logp (of the rounded logits) plus a spread, so ratios fall on both sides
    let wide = logits.to_f32();
    let old_logp = (0..n)
        .map(|t| {
            let row: Vec<f64> = wide[t * v..(t + 1) * v].iter().map(|&x| x as f64).collect();
            let logp = row[targets[t] as usize] - logsumexp(&row);
            (logp + rng.gen_range(-spec.log_ratio_spread..=spec.log_ratio_spread)) as f32
        })
        .collect();
    let advantages = (0..b_count)
        .map(|_| {
            if rng.gen_bool(0.15) {
                0.0
            } else {
                rng.gen_range(-2.0f32..2.0)
            }
        })
        .collect();
    OwnedBatch {
        logits,
        logits_masked: masked,
        targets,
        old_logp,
        advantages,
        cu_seqlens: cu,
        vocab: v,
        ref_logp: None,
        ref_logits: None,
    }
}

/// A random batch from a seed.
pub fn seeded_batch(seed: u64, spec: &BatchSpec) -> OwnedBatch {
    random_batch(&mut ChaCha8Rng::seed_from_u64(seed), spec)
}

/// A proptest strategy of random batches drawn with `spec`.
pub fn batch_strategy(spec: BatchSpec) -> impl Strategy<Value = OwnedBatch> {
    any::<u64>().prop_map(move |seed| seeded_batch(seed, &spec))
}

/// How a child run of this test binary ended ([`run_this_binary`]).
pub struct ChildRun {
    /// The exit status; None when it was killed for running over its time limit.
    pub status: Option<std::process::ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl ChildRun {
    /// Both outputs, for a failure message.
    pub fn text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs this test binary again in a child process with the extra environment `envs` and the libtest
/// arguments `args`, and kills it after `limit` (a watchdog: a deadlock fails the caller instead of
/// hanging CI). For tests that must run where a crash or a different process setup is expected.
pub fn run_this_binary(
    envs: &[(&str, &str)],
    args: &[&str],
    limit: std::time::Duration,
) -> ChildRun {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let tag = format!(
        "vppo-child-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    );
    let dir = std::env::temp_dir();
    let (out_path, err_path) = (
        dir.join(format!("{tag}.out")),
        dir.join(format!("{tag}.err")),
    );
    // Output goes to files, not pipes: a pipe that nobody reads while we wait could fill and block
    // the child.
    let mut child = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .envs(envs.iter().copied())
        .args(args)
        .stdout(std::fs::File::create(&out_path).expect("a file for the child's stdout"))
        .stderr(std::fs::File::create(&err_path).expect("a file for the child's stderr"))
        .spawn()
        .expect("running the test binary again");
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let run = ChildRun {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
    };
    let _ = (
        std::fs::remove_file(&out_path),
        std::fs::remove_file(&err_path),
    );
    run
}

/// The executors under test: GPU 0 when VPPO_TEST_DEVICE=cuda; GPU 0 of the fake CUDA driver (the
/// SIMT executor behind the driver API, see tests/common/fake_cuda.rs) when it is `fake-cuda`; else the
/// SIMT executor in both orders.
pub fn devices() -> Vec<vppo::Device> {
    match std::env::var("VPPO_TEST_DEVICE").as_deref() {
        Ok("cuda") => vec![vppo::Device::Cuda(0)],
        Ok(fake_cuda::MODE) => {
            fake_cuda::install();
            vec![vppo::Device::Cuda(0)]
        }
        _ => vec![
            vppo::Device::Simt(vppo::LaneOrder::Forward),
            vppo::Device::Simt(vppo::LaneOrder::Reverse),
        ],
    }
}

/// Runs `f(rank, group)` on one thread per rank of a `ThreadGroup` of `size` (src/parallel/) and
/// returns the results in rank order; a rank that has not returned after 60 s fails the test (a
/// hang, not a slow run: each call is milliseconds).
pub fn on_ranks<T: Send + 'static>(
    size: usize,
    f: impl Fn(usize, &vppo::ThreadGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = std::sync::Arc::new(f);
    let (tx, rx) = std::sync::mpsc::channel();
    for (rank, g) in vppo::ThreadGroup::new(size)
        .unwrap()
        .into_iter()
        .enumerate()
    {
        let (f, tx) = (f.clone(), tx.clone());
        std::thread::spawn(move || {
            let r = f(rank, &g);
            tx.send((rank, r)).unwrap();
        });
    }
    let mut out: Vec<Option<T>> = (0..size).map(|_| None).collect();
    for _ in 0..size {
        let (rank, r) = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a rank hangs: no result within 60 s");
        out[rank] = Some(r);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Responses [b0, b1) of `full` as a batch of their own, and of their logits rows the columns
/// [c0, c1) only (a data-parallel piece, a vocabulary shard, or both).
pub fn part(full: &OwnedBatch, b0: usize, b1: usize, c0: usize, c1: usize) -> OwnedBatch {
    let (t0, t1) = (full.cu_seqlens[b0] as usize, full.cu_seqlens[b1] as usize);
    let v = full.vocab;
    fn cut<T: Copy>(x: &[T], rows: (usize, usize), v: usize, cols: (usize, usize)) -> Vec<T> {
        x[rows.0 * v..rows.1 * v]
            .chunks(v)
            .flat_map(|r| r[cols.0..cols.1].to_vec())
            .collect()
    }
    let rows = |l: &OwnedLogits| match l {
        OwnedLogits::F32(x) => OwnedLogits::F32(cut(x, (t0, t1), v, (c0, c1))),
        OwnedLogits::F16(x) => OwnedLogits::F16(cut(x, (t0, t1), v, (c0, c1))),
        OwnedLogits::Bf16(x) => OwnedLogits::Bf16(cut(x, (t0, t1), v, (c0, c1))),
    };
    OwnedBatch {
        logits: rows(&full.logits),
        logits_masked: rows(&full.logits_masked),
        targets: full.targets[t0..t1].to_vec(),
        old_logp: full.old_logp[t0..t1].to_vec(),
        advantages: full.advantages[b0..b1].to_vec(),
        cu_seqlens: full.cu_seqlens[b0..=b1]
            .iter()
            .map(|&c| c - t0 as i32)
            .collect(),
        vocab: c1 - c0,
        ref_logp: full.ref_logp.as_ref().map(|r| r[t0..t1].to_vec()),
        ref_logits: full.ref_logits.as_ref().map(rows),
    }
}

/// Tokens [t0, t1) of `full` as a rank's pieces, and whether its first piece continues a response
/// begun on an earlier rank.
pub fn pieces(full: &OwnedBatch, t0: usize, t1: usize) -> (OwnedBatch, bool) {
    let v = full.vocab;
    let rows = |l: &OwnedLogits| match l {
        OwnedLogits::F32(x) => OwnedLogits::F32(x[t0 * v..t1 * v].to_vec()),
        OwnedLogits::F16(x) => OwnedLogits::F16(x[t0 * v..t1 * v].to_vec()),
        OwnedLogits::Bf16(x) => OwnedLogits::Bf16(x[t0 * v..t1 * v].to_vec()),
    };
    let (mut cu, mut adv, mut continues) = (vec![0i32], vec![], false);
    for (b, w) in full.cu_seqlens.windows(2).enumerate() {
        let (s, e) = (w[0] as usize, w[1] as usize);
        // a response is here when it overlaps [t0, t1), or is empty and starts in it (or at the
        // end of the batch, on the last rank)
        let last = t1 == full.targets.len();
        let here = if s == e {
            s >= t0 && (s < t1 || (last && s == t1))
        } else {
            s < t1 && e > t0
        };
        if !here {
            continue;
        }
        if s < t0 && adv.is_empty() {
            continues = true;
        }
        cu.push((e.min(t1) - t0) as i32);
        adv.push(full.advantages[b]);
    }
    let batch = OwnedBatch {
        logits: rows(&full.logits),
        logits_masked: rows(&full.logits_masked),
        targets: full.targets[t0..t1].to_vec(),
        old_logp: full.old_logp[t0..t1].to_vec(),
        advantages: adv,
        cu_seqlens: cu,
        vocab: v,
        ref_logp: full.ref_logp.as_ref().map(|r| r[t0..t1].to_vec()),
        ref_logits: full.ref_logits.as_ref().map(rows),
    };
    (batch, continues)
}

/// A compact (f32) batch spread over bigger tensors: `logits` [R, V] with the token rows at strictly
/// increasing random positions (the rest filled with junk, NaN included: a row no token reads is
/// never read), and `logits_masked` [R', V] with the token rows at a random permutation.
pub struct Spread {
    pub logits: Vec<f32>,
    pub masked: Vec<f32>,
    pub rows: Vec<i64>,
    pub masked_rows: Vec<i64>,
    pub r: usize,
}

pub fn spread(owned: &OwnedBatch, rng: &mut impl Rng) -> Spread {
    let v = owned.vocab;
    let n = owned.targets.len();
    let a = owned.logits.to_f32();
    let b = owned.logits_masked.to_f32();
    let mut rows = Vec::with_capacity(n);
    let mut next = 0i64;
    for _ in 0..n {
        next += rng.gen_range(1..4);
        rows.push(next - 1);
    }
    let r = next as usize + rng.gen_range(0..3);
    let junk = |rng: &mut dyn rand::RngCore, i: usize| {
        if i % 7 == 3 {
            f32::NAN
        } else {
            rng.gen_range(-30.0f32..30.0)
        }
    };
    let mut logits: Vec<f32> = (0..r * v).map(|i| junk(rng, i)).collect();
    for (t, &row) in rows.iter().enumerate() {
        logits[row as usize * v..(row as usize + 1) * v].copy_from_slice(&a[t * v..(t + 1) * v]);
    }
    let r2 = n + 2;
    let mut perm: Vec<usize> = (0..r2).collect();
    for i in (1..r2).rev() {
        perm.swap(i, rng.gen_range(0..=i));
    }
    let masked_rows: Vec<i64> = perm[..n].iter().map(|&p| p as i64).collect();
    let mut masked: Vec<f32> = (0..r2 * v).map(|i| junk(rng, i)).collect();
    for (t, &row) in masked_rows.iter().enumerate() {
        masked[row as usize * v..(row as usize + 1) * v].copy_from_slice(&b[t * v..(t + 1) * v]);
    }
    Spread {
        logits,
        masked,
        rows,
        masked_rows,
        r,
    }
}
