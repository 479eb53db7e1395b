//! Pass 3, kernels/backward.cu: dloss/dlogits from the forward's lse and dlogp, into a gradient
//! buffer or in place over the logits.
//!
//! Reference: src/reference/backward.rs. Tests: tests/kernels.rs, tests/memory_safety.rs.

#[allow(unused_imports)]
use super::*;

/// The backward kernel of these dtypes; with `full`, the version that adds the `full` KL penalty's
/// gradient (vppo_backward_full_*, SPEC section 12).
pub(super) fn backward_kernel_for(
    input: Dtype,
    output: Dtype,
    full: bool,
) -> Result<Kernel<VppoBackwardParams>> {
    Ok(match (input, output) {
        (Dtype::F32, Dtype::F32) if full => BACKWARD_FULL_F32_F32,
        (Dtype::F16, Dtype::F32) if full => BACKWARD_FULL_F16_F32,
        (Dtype::F16, Dtype::F16) if full => BACKWARD_FULL_F16_F16,
        (Dtype::Bf16, Dtype::F32) if full => BACKWARD_FULL_BF16_F32,
        (Dtype::Bf16, Dtype::Bf16) if full => BACKWARD_FULL_BF16_BF16,
        (Dtype::F32, Dtype::F32) => BACKWARD_F32_F32,
        (Dtype::F16, Dtype::F32) => BACKWARD_F16_F32,
        (Dtype::F16, Dtype::F16) => BACKWARD_F16_F16,
        (Dtype::Bf16, Dtype::F32) => BACKWARD_BF16_F32,
        (Dtype::Bf16, Dtype::Bf16) => BACKWARD_BF16_BF16,
        (i, o) => {
            return Err(VppoError::Shape {
                tensor: Tensor::GradLogits,
                detail: format!(
                    "dtype {} is neither f32 nor the logits dtype {}",
                    o.name(),
                    i.name()
                ),
            })
        }
    })
}

/// dloss/dlogits into `grad` from a forward's saved lse and dlogp (`out`, checked against the
/// batch and for finite values by [`backward_host`]).
pub(crate) fn backward_into(
    valid: &ValidBatch,
    out: &VppoOutput,
    grad: GradMut,
    device: Device,
) -> Result<()> {
    let batch = valid.batch();
    let saved = SavedForward {
        targets: batch.targets,
        lse: &out.tokens.lse,
        dlogp: &out.tokens.dlogp,
        rows: batch.rows,
    };
    let full = match batch.ref_logits {
        Some(ref_logits) if valid.config().needs_ref_logits() => Some(FullKlSaved {
            ref_logits,
            lse_ref: &out.tokens.lse_ref,
            ref_kl: &out.tokens.ref_kl,
            dref_kl: &out.tokens.dref_kl,
        }),
        _ => None,
    };
    backward_host_full(
        device,
        Some(&batch.logits),
        &saved,
        full.as_ref(),
        batch.vocab,
        grad,
        valid.config(),
        false,
    )
}

/// dloss/dlogits written IN PLACE over host `logits` ([N, V], the forward's logits): afterwards the
/// buffer holds the gradient in the logits dtype. Lengths, targets and `out` are checked by
/// [`backward_host`]. On a GPU the buffer is uploaded, overwritten there by the same kernel, and
/// copied back.
pub(crate) fn backward_in_place(
    logits: GradMut,
    vocab: usize,
    targets: &[i32],
    out: &VppoOutput,
    cfg: &VppoConfig,
    device: Device,
) -> Result<()> {
    let saved = SavedForward {
        targets,
        lse: &out.tokens.lse,
        dlogp: &out.tokens.dlogp,
        rows: None,
    };
    backward_host(device, None, &saved, vocab, logits, cfg, false)
}

/// What the backward reads of a forward: per token the target, lse and dloss/dlogp, and the row
/// index of the logits (SPEC section 10) when the forward read them through one.
#[derive(Debug, Clone, Copy)]
pub struct SavedForward<'a> {
    /// [N] the forward's targets.
    pub targets: &'a [i32],
    /// [N] logsumexp(logits[row] / tau) from the forward.
    pub lse: &'a [f32],
    /// [N] dloss/dlogp from the forward.
    pub dlogp: &'a [f32],
    /// [N] strictly increasing rows of [R, V] logits, or None ([N, V]).
    pub rows: Option<&'a [i64]>,
}

