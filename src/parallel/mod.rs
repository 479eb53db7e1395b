//! Data parallel VPPO (SPEC section 11): each rank of a group holds whole responses, and the loss is
//! reduced across the group so that the sum over ranks of the per-rank losses, and every rank's
//! gradient rows, equal the single-process result on the concatenated batch (to rounding).
//!
//! What pass 2 normalizes by is what crosses ranks, a few scalars per call:
//!
//! | round | reduction | values |
//! | --- | --- | --- |
//! | 1 | sum | ranks that failed, N (for Z, token-mean), B' (non-empty responses, seq modes) |
//! | 1 | max | the config's fingerprint and its negative (ranks must agree), max Sbar, -min Sbar |
//! | 2 | sum | sum of n_b (mean-preserving shaping over the batch only) |
//!
//! Round 1 runs on every rank whatever happened before it, so a rank with bad input tells the others,
//! and every rank returns an error ([`VppoError::GroupFailed`] on the ranks whose own input was fine):
//! no rank waits on a collective another rank never reaches. Round 2 is reached by every rank or by
//! none, decided from round 1's results, which every rank holds alike.
//!
//! Then pass 2 runs again under the global config: Z and B' of the whole group, the Sbar range of the
//! whole group, and for mean-preserving shaping the beta_max its mean of n_b gives (alpha_b =
//! beta_min + n_b (beta_max - beta_min) is linear shaping with that beta_max). Pass 1, the stream of
//! both logits tensors, runs once (src/exec/mod.rs, `forward_then`). Group-scope shaping needs each
//! group on one rank, and is computed per rank. The official code's per-rank semantics stay
//! available: call [`Vppo::forward`] with a caller range (`tas_range`).
//!
//! The collectives go through [`Collective`]: [`ThreadGroup`] (ranks as threads of one process, for
//! tests and single-node use) here, [`NcclGroup`] (NCCL through cudarc, one rank per GPU: nccl.rs),
//! torch.distributed from Python (python/vppo/torch.py). Every engine reduces with [`combine`], on
//! the host, in rank order, so all of them give the same bits.
//! Tests: tests/data_parallel.rs (Rust), tests/nccl_parallel.rs (NCCL on the fake driver),
//! python/tests/test_distributed.py (gloo ranks).

use std::sync::{Arc, Barrier, Mutex};

mod nccl;
mod sequence;
mod vocab;
pub use nccl::{NcclGroup, NcclId};
pub use vocab::VocabShard;

use crate::api::Vppo;
use crate::batch::Batch;
use crate::config::{Shaping, TasScope, VppoConfig};
use crate::error::{Result, VppoError};
use crate::exec::{DeviceBatch, DeviceForward, ThenFn};
use crate::output::VppoOutput;
use crate::reference::shaping::{TAS_MEAN_EPS, TAS_MIN_SPREAD};

/// How [`Collective::all_reduce`] combines the ranks' values, element by element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum, in rank order (every rank gets the same bits).
    Sum,
    /// The maximum.
    Max,
}

/// A group of ranks that can reduce a few f64 values: every rank calls [`Collective::all_reduce`]
/// the same number of times with the same length, and every rank receives the same result.
pub trait Collective {
    /// This rank, in 0..size.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Replaces `values` by their reduction over the group.
    fn all_reduce(&self, values: &mut [f64], op: ReduceOp) -> Result<()>;
    /// Every rank's `values` (the same length on every rank), concatenated in rank order.
    fn all_gather(&self, values: &[f64]) -> Result<Vec<f64>>;
}

/// A group of ranks that are threads of this process: [`ThreadGroup::new`] gives one handle per rank,
/// each to be moved to its thread.
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f64>>>,
}

