//! Vocabulary parallel VPPO (SPEC section 11): rank r of a group holds columns [v_r, v_r + V_r) of
//! both logits tensors (as Megatron shards the output layer); the shards tile [0, V) in rank order,
//! and targets are global ids.
//!
//! Per call, on every rank:
//! 1. pass 1 over the shard in partial mode: per row the shard's online-softmax state (max, sums,
//!    the kl = +inf flag, the target's two logits when its column is here), from the perception
//!    kernel (`partial` mode, kernels/perception.cu) or, on the reference device, in f64 here;
//! 2. local checks (a NaN or +inf in this shard, a logit over f32 after the temperature), then
//!    round 1, reached by every rank: an all-reduce of 1 + 6 values (failures; N, V and the config
//!    fingerprint, each with its negative, so that every rank sees whether they agree), then an
//!    all-gather of each rank's (v_r, V_r, V, N, a fingerprint of its small tensors) to check that
//!    the shards tile [0, V) and that every rank holds the same tokens;
//! 3. an all-gather of the states, 9 f64 per row (9 N per rank), merged in rank order in f64 on
//!    the host, so every rank gets bit-identical per-token values, checks the merged rows (all -inf,
//!    the target at -inf) alike, and runs pass 2 (mask, shaping, loss) alike: the reference's pass 2
//!    in f64, O(N + B).
//!
//! The backward ([`Vppo::backward_vocab_parallel`]) writes each rank's own columns from the merged
//! lse: g_t (1[v_r + v = y_t] - p_v) / tau, with the backward kernel (shard-local targets) or the
//! reference. Tests: tests/vocab_parallel.rs.

use super::{report_failure, round_one, Collective};
use crate::api::Vppo;
use crate::batch::Batch;
use crate::config::{Perception, VppoConfig};
use crate::device::Device;
use crate::error::{Location, Result, Tensor, VppoError};
use crate::output::VppoOutput;
use crate::reference::surrogate::LOG_RATIO_CLAMP;
use crate::reference::PerceptionF64;
use crate::tensor::GradMut;

/// Which columns of the vocabulary a rank holds: [start, start + the batch's V) of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabShard {
    /// The shard's first column, v_r.
    pub start: usize,
    /// The whole vocabulary, V.
    pub total: usize,
}

/// Values per row of a shard's state: m_a, s_a, e_a, f_b, m_b, s_b, flags, a_y, b_y.
const STATE: usize = crate::params::VPPO_PARTIAL_STATE_FLOATS as usize;
const KL_INF: u32 = 1;
const HAS_TARGET: u32 = crate::params::VPPO_PARTIAL_HAS_TARGET;

/// One row's state over a shard, in natural units (logits / tau): with e_v = exp(a_v - m_a),
/// s_a = sum e_v, e_a = sum e_v (a_v - m_a), f_b = sum e_v (b_v - m_b) over v with a_v and b_v above
/// -inf, s_b = sum exp(b_v - m_b); m = -inf and the sums 0 for a shard row that is all -inf.
#[derive(Debug, Clone, Copy)]
struct RowState {
    m_a: f64,
    s_a: f64,
    e_a: f64,
    f_b: f64,
    m_b: f64,
    s_b: f64,
    flags: u32,
    a_y: f64,
    b_y: f64,
}

impl RowState {
    fn to_array(self) -> [f64; STATE] {
        [
            self.m_a,
            self.s_a,
            self.e_a,
            self.f_b,
            self.m_b,
            self.s_b,
            self.flags as f64,
            self.a_y,
            self.b_y,
        ]
    }

    fn from_slice(x: &[f64]) -> RowState {
        RowState {
            m_a: x[0],
            s_a: x[1],
            e_a: x[2],
            f_b: x[3],
            m_b: x[4],
            s_b: x[5],
            flags: x[6] as u32,
            a_y: x[7],
            b_y: x[8],
        }
    }

