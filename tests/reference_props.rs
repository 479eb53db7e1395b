//! Properties of the CPU reference on random packed batches (proptest).

mod common;

use common::{batch_strategy, BatchSpec};
use proptest::prelude::*;
use vppo::reference::{self, ForwardF64};
use vppo::{
    Aggregation, Device, Dtype, OwnedBatch, OwnedLogits, Perception, Shaping, TasScope, Vppo,
    VppoConfig,
};

fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        ..ProptestConfig::default()
    }
}

/// A random configuration covering every variant.
fn config_strategy(group_size: usize) -> impl Strategy<Value = VppoConfig> {
    (
        prop_oneof![Just(Perception::FullKl), Just(Perception::K3)],
        prop_oneof![
            Just(Shaping::MeanPreserving),
            Just(Shaping::Linear),
            Just(Shaping::None)
        ],
        prop_oneof![
            Just(None),
            Just(Some(TasScope::Batch)),
            Just(Some(TasScope::Group))
        ],
        prop_oneof![Just(0.1), Just(0.25), Just(0.4), Just(0.7), Just(1.0)],
        prop_oneof![Just(None), Just(Some(3.0)), Just(Some(1.5))],
        prop_oneof![
            Just(Aggregation::TokenMean),
            Just(Aggregation::SeqMeanTokenMean),
            Just(Aggregation::SeqMeanTokenSum)
        ],
        prop_oneof![Just(1.0), Just(0.7), Just(1.3)],
        prop_oneof![Just(None), Just(Some(50.0))],
        prop_oneof![Just(10.0), Just(0.05)],
    )
        .prop_map(
            move |(
                perception,
                shaping,
                tas_scope,
                top_fraction,
                dual_clip,
                aggregation,
                temperature,
                z,
                clamp,
            )| {
                VppoConfig {
                    group_size,
                    perception,
                    shaping,
                    tas_scope,
                    top_fraction,
                    dual_clip,
                    aggregation,
                    temperature,
                    token_normalizer: z,
                    score_clamp: clamp,
                    ..VppoConfig::default()
                }
            },
        )
}

fn f64_forward(b: &OwnedBatch, cfg: &VppoConfig) -> ForwardF64 {
    reference::forward_f64(&b.batch(), cfg).unwrap()
}

fn grad_f32(b: &OwnedBatch, cfg: &VppoConfig) -> Vec<f32> {
    Vppo::new(cfg.clone(), Device::Reference)
        .unwrap()
        .loss_and_grad(&b.batch())
        .unwrap()
        .1
}

fn assert_close(what: &str, got: f64, want: f64, tol: f64) -> Result<(), TestCaseError> {
    if got == want || (got - want).abs() <= tol * (1.0 + want.abs()) {
        Ok(())
    } else {
        Err(TestCaseError::fail(format!(
            "{what}: got {got}, want {want}"
        )))
    }
}

fn logits_f32(l: &OwnedLogits) -> Vec<f32> {
    l.to_f32()
}

/// KL(p || q) by the textbook formula sum p (log p - log q) with log-softmax computed directly.
fn kl_textbook(a: &[f64], b: &[f64]) -> f64 {
    let lse = |x: &[f64]| {
        let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
    };
    let (la, lb) = (lse(a), lse(b));
    let mut kl = 0.0;
    for (x, y) in a.iter().zip(b) {
        if *x == f64::NEG_INFINITY {
            continue;
        }
        if *y == f64::NEG_INFINITY {
            return f64::INFINITY;
        }
        kl += (x - la).exp() * ((x - la) - (y - lb));
    }
    kl
}

