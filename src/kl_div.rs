//! The general KL op (SPEC section 13, `vppo.torch.kl`): pass 1 alone, the exact per-token
//! KL(softmax(p_logits / tau) || softmax(q_logits / tau)) [N], differentiable with respect to both
//! logits tensors.
//!
//! Files of the op, all named `kl_div`: the inputs src/batch/kl_div.rs ([`KlBatch`]); the f64
//! reference src/reference/kl_div.rs; the kernels, launched by src/exec/kl_div.rs (forward: the
//! perception kernel in partial mode; backward: kernels/kl_div.cu); tests/kl_div.rs; the Python
//! op `vppo::kl` (python/vppo/torch.py). [`KlDiv::forward_device`] and [`KlDiv::backward_device`]
//! run the same kernels on the caller's GPU buffers in place ([`DeviceKlBatch`]).

use crate::batch::KlBatch;
use crate::device::Device;
use crate::error::Result;
pub use crate::exec::{DeviceKlBatch, DeviceKlSaved, KlSaved};
use crate::reference::kl_div as reference;
use crate::tensor::{DeviceLogitsMut, GradMut};

/// The forward's per-token outputs, each [N] f32: what the backward reads back ([`KlOutput::saved`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KlOutput {
    /// KL(p || q) per token (>= 0, finite: +inf is a [`crate::VppoError::KlInfinite`] error).
    pub kl: Vec<f32>,
    /// logsumexp(p_logits[row] / tau).
    pub lse_p: Vec<f32>,
    /// logsumexp(q_logits[row] / tau).
    pub lse_q: Vec<f32>,
}

impl KlOutput {
    /// The values the backward takes.
    pub fn saved(&self) -> KlSaved<'_> {
        KlSaved {
            kl: &self.kl,
            lse_p: &self.lse_p,
            lse_q: &self.lse_q,
        }
    }
}

/// The KL op bound to a temperature and an executor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlDiv {
    temperature: f64,
    device: Device,
}

impl KlDiv {
    /// Checks the temperature (> 0, 1 / tau a normal f32: a config error naming `temperature`) and,
    /// for [`Device::Cuda`], opens the GPU (errors as [`crate::Vppo::new`]).
    pub fn new(temperature: f64, device: Device) -> Result<KlDiv> {
        reference::check_temperature(temperature)?;
        if let Device::Cuda(ordinal) = device {
            crate::cuda::Gpu::new(ordinal)?;
        }
        Ok(KlDiv {
            temperature,
            device,
        })
    }

    /// The executor.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The temperature.
    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    /// Below temperature 1 the kernel devices first run the reference's row checks on the host, so
    /// a logit that overflows f32 divided by tau is the same error on every device.
    fn host_checks(&self, batch: &KlBatch) -> Result<()> {
        if self.temperature < 1.0 && self.device != Device::Reference {
            reference::check_rows(batch, self.temperature)?;
        }
        Ok(())
    }

    /// KL(p || q) per token with the lse of both rows. Errors name the tensor and row: shapes,
    /// `p_rows` / `q_rows`, a NaN or +inf, an all -inf row, KL = +inf (q_v = 0 where p_v > 0,
    /// [`crate::VppoError::KlInfinite`]), a logit beyond f32 after the temperature.
    pub fn forward(&self, batch: &KlBatch) -> Result<KlOutput> {
        batch.validate()?;
        self.host_checks(batch)?;
        let (kl, lse_p, lse_q) = match self.device {
            Device::Reference => {
                let r = reference::kl_div(batch, self.temperature)?;
                let f32s = |x: Vec<f64>| x.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
                let out = (f32s(r.kl), f32s(r.lse_p), f32s(r.lse_q));
                // lse and kl are bounded by the logits / tau, which fit in f32 (checked)
                for (what, x) in [("kl", &out.0), ("lse_p", &out.1), ("lse_q", &out.2)] {
                    if let Some(t) = x.iter().position(|x| !x.is_finite()) {
                        return Err(crate::VppoError::Overflow {
                            what,
                            location: Some(crate::Location::Row(t)),
                            value: f64::INFINITY,
                        });
                    }
                }
                out
            }
            device => crate::exec::kl_div_forward(batch, self.temperature, device)?,
        };
        Ok(KlOutput { kl, lse_p, lse_q })
    }

