//! Pass 1, kernels/perception.cu: both logits rows of every token -> lse, logp, kl, k3, entropy,
//! score, and the first bad row in the status word.
//!
//! Reference: src/reference/perception.rs. Tests: tests/kernels.rs, tests/errors.rs.

#[allow(unused_imports)]
use super::*;

pub(super) fn perception_kernel(dtype: Dtype) -> Kernel<VppoPerceptionParams> {
    match dtype {
        Dtype::F32 => PERCEPTION_F32,
        Dtype::F16 => PERCEPTION_F16,
        Dtype::Bf16 => PERCEPTION_BF16,
    }
}

/// Turns the status word of the perception kernel into the error the reference reports.
/// `row_of(tensor, row)` gives a logits row (widened to f64), to name the bad value.
pub(super) fn status_error(
    status: i64,
    targets: &[i32],
    vocab: usize,
    temperature: f64,
    row_of: &dyn Fn(Tensor, usize) -> Result<Vec<f64>>,
) -> Result<()> {
    let Some((row, code)) = status_report(status) else {
        return Ok(());
    };
    let first_bad = |tensor: Tensor| -> Result<f64> {
        Ok(row_of(tensor, row)?
            .into_iter()
            .find(|x| x.is_nan() || *x == f64::INFINITY)
            .unwrap_or(f64::NAN))
    };
    let target = targets[row];
    use VppoErrorCode as C;
    Err(match code {
        c if c == C::VPPO_ERR_TARGET_OUT_OF_RANGE as u32 => {
            VppoError::TargetOutOfRange { row, target, vocab }
        }
        c if c == C::VPPO_ERR_LOGITS_NONFINITE as u32 => VppoError::NonFinite {
            tensor: Tensor::Logits,
            location: Location::Row(row),
            value: first_bad(Tensor::Logits)?,
        },
        c if c == C::VPPO_ERR_LOGITS_ALL_NEG_INF as u32 => VppoError::AllNegInf {
            tensor: Tensor::Logits,
            row,
        },
        c if c == C::VPPO_ERR_TARGET_NEG_INF as u32 => VppoError::TargetNegInf { row, target },
        c if c == C::VPPO_ERR_MASKED_NONFINITE as u32 => VppoError::NonFinite {
            tensor: Tensor::LogitsMasked,
            location: Location::Row(row),
            value: first_bad(Tensor::LogitsMasked)?,
        },
        c if c == C::VPPO_ERR_MASKED_ALL_NEG_INF as u32 => VppoError::AllNegInf {
            tensor: Tensor::LogitsMasked,
            row,
        },
        c if c == C::VPPO_ERR_LOGITS_OVERFLOW as u32 => {
            crate::reference::perception::overflow_error(
                &row_of(Tensor::Logits, row)?,
                &row_of(Tensor::LogitsMasked, row)?,
                row,
                temperature,
            )
        }
        other => VppoError::Kernel(format!(
            "perception kernel reported unknown code {other} at row {row}"
        )),
    })
}

/// Rows of a host batch for [`status_error`].
pub(super) fn host_rows<'a>(
    batch: &'a Batch<'a>,
) -> impl Fn(Tensor, usize) -> Result<Vec<f64>> + 'a {
    move |tensor, row| {
        let logits = if tensor == Tensor::Logits {
            &batch.logits
        } else {
            &batch.logits_masked
        };
        // `row` is the token: name the value in the row that token read.
        let r = if tensor == Tensor::Logits {
            batch.logits_row(row)
        } else {
            batch.masked_row(row)
        };
        Ok(logits.row_f64(r, batch.vocab))
    }
}

/// Pass 1 only: the per-token perception outputs (lse, logp, kl, k3, entropy, score), as the
/// reference's `perception` stage computes them. For stage-by-stage tests and benchmarks.
pub(crate) fn perception(valid: &ValidBatch, device: Device) -> Result<TokenOutputs> {
    perception_with(
        Launcher::for_device(device)?,
        perception_kernel(valid.batch().logits.dtype()),
        valid,
    )
}

