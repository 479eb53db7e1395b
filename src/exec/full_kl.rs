//! The `full` KL penalty (SPEC section 12) in the forward: a second launch of the perception kernel
//! (kernels/perception.cu, unchanged) with `ref_logits` in place of `logits_masked`, read through
//! the same rows as `logits`, into a workspace of its own. Its `kl` is exactly KL(pi || pi_ref) per
//! token and its `lse_masked` is lse_ref; the loss kernel runs without a penalty and the host adds
//! kl_coef times the aggregated KL ([`crate::reference::kl::full_kl_loss`], O(N)). The backward is
//! the vppo_backward_full_* version of kernels/backward.cu (src/exec/backward.rs).
//!
//! Reference: src/reference/kl.rs (`full_kl`, `full_kl_loss`). Tests: tests/variants.rs.

#[allow(unused_imports)]
use super::*;
use crate::reference::kl::full_kl_loss;

/// Per token: kl_t = KL(pi || pi_ref) and lse_ref, from the reference launch.
pub(super) struct FullKl {
    kl: Vec<f32>,
    lse_ref: Vec<f32>,
}

/// The reference launch of pass 1 over `batch` (whose `ref_logits` a validated full-KL config
/// guarantees), or the first bad row of ref_logits as an error naming it (the logits rows were
/// checked by the first launch).
pub(super) fn full_kl_pass(
    l: &Launcher,
    dims: Dims,
    cfg: &VppoConfig,
    inputs: &Inputs,
    batch: &Batch,
) -> Result<FullKl> {
    let Some(reference) = batch.ref_logits else {
        return Err(VppoError::MissingTensor {
            tensor: Tensor::RefLogits,
            needed_by: "kl_penalty = full needs the reference policy's logits".into(),
        });
    };
    let v = batch.vocab;
    let row_of = |tensor: Tensor, t: usize| -> Result<Vec<f64>> {
        let r = batch.logits_row(t);
        Ok(if tensor == Tensor::Logits {
            batch.logits.row_f64(r, v)
        } else {
            reference.row_f64(r, v)
        })
    };
    let ref_input = Input::logits(l, &reference)?;
    full_kl_launch(l, dims, cfg, inputs, ref_input, batch.targets, &row_of)
}

/// The reference launch of pass 1 with `ref_logits` at `ref_input` (the shape and dtype of the
/// logits of `inputs`, validated), or the first bad row of ref_logits as an error naming it;
/// `row_of(Logits | RefLogits, t)` is token t's row of either, to name a bad value.
pub(super) fn full_kl_launch(
    l: &Launcher,
    dims: Dims,
    cfg: &VppoConfig,
    inputs: &Inputs,
    ref_input: Input,
    targets: &[i32],
    row_of: &dyn Fn(Tensor, usize) -> Result<Vec<f64>>,
) -> Result<FullKl> {
    let at = Input::borrowed;
    let ref_inputs = Inputs {
        logits: at(inputs.logits.addr),
        logits_masked: ref_input,
        targets: at(inputs.targets.addr),
        old_logp: at(inputs.old_logp.addr),
        advantages: at(inputs.advantages.addr),
        cu_seqlens: at(inputs.cu_seqlens.addr),
        rows: at(inputs.rows.addr),
        // ref_logits has the shape of logits: read through the same rows
        masked_rows: at(inputs.rows.addr),
        ref_logp: at(0),
    };
    let ws = Workspace::new(l, dims.n, dims.b)?;
    let cfg = VppoConfig {
        perception: Perception::FullKl,
        ..cfg.clone()
    };
    run_perception(
        l,
        perception_kernel(dims.dtype),
        dims,
        &cfg,
        &ref_inputs,
        &ws,
    )?;
    let copy = ws.download(l)?;
    let row_of = |tensor: Tensor, t: usize| {
        // The "masked" rows of this launch are ref_logits'.
        row_of(
            if tensor == Tensor::LogitsMasked {
                Tensor::RefLogits
            } else {
                tensor
            },
            t,
        )
    };
    // The "masked" rows of this launch are ref_logits': errors name it.
    status_error(
        copy.status(&ws),
        targets,
        dims.vocab,
        cfg.temperature,
        &row_of,
    )
    .map_err(as_ref_logits)?;
    let kl: Vec<f32> = copy.get(ws.kl);
    if let Some(t) = kl.iter().position(|&k| k == f32::INFINITY) {
        let (a, c) = (row_of(Tensor::Logits, t)?, row_of(Tensor::RefLogits, t)?);
        return Err(VppoError::KlInfinite {
            tensor: Tensor::RefLogits,
            row: t,
            column: crate::reference::kl_div::kl_infinite_column(&a, &c).unwrap_or(0),
        });
    }
    Ok(FullKl {
        kl,
        lse_ref: copy.get(ws.lse_masked),
    })
}

/// An error of the reference launch, where `logits_masked` stands for `ref_logits`.
fn as_ref_logits(e: VppoError) -> VppoError {
    let rename = |t: Tensor| {
        if t == Tensor::LogitsMasked {
            Tensor::RefLogits
        } else {
            t
        }
    };
    match e {
        VppoError::NonFinite {
            tensor,
            location,
            value,
        } => VppoError::NonFinite {
            tensor: rename(tensor),
            location,
            value,
        },
        VppoError::AllNegInf { tensor, row } => VppoError::AllNegInf {
            tensor: rename(tensor),
            row,
        },
        VppoError::TemperatureOverflow {
            tensor,
            row,
            value,
            temperature,
        } => VppoError::TemperatureOverflow {
            tensor: rename(tensor),
            row,
            value,
            temperature,
        },
        VppoError::RowOverflow { tensor, row } => VppoError::RowOverflow {
            tensor: rename(tensor),
            row,
        },
        other => other,
    }
}

/// Adds the full KL penalty to a forward's output under `cfg` (its aggregation and normalizers):
/// kl_loss = sum_t w_t kl_t, loss += kl_coef kl_loss, and per token ref_kl, lse_ref and
/// dref_kl = kl_coef w_t for the backward.
pub(super) fn apply_full_kl(
    out: &mut VppoOutput,
    full: &FullKl,
    cu_seqlens: &[i32],
    cfg: &VppoConfig,
) {
    let kl: Vec<f64> = full.kl.iter().map(|&k| k as f64).collect();
    let (kl_loss, dkl) = full_kl_loss(&kl, cu_seqlens, cfg);
    out.kl_loss = kl_loss;
    out.loss += cfg.kl_coef * kl_loss;
    out.tokens.ref_kl = full.kl.clone();
    out.tokens.lse_ref = full.lse_ref.clone();
    out.tokens.dref_kl = dkl.into_iter().map(|d| d as f32).collect();
}
