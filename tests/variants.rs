//! The variants of SPEC section 12 against an eager port of the official lines, and the kernels
//! against the reference for each variant.
//!
//! The port (`official` below) follows huaixuheqing/VPPO-RL's `compute_policy_loss`, `compute_kl` and
//! `average_loss` (verl/trainer/core_algos.py), the KL loss and the entropy mask of dp_actor.py line
//! by line, on padded [B, L_max] tensors with a response mask, as the official code sees them,
//! including the 1e-8 of its masked means. Its gradient is taken by forward-mode automatic differentiation (a dual number per
//! seeded logp), so it is what autograd computes on those lines, with no hand-derived formula shared
//! with the crate. The reference and the port agree to 1e-7 relative, and 1e-7 absolute for the loss
//! (a sum of O(1) terms that may cancel) and 1e-7 of the largest for dloss/dlogp: the official 1e-8
//! in each masked mean is the only difference in the formula; the kernels agree with the reference as in
//! tests/kernels.rs (1e-9 relative for the loss, 1e-6 for the f32 dloss/dlogp).

mod common;

use common::{devices, seeded_batch, BatchSpec};
use vppo::reference;
use vppo::{
    Aggregation, Device, KlPenalty, LossType, MaskBy, OwnedBatch, OwnedLogits, Vppo, VppoConfig,
};

/// Every test of this file again on `Device::Cuda(0)` through the fake CUDA driver.
#[test]
fn all_tests_through_the_fake_cuda_driver() {
    common::fake_cuda::rerun_self("all_tests_through_the_fake_cuda_driver");
}

/// A number with its derivative along one seeded direction (forward-mode autodiff).
#[derive(Debug, Clone, Copy, PartialEq)]
struct D {
    v: f64,
    d: f64,
}

impl D {
    fn c(v: f64) -> D {
        D { v, d: 0.0 }
    }
    fn exp(self) -> D {
        let e = self.v.exp();
        D {
            v: e,
            d: e * self.d,
        }
    }
    /// torch.clamp: the gradient passes where lo <= x <= hi.
    fn clamp(self, lo: f64, hi: f64) -> D {
        if self.v < lo {
            D::c(lo)
        } else if self.v > hi {
            D::c(hi)
        } else {
            self
        }
    }
    /// torch.max of two tensors (ties never occur on random data away from the clip boundaries).
    fn max(self, o: D) -> D {
        if self.v >= o.v {
            self
        } else {
            o
        }
    }
    fn min(self, o: D) -> D {
        if self.v <= o.v {
            self
        } else {
            o
        }
    }
    fn detach(self) -> D {
        D::c(self.v)
    }
    /// torch.abs: the gradient sgn(x), 0 at x = 0.
    fn abs(self) -> D {
        if self.v > 0.0 {
            self
        } else if self.v < 0.0 {
            -self
        } else {
            D::c(0.0)
        }
    }
    /// torch.square.
    fn square(self) -> D {
        self * self
    }
    fn ln(self) -> D {
        D {
            v: self.v.ln(),
            d: self.d / self.v,
        }
    }
}

impl std::ops::Add for D {
    type Output = D;
    fn add(self, o: D) -> D {
        D {
            v: self.v + o.v,
            d: self.d + o.d,
        }
    }
}
impl std::ops::Sub for D {
    type Output = D;
    fn sub(self, o: D) -> D {
        D {
            v: self.v - o.v,
            d: self.d - o.d,
        }
    }
}
impl std::ops::Mul for D {
    type Output = D;
    fn mul(self, o: D) -> D {
        D {
            v: self.v * o.v,
            d: self.d * o.v + self.v * o.d,
        }
    }
}
impl std::ops::Div for D {
    type Output = D;
    fn div(self, o: D) -> D {
        D {
            v: self.v / o.v,
            d: (self.d * o.v - self.v * o.d) / (o.v * o.v),
        }
    }
}
impl std::ops::Neg for D {
    type Output = D;
    fn neg(self) -> D {
        D {
            v: -self.v,
            d: -self.d,
        }
    }
}

/// The official code's inputs, padded to [B, L_max] (row-major, `l` columns).
struct Padded {
    b: usize,
    l: usize,
    /// where token t of the packed batch sits
    pos: Vec<usize>,
    response_mask: Vec<f64>,
}

impl Padded {
    fn new(cu: &[i32]) -> Padded {
        let b = cu.len() - 1;
        let l = cu
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
            .max(1);
        let mut pos = vec![];
        let mut response_mask = vec![0.0; b * l];
        for r in 0..b {
            for (j, _) in (cu[r]..cu[r + 1]).enumerate() {
                pos.push(r * l + j);
                response_mask[r * l + j] = 1.0;
            }
        }
        Padded {
            b,
            l,
            pos,
            response_mask,
        }
    }

    /// A packed [N] vector as a padded [B, L] one (0 in the padding).
    fn pad<T: Copy>(&self, x: &[T], zero: T) -> Vec<T> {
        let mut out = vec![zero; self.b * self.l];
        for (t, &p) in self.pos.iter().enumerate() {
            out[p] = x[t];
        }
        out
    }
}

/// The official ports, in the official names.
mod official {
    use super::{Padded, D};

    /// VF.masked_mean over one row, with the official eps.
    fn masked_mean_row(v: &[D], mask: &[f64]) -> D {
        let mut s = D::c(0.0);
        let mut m = 0.0;
        for (x, &k) in v.iter().zip(mask) {
            s = s + *x * D::c(k);
            m += k;
        }
        s / D::c(m + 1e-8)
    }

    /// core_algos.average_loss.
    pub fn average_loss(values: &[D], p: &Padded, seq: bool) -> D {
        if !seq {
            return masked_mean_row(values, &p.response_mask);
        }
        let mut total = D::c(0.0);
        for r in 0..p.b {
            let row = r * p.l..(r + 1) * p.l;
            let mut s = D::c(0.0);
            let mut m = 0.0;
            for i in row {
                s = s + values[i] * D::c(p.response_mask[i]);
                m += p.response_mask[i];
            }
            total = total + s / D::c(m + 1e-8);
        }
        total / D::c(p.b as f64)
    }

    /// core_algos.compute_kl (the official names: "kl", "abs", "mse", "low_var_kl").
    pub fn compute_kl(log_probs: &[D], ref_log_probs: &[f64], kl_penalty: &str) -> Vec<D> {
        log_probs
            .iter()
            .zip(ref_log_probs)
            .map(|(&log_probs, &ref_log_probs)| {
                let ref_log_probs = D::c(ref_log_probs);
                match kl_penalty {
                    "kl" => log_probs - ref_log_probs,
                    "abs" => (log_probs - ref_log_probs).abs(),
                    "mse" => D::c(0.5) * (log_probs - ref_log_probs).square(),
                    "low_var_kl" => {
                        let kl = (ref_log_probs - log_probs).clamp(-20.0, 20.0);
                        let kld = kl.exp() - kl - D::c(1.0);
                        kld.clamp(-10.0, 10.0)
                    }
                    other => panic!("unknown KL penalty {other}"),
                }
            })
            .collect()
    }

    pub struct Clip {
        pub low: f64,
        pub high: f64,
        pub dual: f64,
    }

