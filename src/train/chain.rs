//! The chain task family (`--task chain`): responses that read cells of the image step by step, with
//! free filler ("reasoning") tokens the verifier ignores.
//!
//! The image is the template family's grid ([`super::task`]). A question is three tokens; its response
//! is a chain of reads, one `CELL_x COLOUR_y` pair per cell the question is about, then `IS <answer> EOS`:
//!
//! | kind | question | cells read | correct chain (fillers left out) |
//! | --- | --- | --- | --- |
//! | colour-at | `Q_COLOUR CELL_i PAD` | 1 | `CELL_i COLOUR_a IS COLOUR_a EOS` |
//! | same | `Q_SAME CELL_i CELL_j` | 2 | `CELL_i COLOUR_a CELL_j COLOUR_b IS <yes/no> EOS` |
//! | count | `Q_COUNT COLOUR_c ROW_r` | cols | `CELL_r0 COLOUR_a CELL_r1 COLOUR_b CELL_r2 COLOUR_d IS <digit> EOS` |
//!
//! (count: how many cells of row r have colour c.) Anywhere before `IS` the response may hold any number
//! of filler words `THINK_0 ..`, a free "reasoning" block: the verifier drops them, so which fillers a
//! response holds, and how many, carries no reward signal at all, and the base model is taught a block of
//! 0 ..= max_fillers of them, uniformly at random, between the last read and `IS` (they stay uncertain,
//! and their policy-gradient terms are noise). The block comes after the reads because the policy has no
//! memory: with fillers between reads it could not know, after a filler, which cell to read next. What is rewarded is
//! image-dependent: reward 1 when, fillers removed, the response is exactly the question's chain: every
//! read colour right, the answer right, nothing after `EOS`; else 0. The verifier checks the reads
//! because this policy has no memory (each token sees the question, the image and the previous token
//! only), so a read could not influence the answer as it does in a language model; checking it stands in
//! for that causal link. A count response reads three cells and a colour question one, so responses
//! differ in how much of the response depends on the image (the paper's finding 2), while within a
//! response the few read colours and the answer are the only image-dependent tokens (finding 1).
//!
//! The policy's glimpse (its hard attention) is the cell the previous token names, where a read step
//! looks, followed by the cells the question is about.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::task::{Kind, Problem, Task, Vocab};

/// The cells a question is about, in reading order.
pub fn reads(task: &Task, prompt: &[u32; 3]) -> Vec<usize> {
    let v = &task.vocab;
    let cols = task.config.cols;
    match prompt[0] {
        Vocab::Q_COUNT => {
            let r = (prompt[2] - v.row(0)) as usize;
            (r * cols..(r + 1) * cols).collect()
        }
        _ => prompt[1..].iter().filter_map(|&t| v.cell_of(t)).collect(),
    }
}

/// Glimpse slots: the previous token's cell, then up to max(2, cols) question cells.
pub fn glimpse_slots(task: &Task) -> usize {
    1 + task.config.cols.max(2)
}

/// Slot 0: the features of the cell `prev` names (zeros when it names none); slots 1..: the question's
/// cells in reading order (zeros for unused slots).
pub fn glimpse(task: &Task, prompt: &[u32; 3], prev: u32, image: &[f32]) -> Vec<f32> {
    let k = task.config.colours;
    let mut g = vec![0.0f32; glimpse_slots(task) * k];
    let cells = std::iter::once(task.vocab.cell_of(prev))
        .chain(reads(task, prompt).into_iter().map(Some))
        .enumerate();
    for (slot, cell) in cells {
        if let Some(c) = cell {
            g[slot * k..(slot + 1) * k].copy_from_slice(&image[c * k..(c + 1) * k]);
        }
    }
    g
}

/// The longest response the base model is taught: the longest chain plus `max_fillers` fillers.
pub fn max_response_len(task: &Task) -> usize {
    let most = task
        .config
        .kinds
        .iter()
        .map(|k| match k {
            Kind::ColourAt => 1,
            Kind::Same => 2,
            Kind::Count => task.config.cols,
        })
        .max()
        .unwrap_or(1);
    2 * most + task.config.max_fillers + 3
}

