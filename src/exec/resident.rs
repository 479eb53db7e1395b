//! GPU-resident batches: the caller's device buffers, used in place (no copy of the logits), the
//! stream joins that order our work after the caller's, and the stage launches the benchmarks time.

#[allow(unused_imports)]
use super::*;

use cudarc::driver::CudaSlice;

impl DeviceLogits<'_> {
    pub(super) fn addr(&self, gpu: &Gpu) -> u64 {
        on_dtype!(self, s => gpu.device_ptr_u64(s))
    }

    /// Row `row` of a [N, V] tensor, copied back and widened to f64 (to name a bad value).
    pub(super) fn row_f64(&self, gpu: &Gpu, row: usize, vocab: usize) -> Result<Vec<f64>> {
        fn copy<T: Elem>(
            gpu: &Gpu,
            s: &CudaSlice<T>,
            row: usize,
            vocab: usize,
        ) -> Result<Vec<f64>> {
            let host = gpu
                .stream()
                .clone_dtoh(&s.slice(row * vocab..(row + 1) * vocab))
                .map_err(|e| crate::cuda::cuda_err(&format!("copying logits row {row} back"), e))?;
            Ok(host.into_iter().map(T::to_f64).collect())
        }
        on_dtype!(self, s => copy(gpu, s, row, vocab))
    }
}

impl DeviceLogitsMut<'_> {
    pub(super) fn addr(&self, gpu: &Gpu) -> u64 {
        self.as_ref().addr(gpu)
    }
}

/// A packed batch (SPEC section 1) whose tensors live on the GPU, borrowed from the caller.
///
/// Streams: vppo runs its kernels on its own stream of the GPU's context. Before it reads or writes
/// a caller's buffer it waits for the work already queued on that buffer's stream (so logits still
/// being written are not read early), and every call synchronizes before it returns. Every buffer
/// must belong to the same context as the `Vppo`'s GPU (`vppo::cuda::Gpu::context`); a buffer of
/// another context is an error, not a launch.
///
/// Validation: the small tensors are copied back once and checked before any launch; the kernels
/// then read the caller's buffers (the backward indexes with a crate-owned copy of the checked
/// rows). In safe Rust nothing can write them meanwhile (the batch borrows them). A caller holding
/// raw device memory (`vppo::cuda::Borrowed`, the Python extension) must not have work writing them
/// queued on a stream the call does not wait for, as for any CUDA kernel reading them.
#[derive(Debug, Clone, Copy)]
pub struct DeviceBatch<'a> {
    /// [N, V] logits given the real image.
    pub logits: DeviceLogits<'a>,
    /// [N, V] logits given the masked image; same dtype.
    pub logits_masked: DeviceLogits<'a>,
    /// [N] sampled token ids.
    pub targets: &'a CudaSlice<i32>,
    /// [N] old log-probs.
    pub old_logp: &'a CudaSlice<f32>,
    /// [B] advantages.
    pub advantages: &'a CudaSlice<f32>,
    /// [B+1] response boundaries.
    pub cu_seqlens: &'a CudaSlice<i32>,
    /// V.
    pub vocab: usize,
    /// [N] optional: the reference policy's log-prob of each target, read by the KL penalty
    /// (SPEC section 12; required when `kl_penalty` is not none).
    pub ref_logp: Option<&'a CudaSlice<f32>>,
    /// [N] optional row of `logits` each token reads (SPEC section 10): strictly increasing, in
    /// [0, R) for [R, V] logits (the model's rows, prompt rows included). None: [N, V].
    pub rows: Option<&'a CudaSlice<i64>>,
    /// [N] optional row of `logits_masked` each token reads (any order); None: through `rows` when
    /// both tensors have the same shape, else [N, V].
    pub masked_rows: Option<&'a CudaSlice<i64>>,
    /// Optional: the reference policy's logits, read by `kl_penalty = full` (SPEC section 12; required
    /// then): the shape and dtype of `logits`, read through the same `rows`.
    pub ref_logits: Option<DeviceLogits<'a>>,
}

/// The result of a forward pass on GPU-resident inputs: every output copied to the host (O(N + B)),
/// and the per-token buffers the backward reads kept on the GPU.
pub struct DeviceForward {
    /// All outputs of SPEC section 8 but the gradient.
    pub output: VppoOutput,
    pub(super) gpu: Arc<Gpu>,
    pub(super) ws: Option<Workspace>,
    pub(super) targets: Vec<i32>,
    pub(super) vocab: usize,
    pub(super) dtype: Dtype,
    /// The validated rows of the logits (a crate-owned copy, so the backward never indexes with a
    /// buffer it has not checked) and R, the rows of logits and gradient (N without rows).
    pub(super) rows: Option<CudaSlice<i64>>,
    pub(super) n_rows: usize,
}

impl DeviceForward {
    /// Checks that logits given to a backward have the dtype the forward read.
    pub(super) fn check_logits_dtype(&self, dtype: Dtype) -> Result<()> {
        if dtype != self.dtype {
            return Err(VppoError::Shape {
                tensor: Tensor::Logits,
                detail: "dtype differs from the forward's".into(),
            });
        }
        Ok(())
    }
}

impl std::fmt::Debug for DeviceForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceForward")
            .field("output", &self.output)
            .field("gpu", &self.gpu)
            .finish()
    }
}

