//! The public entry point: a `Vppo` bound to a configuration and an executor.

use crate::batch::{check_in_place, Batch};
use crate::config::VppoConfig;
pub use crate::device::{Device, LaneOrder};
use crate::error::{Result, Tensor, VppoError};
use crate::exec::{DeviceBatch, DeviceForward};
use crate::output::VppoOutput;
use crate::tensor::DeviceLogitsMut;
use crate::tensor::Dtype;
pub use crate::tensor::GradMut;

/// The VPPO loss bound to a validated configuration and an executor.
///
/// Every call validates the batch (shapes, cu_seqlens, targets, finite old_logp and advantages, and
/// B % G where group-scope shaping needs G) before dispatching to the executor, for every device; the
/// O(N V) checks of the logits rows are made by the executor's first pass before anything is computed.
/// A batch with N = 0 is not an error: the loss is 0, the per-token outputs are empty and there is no
/// gradient (it is answered on the CPU for every device).
#[derive(Debug, Clone, PartialEq)]
pub struct Vppo {
    config: VppoConfig,
    device: Device,
}

impl Vppo {
    /// Checks `config` ([`VppoConfig::validate`]) and binds it to `device`. For [`Device::Cuda`] this
    /// also opens the GPU and loads the kernels (once per process), so a missing driver, GPU or
    /// kernel build is reported here: [`VppoError::NoCudaDriver`], [`VppoError::NoGpu`],
    /// [`VppoError::KernelsNotBuilt`].
    pub fn new(config: VppoConfig, device: Device) -> Result<Vppo> {
        config.validate()?;
        if let Device::Cuda(ordinal) = device {
            crate::cuda::Gpu::new(ordinal)?;
        }
        Ok(Vppo { config, device })
    }

    pub(crate) fn gpu(&self) -> Result<std::sync::Arc<crate::cuda::Gpu>> {
        match self.device {
            Device::Cuda(ordinal) => crate::cuda::Gpu::new(ordinal),
            other => Err(VppoError::Shape {
                tensor: Tensor::Logits,
                detail: format!(
                    "GPU-resident tensors need Device::Cuda, this Vppo runs on {other:?}"
                ),
            }),
        }
    }

    /// The forward pass on tensors that already live on the GPU (no copy of the logits; the O(N + B)
    /// tensors are copied back once for validation). Needs [`Device::Cuda`]. The result keeps the
    /// per-token buffers the backward needs on the GPU.
    pub fn forward_device(&self, batch: &DeviceBatch) -> Result<DeviceForward> {
        let fwd = crate::exec::forward_device(&self.gpu()?, batch, &self.config)?;
        fwd.output.check_finite()?;
        Ok(fwd)
    }

    /// dloss/dlogits of [`Vppo::forward_device`] into the caller's GPU buffer `grad` ([N, V], f32 or
    /// the logits dtype). The work is ordered after what is queued on the streams of `batch` and
    /// `grad`, and the call returns once the gradient is written (the GPU is synchronized), so `grad`
    /// may be read on any stream at once.
    pub fn backward_device(
        &self,
        fwd: &DeviceForward,
        batch: &DeviceBatch,
        grad: DeviceLogitsMut,
    ) -> Result<()> {
        self.check_grad_bound(&fwd.output.tokens.dlogp)?;
        crate::exec::backward_device(fwd, batch, grad, &self.config)
    }

    /// dloss/dlogits of [`Vppo::forward_device`] written IN PLACE over the logits buffer: afterwards
    /// it holds the gradient, in the logits dtype, and no longer the logits. Use it only where nothing
    /// else will read those logits again (an autograd graph that saved them would be silently wrong).
    pub fn backward_device_in_place(
        &self,
        fwd: &DeviceForward,
        logits: DeviceLogitsMut,
        targets: &cudarc::driver::CudaSlice<i32>,
    ) -> Result<()> {
        self.check_grad_bound(&fwd.output.tokens.dlogp)?;
        crate::exec::backward_device_in_place(fwd, logits, targets, &self.config)
    }

