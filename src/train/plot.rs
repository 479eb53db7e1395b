//! SVG pictures of a run, drawn with plotters: mean reward against step, and a histogram of the
//! per-token visual-dependency scores.

use std::path::Path;

use plotters::prelude::*;

use super::error::{Result, TrainError};

fn io<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> TrainError + '_ {
    move |e| TrainError::Io {
        path: path.to_path_buf(),
        detail: format!("drawing: {e:?}"),
    }
}

/// Refuses a value that is not finite before it reaches plotters (whose axis code loops forever on
/// an infinite coordinate): `what` names it.
fn finite(path: &Path, what: impl FnOnce() -> String, x: f64) -> Result<()> {
    if x.is_finite() {
        return Ok(());
    }
    Err(TrainError::Io {
        path: path.to_path_buf(),
        detail: format!("not drawn: {} is {x}, not a finite number", what()),
    })
}

/// Colour of series `i` (a fixed palette, so an algorithm keeps its colour across pictures).
fn colour(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; 6] = [
        RGBColor(214, 39, 40),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(140, 86, 75),
    ];
    PALETTE[i % PALETTE.len()]
}

/// Trailing moving average over `window` values (shorter at the start).
pub fn moving_average(x: &[f64], window: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    let mut sum = 0.0;
    for i in 0..x.len() {
        sum += x[i];
        if i >= window {
            sum -= x[i - window];
        }
        out.push(sum / (i + 1).min(window) as f64);
    }
    out
}

/// One algorithm's runs: its name and, per run (seed), the mean reward of each step (step 1 first).
#[derive(Debug, Clone)]
pub struct RewardSeries {
    /// Legend label.
    pub label: String,
    /// Per run, the mean reward at steps 1, 2, ...
    pub runs: Vec<Vec<f64>>,
}

