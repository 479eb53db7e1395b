//! `vppo train`: its options ([`TrainArgs`]) and [`run_cli`], which builds the configuration from
//! them, runs one run or a comparison, writes the comparison's report.md and summary.json, and returns
//! the one-line JSON summary.

use std::path::PathBuf;
use std::time::Instant;

use super::compare::compare;
use super::config::{Algo, TrainConfig};
use super::error::{io_err, Result, TrainError};
use super::report;
use super::run::{run, RunOptions, RunSummary};
use super::task::{Family, Task};
use crate::options::DeviceArg;

/// `vppo train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// The algorithm: vppo (the official VPPO setting), dapo (every token, no shaping), grpo, tgf-only
    /// (VPPO's mask, no shaping), tas-only (VPPO's shaping, every token), gspo, cispo, or
    /// vppo-entropy (VPPO's mask by perception or entropy).
    #[arg(long, value_enum, default_value = "vppo")]
    pub algo: Algo,
    /// Where the loss runs: cpu (the reference), simt (the kernels on the CPU) or cuda (GPU 0).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// RL steps (default 80 on the chain task, 300 on the template task, 120 with --easy).
    #[arg(long, allow_negative_numbers = true)]
    pub steps: Option<usize>,
    /// Seed of every random stream.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    pub seed: u64,
    /// Seeds for --compare, comma-separated (default 1,2,3,4,5).
    #[arg(long, allow_negative_numbers = true, value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// Run several algorithms (--algos) on the same seeds (--seeds, default 1,2,3,4,5) and report
    /// held-out accuracy with 95% intervals, steps to --threshold, token scores and the Sbar spread.
    #[arg(long)]
    pub compare: bool,
    /// Algorithms for --compare, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "grpo,dapo,vppo,tgf-only,tas-only"
    )]
    pub algos: Vec<Algo>,
    /// Held-out accuracy whose first reaching --compare reports (steps to threshold).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.6)]
    pub threshold: f64,
    /// Held-out accuracy every this many steps (0: only at the end).
    #[arg(long, allow_negative_numbers = true, default_value_t = 10)]
    pub eval_every: usize,
    /// Output folder (default runs/<algo>-seed<seed>, or runs/compare).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the folder's checkpoint.json when there is one.
    #[arg(long)]
    pub resume: bool,
    /// The task family: chain (cell reads with free filler tokens the verifier ignores) or template
    /// (every token but the answer fixed by the question).
    #[arg(long, value_enum, default_value = "chain")]
    pub task: Family,
    /// The small easy task (2x2 grid, 2 colours, colour-at questions, template family) instead.
    #[arg(long)]
    pub easy: bool,
    /// Prompts per step (each with G = 8 responses).
    #[arg(long, allow_negative_numbers = true)]
    pub prompts: Option<usize>,
    /// AdamW learning rate.
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f32>,
    /// Supervised warm-up steps of the base model.
    #[arg(long, allow_negative_numbers = true)]
    pub warmup_steps: Option<usize>,
    /// Fraction of the warm-up's image-dependent tokens that are right (the rest are guesses).
    #[arg(long, allow_negative_numbers = true)]
    pub base_skill: Option<f64>,
    /// Chain task: most fillers in a base-model response (sets max_len to fit).
    #[arg(long, allow_negative_numbers = true)]
    pub max_fillers: Option<usize>,
    /// Runs at a time for --compare (default: the machine's cores).
    #[arg(long, allow_negative_numbers = true)]
    pub threads: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `vppo train`; returns the one-line JSON summary to print.
