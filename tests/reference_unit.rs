//! Small cases whose expected numbers are derived by hand (the derivation is in the comments); none is
//! copied from the code's own output.

use vppo::reference::{backward, perception, select, shaping, surrogate};
use vppo::{
    grpo_advantages, Aggregation, Batch, Device, GradMut, Logits, Perception, Shaping, TasScope,
    TopFraction, Vppo, VppoConfig,
};

fn close(got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol * (1.0 + want.abs()),
        "got {got}, want {want}"
    );
}

const E: f64 = std::f64::consts::E;
const LN2: f64 = std::f64::consts::LN_2;

fn batch<'a>(
    logits: &'a [f32],
    masked: &'a [f32],
    targets: &'a [i32],
    old_logp: &'a [f32],
    advantages: &'a [f32],
    cu: &'a [i32],
    vocab: usize,
) -> Batch<'a> {
    Batch {
        logits: Logits::F32(logits),
        logits_masked: Logits::F32(masked),
        targets,
        old_logp,
        advantages,
        cu_seqlens: cu,
        vocab,
        ..Default::default()
    }
}

#[test]
fn perception_two_way_softmax() {
    // V = 3.
    // Row 0: a = [0, 0, -inf], b = [0, 1, -inf], y = 1, old_logp = -1 (the -inf entry has p = q = 0
    //   and takes no part).
    //   p = [1/2, 1/2, 0]; lse_a = ln 2; logp = -ln 2; entropy = ln 2.
    //   q = [1/(1+e), e/(1+e), 0]; lse_b = ln(1+e); logp_masked = 1 - ln(1+e).
    //   kl = 1/2 ln((1/2)(1+e)) + 1/2 ln((1/2)(1+e)/e) = ln((1+e)/2) - 1/2 ≈ 0.1201145.
    //   d = logp_masked - old_logp = 2 - ln(1+e) ≈ 0.6867383;
    //   k3 = e^d - d - 1 = e^2/(1+e) + ln(1+e) - 3 ≈ 0.3004848.
    // Row 1: a = [2, -inf, 2], b = [-inf, 0, 0], y = 0, old_logp = 0.
    //   p = [1/2, 0, 1/2]; lse_a = 2 + ln 2; logp = -ln 2; entropy = ln 2.
    //   p_0 > 0 where b_0 = -inf: kl = +inf, score (full-kl) = score_clamp = 10.
    //   lse_b = ln 2; logp_masked = -inf; d = clamp(-inf, -20, 20) = -20; k3 = e^-20 + 19.
    let ninf = f32::NEG_INFINITY;
    let logits = [0.0f32, 0.0, ninf, 2.0, ninf, 2.0];
    let masked = [0.0f32, 1.0, ninf, ninf, 0.0, 0.0];
    let b = batch(&logits, &masked, &[1, 0], &[-1.0, 0.0], &[1.0], &[0, 2], 3);
    let p = perception::perception(&b, &VppoConfig::default()).unwrap();
    close(p.lse[0], LN2, 1e-15);
    close(p.logp[0], -LN2, 1e-15);
    close(p.entropy[0], LN2, 1e-15);
    close(p.lse_masked[0], (1.0 + E).ln(), 1e-15);
    close(p.logp_masked[0], 1.0 - (1.0 + E).ln(), 1e-15);
    close(p.kl[0], ((1.0 + E) / 2.0).ln() - 0.5, 1e-14);
    close(p.kl[0], 0.1201145, 1e-6);
    close(p.k3[0], E * E / (1.0 + E) + (1.0 + E).ln() - 3.0, 1e-14);
    close(p.k3[0], 0.3004848, 1e-6);
    close(p.score[0], p.kl[0], 0.0);

    close(p.lse[1], 2.0 + LN2, 1e-15);
    close(p.logp[1], -LN2, 1e-15);
    close(p.entropy[1], LN2, 1e-15);
    assert_eq!(p.kl[1], f64::INFINITY);
    assert_eq!(p.score[1], 10.0);
    assert_eq!(p.logp_masked[1], f64::NEG_INFINITY);
    close(p.k3[1], (-20f64).exp() + 19.0, 1e-15);

    // k3 perception: the score is clamp(k3, 0, 10): row 1 gives min(19 + e^-20, 10) = 10.
    let cfg = VppoConfig {
        perception: Perception::K3,
        ..VppoConfig::default()
    };
    let p = perception::perception(&b, &cfg).unwrap();
    close(p.score[0], 0.3004848, 1e-6);
    assert_eq!(p.score[1], 10.0);
}