    /// dloss/dlogits on the GPU from what a forward saved there ([`DeviceSaved`]: targets, lse,
    /// dlogp, rows), for a caller that keeps only those tensors (an autograd framework; the GPU form
    /// of [`Vppo::backward_saved`]). Reads `logits` ([N, V], or [R, V] through `saved.rows`) and
    /// writes `grad` (its shape, f32 or the logits dtype; rows no token reads are zero), or, with
    /// `logits` None, overwrites the logits held in `grad` (in place). The O(N) saved tensors are
    /// copied back once and checked before the launch; the call is ordered after the work queued
    /// on every buffer's stream and returns once the gradient is written. Needs [`Device::Cuda`].
    pub fn backward_saved_device(
        &self,
        logits: Option<crate::DeviceLogits>,
        vocab: usize,
        saved: &crate::exec::DeviceSaved,
        grad: crate::DeviceLogitsMut,
    ) -> Result<()> {
        self.refuse_full_kl("backward_saved_device")?;
        crate::exec::backward_saved_device(
            &self.gpu()?,
            logits,
            vocab,
            saved,
            None,
            grad,
            &self.config,
            &|dlogp| self.check_grad_bound(dlogp),
            None,
        )
    }

    /// [`Vppo::backward_saved_device`] for `kl_penalty = full` (the GPU form of
    /// [`Vppo::backward_saved_full`]): `full` holds ref_logits (the shape and dtype of the logits,
    /// read through `saved.rows`) and the forward's per-token lse_ref, ref_kl and dref_kl on the GPU,
    /// copied back with the other O(N) saved tensors and checked before the launch. Under any
    /// other penalty `full` is ignored, as the forward ignores ref_logits then.
    pub fn backward_saved_full_device(
        &self,
        logits: Option<crate::DeviceLogits>,
        vocab: usize,
        saved: &crate::exec::DeviceSaved,
        full: &crate::exec::DeviceFullKlSaved,
        grad: crate::DeviceLogitsMut,
    ) -> Result<()> {
        if !self.config.needs_ref_logits() {
            return self.backward_saved_device(logits, vocab, saved, grad);
        }
        crate::exec::backward_saved_device(
            &self.gpu()?,
            logits,
            vocab,
            saved,
            Some(full),
            grad,
            &self.config,
            &|dlogp| self.check_grad_bound(dlogp),
            None,
        )
    }

    /// The configuration.
    pub fn config(&self) -> &VppoConfig {
        &self.config
    }

    /// The executor.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The loss and every output of SPEC section 8 except dloss/dlogits.
    ///
    /// Every output that must be finite is checked to be finite in f32 ([`VppoOutput::check_finite`]):
    /// a result that overflows is a [`VppoError::Overflow`], never a silent inf. Below temperature 1,
    /// where a finite logit divided by it can overflow f32, the kernel devices first run the
    /// reference's row checks on the host, so each device reports the same first bad row.
    pub fn forward(&self, batch: &Batch) -> Result<VppoOutput> {
        self.forward_then(batch, &mut |_| Ok(None))
    }

    /// [`Vppo::forward`], with pass 2 rerun under the config `then` derives from the first output
    /// when it returns one (data parallel, src/parallel/mod.rs; the kernels run pass 1 once).
    pub(crate) fn forward_then(
        &self,
        batch: &Batch,
        then: &mut dyn FnMut(&VppoOutput) -> Result<Option<VppoConfig>>,
    ) -> Result<VppoOutput> {
        let cfg = &self.config;
        let valid = batch.validate(cfg)?;
        let out = match self.device {
            Device::Reference => reference_then(batch, cfg, then),
            _ if batch.n_tokens() == 0 => reference_then(batch, cfg, then),
            Device::Simt(_) | Device::Cuda(_) => {
                if cfg.temperature < 1.0 {
                    crate::reference::perception::check_rows(batch, cfg)?;
                    if cfg.needs_ref_logits() {
                        // the ref_logits rows too (kl_penalty = full), in f64
                        crate::reference::kl::full_kl(batch, cfg.temperature)?;
                    }
                }
                crate::exec::forward_then(&valid, self.device, then)
            }
        }?;
        out.check_finite()?;
        Ok(out)
    }