pub fn run_cli(args: &TrainArgs) -> Result<serde_json::Value> {
    let start = Instant::now();
    let mut cfg = if args.easy {
        TrainConfig::easy()
    } else {
        match args.task {
            Family::Template => TrainConfig::default(),
            Family::Chain => TrainConfig::chain(),
        }
    };
    cfg.algo = args.algo;
    cfg.device = args.device;
    if let Some(steps) = args.steps {
        cfg.steps = steps;
    }
    cfg.seed = args.seed;
    if let Some(p) = args.prompts {
        cfg.prompts = p;
    }
    if let Some(lr) = args.lr {
        cfg.optim.lr = lr;
    }
    cfg.eval_every = args.eval_every;
    if !(0.0..=1.0).contains(&args.threshold) {
        return Err(TrainError::Config {
            field: "threshold",
            value: args.threshold.to_string(),
            expected: "an accuracy in [0, 1]",
        });
    }
    if let Some(w) = args.warmup_steps {
        cfg.warmup_steps = w;
    }
    if let Some(b) = args.base_skill {
        cfg.base_skill = b;
    }
    if let Some(f) = args.max_fillers {
        cfg.task.max_fillers = f;
        cfg.max_len = Task::new(cfg.task.clone())?.max_response_len().max(8);
    }
    cfg.validate()?;
    let progress = !args.quiet;
    if args.compare {
        let seeds = if args.seeds.is_empty() {
            vec![1, 2, 3, 4, 5]
        } else {
            args.seeds.clone()
        };
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs/compare"));
        let threads = args.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        let mut algos: Vec<Algo> = Vec::new();
        for &a in &args.algos {
            if !algos.contains(&a) {
                algos.push(a);
            }
        }
        let runs = compare(&cfg, &algos, &seeds, &out, args.resume, progress, threads)?;
        let names: Vec<&str> = algos.iter().map(|a| a.name()).collect();
        let stats: Vec<Vec<report::RunStats>> = algos
            .iter()
            .map(|&a| {
                runs.iter()
                    .filter(|r| r.algo == a)
                    .map(|r| report::RunStats {
                        seed: r.seed,
                        eval_acc: r.eval_acc,
                        curve: r.eval_curve.clone(),
                        score_answer: r.score_answer,
                        score_read: r.score_read,
                        score_nonvisual: r.score_nonvisual,
                        sbar_cv: r.sbar_cv,
                    })
                    .collect()
            })
            .collect();
        let rows = report::rows(&names, &stats, args.threshold);
        let table = report::markdown(&rows, args.threshold);
        let header = format!(
            "task {}, {} steps, seeds {seeds:?}, device {}\n\n",
            cfg.task.family.name(),
            cfg.steps,
            cfg.device.name()
        );
        std::fs::write(out.join("report.md"), format!("{header}{table}")).map_err(io_err(&out))?;
        if progress {
            eprintln!("\n{header}{table}");
        }
        let mean = |a: Algo, f: &dyn Fn(&RunSummary) -> f64| {
            let xs: Vec<f64> = runs.iter().filter(|r| r.algo == a).map(f).collect();
            xs.iter().sum::<f64>() / xs.len().max(1) as f64
        };
        let per_run: Vec<serde_json::Value> = runs.iter().map(run_json).collect();
        let mut by_algo = serde_json::Map::new();
        for &a in &algos {
            by_algo.insert(
                a.name().into(),
                serde_json::json!({
                    "eval_acc": round4(mean(a, &|r| r.eval_acc)),
                    "final_reward": round4(mean(a, &|r| r.final_reward)),
                    "base_eval_acc": round4(mean(a, &|r| r.base_eval_acc)),
                }),
            );
        }
        let summary = serde_json::json!({
            "mode": "compare", "task": cfg.task.family.name(), "seeds": seeds, "steps": cfg.steps, "device": cfg.device.name(),
            "mean": by_algo, "table": rows, "threshold": args.threshold, "runs": per_run, "out": out, "wall_s": round4(start.elapsed().as_secs_f64()),
        });
        std::fs::write(out.join("summary.json"), summary.to_string()).map_err(io_err(&out))?;
        Ok(summary)
    } else {
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("runs/{}-seed{}", cfg.algo.name(), cfg.seed)));
        let r = run(
            &cfg,
            &RunOptions {
                out,
                resume: args.resume,
                progress,
            },
            None,
        )?;
        let mut v = run_json(&r);
        v["device"] = cfg.device.name().into();
        v["mode"] = "train".into();
        Ok(v)
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

fn run_json(r: &RunSummary) -> serde_json::Value {
    serde_json::json!({
        "algo": r.algo.name(), "seed": r.seed, "steps": r.steps,
        "base_eval_acc": round4(r.base_eval_acc), "eval_acc": round4(r.eval_acc),
        "eval_acc_by_kind": {"colour_at": round4(r.eval_acc_by_kind[0]), "count": round4(r.eval_acc_by_kind[1]), "same": round4(r.eval_acc_by_kind[2])},
        "final_reward": round4(r.final_reward), "wall_s": round4(r.wall_s), "out": r.out,
    })
}