    /// A state of the kernel (raw logit units, f32) in natural units: the maxima, e_a, f_b and the
    /// target's logits divided by tau (the sums s_a, s_b are the same numbers).
    fn from_kernel(x: &[f32], tau: f64) -> RowState {
        let w = |i: usize| x[i] as f64;
        RowState {
            m_a: w(0) / tau,
            s_a: w(1),
            e_a: w(2) / tau,
            f_b: w(3) / tau,
            m_b: w(4) / tau,
            s_b: w(5),
            flags: x[6] as u32,
            a_y: w(7) / tau,
            b_y: w(8) / tau,
        }
    }

    /// The state of one shard row in f64 (the reference device): `a`, `b` already divided by tau,
    /// `y` the shard-local target.
    fn of_rows(a: &[f64], b: &[f64], y: i64) -> RowState {
        let bad = |x: &f64| x.is_nan() || *x == f64::INFINITY;
        let max = |r: &[f64]| r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (m_a, m_b) = (max(a), max(b));
        let (mut s_a, mut e_a, mut f_b, mut s_b, mut flags) = (0.0, 0.0, 0.0, 0.0, 0u32);
        for (&av, &bv) in a.iter().zip(b) {
            if av != f64::NEG_INFINITY {
                let e = (av - m_a).exp();
                s_a += e;
                e_a += e * (av - m_a);
                if bv == f64::NEG_INFINITY {
                    flags |= KL_INF;
                } else {
                    f_b += e * (bv - m_b);
                }
            }
            if bv != f64::NEG_INFINITY {
                s_b += (bv - m_b).exp();
            }
        }
        // a NaN or +inf poisons the sums, as in the kernel (the local checks name it)
        if a.iter().any(bad) {
            s_a = f64::NAN;
        }
        if b.iter().any(bad) {
            s_b = f64::NAN;
        }
        let here = y >= 0 && (y as usize) < a.len();
        RowState {
            m_a,
            s_a,
            e_a,
            f_b,
            m_b,
            s_b,
            flags: flags | if here { HAS_TARGET } else { 0 },
            a_y: if here { a[y as usize] } else { 0.0 },
            b_y: if here { b[y as usize] } else { 0.0 },
        }
    }
}

/// The merged state of one row, in rank order: each shard's sums moved to the common maxima.
struct Merged {
    m_a: f64,
    s_a: f64,
    e_a: f64,
    f_b: f64,
    m_b: f64,
    s_b: f64,
    kl_inf: bool,
    target: Option<(f64, f64)>,
}

fn merge(states: impl Iterator<Item = RowState> + Clone) -> Merged {
    let m_a = states
        .clone()
        .map(|s| s.m_a)
        .fold(f64::NEG_INFINITY, f64::max);
    let m_b = states
        .clone()
        .map(|s| s.m_b)
        .fold(f64::NEG_INFINITY, f64::max);
    let mut m = Merged {
        m_a,
        s_a: 0.0,
        e_a: 0.0,
        f_b: 0.0,
        m_b,
        s_b: 0.0,
        kl_inf: false,
        target: None,
    };
    for s in states {
        m.kl_inf |= s.flags & KL_INF != 0;
        if s.flags & HAS_TARGET != 0 {
            m.target = Some((s.a_y, s.b_y));
        }
        if s.s_a > 0.0 {
            // e^(m_r - M) moves this shard's a-side sums to the common maximum
            let w = (s.m_a - m_a).exp();
            m.s_a += w * s.s_a;
            m.e_a += w * (s.e_a + (s.m_a - m_a) * s.s_a);
            if s.s_b > 0.0 {
                m.f_b += w * (s.f_b + (s.m_b - m_b) * s.s_a);
            }
        }
        if s.s_b > 0.0 {
            m.s_b += (s.m_b - m_b).exp() * s.s_b;
        }
    }
    m
}