/// Host copies of the O(N + B) tensors of a device batch.
pub(crate) struct SmallHost {
    pub(super) targets: Vec<i32>,
    pub(super) old_logp: Vec<f32>,
    pub(super) advantages: Vec<f32>,
    pub(super) cu_seqlens: Vec<i32>,
    pub(super) ref_logp: Option<Vec<f32>>,
    pub(super) rows: Option<Vec<i64>>,
    pub(super) masked_rows: Option<Vec<i64>>,
}

/// The O(N + B) tensors of a device batch (targets, old_logp, advantages, cu_seqlens and ref_logp
/// when given), gathered on the device into one buffer and copied back in one transfer: one wait for
/// the GPU, not four.
pub(super) fn download_small_tensors(gpu: &Gpu, batch: &DeviceBatch) -> Result<SmallHost> {
    let mut layout = ArenaLayout::new(16);
    let targets = layout.array::<i32>(batch.targets.len());
    let old_logp = layout.array::<f32>(batch.old_logp.len());
    let advantages = layout.array::<f32>(batch.advantages.len());
    let cu_seqlens = layout.array::<i32>(batch.cu_seqlens.len());
    let ref_logp = batch.ref_logp.map(|r| (r, layout.array::<f32>(r.len())));
    let rows = batch.rows.map(|r| (r, layout.array::<i64>(r.len())));
    let masked_rows = batch.masked_rows.map(|r| (r, layout.array::<i64>(r.len())));
    let mut raw = vec![0u8; layout.end];
    if layout.end > 0 {
        let mut staging = gpu.alloc_uninit::<u8>(layout.end)?;
        gpu.copy_bytes_on_device(batch.targets, &mut staging, targets.offset)?;
        gpu.copy_bytes_on_device(batch.old_logp, &mut staging, old_logp.offset)?;
        gpu.copy_bytes_on_device(batch.advantages, &mut staging, advantages.offset)?;
        gpu.copy_bytes_on_device(batch.cu_seqlens, &mut staging, cu_seqlens.offset)?;
        if let Some((r, region)) = ref_logp {
            gpu.copy_bytes_on_device(r, &mut staging, region.offset)?;
        }
        for (r, region) in rows.iter().chain(&masked_rows) {
            gpu.copy_bytes_on_device(*r, &mut staging, region.offset)?;
        }
        gpu.download_range_into(&staging, 0, &mut raw)?;
    }
    let copy = ArenaCopy(raw);
    Ok(SmallHost {
        targets: copy.get(targets),
        old_logp: copy.get(old_logp),
        advantages: copy.get(advantages),
        cu_seqlens: copy.get(cu_seqlens),
        ref_logp: ref_logp.map(|(_, region)| copy.get(region)),
        rows: rows.map(|(_, region)| copy.get(region)),
        masked_rows: masked_rows.map(|(_, region)| copy.get(region)),
    })
}

/// Where a caller's buffer lives: its context and the stream its pending work is queued on.
pub(super) type Residence<'a> = (
    Tensor,
    &'a Arc<cudarc::driver::CudaContext>,
    &'a Arc<cudarc::driver::CudaStream>,
);

pub(super) fn residence<T>(tensor: Tensor, s: &CudaSlice<T>) -> Residence<'_> {
    (tensor, s.context(), s.stream())
}

impl<'a> DeviceLogits<'a> {
    pub(super) fn residence(&self, tensor: Tensor) -> Residence<'a> {
        on_dtype!(*self, s => residence(tensor, s))
    }
}

impl DeviceLogitsMut<'_> {
    pub(super) fn residence(&self, tensor: Tensor) -> Residence<'_> {
        self.as_ref().residence(tensor)
    }
}

impl<'a> DeviceBatch<'a> {
    /// The row index `logits_masked` is read through: `masked_rows`, else `rows` when both tensors
    /// have the same length (SPEC section 10), else none. As `Batch::masked_index`.
    pub(super) fn masked_index(&self) -> Option<&'a CudaSlice<i64>> {
        match (self.masked_rows, self.rows) {
            (Some(m), _) => Some(m),
            (None, Some(r)) if self.logits_masked.len() == self.logits.len() => Some(r),
            _ => None,
        }
    }

    /// Where each of the batch's buffers lives, for [`join_caller_streams`].
    pub(super) fn residences(&self) -> Vec<Residence<'a>> {
        let mut all = vec![
            self.logits.residence(Tensor::Logits),
            self.logits_masked.residence(Tensor::LogitsMasked),
            residence(Tensor::Targets, self.targets),
            residence(Tensor::OldLogp, self.old_logp),
            residence(Tensor::Advantages, self.advantages),
            residence(Tensor::CuSeqlens, self.cu_seqlens),
        ];
        all.extend(self.ref_logp.map(|r| residence(Tensor::RefLogp, r)));
        all.extend(self.rows.map(|r| residence(Tensor::Rows, r)));
        all.extend(self.masked_rows.map(|r| residence(Tensor::MaskedRows, r)));
        all.extend(self.ref_logits.map(|r| r.residence(Tensor::RefLogits)));
        all
    }
}