#[test]
fn perception_temperature_divides_logits() {
    // a = [0, 2] / 2 = [0, 1], y = 1: lse = ln(1 + e), logp = 1 - ln(1 + e) ≈ -0.3132617.
    // b = a, so kl = 0 exactly.
    let b = batch(&[0.0, 2.0], &[0.0, 2.0], &[1], &[0.0], &[1.0], &[0, 1], 2);
    let cfg = VppoConfig {
        temperature: 2.0,
        ..VppoConfig::default()
    };
    let p = perception::perception(&b, &cfg).unwrap();
    close(p.logp[0], 1.0 - (1.0 + E).ln(), 1e-15);
    close(p.logp[0], -0.3132617, 1e-6);
    assert_eq!(p.kl[0], 0.0);
}

#[test]
fn topk_by_hand() {
    // L = 10, top 0.4: k = 4 (not 5). Scores: the three 2.0 at 1, 2, 5 then 1.0 at 3.
    let s = [0.5, 2.0, 2.0, 1.0, 0.0, 2.0, 0.3, 0.1, 0.9, 0.4];
    let f = TopFraction::new(0.4).unwrap();
    let (mask, k) = select::topk_mask(&s, &[0, 10], f).unwrap();
    assert_eq!(k, vec![4]);
    assert_eq!(mask, vec![0, 1, 1, 1, 0, 1, 0, 0, 0, 0]);
    // All equal, L = 5: k = ceil(2.0) = 2, ties to the lower index: tokens 0 and 1.
    // Then an empty response (k = 0) and a one-token response (k = ceil(0.4) = 1).
    let s = [1.0; 6];
    let (mask, k) = select::topk_mask(&s, &[0, 5, 5, 6], f).unwrap();
    assert_eq!(k, vec![2, 0, 1]);
    assert_eq!(mask, vec![1, 1, 0, 0, 0, 1]);
    // Ties at the cut: [3, 1, 2, 2, 2], L = 5, k = 2: 3 at 0, then the first 2 (index 2).
    let (mask, _) = select::topk_mask(&[3.0, 1.0, 2.0, 2.0, 2.0], &[0, 5], f).unwrap();
    assert_eq!(mask, vec![1, 0, 1, 0, 0]);
    // top 1: everything.
    let (mask, k) =
        select::topk_mask(&[0.0, 5.0, 1.0], &[0, 3], TopFraction::new(1.0).unwrap()).unwrap();
    assert_eq!((mask, k), (vec![1, 1, 1], vec![3]));
    // 0.7 x 10 = 7 exactly (the f64 product is 7.000000000000001).
    let (_, k) = select::topk_mask(&[0.0; 10], &[0, 10], TopFraction::new(0.7).unwrap()).unwrap();
    assert_eq!(k, vec![7]);
}

