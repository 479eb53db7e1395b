//! The general KL op (`vppo.torch.kl`, SPEC section 13) on the kernels. Forward: the perception
//! kernel (kernels/perception.cu, unchanged) in partial mode with p_logits as `logits` and q_logits
//! as `logits_masked`: per row the online-softmax state of both rows, finished here in f64 into
//! kl, lse_p and lse_q (the formulas of the kernel's epilogue), with the row checks. Backward:
//! kernels/kl_div.cu, both gradients from the saved lse_p, lse_q and kl, one read of each row.
//!
//! Reference: src/reference/kl_div.rs. API: src/kl_div.rs. Tests: tests/kl_div.rs.

#[allow(unused_imports)]
use super::*;
use crate::batch::KlBatch;
use crate::params::VppoKlDivBackwardParams;
use crate::reference::kl_div::{check_grad, check_token_values, kl_infinite_column};

/// The kl = +inf flag of a partial state (kFlagKlInf of kernels/perception.cu).
const KL_INF: u32 = 1;

pub(super) fn kl_div_kernel(dtype: Dtype) -> Kernel<VppoKlDivBackwardParams> {
    match dtype {
        Dtype::F32 => KL_DIV_BACKWARD_F32,
        Dtype::F16 => KL_DIV_BACKWARD_F16,
        Dtype::Bf16 => KL_DIV_BACKWARD_BF16,
    }
}

/// What the KL op's backward reads of its forward, each [N] f32.
#[derive(Debug, Clone, Copy)]
pub struct KlSaved<'a> {
    /// KL(p || q) per token.
    pub kl: &'a [f32],
    /// logsumexp(p_logits[row] / tau).
    pub lse_p: &'a [f32],
    /// logsumexp(q_logits[row] / tau).
    pub lse_q: &'a [f32],
}

impl KlSaved<'_> {
    /// N finite values of each.
    pub fn check(&self, n: usize) -> Result<()> {
        check_token_values(Tensor::Kl, self.kl, n)?;
        check_token_values(Tensor::LseP, self.lse_p, n)?;
        check_token_values(Tensor::LseQ, self.lse_q, n)
    }
}

/// The forward of the KL op on the kernels: (kl, lse_p, lse_q), each [N] f32, or the first bad
/// row's error. The batch's shapes are checked here; the caller checks the temperature and, below
/// 1, the rows (the reference's `check_rows`).
pub(crate) fn kl_div_forward(
    batch: &KlBatch,
    tau: f64,
    device: Device,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    batch.validate()?;
    let (n, v) = (batch.n_tokens(), batch.vocab);
    if n == 0 {
        return Ok(Default::default());
    }
    let floats = n
        .checked_mul(VPPO_PARTIAL_STATE_FLOATS as usize)
        .ok_or_else(|| VppoError::Shape {
            tensor: Tensor::PLogits,
            detail: format!("N = {n} partial states overflow"),
        })?;
    let l = Launcher::for_device(device)?;
    let p_logits = Input::logits(&l, &batch.p_logits)?;
    let q_logits = Input::logits(&l, &batch.q_logits)?;
    let p_rows = Input::optional(&l, batch.p_rows)?;
    let q_rows = Input::optional(&l, batch.q_index())?;
    // No target: -1 is outside every shard, which partial mode allows (it reads column 0 instead
    // and flags the state as having no target, which is ignored here).
    let no_targets = vec![-1i32; n];
    let targets = Input::new(&l, &no_targets)?;
    let status = l.alloc(8)?;
    let partial = l.alloc(floats * 4)?;
    let p = VppoPerceptionParams {
        logits: p_logits.addr as *const c_void,
        logits_masked: q_logits.addr as *const c_void,
        targets: targets.addr as *const i32,
        status: l.addr(&status) as *mut std::os::raw::c_longlong,
        rows: p_rows.addr as *const i64,
        masked_rows: q_rows.addr as *const i64,
        n_tokens: n as i64,
        vocab: v as i64,
        inv_temperature: (1.0 / tau) as f32,
        score_clamp: 1.0,
        partial: l.addr(&partial) as *mut f32,
        ..Default::default()
    };
    // SAFETY: p_logits and q_logits hold R * V and R' * V elements of the kernel's dtype, with
    // p_rows / the q index [N] in range (KlBatch::validate above) or NULL (then R = N, R' = N),
    // targets N, partial N * 9 floats, status 1, all alive until the download below. In partial
    // mode the kernel reads no old_logp (NULL), writes only `partial`, and reads a target column
    // only when it is in [0, V) (never here: every target is -1), else column 0 (V > 0).
    unsafe {
        l.launch(
            perception_kernel(batch.p_logits.dtype()),
            l.row_grid(n),
            PERCEPTION_THREADS,
            PERCEPTION_THREADS * PERCEPTION_STATE_BYTES,
            &p,
        )?
    };
    let states: Vec<f32> = l.download(&partial, floats)?;
    finish(batch, tau, &states)
}

