//! The general KL op (SPEC section 13, `vppo.torch.kl`): pass 1 alone, the exact per-token
//! KL(softmax(p_logits / tau) || softmax(q_logits / tau)) [N], differentiable with respect to both
//! logits tensors.
//!
//! Files of the op, all named `kl_div`: the inputs src/batch/kl_div.rs ([`KlBatch`]); the f64
//! reference src/reference/kl_div.rs; the kernels, launched by src/exec/kl_div.rs (forward: the
//! perception kernel in partial mode; backward: kernels/kl_div.cu); tests/kl_div.rs; the Python
//! op `vppo::kl` (python/vppo/torch.py).

use crate::batch::KlBatch;
use crate::device::Device;
use crate::error::Result;
pub use crate::exec::KlSaved;
use crate::reference::kl_div as reference;
use crate::tensor::GradMut;

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
}
