//! Pass 2, kernels/select_loss.cu: `vppo_select` (the per-response top-k mask and Sbar, and the
//! token-to-response map and GSPO sums the loss reads), then the loss in three kernels:
//! `vppo_loss_prep` (one block: TAS alpha and the per-response constants), `vppo_loss` (a grid over
//! tiles of tokens: the clipped surrogate, dloss/dlogp and each tile's sums) and `vppo_loss_finish`
//! (one block: the tiles' sums in tile order into the totals).
//!
//! Reference: src/reference/select.rs, shaping.rs, surrogate.rs. Tests: tests/kernels.rs.

#[allow(unused_imports)]
use super::*;

/// Tiles of `vppo_loss` over `n` tokens: each tile's sums are one `VppoLossTotals` of the partials.
pub(super) fn loss_tiles(n: usize) -> usize {
    n.div_ceil(LOSS_TILE_TOKENS)
}

/// The exact parameters of the loss kernel for this config.
pub(super) fn loss_params(cfg: &VppoConfig, n: usize, b: usize) -> VppoLossParams {
    use crate::params::{
        VppoAggregation as A, VppoKlPenalty as K, VppoLossType as T, VppoScope as S,
        VppoShaping as Sh,
    };
    let (has_range, (lo, hi)) = match cfg.tas_range {
        Some(r) => (1, r),
        None => (0, (0.0, 0.0)),
    };
    VppoLossParams {
        n_tokens: n as i64,
        n_responses: b as i64,
        group_size: cfg.group_size as i64,
        token_normalizer: cfg.token_normalizer.unwrap_or(n as f64),
        response_normalizer: cfg.response_normalizer.unwrap_or(0.0),
        beta_min: cfg.beta_min,
        beta_max: cfg.beta_max,
        range_lo: lo,
        range_hi: hi,
        eps_low: cfg.eps_low,
        eps_high: cfg.eps_high,
        dual_clip: cfg.dual_clip.unwrap_or(0.0),
        logp_penalty: cfg.logp_penalty,
        shaping: match cfg.shaping {
            Shaping::MeanPreserving => Sh::VPPO_SHAPING_MEAN_PRESERVING,
            Shaping::Linear => Sh::VPPO_SHAPING_LINEAR,
            Shaping::None => Sh::VPPO_SHAPING_NONE,
        } as i32,
        scope: match cfg.scope() {
            TasScope::Batch => S::VPPO_SCOPE_BATCH,
            TasScope::Group => S::VPPO_SCOPE_GROUP,
        } as i32,
        aggregation: match cfg.aggregation {
            Aggregation::TokenMean => A::VPPO_AGG_TOKEN_MEAN,
            Aggregation::SeqMeanTokenMean => A::VPPO_AGG_SEQ_MEAN_TOKEN_MEAN,
            Aggregation::SeqMeanTokenSum => A::VPPO_AGG_SEQ_MEAN_TOKEN_SUM,
        } as i32,
        has_range,
        has_dual_clip: cfg.dual_clip.is_some() as i32,
        loss_type: match cfg.loss_type {
            LossType::Ppo => T::VPPO_LOSS_PPO,
            LossType::Gspo => T::VPPO_LOSS_GSPO,
            LossType::GspoToken => T::VPPO_LOSS_GSPO_TOKEN,
            LossType::Cispo => T::VPPO_LOSS_CISPO,
        } as i32,
        kl_penalty: match cfg.kl_penalty {
            KlPenalty::None => K::VPPO_KL_NONE,
            KlPenalty::K1 => K::VPPO_KL_K1,
            KlPenalty::Abs => K::VPPO_KL_ABS,
            KlPenalty::Mse => K::VPPO_KL_MSE,
            KlPenalty::K3 => K::VPPO_KL_K3,
            // the full KL is not a function of logp: the loss kernel runs without a penalty, and
            // the host adds kl_coef times the aggregated KL of the reference launch (exec/mod.rs)
            KlPenalty::Full => K::VPPO_KL_NONE,
        } as i32,
        kl_coef: cfg.kl_coef,
        ..Default::default()
    }
}

