//! The reference of the general KL op (`vppo.torch.kl`, SPEC section 13), in f64: per token t,
//! with a = p_logits[p_row(t)] / tau, b = q_logits[q_row(t)] / tau, p = softmax(a), q = softmax(b),
//!
//! ```text
//! kl_t = KL(p || q) = sum_v p_v (log p_v - log q_v)          (terms with p_v = 0 add nothing)
//! d kl_t / d a_v = p_v ((log p_v - log q_v) - kl_t) / tau     (pulled back through a = p_logits / tau)
//! d kl_t / d b_v = (q_v - p_v) / tau
//! ```
//!
//! The kernels: the forward is the perception kernel in partial mode (kernels/perception.cu), the
//! backward kernels/kl_div.cu, launched by src/exec/kl_div.rs; the API src/kl_div.rs; tested
//! against this file and finite differences by tests/kl_div.rs.

use crate::batch::KlBatch;
use crate::error::{Location, Result, Tensor, VppoError};
use crate::tensor::{Dtype, GradMut};
use half::{bf16, f16};

/// The forward of the KL op in f64, each [N].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KlDivF64 {
    /// KL(p || q) per token, >= 0 and finite (+inf is an error).
    pub kl: Vec<f64>,
    /// logsumexp(p_logits[row] / tau).
    pub lse_p: Vec<f64>,
    /// logsumexp(q_logits[row] / tau).
    pub lse_q: Vec<f64>,
}

/// The checks of token t's two rows, in the order every device reports them: a NaN or +inf in
/// p_logits, p_logits all -inf, the same for q_logits, a finite logit of either whose quotient by
/// `tau` overflows f32, then KL = +inf (q_v = 0 where p_v > 0). Returns the two rows divided by tau.
fn checked_rows(batch: &KlBatch, t: usize, tau: f64) -> Result<(Vec<f64>, Vec<f64>)> {
    let v = batch.vocab;
    check_token_rows(
        batch.p_logits.row_f64(batch.p_row(t), v),
        batch.q_logits.row_f64(batch.q_row(t), v),
        t,
        tau,
    )
}

/// [`checked_rows`] on token t's two rows `a` (of p_logits) and `b` (of q_logits), widened to f64
/// but not yet divided by `tau`, wherever they were read from (the GPU path copies back only the
/// rows of a token its kernel flagged). Returns them divided by tau.
pub(crate) fn check_token_rows(
    a: Vec<f64>,
    b: Vec<f64>,
    t: usize,
    tau: f64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let row = |tensor: Tensor, x: Vec<f64>| -> Result<Vec<f64>> {
        if let Some(&value) = x.iter().find(|x| x.is_nan() || **x == f64::INFINITY) {
            return Err(VppoError::NonFinite {
                tensor,
                location: Location::Row(t),
                value,
            });
        }
        if x.iter().all(|&x| x == f64::NEG_INFINITY) {
            return Err(VppoError::AllNegInf { tensor, row: t });
        }
        Ok(x)
    };
    let a = row(Tensor::PLogits, a)?;
    let b = row(Tensor::QLogits, b)?;
    for (tensor, x) in [(Tensor::PLogits, &a), (Tensor::QLogits, &b)] {
        if let Some(&value) = x
            .iter()
            .find(|x| x.is_finite() && (*x / tau).abs() > f32::MAX as f64)
        {
            return Err(VppoError::TemperatureOverflow {
                tensor,
                row: t,
                value,
                temperature: tau,
            });
        }
    }
    if let Some(column) = kl_infinite_column(&a, &b) {
        return Err(VppoError::KlInfinite {
            tensor: Tensor::QLogits,
            row: t,
            column,
        });
    }
    let scaled = |x: Vec<f64>| x.into_iter().map(|x| x / tau).collect::<Vec<f64>>();
    Ok((scaled(a), scaled(b)))
}