/// What the backward of `kl_penalty = full` (SPEC section 12) reads besides [`SavedForward`]: the
/// reference logits (the shape and dtype of the logits, read through the same rows) and, per token,
/// lse_ref, kl_t and dloss/dkl_t from the forward ([`crate::TokenOutputs`]'s `lse_ref`, `ref_kl`,
/// `dref_kl`).
#[derive(Debug, Clone, Copy)]
pub struct FullKlSaved<'a> {
    /// [N, V] or [R, V]: the reference policy's logits.
    pub ref_logits: Logits<'a>,
    /// [N] logsumexp(ref_logits[row] / tau).
    pub lse_ref: &'a [f32],
    /// [N] kl_t = KL(pi || pi_ref).
    pub ref_kl: &'a [f32],
    /// [N] dloss/dkl_t.
    pub dref_kl: &'a [f32],
}

impl FullKlSaved<'_> {
    /// ref_logits of `logits_len` elements of `dtype`, and N finite values of each per-token tensor.
    pub fn check(&self, logits_len: usize, dtype: Dtype, n: usize) -> Result<()> {
        let r = &self.ref_logits;
        check_full_saved(
            (r.dtype(), r.len()),
            [self.lse_ref, self.ref_kl, self.dref_kl],
            logits_len,
            dtype,
            n,
        )
    }
}

/// [`FullKlSaved::check`] on ref_logits' (dtype, element count), wherever it lives, and host
/// copies of lse_ref, ref_kl and dref_kl.
pub(super) fn check_full_saved(
    (ref_dtype, ref_len): (Dtype, usize),
    values: [&[f32]; 3],
    logits_len: usize,
    dtype: Dtype,
    n: usize,
) -> Result<()> {
    {
        if ref_dtype != dtype || ref_len != logits_len {
            return Err(VppoError::Shape {
                tensor: Tensor::RefLogits,
                detail: format!(
                    "{ref_len} elements of {}, expected the {logits_len} of the logits' dtype {} \
                     (the shape of logits, read through the same rows)",
                    ref_dtype.name(),
                    dtype.name()
                ),
            });
        }
        for (what, values) in ["lse_ref", "ref_kl", "dref_kl"].into_iter().zip(values) {
            if values.len() != n {
                return Err(VppoError::Shape {
                    tensor: Tensor::RefLogits,
                    detail: format!("{what} has {} elements, targets has N = {n}", values.len()),
                });
            }
            if let Some((row, &x)) = values.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                return Err(VppoError::Overflow {
                    what: "ref_kl",
                    location: Some(Location::Row(row)),
                    value: x as f64,
                });
            }
        }
        Ok(())
    }
}

impl SavedForward<'_> {
    /// Checks what a backward indexes with: `logits_len` elements of logits and `grad_len` of the
    /// gradient, both N * V (or R * V through valid rows), targets in [0, V), and N finite values of
    /// lse and dlogp.
    pub fn check(&self, logits_len: usize, grad_len: usize, vocab: usize) -> Result<()> {
        crate::batch::check_targets(self.targets, vocab)?;
        self.check_lengths(logits_len, grad_len, vocab)
    }

    /// [`SavedForward::check`] but the targets' range: for a vocabulary shard, whose targets are
    /// shard-local and lie outside [0, V) where the target's column is in another shard (the kernel
    /// only compares them with its columns).
    pub(crate) fn check_lengths(
        &self,
        logits_len: usize,
        grad_len: usize,
        vocab: usize,
    ) -> Result<()> {
        let n = self.targets.len();
        // The dtype plays no part here (the launch picks the kernel by dtype).
        let shape = (Dtype::F32, logits_len);
        crate::batch::validate_logits_shapes(shape, shape, n, vocab, self.rows, None)?;
        if grad_len != logits_len {
            return Err(VppoError::Shape {
                tensor: Tensor::GradLogits,
                detail: format!("has {grad_len} elements, expected the {logits_len} of logits"),
            });
        }
        for (tensor, values) in [(Tensor::Lse, self.lse), (Tensor::Dlogp, self.dlogp)] {
            if values.len() != n {
                return Err(VppoError::Shape {
                    tensor,
                    detail: format!("has {} elements, targets has N = {n}", values.len()),
                });
            }
            if let Some((row, &x)) = values.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                return Err(VppoError::NonFinite {
                    tensor,
                    location: Location::Row(row),
                    value: x as f64,
                });
            }
        }
        Ok(())
    }
}

/// dloss/dlogits from a forward's saved values, for a caller that keeps only those (the PyTorch
/// op): into `grad` reading `logits`, or in place over `grad` when `logits` is None. Shapes are
/// checked by [`crate::Vppo::backward_saved`].
pub(crate) fn backward_saved(
    device: Device,
    logits: Option<&Logits>,
    saved: &SavedForward,
    vocab: usize,
    grad: GradMut,
    cfg: &VppoConfig,
) -> Result<()> {
    backward_host(device, logits, saved, vocab, grad, cfg, false)
}

