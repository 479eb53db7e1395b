//! The policy: a small autoregressive MLP over (question, image, previous token, position).
//!
//! For the token at position `t` of a response the input is
//!
//! ```text
//! z = [ E[q_0] ; E[q_1] ; E[q_2] ; E[y_{t-1}] ; P[t] ; tanh(W_img x + b_img) ; g ]
//! h1 = relu(W1 z + b1)        h2 = relu(W2 h1 + b2)        logits = Wo h2 + bo
//! ```
//!
//! with `E` the token embedding (shared by question and response tokens), `P` the position embedding
//! and `x` the image features (one-hot colour per cell; a blackened cell is all zeros). `g`, the glimpse,
//! is the features of the cells the question names (a fixed hard attention from the question to the image,
//! computed by the task; without it a model this small needed thousands of steps to find a cell). The model has
//! no recurrence: every token's logits depend only on its own context, so the forward and backward of a
//! batch are independent per token and run in a fixed order (deterministic, no threads).
//!
//! The image encoder uses tanh, not ReLU: the supervised warm-up teaches the base model to ignore the
//! image (its answers are random), and with ReLU it did so by killing every image unit, after which no
//! gradient could reach the image again and RL never learned to look (measured: score of answer tokens
//! stayed at 1e-4 for 100 steps).
//!
//! Every backward is written by hand and checked against central finite differences in the tests
//! below: each layer on its own (`linear`, `relu`, embedding scatter) and the whole model.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Sizes of the policy.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// V: the vocabulary size (set from the task).
    pub vocab: usize,
    /// Number of question tokens (the task's prompt length).
    pub prompt_len: usize,
    /// Number of image features (cells x colours).
    pub image_dim: usize,
    /// Number of glimpse features (the named cells' features).
    pub glimpse_dim: usize,
    /// Longest response, in tokens (the number of position embeddings).
    pub max_len: usize,
    /// Width of a token embedding.
    pub d_tok: usize,
    /// Width of a position embedding.
    pub d_pos: usize,
    /// Width of the image encoding.
    pub d_img: usize,
    /// Width of both hidden layers.
    pub hidden: usize,
}

impl ModelConfig {
    /// Width of the concatenated input z of the first hidden layer.
    pub fn d_in(&self) -> usize {
        (self.prompt_len + 1) * self.d_tok + self.d_pos + self.d_img + self.glimpse_dim
    }
}

/// Offsets of each parameter tensor inside the one flat parameter vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Token embedding [V, d_tok].
    pub tok: usize,
    /// Position embedding [max_len, d_pos].
    pub pos: usize,
    /// Image encoder weight [d_img, image_dim].
    pub img_w: usize,
    /// Image encoder bias [d_img].
    pub img_b: usize,
    /// First hidden layer weight [hidden, d_in].
    pub w1: usize,
    /// First hidden layer bias [hidden].
    pub b1: usize,
    /// Second hidden layer weight [hidden, hidden].
    pub w2: usize,
    /// Second hidden layer bias [hidden].
    pub b2: usize,
    /// Vocabulary head weight [V, hidden].
    pub wo: usize,
    /// Vocabulary head bias [V].
    pub bo: usize,
    /// Total number of parameters.
    pub total: usize,
}

impl Layout {
    /// The layout of a model of config `c`.
    pub fn new(c: &ModelConfig) -> Layout {
        let mut at = 0;
        let mut take = |n: usize| {
            let o = at;
            at += n;
            o
        };
        let tok = take(c.vocab * c.d_tok);
        let pos = take(c.max_len * c.d_pos);
        let img_w = take(c.d_img * c.image_dim);
        let img_b = take(c.d_img);
        let w1 = take(c.hidden * c.d_in());
        let b1 = take(c.hidden);
        let w2 = take(c.hidden * c.hidden);
        let b2 = take(c.hidden);
        let wo = take(c.vocab * c.hidden);
        let bo = take(c.vocab);
        Layout {
            tok,
            pos,
            img_w,
            img_b,
            w1,
            b1,
            w2,
            b2,
            wo,
            bo,
            total: at,
        }
    }
}

/// What one token's logits are computed from.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The question tokens, `prompt_len` of them.
    pub prompt: &'a [u32],
    /// The previous response token (the task's BOS at position 0).
    pub prev: u32,
    /// Position of the token in the response, < max_len.
    pub pos: usize,
    /// Image features, `image_dim` of them (real or masked).
    pub image: &'a [f32],
    /// Glimpse features of the same image, `glimpse_dim` of them.
    pub glimpse: &'a [f32],
}