    /// core_algos.compute_policy_loss; `advantages` per token (the response's A' broadcast),
    /// `loss_type` one of "default", "gspo", "gspo_token", "cispo".
    #[allow(clippy::too_many_arguments)]
    pub fn compute_policy_loss(
        old_log_probs: &[f64],
        log_probs: &[D],
        advantages: &[f64],
        p: &Padded,
        clip: &Clip,
        loss_type: &str,
        seq: bool,
        loss_token_mask: &[f64],
    ) -> D {
        let n = p.b * p.l;
        let nak: Vec<D> = (0..n)
            .map(|i| log_probs[i] - D::c(old_log_probs[i]))
            .collect();
        let log_importance_ratio: Vec<D> = if loss_type == "gspo" || loss_type == "gspo_token" {
            let mut out = vec![D::c(0.0); n];
            for r in 0..p.b {
                let row = r * p.l..(r + 1) * p.l;
                let in_seq = masked_mean_row(&nak[row.clone()], &p.response_mask[row.clone()]);
                for i in row {
                    out[i] = if loss_type == "gspo_token" {
                        in_seq.detach() + log_probs[i] - log_probs[i].detach()
                    } else {
                        in_seq * D::c(p.response_mask[i])
                    };
                }
            }
            out
        } else {
            nak
        };
        let mut final_pg_loss = vec![D::c(0.0); n];
        for i in 0..n {
            let x = log_importance_ratio[i];
            let ratio = x.clamp(-20.0, 20.0).exp();
            let clipped_ratio = x.clamp((1.0 - clip.low).ln(), (1.0 + clip.high).ln()).exp();
            let a = D::c(advantages[i]);
            final_pg_loss[i] = if loss_type == "cispo" {
                -a * log_probs[i] * clipped_ratio.detach()
            } else {
                let pg_loss = -a * ratio;
                let pg_loss2 = -a * clipped_ratio;
                let pg_loss3 = -a * D::c(clip.dual);
                let higher = pg_loss.max(pg_loss2);
                let lower = higher.min(pg_loss3);
                if advantages[i] < 0.0 {
                    lower
                } else {
                    higher
                }
            };
            final_pg_loss[i] = final_pg_loss[i] * D::c(loss_token_mask[i]);
        }
        average_loss(&final_pg_loss, p, seq)
    }
}

/// The official loss of a batch, and its gradient with respect to every packed logp: the policy loss
/// with the crate's mask and alpha as `loss_token_mask` and advantage scaling, plus the KL loss when
/// `cfg.kl_penalty` is not none (dp_actor.py's `use_kl_loss`: `kl_loss = average_loss(compute_kl(..),
/// response_mask)`, `loss = pg_loss + kl_loss * kl_coef`), plus the entropy penalty
/// (`-masked_mean(log_probs) * coef`, the crate's logp penalty). Also returns kl_loss (0 without).
fn official_loss_and_grad(
    ob: &OwnedBatch,
    cfg: &VppoConfig,
    logp: &[f64],
    mask: &[u8],
    alpha: &[f64],
) -> (f64, Vec<f64>, f64) {
    let cu = &ob.cu_seqlens;
    let p = Padded::new(cu);
    let old: Vec<f64> = p.pad(
        &ob.old_logp.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        0.0,
    );
    let mut adv_tok = vec![];
    for r in 0..cu.len() - 1 {
        for _ in cu[r]..cu[r + 1] {
            adv_tok.push(alpha[r] * ob.advantages[r] as f64);
        }
    }
    let adv = p.pad(&adv_tok, 0.0);
    let token_mask = p.pad(&mask.iter().map(|&m| m as f64).collect::<Vec<_>>(), 0.0);
    let loss_type = match cfg.loss_type {
        LossType::Ppo => "default",
        LossType::Gspo => "gspo",
        LossType::GspoToken => "gspo_token",
        LossType::Cispo => "cispo",
    };
    let seq = match cfg.aggregation {
        Aggregation::TokenMean => false,
        Aggregation::SeqMeanTokenMean => true,
        Aggregation::SeqMeanTokenSum => panic!("the official code has no seq-mean-token-sum"),
    };
    let clip = official::Clip {
        low: cfg.eps_low,
        high: cfg.eps_high,
        dual: cfg.dual_clip.unwrap_or(f64::INFINITY),
    };
    let kl_penalty = match cfg.kl_penalty {
        KlPenalty::None => None,
        KlPenalty::K1 => Some("kl"),
        KlPenalty::Abs => Some("abs"),
        KlPenalty::Mse => Some("mse"),
        KlPenalty::K3 => Some("low_var_kl"),
        KlPenalty::Full => panic!("kl_penalty = full: see official_full_loss_and_grad"),
    };
    let ref_log_probs: Vec<f64> = match &ob.ref_logp {
        Some(r) => p.pad(&r.iter().map(|&x| x as f64).collect::<Vec<_>>(), 0.0),
        None => vec![],
    };
    let kl_loss = |lp: &[D]| match kl_penalty {
        Some(name) => {
            let kld = official::compute_kl(lp, &ref_log_probs, name);
            official::average_loss(&kld, &p, seq)
        }
        None => D::c(0.0),
    };
    let eval = |seed: Option<usize>| {
        let lp: Vec<D> = (0..logp.len())
            .map(|t| D {
                v: logp[t],
                d: (seed == Some(t)) as u8 as f64,
            })
            .collect();
        let lp = p.pad(&lp, D::c(0.0));
        let pg =
            official::compute_policy_loss(&old, &lp, &adv, &p, &clip, loss_type, seq, &token_mask);
        let pg = pg + kl_loss(&lp) * D::c(cfg.kl_coef);
        // use_entropy_penalty: -masked_mean(log_probs, response_mask) * coef
        let mut s = D::c(0.0);
        let mut m = 0.0;
        for (x, &k) in lp.iter().zip(&p.response_mask) {
            s = s + *x * D::c(k);
            m += k;
        }
        pg + D::c(cfg.logp_penalty) * -(s / D::c(m + 1e-8))
    };
    let loss = eval(None).v;
    let grad = (0..logp.len()).map(|t| eval(Some(t)).d).collect();
    let lp: Vec<D> = p.pad(
        &logp.iter().map(|&x| D::c(x)).collect::<Vec<_>>(),
        D::c(0.0),
    );
    (loss, grad, kl_loss(&lp).v)
}

fn close(got: f64, want: f64, rel: f64, abs: f64) -> bool {
    (got - want).abs() <= rel * want.abs() + abs
}

fn spec(max_len: usize, spread: f64) -> BatchSpec {
    BatchSpec {
        vocab: (2, 12),
        groups: (1, 4),
        group_size: 2,
        max_len,
        neg_inf_prob: 0.0,
        log_ratio_spread: spread,
        ..BatchSpec::default()
    }
}

/// A seeded batch; with `nonempty`, the first seed at or after `seed` whose responses all have tokens
/// (the official "seq" mode averages over every row, empty ones included; the crate over the B'
/// responses with tokens, so that mode is compared on batches without empty responses).
fn batch(seed: u64, s: &BatchSpec, nonempty: bool) -> OwnedBatch {
    let mut seed = seed;
    loop {
        let ob = seeded_batch(seed, s);
        if !nonempty || ob.cu_seqlens.windows(2).all(|w| w[1] > w[0]) {
            return ob;
        }
        seed = seed.wrapping_add(1_000_003);
    }
}

fn loss_types() -> [LossType; 4] {
    [
        LossType::Ppo,
        LossType::Gspo,
        LossType::GspoToken,
        LossType::Cispo,
    ]
}