#[test]
fn shaping_by_hand() {
    // Scores [1 | 2, 2 | (empty) | 4, 4, 4]: Sbar = [1, 2, 0, 4]; response 2 is empty.
    let score = [1.0, 2.0, 2.0, 4.0, 4.0, 4.0];
    let cu = [0, 1, 3, 3, 6];
    let sbar = shaping::sbar(&score, &cu).unwrap();
    assert_eq!(sbar, vec![1.0, 2.0, 0.0, 4.0]);

    // Mean-preserving, batch scope, over P = {0, 1, 3}: lo = 1, hi = 4, n = [0, 1/3, 1],
    // mean n = 4/9; beta_max = 0.9 + 0.1 / (4/9 + 1e-8) ≈ 1.125;
    // alpha = [0.9, 0.9 + (1/3)(0.225), 1, 1.125] = [0.9, 0.975, 1, 1.125]; the mean over P is 1.
    let cfg = VppoConfig::default();
    let a = shaping::alpha(&sbar, &cu, &cfg).unwrap();
    let beta_max = 0.9 + 0.1 / (4.0 / 9.0 + 1e-8);
    close(a[0], 0.9, 1e-15);
    close(a[1], 0.9 + (beta_max - 0.9) / 3.0, 1e-15);
    close(a[1], 0.975, 1e-7);
    assert_eq!(a[2], 1.0);
    close(a[3], beta_max, 1e-15);
    close(a[3], 1.125, 1e-7);
    close((a[0] + a[1] + a[3]) / 3.0, 1.0, 1e-7);

    // Linear, batch scope: alpha = 0.9 + n (0.2) = [0.9, 0.9667, 1, 1.1].
    let cfg = VppoConfig {
        shaping: Shaping::Linear,
        tas_scope: Some(TasScope::Batch),
        ..VppoConfig::default()
    };
    let a = shaping::alpha(&sbar, &cu, &cfg).unwrap();
    close(a[0], 0.9, 1e-15);
    close(a[1], 0.9 + 0.2 / 3.0, 1e-15);
    assert_eq!(a[2], 1.0);
    close(a[3], 1.1, 1e-15);

    // Linear, group scope G = 2: group {0, 1}: lo = 1, hi = 2: alpha = [0.9, 1.1];
    // group {2, 3}: only response 3 takes part, hi - lo = 0 <= 1e-6: alpha = [1, 1].
    let cfg = VppoConfig::paper(2);
    let a = shaping::alpha(&sbar, &cu, &cfg).unwrap();
    close(a[0], 0.9, 1e-15);
    close(a[1], 1.1, 1e-15);
    assert_eq!(&a[2..], &[1.0, 1.0]);

    // A caller's range (0, 8): n = [1/8, 2/8, -, 4/8], mean 7/24; mean-preserving
    // beta_max = 0.9 + 0.1 / (7/24 + 1e-8); alpha_0 = 0.9 + (1/8)(beta_max - 0.9) ≈ 0.9428571.
    let cfg = VppoConfig {
        tas_range: Some((0.0, 8.0)),
        ..VppoConfig::default()
    };
    let a = shaping::alpha(&sbar, &cu, &cfg).unwrap();
    close(a[0], 0.9 + 0.125 * 0.1 / (7.0 / 24.0 + 1e-8), 1e-15);
    close(a[0], 0.9428571, 1e-6);

    // Shaping none: all 1.
    let a = shaping::alpha(&sbar, &cu, &VppoConfig::dapo()).unwrap();
    assert_eq!(a, vec![1.0; 4]);
}

#[test]
fn surrogate_positive_advantage() {
    // One response, A = 1, alpha = 1, old_logp = 0, logp = ln r for r = [0.5, 1, 1.2, 2], all masked.
    //   r_clip = [0.8, 1, 1.2, 1.28]; -r = [-0.5, -1, -1.2, -2]; -r_clip = [-0.8, -1, -1.2, -1.28]
    //   l = max = [-0.5 (unclipped), -1, -1.2, -1.28 (clipped)]
    //   Z = N = 4: pg = -3.98 / 4 = -0.995
    //   penalty = 0.06 (-(ln 0.5 + 0 + ln 1.2 + ln 2)) / 4 = -0.015 ln 1.2 ≈ -0.00273480
    //   dlogp = -A r / 4 (unclipped tokens) - 0.06 / 4: [-0.14, -0.265, -0.315, -0.015]
    //   clip fraction 1/4 (token 3), mean ratio 4.7 / 4 = 1.175, selected fraction 1.
    let logp: Vec<f64> = [0.5f64, 1.0, 1.2, 2.0].iter().map(|r| r.ln()).collect();
    let cfg = VppoConfig::default();
    let s = surrogate::surrogate(&logp, &[0.0; 4], &[1; 4], &[1.0], &[1.0], &[0, 4], &cfg).unwrap();
    close(s.pg_loss, -0.995, 1e-14);
    close(s.loss, -0.995 - 0.015 * 1.2f64.ln(), 1e-14);
    close(s.loss, -0.995 - 0.0027348, 1e-6);
    let want = [-0.14, -0.265, -0.315, -0.015];
    for (g, w) in s.dlogp.iter().zip(want) {
        close(*g, w, 1e-14);
    }
    close(s.stats.clip_fraction, 0.25, 0.0);
    close(s.stats.mean_ratio, 1.175, 1e-14);
    close(s.stats.selected_fraction, 1.0, 0.0);
    assert_eq!(s.token_normalizer, 4.0);

    // Mask only tokens 0 and 3: pg = (-0.5 - 1.28) / 4 = -0.445; clip fraction 1/2;
    // tokens 1, 2 keep only the penalty gradient -0.015.
    let s = surrogate::surrogate(
        &logp,
        &[0.0; 4],
        &[1, 0, 0, 1],
        &[1.0],
        &[1.0],
        &[0, 4],
        &cfg,
    )
    .unwrap();
    close(s.pg_loss, -0.445, 1e-14);
    close(s.stats.clip_fraction, 0.5, 0.0);
    close(s.stats.selected_fraction, 0.5, 0.0);
    close(s.dlogp[1], -0.015, 1e-14);
}

