//! The statistics of `vppo train --compare`: per algorithm, the held-out accuracy at the end with its
//! 95% confidence interval over seeds (Student t), the paired difference to DAPO (same seeds, same base
//! model, same held-out problems), the steps to reach a threshold accuracy, the mean score of answer,
//! read and other tokens (the paper's finding 1) and the spread of Sbar across responses (finding 2).

use serde::Serialize;

/// The 0.975 quantile of Student's t with `df` degrees of freedom (df >= 1): a table to df = 30
/// (3 decimals), then the Cornish-Fisher expansion around the normal quantile (within 1e-3 there).
pub fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        _ => {
            let z: f64 = 1.959964;
            let n = df as f64;
            z + (z.powi(3) + z) / (4.0 * n)
                + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * n * n)
        }
    }
}

/// A mean over seeds and the half-width of its 95% t interval (`None` with fewer than two values).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanCi {
    /// The mean.
    pub mean: f64,
    /// Half-width of the 95% confidence interval; `None` for one value.
    pub half: Option<f64>,
    /// Number of values.
    pub n: usize,
}

impl MeanCi {
    /// Of `xs` (which must not be empty).
    pub fn of(xs: &[f64]) -> MeanCi {
        let n = xs.len();
        let mean = xs.iter().sum::<f64>() / n.max(1) as f64;
        let half = (n >= 2).then(|| {
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            t975(n - 1) * (var / n as f64).sqrt()
        });
        MeanCi { mean, half, n }
    }

    /// `0.712 ± 0.034`, or the mean alone.
    pub fn show(&self) -> String {
        match self.half {
            Some(h) => format!("{:.3} ± {:.3}", self.mean, h),
            None => format!("{:.3}", self.mean),
        }
    }

    /// Whether the interval lies entirely above zero.
    pub fn above_zero(&self) -> bool {
        self.half.is_some_and(|h| self.mean - h > 0.0)
    }

    /// Whether the interval lies entirely below zero.
    pub fn below_zero(&self) -> bool {
        self.half.is_some_and(|h| self.mean + h < 0.0)
    }
}

/// The first step of `curve` (step, accuracy) whose accuracy is at least `threshold`.
pub fn steps_to(curve: &[(usize, f64)], threshold: f64) -> Option<usize> {
    curve.iter().find(|p| p.1 >= threshold).map(|p| p.0)
}

/// What one run contributes to its algorithm's row.
#[derive(Debug, Clone)]
pub struct RunStats {
    /// Seed.
    pub seed: u64,
    /// Held-out accuracy at the end.
    pub eval_acc: f64,
    /// (step, held-out accuracy), step 0 the base model.
    pub curve: Vec<(usize, f64)>,
    /// Mean over the run's steps of the mean score of answer tokens.
    pub score_answer: f64,
    /// The same for the chain's read colours.
    pub score_read: f64,
    /// The same for all other tokens (template words and fillers).
    pub score_nonvisual: f64,
    /// Mean over the run's steps of std(Sbar) / mean(Sbar) across responses.
    pub sbar_cv: f64,
}

/// One algorithm's row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Algorithm name.
    pub algo: String,
    /// Held-out accuracy at the end over seeds.
    pub eval_acc: MeanCi,
    /// The paired difference eval_acc - DAPO's eval_acc over the seeds both ran (None for DAPO itself or
    /// without DAPO).
    pub minus_dapo: Option<MeanCi>,
    /// Steps to reach the threshold, per seed in seed order (None: not reached).
    pub steps_to_threshold: Vec<Option<usize>>,
    /// Mean score of answer tokens.
    pub score_answer: f64,
    /// Mean score of read tokens.
    pub score_read: f64,
    /// Mean score of the other tokens.
    pub score_nonvisual: f64,
    /// Spread of Sbar across responses.
    pub sbar_cv: f64,
}