/// This rank's shard states, checked: a NaN or +inf, or (below temperature 1) a logit that
/// overflows f32 divided by tau, is this rank's error (the group learns of it in round 1).
fn shard_states(vppo: &Vppo, shard: &Batch, local_targets: &[i32]) -> Result<Vec<RowState>> {
    let cfg = vppo.config();
    let tau = cfg.temperature;
    let v = shard.vocab;
    // The O(N + B) checks of the batch, with the targets taken into the shard (their range is
    // checked against the whole vocabulary by the caller).
    let clamped: Vec<i32> = local_targets
        .iter()
        .map(|&y| y.clamp(0, v.saturating_sub(1) as i32))
        .collect();
    let probe = Batch {
        targets: &clamped,
        ..*shard
    };
    let valid = probe.validate(cfg)?;
    let n = shard.n_tokens();
    if tau < 1.0 {
        for t in 0..n {
            for (tensor, logits, row) in [
                (Tensor::Logits, &shard.logits, shard.logits_row(t)),
                (
                    Tensor::LogitsMasked,
                    &shard.logits_masked,
                    shard.masked_row(t),
                ),
            ] {
                let big = logits
                    .row_f64(row, v)
                    .into_iter()
                    .find(|x| x.is_finite() && (x / tau).abs() > f32::MAX as f64);
                if let Some(value) = big {
                    return Err(VppoError::TemperatureOverflow {
                        tensor,
                        row: t,
                        value,
                        temperature: tau,
                    });
                }
            }
        }
    }
    let states = match vppo.device() {
        Device::Reference => (0..n)
            .map(|t| {
                let scaled = |l: &crate::batch::Logits, r: usize| -> Vec<f64> {
                    l.row_f64(r, v).into_iter().map(|x| x / tau).collect()
                };
                let a = scaled(&shard.logits, shard.logits_row(t));
                let b = scaled(&shard.logits_masked, shard.masked_row(t));
                RowState::of_rows(&a, &b, local_targets[t] as i64)
            })
            .collect(),
        device => kernel_states(
            &crate::exec::perception_partial(&valid, local_targets, device)?,
            tau,
        ),
    };
    check_states(&states, &|tensor, t| {
        Ok(match tensor {
            Tensor::Logits => shard.logits.row_f64(shard.logits_row(t), v),
            _ => shard.logits_masked.row_f64(shard.masked_row(t), v),
        })
    })?;
    Ok(states)
}

fn kernel_states(raw: &[f32], tau: f64) -> Vec<RowState> {
    raw.chunks_exact(STATE)
        .map(|x| RowState::from_kernel(x, tau))
        .collect()
}

/// A NaN sum (a NaN or +inf in the shard's row) is this rank's error, naming the first bad value of
/// the row `row_of(tensor, token)` gives.
fn check_states(
    states: &[RowState],
    row_of: &dyn Fn(Tensor, usize) -> Result<Vec<f64>>,
) -> Result<()> {
    for (t, s) in states.iter().enumerate() {
        for (tensor, sum) in [(Tensor::Logits, s.s_a), (Tensor::LogitsMasked, s.s_b)] {
            if sum.is_nan() {
                let value = row_of(tensor, t)?
                    .into_iter()
                    .find(|x| x.is_nan() || *x == f64::INFINITY)
                    .unwrap_or(f64::NAN);
                return Err(VppoError::NonFinite {
                    tensor,
                    location: Location::Row(t),
                    value,
                });
            }
        }
    }
    Ok(())
}

/// This rank's shard states from a shard in GPU memory (`small`: its O(N + B) tensors, copied
/// back), checked as [`shard_states`] checks a host shard, but for the O(N V) host check below
/// temperature 1 ([`Vppo::forward_device`] does not make it either: a row whose sums overflow is
/// found on the merged rows).
fn device_states(
    vppo: &Vppo,
    gpu: &std::sync::Arc<crate::cuda::Gpu>,
    shard: &crate::exec::DeviceBatch,
    small: &crate::exec::SmallHost,
    at: VocabShard,
) -> Result<Vec<RowState>> {
    let cfg = vppo.config();
    super::refuse_full_kl(cfg, "vocabulary parallel")?;
    let y = local_targets(&small.batch(shard.vocab), at)?;
    let raw = crate::exec::perception_partial_device(gpu, shard, small, &y, cfg)?;
    let states = kernel_states(&raw, cfg.temperature);
    check_states(&states, &|tensor, t| {
        crate::exec::device_token_row(gpu, shard, small, tensor, t)
    })?;
    Ok(states)
}