#[test]
fn surrogate_negative_advantage_and_dual_clip() {
    // A = -1, r = [0.5, 1.5, 4]: -A r = r = [0.5, 1.5, 4], -A r_clip = [0.8, 1.28, 1.28].
    //   max = [0.8 (clipped), 1.5 (unclipped), 4 (unclipped)]; dual clip cap -A * 3 = 3:
    //   token 2 -> 3 (dual active). pg = (0.8 + 1.5 + 3) / 3 = 5.3 / 3.
    //   dlogp (no penalty): [0, 1.5 / 3, 0]; clipped: tokens 0 and 2: 2/3.
    let logp: Vec<f64> = [0.5f64, 1.5, 4.0].iter().map(|r| r.ln()).collect();
    let cfg = VppoConfig {
        logp_penalty: 0.0,
        ..VppoConfig::default()
    };
    let s =
        surrogate::surrogate(&logp, &[0.0; 3], &[1; 3], &[1.0], &[-1.0], &[0, 3], &cfg).unwrap();
    close(s.pg_loss, 5.3 / 3.0, 1e-14);
    close(s.dlogp[0], 0.0, 0.0);
    close(s.dlogp[1], 0.5, 1e-14);
    close(s.dlogp[2], 0.0, 0.0);
    close(s.stats.clip_fraction, 2.0 / 3.0, 1e-15);
    // Dual clip off: token 2 keeps l = 4 and gradient 4 / 3; pg = 6.3 / 3; clip fraction 1/3.
    let cfg = VppoConfig {
        dual_clip: None,
        ..cfg
    };
    let s =
        surrogate::surrogate(&logp, &[0.0; 3], &[1; 3], &[1.0], &[-1.0], &[0, 3], &cfg).unwrap();
    close(s.pg_loss, 6.3 / 3.0, 1e-14);
    close(s.dlogp[2], 4.0 / 3.0, 1e-14);
    close(s.stats.clip_fraction, 1.0 / 3.0, 1e-15);
    // alpha scales A: alpha = 0.5, A = -1 -> A' = -0.5: token 1: l = 0.5 * 1.5 = 0.75, grad 0.75 / 3.
    let s =
        surrogate::surrogate(&logp, &[0.0; 3], &[1; 3], &[0.5], &[-1.0], &[0, 3], &cfg).unwrap();
    close(s.dlogp[1], 0.25, 1e-14);
}

#[test]
fn surrogate_log_ratio_clamp_passes_no_gradient() {
    // logp - old_logp = 25 > 20: r = e^20, dr/dlogp = 0. A = -1, no dual clip:
    // l = max(e^20, 1.28) = e^20 (unclipped branch), but the gradient through the clamp is 0.
    let cfg = VppoConfig {
        logp_penalty: 0.0,
        dual_clip: None,
        ..VppoConfig::default()
    };
    let s = surrogate::surrogate(&[25.0], &[0.0], &[1], &[1.0], &[-1.0], &[0, 1], &cfg).unwrap();
    close(s.pg_loss, 20f64.exp(), 1e-14);
    assert_eq!(s.dlogp[0], 0.0);
    // At exactly 20 the clamp is not active: gradient -A r = e^20.
    let s = surrogate::surrogate(&[20.0], &[0.0], &[1], &[1.0], &[-1.0], &[0, 1], &cfg).unwrap();
    close(s.dlogp[0], 20f64.exp(), 1e-14);
}

