//! Compared runs ([`compare`]): every (algorithm, seed) pair on a few threads, and the pictures that
//! put them side by side (reward curves, held-out accuracy bands, pooled token scores).

use std::path::Path;

use super::config::{Algo, TrainConfig};
use super::error::{Result, TrainError};
use super::lock;
use super::metrics::HISTOGRAM_STEPS;
use super::plot;
use super::report;
use super::run::{progress_bar, run, RunOptions, RunSummary};

/// Runs every (algorithm, seed) pair, up to `threads` at a time (each run is single-threaded and
/// deterministic, so the results do not depend on the thread count), under `out/<algo>-seed<seed>/`, and
/// draws all mean-reward curves on one picture `out/reward.svg`.
pub fn compare(
    base: &TrainConfig,
    algos: &[Algo],
    seeds: &[u64],
    out: &Path,
    resume: bool,
    progress: bool,
    threads: usize,
) -> Result<Vec<RunSummary>> {
    // Two runs of one (algorithm, seed) would share a folder and race on its files.
    for (i, s) in seeds.iter().enumerate() {
        if seeds[..i].contains(s) {
            return Err(TrainError::Config {
                field: "seeds",
                value: format!("{seeds:?}"),
                expected: "distinct seeds (seed repeated)",
            });
        }
    }
    let _lock = lock::OutLock::acquire(out)?;
    let jobs: Vec<(Algo, u64)> = seeds
        .iter()
        .flat_map(|&s| algos.iter().map(move |&a| (a, s)))
        .collect();
    let multi = indicatif::MultiProgress::new();
    if !progress {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<Option<Result<RunSummary>>>> =
        std::sync::Mutex::new(vec![None; jobs.len()]);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, jobs.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(&(algo, seed)) = jobs.get(i) else {
                    break;
                };
                let cfg = TrainConfig {
                    algo,
                    seed,
                    ..base.clone()
                };
                let opts = RunOptions {
                    out: out.join(format!("{}-seed{seed}", algo.name())),
                    resume,
                    progress,
                };
                let bar = multi.add(progress_bar(progress, &cfg));
                let r = run(&cfg, &opts, Some(bar));
                results.lock().expect("no poisoned lock")[i] = Some(r);
            });
        }
    });
    let results: Vec<RunSummary> = results
        .into_inner()
        .expect("no poisoned lock")
        .into_iter()
        .map(|r| r.expect("every job ran"))
        .collect::<Result<_>>()?;
    let series: Vec<plot::RewardSeries> = algos
        .iter()
        .map(|&a| plot::RewardSeries {
            label: a.name().into(),
            runs: results
                .iter()
                .filter(|r| r.algo == a)
                .map(|r| r.rewards.clone())
                .collect(),
        })
        .collect();
    let names: Vec<&str> = algos.iter().map(|a| a.name()).collect();
    plot::reward_plot(
        &out.join("reward.svg"),
        &format!(
            "Mean reward per step: {}, seeds {seeds:?}",
            names.join(" vs ")
        ),
        &series,
    )?;
    let bands: Vec<plot::BandSeries> = algos
        .iter()
        .map(|&a| {
            let curves: Vec<&Vec<(usize, f64)>> = results
                .iter()
                .filter(|r| r.algo == a)
                .map(|r| &r.eval_curve)
                .collect();
            let len = curves.iter().map(|c| c.len()).min().unwrap_or(0);
            let points = (0..len)
                .map(|i| {
                    let xs: Vec<f64> = curves.iter().map(|c| c[i].1).collect();
                    let m = report::MeanCi::of(&xs);
                    (curves[0][i].0 as f64, m.mean, m.half.unwrap_or(0.0))
                })
                .collect();
            plot::BandSeries {
                label: format!("{} ({} seeds, 95% CI band)", a.name(), curves.len()),
                points,
            }
        })
        .collect();
    plot::accuracy_band_plot(
        &out.join("accuracy.svg"),
        &format!("Held-out accuracy, seeds {seeds:?}"),
        &bands,
    )?;
    let shown = if algos.contains(&Algo::Vppo) {
        Algo::Vppo
    } else {
        algos[0]
    };
    let pooled: Vec<(f32, bool)> = results
        .iter()
        .filter(|r| r.algo == shown)
        .flat_map(|r| r.recent_scores.iter().copied())
        .collect();
    plot::score_histogram(
        &out.join("scores.svg"),
        &format!(
            "{}, {} seeds, last {HISTOGRAM_STEPS} steps",
            shown.name(),
            seeds.len()
        ),
        &pooled,
    )?;
    Ok(results)
}