impl ThreadGroup {
    /// The handles of a group of `size` ranks (at least 1), rank 0 first.
    pub fn new(size: usize) -> Result<Vec<ThreadGroup>> {
        if size == 0 {
            return Err(VppoError::Config {
                field: "group size",
                value: "0".into(),
                expected: "at least one rank",
            });
        }
        let shared = Arc::new(Shared {
            size,
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![Vec::new(); size]),
        });
        Ok((0..size)
            .map(|rank| ThreadGroup {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect())
    }
}

impl ThreadGroup {
    /// Every rank's values in rank order (the slots of one exchange), or the rank whose length
    /// differs from this rank's.
    fn exchange(&self, values: &[f64]) -> Result<std::result::Result<Vec<Vec<f64>>, usize>> {
        let lock = || {
            self.shared
                .slots
                .lock()
                .map_err(|_| VppoError::Kernel("a rank of the thread group panicked".into()))
        };
        lock()?[self.rank] = values.to_vec();
        self.shared.barrier.wait();
        let all = {
            let slots = lock()?;
            match slots.iter().position(|s| s.len() != values.len()) {
                Some(r) => Err(r),
                None => Ok(slots.clone()),
            }
        };
        // Nobody writes a slot again before every rank has read them all.
        self.shared.barrier.wait();
        Ok(all)
    }