#[test]
fn surrogate_aggregations_by_hand() {
    // Two responses of lengths 1 and 3 (plus an empty one), A = 1, old_logp = 0, all r = 1 (logp = 0),
    // no penalty: l = -1 for each token. Masks [1 | 1, 0, 1].
    //   token-mean: pg = (-1 - 1 - 1) / 4 = -0.75
    //   seq-mean-token-mean: B' = 2: ((-1)/1 + (-2)/3) / 2 = -5/6
    //   seq-mean-token-sum:  ((-1) + (-2)) / 2 = -1.5
    // dlogp of a masked token of response 1 in seq-mean-token-mean: -1 / (2 * 3) = -1/6.
    let cu = [0, 1, 1, 4];
    let mask = [1, 1, 0, 1];
    let run = |agg| {
        let cfg = VppoConfig {
            aggregation: agg,
            logp_penalty: 0.0,
            ..VppoConfig::default()
        };
        surrogate::surrogate(&[0.0; 4], &[0.0; 4], &mask, &[1.0; 3], &[1.0; 3], &cu, &cfg).unwrap()
    };
    close(run(Aggregation::TokenMean).pg_loss, -0.75, 1e-15);
    let s = run(Aggregation::SeqMeanTokenMean);
    close(s.pg_loss, -5.0 / 6.0, 1e-15);
    close(s.dlogp[1], -1.0 / 6.0, 1e-15);
    close(run(Aggregation::SeqMeanTokenSum).pg_loss, -1.5, 1e-15);
    // A caller's Z = 10 in token-mean: pg = -3 / 10; penalty term with logp_penalty 0.06 and
    // logp = 0 is 0, and its gradient -0.06 / 10 = -0.006 reaches every token.
    let cfg = VppoConfig {
        token_normalizer: Some(10.0),
        ..VppoConfig::default()
    };
    let s =
        surrogate::surrogate(&[0.0; 4], &[0.0; 4], &mask, &[1.0; 3], &[1.0; 3], &cu, &cfg).unwrap();
    close(s.pg_loss, -0.3, 1e-15);
    close(s.dlogp[2], -0.006, 1e-15);
    close(s.dlogp[0], -0.1 - 0.006, 1e-15);
}

#[test]
fn backward_by_hand() {
    // V = 2, logits [0, 2], tau = 2: a = [0, 1], p = [1/(1+e), e/(1+e)], y = 0, g = 3:
    //   grad = g (1[v=0] - p) / tau = [3 (e/(1+e)) / 2, -3 (e/(1+e)) / 2] ≈ [1.0965878, -1.0965878].
    // Row 1 has g = 0: zeros.
    let lse = [(1.0 + E).ln(), 0.0];
    let mut grad = [9.0f32; 4];
    backward::grad_logits(
        Logits::F32(&[0.0, 2.0, 5.0, 5.0]),
        2,
        &[0, 1],
        &lse,
        &[3.0, 0.0],
        2.0,
        None,
        GradMut::F32(&mut grad),
    )
    .unwrap();
    let want = 1.5 * E / (1.0 + E);
    close(grad[0] as f64, want, 1e-7);
    close(grad[0] as f64, 1.0965878, 1e-6);
    close(grad[1] as f64, -want, 1e-7);
    assert_eq!(&grad[2..], &[0.0, 0.0]);
}

#[test]
fn end_to_end_one_token() {
    // One token, V = 2, logits [0, 0], y = 0, old_logp = -0.5, A = 2, top 1, no shaping:
    //   logp = -ln 2; r = exp(0.5 - ln 2) = e^0.5 / 2 ≈ 0.8243606 (inside [0.8, 1.28]);
    //   l = -2 r; Z = 1: loss = -2 r + 0.06 ln 2 ≈ -1.6487213 + 0.0415888 = -1.6071325.
    //   dlogp = -2 r - 0.06 ≈ -1.7087213; dlogits = dlogp (1[v=0] - 1/2) = [-0.8543606, 0.8543606].
    let b = batch(&[0.0, 0.0], &[0.0, 0.0], &[0], &[-0.5], &[2.0], &[0, 1], 2);
    let vppo = Vppo::new(VppoConfig::dapo(), Device::Reference).unwrap();
    let (out, grad) = vppo.loss_and_grad(&b).unwrap();
    let r = 0.5f64.exp() / 2.0;
    close(out.loss, -2.0 * r + 0.06 * LN2, 1e-15);
    close(out.loss, -1.6071325, 1e-7);
    close(out.pg_loss, -2.0 * r, 1e-15);
    close(out.tokens.dlogp[0] as f64, -1.7087213, 1e-6);
    close(grad[0] as f64, -0.8543606, 1e-6);
    close(grad[1] as f64, 0.8543606, 1e-6);
    assert_eq!(out.tokens.mask, vec![1]);
    assert_eq!(out.responses.alpha, vec![1.0]);
    assert_eq!(out.stats.clip_fraction, 0.0);
}

