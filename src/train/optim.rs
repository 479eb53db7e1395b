//! AdamW (decoupled weight decay, Loshchilov & Hutter) and global-norm gradient clipping.

/// Hyper-parameters of AdamW.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to sqrt(v_hat).
    pub eps: f32,
    /// Decoupled weight decay: p -= lr * weight_decay * p each step.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW state: the two moment vectors and the step count.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// First moments, one per parameter.
    pub m: Vec<f32>,
    /// Second moments, one per parameter.
    pub v: Vec<f32>,
    /// Number of steps taken.
    pub t: u64,
}

impl AdamW {
    /// Zero state for `n` parameters.
    pub fn new(config: AdamWConfig, n: usize) -> AdamW {
        AdamW {
            config,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// One update of `params` with `grad`.
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) {
        assert_eq!(params.len(), grad.len());
        assert_eq!(params.len(), self.m.len());
        self.t += 1;
        let c = self.config;
        let bc1 = 1.0 - (c.beta1 as f64).powi(self.t as i32);
        let bc2 = 1.0 - (c.beta2 as f64).powi(self.t as i32);
        let step = (c.lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        for i in 0..params.len() {
            let g = grad[i];
            self.m[i] = c.beta1 * self.m[i] + (1.0 - c.beta1) * g;
            self.v[i] = c.beta2 * self.v[i] + (1.0 - c.beta2) * g * g;
            let denom = self.v[i].sqrt() / bc2_sqrt + c.eps;
            params[i] -= c.lr * c.weight_decay * params[i];
            params[i] -= step * self.m[i] / denom;
        }
    }
}

/// Scales `grad` so its L2 norm is at most `max_norm`; returns the norm before clipping (computed in f64).
pub fn clip_global_norm(grad: &mut [f32], max_norm: f64) -> f64 {
    let norm = grad
        .iter()
        .map(|&g| g as f64 * g as f64)
        .sum::<f64>()
        .sqrt();
    if norm > max_norm && norm > 0.0 {
        let s = (max_norm / norm) as f32;
        grad.iter_mut().for_each(|g| *g *= s);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_step_moves_each_parameter_by_lr() {
        // With bias correction the first Adam step is lr * sign(g) (up to eps), plus the decay.
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(cfg, 3);
        let mut p = vec![1.0f32, -2.0, 0.5];
        opt.step(&mut p, &[0.3, -4.0, 0.0]);
        let expect = [1.0 - 0.05 - 0.1, -2.0 + 0.1 + 0.1, 0.5 - 0.025];
        for (a, e) in p.iter().zip(expect) {
            assert!((a - e).abs() < 1e-5, "{a} vs {e}");
        }
        assert_eq!(opt.t, 1);
    }

    #[test]
    fn adamw_minimises_a_quadratic() {
        let mut opt = AdamW::new(
            AdamWConfig {
                lr: 0.05,
                weight_decay: 0.0,
                ..Default::default()
            },
            2,
        );
        let mut p = vec![3.0f32, -1.0];
        for _ in 0..500 {
            let g = [2.0 * (p[0] - 1.0), 2.0 * (p[1] + 2.0)];
            opt.step(&mut p, &g);
        }
        assert!(
            (p[0] - 1.0).abs() < 1e-2 && (p[1] + 2.0).abs() < 1e-2,
            "{p:?}"
        );
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_global_norm(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
        let mut h = vec![0.3f32, 0.4];
        clip_global_norm(&mut h, 1.0);
        assert_eq!(h, vec![0.3, 0.4]);
    }
}