/// Draws a problem; its `response` is the chain without fillers.
pub fn sample(task: &Task, rng: &mut ChaCha8Rng) -> Problem {
    let n = task.cells();
    let k = task.config.colours;
    let v = &task.vocab;
    let mut grid: Vec<usize> = (0..n).map(|_| rng.gen_range(0..k)).collect();
    let kind = task.config.kinds[rng.gen_range(0..task.config.kinds.len())];
    let (prompt, answer) = match kind {
        Kind::ColourAt => {
            let i = rng.gen_range(0..n);
            ([Vocab::Q_COLOUR, v.cell(i), Vocab::PAD], v.colour(grid[i]))
        }
        Kind::Same => {
            let i = rng.gen_range(0..n);
            let j = (i + rng.gen_range(1..n)) % n;
            if rng.gen_bool(0.5) {
                grid[j] = grid[i];
            }
            let ans = if grid[i] == grid[j] { "YES" } else { "NO" };
            ([Vocab::Q_SAME, v.cell(i), v.cell(j)], v.word(ans))
        }
        Kind::Count => {
            let c = rng.gen_range(0..k);
            let r = rng.gen_range(0..task.config.rows);
            let cols = task.config.cols;
            let count = grid[r * cols..(r + 1) * cols]
                .iter()
                .filter(|&&g| g == c)
                .count();
            ([Vocab::Q_COUNT, v.colour(c), v.row(r)], v.digit(count))
        }
    };
    let mut response = Vec::new();
    for cell in reads(task, &prompt) {
        response.push(v.cell(cell));
        response.push(v.colour(grid[cell]));
    }
    response.extend([v.word("IS"), answer, v.eos()]);
    let answer_pos = response.len() - 2;
    Problem {
        grid,
        kind,
        prompt,
        response,
        answer_pos,
    }
}

/// 1 when the response without its fillers is the problem's chain, every filler before `IS`; else 0.
pub fn reward(task: &Task, p: &Problem, response: &[u32]) -> f32 {
    let Some(i) = task.answer_position(response).map(|a| a - 1) else {
        return 0.0;
    };
    let chain_is = p.answer_pos - 1;
    let v = &task.vocab;
    let mut prefix = response[..i].iter().filter(|&&t| !v.is_filler(t));
    let prefix_ok = p.response[..chain_is]
        .iter()
        .all(|t| prefix.next() == Some(t))
        && prefix.next().is_none();
    (prefix_ok && response[i..] == p.response[chain_is..]) as u8 as f32
}