/// Pass 1's per-token values from the merged rows (the same formulas as the kernel's epilogue and
/// the reference, in f64), or the first bad row's error (the same on every rank).
fn finish(rows: &[Merged], shard: &Batch, cfg: &VppoConfig) -> Result<PerceptionF64> {
    let mut p = PerceptionF64::default();
    for (t, m) in rows.iter().enumerate() {
        let target = shard.targets[t];
        if m.s_a.is_nan() || m.s_a <= 0.0 {
            return Err(VppoError::AllNegInf {
                tensor: Tensor::Logits,
                row: t,
            });
        }
        let (a_y, b_y) = m.target.unwrap_or((f64::NEG_INFINITY, f64::NEG_INFINITY));
        if a_y == f64::NEG_INFINITY {
            return Err(VppoError::TargetNegInf { row: t, target });
        }
        if m.s_b.is_nan() || m.s_b <= 0.0 {
            return Err(VppoError::AllNegInf {
                tensor: Tensor::LogitsMasked,
                row: t,
            });
        }
        if !m.e_a.is_finite() || !(m.kl_inf || m.f_b.is_finite()) {
            let tensor = if m.e_a.is_finite() {
                Tensor::LogitsMasked
            } else {
                Tensor::Logits
            };
            return Err(VppoError::RowOverflow { tensor, row: t });
        }
        let (la, lb) = (m.s_a.ln(), m.s_b.ln());
        let logp = (a_y - m.m_a) - la;
        let logp_masked = if b_y == f64::NEG_INFINITY {
            f64::NEG_INFINITY
        } else {
            (b_y - m.m_b) - lb
        };
        // kl = (e_a - f_b) / s_a + log(s_b / s_a), the log as log1p for sums that are close
        let kl = if m.kl_inf {
            f64::INFINITY
        } else {
            ((m.e_a - m.f_b) / m.s_a + ((m.s_b - m.s_a) / m.s_a).ln_1p()).max(0.0)
        };
        let d = (logp_masked - shard.old_logp[t] as f64).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
        let k3 = (d.exp_m1() - d).max(0.0);
        let raw = match cfg.perception {
            Perception::FullKl => kl,
            Perception::K3 => k3,
        };
        p.lse.push(m.m_a + la);
        p.lse_masked.push(m.m_b + lb);
        p.row_max.push(m.m_a);
        p.lse_centred.push(la);
        p.logp.push(logp);
        p.logp_masked.push(logp_masked);
        p.kl.push(kl);
        p.k3.push(k3);
        p.entropy.push(la - m.e_a / m.s_a);
        p.score.push(if raw > 0.0 {
            raw.min(cfg.score_clamp)
        } else {
            0.0
        });
    }
    Ok(p)
}

/// The targets minus the shard's first column (i64 arithmetic: no wrap), after checking each lies
/// in the whole vocabulary.
fn local_targets(shard: &Batch, at: VocabShard) -> Result<Vec<i32>> {
    shard
        .targets
        .iter()
        .enumerate()
        .map(|(row, &y)| {
            if y < 0 || y as usize >= at.total {
                return Err(VppoError::TargetOutOfRange {
                    row,
                    target: y,
                    vocab: at.total,
                });
            }
            let local = i64::try_from(at.start)
                .ok()
                .and_then(|start| (y as i64).checked_sub(start))
                .and_then(|d| i32::try_from(d).ok());
            local.ok_or_else(|| VppoError::Shape {
                tensor: Tensor::Targets,
                detail: format!("vocab_start {} is beyond the int32 target ids", at.start),
            })
        })
        .collect()
}

/// A 53-bit FNV-1a hash (exact in an f64) of a shard's O(N + B) tensors, which every rank of a
/// vocabulary group must hold alike: the targets, old_logp, advantages, cu_seqlens, the row indices
/// and ref_logp (each tagged, so that a missing tensor differs from an empty one).
fn fingerprint(shard: &Batch) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(bytemuck::cast_slice(shard.targets));
    eat(b"|");
    eat(bytemuck::cast_slice(shard.old_logp));
    eat(b"|");
    eat(bytemuck::cast_slice(shard.advantages));
    eat(b"|");
    eat(bytemuck::cast_slice(shard.cu_seqlens));
    for x in [shard.rows, shard.masked_rows] {
        eat(if x.is_some() { b"|some" } else { b"|none" });
        eat(bytemuck::cast_slice(x.unwrap_or(&[])));
    }
    eat(if shard.ref_logp.is_some() {
        b"|some"
    } else {
        b"|none"
    });
    eat(bytemuck::cast_slice(shard.ref_logp.unwrap_or(&[])));
    (h >> 11) as f64
}