proptest! {
    #![proptest_config(cases())]

    /// kl >= 0, equals the textbook sum, and is exactly 0 for a row equal to its masked row.
    #[test]
    fn kl_is_nonnegative_and_zero_for_equal_rows(b in batch_strategy(BatchSpec::default())) {
        let cfg = VppoConfig::default();
        let f = f64_forward(&b, &cfg);
        let (la, lb) = (logits_f32(&b.logits), logits_f32(&b.logits_masked));
        let v = b.vocab;
        for t in 0..b.targets.len() {
            let kl = f.perception.kl[t];
            prop_assert!(kl >= 0.0, "kl[{}] = {}", t, kl);
            let a: Vec<f64> = la[t * v..(t + 1) * v].iter().map(|&x| x as f64).collect();
            let m: Vec<f64> = lb[t * v..(t + 1) * v].iter().map(|&x| x as f64).collect();
            let want = kl_textbook(&a, &m);
            assert_close("kl", kl, want.max(0.0), 1e-12)?;
            if a == m {
                prop_assert_eq!(kl, 0.0);
            }
        }
        // The whole batch with logits_masked = logits: every kl is 0.
        let same = OwnedBatch { logits_masked: b.logits.clone(), ..b.clone() };
        let f = f64_forward(&same, &cfg);
        prop_assert!(f.perception.kl.iter().all(|&k| k == 0.0));
    }

    /// Every output is unchanged when a constant is added to a row of logits or of logits_masked
    /// (lse shifts by the constant; the constants keep the f32 logits exact).
    #[test]
    fn invariant_to_a_constant_per_row(
        b in batch_strategy(BatchSpec { equal_row_prob: 0.0, ..BatchSpec::default() }),
        cfg in config_strategy(2),
        shifts in proptest::collection::vec((-6i32..=6, -6i32..=6), 64),
    ) {
        let f = f64_forward(&b, &cfg);
        let v = b.vocab;
        let (mut la, mut lb) = (logits_f32(&b.logits), logits_f32(&b.logits_masked));
        for t in 0..b.targets.len() {
            let (c, d) = shifts[t % shifts.len()];
            for i in t * v..(t + 1) * v {
                la[i] += c as f32;
                lb[i] += d as f32;
            }
        }
        let shifted = OwnedBatch { logits: OwnedLogits::F32(la), logits_masked: OwnedLogits::F32(lb), ..b.clone() };
        let g = f64_forward(&shifted, &cfg);
        // Skip the rare batch where two scores of a response differ by less than rounding.
        for w in b.cu_seqlens.windows(2) {
            let s = &f.perception.score[w[0] as usize..w[1] as usize];
            for i in 0..s.len() {
                for j in 0..i {
                    let d = (s[i] - s[j]).abs();
                    prop_assume!(d == 0.0 || d > 1e-9);
                }
            }
        }
        let tol = 1e-9;
        let pairs = [
            ("logp", &f.perception.logp, &g.perception.logp),
            ("logp_masked", &f.perception.logp_masked, &g.perception.logp_masked),
            ("kl", &f.perception.kl, &g.perception.kl),
            ("k3", &f.perception.k3, &g.perception.k3),
            ("entropy", &f.perception.entropy, &g.perception.entropy),
            ("score", &f.perception.score, &g.perception.score),
            ("sbar", &f.sbar, &g.sbar),
            ("alpha", &f.alpha, &g.alpha),
            ("dlogp", &f.surrogate.dlogp, &g.surrogate.dlogp),
        ];
        for (name, x, y) in pairs {
            for (i, (p, q)) in x.iter().zip(y.iter()).enumerate() {
                assert_close(&format!("{name}[{i}]"), *q, *p, tol)?;
            }
        }
        prop_assert_eq!(&f.mask, &g.mask);
        prop_assert_eq!(&f.k, &g.k);
        assert_close("loss", g.surrogate.loss, f.surrogate.loss, tol)?;
        let (g0, g1) = (grad_f32(&b, &cfg), grad_f32(&shifted, &cfg));
        for (i, (p, q)) in g0.iter().zip(&g1).enumerate() {
            prop_assert!((p - q).abs() <= 1e-6 * (1.0 + p.abs()), "grad[{}]: {} vs {}", i, p, q);
        }
    }

    /// Exactly k_b = ceil(top_fraction L_b) tokens are masked per response, the highest scores, ties
    /// to the lower index.
    #[test]
    fn topk_count_order_and_ties(
        b in batch_strategy(BatchSpec { ties: true, max_len: 12, ..BatchSpec::default() }),
        frac in prop_oneof![Just((1u64, 10u64)), Just((1, 4)), Just((2, 5)), Just((7, 10)), Just((9, 10)), Just((1, 1))],
        perception in prop_oneof![Just(Perception::FullKl), Just(Perception::K3)],
    ) {
        let (num, den) = frac;
        let cfg = VppoConfig { top_fraction: num as f64 / den as f64, perception, ..VppoConfig::default() };
        let f = f64_forward(&b, &cfg);
        for (r, w) in b.cu_seqlens.windows(2).enumerate() {
            let (start, end) = (w[0] as usize, w[1] as usize);
            let len = (end - start) as u64;
            let want_k = (num * len).div_ceil(den);
            let got: u64 = f.mask[start..end].iter().map(|&m| m as u64).sum();
            prop_assert_eq!(got, want_k, "response {}", r);
            prop_assert_eq!(f.k[r] as u64, want_k);
            let s = &f.perception.score;
            for i in start..end {
                for j in start..end {
                    if f.mask[i] == 1 && f.mask[j] == 0 {
                        // a selected token beats every unselected one: higher score, or equal and lower index
                        prop_assert!(s[i] > s[j] || (s[i] == s[j] && i < j), "tokens {} and {}", i, j);
                    }
                }
            }
        }
    }

    /// Mean-preserving shaping keeps the mean alpha of every scope at 1 (over responses with L_b > 0).
    #[test]
    fn mean_preserving_mean_alpha_is_one(
        b in batch_strategy(BatchSpec { group_size: 3, ..BatchSpec::default() }),
        scope in prop_oneof![Just(TasScope::Batch), Just(TasScope::Group)],
        beta_min in prop_oneof![Just(0.9), Just(0.5), Just(0.0)],
    ) {
        let cfg = VppoConfig { group_size: 3, tas_scope: Some(scope), beta_min, ..VppoConfig::default() };
        let f = f64_forward(&b, &cfg);
        let scope_len = if scope == TasScope::Batch { b.advantages.len() } else { 3 };
        for start in (0..b.advantages.len()).step_by(scope_len.max(1)) {
            let members: Vec<usize> = (start..start + scope_len)
                .filter(|&r| b.cu_seqlens[r + 1] > b.cu_seqlens[r])
                .collect();
            if members.is_empty() {
                continue;
            }
            let mean = members.iter().map(|&r| f.alpha[r]).sum::<f64>() / members.len() as f64;
            assert_close("mean alpha", mean, 1.0, 1e-6)?;
            for &r in &members {
                prop_assert!(f.alpha[r] >= beta_min - 1e-12);
            }
        }
        for (r, w) in b.cu_seqlens.windows(2).enumerate() {
            if w[0] == w[1] {
                prop_assert_eq!(f.alpha[r], 1.0);
            }
        }
    }

    /// sum_v dloss/dlogits[t, v] = g_t (1 - sum_v p_v) / tau = 0 for every row.
    #[test]
    fn gradient_rows_sum_to_zero(b in batch_strategy(BatchSpec::default()), cfg in config_strategy(2)) {
        let g = grad_f32(&b, &cfg);
        let f = f64_forward(&b, &cfg);
        let v = b.vocab;
        for t in 0..b.targets.len() {
            let row = &g[t * v..(t + 1) * v];
            let sum: f64 = row.iter().map(|&x| x as f64).sum();
            let scale: f64 = row.iter().map(|&x| (x as f64).abs()).sum::<f64>() + 1e-30;
            // f32 rounding of each element (relative 6e-8), plus the f64 rounding of 1 - p_y where
            // p_y is close to 1 (absolute 1e-16 |g|, which can exceed the elements themselves).
            let g_t = f.surrogate.dlogp[t].abs() / cfg.temperature;
            let tol = 1e-6 * scale + 1e-14 * g_t;
            prop_assert!(sum.abs() <= tol, "row {}: sum {} (scale {})", t, sum, scale);
            if f.surrogate.dlogp[t] == 0.0 {
                prop_assert!(row.iter().all(|&x| x == 0.0));
            }
        }
    }

    /// dloss/dlogits equals central finite differences of the loss (k3 perception: the mask and alpha
    /// do not move with the logits). Rows within 1e-3 of a kink of the surrogate in log r are skipped.
    #[test]
    fn gradient_matches_finite_differences(
        b in batch_strategy(BatchSpec { groups: (1, 2), max_len: 5, vocab: (1, 6), ..BatchSpec::default() }),
        cfg in config_strategy(2),
    ) {
        let cfg = VppoConfig { perception: Perception::K3, ..cfg };
        let f = f64_forward(&b, &cfg);
        let grad = grad_f32(&b, &cfg);
        let v = b.vocab;
        let base = logits_f32(&b.logits);
        let h = 1.0f32 / 4096.0; // exact on the 1/256 grid of the logits
        let mut kinks = vec![(1.0 - cfg.eps_low).ln(), (1.0 + cfg.eps_high).ln(), 20.0, -20.0];
        if let Some(c) = cfg.dual_clip {
            kinks.push(c.ln());
        }
        for t in 0..b.targets.len() {
            let delta = f.perception.logp[t] - b.old_logp[t] as f64;
            if kinks.iter().any(|k| (delta - k).abs() < 1e-3) {
                continue;
            }
            for i in t * v..(t + 1) * v {
                if base[i] == f32::NEG_INFINITY {
                    prop_assert_eq!(grad[i], 0.0);
                    continue;
                }
                let loss_at = |x: f32| {
                    let mut l = base.clone();
                    l[i] = x;
                    let pb = OwnedBatch { logits: OwnedLogits::F32(l), ..b.clone() };
                    f64_forward(&pb, &cfg).surrogate.loss
                };
                let fd = (loss_at(base[i] + h) - loss_at(base[i] - h)) / (2.0 * h as f64);
                let g = grad[i] as f64;
                prop_assert!((fd - g).abs() <= 1e-5 + 1e-4 * g.abs(), "logit {}: fd {} vs grad {}", i, fd, g);
            }
        }
    }

    /// With one response, token-mean and seq-mean-token-mean agree, and seq-mean-token-sum is L times them.
    #[test]
    fn aggregations_agree_on_one_response(
        b in batch_strategy(BatchSpec { groups: (1, 1), group_size: 1, max_len: 12, ..BatchSpec::default() }),
        cfg in config_strategy(1),
    ) {
        let cfg = VppoConfig { token_normalizer: None, ..cfg };
        let run = |aggregation| f64_forward(&b, &VppoConfig { aggregation, ..cfg.clone() }).surrogate;
        let tm = run(Aggregation::TokenMean);
        let stm = run(Aggregation::SeqMeanTokenMean);
        let sts = run(Aggregation::SeqMeanTokenSum);
        let len = b.targets.len() as f64;
        assert_close("loss", stm.loss, tm.loss, 1e-12)?;
        assert_close("pg", stm.pg_loss, tm.pg_loss, 1e-12)?;
        assert_close("pg sum", sts.pg_loss, len * tm.pg_loss, 1e-12)?;
        for t in 0..b.targets.len() {
            assert_close("dlogp", stm.dlogp[t], tm.dlogp[t], 1e-12)?;
        }
    }

    /// bf16 and f16 logits give exactly the result of their f32 upcast (the reference widens exactly).
    #[test]
    fn half_precision_equals_its_f32_upcast(
        b16 in batch_strategy(BatchSpec { dtype: Dtype::Bf16, ..BatchSpec::default() }),
        h16 in batch_strategy(BatchSpec { dtype: Dtype::F16, ..BatchSpec::default() }),
        cfg in config_strategy(2),
    ) {
        for b in [b16, h16] {
            let vppo = Vppo::new(cfg.clone(), Device::Reference).unwrap();
            let (out, grad) = vppo.loss_and_grad(&b.batch()).unwrap();
            let up = b.to_f32();
            prop_assert_eq!(up.batch().logits.dtype(), Dtype::F32);
            let (out32, grad32) = vppo.loss_and_grad(&up.batch()).unwrap();
            prop_assert_eq!(out, out32);
            prop_assert_eq!(grad, grad32);
        }
    }

    /// Group-scope configurations need B % G == 0; the generator keeps that, and the loss is finite.
    #[test]
    fn loss_is_finite(b in batch_strategy(BatchSpec::default()), cfg in config_strategy(2)) {
        let vppo = Vppo::new(cfg, Device::Reference).unwrap();
        let (out, grad) = vppo.loss_and_grad(&b.batch()).unwrap();
        prop_assert!(out.loss.is_finite());
        prop_assert!(grad.iter().all(|g| g.is_finite()));
        prop_assert!(out.tokens.score.iter().all(|s| s.is_finite() && *s >= 0.0));
    }
}
