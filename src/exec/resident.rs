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
pub(super) struct SmallHost {
    pub(super) targets: Vec<i32>,
    pub(super) old_logp: Vec<f32>,
    pub(super) advantages: Vec<f32>,
    pub(super) cu_seqlens: Vec<i32>,
    pub(super) ref_logp: Option<Vec<f32>>,
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
        gpu.download_range_into(&staging, 0, &mut raw)?;
    }
    let copy = ArenaCopy(raw);
    Ok(SmallHost {
        targets: copy.get(targets),
        old_logp: copy.get(old_logp),
        advantages: copy.get(advantages),
        cu_seqlens: copy.get(cu_seqlens),
        ref_logp: ref_logp.map(|(_, region)| copy.get(region)),
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
    cfg.validate()?;
    join_caller_streams(gpu, &batch.residences())?;
    let SmallHost {
        targets,
        old_logp,
        advantages,
        cu_seqlens,
        ref_logp,
    } = download_small_tensors(gpu, batch)?;
    crate::batch::SmallTensors {
        logits: (batch.logits.dtype(), batch.logits.len()),
        logits_masked: (batch.logits_masked.dtype(), batch.logits_masked.len()),
        targets: &targets,
        old_logp: &old_logp,
        advantages: &advantages,
        cu_seqlens: &cu_seqlens,
        vocab: batch.vocab,
        rows: None,
        masked_rows: None,
        ref_logp: ref_logp.as_deref(),
    }
    .validate(cfg.group_size, cfg.needs_groups())?;
    crate::batch::check_ref_logp_given(cfg, ref_logp.is_some())?;
    let (n, b) = (targets.len(), advantages.len());
    let dims = Dims {
        n,
        b,
        vocab: batch.vocab,
        dtype: batch.logits.dtype(),
    };
    let z = cfg.token_normalizer.unwrap_or(n as f64);
    if n == 0 {
        return Ok(DeviceForward {
            output: empty_output(z, b),
            gpu: gpu.clone(),
            ws: None,
            targets,
            vocab: batch.vocab,
            dtype: dims.dtype,
        });
    }
    let l = Launcher::Cuda(gpu.clone());
    let inputs = Inputs::device(gpu, batch);
    let ws = Workspace::new(&l, n, b)?;
    let rows = |tensor: Tensor, row: usize| {
        let logits = if tensor == Tensor::Logits {
            &batch.logits
        } else {
            &batch.logits_masked
        };
        logits.row_f64(gpu, row, batch.vocab)
    };
    let output = run_passes(&l, dims, cfg, &inputs, &ws, &targets, &rows)?;
    Ok(DeviceForward {
        output,
        gpu: gpu.clone(),
        ws: Some(ws),
        targets,
        vocab: batch.vocab,
        dtype: dims.dtype,
    })
}

/// Queues the backward kernel of a [`forward_device`] on the GPU's stream: dloss/dlogits into `grad`
/// (f32, or the logits dtype) from the logits at `logits_addr`, which with `targets` must be the
/// buffers the forward read (lengths are checked). It does not wait: the caller synchronizes (or
/// records an event and waits for it) before any of the buffers is dropped or read on the host.
pub(super) fn launch_backward(
    fwd: &DeviceForward,
    logits_addr: u64,
    logits_len: usize,
    logits_residence: Residence,
    targets: &CudaSlice<i32>,
    grad: &DeviceLogitsMut,
    cfg: &VppoConfig,
) -> Result<()> {
    let n = fwd.targets.len();
    check_elements(Tensor::Logits, logits_len, n, fwd.vocab)?;
    check_elements(Tensor::GradLogits, grad.len(), n, fwd.vocab)?;
    if targets.len() != n {
        return Err(VppoError::Shape {
            tensor: Tensor::Targets,
            detail: format!("has {} elements, the forward had N = {n}", targets.len()),
        });
    }
    let Some(ws) = &fwd.ws else { return Ok(()) };
    let gpu = &fwd.gpu;
    join_caller_streams(
        gpu,
        &[
            logits_residence,
            residence(Tensor::Targets, targets),
            grad.residence(Tensor::GradLogits),
        ],
    )?;
    let l = Launcher::Cuda(gpu.clone());
    let kernel = backward_kernel(fwd.dtype, grad.dtype())?;
    let addrs = BackwardAddrs {
        logits: logits_addr,
        lse: ws.addr(&l, ws.lse),
        dlogp: ws.addr(&l, ws.dlogp),
        targets: gpu.device_ptr_u64(targets),
        grad: grad.addr(gpu),
        rows: 0,
        n_rows: n,
    };
    // SAFETY: logits and grad hold N * V elements of their dtypes (checked above), lse, dlogp and
    // targets N; grad is borrowed mutably by the caller for this call; the kernel is queued on the
    // one stream every buffer of this Gpu lives on, and a CudaSlice is freed in stream order (or
    // after a synchronize), so every buffer outlives the kernel even when the caller does not wait.
    unsafe { launch_backward_kernel(&l, kernel, &addrs, n, fwd.vocab, cfg) }
}

/// dloss/dlogits of a [`forward_device`] into the caller's device buffer `grad`.
pub(crate) fn backward_device(
    fwd: &DeviceForward,
    batch: &DeviceBatch,
    grad: DeviceLogitsMut,
    cfg: &VppoConfig,
) -> Result<()> {
    fwd.check_logits_dtype(batch.logits.dtype())?;
    launch_backward(
        fwd,
        batch.logits.addr(&fwd.gpu),
        batch.logits.len(),
        batch.logits.residence(Tensor::Logits),
        batch.targets,
        &grad,
        cfg,
    )?;
    fwd.gpu.synchronize()
}

/// dloss/dlogits of a [`forward_device`] written IN PLACE over `logits`: after this call the buffer
/// holds the gradient (in the logits dtype), not the logits. Nothing else may read those logits as
/// logits afterwards: an autograd framework that saved them for another op must not use this.
pub(crate) fn backward_device_in_place(
    fwd: &DeviceForward,
    logits: DeviceLogitsMut,
    targets: &CudaSlice<i32>,
    cfg: &VppoConfig,
) -> Result<()> {
    fwd.check_logits_dtype(logits.dtype())?;
    let addr = logits.addr(&fwd.gpu);
    launch_backward(
        fwd,
        addr,
        logits.len(),
        logits.residence(Tensor::Logits),
        targets,
        &logits,
        cfg,
    )?;
    fwd.gpu.synchronize()
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
    pub fn backward(&self, grad: DeviceLogitsMut) -> Result<()> {
        launch_backward(
            &self.fwd,
            self.batch.logits.addr(&self.fwd.gpu),
            self.batch.logits.len(),
            self.batch.logits.residence(Tensor::Logits),
            self.batch.targets,
            &grad,
            &self.cfg,
        )
    }

    /// Queues pass 3 in place over `logits`, a buffer of the batch's shape and dtype that the caller
    /// filled with a copy of the batch's logits (the values are the caller's business: the forward's
    /// lse is used as is). Afterwards `logits` holds the gradient.
    pub fn backward_in_place(&self, logits: DeviceLogitsMut) -> Result<()> {
        self.fwd.check_logits_dtype(logits.dtype())?;
        let addr = logits.addr(&self.fwd.gpu);
        launch_backward(
            &self.fwd,
            addr,
            logits.len(),
            logits.residence(Tensor::Logits),
            self.batch.targets,
            &logits,
            &self.cfg,
        )
    }
}