/// Checks that every caller buffer lives in this GPU's context, and orders this GPU's stream after
/// the work already queued on the buffers' own streams (an event recorded there, waited for here):
/// logits still being written on the caller's stream are not read early, and a gradient buffer still
/// being read there is not overwritten early. Our work is synchronized before the API returns.
pub(super) fn join_caller_streams(gpu: &Gpu, buffers: &[Residence]) -> Result<()> {
    // One wait per distinct stream, by driver handle (a batch's tensors usually share one; the
    // crate's own stream needs none).
    let mut joined = vec![gpu.stream().cu_stream()];
    for (tensor, ctx, stream) in buffers {
        if ***ctx != **gpu.context() {
            return Err(VppoError::Shape {
                tensor: *tensor,
                detail: format!(
                    "lives on GPU {} (another CUDA context), this Vppo runs on GPU {}",
                    ctx.ordinal(),
                    gpu.ordinal()
                ),
            });
        }
        if !joined.contains(&stream.cu_stream()) {
            joined.push(stream.cu_stream());
            let err = |e: cudarc::driver::DriverError| {
                crate::cuda::cuda_err(&format!("ordering after the stream of {tensor}"), e)
            };
            let event = stream.record_event(None).map_err(err)?;
            gpu.stream().wait(&event).map_err(err)?;
        }
    }
    Ok(())
}

/// The forward pass on the caller's device buffers. The O(N + B) tensors (targets, old_logp,
/// advantages, cu_seqlens, ref_logp) are copied back once and validated on the host before any launch; the
/// logits are only read by the perception kernel.
pub(crate) fn forward_device(
    gpu: &Arc<Gpu>,
    batch: &DeviceBatch,
    cfg: &VppoConfig,
) -> Result<DeviceForward> {
    forward_device_then(gpu, batch, cfg, &mut |_, _| Ok(None))
}

/// What a data-parallel forward calls after pass 1: the first output and the batch's cu_seqlens
/// in, the config pass 2 reruns under (or None: no rerun) out.
pub(crate) type ThenFn<'a> = dyn FnMut(&VppoOutput, &[i32]) -> Result<Option<VppoConfig>> + 'a;

/// [`forward_device`], then pass 2 once more under the config `then` derives from the first output
/// and the batch's cu_seqlens (copied back for validation), if it returns one: the device form of
/// [`super::forward_then`] (data parallel, src/parallel/mod.rs). Pass 1 runs once; the second
/// select + loss rewrites mask, dlogp, alpha and the totals in the workspace, so the backward of
/// the result reads the second config's dlogp.
pub(crate) fn forward_device_then(
    gpu: &Arc<Gpu>,
    batch: &DeviceBatch,
    cfg: &VppoConfig,
    then: &mut ThenFn,
) -> Result<DeviceForward> {
    cfg.validate()?;
    join_caller_streams(gpu, &batch.residences())?;
    let SmallHost {
        targets,
        old_logp,
        advantages,
        cu_seqlens,
        ref_logp,
        rows,
        masked_rows,
    } = download_small_tensors(gpu, batch)?;
    let (logits_len, masked_len) = (batch.logits.len(), batch.logits_masked.len());
    crate::batch::SmallTensors {
        logits: (batch.logits.dtype(), logits_len),
        logits_masked: (batch.logits_masked.dtype(), masked_len),
        targets: &targets,
        old_logp: &old_logp,
        advantages: &advantages,
        cu_seqlens: &cu_seqlens,
        vocab: batch.vocab,
        rows: rows.as_deref(),
        masked_rows: masked_rows.as_deref(),
        ref_logp: ref_logp.as_deref(),
    }
    .validate(cfg.group_size, cfg.needs_groups())?;
    crate::batch::check_ref_logp_given(cfg, ref_logp.is_some())?;
    crate::batch::check_ref_logits_shape(
        cfg,
        (batch.logits.dtype(), logits_len),
        batch.ref_logits.map(|r| (r.dtype(), r.len())),
    )?;
    let (n, b) = (targets.len(), advantages.len());
    let dims = Dims {
        n,
        b,
        vocab: batch.vocab,
        dtype: batch.logits.dtype(),
    };
    // Validated above: V > 0 whenever N > 0, and R * V = the logits' length.
    let n_rows = logits_len.checked_div(batch.vocab).unwrap_or(n);
    let z = cfg.token_normalizer.unwrap_or(n as f64);
    if n == 0 {
        let first = empty_output(z, b);
        let output = match then(&first, &cu_seqlens)? {
            Some(c) => empty_output(c.token_normalizer.unwrap_or(0.0), b),
            None => first,
        };
        return Ok(DeviceForward {
            output,
            gpu: gpu.clone(),
            ws: None,
            targets,
            vocab: batch.vocab,
            dtype: dims.dtype,
            rows: None,
            n_rows,
        });
    }
    let l = Launcher::Cuda(gpu.clone());
    let masked_index = crate::batch::effective_masked_rows(
        rows.as_deref(),
        masked_rows.as_deref(),
        logits_len,
        masked_len,
    );
    let inputs = Inputs::device(gpu, batch);
    let ws = Workspace::new(&l, n, b)?;
    let row_of = |tensor: Tensor, token: usize| {
        // `token` names the token: copy back the row it read.
        let (logits, index) = if tensor == Tensor::Logits {
            (&batch.logits, rows.as_deref())
        } else {
            (&batch.logits_masked, masked_index)
        };
        let row = index.map_or(token, |r| r[token] as usize);
        logits.row_f64(gpu, row, batch.vocab)
    };
    let mut output = run_passes(&l, dims, cfg, &inputs, &ws, &targets, &row_of)?;
    // kl_penalty = full: the reference launch of pass 1 over ref_logits, in place (exec/full_kl.rs),
    // added on the host, and again after a rerun of pass 2 (as super::forward_then does)
    let full = match (cfg.needs_ref_logits(), batch.ref_logits) {
        (true, Some(reference)) => {
            let ref_row_of = |tensor: Tensor, token: usize| {
                let row = rows.as_deref().map_or(token, |r| r[token] as usize);
                let logits = if tensor == Tensor::Logits {
                    &batch.logits
                } else {
                    &reference
                };
                logits.row_f64(gpu, row, batch.vocab)
            };
            let ref_input = Input::borrowed(reference.addr(gpu));
            let full =
                full_kl::full_kl_launch(&l, dims, cfg, &inputs, ref_input, &targets, &ref_row_of)?;
            full_kl::apply_full_kl(&mut output, &full, &cu_seqlens, cfg);
            Some(full)
        }
        _ => None,
    };
    if let Some(second) = then(&output, &cu_seqlens)? {
        run_select_loss(&l, dims, &second, &inputs, &ws)?;
        let copy = ws.download(&l)?;
        output = output_from(&ws, &copy, second.token_normalizer.unwrap_or(n as f64));
        if let Some(full) = &full {
            full_kl::apply_full_kl(&mut output, full, &cu_seqlens, &second);
        }
    }
    let rows = rows.map(|r| gpu.upload(&r)).transpose()?;
    Ok(DeviceForward {
        output,
        gpu: gpu.clone(),
        ws: Some(ws),
        targets,
        vocab: batch.vocab,
        dtype: dims.dtype,
        rows,
        n_rows,
    })
}