impl Vppo {
    /// The forward of this rank of a vocabulary-parallel group (module docs): `shard` holds this
    /// rank's columns [at.start, at.start + shard.vocab) of both logits tensors ([N, V_r], or rows of
    /// [R, V_r] through `rows`), the batch's targets (global ids), old_logp, advantages and
    /// cu_seqlens, the same on every rank. Every rank returns the same per-token outputs, mask and
    /// loss, equal to the unsharded forward to rounding. An error on any rank is an error on every
    /// rank ([`VppoError::GroupFailed`] where the rank's own shard was fine).
    pub fn forward_vocab_parallel(
        &self,
        shard: &Batch,
        at: VocabShard,
        group: &dyn Collective,
    ) -> Result<VppoOutput> {
        self.forward_vocab_parallel_in(shard, at, group, None)
    }

    /// Vocabulary parallel inside data parallel (SPEC 11, the layouts combined): `group` is this
    /// rank's vocabulary group, `data` its data group (one rank of each vocabulary group, all of
    /// the same vocabulary position). The outputs are as [`Vppo::forward_data_parallel`]'s over the
    /// data group's batches: pass 2 runs under the data group's Z, B', Sbar range and beta_max. An
    /// error anywhere is an error on every rank of both groups.
    pub fn forward_vocab_data_parallel(
        &self,
        shard: &Batch,
        at: VocabShard,
        group: &dyn Collective,
        data: &dyn Collective,
    ) -> Result<VppoOutput> {
        let mut reached = false;
        let result = self.forward_vocab_parallel_in(shard, at, group, Some((data, &mut reached)));
        if result.is_err() && !reached {
            report_failure(data)?;
        }
        result
    }

    /// [`Vppo::forward_vocab_parallel`] on a shard in GPU memory ([`Vppo::forward_device`]'s
    /// batch, with this rank's columns): pass 1 in partial mode on the GPU, the states (9 N
    /// floats) copied back, then the same gather, merge and host pass 2, so every rank's outputs
    /// are the same bits, and those of the host path on the same GPU. With `data`, inside a data
    /// group (as [`Vppo::forward_vocab_data_parallel`]). The backward is
    /// [`Vppo::backward_saved_device_vocab_parallel`] from the output's lse and dlogp.
    pub fn forward_device_vocab_parallel(
        &self,
        shard: &crate::exec::DeviceBatch,
        at: VocabShard,
        group: &dyn Collective,
        data: Option<&dyn Collective>,
    ) -> Result<VppoOutput> {
        let (perception, small) = match self.vocab_perception_device(shard, at, group) {
            Ok(x) => x,
            Err(e) => {
                if let Some(d) = data {
                    report_failure(d)?;
                }
                return Err(e);
            }
        };
        let batch = small.batch(shard.vocab);
        let out = crate::reference::output_of(&super::pass2_across(
            perception,
            &batch,
            self.config(),
            data,
        )?);
        out.check_finite()?;
        Ok(out)
    }

    fn forward_vocab_parallel_in(
        &self,
        shard: &Batch,
        at: VocabShard,
        group: &dyn Collective,
        data: Option<(&dyn Collective, &mut bool)>,
    ) -> Result<VppoOutput> {
        let cfg = self.config();
        let perception = self.vocab_perception(shard, at, group)?;
        let data = data.map(|(d, reached)| {
            *reached = true;
            d
        });
        let out = crate::reference::output_of(&super::pass2_across(perception, shard, cfg, data)?);
        out.check_finite()?;
        Ok(out)
    }

