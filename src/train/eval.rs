//! The held-out evaluation: greedy decoding on problems drawn from the seed's stream 2, accuracy
//! overall and per question kind.

use super::config::TrainConfig;
use super::model::{Context, Model};
use super::task::{self, Task};
use super::trainer::stream;

/// Greedy decoding on `eval_problems` problems drawn from stream 2 of the seed: (accuracy, per kind).
pub(super) fn evaluate(model: &Model, task: &Task, config: &TrainConfig) -> (f64, [f64; 3]) {
    let mut rng = stream(config.seed, 2);
    let eos = task.vocab.eos();
    let mut row = vec![0.0f32; task.vocab.size()];
    let mut by_kind = [(0.0, 0usize); 3];
    for _ in 0..config.eval_problems {
        let p = task.sample(&mut rng);
        let image = task.image(&p);
        let mut tokens = Vec::new();
        let mut prev = task::Vocab::PAD;
        for pos in 0..config.max_len {
            let glimpse = task.glimpse(&p.prompt, prev, &image);
            model.forward(
                &Context {
                    prompt: &p.prompt,
                    prev,
                    pos,
                    image: &image,
                    glimpse: &glimpse,
                },
                &mut row,
            );
            let y = row
                .iter()
                .enumerate()
                .fold(0, |best, (i, &x)| if x > row[best] { i } else { best })
                as u32;
            tokens.push(y);
            prev = y;
            if y == eos {
                break;
            }
        }
        let k = p.kind as usize;
        by_kind[k].0 += task.reward(&p, &tokens) as f64;
        by_kind[k].1 += 1;
    }
    let total: f64 = by_kind.iter().map(|x| x.0).sum();
    let count: usize = by_kind.iter().map(|x| x.1).sum();
    (
        total / count.max(1) as f64,
        by_kind.map(|(s, c)| if c == 0 { -1.0 } else { s / c as f64 }),
    )
}
