//! The trainer end to end: determinism, learning, and bit-identical resume.

use vppo::train::{compare, run, Algo, RunOptions, TrainConfig, TrainError, Trainer};

/// A tiny config: a few prompts, a short warm-up, a small model.
fn tiny(algo: Algo, seed: u64) -> TrainConfig {
    TrainConfig {
        algo,
        seed,
        steps: 6,
        prompts: 4,
        warmup_steps: 40,
        eval_problems: 50,
        checkpoint_every: 3,
        ..TrainConfig::easy()
    }
}

#[test]
fn one_step_is_deterministic_for_a_seed() {
    for algo in [Algo::Vppo, Algo::Dapo, Algo::Grpo] {
        let mut a = Trainer::new(tiny(algo, 7)).unwrap();
        let mut b = Trainer::new(tiny(algo, 7)).unwrap();
        assert_eq!(a.model.params, b.model.params, "same base model");
        let ma = a.step().unwrap();
        let mb = b.step().unwrap();
        assert_eq!(ma, mb);
        let bits = |t: &Trainer| {
            t.model
                .params
                .iter()
                .map(|p| p.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            bits(&a),
            bits(&b),
            "{algo:?}: parameters after one step differ"
        );
        assert!(ma.loss.is_finite() && ma.grad_norm > 0.0, "{ma:?}");
        // Another seed is another run.
        let mut c = Trainer::new(tiny(algo, 8)).unwrap();
        c.step().unwrap();
        assert_ne!(bits(&a), bits(&c));
    }
}

#[test]
fn vppo_masks_tokens_and_dapo_does_not() {
    let mut v = Trainer::new(tiny(Algo::Vppo, 3)).unwrap();
    let mut d = Trainer::new(tiny(Algo::Dapo, 3)).unwrap();
    let (mv, md) = (v.step().unwrap(), d.step().unwrap());
    assert!(
        mv.selected_fraction > 0.35 && mv.selected_fraction < 0.6,
        "{mv:?}"
    );
    assert_eq!(md.selected_fraction, 1.0);
    assert_eq!(md.alpha_range, [1.0, 1.0]);
    // Same seed, same rollouts: the rewards agree, only the loss differs.
    assert_eq!(mv.reward, md.reward);
}

#[test]
fn reward_rises_on_the_easy_task() {
    let cfg = TrainConfig {
        steps: 120,
        ..TrainConfig::easy()
    };
    let mut t = Trainer::new(cfg.clone()).unwrap();
    let rewards: Vec<f64> = (0..cfg.steps).map(|_| t.step().unwrap().reward).collect();
    let first = rewards[..20].iter().sum::<f64>() / 20.0;
    let last = rewards[rewards.len() - 20..].iter().sum::<f64>() / 20.0;
    assert!(
        last > first + 0.25,
        "mean reward first 20 steps {first:.3}, last 20 steps {last:.3}"
    );
    let (acc, _) = t.evaluate();
    assert!(
        acc > 0.9 && acc > t.base_eval_acc + 0.15,
        "held-out accuracy {acc:.3} vs base {:.3}",
        t.base_eval_acc
    );
}

#[test]
fn resume_from_checkpoint_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let full_dir = dir.path().join("full");
    let split_dir = dir.path().join("split");
    let cfg = tiny(Algo::Vppo, 11);
    let full = run(
        &cfg,
        &RunOptions {
            out: full_dir.clone(),
            resume: false,
            progress: false,
        },
        None,
    )
    .unwrap();
    // "Interrupted" after 4 steps (the checkpoint is written at the end of the shorter run) ...
    let first = TrainConfig {
        steps: 4,
        ..cfg.clone()
    };
    run(
        &first,
        &RunOptions {
            out: split_dir.clone(),
            resume: false,
            progress: false,
        },
        None,
    )
    .unwrap();
    // ... and a stale metrics line past the checkpoint, as an interruption between the two writes leaves.
    let metrics = split_dir.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str("{\"step\":5,\"garbage\":true}\n");
    std::fs::write(&metrics, text).unwrap();
    let resumed = run(
        &cfg,
        &RunOptions {
            out: split_dir.clone(),
            resume: true,
            progress: false,
        },
        None,
    )
    .unwrap();
    assert_eq!(resumed.rewards, full.rewards);
    assert_eq!(resumed.eval_acc, full.eval_acc);
    let read = |d: &std::path::Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    assert_eq!(
        read(&split_dir, "metrics.jsonl"),
        read(&full_dir, "metrics.jsonl")
    );
    assert_eq!(
        read(&split_dir, "checkpoint.json"),
        read(&full_dir, "checkpoint.json"),
        "parameters, optimizer and rng agree bit for bit"
    );
    for f in ["reward.svg", "scores.svg"] {
        assert!(read(&split_dir, f).starts_with("<svg"), "{f}");
    }
    // A checkpoint of another configuration is refused with a clear error.
    let other = TrainConfig { seed: 12, ..cfg };
    let err = run(
        &other,
        &RunOptions {
            out: split_dir,
            resume: true,
            progress: false,
        },
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("another configuration"), "{err}");
}