/// The activations of one token's forward, kept for its backward.
#[derive(Debug, Clone, Default)]
pub struct Cache {
    /// Question tokens and previous token, in input order.
    pub tokens: Vec<u32>,
    /// Position.
    pub pos: usize,
    /// Image features.
    pub image: Vec<f32>,
    /// tanh(W_img x + b_img), the image encoding.
    pub img: Vec<f32>,
    /// The concatenated input z.
    pub z: Vec<f32>,
    /// W1 z + b1.
    pub h1_pre: Vec<f32>,
    /// relu(h1_pre).
    pub h1: Vec<f32>,
    /// W2 h1 + b2.
    pub h2_pre: Vec<f32>,
    /// relu(h2_pre).
    pub h2: Vec<f32>,
}

/// The policy: its sizes and one flat vector of parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// Sizes.
    pub config: ModelConfig,
    /// Where each tensor lives in `params`.
    pub layout: Layout,
    /// All parameters, flat.
    pub params: Vec<f32>,
}

/// y = W x + b with W [out, in] row-major. Accumulates in f32 in a fixed order.
pub fn linear(w: &[f32], b: &[f32], x: &[f32], y: &mut [f32]) {
    let n_in = x.len();
    debug_assert_eq!(w.len(), y.len() * n_in);
    for (o, yo) in y.iter_mut().enumerate() {
        let row = &w[o * n_in..(o + 1) * n_in];
        let mut s = b[o];
        for (wi, xi) in row.iter().zip(x) {
            s += wi * xi;
        }
        *yo = s;
    }
}

/// Backward of `linear`: dW += dy x^T, db += dy, and (when given) dx = W^T dy.
pub fn linear_backward(
    w: &[f32],
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
    dx: Option<&mut [f32]>,
) {
    let n_in = x.len();
    for (o, &g) in dy.iter().enumerate() {
        if g == 0.0 {
            continue;
        }
        db[o] += g;
        for (dwi, xi) in dw[o * n_in..(o + 1) * n_in].iter_mut().zip(x) {
            *dwi += g * xi;
        }
    }
    if let Some(dx) = dx {
        dx.iter_mut().for_each(|v| *v = 0.0);
        for (o, &g) in dy.iter().enumerate() {
            if g == 0.0 {
                continue;
            }
            for (dxi, wi) in dx.iter_mut().zip(&w[o * n_in..(o + 1) * n_in]) {
                *dxi += g * wi;
            }
        }
    }
}

/// y = max(x, 0).
pub fn relu(x: &[f32], y: &mut [f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = if xi > 0.0 { xi } else { 0.0 };
    }
}

/// y = tanh(x).
pub fn tanh(x: &[f32], y: &mut [f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = xi.tanh();
    }
}

/// Backward of `tanh` in place, from its output y: dy becomes dx = dy * (1 - y^2).
pub fn tanh_backward(y: &[f32], dy: &mut [f32]) {
    for (g, &t) in dy.iter_mut().zip(y) {
        *g *= 1.0 - t * t;
    }
}

/// Backward of `relu` in place: dy becomes dx = dy * 1[x > 0].
pub fn relu_backward(x_pre: &[f32], dy: &mut [f32]) {
    for (g, &x) in dy.iter_mut().zip(x_pre) {
        if x <= 0.0 {
            *g = 0.0;
        }
    }
}

impl Model {
    /// A freshly initialised model: embeddings N(0, 0.5^2)-like uniform, weights uniform in
    /// +-sqrt(3/fan_in) (unit variance through each layer), biases zero, the head scaled by 0.1 so the
    /// first distributions are close to uniform.
    pub fn new(config: ModelConfig, rng: &mut ChaCha8Rng) -> Model {
        let layout = Layout::new(&config);
        let mut params = vec![0.0f32; layout.total];
        let mut fill = |range: std::ops::Range<usize>, scale: f32| {
            for p in &mut params[range] {
                *p = scale * (rng.gen::<f32>() * 2.0 - 1.0);
            }
        };
        let l = layout;
        let c = &config;
        fill(l.tok..l.pos, 0.8);
        fill(l.pos..l.img_w, 0.8);
        fill(l.img_w..l.img_b, (3.0 / c.image_dim as f32).sqrt());
        fill(l.w1..l.b1, (3.0 / c.d_in() as f32).sqrt());
        fill(l.w2..l.b2, (3.0 / c.hidden as f32).sqrt());
        fill(l.wo..l.bo, 0.1 * (3.0 / c.hidden as f32).sqrt());
        Model {
            config,
            layout,
            params,
        }
    }

    /// Number of parameters.
    pub fn n_params(&self) -> usize {
        self.layout.total
    }