/// Queues the backward kernel of a [`forward_device`] on the GPU's stream: dloss/dlogits into `grad`
/// (f32, or the logits dtype) from the logits at `logits_addr`, which with `targets` must be the
/// buffers the forward read (lengths are checked). It does not wait: the caller synchronizes (or
/// records an event and waits for it) before any of the buffers is dropped or read on the host.
/// Zeroes a gradient on the GPU's stream; nothing for an empty one (torch's empty CUDA tensor may
/// have a null address, which the driver's memset need not accept, even for 0 bytes).
pub(super) fn zero_gradient(gpu: &Gpu, grad: &mut DeviceLogitsMut) -> Result<()> {
    if grad.is_empty() {
        return Ok(());
    }
    on_dtype!(grad, g => gpu.stream().memset_zeros(&mut **g))
        .map_err(|e| crate::cuda::cuda_err("zeroing a gradient", e))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn launch_backward(
    fwd: &DeviceForward,
    logits_addr: u64,
    logits_len: usize,
    logits_residence: Option<Residence>,
    targets: &CudaSlice<i32>,
    grad: &mut DeviceLogitsMut,
    cfg: &VppoConfig,
    ref_logits: Option<DeviceLogits>,
) -> Result<()> {
    let n = fwd.targets.len();
    // R rows of V (R = N without rows), as the forward read.
    check_elements(Tensor::Logits, logits_len, fwd.n_rows, fwd.vocab)?;
    check_elements(Tensor::GradLogits, grad.len(), fwd.n_rows, fwd.vocab)?;
    // kl_penalty = full: ref_logits of the logits' shape and dtype (the forward's per-token values
    // are in its output).
    let reference = match (cfg.needs_ref_logits(), ref_logits) {
        (false, _) => None,
        (true, None) => {
            return Err(VppoError::MissingTensor {
                tensor: Tensor::RefLogits,
                needed_by: "kl_penalty = full: the in-place backward has no ref_logits; use \
                            backward_device"
                    .into(),
            })
        }
        (true, Some(r)) => {
            crate::batch::check_ref_logits_shape(
                cfg,
                (fwd.dtype, logits_len),
                Some((r.dtype(), r.len())),
            )?;
            // The forward's lse_ref, ref_kl and dref_kl, which the kernel reads N of each: its
            // output is the caller's to change, so N finite values are checked here, as the saved
            // backward checks them.
            let t = &fwd.output.tokens;
            super::backward::check_full_saved(
                (r.dtype(), r.len()),
                [&t.lse_ref, &t.ref_kl, &t.dref_kl],
                logits_len,
                fwd.dtype,
                n,
            )?;
            Some(r)
        }
    };
    if targets.len() != n {
        return Err(VppoError::Shape {
            tensor: Tensor::Targets,
            detail: format!("has {} elements, the forward had N = {n}", targets.len()),
        });
    }
    let gpu = &fwd.gpu;
    let mut buffers = vec![
        residence(Tensor::Targets, targets),
        grad.residence(Tensor::GradLogits),
    ];
    buffers.extend(logits_residence);
    buffers.extend(reference.map(|r| r.residence(Tensor::RefLogits)));
    join_caller_streams(gpu, &buffers)?;
    let Some(ws) = &fwd.ws else {
        // No token reads a row, but with rows the gradient is still [R, V]: all zeros (SPEC
        // section 10), as the host backward and the reference write.
        return zero_gradient(gpu, grad);
    };
    let l = Launcher::Cuda(gpu.clone());
    let kernel = backward_kernel_for(fwd.dtype, grad.dtype(), reference.is_some())?;
    // The forward's lse_ref, ref_kl and dref_kl (N finite values each, checked above), uploaded.
    let tokens = &fwd.output.tokens;
    let full_values = reference
        .map(|_| -> Result<[CudaSlice<f32>; 3]> {
            Ok([
                gpu.upload(&tokens.lse_ref)?,
                gpu.upload(&tokens.ref_kl)?,
                gpu.upload(&tokens.dref_kl)?,
            ])
        })
        .transpose()?;
    let addrs = BackwardAddrs {
        logits: logits_addr,
        lse: ws.addr(&l, ws.lse),
        dlogp: ws.addr(&l, ws.dlogp),
        targets: gpu.device_ptr_u64(targets),
        grad: grad.addr(gpu),
        rows: fwd.rows.as_ref().map_or(0, |r| gpu.device_ptr_u64(r)),
        n_rows: fwd.n_rows,
        full: match (reference, &full_values) {
            (Some(r), Some([lse_ref, ref_kl, dref_kl])) => Some(FullAddrs {
                ref_logits: r.addr(gpu),
                lse_ref: gpu.device_ptr_u64(lse_ref),
                ref_kl: gpu.device_ptr_u64(ref_kl),
                dref_kl: gpu.device_ptr_u64(dref_kl),
            }),
            _ => None,
        },
    };
    // SAFETY: logits and grad hold R * V elements of their dtypes (checked above), lse, dlogp and
    // targets N, rows (the forward's validated copy) N strictly increasing values in [0, R); with
    // full, ref_logits R * V elements of the logits' dtype (checked above) and lse_ref, ref_kl,
    // dref_kl our uploads of the forward's N values; grad is borrowed mutably by the caller for this call; the kernel is queued on the
    // one stream every buffer of this Gpu lives on, and a CudaSlice is freed in stream order (or
    // after a synchronize), so every buffer outlives the kernel even when the caller does not wait.
    unsafe { launch_backward_kernel(&l, kernel, &addrs, n, fwd.vocab, cfg) }
}

/// dloss/dlogits of a [`forward_device`] into the caller's device buffer `grad`.
pub(crate) fn backward_device(
    fwd: &DeviceForward,
    batch: &DeviceBatch,
    mut grad: DeviceLogitsMut,
    cfg: &VppoConfig,
) -> Result<()> {
    fwd.check_logits_dtype(batch.logits.dtype())?;
    launch_backward(
        fwd,
        batch.logits.addr(&fwd.gpu),
        batch.logits.len(),
        Some(batch.logits.residence(Tensor::Logits)),
        batch.targets,
        &mut grad,
        cfg,
        batch.ref_logits,
    )?;
    fwd.gpu.synchronize()
}

/// dloss/dlogits of a [`forward_device`] written IN PLACE over `logits`: after this call the buffer
/// holds the gradient (in the logits dtype), not the logits. Nothing else may read those logits as
/// logits afterwards: an autograd framework that saved them for another op must not use this.
pub(crate) fn backward_device_in_place(
    fwd: &DeviceForward,
    mut logits: DeviceLogitsMut,
    targets: &CudaSlice<i32>,
    cfg: &VppoConfig,
) -> Result<()> {
    fwd.check_logits_dtype(logits.dtype())?;
    let addr = logits.addr(&fwd.gpu);
    launch_backward(
        fwd,
        addr,
        logits.len(),
        None,
        targets,
        &mut logits,
        cfg,
        None,
    )?;
    fwd.gpu.synchronize()
}

/// What a forward saved for its backward, on the GPU (per token: target, lse, dlogp; the rows it
/// read): the device form of [`SavedForward`], for a caller that keeps only those tensors, as an
/// autograd framework does (the PyTorch entry point's CUDA path).
#[derive(Debug, Clone, Copy)]
pub struct DeviceSaved<'a> {
    /// [N] the forward's targets.
    pub targets: &'a CudaSlice<i32>,
    /// [N] logsumexp(logits[row] / tau) from the forward.
    pub lse: &'a CudaSlice<f32>,
    /// [N] dloss/dlogp from the forward (scaled by the incoming gradient of the loss).
    pub dlogp: &'a CudaSlice<f32>,
    /// [N] strictly increasing rows of [R, V] logits, or None ([N, V]).
    pub rows: Option<&'a CudaSlice<i64>>,
}

