//! dloss/dlogits from lse and dloss/dlogp (SPEC section 6).
//!
//! The kernel: kernels/backward.cu, launched by src/exec/backward.rs, tested against this file by
//! tests/kernels.rs; the reference alone by tests/reference_unit.rs and tests/reference_props.rs.

use half::{bf16, f16};

use crate::batch::Logits;
use crate::error::{Result, Tensor, VppoError};
use crate::tensor::GradMut;

/// Writes `dloss/dlogits[t, v] = g_t (1[v = y_t] - exp(a_v - lse_t)) / tau`, `a = logits[t] / tau`, into
/// `grad` ([N, V], f32, f16 or bf16), computing in f64 and rounding once to the buffer's dtype.
///
/// With `rows` (SPEC section 10), `logits` and `grad` are [R, V] and token t owns row `rows[t]`
/// (strictly increasing, in [0, R)); every other row of `grad` is written as zeros.
///
/// A row with g_t = 0 is written as zeros without reading the logits. `lse` is
/// `logsumexp(logits[t] / tau)` (from the perception pass), `dlogp` is g_t (from the surrogate),
/// `targets`, `lse` and `dlogp` have N entries, `logits` and `grad` N * V. Any dtype of `grad` is
/// accepted here; [`crate::Vppo`] restricts it to f32 or the logits dtype.
// Plain slices, one per tensor, so a kernel test can feed this stage directly.
#[allow(clippy::too_many_arguments)]
pub fn grad_logits(
    logits: Logits,
    vocab: usize,
    targets: &[i32],
    lse: &[f64],
    dlogp: &[f64],
    temperature: f64,
    rows: Option<&[i64]>,
    grad: GradMut,
) -> Result<()> {
    let zeros = vec![0.0; lse.len()];
    grad_logits_centred(
        logits,
        vocab,
        targets,
        lse,
        &zeros,
        dlogp,
        temperature,
        rows,
        grad,
    )
}

/// [`grad_logits`] with lse given as a centre and the logsumexp about it: `p_v = exp((a_v - centre_t)
/// - lse_centred_t)`. The reference's own backward passes the row maximum and
/// [`crate::reference::PerceptionF64::lse_centred`], so that rows of huge logits (every logit 1e17)
/// keep their probabilities, which `a_v - (m + lse_centred)` rounds away.
#[allow(clippy::too_many_arguments)]
pub fn grad_logits_centred(
    logits: Logits,
    vocab: usize,
    targets: &[i32],
    centre: &[f64],
    lse_centred: &[f64],
    dlogp: &[f64],
    temperature: f64,
    rows: Option<&[i64]>,
    grad: GradMut,
) -> Result<()> {
    for (row, &y) in targets.iter().enumerate() {
        if y < 0 || y as usize >= vocab {
            return Err(VppoError::TargetOutOfRange {
                row,
                target: y,
                vocab,
            });
        }
    }
    grad_logits_shard(
        logits,
        vocab,
        targets,
        centre,
        lse_centred,
        dlogp,
        temperature,
        rows,
        grad,
    )
}

/// [`grad_logits_centred`] over one vocabulary shard (SPEC section 11): `logits` and `grad` hold
/// the shard's V columns, `targets` are shard-local (the global target minus the shard's first
/// column: outside [0, V) when the target's column is in another shard, whose rows then have no
/// 1[v = y] term here), and `centre` + `lse_centred` the lse of the whole row, merged across shards.
#[allow(clippy::too_many_arguments)]
pub fn grad_logits_shard(
    logits: Logits,
    vocab: usize,
    targets: &[i32],
    centre: &[f64],
    lse_centred: &[f64],
    dlogp: &[f64],
    temperature: f64,
    rows: Option<&[i64]>,
    mut grad: GradMut,
) -> Result<()> {
    let n = targets.len();
    let nv = match rows {
        None => n.checked_mul(vocab).ok_or_else(|| VppoError::Shape {
            tensor: Tensor::Logits,
            detail: format!("N * V = {n} * {vocab} overflows"),
        })?,
        Some(r) => {
            crate::batch::validate_logits_shapes(
                (logits.dtype(), logits.len()),
                (logits.dtype(), logits.len()),
                n,
                vocab,
                Some(r),
                None,
            )?;
            logits.len()
        }
    };
    for (tensor, what, len, want) in [
        (Tensor::Logits, "logits", logits.len(), nv),
        (Tensor::GradLogits, "grad_logits", grad.len(), nv),
        (Tensor::Targets, "lse", centre.len(), n),
        (Tensor::Targets, "lse", lse_centred.len(), n),
        (Tensor::Targets, "dlogp", dlogp.len(), n),
    ] {
        if len != want {
            return Err(VppoError::Shape {
                tensor,
                detail: format!(
                    "{what} has {len} elements, expected {want} (N = {n} targets, V = {vocab})"
                ),
            });
        }
    }
    let mut row = vec![0.0f64; vocab];
    // Output row r is token t's when rows[t] = r (row t without rows), zero otherwise.
    let n_out = nv.checked_div(vocab).unwrap_or(0);
    let mut token_of = vec![None; n_out];
    for t in 0..n {
        token_of[rows.map_or(t, |r| r[t] as usize)] = Some(t);
    }
    for (r, tok) in token_of.into_iter().enumerate() {
        let Some(t) = tok else {
            write_row(&mut grad, r * vocab..(r + 1) * vocab, &vec![0.0; vocab]);
            continue;
        };
        let g = dlogp[t];
        if g == 0.0 {
            row.iter_mut().for_each(|x| *x = 0.0);
        } else {
            let y = targets[t] as i64; // may lie outside this shard's [0, V)
            for (v, out) in row.iter_mut().enumerate() {
                // softmax(a)_v = exp(a_v - lse_t), a_v = logits[r, v] / tau, lse_t = centre_t + lse_centred_t
                let p =
                    ((logits.get(r * vocab + v) / temperature - centre[t]) - lse_centred[t]).exp();
                let onehot = if v as i64 == y { 1.0 } else { 0.0 };
                // g_t (1[v = y] - p_v) / tau
                *out = g * (onehot - p) / temperature;
            }
        }
        write_row(&mut grad, r * vocab..(r + 1) * vocab, &row);
    }
    Ok(())
}