#[test]
fn empty_batch_is_not_an_error() {
    // N = 0 with two empty responses: loss 0, no tokens, k = 0, alpha = 1, no gradient.
    let b = batch(&[], &[], &[], &[], &[1.0, -1.0], &[0, 0, 0], 5);
    let vppo = Vppo::new(VppoConfig::default(), Device::Reference).unwrap();
    let (out, grad) = vppo.loss_and_grad(&b).unwrap();
    assert_eq!(out.loss, 0.0);
    assert!(out.tokens.logp.is_empty() && grad.is_empty());
    assert_eq!(out.responses.k, vec![0, 0]);
    assert_eq!(out.responses.alpha, vec![1.0, 1.0]);
    // The same on the kernel executor.
    let vppo = Vppo::new(
        VppoConfig::default(),
        Device::Simt(vppo::LaneOrder::Forward),
    )
    .unwrap();
    assert_eq!(vppo.forward(&b).unwrap().loss, 0.0);
}

#[test]
fn grpo_by_hand() {
    // Rewards [1, 0 | 1, 1], G = 2.
    //   Group 0: mean 1/2, unbiased std sqrt((1/4 + 1/4) / 1) = sqrt(1/2):
    //   adv = ±(1/2) / (sqrt(1/2) + 1e-6) ≈ ±0.7071058.
    //   Group 1: mean 1, std 0: adv = 0 / 1e-6 = 0.
    let a = grpo_advantages(&[1.0, 0.0, 1.0, 1.0], 2).unwrap();
    let want = 0.5 / (0.5f64.sqrt() + 1e-6);
    close(a[0] as f64, want, 1e-7);
    close(a[0] as f64, 0.7071058, 1e-6);
    close(a[1] as f64, -want, 1e-7);
    assert_eq!(&a[2..], &[0.0, 0.0]);
    // G = 1 (EasyR1): mean 0, std 1: adv = r / (1 + 1e-6).
    let a = grpo_advantages(&[3.0, -2.0], 1).unwrap();
    close(a[0] as f64, 3.0 / (1.0 + 1e-6), 1e-7);
    close(a[1] as f64, -2.0 / (1.0 + 1e-6), 1e-7);
    // G = 3, rewards [0, 1, 2]: mean 1, std sqrt((1 + 0 + 1) / 2) = 1: adv = [-1, 0, 1] / (1 + 1e-6).
    let a = grpo_advantages(&[0.0, 1.0, 2.0], 3).unwrap();
    close(a[2] as f64, 1.0 / (1.0 + 1e-6), 1e-7);
    assert_eq!(a[1], 0.0);
}

#[test]
fn perception_centres_huge_logits_on_the_row_max() {
    // Every logit c: p is uniform, logp = -ln V exactly, whatever c. Uncentred, c + ln V rounds to c in
    // f64 from c = 1e17 (its ulp is 16) and a_y - lse gave 0. The backward keeps p = 1/V as well.
    let v = 5usize;
    for c in [1e17f32, 1e30, 3e38] {
        let row = vec![c; v];
        let b = batch(&row, &row, &[2], &[-1.6], &[1.0], &[0, 1], v);
        let cfg = VppoConfig::dapo();
        let p = perception::perception(&b, &cfg).unwrap();
        close(p.logp[0], -(v as f64).ln(), 1e-15);
        close(p.logp_masked[0], -(v as f64).ln(), 1e-15);
        close(p.entropy[0], (v as f64).ln(), 1e-15);
        assert_eq!(p.kl[0], 0.0);
        let vppo = Vppo::new(cfg, Device::Reference).unwrap();
        let (out, grad) = vppo.loss_and_grad(&b).unwrap();
        let g = out.tokens.dlogp[0] as f64;
        for (i, &x) in grad.iter().enumerate() {
            let onehot = if i == 2 { 1.0 } else { 0.0 };
            close(x as f64, g * (onehot - 1.0 / v as f64), 1e-6);
        }
    }
}