/// What the backward of `kl_penalty = full` reads besides [`DeviceSaved`], on the GPU: the device
/// form of [`FullKlSaved`] (ref_logits of the logits' shape and dtype, read through the same rows,
/// and the forward's per-token lse_ref, ref_kl and dref_kl, [N] f32 each).
#[derive(Debug, Clone, Copy)]
pub struct DeviceFullKlSaved<'a> {
    /// [N, V] or [R, V]: the reference policy's logits.
    pub ref_logits: DeviceLogits<'a>,
    /// [N] logsumexp(ref_logits[row] / tau).
    pub lse_ref: &'a CudaSlice<f32>,
    /// [N] kl_t = KL(pi || pi_ref).
    pub ref_kl: &'a CudaSlice<f32>,
    /// [N] dloss/dkl_t.
    pub dref_kl: &'a CudaSlice<f32>,
}

/// A vocabulary shard's targets from the global ones (src/parallel/vocab.rs: checked against the
/// whole vocabulary, minus the shard's first column).
pub(crate) type ShardTargets<'a> = dyn Fn(&[i32]) -> Result<Vec<i32>> + 'a;

/// dloss/dlogits from a [`DeviceSaved`] into the caller's device buffer `grad`, reading `logits`,
/// or, with `logits` None, reading the logits from `grad` and overwriting them (in place).
///
/// The O(N) saved tensors are copied back once (one transfer) and checked as the host backward
/// checks them ([`SavedForward::check`]: shapes against N, V and the rows, targets in [0, V), lse and
/// dlogp finite) before any launch; the kernel then indexes rows through a crate-owned copy of the
/// checked rows. Ordered after the work queued on every buffer's stream; synchronizes before it
/// returns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_saved_device(
    gpu: &Arc<Gpu>,
    logits: Option<DeviceLogits>,
    vocab: usize,
    saved: &DeviceSaved,
    full: Option<&DeviceFullKlSaved>,
    mut grad: DeviceLogitsMut,
    cfg: &VppoConfig,
    check_dlogp: &dyn Fn(&[f32]) -> Result<()>,
    shard: Option<&ShardTargets<'_>>,
) -> Result<()> {
    let mut buffers = vec![
        residence(Tensor::Targets, saved.targets),
        residence(Tensor::Lse, saved.lse),
        residence(Tensor::Dlogp, saved.dlogp),
        grad.residence(Tensor::GradLogits),
    ];
    buffers.extend(logits.map(|x| x.residence(Tensor::Logits)));
    buffers.extend(saved.rows.map(|r| residence(Tensor::Rows, r)));
    if let Some(f) = full {
        buffers.push(f.ref_logits.residence(Tensor::RefLogits));
        for x in [f.lse_ref, f.ref_kl, f.dref_kl] {
            buffers.push(residence(Tensor::RefLogits, x));
        }
    }
    join_caller_streams(gpu, &buffers)?;

    let mut layout = ArenaLayout::new(16);
    let targets = layout.array::<i32>(saved.targets.len());
    let lse = layout.array::<f32>(saved.lse.len());
    let dlogp = layout.array::<f32>(saved.dlogp.len());
    let rows = saved.rows.map(|r| (r, layout.array::<i64>(r.len())));
    let full_values =
        full.map(|f| [f.lse_ref, f.ref_kl, f.dref_kl].map(|x| (x, layout.array::<f32>(x.len()))));
    let mut raw = vec![0u8; layout.end];
    if layout.end > 0 {
        let mut staging = gpu.alloc_uninit::<u8>(layout.end)?;
        gpu.copy_bytes_on_device(saved.targets, &mut staging, targets.offset)?;
        gpu.copy_bytes_on_device(saved.lse, &mut staging, lse.offset)?;
        gpu.copy_bytes_on_device(saved.dlogp, &mut staging, dlogp.offset)?;
        if let Some((r, region)) = rows {
            gpu.copy_bytes_on_device(r, &mut staging, region.offset)?;
        }
        for (x, region) in full_values.iter().flatten() {
            gpu.copy_bytes_on_device(*x, &mut staging, region.offset)?;
        }
        gpu.download_range_into(&staging, 0, &mut raw)?;
    }
    let copy = ArenaCopy(raw);
    let host_full: Option<[Vec<f32>; 3]> =
        full_values.map(|v| v.map(|(_, region)| copy.get(region)));
    let host_targets: Vec<i32> = copy.get(targets);
    let host_lse: Vec<f32> = copy.get(lse);
    let host_dlogp: Vec<f32> = copy.get(dlogp);
    let host_rows: Option<Vec<i64>> = rows.map(|(_, region)| copy.get(region));
    let logits_len = logits.map_or(grad.len(), |x| x.len());
    let input_dtype = logits.map_or(grad.dtype(), |x| x.dtype());
    let host_saved = SavedForward {
        targets: &host_targets,
        lse: &host_lse,
        dlogp: &host_dlogp,
        rows: host_rows.as_deref(),
    };
    // A vocabulary shard's targets are checked against the whole vocabulary and taken into the
    // shard (any value: the kernel only compares them with its columns).
    let local_targets = match shard {
        Some(local) => {
            host_saved.check_lengths(logits_len, grad.len(), vocab)?;
            Some(local(&host_targets)?)
        }
        None => {
            host_saved.check(logits_len, grad.len(), vocab)?;
            None
        }
    };
    crate::batch::check_grad_dtype(input_dtype, grad.dtype())?;
    if let (Some(f), Some([lse_ref, ref_kl, dref_kl])) = (full, &host_full) {
        let r = f.ref_logits;
        super::backward::check_full_saved(
            (r.dtype(), r.len()),
            [lse_ref, ref_kl, dref_kl],
            logits_len,
            input_dtype,
            host_targets.len(),
        )?;
    }
    check_dlogp(&host_dlogp)?;
    let n = host_targets.len();
    if n == 0 || vocab == 0 {
        // No token reads a row: the [R, V] gradient is all zeros (SPEC section 10), in place too.
        zero_gradient(gpu, &mut grad)?;
        return gpu.synchronize();
    }
    let checked_rows = host_rows.map(|r| gpu.upload(&r)).transpose()?;
    let local_targets = local_targets.map(|y| gpu.upload(&y)).transpose()?;
    let l = Launcher::Cuda(gpu.clone());
    let kernel = backward_kernel_for(input_dtype, grad.dtype(), full.is_some())?;
    let grad_addr = grad.addr(gpu);
    let addrs = BackwardAddrs {
        logits: logits.map_or(grad_addr, |x| x.addr(gpu)),
        lse: gpu.device_ptr_u64(saved.lse),
        dlogp: gpu.device_ptr_u64(saved.dlogp),
        targets: gpu.device_ptr_u64(local_targets.as_ref().unwrap_or(saved.targets)),
        grad: grad_addr,
        rows: checked_rows.as_ref().map_or(0, |r| gpu.device_ptr_u64(r)),
        n_rows: grad.len() / vocab,
        full: full.map(|f| FullAddrs {
            ref_logits: f.ref_logits.addr(gpu),
            lse_ref: gpu.device_ptr_u64(f.lse_ref),
            ref_kl: gpu.device_ptr_u64(f.ref_kl),
            dref_kl: gpu.device_ptr_u64(f.dref_kl),
        }),
    };
    // SAFETY: logits and grad hold R * V elements of their dtypes (R = N without rows), lse, dlogp
    // and targets N (all checked above against the copies just made of them), rows the crate's own
    // upload of the checked N strictly increasing values in [0, R); targets (the caller's, or the
    // crate's upload of a shard's N local targets) are only compared with column indices. With
    // full, ref_logits has the logits' shape and dtype and lse_ref, ref_kl, dref_kl N values
    // (check_full_saved above), only read. In place, each element is loaded and then stored by one thread
    // (kernels/backward.cu). `grad` is borrowed mutably for this call, and the call synchronizes
    // before any buffer can be dropped.
    unsafe { launch_backward_kernel(&l, kernel, &addrs, n, vocab, cfg)? };
    gpu.synchronize()
}

