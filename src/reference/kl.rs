//! The KL penalty to a reference policy (SPEC section 12), one token at a time, from the reference
//! policy's log-prob of the target (`ref_logp`).
//!
//! The kernel: the KL lines of `vppo_loss` in kernels/select_loss.cu; the aggregation over the batch is
//! in [`super::surrogate::surrogate_kl`]; tests: tests/variants.rs (against an eager port of the
//! official `compute_kl` and `average_loss`).
//!
//! With k1 = logp - ref_logp:
//!
//! | penalty | kl_t | d kl_t / d logp_t |
//! | --- | --- | --- |
//! | k1 | k1 | 1 |
//! | abs | \|k1\| | sign(k1), 0 at k1 = 0 (as autograd's abs) |
//! | mse | k1^2 / 2 | k1 |
//! | k3 | clamp(e^x - x - 1, -10, 10), x = clamp(ref_logp - logp, -20, 20) | 1 - e^x, 0 through an active clamp |
//!
//! A clamp is active strictly outside its bounds (torch.clamp passes the gradient on them). k3's
//! e^x - x - 1 is computed as expm1(x) - x, which has no cancellation against the 1 for small x.

use crate::config::KlPenalty;

use super::surrogate::LOG_RATIO_CLAMP;

/// The clamp of k3's value: [-10, 10] (the official `low_var_kl`). Shared with the kernel:
/// `VPPO_KL_K3_CLAMP` of kernels/vppo_params.h.
pub const K3_CLAMP: f64 = crate::params::VPPO_KL_K3_CLAMP;

/// kl_t and d kl_t / d logp_t of one token, in f64 (both 0 for `KlPenalty::None`).
pub fn kl_term(penalty: KlPenalty, logp: f64, ref_logp: f64) -> (f64, f64) {
    let k1 = logp - ref_logp;
    match penalty {
        KlPenalty::None => (0.0, 0.0),
        KlPenalty::K1 => (k1, 1.0),
        KlPenalty::Abs => {
            let sign = if k1 > 0.0 {
                1.0
            } else if k1 < 0.0 {
                -1.0
            } else {
                0.0
            };
            (k1.abs(), sign)
        }
        KlPenalty::Mse => (0.5 * k1 * k1, k1),
        KlPenalty::K3 => {
            // x = clamp(ref_logp - logp, -20, 20); dx/dlogp = -1 inside, 0 through the clamp
            let raw = ref_logp - logp;
            let x = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
            let dx = if raw.abs() <= LOG_RATIO_CLAMP {
                -1.0
            } else {
                0.0
            };
            // e = exp(x) - x - 1, de/dx = exp(x) - 1
            let e = x.exp_m1() - x;
            if e.abs() > K3_CLAMP {
                (e.clamp(-K3_CLAMP, K3_CLAMP), 0.0)
            } else {
                (e, x.exp_m1() * dx)
            }
        }
    }
}