    /// Logits of one token into `logits` [V]; returns the cache for the backward.
    pub fn forward(&self, ctx: &Context, logits: &mut [f32]) -> Cache {
        let c = &self.config;
        let l = &self.layout;
        let p = &self.params;
        assert_eq!(ctx.prompt.len(), c.prompt_len, "prompt length");
        assert_eq!(ctx.image.len(), c.image_dim, "image features");
        assert_eq!(ctx.glimpse.len(), c.glimpse_dim, "glimpse features");
        assert!(
            ctx.pos < c.max_len,
            "position {} beyond max_len {}",
            ctx.pos,
            c.max_len
        );
        let mut tokens: Vec<u32> = ctx.prompt.to_vec();
        tokens.push(ctx.prev);
        let mut img_pre = vec![0.0; c.d_img];
        linear(
            &p[l.img_w..l.img_b],
            &p[l.img_b..l.w1],
            ctx.image,
            &mut img_pre,
        );
        let mut z = Vec::with_capacity(c.d_in());
        for &t in &tokens {
            let t = t as usize;
            z.extend_from_slice(&p[l.tok + t * c.d_tok..l.tok + (t + 1) * c.d_tok]);
        }
        z.extend_from_slice(&p[l.pos + ctx.pos * c.d_pos..l.pos + (ctx.pos + 1) * c.d_pos]);
        let z_img_at = z.len();
        z.resize(z_img_at + c.d_img, 0.0);
        tanh(&img_pre, &mut z[z_img_at..]);
        let img = z[z_img_at..].to_vec();
        z.extend_from_slice(ctx.glimpse);
        let mut h1_pre = vec![0.0; c.hidden];
        linear(&p[l.w1..l.b1], &p[l.b1..l.w2], &z, &mut h1_pre);
        let mut h1 = vec![0.0; c.hidden];
        relu(&h1_pre, &mut h1);
        let mut h2_pre = vec![0.0; c.hidden];
        linear(&p[l.w2..l.b2], &p[l.b2..l.wo], &h1, &mut h2_pre);
        let mut h2 = vec![0.0; c.hidden];
        relu(&h2_pre, &mut h2);
        linear(&p[l.wo..l.bo], &p[l.bo..l.total], &h2, logits);
        Cache {
            tokens,
            pos: ctx.pos,
            image: ctx.image.to_vec(),
            img,
            z,
            h1_pre,
            h1,
            h2_pre,
            h2,
        }
    }

    /// Accumulates d(loss)/d(params) into `grad` [n_params] for one token, given d(loss)/d(logits).
    pub fn backward(&self, cache: &Cache, dlogits: &[f32], grad: &mut [f32]) {
        let c = &self.config;
        let l = &self.layout;
        let p = &self.params;
        let mut dh2 = vec![0.0; c.hidden];
        {
            let (g_wo, g_bo) = grad[l.wo..l.total].split_at_mut(l.bo - l.wo);
            linear_backward(
                &p[l.wo..l.bo],
                &cache.h2,
                dlogits,
                g_wo,
                g_bo,
                Some(&mut dh2),
            );
        }
        relu_backward(&cache.h2_pre, &mut dh2);
        let mut dh1 = vec![0.0; c.hidden];
        {
            let (g_w2, g_b2) = grad[l.w2..l.wo].split_at_mut(l.b2 - l.w2);
            linear_backward(&p[l.w2..l.b2], &cache.h1, &dh2, g_w2, g_b2, Some(&mut dh1));
        }
        relu_backward(&cache.h1_pre, &mut dh1);
        let mut dz = vec![0.0; c.d_in()];
        {
            let (g_w1, g_b1) = grad[l.w1..l.w2].split_at_mut(l.b1 - l.w1);
            linear_backward(&p[l.w1..l.b1], &cache.z, &dh1, g_w1, g_b1, Some(&mut dz));
        }
        // Scatter dz back to its sources: embeddings, position embedding, image encoding.
        for (slot, &t) in cache.tokens.iter().enumerate() {
            let t = t as usize;
            let dst = &mut grad[l.tok + t * c.d_tok..l.tok + (t + 1) * c.d_tok];
            for (d, s) in dst
                .iter_mut()
                .zip(&dz[slot * c.d_tok..(slot + 1) * c.d_tok])
            {
                *d += s;
            }
        }
        let pos_at = cache.tokens.len() * c.d_tok;
        let dst = &mut grad[l.pos + cache.pos * c.d_pos..l.pos + (cache.pos + 1) * c.d_pos];
        for (d, s) in dst.iter_mut().zip(&dz[pos_at..pos_at + c.d_pos]) {
            *d += s;
        }
        let img_at = pos_at + c.d_pos;
        let d_img = &mut dz[img_at..img_at + c.d_img];
        tanh_backward(&cache.img, d_img);
        let (g_iw, g_ib) = grad[l.img_w..l.w1].split_at_mut(l.img_b - l.img_w);
        linear_backward(&p[l.img_w..l.img_b], &cache.image, d_img, g_iw, g_ib, None);
    }
}