// -------------------------------------------------------------------------------------------------
// Stage-level launches, for the benchmarks
// -------------------------------------------------------------------------------------------------

/// A validated GPU-resident batch whose passes can be queued one at a time, for the benchmarks
/// (benches/vppo.rs): pass 1 alone, pass 2 (select + loss) alone, pass 3 (the backward) alone.
///
/// [`DeviceStages::new`] runs [`forward_device`] once, which validates the batch (the O(N + B)
/// tensors on the host, the logits rows in pass 1) and leaves the per-token workspace on the GPU; every
/// method after that only queues the pass's kernels on the GPU's stream, with no copy and no wait, so
/// that CUDA events around it ([`Gpu::time_ms`]) time the kernels alone. Re-running a pass rewrites the
/// same workspace with the same values. Not part of the supported API.
#[doc(hidden)]
pub struct DeviceStages<'a> {
    pub(super) batch: DeviceBatch<'a>,
    pub(super) fwd: DeviceForward,
    pub(super) cfg: VppoConfig,
}

impl<'a> DeviceStages<'a> {
    /// Validates `batch` and runs the whole forward once ([`forward_device`]).
    pub fn new(gpu: &Arc<Gpu>, batch: &DeviceBatch<'a>, cfg: &VppoConfig) -> Result<Self> {
        let fwd = forward_device(gpu, batch, cfg)?;
        Ok(DeviceStages {
            batch: *batch,
            fwd,
            cfg: cfg.clone(),
        })
    }

