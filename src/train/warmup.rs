//! The base model: a short supervised warm-up that teaches the freshly initialised policy the response
//! format, with a `base_skill` fraction of right answers (see the module doc of [`super`]).

use rand_chacha::ChaCha8Rng;

use super::config::TrainConfig;
use super::model::{softmax, Context, Model};
use super::optim::{clip_global_norm, AdamW, AdamWConfig};
use super::task::{self, Task};

/// The base model: supervised steps on correct-format responses whose answer token is drawn
/// uniformly from the valid answers (so the model learns the format, not the image).
pub(super) fn warm_up(config: &TrainConfig, task: &Task, model: &mut Model, rng: &mut ChaCha8Rng) {
    let v = task.vocab.size();
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
        model.n_params(),
    );
    let mut row = vec![0.0f32; v];
    for _ in 0..config.warmup_steps {
        let mut grad = vec![0.0f32; model.n_params()];
        let mut seqs = Vec::with_capacity(config.warmup_batch);
        for _ in 0..config.warmup_batch {
            let p = task.sample(rng);
            let target = task.warmup_target(&p, rng, config.base_skill);
            seqs.push((p, target));
        }
        let n_tokens: usize = seqs.iter().map(|s| s.1.len()).sum();
        for (p, target) in &seqs {
            let image = task.image(p);
            let mut prev = task::Vocab::PAD;
            for (pos, &y) in target.iter().enumerate() {
                let glimpse = task.glimpse(&p.prompt, prev, &image);
                let cache = model.forward(
                    &Context {
                        prompt: &p.prompt,
                        prev,
                        pos,
                        image: &image,
                        glimpse: &glimpse,
                    },
                    &mut row,
                );
                let (_, probs) = softmax(&row);
                // d(mean cross-entropy)/dlogits = (softmax - onehot) / n_tokens.
                let d: Vec<f32> = probs
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| ((q - (i == y as usize) as u8 as f64) / n_tokens as f64) as f32)
                    .collect();
                model.backward(&cache, &d, &mut grad);
                prev = y;
            }
        }
        clip_global_norm(&mut grad, config.clip_norm);
        opt.step(&mut model.params, &grad);
    }
}