/// Pass 2a only: the top-k mask and k_b of given scores (the kernel's `vppo_select`), and Sbar.
/// `scores` [N] must be finite (the perception pass only produces values in [0, score_clamp]).
pub(crate) fn select(
    scores: &[f32],
    cu_seqlens: &[i32],
    top_fraction: f64,
    device: Device,
) -> Result<(Vec<u8>, Vec<u32>, Vec<f32>)> {
    let frac = crate::config::TopFraction::new(top_fraction)?;
    crate::batch::validate_cu_seqlens(cu_seqlens, scores.len())?;
    if let Some((row, &x)) = scores.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(VppoError::NonFinite {
            tensor: Tensor::Scores,
            location: Location::Row(row),
            value: x as f64,
        });
    }
    let l = Launcher::for_device(device)?;
    let (n, b) = (scores.len(), cu_seqlens.len() - 1);
    let score = Input::new(&l, scores)?;
    let cu = Input::new(&l, cu_seqlens)?;
    let mask = l.alloc(n)?;
    let k = l.alloc(b * 4)?;
    let sbar = l.alloc(b * 4)?;
    let p = VppoSelectParams {
        score: score.addr as *const f32,
        cu_seqlens: cu.addr as *const i32,
        mask: l.addr(&mask) as *mut u8,
        k: l.addr(&k) as *mut i32,
        sbar: l.addr(&sbar) as *mut f32,
        n_responses: b as i64,
        frac_num: frac.numerator(),
        frac_den: frac.denominator(),
        // the perception mask only: the kernel never reads `entropy`
        ..Default::default()
    };
    // SAFETY: score [N], cu_seqlens [B+1] (validated: within [0, N], non-decreasing), mask [N],
    // k and sbar [B] are live buffers of this launcher's memory for the whole launch.
    unsafe { launch_select(&l, &p)? };
    let kk: Vec<i32> = l.download(&k, b)?;
    Ok((
        l.download(&mask, n)?,
        kk.into_iter().map(|x| x as u32).collect(),
        l.download(&sbar, b)?,
    ))
}

/// Launches `vppo_select` over the `p.n_responses` responses of `p`; nothing to launch when there
/// are none.
///
/// # Safety
/// As [`Launcher::launch`]: `score` and `mask` address N values, `cu_seqlens` B + 1 validated
/// boundaries (within [0, N], non-decreasing), `k` and `sbar` B values, all live for the launch.
pub(super) unsafe fn launch_select(l: &Launcher, p: &VppoSelectParams) -> Result<()> {
    let b = p.n_responses as usize;
    if b == 0 {
        return Ok(());
    }
    // SAFETY: forwarded from this function's contract.
    unsafe {
        l.launch(
            SELECT,
            l.row_grid(b),
            SELECT_THREADS,
            SELECT_SHARED_BYTES,
            p,
        )
    }
}

/// Pass 2 over the scores pass 1 left in `ws`: `vppo_select`, then the loss ([`run_loss`]).
pub(super) fn run_select_loss(
    l: &Launcher,
    dims: Dims,
    cfg: &VppoConfig,
    inp: &Inputs,
    ws: &Workspace,
) -> Result<()> {
    run_select(l, dims, cfg, inp, ws)?;
    run_loss(l, dims, cfg, inp, ws)
}