#[test]
fn cli_train_writes_its_files_and_a_json_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppo"))
        .args(["train", "--easy", "--steps", "3", "--quiet", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["algo"], "vppo");
    assert_eq!(summary["steps"], 3);
    for f in [
        "metrics.jsonl",
        "checkpoint.json",
        "reward.svg",
        "scores.svg",
    ] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppo"))
        .args([
            "train", "--easy", "--steps", "1", "--quiet", "--device", "cuda", "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if !out.status.success() {
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr.starts_with("vppo train: error: "), "{stderr}");
        assert!(out.stdout.is_empty());
    }
}

fn opts(out: &std::path::Path, resume: bool) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        resume,
        progress: false,
    }
}

/// Diverged weights are named as such (they surfaced as "old_logp has a non-finite value"), before
/// the rollout that would turn them into NaN log-probs.
#[test]
fn nan_weights_are_reported_as_parameters() {
    let mut t = Trainer::new(tiny(Algo::Vppo, 3)).unwrap();
    t.model.params[5] = f32::NAN;
    let e = t.step().unwrap_err();
    assert!(
        matches!(
            e,
            TrainError::NonFiniteParameter {
                index: 5,
                step: 0,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("policy parameter 5"), "{e}");
}

/// A checkpoint that cannot be resumed from is an error naming the field, never a panic (a non-ASCII
/// rng seed) or a hang (a recent score of 1e39, read as +inf, looped in plotters).
#[test]
fn a_bad_checkpoint_is_an_error_not_a_panic_or_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        steps: 1,
        ..tiny(Algo::Vppo, 4)
    };
    run(&cfg, &opts(dir.path(), false), None).unwrap();
    let ck_path = dir.path().join("checkpoint.json");
    let good = std::fs::read_to_string(&ck_path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&good).unwrap();
    let seed = v["rng"]["seed"].as_str().unwrap().to_string();
    let score = v["recent_scores"][0][0].to_string();
    let edits = [
        (
            good.replace(&seed, &format!("é{}", &seed[2..])),
            "malformed rng state",
        ),
        (
            good.replace(&seed, &format!("+f{}", &seed[2..])),
            "malformed rng state",
        ),
        (
            good.replacen(
                &format!("\"recent_scores\":[[{score}"),
                "\"recent_scores\":[[1e39",
                1,
            ),
            "recent_scores[0] = inf",
        ),
    ];
    let later = TrainConfig { steps: 2, ..cfg };
    for (text, needle) in edits {
        assert_ne!(text, good);
        std::fs::write(&ck_path, &text).unwrap();
        let e = run(&later, &opts(dir.path(), true), None).unwrap_err();
        assert!(matches!(e, TrainError::Checkpoint { .. }), "{e}");
        assert!(e.to_string().contains(needle), "{needle}: {e}");
    }
}

/// `--compare --seeds 1,1,1` raced three writers of one folder: repeated seeds are refused, and a
/// folder held by one run cannot be written by another (in this process or another).
#[test]
fn one_writer_per_folder() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        steps: 1,
        ..tiny(Algo::Vppo, 5)
    };
    let e = compare(&cfg, &[Algo::Vppo], &[1, 1, 1], dir.path(), false, false, 3).unwrap_err();
    assert!(
        matches!(e, TrainError::Config { field: "seeds", .. }),
        "{e}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written"
    );
    let held = vppo::train::lock::OutLock::acquire(dir.path()).unwrap();
    let e = run(&cfg, &opts(dir.path(), false), None).unwrap_err();
    assert!(matches!(e, TrainError::Busy { .. }), "{e}");
    drop(held);
    run(&cfg, &opts(dir.path(), false), None).unwrap();
    // Through the command line too, and the temporary checkpoint names are unique: nothing but the
    // run's own files is left.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppo"))
        .args([
            "train",
            "--compare",
            "--seeds",
            "1,1,1",
            "--easy",
            "--steps",
            "1",
            "--quiet",
            "--out",
        ])
        .arg(dir.path().join("cmp"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("config: seeds = [1, 1, 1]"), "{stderr}");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "checkpoint.json",
            "metrics.jsonl",
            "reward.svg",
            "scores.svg"
        ]
    );
}

/// A tiny chain-task config.
fn tiny_chain(algo: Algo, seed: u64) -> TrainConfig {
    TrainConfig {
        algo,
        seed,
        steps: 4,
        prompts: 4,
        warmup_steps: 20,
        eval_problems: 40,
        checkpoint_every: 2,
        eval_every: 2,
        d_img: 16,
        hidden: 24,
        ..TrainConfig::chain()
    }
}