/// kl, lse_p and lse_q from the rows' states (raw logit units, f32), in f64 with the formulas of
/// the perception kernel's epilogue, checked row by row in the reference's order.
fn finish(batch: &KlBatch, tau: f64, states: &[f32]) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let v = batch.vocab;
    let n = batch.n_tokens();
    let (mut kl, mut lse_p, mut lse_q) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let first_bad = |tensor: Tensor, t: usize| -> f64 {
        let (logits, row) = if tensor == Tensor::PLogits {
            (&batch.p_logits, batch.p_row(t))
        } else {
            (&batch.q_logits, batch.q_row(t))
        };
        logits
            .row_f64(row, v)
            .into_iter()
            .find(|x| x.is_nan() || *x == f64::INFINITY)
            .unwrap_or(f64::NAN)
    };
    for (t, x) in states
        .chunks_exact(VPPO_PARTIAL_STATE_FLOATS as usize)
        .enumerate()
    {
        let w = |i: usize| x[i] as f64;
        let (m_a, s_a, e_a, f_b) = (w(0) / tau, w(1), w(2) / tau, w(3) / tau);
        let (m_b, s_b, flags) = (w(4) / tau, w(5), x[6] as u32);
        for (tensor, s) in [(Tensor::PLogits, s_a), (Tensor::QLogits, s_b)] {
            // s is NaN after a NaN or +inf, 0 for an all -inf row (and in [1, V] otherwise)
            if s.is_nan() {
                return Err(VppoError::NonFinite {
                    tensor,
                    location: Location::Row(t),
                    value: first_bad(tensor, t),
                });
            }
            if s <= 0.0 {
                return Err(VppoError::AllNegInf { tensor, row: t });
            }
        }
        if flags & KL_INF != 0 {
            let a = batch.p_logits.row_f64(batch.p_row(t), v);
            let b = batch.q_logits.row_f64(batch.q_row(t), v);
            return Err(VppoError::KlInfinite {
                tensor: Tensor::QLogits,
                row: t,
                column: kl_infinite_column(&a, &b).unwrap_or(0),
            });
        }
        if !e_a.is_finite() || !f_b.is_finite() {
            let tensor = if e_a.is_finite() {
                Tensor::QLogits
            } else {
                Tensor::PLogits
            };
            return Err(VppoError::RowOverflow { tensor, row: t });
        }
        // kl = (e_a - f_b) / s_a + log(s_b / s_a), the log as log1p for sums that are close
        let k = ((e_a - f_b) / s_a + ((s_b - s_a) / s_a).ln_1p()).max(0.0);
        for (what, value, out) in [
            ("kl", k, &mut kl),
            ("lse_p", m_a + s_a.ln(), &mut lse_p),
            ("lse_q", m_b + s_b.ln(), &mut lse_q),
        ] {
            if value.is_nan() || value.abs() > f32::MAX as f64 {
                return Err(VppoError::Overflow {
                    what,
                    location: Some(Location::Row(t)),
                    value,
                });
            }
            out.push(value as f32);
        }
    }
    Ok((kl, lse_p, lse_q))
}

/// The first element of `g` that is not finite, if any.
fn first_non_finite(g: &GradMut) -> Option<usize> {
    on_dtype!(g, x => x.iter().position(|e| !e.to_f64().is_finite()))
}