/// Pass 2a: `vppo_select` (mask, k, Sbar, the token-to-response map and, for the GSPO modes, s_b
/// and m_b) over the scores pass 1 left in `ws`.
pub(super) fn run_select(
    l: &Launcher,
    dims: Dims,
    cfg: &VppoConfig,
    inp: &Inputs,
    ws: &Workspace,
) -> Result<()> {
    let b = dims.b;
    let frac = cfg.top_fraction_exact()?;
    let efrac = cfg.entropy_top_fraction_exact()?;
    let p = VppoSelectParams {
        score: ws.ptr(l, ws.score),
        cu_seqlens: inp.cu_seqlens.addr as *const i32,
        mask: ws.ptr(l, ws.mask),
        k: ws.ptr(l, ws.k),
        sbar: ws.ptr(l, ws.sbar),
        n_responses: b as i64,
        frac_num: frac.numerator(),
        frac_den: frac.denominator(),
        entropy: ws.ptr(l, ws.entropy),
        entropy_frac_num: efrac.numerator(),
        entropy_frac_den: efrac.denominator(),
        mask_by: match cfg.mask_by {
            MaskBy::Perception => crate::params::VppoMaskBy::VPPO_MASK_BY_PERCEPTION,
            MaskBy::Entropy => crate::params::VppoMaskBy::VPPO_MASK_BY_ENTROPY,
            MaskBy::PerceptionOrEntropy => {
                crate::params::VppoMaskBy::VPPO_MASK_BY_PERCEPTION_OR_ENTROPY
            }
        } as i32,
        token_response: ws.ptr(l, ws.token_response),
        logp: ws.ptr(l, ws.logp),
        old_logp: inp.old_logp.addr as *const f32,
        // s_b and m_b only for the loss types that read them
        seq_log_ratio: if matches!(cfg.loss_type, LossType::Gspo | LossType::GspoToken) {
            ws.ptr(l, ws.seq_log_ratio)
        } else {
            std::ptr::null_mut()
        },
        seq_selected: ws.ptr(l, ws.seq_selected),
        ..Default::default()
    };
    // SAFETY: score, entropy, logp (written by pass 1), old_logp, mask and token_response [N],
    // cu_seqlens [B+1] validated, k, sbar, seq_log_ratio and seq_selected [B]; all live.
    unsafe { launch_select(l, &p) }
}

/// Pass 2b: `vppo_loss_prep`, `vppo_loss`, `vppo_loss_finish` over what pass 1 and [`run_select`]
/// left in `ws`.
pub(super) fn run_loss(
    l: &Launcher,
    dims: Dims,
    cfg: &VppoConfig,
    inp: &Inputs,
    ws: &Workspace,
) -> Result<()> {
    let (n, b) = (dims.n, dims.b);
    let p = VppoLossParams {
        logp: ws.ptr(l, ws.logp),
        old_logp: inp.old_logp.addr as *const f32,
        mask: ws.ptr(l, ws.mask),
        sbar: ws.ptr(l, ws.sbar),
        cu_seqlens: inp.cu_seqlens.addr as *const i32,
        advantages: inp.advantages.addr as *const f32,
        alpha: ws.ptr(l, ws.alpha),
        dlogp: ws.ptr(l, ws.dlogp),
        totals: ws.ptr(l, ws.totals),
        seq_log_ratio: ws.ptr(l, ws.seq_log_ratio),
        seq_selected: ws.ptr(l, ws.seq_selected),
        ref_logp: inp.ref_logp.addr as *const f32,
        token_response: ws.ptr(l, ws.token_response),
        responses: ws.ptr(l, ws.loss_responses),
        partials: ws.ptr(l, ws.loss_partials),
        ..loss_params(cfg, n, b)
    };
    // SAFETY: logp, old_logp, mask, dlogp, token_response [N] (every entry in [0, B): written by
    // vppo_select (run_select, always queued before this) from the validated cu_seqlens, or the
    // arena's zeros); sbar, advantages,
    // alpha, seq_log_ratio, seq_selected, responses [B]; partials [loss_tiles(N)]; cu_seqlens
    // [B+1]; totals 1; ref_logp [N] whenever kl_penalty != none (Batch::validate refuses a batch
    // without it), else address 0 and never read. B % G == 0 when the group scope is used
    // (validate_small). The prep and finish kernels are one block each; vppo_loss loops over the
    // tiles, so any grid covers them.
    unsafe {
        l.launch(LOSS_PREP, 1, LOSS_THREADS, LOSS_SHARED_BYTES, &p)?;
        l.launch(
            LOSS,
            l.row_grid(loss_tiles(n)),
            LOSS_TILE_THREADS,
            LOSS_TILE_SHARED_BYTES,
            &p,
        )?;
        l.launch(LOSS_FINISH, 1, LOSS_THREADS, LOSS_TILE_SHARED_BYTES, &p)
    }
}