/// A base-model target: each read colour and the answer right with probability `skill`, else a
/// uniform guess among its valid values; between the last read and `IS`, a uniform number in
/// 0 ..= max_fillers of fillers, each a uniform filler word.
pub fn warmup_target(task: &Task, p: &Problem, rng: &mut ChaCha8Rng, skill: f64) -> Vec<u32> {
    let v = &task.vocab;
    let k = task.config.colours;
    let mut out = Vec::with_capacity(task.max_response_len());
    let chain_is = p.answer_pos - 1;
    for pair in p.response[..chain_is].chunks(2) {
        out.push(pair[0]);
        let guess = v.colour(rng.gen_range(0..k));
        out.push(if rng.gen_bool(skill) { pair[1] } else { guess });
    }
    if task.config.fillers > 0 {
        for _ in 0..rng.gen_range(0..=task.config.max_fillers) {
            out.push(v.think(rng.gen_range(0..task.config.fillers)));
        }
    }
    out.push(v.word("IS"));
    let answers = task.answer_set(p.kind);
    let guess = answers[rng.gen_range(0..answers.len())];
    out.push(if rng.gen_bool(skill) {
        p.answer()
    } else {
        guess
    });
    out.push(v.eos());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::task::TaskConfig;
    use rand::SeedableRng;

    fn task() -> Task {
        Task::new(TaskConfig::chain()).unwrap()
    }

    #[test]
    fn chains_read_the_question_cells_and_the_verifier_ignores_fillers() {
        let t = task();
        let v = &t.vocab;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut reads_by_kind = std::collections::HashMap::new();
        for _ in 0..400 {
            let p = sample(&t, &mut rng);
            let cells = reads(&t, &p.prompt);
            reads_by_kind.insert(p.kind, cells.len());
            // The chain: CELL_x COLOUR_(grid x) per read, then IS answer EOS.
            assert_eq!(p.response.len(), 2 * cells.len() + 3);
            for (r, &c) in cells.iter().enumerate() {
                assert_eq!(p.response[2 * r], v.cell(c));
                assert_eq!(p.response[2 * r + 1], v.colour(p.grid[c]));
            }
            assert_eq!(p.response[p.answer_pos - 1], v.word("IS"));
            assert!(t.answer_set(p.kind).contains(&p.answer()));
            assert_eq!(t.reward(&p, &p.response), 1.0);
            assert_eq!(t.answer_position(&p.response), Some(p.answer_pos));
            // Fillers anywhere before IS change nothing.
            let mut filled = p.response.clone();
            filled.insert(p.answer_pos - 1, v.think(5));
            filled.insert(1, v.think(0));
            filled.insert(0, v.think(2));
            assert_eq!(t.reward(&p, &filled), 1.0, "{filled:?}");
            // ... but not after IS.
            let mut late = p.response.clone();
            late.insert(p.answer_pos, v.think(1));
            assert_eq!(t.reward(&p, &late), 0.0);
            // A wrong read is wrong even with the right answer.
            let mut misread = p.response.clone();
            misread[1] = v.colour((p.grid[cells[0]] + 1) % t.config.colours);
            assert_eq!(t.reward(&p, &misread), 0.0);
            // A wrong answer, a missing read, a missing EOS, a trailing token: 0.
            let mut wrong = p.response.clone();
            wrong[p.answer_pos] = t
                .answer_set(p.kind)
                .into_iter()
                .find(|&a| a != p.answer())
                .unwrap();
            assert_eq!(t.reward(&p, &wrong), 0.0);
            assert_eq!(t.reward(&p, &p.response[2..]), 0.0);
            assert_eq!(t.reward(&p, &p.response[..p.response.len() - 1]), 0.0);
            let mut trailing = p.response.clone();
            trailing.push(v.eos());
            assert_eq!(t.reward(&p, &trailing), 0.0);
            // The base model's targets: the chain's tokens in order, fillers in between, fitting max_len.
            let target = t.warmup_target(&p, &mut rng, 1.0);
            assert!(target.len() <= t.max_response_len());
            assert_eq!(t.reward(&p, &target), 1.0, "{target:?}");
            let kept: Vec<u32> = target
                .iter()
                .copied()
                .filter(|&x| !v.is_filler(x))
                .collect();
            assert_eq!(kept, p.response);
        }
        assert_eq!(reads_by_kind[&Kind::ColourAt], 1);
        assert_eq!(reads_by_kind[&Kind::Same], 2);
        assert_eq!(reads_by_kind[&Kind::Count], 3);
    }

    #[test]
    fn warmup_fillers_are_uncertain_and_guesses_are_valid() {
        let t = task();
        let v = &t.vocab;
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut filler_counts = vec![0usize; t.config.fillers];
        let mut lengths = std::collections::HashSet::new();
        let (mut right, mut total) = (0usize, 0usize);
        for _ in 0..500 {
            let p = sample(&t, &mut rng);
            let target = t.warmup_target(&p, &mut rng, 0.3);
            lengths.insert(target.len());
            for &x in &target {
                if v.is_filler(x) {
                    filler_counts[(x - v.think(0)) as usize] += 1;
                }
            }
            let kept: Vec<u32> = target
                .iter()
                .copied()
                .filter(|&x| !v.is_filler(x))
                .collect();
            assert_eq!(kept.len(), p.response.len());
            for (i, (&a, &b)) in kept.iter().zip(&p.response).enumerate() {
                if i % 2 == 1 && i < p.answer_pos - 1 {
                    assert!(a >= v.colour(0) && a < v.colour(t.config.colours));
                } else if i == p.answer_pos {
                    assert!(t.answer_set(p.kind).contains(&a));
                    right += (a == b) as usize;
                    total += 1;
                } else {
                    assert_eq!(a, b, "template tokens of the chain are never guessed");
                }
            }
        }
        // Every filler word is used, about equally; lengths vary; about 30% + guesses right.
        let (lo, hi) = (
            *filler_counts.iter().min().unwrap(),
            *filler_counts.iter().max().unwrap(),
        );
        assert!(lo > 0 && (hi as f64) < 1.5 * lo as f64, "{filler_counts:?}");
        assert!(lengths.len() >= 8, "{lengths:?}");
        let frac = right as f64 / total as f64;
        assert!(frac > 0.35 && frac < 0.75, "{frac}");
    }

    #[test]
    fn glimpse_looks_where_the_previous_token_points() {
        let t = task();
        let v = &t.vocab;
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let p = sample(&t, &mut rng);
        let image = t.image(&p);
        let k = t.config.colours;
        assert_eq!(t.glimpse_dim(), 4 * k);
        let g = t.glimpse(&p.prompt, v.cell(4), &image);
        assert_eq!(&g[..k], &image[4 * k..5 * k]);
        let g0 = t.glimpse(&p.prompt, Vocab::PAD, &image);
        assert!(g0[..k].iter().all(|&x| x == 0.0));
        for (slot, c) in reads(&t, &p.prompt).into_iter().enumerate() {
            assert_eq!(
                &g0[(slot + 1) * k..(slot + 2) * k],
                &image[c * k..(c + 1) * k]
            );
        }
        // The vocabulary: the template ids are unchanged, fillers and rows come after the digits.
        let tt = Task::new(TaskConfig::default()).unwrap();
        assert_eq!(tt.vocab.size(), v.think(0) as usize);
        assert_eq!(v.name(v.think(3)), "THINK_3");
        assert_eq!(v.name(v.row(2)), "ROW_2");
        assert_eq!(v.size(), v.row(3) as usize);
    }
}