/// The rows, one per algorithm in the given order; `runs[i]` are algorithm i's runs in seed order.
pub fn rows(names: &[&str], runs: &[Vec<RunStats>], threshold: f64) -> Vec<Row> {
    let dapo = names.iter().position(|&n| n == "dapo");
    names
        .iter()
        .zip(runs)
        .enumerate()
        .map(|(i, (name, rs))| {
            let mean = |f: &dyn Fn(&RunStats) -> f64| {
                rs.iter().map(f).sum::<f64>() / rs.len().max(1) as f64
            };
            let minus_dapo = dapo.filter(|&d| d != i).and_then(|d| {
                let diffs: Vec<f64> = rs
                    .iter()
                    .filter_map(|r| {
                        runs[d]
                            .iter()
                            .find(|x| x.seed == r.seed)
                            .map(|x| r.eval_acc - x.eval_acc)
                    })
                    .collect();
                (!diffs.is_empty()).then(|| MeanCi::of(&diffs))
            });
            Row {
                algo: name.to_string(),
                eval_acc: MeanCi::of(&rs.iter().map(|r| r.eval_acc).collect::<Vec<_>>()),
                minus_dapo,
                steps_to_threshold: rs.iter().map(|r| steps_to(&r.curve, threshold)).collect(),
                score_answer: mean(&|r| r.score_answer),
                score_read: mean(&|r| r.score_read),
                score_nonvisual: mean(&|r| r.score_nonvisual),
                sbar_cv: mean(&|r| r.sbar_cv),
            }
        })
        .collect()
}

/// The table as Markdown.
pub fn markdown(rows: &[Row], threshold: f64) -> String {
    let mut s = format!(
        "| algorithm | held-out accuracy (95% CI) | minus DAPO, paired (95% CI) | steps to {threshold} (per seed) | score: answer / read / other | Sbar spread (sd/mean) |\n| --- | --- | --- | --- | --- | --- |\n"
    );
    for r in rows {
        let steps: Vec<String> = r
            .steps_to_threshold
            .iter()
            .map(|s| s.map_or("-".into(), |x| x.to_string()))
            .collect();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} / {:.3} / {:.4} | {:.2} |\n",
            r.algo,
            r.eval_acc.show(),
            r.minus_dapo.map_or("".into(), |d| d.show()),
            steps.join(", "),
            r.score_answer,
            r.score_read,
            r.score_nonvisual,
            r.sbar_cv
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_interval_matches_hand_computation() {
        // 1, 2, 3: mean 2, sd 1, half-width t(2) / sqrt(3).
        let m = MeanCi::of(&[1.0, 2.0, 3.0]);
        assert_eq!(m.mean, 2.0);
        assert!((m.half.unwrap() - 4.303 / 3f64.sqrt()).abs() < 1e-12);
        assert!(!m.above_zero() && !m.below_zero(), "2 +- 2.48 holds 0");
        let m = MeanCi::of(&[2.9, 3.0, 3.1]);
        assert!(m.above_zero() && !m.below_zero());
        assert_eq!(MeanCi::of(&[0.5]).half, None);
        assert!((t975(40) - 2.021).abs() < 1e-3 && (t975(100) - 1.984).abs() < 1e-3);
        assert!(t975(30) > t975(31) && t975(31) > 1.96);
    }

    #[test]
    fn steps_and_rows() {
        let c = vec![(0, 0.1), (10, 0.4), (20, 0.6), (30, 0.5)];
        assert_eq!(steps_to(&c, 0.5), Some(20));
        assert_eq!(steps_to(&c, 0.9), None);
        let run = |seed, acc| RunStats {
            seed,
            eval_acc: acc,
            curve: c.clone(),
            score_answer: 0.5,
            score_read: 0.2,
            score_nonvisual: 0.01,
            sbar_cv: 1.0,
        };
        let rows = rows(
            &["dapo", "vppo"],
            &[
                vec![run(1, 0.5), run(2, 0.6)],
                vec![run(1, 0.6), run(2, 0.8)],
            ],
            0.5,
        );
        assert!(rows[0].minus_dapo.is_none());
        let d = rows[1].minus_dapo.unwrap();
        assert!((d.mean - 0.15).abs() < 1e-12 && d.n == 2);
        assert_eq!(rows[1].steps_to_threshold, vec![Some(20), Some(20)]);
        let md = markdown(&rows, 0.5);
        assert!(
            md.contains("| vppo | 0.700 ± ") && md.contains("20, 20"),
            "{md}"
        );
    }
}