/// The first column where `a` is above -inf and `b` is -inf (p_v > 0, q_v = 0: KL = +inf).
pub fn kl_infinite_column(a: &[f64], b: &[f64]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(&a, &b)| a != f64::NEG_INFINITY && b == f64::NEG_INFINITY)
}

/// The row checks of [`kl_div`] over every token, first bad row first, without computing anything.
/// The API runs them on the host before a kernel device when the temperature is below 1 (the only
/// case in which a finite logit divided by it overflows f32), so every device reports the same
/// error for the same row.
pub fn check_rows(batch: &KlBatch, tau: f64) -> Result<()> {
    batch.validate()?;
    (0..batch.n_tokens()).try_for_each(|t| checked_rows(batch, t, tau).map(|_| ()))
}

/// logsumexp of a row with at least one finite entry.
fn logsumexp(x: &[f64]) -> f64 {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + x.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
}

/// One token's lse_p, lse_q and kl = KL(softmax(a) || softmax(b)) from its rows already divided by
/// tau (each with a finite entry; terms with a_v = -inf add nothing). Also the full KL penalty's
/// (src/reference/kl.rs).
pub fn token(a: &[f64], b: &[f64]) -> (f64, f64, f64) {
    let (lse_p, lse_q) = (logsumexp(a), logsumexp(b));
    let mut kl = 0.0;
    for (&a, &b) in a.iter().zip(b) {
        if a != f64::NEG_INFINITY {
            let log_p = a - lse_p;
            kl += log_p.exp() * (log_p - (b - lse_q));
        }
    }
    (lse_p, lse_q, kl.max(0.0))
}

/// KL(p || q) per token in f64, with lse of both rows; the shapes ([`KlBatch::validate`]) and every
/// row ([`check_rows`]'s order) are checked first.
pub fn kl_div(batch: &KlBatch, tau: f64) -> Result<KlDivF64> {
    check_temperature(tau)?;
    batch.validate()?;
    let mut out = KlDivF64::default();
    for t in 0..batch.n_tokens() {
        let (a, b) = checked_rows(batch, t, tau)?;
        let (lse_p, lse_q, kl) = token(&a, &b);
        out.lse_p.push(lse_p);
        out.lse_q.push(lse_q);
        out.kl.push(kl);
    }
    Ok(out)
}

/// tau > 0 and finite, with 1 / tau a normal f32 (what the kernels take).
pub fn check_temperature(tau: f64) -> Result<()> {
    let inv = 1.0 / tau;
    if !(tau > 0.0 && tau.is_finite() && (inv as f32).is_normal()) {
        return Err(VppoError::Config {
            field: "temperature",
            value: tau.to_string(),
            expected: "> 0, with 1 / temperature a normal f32",
        });
    }
    Ok(())
}

/// Checks an [N] f32 tensor: its length and finite values.
pub fn check_token_values(tensor: Tensor, x: &[f32], n: usize) -> Result<()> {
    if x.len() != n {
        return Err(VppoError::Shape {
            tensor,
            detail: format!("has {} elements, expected N = {n}", x.len()),
        });
    }
    match x.iter().position(|x| !x.is_finite()) {
        Some(row) => Err(VppoError::NonFinite {
            tensor,
            location: Location::Row(row),
            value: x[row] as f64,
        }),
        None => Ok(()),
    }
}

/// Checks a gradient buffer of the KL op: the dtype of the logits and `len` elements.
pub fn check_grad(tensor: Tensor, grad: &GradMut, batch: &KlBatch, len: usize) -> Result<()> {
    check_grad_buffer(
        tensor,
        (grad.dtype(), grad.len()),
        batch.p_logits.dtype(),
        len,
    )
}