    /// The forward the constructor ran (its outputs, and the state the backward reads).
    pub fn forward(&self) -> &DeviceForward {
        &self.fwd
    }

    pub(super) fn parts(&self) -> Option<(Launcher, Dims, &Workspace)> {
        let ws = self.fwd.ws.as_ref()?;
        let dims = Dims {
            n: ws.n,
            b: ws.b,
            vocab: self.fwd.vocab,
            dtype: self.fwd.dtype,
        };
        Some((Launcher::Cuda(self.fwd.gpu.clone()), dims, ws))
    }

    /// Orders the GPU's stream after work queued on the batch's own streams (as [`forward_device`]).
    pub(super) fn join_batch(&self) -> Result<()> {
        join_caller_streams(&self.fwd.gpu, &self.batch.residences())
    }

    /// Queues pass 1 (`vppo_perception_*`) over the batch. Nothing to do when N = 0.
    pub fn perception(&self) -> Result<()> {
        let Some((l, dims, ws)) = self.parts() else {
            return Ok(());
        };
        self.join_batch()?;
        let inputs = Inputs::device(&self.fwd.gpu, &self.batch);
        run_perception(
            &l,
            perception_kernel(dims.dtype),
            dims,
            &self.cfg,
            &inputs,
            ws,
        )
    }

    /// Queues pass 2 (`vppo_select`, then `vppo_loss`) on the scores pass 1 left in the workspace.
    pub fn select_loss(&self) -> Result<()> {
        let Some((l, dims, ws)) = self.parts() else {
            return Ok(());
        };
        self.join_batch()?;
        let inputs = Inputs::device(&self.fwd.gpu, &self.batch);
        run_select_loss(&l, dims, &self.cfg, &inputs, ws)
    }

    /// Queues pass 3: dloss/dlogits of the batch's logits into `grad` ([N, V], f32 or the logits
    /// dtype).
    pub fn backward(&self, mut grad: DeviceLogitsMut) -> Result<()> {
        launch_backward(
            &self.fwd,
            self.batch.logits.addr(&self.fwd.gpu),
            self.batch.logits.len(),
            Some(self.batch.logits.residence(Tensor::Logits)),
            self.batch.targets,
            &mut grad,
            &self.cfg,
            self.batch.ref_logits,
        )
    }

    /// Queues pass 3 in place over `logits`, a buffer of the batch's shape and dtype that the caller
    /// filled with a copy of the batch's logits (the values are the caller's business: the forward's
    /// lse is used as is). Afterwards `logits` holds the gradient.
    pub fn backward_in_place(&self, mut logits: DeviceLogitsMut) -> Result<()> {
        self.fwd.check_logits_dtype(logits.dtype())?;
        let addr = logits.addr(&self.fwd.gpu);
        launch_backward(
            &self.fwd,
            addr,
            logits.len(),
            None,
            self.batch.targets,
            &mut logits,
            &self.cfg,
            None,
        )
    }
}

// -------------------------------------------------------------------------------------------------
// Pass 1 alone on a device batch, for the vocabulary and sequence layouts (src/parallel/)
// -------------------------------------------------------------------------------------------------