    /// Checks that dloss/dlogits cannot overflow f32: |dlogits[t, v]| <= |dlogp_t| / tau, so each row's
    /// bound is checked (O(N)) before any gradient is written.
    pub(crate) fn check_grad_bound(&self, dlogp: &[f32]) -> Result<()> {
        let tau = self.config.temperature;
        match dlogp
            .iter()
            .position(|&g| !(g.is_finite() && (g as f64 / tau).abs() <= f32::MAX as f64))
        {
            Some(t) => Err(VppoError::Overflow {
                what: "grad_logits",
                location: Some(crate::error::Location::Row(t)),
                value: dlogp[t] as f64 / tau,
            }),
            None => Ok(()),
        }
    }

    /// dloss/dlogits into the caller's buffer `grad` (`[N, V]`, f32 or the logits dtype), given `out`,
    /// the output of [`Vppo::forward`] on the same batch and this config. Rows whose dloss/dlogp is 0
    /// are written as zeros. (The borrowed [`Batch`] holds `logits` immutably, so this API never
    /// writes over the logits; an in-place variant is for the kernel pipeline.)
    ///
    /// `out` must have the batch's lengths and finite `lse` and `dlogp` (as every forward returns);
    /// anything else is an error, never a NaN gradient.
    pub fn backward_into(&self, batch: &Batch, out: &VppoOutput, mut grad: GradMut) -> Result<()> {
        let valid = batch.validate(&self.config)?;
        grad.check(batch)?;
        out.check_for_backward(batch.n_tokens(), Some(batch.n_responses()))?;
        self.check_grad_bound(&out.tokens.dlogp)?;
        if batch.n_tokens() == 0 {
            // No token: with rows the gradient is still [R, V], every row zero (SPEC section 10).
            crate::tensor::on_dtype!(&mut grad, g => g.fill(Default::default()));
            return Ok(());
        }
        if self.config.needs_ref_logits() {
            check_full_kl_outputs(out, batch.n_tokens())?;
        }
        match self.device {
            Device::Reference => crate::reference::backward_into(batch, &self.config, out, grad),
            Device::Simt(_) | Device::Cuda(_) => {
                crate::exec::backward_into(&valid, out, grad, self.device)
            }
        }
    }

    /// dloss/dlogits written IN PLACE over the logits the forward read: pass them as `logits`
    /// (`GradMut` of the logits dtype, [N, V]); afterwards that buffer holds the gradient and no
    /// longer the logits. `targets` and `out` are the forward's. Saves the [N, V] gradient buffer;
    /// use it only where nothing reads those logits again.
    pub fn backward_in_place(
        &self,
        logits: GradMut,
        vocab: usize,
        targets: &[i32],
        out: &VppoOutput,
    ) -> Result<()> {
        check_in_place(logits.len(), vocab, targets, out)?;
        self.check_grad_bound(&out.tokens.dlogp)?;
        self.refuse_full_kl("backward_in_place")?;
        match self.device {
            Device::Reference => {
                // The reference writes from f64: widen the logits first, then overwrite them.
                let widened = logits.to_f32();
                let lse: Vec<f64> = out.tokens.lse.iter().map(|&x| x as f64).collect();
                let dlogp: Vec<f64> = out.tokens.dlogp.iter().map(|&x| x as f64).collect();
                crate::reference::backward::grad_logits(
                    crate::batch::Logits::F32(&widened),
                    vocab,
                    targets,
                    &lse,
                    &dlogp,
                    self.config.temperature,
                    None,
                    logits,
                )
            }
            Device::Simt(_) | Device::Cuda(_) => crate::exec::backward_in_place(
                logits,
                vocab,
                targets,
                out,
                &self.config,
                self.device,
            ),
        }
    }