#[test]
fn chain_task_reward_ignores_fillers_and_checks_reads() {
    use rand::SeedableRng;
    use vppo::train::task::{Kind, Task, TaskConfig, TokenClass};
    let t = Task::new(TaskConfig::chain()).unwrap();
    let v = &t.vocab;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut kinds = std::collections::HashSet::new();
    for _ in 0..200 {
        let p = t.sample(&mut rng);
        kinds.insert(p.kind);
        let reads = match p.kind {
            Kind::ColourAt => 1,
            Kind::Same => 2,
            Kind::Count => 3,
        };
        assert_eq!(p.response.len(), 2 * reads + 3, "{:?}", p.kind);
        // A free reasoning block before IS: same reward, and its tokens are fillers.
        let mut r = p.response.clone();
        for f in 0..4 {
            r.insert(p.answer_pos - 1, v.think(f));
        }
        assert_eq!(t.reward(&p, &r), 1.0);
        let at = t.answer_position(&r);
        assert_eq!(at, Some(p.answer_pos + 4));
        assert_eq!(t.token_class(&r, 1, at), TokenClass::Read);
        assert_eq!(t.token_class(&r, 0, at), TokenClass::Template);
        assert_eq!(t.token_class(&r, p.answer_pos, at), TokenClass::Filler);
        assert_eq!(t.token_class(&r, p.answer_pos + 4, at), TokenClass::Answer);
        // One misread colour: 0.
        r[1] = v.colour((p.grid[(p.response[0] - v.cell(0)) as usize] + 1) % 3);
        assert_eq!(t.reward(&p, &r), 0.0);
    }
    assert_eq!(kinds.len(), 3);
    // The template family is unchanged: no fillers, its own vocabulary.
    let tt = Task::new(TaskConfig::default()).unwrap();
    assert!(tt.vocab.size() < v.size());
}

/// The presets of the official code's variants (SPEC section 12): `cispo` trains with the CISPO loss
/// and `vppo-entropy` with VPPO's mask by perception or entropy, whose union selects at least the
/// tokens VPPO's perception mask selects on the same seed (the same base model and first rollouts).
#[test]
fn variant_presets_train_with_their_loss() {
    let cispo = Algo::Cispo.loss_config(8);
    assert_eq!(cispo.loss_type, vppo::LossType::Cispo);
    assert_eq!((cispo.dual_clip, cispo.logp_penalty), (None, 0.0));
    let ent = Algo::VppoEntropy.loss_config(8);
    assert_eq!(ent.mask_by, vppo::MaskBy::PerceptionOrEntropy);
    assert_eq!(ent.top_fraction, vppo::VppoConfig::default().top_fraction);
    let step = |algo| {
        let mut t = Trainer::new(tiny_chain(algo, 3)).unwrap();
        let m = t.step().unwrap();
        assert!(m.loss.is_finite(), "{algo:?}: {m:?}");
        m
    };
    let (c, e, v) = (step(Algo::Cispo), step(Algo::VppoEntropy), step(Algo::Vppo));
    assert_eq!(c.selected_fraction, 1.0, "cispo: every token");
    assert!(e.selected_fraction >= v.selected_fraction, "{e:?} vs {v:?}");
    assert!(e.selected_fraction < 1.0, "{e:?}");
}

#[test]
fn chain_trainer_runs_the_ablations_and_resumes_bit_identically() {
    for algo in [Algo::TgfOnly, Algo::TasOnly] {
        let mut t = Trainer::new(tiny_chain(algo, 2)).unwrap();
        let m = t.step().unwrap();
        assert!(m.loss.is_finite() && m.score_read >= 0.0, "{m:?}");
        match algo {
            Algo::TgfOnly => {
                assert!(m.selected_fraction < 0.6, "{m:?}");
                assert_eq!(m.alpha_range, [1.0, 1.0]);
            }
            _ => {
                assert_eq!(m.selected_fraction, 1.0);
                assert!(m.alpha_range[1] > m.alpha_range[0], "{m:?}");
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_chain(Algo::Vppo, 5);
    let opts = |d: &str, resume| RunOptions {
        out: dir.path().join(d),
        resume,
        progress: false,
    };
    let full = run(&cfg, &opts("full", false), None).unwrap();
    let first = TrainConfig {
        steps: 2,
        ..cfg.clone()
    };
    run(&first, &opts("split", false), None).unwrap();
    let resumed = run(&cfg, &opts("split", true), None).unwrap();
    assert_eq!(resumed.rewards, full.rewards);
    assert_eq!(resumed.eval_curve, full.eval_curve);
    assert_eq!(
        full.eval_curve.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![0, 2, 4]
    );
    let read = |d: &str, f: &str| std::fs::read_to_string(dir.path().join(d).join(f)).unwrap();
    assert_eq!(
        read("split", "metrics.jsonl"),
        read("full", "metrics.jsonl")
    );
    assert_eq!(
        read("split", "checkpoint.json"),
        read("full", "checkpoint.json")
    );
}

#[test]
fn cli_compare_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppo"))
        .args([
            "train",
            "--compare",
            "--algos",
            "dapo,vppo",
            "--seeds",
            "1,2",
            "--steps",
            "2",
            "--prompts",
            "2",
            "--warmup-steps",
            "3",
            "--eval-every",
            "1",
            "--quiet",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["task"], "chain");
    assert_eq!(summary["table"].as_array().unwrap().len(), 2);
    assert!(summary["table"][1]["minus_dapo"]["half"].is_number());
    let report = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(report.contains("| vppo |") && report.contains("minus DAPO"));
    for f in ["accuracy.svg", "scores.svg", "reward.svg"] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
}