/// The reference's loss and dloss/dlogp equal the official port's, for every loss type, in token-mean
/// and seq-mean-token-mean, with and without the dual clip, on log-ratios spread wide enough that
/// every clip branch is taken.
#[test]
fn loss_types_match_the_official_port() {
    let mut checked = 0;
    for seed in 0..40u64 {
        let seq = seed % 2 == 1;
        let spread = [0.05, 0.3, 1.5][seed as usize % 3];
        let ob = batch(seed, &spec(9, spread), seq);
        if ob.targets.is_empty() {
            continue;
        }
        let b = ob.batch();
        for lt in loss_types() {
            let cfg = VppoConfig {
                loss_type: lt,
                aggregation: if seq {
                    Aggregation::SeqMeanTokenMean
                } else {
                    Aggregation::TokenMean
                },
                dual_clip: if seed % 3 == 0 { None } else { Some(3.0) },
                group_size: 2,
                ..VppoConfig::default()
            };
            let f = reference::forward_f64(&b, &cfg).unwrap();
            let (loss, grad, _) =
                official_loss_and_grad(&ob, &cfg, &f.perception.logp, &f.mask, &f.alpha);
            let s = &f.surrogate;
            assert!(
                close(s.loss, loss, 1e-7, 1e-7),
                "seed {seed} {lt:?}: loss {} vs official {loss}",
                s.loss
            );
            let gmax = grad.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            for (t, (&g, &w)) in s.dlogp.iter().zip(&grad).enumerate() {
                assert!(
                    close(g, w, 1e-7, 1e-7 * gmax + 1e-15),
                    "seed {seed} {lt:?}: dlogp[{t}] {g} vs official {w}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} cases");
}

/// GSPO over a batch with empty responses: each contributes nothing (s_b is never 0 / 0).
#[test]
fn gspo_empty_response_contributes_zero() {
    let ob = seeded_batch(7, &spec(6, 0.4));
    let mut with_empty = ob.clone();
    // an empty response inserted after the first
    with_empty.cu_seqlens.insert(1, ob.cu_seqlens[1]);
    with_empty.advantages.insert(1, 5.0);
    for lt in [LossType::Gspo, LossType::GspoToken] {
        let cfg = VppoConfig {
            loss_type: lt,
            shaping: vppo::Shaping::None,
            ..VppoConfig::default()
        };
        let vppo = Vppo::new(cfg, Device::Reference).unwrap();
        let a = vppo.forward(&ob.batch()).unwrap();
        let e = vppo.forward(&with_empty.batch()).unwrap();
        assert!(a.loss.is_finite());
        assert_eq!(a.loss, e.loss, "{lt:?}");
        assert_eq!(a.tokens.dlogp, e.tokens.dlogp, "{lt:?}");
    }
}

/// Every loss type on the kernels (both lane orders, the fake driver) against the reference fed with
/// the kernel's own logp, mask and alpha; then dloss/dlogits of the kernels against the reference's.
#[test]
fn loss_types_on_the_kernels_match_the_reference() {
    for seed in 0..12u64 {
        let ob = seeded_batch(100 + seed, &spec(20, [0.05, 0.3, 1.5][seed as usize % 3]));
        let b = ob.batch();
        for lt in loss_types() {
            let cfg = VppoConfig {
                loss_type: lt,
                aggregation: [
                    Aggregation::TokenMean,
                    Aggregation::SeqMeanTokenMean,
                    Aggregation::SeqMeanTokenSum,
                ][seed as usize % 3],
                group_size: 2,
                ..VppoConfig::default()
            };
            for device in devices() {
                let vppo = Vppo::new(cfg.clone(), device).unwrap();
                let (out, grad) = vppo.loss_and_grad(&b).unwrap();
                let logp: Vec<f64> = out.tokens.logp.iter().map(|&x| x as f64).collect();
                let alpha: Vec<f64> = out.responses.alpha.iter().map(|&x| x as f64).collect();
                let s = reference::surrogate::surrogate(
                    &logp,
                    b.old_logp,
                    &out.tokens.mask,
                    &alpha,
                    b.advantages,
                    b.cu_seqlens,
                    &cfg,
                )
                .unwrap();
                let ctx = format!("seed {seed} {lt:?} {device:?}");
                assert!(
                    close(out.loss, s.loss, 1e-9, 1e-12),
                    "{ctx}: loss {} vs {}",
                    out.loss,
                    s.loss
                );
                let gmax = s.dlogp.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                for (t, (&g, &w)) in out.tokens.dlogp.iter().zip(&s.dlogp).enumerate() {
                    assert!(
                        close(g as f64, w, 1e-6, 1e-9 * gmax + 1e-30),
                        "{ctx}: dlogp[{t}] {g} vs {w}"
                    );
                }
                for (name, got, want) in [
                    (
                        "clip_fraction",
                        out.stats.clip_fraction,
                        s.stats.clip_fraction,
                    ),
                    ("mean_ratio", out.stats.mean_ratio, s.stats.mean_ratio),
                    (
                        "selected_fraction",
                        out.stats.selected_fraction,
                        s.stats.selected_fraction,
                    ),
                ] {
                    assert!(
                        close(got, want, 1e-9, 1e-12),
                        "{ctx}: {name} {got} vs {want}"
                    );
                }
                // dloss/dlogits: the reference's from the same forward output
                let mut want = vec![0.0f32; grad.len()];
                reference::backward_into(&b, &cfg, &out, vppo::GradMut::F32(&mut want)).unwrap();
                let wmax = want.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
                for (i, (&g, &w)) in grad.iter().zip(&want).enumerate() {
                    assert!(
                        close(g as f64, w as f64, 1e-4, 1e-5 * wmax + 1e-30),
                        "{ctx}: grad[{i}] {g} vs {w}"
                    );
                }
            }
        }
    }
}

// ---- the entropy mask (SPEC section 12, mask_by) ----

/// dp_actor.py's entropy mask (`use_vppo_on_entropy`) in our own words, on the padded [B, L_max] view:
/// per row, the valid positions, k = ceil(q * L) (the official float product; the 1e-9 slack takes away
/// a rounding error above an integer, which the crate's exact decimal never has), the k of highest key
/// (torch.topk; ties to the lower index as SPEC section 12 fixes), scattered into a [B, L_max] mask.
fn official_topk(key: &[f64], cu: &[i32], q: f64) -> Vec<Vec<u8>> {
    let lmax = cu
        .windows(2)
        .map(|w| (w[1] - w[0]) as usize)
        .max()
        .unwrap_or(0);
    let mut rows = Vec::new();
    for w in cu.windows(2) {
        let (start, len) = (w[0] as usize, (w[1] - w[0]) as usize);
        let mut row = vec![0u8; lmax];
        let k = ((q * len as f64) - 1e-9).ceil().max(0.0) as usize;
        let mut idx: Vec<usize> = (0..len).collect();
        idx.sort_by(|&i, &j| {
            key[start + j]
                .partial_cmp(&key[start + i])
                .unwrap()
                .then(i.cmp(&j))
        });
        for &i in idx.iter().take(k) {
            row[i] = 1;
        }
        rows.push(row);
    }
    rows
}

/// The official final mask for `mask_by`, flattened back to the N response tokens.
fn official_mask(score: &[f64], entropy: &[f64], cu: &[i32], cfg: &VppoConfig) -> Vec<u8> {
    let vppo = official_topk(score, cu, cfg.top_fraction);
    let ent = official_topk(entropy, cu, cfg.entropy_top_fraction);
    let mut out = Vec::new();
    for (b, w) in cu.windows(2).enumerate() {
        for i in 0..(w[1] - w[0]) as usize {
            out.push(match cfg.mask_by {
                MaskBy::Perception => vppo[b][i],
                MaskBy::Entropy => ent[b][i],
                MaskBy::PerceptionOrEntropy => vppo[b][i] | ent[b][i],
            });
        }
    }
    out
}

fn mask_bys() -> [MaskBy; 3] {
    [
        MaskBy::Perception,
        MaskBy::Entropy,
        MaskBy::PerceptionOrEntropy,
    ]
}

fn mask_cfg(mask_by: MaskBy, seed: u64) -> VppoConfig {
    VppoConfig {
        mask_by,
        top_fraction: [0.4, 0.25, 0.7][seed as usize % 3],
        entropy_top_fraction: [0.2, 0.5, 0.3, 0.25][seed as usize % 4],
        group_size: 2,
        ..VppoConfig::default()
    }
}

/// The reference's mask equals the official port's, exactly, for every mask_by; the loss is the one
/// of that mask (the surrogate fed with the port's mask); k stays the perception k_b; and the
/// perception-or-entropy mask is a superset of both.
#[test]
fn entropy_mask_matches_the_official_port() {
    let mut checked = 0;
    for seed in 0..40u64 {
        let ob = seeded_batch(300 + seed, &spec(16, 0.3));
        let b = ob.batch();
        for mb in mask_bys() {
            let cfg = mask_cfg(mb, seed);
            let f = reference::forward_f64(&b, &cfg).unwrap();
            let p = &f.perception;
            let want = official_mask(&p.score, &p.entropy, b.cu_seqlens, &cfg);
            assert_eq!(f.mask, want, "seed {seed} {mb:?}");
            let (perc, k) = reference::select::topk_mask(
                &p.score,
                b.cu_seqlens,
                cfg.top_fraction_exact().unwrap(),
            )
            .unwrap();
            assert_eq!(f.k, k, "seed {seed} {mb:?}: k is the perception k_b");
            if mb == MaskBy::PerceptionOrEntropy {
                let (ent, _) = reference::select::topk_mask(
                    &p.entropy,
                    b.cu_seqlens,
                    cfg.entropy_top_fraction_exact().unwrap(),
                )
                .unwrap();
                for t in 0..f.mask.len() {
                    assert_eq!(f.mask[t], perc[t] | ent[t], "seed {seed}: token {t}");
                }
            }
            let s = reference::surrogate::surrogate(
                &p.logp,
                b.old_logp,
                &want,
                &f.alpha,
                b.advantages,
                b.cu_seqlens,
                &cfg,
            )
            .unwrap();
            assert_eq!(f.surrogate.loss, s.loss, "seed {seed} {mb:?}");
            checked += 1;
        }
    }
    assert!(checked >= 100, "only {checked} cases");
}

/// The kernels (both lane orders, the fake driver) pick exactly the reference's mask on their own f32
/// score and entropy, for every mask_by; k_b and Sbar are the perception ones; the loss is the
/// reference surrogate's on that mask.
#[test]
fn entropy_mask_on_the_kernels_matches_the_reference() {
    for seed in 0..10u64 {
        let ob = seeded_batch(400 + seed, &spec(40, 0.3));
        let b = ob.batch();
        for mb in mask_bys() {
            let cfg = mask_cfg(mb, seed);
            for device in devices() {
                let ctx = format!("seed {seed} {mb:?} {device:?}");
                let out = Vppo::new(cfg.clone(), device).unwrap().forward(&b).unwrap();
                let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
                let (score, entropy) = (f64s(&out.tokens.score), f64s(&out.tokens.entropy));
                let (want, k) =
                    reference::select::mask_for(&score, &entropy, b.cu_seqlens, &cfg).unwrap();
                assert_eq!(out.tokens.mask, want, "{ctx}");
                assert_eq!(out.responses.k, k, "{ctx}");
                let alpha = f64s(&out.responses.alpha);
                let s = reference::surrogate::surrogate(
                    &f64s(&out.tokens.logp),
                    b.old_logp,
                    &want,
                    &alpha,
                    b.advantages,
                    b.cu_seqlens,
                    &cfg,
                )
                .unwrap();
                assert!(
                    close(out.loss, s.loss, 1e-9, 1e-12),
                    "{ctx}: loss {} vs {}",
                    out.loss,
                    s.loss
                );
            }
        }
    }
}

/// All scores and entropies tied (every logit 0: each row is uniform, kl = 0, entropy = ln V), with an
/// empty response among them: every mask is the first ceil(q L_b) tokens of each response by index,
/// on the reference and on the kernels.
#[test]
fn entropy_mask_ties_and_empty_responses() {
    let mut ob = seeded_batch(11, &spec(30, 0.3));
    ob.cu_seqlens.insert(1, ob.cu_seqlens[1]);
    ob.advantages.insert(1, 0.5);
    let nv = ob.targets.len() * ob.vocab;
    ob.logits = vppo::OwnedLogits::F32(vec![0.0; nv]);
    ob.logits_masked = vppo::OwnedLogits::F32(vec![0.0; nv]);
    let b = ob.batch();
    for mb in mask_bys() {
        let cfg = VppoConfig {
            mask_by: mb,
            top_fraction: 0.4,
            entropy_top_fraction: 0.2,
            ..VppoConfig::default()
        };
        let mut want = Vec::new();
        for w in b.cu_seqlens.windows(2) {
            let len = (w[1] - w[0]) as usize;
            let q = match mb {
                MaskBy::Entropy => 0.2,
                _ => 0.4, // the union of the first 40% and the first 20%
            };
            let k = cfg_k(q, len);
            want.extend((0..len).map(|i| (i < k) as u8));
        }
        let mut all = vec![Device::Reference];
        all.extend(devices());
        for device in all {
            let out = Vppo::new(cfg.clone(), device).unwrap().forward(&b).unwrap();
            assert_eq!(out.tokens.mask, want, "{mb:?} {device:?}");
            assert!(out.loss.is_finite(), "{mb:?} {device:?}");
        }
    }
}

fn cfg_k(q: f64, len: usize) -> usize {
    vppo::TopFraction::new(q).unwrap().k_for(len)
}

/// A bad entropy_top_fraction is a config error naming it, whatever mask_by is.
#[test]
fn bad_entropy_top_fraction_is_an_error() {
    for q in [0.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
        for mb in mask_bys() {
            let cfg = VppoConfig {
                mask_by: mb,
                entropy_top_fraction: q,
                ..VppoConfig::default()
            };
            let Err(e) = Vppo::new(cfg, Device::Reference) else {
                panic!("{q} {mb:?}: accepted");
            };
            assert!(
                e.to_string().contains("entropy-top-fraction"),
                "{q} {mb:?}: {e}"
            );
        }
    }
}

// ---- the KL penalty (SPEC section 12, kl_penalty and kl_coef) ----

fn kl_penalties() -> [KlPenalty; 4] {
    [KlPenalty::K1, KlPenalty::Abs, KlPenalty::Mse, KlPenalty::K3]
}

/// `ob` with a ref_logp of old_logp + U(-spread, spread) (old_logp lies near the policy's logp, so
/// ref_logp - logp spans about the spread: 3 takes k3 past its clamp of 10 on some tokens).
fn with_ref_logp(mut ob: OwnedBatch, seed: u64, spread: f32) -> OwnedBatch {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x6b6c);
    ob.ref_logp = Some(
        ob.old_logp
            .iter()
            .map(|&x| x + rng.gen_range(-spread..=spread))
            .collect(),
    );
    ob
}

/// The reference's loss, kl_loss and dloss/dlogp equal the official port's (compute_kl, then
/// average_loss over the response mask, times kl_coef, added to pg_loss), for every penalty, in
/// token-mean and seq-mean-token-mean, under every loss type. The official KL loss averages over
/// every response token, not only the masked ones (the policy loss alone takes `loss_token_mask`):
/// with top_fraction 0.4 most tokens are outside the mask, so a KL on the masked tokens only would
/// fail here.
#[test]
fn kl_penalty_matches_the_official_port() {
    let mut checked = 0;
    for seed in 0..40u64 {
        let seq = seed % 2 == 1;
        let spread = [0.05, 0.5, 3.0][seed as usize % 3];
        let ob = with_ref_logp(batch(500 + seed, &spec(9, 0.3), seq), seed, spread);
        if ob.targets.is_empty() {
            continue;
        }
        let b = ob.batch();
        for penalty in kl_penalties() {
            let cfg = VppoConfig {
                kl_penalty: penalty,
                kl_coef: [0.01, 0.5, 2.0][seed as usize % 3],
                loss_type: loss_types()[(seed / 2) as usize % 4],
                aggregation: if seq {
                    Aggregation::SeqMeanTokenMean
                } else {
                    Aggregation::TokenMean
                },
                group_size: 2,
                ..VppoConfig::default()
            };
            let f = reference::forward_f64(&b, &cfg).unwrap();
            let (loss, grad, kl_loss) =
                official_loss_and_grad(&ob, &cfg, &f.perception.logp, &f.mask, &f.alpha);
            let s = &f.surrogate;
            let ctx = format!("seed {seed} {penalty:?} {:?}", cfg.loss_type);
            assert!(
                close(s.kl_loss, kl_loss, 1e-7, 1e-12),
                "{ctx}: kl_loss {} vs official {kl_loss}",
                s.kl_loss
            );
            assert!(
                close(s.loss, loss, 1e-7, 1e-7),
                "{ctx}: loss {} vs official {loss}",
                s.loss
            );
            let gmax = grad.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            for (t, (&g, &w)) in s.dlogp.iter().zip(&grad).enumerate() {
                assert!(
                    close(g, w, 1e-7, 1e-7 * gmax + 1e-15),
                    "{ctx}: dlogp[{t}] {g} vs official {w}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 120, "only {checked} cases");
}

/// Every penalty on the kernels (both lane orders, the fake driver), in the three aggregations and
/// under every loss type, against the reference fed with the kernel's own logp, mask and alpha: loss,
/// kl_loss and dloss/dlogp; then dloss/dlogits against the reference's from the same output.
#[test]
fn kl_penalty_on_the_kernels_matches_the_reference() {
    for seed in 0..9u64 {
        let spread = [0.05, 0.5, 3.0][seed as usize % 3];
        let ob = with_ref_logp(seeded_batch(600 + seed, &spec(20, 0.3)), seed, spread);
        let b = ob.batch();
        for penalty in kl_penalties() {
            let cfg = VppoConfig {
                kl_penalty: penalty,
                kl_coef: [0.01, 0.5, 2.0][(seed / 3) as usize % 3],
                loss_type: loss_types()[seed as usize % 4],
                aggregation: [
                    Aggregation::TokenMean,
                    Aggregation::SeqMeanTokenMean,
                    Aggregation::SeqMeanTokenSum,
                ][seed as usize % 3],
                group_size: 2,
                ..VppoConfig::default()
            };
            for device in devices() {
                let vppo = Vppo::new(cfg.clone(), device).unwrap();
                let (out, grad) = vppo.loss_and_grad(&b).unwrap();
                let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
                let s = reference::surrogate::surrogate_kl(
                    &f64s(&out.tokens.logp),
                    b.old_logp,
                    b.ref_logp,
                    &out.tokens.mask,
                    &f64s(&out.responses.alpha),
                    b.advantages,
                    b.cu_seqlens,
                    &cfg,
                )
                .unwrap();
                let ctx = format!("seed {seed} {penalty:?} {:?} {device:?}", cfg.loss_type);
                for (name, got, want) in [
                    ("loss", out.loss, s.loss),
                    ("kl_loss", out.kl_loss, s.kl_loss),
                    ("pg_loss", out.pg_loss, s.pg_loss),
                ] {
                    assert!(
                        close(got, want, 1e-9, 1e-12),
                        "{ctx}: {name} {got} vs {want}"
                    );
                }
                let gmax = s.dlogp.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                for (t, (&g, &w)) in out.tokens.dlogp.iter().zip(&s.dlogp).enumerate() {
                    assert!(
                        close(g as f64, w, 1e-6, 1e-9 * gmax + 1e-30),
                        "{ctx}: dlogp[{t}] {g} vs {w}"
                    );
                }
                let mut want = vec![0.0f32; grad.len()];
                reference::backward_into(&b, &cfg, &out, vppo::GradMut::F32(&mut want)).unwrap();
                let wmax = want.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
                for (i, (&g, &w)) in grad.iter().zip(&want).enumerate() {
                    assert!(
                        close(g as f64, w as f64, 1e-4, 1e-5 * wmax + 1e-30),
                        "{ctx}: grad[{i}] {g} vs {w}"
                    );
                }
            }
        }
    }
}

/// Hand-derived values at the clamps of k3 and at k1 = 0, on every device: kl_loss is the sum of the
/// expected kl_t over Z, and dloss/dlogp moves by kl_coef (d kl_t / d logp_t) / Z from the loss
/// without the penalty, with 0 through an active clamp.
#[test]
fn kl_penalty_at_the_clamps() {
    let ob = seeded_batch(21, &spec(12, 0.3));
    let n = ob.targets.len();
    assert!(n >= 10, "N = {n}");
    let beta = 0.25;
    let none = VppoConfig {
        group_size: 2,
        ..VppoConfig::default()
    };
    let mut all = vec![Device::Reference];
    all.extend(devices());
    for device in all {
        let base = Vppo::new(none.clone(), device)
            .unwrap()
            .forward(&ob.batch())
            .unwrap();
        let logp = &base.tokens.logp;
        let z = n as f64;
        // (ref_logp - logp, k3, d k3 / d logp): x past 20 on both sides and e^x - x - 1 past 10 on
        // both sides (clamped: gradient 0), and two inside
        let shifts: [(f32, f64, f64); 6] = [
            (25.0, 10.0, 0.0),
            (-25.0, 10.0, 0.0),
            (3.0, 10.0, 0.0),
            (-12.0, 10.0, 0.0),
            (-5.0, 4.0 + (-5.0f64).exp(), 1.0 - (-5.0f64).exp()),
            (0.5, 0.5f64.exp() - 1.5, 1.0 - 0.5f64.exp()),
        ];
        let mut ref_logp = logp.clone();
        let (mut want_kl, mut want_dkl) = (vec![0.0f64; n], vec![0.0f64; n]);
        for t in 0..n {
            let (shift, kl, dkl) = shifts[t % shifts.len()];
            ref_logp[t] = logp[t] + shift;
            want_kl[t] = kl;
            want_dkl[t] = dkl;
        }
        let b = vppo::Batch {
            ref_logp: Some(&ref_logp),
            ..ob.batch()
        };
        let cfg = VppoConfig {
            kl_penalty: KlPenalty::K3,
            kl_coef: beta,
            ..none.clone()
        };
        let out = Vppo::new(cfg, device).unwrap().forward(&b).unwrap();
        let kl_loss: f64 = want_kl.iter().sum::<f64>() / z;
        assert!(
            close(out.kl_loss, kl_loss, 1e-6, 0.0),
            "{device:?}: kl_loss {} vs {kl_loss}",
            out.kl_loss
        );
        assert_eq!(out.tokens.mask, base.tokens.mask, "{device:?}");
        assert!(
            close(out.loss, base.loss + beta * kl_loss, 1e-6, 1e-9),
            "{device:?}"
        );
        for t in 0..n {
            let moved = out.tokens.dlogp[t] as f64 - base.tokens.dlogp[t] as f64;
            let want = beta * want_dkl[t] / z;
            assert!(
                close(moved, want, 1e-4, 1e-7 * beta / z),
                "{device:?}: token {t} (shift {}): dlogp moved by {moved}, expected {want}",
                shifts[t % shifts.len()].0
            );
        }
        if device == Device::Reference {
            continue; // its logp is the f64 one: ref_logp = the f32 logp is not k1 = 0 there
        }
        // ref_logp = the kernels' own logp: k1 = 0 on every token. abs, mse and k3 are 0 with
        // gradient 0 (abs's sign is 0 at 0), so everything is bit-identical to no penalty; k1 is 0
        // with gradient 1.
        let b = vppo::Batch {
            ref_logp: Some(logp),
            ..ob.batch()
        };
        for penalty in kl_penalties() {
            let cfg = VppoConfig {
                kl_penalty: penalty,
                kl_coef: beta,
                ..none.clone()
            };
            let out = Vppo::new(cfg, device).unwrap().forward(&b).unwrap();
            assert_eq!(out.kl_loss, 0.0, "{device:?} {penalty:?}");
            if penalty == KlPenalty::K1 {
                for t in 0..n {
                    let moved = out.tokens.dlogp[t] as f64 - base.tokens.dlogp[t] as f64;
                    assert!(close(moved, beta / z, 1e-4, 0.0), "{device:?} token {t}");
                }
            } else {
                assert_eq!(out.loss, base.loss, "{device:?} {penalty:?}");
                assert_eq!(
                    out.tokens.dlogp, base.tokens.dlogp,
                    "{device:?} {penalty:?}"
                );
            }
        }
    }
}

/// kl_coef = 0 weighs the penalty to nothing: loss and dloss/dlogp bit-identical to no penalty, on
/// every device; kl_loss is still reported.
#[test]
fn kl_coef_zero_is_no_penalty() {
    let ob = with_ref_logp(seeded_batch(31, &spec(12, 0.3)), 31, 0.5);
    let mut all = vec![Device::Reference];
    all.extend(devices());
    for device in all {
        let base = Vppo::new(VppoConfig::default(), device)
            .unwrap()
            .forward(&ob.batch())
            .unwrap();
        for penalty in kl_penalties() {
            let cfg = VppoConfig {
                kl_penalty: penalty,
                kl_coef: 0.0,
                ..VppoConfig::default()
            };
            let out = Vppo::new(cfg, device)
                .unwrap()
                .forward(&ob.batch())
                .unwrap();
            assert_eq!(out.loss, base.loss, "{device:?} {penalty:?}");
            assert_eq!(
                out.tokens.dlogp, base.tokens.dlogp,
                "{device:?} {penalty:?}"
            );
            assert!(out.kl_loss != 0.0, "{device:?} {penalty:?}");
        }
    }
}

// -------------------------------------------------------------------------------------------------
// kl_penalty = full: the exact KL(pi || pi_ref) from ref_logits (SPEC section 12)
// -------------------------------------------------------------------------------------------------

/// `ob` with ref_logits = logits + a perturbation of up to `spread` (on the grid of 1/256, so exact
/// in every dtype for small logits), the dtype of the logits.
fn with_ref_logits(mut ob: OwnedBatch, seed: u64, spread: f32) -> OwnedBatch {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x7266);
    let steps = (spread * 256.0) as i32;
    let view = ob.logits.view();
    let r: Vec<f32> = (0..view.len())
        .map(|i| view.get(i) as f32 + rng.gen_range(-steps..=steps) as f32 / 256.0)
        .collect();
    ob.ref_logits = Some(match view.dtype() {
        vppo::Dtype::F32 => OwnedLogits::F32(r),
        vppo::Dtype::F16 => OwnedLogits::F16(r.into_iter().map(half::f16::from_f32).collect()),
        vppo::Dtype::Bf16 => OwnedLogits::Bf16(r.into_iter().map(half::bf16::from_f32).collect()),
    });
    ob
}

/// The official update with `kl_penalty = "full"` computed exactly, as a function of the logits:
/// log_probs = log_softmax(logits / tau)[targets], kld = KL(pi || pi_ref) of each token summed over
/// the vocabulary (F.kl_div(ref_log_probs, log_probs, log_target=True).sum(-1)), then dp_actor.py's
/// `kl_loss = average_loss(kld, response_mask)`, `loss = pg_loss + kl_loss * kl_coef` and the entropy
/// penalty, with the crate's mask and alpha as in [`official_loss_and_grad`]. Returns the loss, its
/// gradient with respect to every logit ([N, V], forward mode, one direction per logit) and kl_loss.
fn official_full_loss_and_grad(
    ob: &OwnedBatch,
    cfg: &VppoConfig,
    mask: &[u8],
    alpha: &[f64],
) -> (f64, Vec<f64>, f64) {
    let cu = &ob.cu_seqlens;
    let p = Padded::new(cu);
    let (n, v, tau) = (ob.targets.len(), ob.vocab, cfg.temperature);
    let logits = ob.logits.view();
    let reference = ob.ref_logits.as_ref().unwrap().view();
    let old: Vec<f64> = p.pad(
        &ob.old_logp.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        0.0,
    );
    let mut adv_tok = vec![];
    for r in 0..cu.len() - 1 {
        for _ in cu[r]..cu[r + 1] {
            adv_tok.push(alpha[r] * ob.advantages[r] as f64);
        }
    }
    let adv = p.pad(&adv_tok, 0.0);
    let token_mask = p.pad(&mask.iter().map(|&m| m as f64).collect::<Vec<_>>(), 0.0);
    let loss_type = match cfg.loss_type {
        LossType::Ppo => "default",
        LossType::Gspo => "gspo",
        LossType::GspoToken => "gspo_token",
        LossType::Cispo => "cispo",
    };
    let seq = cfg.aggregation == Aggregation::SeqMeanTokenMean;
    let clip = official::Clip {
        low: cfg.eps_low,
        high: cfg.eps_high,
        dual: cfg.dual_clip.unwrap_or(f64::INFINITY),
    };
    // log_softmax of a row of D, centred on the row's maximum
    let log_softmax = |a: &[D]| -> Vec<D> {
        let m = D::c(a.iter().map(|x| x.v).fold(f64::NEG_INFINITY, f64::max));
        let mut s = D::c(0.0);
        for &x in a {
            s = s + (x - m).exp();
        }
        let lse = m + s.ln();
        a.iter().map(|&x| x - lse).collect()
    };
    let eval = |seed: Option<(usize, usize)>| -> (D, D) {
        let mut lp = Vec::with_capacity(n);
        let mut kld = Vec::with_capacity(n);
        for t in 0..n {
            let a: Vec<D> = (0..v)
                .map(|j| D {
                    v: logits.get(t * v + j) / tau,
                    d: if seed == Some((t, j)) { 1.0 / tau } else { 0.0 },
                })
                .collect();
            let c: Vec<D> = (0..v)
                .map(|j| D::c(reference.get(t * v + j) / tau))
                .collect();
            let (log_p, log_ref) = (log_softmax(&a), log_softmax(&c));
            lp.push(log_p[ob.targets[t] as usize]);
            // F.kl_div(ref_log_probs, log_probs, log_target=True).sum(-1)
            let mut k = D::c(0.0);
            for j in 0..v {
                k = k + log_p[j].exp() * (log_p[j] - log_ref[j]);
            }
            kld.push(k);
        }
        let lp = p.pad(&lp, D::c(0.0));
        let kld = p.pad(&kld, D::c(0.0));
        let pg =
            official::compute_policy_loss(&old, &lp, &adv, &p, &clip, loss_type, seq, &token_mask);
        let kl_loss = official::average_loss(&kld, &p, seq);
        let mut s = D::c(0.0);
        let mut m = 0.0;
        for (x, &k) in lp.iter().zip(&p.response_mask) {
            s = s + *x * D::c(k);
            m += k;
        }
        let loss =
            pg + kl_loss * D::c(cfg.kl_coef) + D::c(cfg.logp_penalty) * -(s / D::c(m + 1e-8));
        (loss, kl_loss)
    };
    let (loss, kl_loss) = eval(None);
    let grad = (0..n * v).map(|i| eval(Some((i / v, i % v))).0.d).collect();
    (loss.v, grad, kl_loss.v)
}

fn full_cfg(seed: u64, seq: bool) -> VppoConfig {
    VppoConfig {
        kl_penalty: KlPenalty::Full,
        kl_coef: [0.05, 0.5, 2.0][seed as usize % 3],
        loss_type: loss_types()[(seed / 2) as usize % 4],
        aggregation: if seq {
            Aggregation::SeqMeanTokenMean
        } else {
            Aggregation::TokenMean
        },
        temperature: [1.0, 0.8, 1.5][(seed / 3) as usize % 3],
        // no logp penalty on some seeds: tokens outside the mask then have g_t = 0 and only the KL
        // term (every response token) in their gradient row
        logp_penalty: if seed % 4 == 0 { 0.0 } else { 0.06 },
        group_size: 2,
        ..VppoConfig::default()
    }
}

/// The reference's loss, kl_loss and dloss/dlogits equal the official port's with the exact KL.
#[test]
fn full_kl_penalty_matches_the_official_port() {
    let mut checked = 0;
    for seed in 0..16u64 {
        let seq = seed % 2 == 1;
        let spread = [0.05, 0.5, 2.0][seed as usize % 3];
        let ob = with_ref_logits(batch(700 + seed, &spec(7, 0.3), seq), seed, spread);
        if ob.targets.is_empty() {
            continue;
        }
        let cfg = full_cfg(seed, seq);
        let b = ob.batch();
        let f = reference::forward_f64(&b, &cfg).unwrap();
        let (loss, grad, kl_loss) = official_full_loss_and_grad(&ob, &cfg, &f.mask, &f.alpha);
        let ctx = format!("seed {seed} {:?} {:?}", cfg.loss_type, cfg.aggregation);
        let s = &f.surrogate;
        // 1e-7: the official masked means divide by L_b + 1e-8
        assert!(
            close(s.kl_loss, kl_loss, 1e-7, 1e-14),
            "{ctx}: kl_loss {} vs official {kl_loss}",
            s.kl_loss
        );
        assert!(
            close(s.loss, loss, 1e-7, 1e-12),
            "{ctx}: loss {} vs official {loss}",
            s.loss
        );
        let vppo = Vppo::new(cfg.clone(), Device::Reference).unwrap();
        let (out, g) = vppo.loss_and_grad(&b).unwrap();
        let gmax = grad.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for (i, (&x, &w)) in g.iter().zip(&grad).enumerate() {
            assert!(
                close(x as f64, w, 1e-5, 1e-6 * gmax + 1e-12),
                "{ctx}: grad[{}, {}] {x} vs official {w}",
                i / ob.vocab,
                i % ob.vocab
            );
        }
        assert!(close(out.kl_loss, kl_loss, 1e-7, 1e-14));
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} cases");
}

/// The full penalty on the kernels (both lane orders, the fake driver): loss, kl_loss, the
/// per-token KL and the gradient against the reference, f32, f16 and bf16, the three aggregations,
/// with -inf entries in both tensors (where the reference's p is 0 too).
#[test]
fn full_kl_penalty_on_the_kernels_matches_the_reference() {
    for seed in 0..9u64 {
        let dtype = [vppo::Dtype::F32, vppo::Dtype::Bf16, vppo::Dtype::F16][seed as usize % 3];
        let s = BatchSpec {
            dtype,
            vocab: (2, 300),
            neg_inf_prob: 0.05,
            ..spec(12, 0.3)
        };
        // ref_logits = logits + noise is -inf exactly where the logits are (p_v = 0 and
        // pi_ref_v = 0); in f32, half of those get a finite reference logit (p_v = 0 alone)
        let mut ob = with_ref_logits(seeded_batch(800 + seed, &s), seed, 1.0);
        if let (OwnedLogits::F32(l), Some(OwnedLogits::F32(r))) = (&ob.logits, &mut ob.ref_logits) {
            for (i, x) in l.iter().enumerate() {
                if *x == f32::NEG_INFINITY && i % 2 == 1 {
                    r[i] = 0.5;
                }
            }
        }
        let b = ob.batch();
        let cfg = VppoConfig {
            aggregation: [
                Aggregation::TokenMean,
                Aggregation::SeqMeanTokenMean,
                Aggregation::SeqMeanTokenSum,
            ][seed as usize % 3],
            ..full_cfg(seed, false)
        };
        let want = Vppo::new(cfg.clone(), Device::Reference)
            .unwrap()
            .forward(&b)
            .unwrap();
        for device in devices() {
            let vppo = Vppo::new(cfg.clone(), device).unwrap();
            let (out, grad) = vppo.loss_and_grad(&b).unwrap();
            let ctx = format!("seed {seed} {dtype:?} {:?} {device:?}", cfg.aggregation);
            for (name, got, w) in [
                ("loss", out.loss, want.loss),
                ("kl_loss", out.kl_loss, want.kl_loss),
            ] {
                assert!(close(got, w, 1e-4, 1e-6), "{ctx}: {name} {got} vs {w}");
            }
            for (t, (&k, &w)) in out
                .tokens
                .ref_kl
                .iter()
                .zip(&want.tokens.ref_kl)
                .enumerate()
            {
                assert!(
                    close(k as f64, w as f64, 2e-4, 2e-6),
                    "{ctx}: ref_kl[{t}] {k} vs {w}"
                );
            }
            // the gradient against the reference's from the same output (mask, alpha, kl)
            let mut want_g = vec![0.0f32; grad.len()];
            reference::backward_into(&b, &cfg, &out, vppo::GradMut::F32(&mut want_g)).unwrap();
            let wmax = want_g.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
            for (i, (&g, &w)) in grad.iter().zip(&want_g).enumerate() {
                assert!(
                    close(g as f64, w as f64, 1e-3, 1e-5 * wmax + 1e-30),
                    "{ctx}: grad[{i}] {g} vs {w}"
                );
            }
            // kl_coef = 0: bit for bit the loss without a penalty, and its gradient
            if seed == 0 {
                let zero = VppoConfig {
                    kl_coef: 0.0,
                    ..cfg.clone()
                };
                let none = VppoConfig {
                    kl_penalty: KlPenalty::None,
                    ..cfg.clone()
                };
                let (a, ga) = Vppo::new(zero, device).unwrap().loss_and_grad(&b).unwrap();
                let (c, gc) = Vppo::new(none, device).unwrap().loss_and_grad(&b).unwrap();
                assert_eq!(a.loss, c.loss, "{ctx}");
                assert_eq!(ga, gc, "{ctx}");
            }
        }
    }
}

/// ref_logits read through `rows` as logits is: the same results as the packed batch.
#[test]
fn full_kl_penalty_reads_ref_logits_through_rows() {
    let ob = with_ref_logits(seeded_batch(901, &spec(9, 0.3)), 3, 0.5);
    let (n, v) = (ob.targets.len(), ob.vocab);
    // [R, V] = every token row after one padding row of zeros
    let rows: Vec<i64> = (0..n as i64).map(|t| 2 * t + 1).collect();
    let spread = |x: &OwnedLogits| -> OwnedLogits {
        let x = x.view();
        let mut out = vec![0.0f32; 2 * n * v];
        for t in 0..n {
            for j in 0..v {
                out[(2 * t + 1) * v + j] = x.get(t * v + j) as f32;
            }
        }
        OwnedLogits::F32(out)
    };
    let (l, m, r) = (
        spread(&ob.logits),
        spread(&ob.logits_masked),
        spread(ob.ref_logits.as_ref().unwrap()),
    );
    let f32s = ob.to_f32();
    let cfg = full_cfg(2, false);
    let packed = f32s.batch();
    let through = vppo::Batch {
        logits: l.view(),
        logits_masked: m.view(),
        ref_logits: Some(r.view()),
        rows: Some(&rows),
        ..packed
    };
    let mut all = vec![Device::Reference];
    all.extend(devices());
    for device in all {
        let vppo = Vppo::new(cfg.clone(), device).unwrap();
        let (a, ga) = vppo.loss_and_grad(&packed).unwrap();
        let (b, gb) = vppo.loss_and_grad(&through).unwrap();
        assert!(close(a.loss, b.loss, 1e-12, 1e-12), "{device:?}");
        assert_eq!(a.tokens.ref_kl, b.tokens.ref_kl, "{device:?}");
        for t in 0..n {
            assert_eq!(
                &ga[t * v..(t + 1) * v],
                &gb[(2 * t + 1) * v..(2 * t + 2) * v],
                "{device:?}"
            );
            assert!(gb[2 * t * v..(2 * t + 1) * v].iter().all(|x| *x == 0.0));
        }
    }
}

/// Bad combinations and bad ref_logits are errors naming ref_logits, on every device.
#[test]
fn full_kl_penalty_errors() {
    let ob = with_ref_logits(seeded_batch(902, &spec(6, 0.3)), 4, 0.5);
    let cfg = full_cfg(1, false);
    let mut all = vec![Device::Reference];
    all.extend(devices());
    for device in all {
        let vppo = Vppo::new(cfg.clone(), device).unwrap();
        let err = |b: &vppo::Batch| vppo.forward(b).unwrap_err().to_string();
        // full without ref_logits
        let none = vppo::Batch {
            ref_logits: None,
            ..ob.batch()
        };
        assert!(
            err(&none).contains("ref_logits is missing"),
            "{device:?}: {}",
            err(&none)
        );
        // another dtype, another shape
        let bf = OwnedLogits::Bf16(vec![half::bf16::ZERO; ob.logits.len()]);
        let e = err(&vppo::Batch {
            ref_logits: Some(bf.view()),
            ..ob.batch()
        });
        assert!(e.contains("ref_logits") && e.contains("dtype"), "{e}");
        let short = OwnedLogits::F32(vec![0.0; ob.logits.len() - 1]);
        let e = err(&vppo::Batch {
            ref_logits: Some(short.view()),
            ..ob.batch()
        });
        assert!(e.contains("ref_logits") && e.contains("elements"), "{e}");
        // a NaN in row 1, and KL = +inf (a finite logit over a ref at -inf) in row 2
        let OwnedLogits::F32(r) = ob.ref_logits.as_ref().unwrap() else {
            unreachable!()
        };
        let v = ob.vocab;
        let mut nan = r.clone();
        nan[v + 1] = f32::NAN;
        let nan = OwnedLogits::F32(nan);
        let e = err(&vppo::Batch {
            ref_logits: Some(nan.view()),
            ..ob.batch()
        });
        assert!(
            e.contains("ref_logits has a non-finite value (NaN) at row 1"),
            "{device:?}: {e}"
        );
        let mut inf = r.clone();
        inf[2 * v] = f32::NEG_INFINITY;
        let inf = OwnedLogits::F32(inf);
        let e = err(&vppo::Batch {
            ref_logits: Some(inf.view()),
            ..ob.batch()
        });
        assert!(
            e.contains("KL(p || q) is +inf at row 2: ref_logits is -inf at column 0"),
            "{device:?}: {e}"
        );
        // the backwards that have no ref_logits refuse
        let out = vppo.forward(&ob.batch()).unwrap();
        let mut g = vec![0.0f32; ob.logits.len()];
        let saved = vppo::SavedForward {
            targets: &ob.targets,
            lse: &out.tokens.lse,
            dlogp: &out.tokens.dlogp,
            rows: None,
        };
        let e = vppo
            .backward_saved(
                Some(ob.logits.view()),
                v,
                &saved,
                vppo::GradMut::F32(&mut g),
            )
            .unwrap_err();
        assert!(e.to_string().contains("ref_logits"), "{e}");
        // backward_saved_full equals backward_into
        let full = vppo::FullKlSaved {
            ref_logits: ob.ref_logits.as_ref().unwrap().view(),
            lse_ref: &out.tokens.lse_ref,
            ref_kl: &out.tokens.ref_kl,
            dref_kl: &out.tokens.dref_kl,
        };
        vppo.backward_saved_full(
            Some(ob.logits.view()),
            v,
            &saved,
            &full,
            vppo::GradMut::F32(&mut g),
        )
        .unwrap();
        let mut h = vec![0.0f32; ob.logits.len()];
        vppo.backward_into(&ob.batch(), &out, vppo::GradMut::F32(&mut h))
            .unwrap();
        let hmax = h.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        for (x, y) in g.iter().zip(&h) {
            assert!(
                (x - y).abs() <= 1e-5 * hmax + 1e-6 * y.abs(),
                "{device:?}: {x} vs {y}"
            );
        }
        // Under another penalty `full` is ignored, as the forward ignores ref_logits: the gradient
        // of backward_saved, bit for bit, and no NaN from a -inf in ref_logits (the full kernel
        // would make one, 0 * inf, from a finite logit against it).
        let plain = Vppo::new(
            VppoConfig {
                kl_penalty: KlPenalty::None,
                ..cfg.clone()
            },
            device,
        )
        .unwrap();
        let out = plain.forward(&ob.batch()).unwrap();
        let saved = vppo::SavedForward {
            targets: &ob.targets,
            lse: &out.tokens.lse,
            dlogp: &out.tokens.dlogp,
            rows: None,
        };
        let zeros = vec![0.0f32; ob.targets.len()];
        let ignored = vppo::FullKlSaved {
            ref_logits: inf.view(),
            lse_ref: &zeros,
            ref_kl: &zeros,
            dref_kl: &zeros,
        };
        let mut want = vec![0.0f32; ob.logits.len()];
        plain
            .backward_saved(
                Some(ob.logits.view()),
                v,
                &saved,
                vppo::GradMut::F32(&mut want),
            )
            .unwrap();
        plain
            .backward_saved_full(
                Some(ob.logits.view()),
                v,
                &saved,
                &ignored,
                vppo::GradMut::F32(&mut g),
            )
            .unwrap();
        assert!(g.iter().all(|x| x.is_finite()), "{device:?}");
        assert_eq!(
            g.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{device:?}"
        );
    }
}

/// ref_logits rows on another 16-byte phase than the logits rows (both passes then read those rows
/// element by element, in another order of the f32 sums): the aligned copy's results to rounding,
/// on every kernel device.
#[test]
fn full_kl_penalty_ref_logits_on_another_phase() {
    let s = BatchSpec {
        vocab: (16, 40),
        ..spec(9, 0.3)
    };
    let ob = with_ref_logits(seeded_batch(903, &s).to_f32(), 5, 0.5);
    let OwnedLogits::F32(r) = ob.ref_logits.as_ref().unwrap() else {
        unreachable!()
    };
    // one f32 in front: every row of the view starts 4 bytes off the phase of the same row of r
    let mut shifted = vec![0.0f32; r.len() + 1];
    shifted[1..].copy_from_slice(r);
    let cfg = full_cfg(0, false);
    let aligned = ob.batch();
    let off = vppo::Batch {
        ref_logits: Some(vppo::Logits::F32(&shifted[1..])),
        ..aligned
    };
    for device in devices() {
        let vppo = Vppo::new(cfg.clone(), device).unwrap();
        let (a, ga) = vppo.loss_and_grad(&aligned).unwrap();
        let (b, gb) = vppo.loss_and_grad(&off).unwrap();
        assert!(
            close(a.loss, b.loss, 1e-6, 1e-9),
            "{device:?}: {} vs {}",
            a.loss,
            b.loss
        );
        let gmax = ga.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
        for (i, (&x, &y)) in ga.iter().zip(&gb).enumerate() {
            assert!(
                close(x as f64, y as f64, 1e-5, 1e-7 * gmax),
                "{device:?}: grad[{i}] {x} vs {y}"
            );
        }
    }
}