impl SmallHost {
    /// A host batch of these O(N + B) tensors and no logits (empty, `vocab` V): what the host
    /// stages after pass 1 read (the merge, pass 2).
    pub(crate) fn batch(&self, vocab: usize) -> Batch<'_> {
        Batch {
            targets: &self.targets,
            old_logp: &self.old_logp,
            advantages: &self.advantages,
            cu_seqlens: &self.cu_seqlens,
            vocab,
            rows: self.rows.as_deref(),
            masked_rows: self.masked_rows.as_deref(),
            ref_logp: self.ref_logp.as_deref(),
            ..Default::default()
        }
    }

    /// Checks these tensors with the shapes of `batch`'s logits, as [`forward_device`] does, with
    /// `targets` in place of the batch's (a vocabulary shard's, taken into the shard).
    fn validate(&self, batch: &DeviceBatch, targets: &[i32], cfg: &VppoConfig) -> Result<()> {
        crate::batch::SmallTensors {
            logits: (batch.logits.dtype(), batch.logits.len()),
            logits_masked: (batch.logits_masked.dtype(), batch.logits_masked.len()),
            targets,
            old_logp: &self.old_logp,
            advantages: &self.advantages,
            cu_seqlens: &self.cu_seqlens,
            vocab: batch.vocab,
            rows: self.rows.as_deref(),
            masked_rows: self.masked_rows.as_deref(),
            ref_logp: self.ref_logp.as_deref(),
        }
        .validate(cfg.group_size, cfg.needs_groups())?;
        crate::batch::check_ref_logp_given(cfg, self.ref_logp.is_some())
    }
}

/// The O(N + B) tensors of a device batch on the host, after ordering `gpu`'s stream after the
/// batch's streams (one transfer, as [`forward_device`] makes).
pub(crate) fn device_small_tensors(gpu: &Gpu, batch: &DeviceBatch) -> Result<SmallHost> {
    join_caller_streams(gpu, &batch.residences())?;
    download_small_tensors(gpu, batch)
}

/// The logits row token `token` of `batch` reads (through its rows), copied back and widened to
/// f64: to name a bad value.
pub(crate) fn device_token_row(
    gpu: &Gpu,
    batch: &DeviceBatch,
    small: &SmallHost,
    tensor: Tensor,
    token: usize,
) -> Result<Vec<f64>> {
    let masked_index = crate::batch::effective_masked_rows(
        small.rows.as_deref(),
        small.masked_rows.as_deref(),
        batch.logits.len(),
        batch.logits_masked.len(),
    );
    let (logits, index) = if tensor == Tensor::Logits {
        (&batch.logits, small.rows.as_deref())
    } else {
        (&batch.logits_masked, masked_index)
    };
    let row = index.map_or(token, |r| r[token] as usize);
    logits.row_f64(gpu, row, batch.vocab)
}

/// Pass 1 alone over a device batch (the per-token outputs, mask and dlogp empty), or the first
/// bad row's error, as [`forward_device`] reports it; `small` is the batch's
/// [`device_small_tensors`], checked here. For the sequence layout, whose pass 2 runs on the host
/// over the whole group's pieces.
pub(crate) fn perception_device(
    gpu: &Arc<Gpu>,
    batch: &DeviceBatch,
    small: &SmallHost,
    cfg: &VppoConfig,
) -> Result<TokenOutputs> {
    cfg.validate()?;
    small.validate(batch, &small.targets, cfg)?;
    let (n, b) = (small.targets.len(), small.advantages.len());
    if n == 0 {
        return Ok(TokenOutputs::default());
    }
    let dims = Dims {
        n,
        b,
        vocab: batch.vocab,
        dtype: batch.logits.dtype(),
    };
    let l = Launcher::Cuda(gpu.clone());
    let inputs = Inputs::device(gpu, batch);
    let ws = Workspace::new(&l, n, b)?;
    run_perception(&l, perception_kernel(dims.dtype), dims, cfg, &inputs, &ws)?;
    let copy = ws.download(&l)?;
    let row_of = |tensor: Tensor, token: usize| device_token_row(gpu, batch, small, tensor, token);
    status_error(
        copy.status(&ws),
        &small.targets,
        batch.vocab,
        cfg.temperature,
        &row_of,
    )?;
    Ok(perception_outputs(&ws, &copy))
}

/// [`perception_partial`] on a device batch (a vocabulary shard in GPU memory): per row the
/// shard's state, `VPPO_PARTIAL_STATE_FLOATS` f32 each, copied back (9 N floats). `small` is the
/// batch's [`device_small_tensors`] (checked here with the targets taken into the shard);
/// `local_targets` the targets minus the shard's first column, uploaded for the kernel.
pub(crate) fn perception_partial_device(
    gpu: &Arc<Gpu>,
    batch: &DeviceBatch,
    small: &SmallHost,
    local_targets: &[i32],
    cfg: &VppoConfig,
) -> Result<Vec<f32>> {
    cfg.validate()?;
    let v = batch.vocab;
    let clamped: Vec<i32> = local_targets
        .iter()
        .map(|&y| y.clamp(0, v.saturating_sub(1) as i32))
        .collect();
    small.validate(batch, &clamped, cfg)?;
    let Some(floats) = super::perception::partial_floats(local_targets, small.targets.len())?
    else {
        return Ok(Vec::new());
    };
    let l = Launcher::Cuda(gpu.clone());
    let inputs = Inputs::device(gpu, batch);
    // SAFETY: the caller's logits and logits_masked hold R * V elements of the kernel's dtype and
    // old_logp N (validated above against N, V and the rows, which lie in [0, R)), borrowed by
    // `batch` for this call.
    unsafe {
        super::perception::launch_partial(
            &l,
            &inputs,
            local_targets,
            floats,
            v,
            batch.logits.dtype(),
            cfg,
        )
    }
}
