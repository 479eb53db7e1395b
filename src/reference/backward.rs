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