/// Pass 1 through a deliberately wrong build of the perception kernel (every exp times 1.001), on the
/// SIMT executor. It exists so the tests can show that their tolerances catch a wrong kernel.
pub(crate) fn mutant_perception(valid: &ValidBatch, order: LaneOrder) -> Result<TokenOutputs> {
    let kernel = match valid.batch().logits.dtype() {
        Dtype::F32 => PERCEPTION_F32_MUTANT,
        Dtype::F16 => PERCEPTION_F16_MUTANT,
        Dtype::Bf16 => PERCEPTION_BF16_MUTANT,
    };
    perception_with(Launcher::Simt(order), kernel, valid)
}

pub(super) fn perception_with(
    l: Launcher,
    kernel: Kernel<VppoPerceptionParams>,
    valid: &ValidBatch,
) -> Result<TokenOutputs> {
    let (batch, cfg) = (valid.batch(), valid.config());
    let ws = Workspace::new(&l, batch.n_tokens(), batch.n_responses())?;
    let inputs = Inputs::new(&l, batch, false)?;
    run_perception(&l, kernel, Dims::of(batch), cfg, &inputs, &ws)?;
    let copy = ws.download(&l)?;
    status_error(
        copy.status(&ws),
        batch.targets,
        batch.vocab,
        cfg.temperature,
        &host_rows(batch),
    )?;
    Ok(perception_outputs(&ws, &copy))
}

/// The per-token outputs of pass 1 in an arena copy; mask and dlogp (pass 2) are left empty.
pub(super) fn perception_outputs(ws: &Workspace, c: &ArenaCopy) -> TokenOutputs {
    TokenOutputs {
        score: c.get(ws.score),
        kl: c.get(ws.kl),
        k3: c.get(ws.k3),
        entropy: c.get(ws.entropy),
        logp: c.get(ws.logp),
        logp_masked: c.get(ws.logp_masked),
        lse: c.get(ws.lse),
        lse_masked: c.get(ws.lse_masked),
        mask: Vec::new(),
        dlogp: Vec::new(),
        ..Default::default()
    }
}

pub(super) fn run_perception(
    l: &Launcher,
    kernel: Kernel<VppoPerceptionParams>,
    dims: Dims,
    cfg: &VppoConfig,
    inp: &Inputs,
    ws: &Workspace,
) -> Result<()> {
    let n = dims.n;
    if n == 0 {
        return Ok(());
    }
    let a = |r: Region| ws.ptr::<f32>(l, r);
    let p = VppoPerceptionParams {
        logits: inp.logits.addr as *const c_void,
        logits_masked: inp.logits_masked.addr as *const c_void,
        targets: inp.targets.addr as *const i32,
        old_logp: inp.old_logp.addr as *const f32,
        lse: a(ws.lse),
        lse_masked: a(ws.lse_masked),
        logp: a(ws.logp),
        logp_masked: a(ws.logp_masked),
        kl: a(ws.kl),
        k3: a(ws.k3),
        entropy: a(ws.entropy),
        score: a(ws.score),
        status: ws.ptr(l, ws.status),
        rows: inp.rows.addr as *const i64,
        masked_rows: inp.masked_rows.addr as *const i64,
        n_tokens: n as i64,
        vocab: dims.vocab as i64,
        inv_temperature: (1.0 / cfg.temperature) as f32,
        score_clamp: cfg.score_clamp as f32,
        perception: match cfg.perception {
            Perception::FullKl => crate::params::VppoPerception::VPPO_PERCEPTION_FULL_KL,
            Perception::K3 => crate::params::VppoPerception::VPPO_PERCEPTION_K3,
        } as i32,
        ..Default::default()
    };
    // SAFETY: logits and logits_masked hold N * V elements of the kernel's dtype (checked by
    // validate_small), targets and old_logp N, every output N, status 1; all live for the launch.
    unsafe {
        l.launch(
            kernel,
            l.row_grid(n),
            PERCEPTION_THREADS,
            PERCEPTION_THREADS * PERCEPTION_STATE_BYTES,
            &p,
        )?
    };
    Ok(())
}