/// [`check_grad`] on a buffer's (dtype, element count), wherever it lives.
pub(crate) fn check_grad_buffer(
    tensor: Tensor,
    (grad_dtype, grad_len): (Dtype, usize),
    dtype: Dtype,
    len: usize,
) -> Result<()> {
    if grad_dtype != dtype {
        return Err(VppoError::Shape {
            tensor,
            detail: format!(
                "dtype {} is not the logits dtype {}",
                grad_dtype.name(),
                dtype.name()
            ),
        });
    }
    if grad_len != len {
        return Err(VppoError::Shape {
            tensor,
            detail: format!("has {grad_len} elements, expected the {len} of its logits"),
        });
    }
    Ok(())
}

/// The gradient of sum_t grad_kl[t] kl_t with respect to both logits tensors, in f64 (lse and kl
/// recomputed in f64 from the rows, not read from a forward), each rounded once into `grad_p`
/// ([R, V], the shape of p_logits) and `grad_q` ([R', V]); rows that no token reads are zero. A
/// gradient beyond its dtype is an overflow error, and both buffers are then zero.
pub fn kl_div_backward(
    batch: &KlBatch,
    tau: f64,
    grad_kl: &[f32],
    mut grad_p: GradMut,
    mut grad_q: GradMut,
) -> Result<()> {
    check_temperature(tau)?;
    batch.validate()?;
    let (n, v) = (batch.n_tokens(), batch.vocab);
    check_token_values(Tensor::GradKl, grad_kl, n)?;
    check_grad(Tensor::GradP, &grad_p, batch, batch.p_logits.len())?;
    check_grad(Tensor::GradQ, &grad_q, batch, batch.q_logits.len())?;
    let mut gp = vec![0.0f64; batch.p_logits.len()];
    let mut gq = vec![0.0f64; batch.q_logits.len()];
    for (t, &u) in grad_kl.iter().enumerate() {
        let (a, b) = checked_rows(batch, t, tau)?;
        let (lse_p, lse_q, kl) = token(&a, &b);
        let u = u as f64;
        let (rp, rq) = (batch.p_row(t) * v, batch.q_row(t) * v);
        for j in 0..v {
            let (log_p, log_q) = (a[j] - lse_p, b[j] - lse_q);
            let (p, q) = (log_p.exp(), log_q.exp());
            // p_v = 0 (a_v = -inf): the term adds nothing to kl, and its gradient is 0
            gp[rp + j] = if a[j] == f64::NEG_INFINITY {
                0.0
            } else {
                u * p * ((log_p - log_q) - kl) / tau
            };
            gq[rq + j] = u * (q - p) / tau;
        }
    }
    // Both checked before either is written: nothing is half-written on an overflow.
    let dtype = batch.p_logits.dtype();
    let fits = |x: f64| match dtype {
        Dtype::F32 => (x as f32).is_finite(),
        Dtype::F16 => f16::from_f64(x).is_finite(),
        Dtype::Bf16 => bf16::from_f64(x).is_finite(),
    };
    for (tensor, g) in [(Tensor::GradP, &gp), (Tensor::GradQ, &gq)] {
        if let Some(i) = g.iter().position(|&x| !fits(x)) {
            round_into(&mut grad_p, &vec![0.0; gp.len()]);
            round_into(&mut grad_q, &vec![0.0; gq.len()]);
            return Err(VppoError::Overflow {
                what: tensor.name(),
                location: Some(Location::Row(i / v)),
                value: g[i],
            });
        }
    }
    round_into(&mut grad_p, &gp);
    round_into(&mut grad_q, &gq);
    Ok(())
}

/// Rounds `g` once into `out` (same length).
fn round_into(out: &mut GradMut, g: &[f64]) {
    match out {
        GradMut::F32(o) => o.iter_mut().zip(g).for_each(|(o, &x)| *o = x as f32),
        GradMut::F16(o) => o
            .iter_mut()
            .zip(g)
            .for_each(|(o, &x)| *o = f16::from_f64(x)),
        GradMut::Bf16(o) => o
            .iter_mut()
            .zip(g)
            .for_each(|(o, &x)| *o = bf16::from_f64(x)),
    }
}