/// log-softmax of a logits row, in f64: returns (logsumexp, probabilities).
pub fn softmax(logits: &[f32]) -> (f64, Vec<f64>) {
    let m = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let s: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    let lse = m + s.ln();
    (
        lse,
        logits.iter().map(|&x| (x as f64 - lse).exp()).collect(),
    )
}

#[cfg(test)]
// The finite-difference checks loop over an index i that perturbs parameter i and reads gradient i.
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| scale * (rng.gen::<f32>() * 2.0 - 1.0))
            .collect()
    }

    /// Central difference of `f` in coordinate `i` of `x`, evaluated in f64 from f32 perturbations.
    fn central(x: &mut [f32], i: usize, eps: f32, f: &mut dyn FnMut(&[f32]) -> f64) -> f64 {
        let x0 = x[i];
        x[i] = x0 + eps;
        let up = f(x);
        x[i] = x0 - eps;
        let down = f(x);
        x[i] = x0;
        (up - down) / ((x0 + eps) as f64 - (x0 - eps) as f64)
    }

    fn close(analytic: f64, numeric: f64, what: &str) {
        let tol = 2e-3 + 5e-3 * numeric.abs();
        assert!(
            (analytic - numeric).abs() <= tol,
            "{what}: analytic {analytic} vs finite difference {numeric}"
        );
    }

    #[test]
    fn linear_backward_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (n_in, n_out) = (7, 5);
        let mut w = rand_vec(&mut rng, n_in * n_out, 1.0);
        let mut b = rand_vec(&mut rng, n_out, 1.0);
        let mut x = rand_vec(&mut rng, n_in, 1.0);
        let c: Vec<f32> = rand_vec(&mut rng, n_out, 1.0);
        // loss = sum_o c_o y_o
        let loss = |w: &[f32], b: &[f32], x: &[f32]| {
            let mut y = vec![0.0; n_out];
            linear(w, b, x, &mut y);
            y.iter()
                .zip(&c)
                .map(|(&y, &c)| y as f64 * c as f64)
                .sum::<f64>()
        };
        let (mut dw, mut db, mut dx) = (vec![0.0; w.len()], vec![0.0; n_out], vec![0.0; n_in]);
        linear_backward(&w, &x, &c, &mut dw, &mut db, Some(&mut dx));
        for i in 0..w.len() {
            let (b2, x2) = (b.clone(), x.clone());
            let n = central(&mut w, i, 1e-2, &mut |w| loss(w, &b2, &x2));
            close(dw[i] as f64, n, &format!("dW[{i}]"));
        }
        for i in 0..n_out {
            let (w2, x2) = (w.clone(), x.clone());
            let n = central(&mut b, i, 1e-2, &mut |b| loss(&w2, b, &x2));
            close(db[i] as f64, n, &format!("db[{i}]"));
        }
        for i in 0..n_in {
            let (w2, b2) = (w.clone(), b.clone());
            let n = central(&mut x, i, 1e-2, &mut |x| loss(&w2, &b2, x));
            close(dx[i] as f64, n, &format!("dx[{i}]"));
        }
    }

    #[test]
    fn relu_backward_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        // Keep every input away from the kink by more than eps.
        let mut x: Vec<f32> = rand_vec(&mut rng, 20, 1.0)
            .into_iter()
            .map(|v| v + 0.1f32.copysign(v))
            .collect();
        let c = rand_vec(&mut rng, 20, 1.0);
        let loss = |x: &[f32]| {
            let mut y = vec![0.0; x.len()];
            relu(x, &mut y);
            y.iter()
                .zip(&c)
                .map(|(&y, &c)| y as f64 * c as f64)
                .sum::<f64>()
        };
        let mut g = c.clone();
        relu_backward(&x, &mut g);
        for i in 0..x.len() {
            let n = central(&mut x, i, 1e-2, &mut |x| loss(x));
            close(g[i] as f64, n, &format!("relu dx[{i}]"));
        }
    }

    #[test]
    fn tanh_backward_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        let mut x = rand_vec(&mut rng, 20, 2.0);
        let c = rand_vec(&mut rng, 20, 1.0);
        let loss = |x: &[f32]| {
            let mut y = vec![0.0; x.len()];
            tanh(x, &mut y);
            y.iter()
                .zip(&c)
                .map(|(&y, &c)| y as f64 * c as f64)
                .sum::<f64>()
        };
        let mut y = vec![0.0; 20];
        tanh(&x, &mut y);
        let mut g = c.clone();
        tanh_backward(&y, &mut g);
        for i in 0..x.len() {
            let n = central(&mut x, i, 1e-2, &mut |x| loss(x));
            close(g[i] as f64, n, &format!("tanh dx[{i}]"));
        }
    }

    fn tiny() -> ModelConfig {
        ModelConfig {
            vocab: 11,
            prompt_len: 3,
            image_dim: 8,
            glimpse_dim: 2,
            max_len: 5,
            d_tok: 4,
            d_pos: 3,
            d_img: 6,
            hidden: 9,
        }
    }

    /// The whole model, embeddings included: loss = sum over a few tokens of cross-entropy(logits, y).
    /// A parameter whose perturbation flips a ReLU anywhere is skipped (the function has a kink there);
    /// the test demands that almost every parameter is checked.
    #[test]
    fn model_backward_matches_finite_differences() {
        let cfg = tiny();
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let mut model = Model::new(cfg.clone(), &mut rng);
        // Larger head weights so the loss is not flat.
        for p in &mut model.params[model.layout.wo..model.layout.bo] {
            *p *= 10.0;
        }
        let images: Vec<Vec<f32>> = (0..3)
            .map(|_| rand_vec(&mut rng, cfg.image_dim, 1.0))
            .collect();
        let prompts = [[1u32, 2, 3], [4, 5, 0], [6, 6, 7]];
        let ctxs: Vec<(Context, u32)> = (0..3)
            .map(|i| {
                (
                    Context {
                        prompt: &prompts[i],
                        prev: (i * 3 + 1) as u32,
                        pos: i + 1,
                        image: &images[i],
                        glimpse: &images[i][..2],
                    },
                    (i * 4 + 2) as u32,
                )
            })
            .collect();
        let eval = |m: &Model| -> (f64, Vec<Vec<bool>>) {
            let mut total = 0.0;
            let mut pattern = Vec::new();
            for (ctx, y) in &ctxs {
                let mut lg = vec![0.0; cfg.vocab];
                let cache = m.forward(ctx, &mut lg);
                let (lse, _) = softmax(&lg);
                total += lse - lg[*y as usize] as f64;
                for v in [&cache.h1_pre, &cache.h2_pre] {
                    pattern.push(v.iter().map(|&x| x > 0.0).collect());
                }
            }
            (total, pattern)
        };
        let mut grad = vec![0.0; model.n_params()];
        for (ctx, y) in &ctxs {
            let mut lg = vec![0.0; cfg.vocab];
            let cache = model.forward(ctx, &mut lg);
            let (_, p) = softmax(&lg);
            let dl: Vec<f32> = p
                .iter()
                .enumerate()
                .map(|(v, &p)| (p - (v == *y as usize) as u8 as f64) as f32)
                .collect();
            model.backward(&cache, &dl, &mut grad);
        }
        let (_, base_pattern) = eval(&model);
        let eps = 1e-2f32;
        let (mut checked, mut skipped) = (0, 0);
        let mut nonzero = 0;
        for i in 0..model.n_params() {
            let x0 = model.params[i];
            model.params[i] = x0 + eps;
            let (up, pat_up) = eval(&model);
            model.params[i] = x0 - eps;
            let (down, pat_down) = eval(&model);
            model.params[i] = x0;
            if pat_up != base_pattern || pat_down != base_pattern {
                skipped += 1;
                continue;
            }
            let numeric = (up - down) / ((x0 + eps) as f64 - (x0 - eps) as f64);
            close(grad[i] as f64, numeric, &format!("param {i}"));
            checked += 1;
            nonzero += (grad[i] != 0.0) as usize;
        }
        assert!(
            skipped * 20 <= checked,
            "too many kinks: {skipped} skipped, {checked} checked"
        );
        assert!(
            nonzero * 4 >= checked,
            "most gradients are zero: the test checks little ({nonzero}/{checked})"
        );
        // Every tensor received some gradient.
        let l = model.layout;
        for (name, r) in [
            ("tok", l.tok..l.pos),
            ("pos", l.pos..l.img_w),
            ("img_w", l.img_w..l.img_b),
            ("w1", l.w1..l.b1),
            ("w2", l.w2..l.b2),
            ("wo", l.wo..l.bo),
        ] {
            assert!(grad[r].iter().any(|&g| g != 0.0), "{name} has no gradient");
        }
    }
}