/// Mean reward against step: each run as a thin line, and per series the mean over its runs of the
/// 10-step moving average as a thick line.
pub fn reward_plot(path: &Path, title: &str, series: &[RewardSeries]) -> Result<()> {
    let err = io(path);
    for s in series {
        for (r, run) in s.runs.iter().enumerate() {
            for (t, &x) in run.iter().enumerate() {
                finite(
                    path,
                    || format!("{} run {r}, step {} reward", s.label, t + 1),
                    x,
                )?;
            }
        }
    }
    let steps = series
        .iter()
        .flat_map(|s| s.runs.iter().map(|r| r.len()))
        .max()
        .unwrap_or(0)
        .max(1);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..steps as f64, 0f64..1.0)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("mean reward (accuracy of the samples)")
        .draw()
        .map_err(&err)?;
    for (i, s) in series.iter().enumerate() {
        let c = colour(i);
        for run in &s.runs {
            let pts = run.iter().enumerate().map(|(t, &r)| ((t + 1) as f64, r));
            chart
                .draw_series(LineSeries::new(pts, c.mix(0.25)))
                .map_err(&err)?;
        }
        let smoothed: Vec<Vec<f64>> = s.runs.iter().map(|r| moving_average(r, 10)).collect();
        let len = smoothed.iter().map(|r| r.len()).min().unwrap_or(0);
        let mean = (0..len).map(|t| {
            (
                (t + 1) as f64,
                smoothed.iter().map(|r| r[t]).sum::<f64>() / smoothed.len() as f64,
            )
        });
        let label = if s.runs.len() > 1 {
            format!(
                "{} (mean of {} seeds, 10-step average)",
                s.label,
                s.runs.len()
            )
        } else {
            format!("{} (10-step average)", s.label)
        };
        chart
            .draw_series(LineSeries::new(mean, c.stroke_width(3)))
            .map_err(&err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

/// One algorithm's held-out accuracy curve: (step, mean over seeds, half-width of the 95% interval).
#[derive(Debug, Clone)]
pub struct BandSeries {
    /// Legend label.
    pub label: String,
    /// (step, mean, half-width) at each evaluation.
    pub points: Vec<(f64, f64, f64)>,
}

/// Held-out accuracy against step: per series its mean over seeds as a line and its 95% confidence
/// band (over seeds) as a shaded area.
pub fn accuracy_band_plot(path: &Path, title: &str, series: &[BandSeries]) -> Result<()> {
    let err = io(path);
    let steps = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..steps, 0f64..1.0)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("held-out greedy accuracy")
        .draw()
        .map_err(&err)?;
    for (i, s) in series.iter().enumerate() {
        let c = colour(i);
        let upper = s.points.iter().map(|p| (p.0, (p.1 + p.2).min(1.0)));
        let lower = s.points.iter().rev().map(|p| (p.0, (p.1 - p.2).max(0.0)));
        chart
            .draw_series(std::iter::once(Polygon::new(
                upper.chain(lower).collect::<Vec<_>>(),
                c.mix(0.15).filled(),
            )))
            .map_err(&err)?;
        chart
            .draw_series(LineSeries::new(
                s.points.iter().map(|p| (p.0, p.1)),
                c.stroke_width(3),
            ))
            .map_err(&err)?
            .label(&s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

/// Histogram of token scores, answer tokens and the other tokens side by side in each bin, as a
/// fraction of all tokens.
pub fn score_histogram(path: &Path, title: &str, scores: &[(f32, bool)]) -> Result<()> {
    let err = io(path);
    for (i, s) in scores.iter().enumerate() {
        finite(path, || format!("score {i}"), s.0 as f64)?;
    }
    // Bins over log10(score): visual dependency spans orders of magnitude (most tokens near 0, a few
    // answer tokens near the clamp), which a linear axis squeezes into its first bin. Scores below
    // 10^LOG_MIN, zero included, count in the first bin.
    const LOG_MIN: f64 = -6.0;
    let bins = 30usize;
    let log = |s: f32| (s as f64).max(10f64.powf(LOG_MIN)).log10();
    let hi = scores
        .iter()
        .map(|s| log(s.0))
        .fold(LOG_MIN + 1.0, f64::max)
        + 1e-9;
    let width = (hi - LOG_MIN) / bins as f64;
    let max = scores
        .iter()
        .map(|s| s.0 as f64)
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let n = scores.len().max(1) as f64;
    let mut counts = vec![[0usize; 2]; bins];
    for &(s, answer) in scores {
        let b = (((log(s) - LOG_MIN) / width) as usize).min(bins - 1);
        counts[b][answer as usize] += 1;
    }
    let top = counts
        .iter()
        .flat_map(|c| c.iter())
        .map(|&c| c as f64 / n)
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.1;
    let small = 0.05 * max;
    let frac_small = scores.iter().filter(|s| (s.0 as f64) < small).count() as f64 / n;
    let n_answer = scores.iter().filter(|s| s.1).count() as f64;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let caption = format!(
        "{title}: {:.0}% of {} tokens score below {:.3}",
        100.0 * frac_small,
        scores.len(),
        small
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(LOG_MIN..hi, 0f64..top)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("log10 of the token score = KL(policy(image) || policy(masked image)), clamped")
        .y_desc("fraction of tokens")
        .draw()
        .map_err(&err)?;
    for (kind, label) in [
        (0usize, "template / reasoning tokens"),
        (1, "answer tokens"),
    ] {
        let c = colour(kind + 1);
        let share = if kind == 1 {
            n_answer / n
        } else {
            1.0 - n_answer / n
        };
        chart
            .draw_series(counts.iter().enumerate().map(|(b, cnt)| {
                let x0 = LOG_MIN + b as f64 * width + kind as f64 * width / 2.0;
                Rectangle::new(
                    [(x0, 0.0), (x0 + width / 2.0, cnt[kind] as f64 / n)],
                    c.filled(),
                )
            }))
            .map_err(&err)?
            .label(format!("{label} ({:.0}% of tokens)", 100.0 * share))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_average_is_trailing() {
        assert_eq!(
            moving_average(&[1.0, 3.0, 5.0, 7.0], 2),
            vec![1.0, 2.0, 4.0, 6.0]
        );
    }

    #[test]
    fn pictures_are_svg_files() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().join("reward.svg");
        let series = vec![
            RewardSeries {
                label: "vppo".into(),
                runs: vec![vec![0.2, 0.4, 0.5], vec![0.3, 0.3, 0.6]],
            },
            RewardSeries {
                label: "dapo".into(),
                runs: vec![vec![0.2, 0.3, 0.4]],
            },
        ];
        reward_plot(&r, "reward", &series).unwrap();
        let text = std::fs::read_to_string(&r).unwrap();
        assert!(text.starts_with("<svg") && text.contains("vppo") && text.contains("polyline"));
        let h = dir.path().join("scores.svg");
        score_histogram(&h, "scores", &[(0.0, false), (0.01, false), (2.0, true)]).unwrap();
        let text = std::fs::read_to_string(&h).unwrap();
        assert!(text.contains("answer tokens") && text.contains("rect"));
        let b = dir.path().join("accuracy.svg");
        let band = BandSeries {
            label: "vppo".into(),
            points: vec![(0.0, 0.2, 0.05), (10.0, 0.5, 0.1)],
        };
        accuracy_band_plot(&b, "accuracy", &[band]).unwrap();
        let text = std::fs::read_to_string(&b).unwrap();
        assert!(
            text.contains("polygon") && text.contains("vppo"),
            "band and legend"
        );
        // An empty run still draws (nothing to show is not an error).
        score_histogram(&h, "scores", &[]).unwrap();
        // A non-finite value is an error, not drawn (an infinite score hung plotters).
        for bad in [f32::INFINITY, f32::NAN] {
            let e = score_histogram(&h, "scores", &[(0.1, false), (bad, true)]).unwrap_err();
            assert!(e.to_string().contains("score 1 is"), "{e}");
        }
        let e = reward_plot(
            &r,
            "reward",
            &[RewardSeries {
                label: "vppo".into(),
                runs: vec![vec![0.1, f64::INFINITY]],
            }],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("vppo run 0, step 2 reward is inf"),
            "{e}"
        );
    }
}