    /// dloss/dlogits from what a forward saved (per token: target, lse, dlogp; the rows it read),
    /// for a caller that keeps only those tensors, as an autograd framework does. Reads `logits`
    /// ([N, V], or [R, V] through `saved.rows`) and writes `grad` (the shape of `logits`, f32 or the
    /// logits dtype; rows no token reads are zero), or, with `logits` None, reads the logits from
    /// `grad` and overwrites them (in place; `grad` then has the logits dtype). The reference
    /// computes in f64 from the f32 lse given; the kernels are those of [`Vppo::backward_into`].
    pub fn backward_saved(
        &self,
        logits: Option<crate::batch::Logits>,
        vocab: usize,
        saved: &crate::exec::SavedForward,
        grad: GradMut,
    ) -> Result<()> {
        self.refuse_full_kl("backward_saved")?;
        self.check_saved(logits.as_ref(), vocab, saved, &grad)?;
        match self.device {
            Device::Reference => {
                // The reference writes from f64: widen the logits first (in place they are about
                // to be overwritten).
                let widened: Vec<f32>;
                let logits = match logits {
                    Some(x) => x,
                    None => {
                        widened = grad.to_f32();
                        crate::batch::Logits::F32(&widened)
                    }
                };
                let lse: Vec<f64> = saved.lse.iter().map(|&x| x as f64).collect();
                let dlogp: Vec<f64> = saved.dlogp.iter().map(|&x| x as f64).collect();
                crate::reference::backward::grad_logits(
                    logits,
                    vocab,
                    saved.targets,
                    &lse,
                    &dlogp,
                    self.config.temperature,
                    saved.rows,
                    grad,
                )
            }
            Device::Simt(_) | Device::Cuda(_) => crate::exec::backward_saved(
                self.device,
                logits.as_ref(),
                saved,
                vocab,
                grad,
                &self.config,
            ),
        }
    }

    /// What the saved backwards read, checked: `saved` against the logits (None: those in `grad`, in
    /// place), the gradient's dtype, and the gradient bound of `saved.dlogp`. Returns the logits'
    /// length and dtype.
    fn check_saved(
        &self,
        logits: Option<&crate::batch::Logits>,
        vocab: usize,
        saved: &crate::exec::SavedForward,
        grad: &GradMut,
    ) -> Result<(usize, Dtype)> {
        let len = logits.map_or(grad.len(), |x| x.len());
        let dtype = logits.map_or(grad.dtype(), |x| x.dtype());
        saved.check(len, grad.len(), vocab)?;
        crate::batch::check_grad_dtype(dtype, grad.dtype())?;
        self.check_grad_bound(saved.dlogp)?;
        Ok((len, dtype))
    }

    /// The backwards that know no ref_logits: an error with `kl_penalty = full`, whose gradient needs
    /// them ([`Vppo::backward_into`] or [`Vppo::backward_saved_full`]).
    fn refuse_full_kl(&self, what: &str) -> Result<()> {
        if self.config.needs_ref_logits() {
            return Err(VppoError::MissingTensor {
                tensor: Tensor::RefLogits,
                needed_by: format!(
                    "kl_penalty = full: {what} has no ref_logits; use backward_into or \
                     backward_saved_full"
                ),
            });
        }
        Ok(())
    }