/// [`grad_logits_centred`] plus the gradient of the `full` KL penalty (SPEC section 12): for token t,
/// with a = logits[row] / tau, c = ref_logits[row] / tau, p = softmax(a),
///
/// ```text
/// dloss/dlogits[t, v] = (g_t (1[v = y] - p_v) + d_t p_v ((a_v - lse_a) - (c_v - lse_c) - kl_t)) / tau
/// ```
///
/// with d_t = `full.dkl[t]`, kl_t and lse_c from `full` (a term with p_v = 0 is 0). In f64, rounded
/// once. `logits` and `ref_logits` are [N, V] or [R, V] through `rows` (same shape, checked).
#[allow(clippy::too_many_arguments)]
pub fn grad_logits_full_kl(
    logits: Logits,
    ref_logits: Logits,
    vocab: usize,
    targets: &[i32],
    centre: &[f64],
    lse_centred: &[f64],
    dlogp: &[f64],
    full: &crate::reference::kl::FullKlF64,
    temperature: f64,
    rows: Option<&[i64]>,
    mut grad: GradMut,
) -> Result<()> {
    let n = targets.len();
    if ref_logits.len() != logits.len() || ref_logits.dtype() != logits.dtype() {
        return Err(VppoError::Shape {
            tensor: Tensor::RefLogits,
            detail: "ref_logits must have the shape and dtype of logits".into(),
        });
    }
    for (what, len) in [
        ("kl", full.kl.len()),
        ("lse_ref", full.lse_ref.len()),
        ("dkl", full.dkl.len()),
        ("lse", centre.len()),
        ("lse", lse_centred.len()),
        ("dlogp", dlogp.len()),
    ] {
        if len != n {
            return Err(VppoError::Shape {
                tensor: Tensor::RefLogits,
                detail: format!("{what} has {len} elements, expected N = {n}"),
            });
        }
    }
    crate::batch::validate_logits_shapes(
        (logits.dtype(), logits.len()),
        (logits.dtype(), logits.len()),
        n,
        vocab,
        rows,
        None,
    )?;
    if grad.len() != logits.len() {
        return Err(VppoError::Shape {
            tensor: Tensor::GradLogits,
            detail: format!(
                "has {} elements, expected the {} of logits",
                grad.len(),
                logits.len()
            ),
        });
    }
    crate::batch::check_targets(targets, vocab)?;
    let n_out = logits.len().checked_div(vocab).unwrap_or(0);
    let mut token_of = vec![None; n_out];
    for t in 0..n {
        token_of[rows.map_or(t, |r| r[t] as usize)] = Some(t);
    }
    let tau = temperature;
    let mut row = vec![0.0f64; vocab];
    for (r, tok) in token_of.into_iter().enumerate() {
        row.iter_mut().for_each(|x| *x = 0.0);
        if let Some(t) = tok {
            let (g, d) = (dlogp[t], full.dkl[t]);
            if g != 0.0 || d != 0.0 {
                let lse_a = centre[t] + lse_centred[t];
                for (v, out) in row.iter_mut().enumerate() {
                    let a = logits.get(r * vocab + v) / tau;
                    let c = ref_logits.get(r * vocab + v) / tau;
                    let p = ((a - centre[t]) - lse_centred[t]).exp();
                    let onehot = if v == targets[t] as usize { 1.0 } else { 0.0 };
                    // p_v = 0 (a_v = -inf): the KL term adds nothing (never 0 * inf)
                    let kl_term = if a == f64::NEG_INFINITY {
                        0.0
                    } else {
                        d * p * ((a - lse_a) - (c - full.lse_ref[t]) - full.kl[t])
                    };
                    *out = (g * (onehot - p) + kl_term) / tau;
                }
            }
        }
        write_row(&mut grad, r * vocab..(r + 1) * vocab, &row);
    }
    Ok(())
}

/// Rounds the f64 `row` once into `grad[dst]`.
fn write_row(grad: &mut GradMut, dst: std::ops::Range<usize>, row: &[f64]) {
    match grad {
        GradMut::F32(buf) => buf[dst]
            .iter_mut()
            .zip(row)
            .for_each(|(o, &x)| *o = x as f32),
        GradMut::F16(buf) => buf[dst]
            .iter_mut()
            .zip(row)
            .for_each(|(o, &x)| *o = f16::from_f64(x)),
        GradMut::Bf16(buf) => buf[dst]
            .iter_mut()
            .zip(row)
            .for_each(|(o, &x)| *o = bf16::from_f64(x)),
    }
}