/// [`backward_saved`] with the `full` KL penalty's gradient added (SPEC section 12).
pub(crate) fn backward_saved_full(
    device: Device,
    logits: Option<&Logits>,
    saved: &SavedForward,
    full: &FullKlSaved,
    vocab: usize,
    grad: GradMut,
    cfg: &VppoConfig,
) -> Result<()> {
    backward_host_full(device, logits, saved, Some(full), vocab, grad, cfg, false)
}

/// [`backward_saved`] for one vocabulary shard (SPEC section 11): `saved.targets` are shard-local
/// (target minus the shard's first column, any value), `saved.lse` the merged rows' lse, `vocab`
/// the shard's V_r. Each rank writes the gradient of its own columns.
pub(crate) fn backward_shard(
    device: Device,
    logits: &Logits,
    saved: &SavedForward,
    vocab: usize,
    grad: GradMut,
    cfg: &VppoConfig,
) -> Result<()> {
    backward_host(device, Some(logits), saved, vocab, grad, cfg, true)
}

/// The backward kernel into the caller's host buffer `grad` ([N, V], N = `targets.len()`, or [R, V]
/// with rows), reading `logits`, or, when `logits` is None, reading the logits from `grad` itself
/// and overwriting them (in place). On the SIMT executor the kernel writes the caller's buffer
/// directly; on a GPU it writes a device buffer (a copy of `grad` in place, zeros otherwise) that is
/// then copied back.
///
/// Everything the launch indexes with is checked here first, whatever the caller checked
/// ([`SavedForward::check`]): the shapes of `logits` and `grad` against N, V and the rows, the
/// targets' range, and N finite values of lse and dlogp.
pub(super) fn backward_host(
    device: Device,
    logits: Option<&Logits>,
    saved: &SavedForward,
    vocab: usize,
    grad: GradMut,
    cfg: &VppoConfig,
    shard: bool,
) -> Result<()> {
    backward_host_full(device, logits, saved, None, vocab, grad, cfg, shard)
}

/// [`backward_host`], with the `full` KL penalty's gradient added when `full` is given (the
/// vppo_backward_full_* kernels, which also stream the ref_logits row).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_host_full(
    device: Device,
    logits: Option<&Logits>,
    saved: &SavedForward,
    full: Option<&FullKlSaved>,
    vocab: usize,
    mut grad: GradMut,
    cfg: &VppoConfig,
    shard: bool,
) -> Result<()> {
    let n = saved.targets.len();
    let logits_len = logits.map_or(grad.len(), |x| x.len());
    if shard {
        saved.check_lengths(logits_len, grad.len(), vocab)?;
    } else {
        saved.check(logits_len, grad.len(), vocab)?;
    }
    if let Some(f) = full {
        f.check(logits_len, logits.map_or(grad.dtype(), |x| x.dtype()), n)?;
    }
    if n == 0 || vocab == 0 {
        // No token reads a row, but with rows the gradient is still [R, V]: all zeros (SPEC
        // section 10), in place too (the whole buffer becomes the gradient), as the reference writes.
        on_dtype!(&mut grad, g => g.fill(Default::default()));
        return Ok(());
    }
    let l = &Launcher::for_device(device)?;
    let input_dtype = logits.map_or(grad.dtype(), |x| x.dtype());
    let kernel = backward_kernel_for(input_dtype, grad.dtype(), full.is_some())?;
    let logits = logits.map(|x| Input::logits(l, x)).transpose()?;
    let ref_logits = full.map(|f| Input::logits(l, &f.ref_logits)).transpose()?;
    let ref_values = full
        .map(|f| -> Result<[Input; 3]> {
            Ok([
                Input::new(l, f.lse_ref)?,
                Input::new(l, f.ref_kl)?,
                Input::new(l, f.dref_kl)?,
            ])
        })
        .transpose()?;
    let nv = grad.len();
    let targets = Input::new(l, saved.targets)?;
    let lse = Input::new(l, saved.lse)?;
    let dlogp = Input::new(l, saved.dlogp)?;
    let rows = Input::optional(l, saved.rows)?;
    let device_grad = match (l, &logits) {
        (Launcher::Simt(_), _) => None,
        (Launcher::Cuda(_), None) => Some(on_dtype!(&grad, g => l.upload(&g[..]))?),
        // The kernel writes every element of grad (kernels/backward.cu): no zeroing.
        (Launcher::Cuda(_), Some(_)) => Some(l.alloc_for_overwrite(nv * grad.dtype().size())?),
    };
    let grad_addr = match &device_grad {
        Some(buf) => l.addr(buf),
        None => on_dtype!(&mut grad, g => g.as_mut_ptr() as u64),
    };
    let addrs = BackwardAddrs {
        logits: logits.as_ref().map_or(grad_addr, |x| x.addr),
        lse: lse.addr,
        dlogp: dlogp.addr,
        targets: targets.addr,
        grad: grad_addr,
        rows: rows.addr,
        n_rows: nv / vocab,
        full: match (&ref_logits, &ref_values) {
            (Some(r), Some([lse_ref, ref_kl, dref_kl])) => Some(FullAddrs {
                ref_logits: r.addr,
                lse_ref: lse_ref.addr,
                ref_kl: ref_kl.addr,
                dref_kl: dref_kl.addr,
            }),
            _ => None,
        },
    };
    // With the full KL penalty, ref_logits has the shape and dtype of logits and lse_ref, ref_kl,
    // dref_kl N values (FullKlSaved::check above); the kernel only reads them.
    // SAFETY: logits [R, V] of the input dtype (the caller's batch, or the one buffer at grad_addr
    // in place; R = N without rows), lse/dlogp/targets [N], targets in [0, V) (a shard's may lie
    // outside: the kernel compares them with column indices and never reads at one), rows [N] strictly
    // increasing in [0, R) or none, grad [R, V] of the output dtype: all checked at the top of this
    // function. In place, each element is
    // loaded and then stored by the same thread, and no two threads touch one element
    // (kernels/backward.cu). The caller's grad slice is borrowed mutably for this whole function, so
    // nothing else reads or writes it while the kernel does.
    unsafe { launch_backward_kernel(l, kernel, &addrs, n, vocab, cfg)? };
    if let Some(buf) = device_grad {
        on_dtype!(grad, g => l.download_into(&buf, g)?);
    }
    Ok(())
}

