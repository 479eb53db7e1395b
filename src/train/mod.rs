//! The built-in trainer: VPPO end to end on a synthetic multimodal task, using the crate's loss exactly
//! as a user would (`Vppo::loss_and_grad` on the policy's logits for the real and the masked image).
//!
//! One RL step:
//! 1. draw `prompts` problems (a grid image and a question, [`task`]); for each, sample G = 8 responses
//!    at temperature 1 from the policy given the real image, keeping every token's forward cache and
//!    log-prob (the rollout policy is the current policy: one update per batch, on-policy);
//! 2. run the policy again, teacher-forced on the same tokens, given a masked image I' (each cell
//!    blackened with probability 0.5, fresh per rollout): these are `logits_masked`;
//! 3. reward 1 for a right answer, GRPO advantages per group ([`crate::grpo_advantages`]);
//! 4. the loss and dloss/dlogits from [`crate::Vppo::loss_and_grad`] (the CPU reference, the SIMT
//!    executor or the GPU, as `--device` says), backpropagated by hand through the policy;
//! 5. global-norm clipping and AdamW.
//!
//! Before RL, the freshly initialised policy is taught the response format by a short supervised
//! warm-up in which 30% of the answers are right and the rest are uniform guesses among the valid
//! answers: it plays the part of the base model, which knows the format and looks at the image a little
//! (the paper's base model scores 38%). A base model taught only guesses collapsed onto one
//! image-blind answer within a dozen RL steps (entropy 0.11 to 0.016) and never learned to look.
//! It is the same for every algorithm of a seed, so compared runs start from one base model.
//!
//! Algorithms (`--algo`): `vppo` is [`crate::VppoConfig::default`] (the official setting); `dapo` is
//! [`crate::VppoConfig::dapo`] (every token, no shaping, same clipping); `grpo` is the plain GRPO surrogate:
//! symmetric clip 0.2 / 0.2, no dual clip, no logp penalty, every token, no shaping (and, as in DAPO and
//! the official VPPO recipe, no KL-to-reference term); `gspo` is GRPO with the sequence-level ratio of
//! GSPO (loss type gspo) and its clip 3e-4 / 4e-4; `cispo` is DAPO's clipping with the CISPO loss
//! (loss type cispo: -A' logp times the clipped ratio held constant), no dual clip, no logp penalty;
//! `vppo-entropy` is VPPO with the official entropy option (mask by perception or entropy).
//!
//! Random streams (ChaCha8, from `--seed`): stream 0 initialises and warms up the model, stream 1 drives
//! RL (problems, masks, sampling), stream 2 draws the held-out evaluation problems. Everything runs on
//! one thread in a fixed order, so a run is a function of its seed; a checkpoint stores stream 1's
//! position, and a resumed run is bit-identical to an uninterrupted one.
//!
//! Files, top down: `cli.rs` (`vppo train`: options to a [`TrainConfig`], defined in `config.rs`
//! with [`Algo`]) calls `compare.rs` ([`compare`]: many runs side by side, their table from
//! `report.rs`) or `run.rs` ([`run`]: one run, its metrics.jsonl, checkpoints and pictures, drawn by
//! `plot.rs`; `lock.rs` keeps two runs out of one folder). A run drives a [`Trainer`] (`trainer.rs`:
//! fresh with the base model of `warmup.rs`, or resumed from `checkpoint.rs`; the held-out accuracy
//! from `eval.rs`), whose RL step (`step.rs`) samples responses (`rollout.rs`) and logs a
//! [`StepMetrics`] (`metrics.rs`). Below them: the policy (`model.rs`), AdamW (`optim.rs`), the tasks
//! (`task.rs`, `chain.rs`) and the trainer's errors (`error.rs`).

pub mod chain;
pub mod checkpoint;
pub mod error;
pub mod lock;
pub mod model;
pub mod optim;
pub mod plot;
pub mod report;
pub mod task;

mod cli;
mod compare;
mod config;
mod eval;
mod metrics;
mod rollout;
mod run;
mod step;
mod trainer;
mod warmup;

pub use cli::{run_cli, TrainArgs};
pub use compare::compare;
pub use config::{Algo, TrainConfig};
pub use error::{Result, TrainError};
pub use metrics::StepMetrics;
pub use run::{run, RunOptions, RunSummary};
pub use trainer::Trainer;