    /// Steps 1 to 3 of the module docs up to pass 2: this rank's shard states, round 1 and the
    /// tiling check across `group`, the gather and the merge in rank order. Returns pass 1's
    /// per-token values of the whole rows, the same bits on every rank of the group, or the error
    /// every rank of the group agrees on (a rank whose own shard failed has told the group).
    pub(super) fn vocab_perception(
        &self,
        shard: &Batch,
        at: VocabShard,
        group: &dyn Collective,
    ) -> Result<PerceptionF64> {
        let cfg = self.config();
        let local = super::refuse_full_kl(cfg, "vocabulary parallel")
            .and_then(|_| local_targets(shard, at))
            .and_then(|y| shard_states(self, shard, &y));
        self.merge_shards(local, shard, at, group)
    }

    /// [`Vppo::vocab_perception`] of a shard in GPU memory: its pass-1 values and its O(N + B)
    /// tensors on the host (copied back once), or the error every rank of `group` agrees on.
    pub(super) fn vocab_perception_device(
        &self,
        shard: &crate::exec::DeviceBatch,
        at: VocabShard,
        group: &dyn Collective,
    ) -> Result<(PerceptionF64, crate::exec::SmallHost)> {
        let small = self.gpu().and_then(|gpu| {
            let small = crate::exec::device_small_tensors(&gpu, shard)?;
            Ok((gpu, small))
        });
        let (gpu, small) = match small {
            Ok(x) => x,
            Err(e) => {
                report_failure(group)?;
                return Err(e);
            }
        };
        let local = device_states(self, &gpu, shard, &small, at);
        let p = self.merge_shards(local, &small.batch(shard.vocab), at, group)?;
        Ok((p, small))
    }

    /// Round 1, the tiling check and the merge (the module docs' steps 2 and 3 up to pass 2) on
    /// this rank's states `local` (or its error, which this rank then reports to `group`); `shard`'s
    /// logits are not read.
    fn merge_shards(
        &self,
        local: Result<Vec<RowState>>,
        shard: &Batch,
        at: VocabShard,
        group: &dyn Collective,
    ) -> Result<PerceptionF64> {
        let cfg = self.config();
        let states = match local {
            Ok(s) => s,
            Err(e) => {
                report_failure(group)?;
                return Err(e);
            }
        };
        // Round 1: failures, and the config agrees (N and the tiling: the gather below)
        let n = shard.n_tokens() as f64;
        round_one(cfg, group, [0.0, 0.0], [n, -n])?;
        let print = fingerprint(shard);
        let tiling = group.all_gather(&[
            at.start as f64,
            shard.vocab as f64,
            at.total as f64,
            n,
            print,
        ])?;
        let mut next = 0.0;
        for (r, s) in tiling.chunks_exact(5).enumerate() {
            if s[0] != next || s[2] != at.total as f64 || s[3] != n {
                return Err(VppoError::Shape {
                    tensor: Tensor::Logits,
                    detail: format!(
                        "the vocabulary shards do not tile [0, {}) in rank order with N = {n} on \
                         every rank: rank {r} holds columns [{}, {}) of V = {} with N = {} (rank \
                         {} expected its shard to start at {next})",
                        at.total,
                        s[0],
                        s[0] + s[1],
                        s[2],
                        s[3],
                        r
                    ),
                });
            }
            next = s[0] + s[1];
        }
        if next != at.total as f64 {
            return Err(VppoError::Shape {
                tensor: Tensor::Logits,
                detail: format!(
                    "the vocabulary shards cover [0, {next}), not [0, {}) (V = {})",
                    at.total, at.total
                ),
            });
        }
        // Every rank of the group reads the same tokens: their small tensors must be the same, or
        // pass 2 would run on different batches and the ranks' outputs differ silently.
        if let Some(r) = tiling.chunks_exact(5).position(|s| s[4] != tiling[4]) {
            return Err(VppoError::Shape {
                tensor: Tensor::Targets,
                detail: format!(
                    "the ranks of a vocabulary group hold different tokens: the targets, old_logp, \
                     advantages, cu_seqlens, rows, masked_rows or ref_logp of rank {r} differ \
                     from rank 0's (fingerprints {:.0} and {:.0}); every rank must hold the same \
                     rows",
                    tiling[5 * r + 4],
                    tiling[4]
                ),
            });
        }
        // Round 2: the states, merged in rank order
        let mine: Vec<f64> = states.iter().flat_map(|s| s.to_array()).collect();
        let all = group.all_gather(&mine)?;
        let per_rank = mine.len();
        let rows: Vec<Merged> = (0..states.len())
            .map(|t| {
                merge(
                    (0..group.size())
                        .map(|r| RowState::from_slice(&all[r * per_rank + t * STATE..][..STATE])),
                )
            })
            .collect();
        finish(&rows, shard, cfg)
    }