/// Pass 1 over one vocabulary shard in partial mode (SPEC section 11, src/parallel/vocab.rs): per
/// row the merged state of the shard's columns, `VPPO_PARTIAL_STATE_FLOATS` f32 each (raw logit
/// units: m_a, s_a, e_a, f_b, m_b, s_b, flags, a_y, b_y), for the host to merge with the other
/// shards'. `local_targets` [N] are the targets minus the shard's first column (any value: out of
/// the shard where the target's column is elsewhere; the kernel only compares them and reads an
/// in-shard column). No output, no status: the merged rows are checked on the host.
pub(crate) fn perception_partial(
    valid: &ValidBatch,
    local_targets: &[i32],
    device: Device,
) -> Result<Vec<f32>> {
    let (batch, cfg) = (valid.batch(), valid.config());
    let Some(floats) = partial_floats(local_targets, batch.n_tokens())? else {
        return Ok(Vec::new());
    };
    let l = Launcher::for_device(device)?;
    let inputs = Inputs::new(&l, batch, false)?;
    // SAFETY: logits and logits_masked hold N * V elements of the kernel's dtype (or R * V through
    // rows validated in range), old_logp N, all uploaded by Inputs::new.
    unsafe {
        launch_partial(
            &l,
            &inputs,
            local_targets,
            floats,
            batch.vocab,
            batch.logits.dtype(),
            cfg,
        )
    }
}

/// The f32s of N partial states, checked: None for N = 0 (nothing to launch); an error when
/// `local_targets` is not N long or the product overflows.
pub(super) fn partial_floats(local_targets: &[i32], n: usize) -> Result<Option<usize>> {
    if local_targets.len() != n {
        return Err(VppoError::Shape {
            tensor: Tensor::Targets,
            detail: format!("has {} shard-local targets, N = {n}", local_targets.len()),
        });
    }
    if n == 0 {
        return Ok(None);
    }
    n.checked_mul(VPPO_PARTIAL_STATE_FLOATS as usize)
        .map(Some)
        .ok_or_else(|| VppoError::Shape {
            tensor: Tensor::Targets,
            detail: format!("N = {n} partial states overflow"),
        })
}

/// The partial-mode launch of pass 1 on `inputs` ([`perception_partial`], and its GPU-resident
/// form in resident.rs) with `local_targets` uploaded: the `floats` f32s of the states, copied back.
///
/// # Safety
/// `inputs`' logits and logits_masked must hold R * V elements of `dtype` (N * V without rows, its
/// rows in [0, R)) and its old_logp N = local_targets.len() values, live until this returns;
/// `floats` is [`partial_floats`]'s value for them.
pub(super) unsafe fn launch_partial(
    l: &Launcher,
    inputs: &Inputs,
    local_targets: &[i32],
    floats: usize,
    vocab: usize,
    dtype: Dtype,
    cfg: &VppoConfig,
) -> Result<Vec<f32>> {
    let n = local_targets.len();
    // In partial mode the kernel writes no output and no status; the status word is still a live
    // buffer (8 bytes), not the whole workspace of a forward.
    let status = l.alloc(8)?;
    let targets = Input::new(l, local_targets)?;
    let partial = l.alloc(floats * 4)?;
    let p = VppoPerceptionParams {
        logits: inputs.logits.addr as *const c_void,
        logits_masked: inputs.logits_masked.addr as *const c_void,
        targets: targets.addr as *const i32,
        old_logp: inputs.old_logp.addr as *const f32,
        status: l.addr(&status) as *mut std::os::raw::c_longlong,
        rows: inputs.rows.addr as *const i64,
        masked_rows: inputs.masked_rows.addr as *const i64,
        n_tokens: n as i64,
        vocab: vocab as i64,
        inv_temperature: (1.0 / cfg.temperature) as f32,
        score_clamp: cfg.score_clamp as f32,
        partial: l.addr(&partial) as *mut f32,
        ..Default::default()
    };
    // SAFETY: the logits, logits_masked and old_logp as the caller guarantees; targets N (uploaded
    // here), partial N * 9 floats, status 1. In partial mode the kernel writes only `partial` and
    // reads the target's column when it is in [0, V), else column 0 (in bounds: V > 0 whenever
    // N > 0). Every buffer lives until the download below, which waits for the kernel on the one
    // stream it is queued on.
    unsafe {
        l.launch(
            perception_kernel(dtype),
            l.row_grid(n),
            PERCEPTION_THREADS,
            PERCEPTION_THREADS * PERCEPTION_STATE_BYTES,
            &p,
        )?
    };
    l.download(&partial, floats)
}