/// The backward of the KL op on the kernels: `grad_p` ([R, V], the shape and dtype of p_logits)
/// and `grad_q` ([R', V]) of sum_t grad_kl[t] kl_t, from the forward's `saved` values. Everything
/// the launch indexes with is checked here first. A gradient beyond its dtype is an overflow error,
/// and both buffers are then zero.
pub(crate) fn kl_div_backward(
    batch: &KlBatch,
    tau: f64,
    saved: &KlSaved,
    grad_kl: &[f32],
    mut grad_p: GradMut,
    mut grad_q: GradMut,
    device: Device,
) -> Result<()> {
    batch.validate()?;
    let (n, v) = (batch.n_tokens(), batch.vocab);
    saved.check(n)?;
    check_token_values(Tensor::GradKl, grad_kl, n)?;
    check_grad(Tensor::GradP, &grad_p, batch, batch.p_logits.len())?;
    check_grad(Tensor::GradQ, &grad_q, batch, batch.q_logits.len())?;
    if n == 0 || v == 0 {
        // No token reads a row: every row of both gradients is zero.
        on_dtype!(&mut grad_p, g => g.fill(Default::default()));
        on_dtype!(&mut grad_q, g => g.fill(Default::default()));
        return Ok(());
    }
    let l = &Launcher::for_device(device)?;
    let p_logits = Input::logits(l, &batch.p_logits)?;
    let q_logits = Input::logits(l, &batch.q_logits)?;
    let p_rows = Input::optional(l, batch.p_rows)?;
    let q_rows = Input::optional(l, batch.q_index())?;
    let kl = Input::new(l, saved.kl)?;
    let lse_p = Input::new(l, saved.lse_p)?;
    let lse_q = Input::new(l, saved.lse_q)?;
    let upstream = Input::new(l, grad_kl)?;
    let dtype = batch.p_logits.dtype();
    // On a GPU the kernel writes device buffers (every element: kernels/kl_div.cu), then copied back.
    let device_grads = match l {
        Launcher::Simt(_) => None,
        Launcher::Cuda(_) => Some((
            l.alloc_for_overwrite(grad_p.len() * dtype.size())?,
            l.alloc_for_overwrite(grad_q.len() * dtype.size())?,
        )),
    };
    let (gp_addr, gq_addr) = match &device_grads {
        Some((gp, gq)) => (l.addr(gp), l.addr(gq)),
        None => (
            on_dtype!(&mut grad_p, g => g.as_mut_ptr() as u64),
            on_dtype!(&mut grad_q, g => g.as_mut_ptr() as u64),
        ),
    };
    let (n_p_rows, n_q_rows) = (batch.n_p_rows(), batch.n_q_rows());
    let p = VppoKlDivBackwardParams {
        p_logits: p_logits.addr as *const c_void,
        q_logits: q_logits.addr as *const c_void,
        lse_p: lse_p.addr as *const f32,
        lse_q: lse_q.addr as *const f32,
        kl: kl.addr as *const f32,
        grad_kl: upstream.addr as *const f32,
        grad_p: gp_addr as *mut c_void,
        grad_q: gq_addr as *mut c_void,
        p_rows: p_rows.addr as *const i64,
        q_rows: q_rows.addr as *const i64,
        n_p_rows: n_p_rows as i64,
        n_q_rows: n_q_rows as i64,
        n_tokens: n as i64,
        vocab: v as i64,
        inv_temperature: (1.0 / tau) as f32,
        ..Default::default()
    };
    let items = n_p_rows
        .checked_add(n_q_rows)
        .ok_or_else(|| VppoError::Shape {
            tensor: Tensor::QLogits,
            detail: "R + R' overflows".into(),
        })?;
    // SAFETY: p_logits / grad_p hold R * V elements and q_logits / grad_q R' * V elements of the
    // kernel's dtype (checked above: check_grad and KlBatch::validate), the saved values and
    // grad_kl N each (checked), p_rows and the q index [N] strictly increasing and in range or
    // NULL (validate; then R = N, R' = N). The gradients are fresh device buffers or the caller's
    // slices, borrowed mutably for this whole function, and each element is written by one thread.
    unsafe {
        l.launch(
            kl_div_kernel(dtype),
            l.row_grid(items),
            KL_DIV_THREADS,
            0,
            &p,
        )?
    };
    if let Some((gp, gq)) = device_grads {
        on_dtype!(&mut grad_p, g => l.download_into(&gp, g)?);
        on_dtype!(&mut grad_q, g => l.download_into(&gq, g)?);
    }
    let bad = [(Tensor::GradP, &grad_p), (Tensor::GradQ, &grad_q)]
        .into_iter()
        .find_map(|(tensor, g)| {
            first_non_finite(g).map(|i| (tensor, i, on_dtype!(g, x => x[i].to_f64())))
        });
    if let Some((tensor, i, value)) = bad {
        on_dtype!(&mut grad_p, g => g.fill(Default::default()));
        on_dtype!(&mut grad_q, g => g.fill(Default::default()));
        return Err(VppoError::Overflow {
            what: tensor.name(),
            location: Some(Location::Row(i / v)),
            value,
        });
    }
    Ok(())
}