    /// dloss/dlogits of this rank's columns ([N, V_r] or [R, V_r] through rows, f32 or the logits
    /// dtype) from its [`Vppo::forward_vocab_parallel`] output `out`: no collective.
    pub fn backward_vocab_parallel(
        &self,
        shard: &Batch,
        at: VocabShard,
        out: &VppoOutput,
        grad: GradMut,
    ) -> Result<()> {
        out.check_for_backward(shard.n_tokens(), Some(shard.n_responses()))?;
        let saved = crate::exec::SavedForward {
            targets: shard.targets,
            lse: &out.tokens.lse,
            dlogp: &out.tokens.dlogp,
            rows: shard.rows,
        };
        self.backward_saved_vocab_parallel(shard.logits, shard.vocab, at, &saved, grad)
    }

    /// [`Vppo::backward_saved_vocab_parallel`] in GPU memory (as [`Vppo::backward_saved_device`]):
    /// `logits` are this rank's `vocab` columns starting at `at.start` ([N, V_r], or [R, V_r]
    /// through `saved.rows`), `saved` the forward's global targets, merged lse and dlogp on the GPU;
    /// writes `grad` (the shape of `logits`, f32 or their dtype). No collective.
    pub fn backward_saved_device_vocab_parallel(
        &self,
        logits: crate::DeviceLogits,
        vocab: usize,
        at: VocabShard,
        saved: &crate::exec::DeviceSaved,
        grad: crate::DeviceLogitsMut,
    ) -> Result<()> {
        let local = move |targets: &[i32]| {
            let probe = Batch {
                targets,
                ..Default::default()
            };
            local_targets(&probe, at)
        };
        crate::exec::backward_saved_device(
            &self.gpu()?,
            Some(logits),
            vocab,
            saved,
            None,
            grad,
            self.config(),
            &|dlogp| self.check_grad_bound(dlogp),
            Some(&local),
        )
    }

    /// [`Vppo::backward_vocab_parallel`] from what the forward saved (global targets, the merged
    /// lse, dloss/dlogp, the rows), as [`Vppo::backward_saved`] is for one process: `logits` are
    /// this rank's `vocab` columns starting at `at.start`.
    pub fn backward_saved_vocab_parallel(
        &self,
        logits: crate::batch::Logits,
        vocab: usize,
        at: VocabShard,
        saved: &crate::exec::SavedForward,
        grad: GradMut,
    ) -> Result<()> {
        let probe = Batch {
            logits,
            logits_masked: logits,
            targets: saved.targets,
            old_logp: &[],
            advantages: &[],
            cu_seqlens: &[0],
            vocab,
            rows: saved.rows,
            ..Default::default()
        };
        let targets = local_targets(&probe, at)?;
        self.check_grad_bound(saved.dlogp)?;
        let tau = self.config().temperature;
        let local = crate::exec::SavedForward {
            targets: &targets,
            ..*saved
        };
        match self.device() {
            Device::Reference => {
                local.check_lengths(logits.len(), grad.len(), vocab)?;
                let lse: Vec<f64> = saved.lse.iter().map(|&x| x as f64).collect();
                let dlogp: Vec<f64> = saved.dlogp.iter().map(|&x| x as f64).collect();
                crate::reference::backward::grad_logits_shard(
                    logits,
                    vocab,
                    &targets,
                    &lse,
                    &vec![0.0; lse.len()],
                    &dlogp,
                    tau,
                    saved.rows,
                    grad,
                )
            }
            device => {
                crate::exec::backward_shard(device, &logits, &local, vocab, grad, self.config())
            }
        }
    }
}