    fn lengths_differ(&self, other: usize, len: usize) -> VppoError {
        VppoError::Kernel(format!(
            "ranks exchange different lengths: rank {} gave {len} values, rank {other} another count",
            self.rank
        ))
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_gather(&self, values: &[f64]) -> Result<Vec<f64>> {
        match self.exchange(values)? {
            Ok(all) => Ok(all.concat()),
            Err(other) => Err(self.lengths_differ(other, values.len())),
        }
    }

    fn all_reduce(&self, values: &mut [f64], op: ReduceOp) -> Result<()> {
        // Every rank reduces the same slots in rank order: the same bits on every rank.
        let slots = match self.exchange(values)? {
            Ok(all) => all,
            Err(other) => return Err(self.lengths_differ(other, values.len())),
        };
        let slots: Vec<&[f64]> = slots.iter().map(Vec::as_slice).collect();
        combine(values, &slots, op);
        Ok(())
    }
}

/// Replaces `values[i]` by the reduction of `slots[r][i]` over the ranks r, in rank order: the one
/// reduction of every [`Collective`] (the same bits on every rank, and with every engine). Each slot
/// is at least as long as `values`.
pub(crate) fn combine(values: &mut [f64], slots: &[&[f64]], op: ReduceOp) {
    for (i, x) in values.iter_mut().enumerate() {
        let column = slots.iter().map(|s| s[i]);
        *x = match op {
            ReduceOp::Sum => column.sum(),
            ReduceOp::Max => column.fold(f64::NEG_INFINITY, f64::max),
        };
    }
}

/// A fingerprint of a config, exact in f64 (below 2^53), that ranks compare.
fn fingerprint(cfg: &VppoConfig) -> f64 {
    // FNV-1a over the config's debug text, which names every field and value.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("{cfg:?}").bytes() {
        h = (h ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 11) as f64
}

/// The non-empty responses' Sbar values of a local output.
fn nonempty_sbar<'o>(out: &'o VppoOutput, cu_seqlens: &'o [i32]) -> impl Iterator<Item = f64> + 'o {
    out.responses
        .sbar
        .iter()
        .zip(cu_seqlens.windows(2))
        .filter(|(_, w)| w[1] > w[0])
        .map(|(&s, _)| s as f64)
}

/// Round 1 of every layout, for a rank whose own work so far succeeded (a rank that failed takes
/// part through [`report_failure`], which makes the same two reductions): the sum over the group of
/// `sums` (after a 0: this rank did not fail) and the maximum of `maxima` (after the config's
/// fingerprint and its negative). Every rank returns the same error when some rank failed or the
/// configs differ; otherwise the reduced `sums` and `maxima`.
pub(crate) fn round_one(
    cfg: &VppoConfig,
    group: &dyn Collective,
    sums: [f64; 2],
    maxima: [f64; 2],
) -> Result<([f64; 2], [f64; 2])> {
    let mut s = [0.0, sums[0], sums[1]];
    group.all_reduce(&mut s, ReduceOp::Sum)?;
    let fp = fingerprint(cfg);
    let mut m = [fp, -fp, maxima[0], maxima[1]];
    group.all_reduce(&mut m, ReduceOp::Max)?;
    if s[0] > 0.0 {
        return Err(VppoError::GroupFailed {
            rank: group.rank(),
            failed: s[0] as usize,
        });
    }
    if m[0] != -m[1] {
        return Err(VppoError::GroupConfig { rank: group.rank() });
    }
    Ok(([s[1], s[2]], [m[2], m[3]]))
}

/// The collectives of this module's table, for a rank whose first forward `local` succeeded (a rank
/// that failed takes part through [`report_failure`]). Returns the config pass 2 reruns under, or
/// the error every rank agrees on.
pub(crate) fn agree(
    cfg: &VppoConfig,
    cu_seqlens: &[i32],
    local: &VppoOutput,
    group: &dyn Collective,
) -> Result<VppoConfig> {
    let (mut hi, mut lo) = (f64::NEG_INFINITY, f64::INFINITY);
    for s in nonempty_sbar(local, cu_seqlens) {
        hi = hi.max(s);
        lo = lo.min(s);
    }
    let b_local = cu_seqlens.windows(2).filter(|w| w[1] > w[0]).count();
    let ([n, b_nonempty], [hi, neg_lo]) = round_one(
        cfg,
        group,
        [local.tokens.score.len() as f64, b_local as f64],
        [hi, -lo],
    )?;
    let lo = -neg_lo;

    let mut global = cfg.clone();
    if global.token_normalizer.is_none() && n > 0.0 {
        global.token_normalizer = Some(n);
    }
    if global.response_normalizer.is_none() && b_nonempty > 0.0 {
        global.response_normalizer = Some(b_nonempty);
    }
    if cfg.shaping != Shaping::None && cfg.scope() == TasScope::Batch && b_nonempty > 0.0 {
        let (lo, hi) = cfg.tas_range.unwrap_or((lo, hi));
        global.tas_range = Some((lo, hi));
        global.tas_scope = Some(TasScope::Batch);
        // Mean-preserving: beta_max from the group's mean of n_b, then it is linear shaping.
        if cfg.shaping == Shaping::MeanPreserving && hi - lo > TAS_MIN_SPREAD {
            let mut n_sum = [nonempty_sbar(local, cu_seqlens)
                .map(|s| ((s - lo) / (hi - lo)).clamp(0.0, 1.0))
                .sum::<f64>()];
            group.all_reduce(&mut n_sum, ReduceOp::Sum)?;
            let mean_n = n_sum[0] / b_nonempty;
            global.shaping = Shaping::Linear;
            global.beta_max = cfg.beta_min + (1.0 - cfg.beta_min) / (mean_n + TAS_MEAN_EPS);
        }
    }
    Ok(global)
}

/// Pass 2 in f64 (the reference's) on pass-1 values that are the same on every rank of a
/// vocabulary or sequence group, and, with a data group over such groups (SPEC 11: the layouts
/// combined), again under the data group's Z, B', Sbar range and beta_max ([`agree`]).
pub(crate) fn pass2_across(
    perception: crate::reference::PerceptionF64,
    batch: &Batch,
    cfg: &VppoConfig,
    data: Option<&dyn Collective>,
) -> Result<crate::reference::ForwardF64> {
    let Some(data) = data else {
        return crate::reference::pass2_f64(perception, batch, cfg);
    };
    let local = match crate::reference::pass2_f64(perception.clone(), batch, cfg) {
        Ok(f) => f,
        Err(e) => {
            report_failure(data)?;
            return Err(e);
        }
    };
    let global = agree(
        cfg,
        batch.cu_seqlens,
        &crate::reference::output_of(&local),
        data,
    )?;
    crate::reference::pass2_f64(perception, batch, &global)
}

/// Tells the group that this rank failed before [`Vppo::forward_data_parallel`]'s reductions (for a
/// caller whose own checks failed before it could call it: python/vppo/torch.py), taking part in
/// round 1 as a failed rank, so that the other ranks return [`VppoError::GroupFailed`] instead of
/// waiting. An error only if the collective itself fails.
pub fn report_failure(group: &dyn Collective) -> Result<()> {
    let mut sums = [1.0, 0.0, 0.0];
    group.all_reduce(&mut sums, ReduceOp::Sum)?;
    let mut maxima = [0.0, 0.0, f64::NEG_INFINITY, f64::NEG_INFINITY];
    group.all_reduce(&mut maxima, ReduceOp::Max)
}

impl Vppo {
    /// The forward of this rank of a data-parallel group (module docs): pass 1 over the local batch,
    /// the reductions across `group`, then pass 2 under the group's normalizers and Sbar range. The
    /// sum over ranks of the returned losses is the single-process loss of the concatenated batch.
    /// The returned [`Vppo`] is bound to the group's config (the same on every rank): its
    /// [`Vppo::backward_into`] with the returned output gives this rank's rows of the gradient.
    ///
    /// Every rank must call this with the same config. An error on any rank before the reductions
    /// (bad input, a config that differs) is an error on every rank: the rank's own error, or
    /// [`VppoError::GroupFailed`]. An output that overflows f32 after them is this rank's error only.
    pub fn forward_data_parallel(
        &self,
        batch: &Batch,
        group: &dyn Collective,
    ) -> Result<(VppoOutput, Vppo)> {
        self.data_parallel(group, &mut |then| {
            self.forward_then(batch, &mut |local| then(local, batch.cu_seqlens))
        })
    }