    /// The gradient of sum_t grad_kl[t] kl_t with respect to both logits tensors: into `grad_p`
    /// (the shape and dtype of p_logits, [R, V] with rows) and `grad_q` (those of q_logits); rows
    /// that no token reads are zero. `saved` is the forward's ([`KlOutput::saved`]): N finite
    /// values of each (errors name `kl`, `lse_p`, `lse_q`; `grad_kl` likewise). The reference
    /// recomputes them in f64. A gradient beyond its dtype is an overflow error (both buffers zero).
    pub fn backward(
        &self,
        batch: &KlBatch,
        saved: &KlSaved,
        grad_kl: &[f32],
        grad_p: GradMut,
        grad_q: GradMut,
    ) -> Result<()> {
        batch.validate()?;
        saved.check(batch.n_tokens())?;
        self.host_checks(batch)?;
        match self.device {
            Device::Reference => {
                reference::kl_div_backward(batch, self.temperature, grad_kl, grad_p, grad_q)
            }
            device => crate::exec::kl_div_backward(
                batch,
                self.temperature,
                saved,
                grad_kl,
                grad_p,
                grad_q,
                device,
            ),
        }
    }

    /// The GPU this op runs on (for the device calls).
    fn gpu(&self) -> Result<std::sync::Arc<crate::cuda::Gpu>> {
        match self.device {
            Device::Cuda(ordinal) => crate::cuda::Gpu::new(ordinal),
            other => Err(crate::VppoError::Shape {
                tensor: crate::Tensor::PLogits,
                detail: format!(
                    "GPU-resident tensors need Device::Cuda, this KlDiv runs on {other:?}"
                ),
            }),
        }
    }

    /// [`KlDiv::forward`] on tensors that already live on the GPU (no copy of the logits): the
    /// outputs, O(N), come back to the host. Needs [`Device::Cuda`]. The row indices are copied back
    /// and checked before the launch, and the work is ordered after what is queued on each buffer's
    /// stream. Equal to [`KlDiv::forward`] of the same batch on the same GPU, errors included, but
    /// below temperature 1 the rows are not all checked on the host first (that would read every
    /// row back): a flagged row's error is the reference's for that row, and a finite logit whose
    /// quotient by the temperature is below -f32::MAX is taken as -inf instead of being refused.
    pub fn forward_device(&self, batch: &DeviceKlBatch) -> Result<KlOutput> {
        let gpu = self.gpu()?;
        let (kl, lse_p, lse_q) = crate::exec::kl_div_forward_device(&gpu, batch, self.temperature)?;
        Ok(KlOutput { kl, lse_p, lse_q })
    }

    /// [`KlDiv::backward`] into the caller's GPU buffers `grad_p` and `grad_q` (the shapes and dtype
    /// of the logits; rows no token reads are zero), from the forward's values saved on the GPU
    /// ([`DeviceKlSaved`]) and the upstream gradient `grad_kl` [N]. Needs [`Device::Cuda`]. The O(N)
    /// tensors are copied back once and checked before the launch (errors as [`KlDiv::backward`]'s);
    /// the gradients are not read back to look for an overflow: each token's bound
    /// |u| (2 kl + 1) / tau must fit the dtype, else it is an overflow error naming `grad_p` and both
    /// buffers are zero. The saved values must be the forward's of these logits. Returns once the
    /// gradients are written (the GPU is synchronized).
    pub fn backward_device(
        &self,
        batch: &DeviceKlBatch,
        saved: &DeviceKlSaved,
        grad_kl: &cudarc::driver::CudaSlice<f32>,
        grad_p: DeviceLogitsMut,
        grad_q: DeviceLogitsMut,
    ) -> Result<()> {
        let gpu = self.gpu()?;
        crate::exec::kl_div_backward_device(
            &gpu,
            batch,
            self.temperature,
            saved,
            grad_kl,
            grad_p,
            grad_q,
        )
    }
}