    /// [`Vppo::backward_saved`] for `kl_penalty = full` (SPEC section 12): `full` holds the
    /// reference logits (the shape and dtype of `logits`, read through `saved.rows`) and the
    /// forward's per-token lse_ref, ref_kl and dref_kl; the row gains
    /// d_t p_v ((a_v - lse_t) - (c_v - lse_ref_t) - kl_t) / tau. Reads `logits` (or, None, the logits
    /// in `grad`, overwritten in place). Under any other penalty `full` is ignored (the gradient of
    /// [`Vppo::backward_saved`]), as the forward ignores ref_logits then: the full kernel would read
    /// them, and a -inf there against a finite logit would make a NaN.
    pub fn backward_saved_full(
        &self,
        logits: Option<crate::batch::Logits>,
        vocab: usize,
        saved: &crate::exec::SavedForward,
        full: &crate::exec::FullKlSaved,
        grad: GradMut,
    ) -> Result<()> {
        if !self.config.needs_ref_logits() {
            return self.backward_saved(logits, vocab, saved, grad);
        }
        let (len, dtype) = self.check_saved(logits.as_ref(), vocab, saved, &grad)?;
        full.check(len, dtype, saved.targets.len())?;
        match self.device {
            Device::Reference => {
                let widened: Vec<f32>;
                let logits = match logits {
                    Some(x) => x,
                    None => {
                        widened = grad.to_f32();
                        crate::batch::Logits::F32(&widened)
                    }
                };
                let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
                let values = crate::reference::kl::FullKlF64 {
                    kl: f64s(full.ref_kl),
                    lse_ref: f64s(full.lse_ref),
                    dkl: f64s(full.dref_kl),
                };
                let widened_ref: Vec<f32>;
                let ref_logits = match (logits, full.ref_logits) {
                    // the reference reads both in one dtype: widen ref_logits with the logits
                    (crate::batch::Logits::F32(_), r) if r.dtype() != Dtype::F32 => {
                        widened_ref = (0..r.len()).map(|i| r.get(i) as f32).collect();
                        crate::batch::Logits::F32(&widened_ref)
                    }
                    (_, r) => r,
                };
                crate::reference::backward::grad_logits_full_kl(
                    logits,
                    ref_logits,
                    vocab,
                    saved.targets,
                    &f64s(saved.lse),
                    &vec![0.0; saved.targets.len()],
                    &f64s(saved.dlogp),
                    &values,
                    self.config.temperature,
                    saved.rows,
                    grad,
                )
            }
            Device::Simt(_) | Device::Cuda(_) => crate::exec::backward_saved_full(
                self.device,
                logits.as_ref(),
                saved,
                full,
                vocab,
                grad,
                &self.config,
            ),
        }
    }

    /// The forward outputs and dloss/dlogits as a new f32 vector of the shape of the logits
    /// ([N, V], or [R, V] with rows).
    pub fn loss_and_grad(&self, batch: &Batch) -> Result<(VppoOutput, Vec<f32>)> {
        let out = self.forward(batch)?;
        let mut grad = vec![0.0f32; batch.logits.len()];
        self.backward_into(batch, &out, GradMut::F32(&mut grad))?;
        Ok((out, grad))
    }
}

/// A forward output of `kl_penalty = full` carries its per-token lse_ref, ref_kl and dref_kl.
fn check_full_kl_outputs(out: &VppoOutput, n: usize) -> Result<()> {
    let t = &out.tokens;
    for (what, x) in [
        ("lse_ref", &t.lse_ref),
        ("ref_kl", &t.ref_kl),
        ("dref_kl", &t.dref_kl),
    ] {
        if x.len() != n {
            return Err(VppoError::Shape {
                tensor: Tensor::RefLogits,
                detail: format!(
                    "the forward output's {what} has {} elements, expected N = {n} (the output of \
                     a kl_penalty = full forward)",
                    x.len()
                ),
            });
        }
    }
    Ok(())
}

/// The reference's forward, then the whole forward again under the config `then` derives, if any
/// (the oracle recomputes pass 1: it is written for clarity, not speed).
fn reference_then(
    batch: &Batch,
    cfg: &VppoConfig,
    then: &mut dyn FnMut(&VppoOutput) -> Result<Option<VppoConfig>>,
) -> Result<VppoOutput> {
    let first = crate::reference::forward(batch, cfg)?;
    match then(&first)? {
        Some(second) => crate::reference::forward(batch, &second),
        None => Ok(first),
    }
}