    /// [`Vppo::forward_data_parallel`] on a batch in GPU memory ([`Vppo::forward_device`]'s): the
    /// same reductions (the module's table, a few scalars through `group`; what crosses to the host
    /// is the O(N + B) outputs [`Vppo::forward_device`] copies back anyway), then pass 2 again on
    /// the GPU under the group's config. The result keeps the workspace the backward reads: the
    /// returned [`Vppo`]'s [`Vppo::backward_device`] with it gives this rank's rows of the
    /// gradient (the forward's dloss/dlogp is already the group's). The same bits as
    /// [`Vppo::forward_data_parallel`] on a host copy of the batch on the same GPU.
    pub fn forward_device_data_parallel(
        &self,
        batch: &DeviceBatch,
        group: &dyn Collective,
    ) -> Result<(DeviceForward, Vppo)> {
        self.data_parallel(group, &mut |then| {
            let fwd = crate::exec::forward_device_then(&self.gpu()?, batch, self.config(), then)?;
            fwd.output.check_finite()?;
            Ok(fwd)
        })
    }

    /// The protocol of a data-parallel forward around `run`, which runs pass 1 and calls the
    /// closure it is given with the first output and the batch's cu_seqlens (at most once: the
    /// reductions, which return pass 2's config), then pass 2 again. A rank whose `run` fails before
    /// that call takes part in round 1 as a failed rank ([`report_failure`]).
    fn data_parallel<T>(
        &self,
        group: &dyn Collective,
        run: &mut dyn FnMut(&mut ThenFn) -> Result<T>,
    ) -> Result<(T, Vppo)> {
        let cfg = self.config();
        let (mut reached, mut global) = (false, None);
        let result = run(&mut |local: &VppoOutput, cu_seqlens: &[i32]| {
            reached = true;
            let g = agree(cfg, cu_seqlens, local, group)?;
            global = Some(g.clone());
            Ok(Some(g))
        });
        if reached {
            let out = result?;
            let global = global.ok_or_else(|| VppoError::Kernel("no group config".into()))?;
            return Ok((out, Vppo::new(global, self.device())?));
        }
        // This rank failed before the collectives: tell the group, which waits on it.
        let e = match result {
            Err(e) => e,
            Ok(_) => {
                VppoError::Kernel("the forward returned without the group's reductions".into())
            }
        };
        report_failure(group)?;
        Err(e)
    }
}

/// `kl_penalty = full` is not combined with the vocabulary and sequence layouts yet (the reference
/// launch of pass 1 would need its states merged across the group like the policy's): an error on
/// every rank, reported to the group like any bad input.
pub(crate) fn refuse_full_kl(cfg: &VppoConfig, layout: &str) -> Result<()> {
    if cfg.needs_ref_logits() {
        return Err(VppoError::Config {
            field: "kl-penalty",
            value: format!("full with {layout}"),
            expected: "a penalty from ref_logp (k1, abs, mse, k3) or none: full is not combined \
                       with vocabulary or sequence parallel yet",
        });
    }
    Ok(())
}