/// The buffers of one backward launch, as addresses of the launcher's memory space. `logits` and
/// `grad` are the same address for the in-place backward.
pub(super) struct BackwardAddrs {
    pub(super) logits: u64,
    pub(super) lse: u64,
    pub(super) dlogp: u64,
    pub(super) targets: u64,
    pub(super) grad: u64,
    /// [N] row index or 0 (none), and R, the rows of logits and grad.
    pub(super) rows: u64,
    pub(super) n_rows: usize,
    /// The `full` KL penalty's inputs (the vppo_backward_full_* kernels), or None.
    pub(super) full: Option<FullAddrs>,
}

/// The addresses of a [`FullKlSaved`]: ref_logits ([R, V], the input dtype) and lse_ref, ref_kl,
/// dref_kl ([N] each).
pub(super) struct FullAddrs {
    pub(super) ref_logits: u64,
    pub(super) lse_ref: u64,
    pub(super) ref_kl: u64,
    pub(super) dref_kl: u64,
}

/// Launches the backward kernel over the `a.n_rows` rows of `vocab` logits of `n` tokens.
///
/// # Safety
/// As [`Launcher::launch`]: `logits` and `grad` hold `a.n_rows * vocab` elements of the kernel's
/// input and output dtypes, `lse`, `dlogp` and `targets` hold `n` values, `rows` is 0 (then
/// `a.n_rows` = n) or holds n strictly increasing values in [0, a.n_rows), and nothing else accesses `grad`
/// while the kernel runs (it may alias `logits`: each element is loaded, then stored, by one thread).
/// With `a.full` (and then a vppo_backward_full_* kernel), ref_logits holds `a.n_rows * vocab`
/// elements of the input dtype and lse_ref, ref_kl, dref_kl `n` values.
pub(super) unsafe fn launch_backward_kernel(
    l: &Launcher,
    kernel: Kernel<VppoBackwardParams>,
    a: &BackwardAddrs,
    n: usize,
    vocab: usize,
    cfg: &VppoConfig,
) -> Result<()> {
    let p = VppoBackwardParams {
        logits: a.logits as *const c_void,
        lse: a.lse as *const f32,
        dlogp: a.dlogp as *const f32,
        targets: a.targets as *const i32,
        grad: a.grad as *mut c_void,
        rows: a.rows as *const i64,
        n_rows: a.n_rows as i64,
        n_tokens: n as i64,
        vocab: vocab as i64,
        inv_temperature: (1.0 / cfg.temperature) as f32,
        ref_logits: a.full.as_ref().map_or(0, |f| f.ref_logits) as *const c_void,
        lse_ref: a.full.as_ref().map_or(0, |f| f.lse_ref) as *const f32,
        ref_kl: a.full.as_ref().map_or(0, |f| f.ref_kl) as *const f32,
        dref_kl: a.full.as_ref().map_or(0, |f| f.dref_kl) as *const f32,
        ..Default::default()
    };
    // SAFETY: forwarded from this function's contract.
    unsafe { l.launch(kernel, l.row_grid(a.n_rows), BACKWARD_THREADS, 0, &p) }
}
