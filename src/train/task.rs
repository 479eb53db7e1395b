//! A synthetic multimodal RLVR task in which only a few tokens of a correct response depend on the image.
//!
//! The "image" is a grid of `rows x cols` cells, each one of `colours` colours, given to the policy as
//! features: one one-hot block of `colours` per cell. A question is three tokens and has one of three kinds:
//!
//! | kind | question | correct response |
//! | --- | --- | --- |
//! | colour-at | `Q_COLOUR CELL_i PAD` | `LOOK CELL_i COLOUR IS <colour> EOS` |
//! | count | `Q_COUNT COLOUR_c PAD` | `COUNT COLOUR_c CELLS NUMBER IS <digit> EOS` |
//! | same | `Q_SAME CELL_i CELL_j` | `COMPARE CELL_i AND CELL_j ANSWER IS <yes/no> EOS` |
//!
//! Every token but the answer is fixed by the question alone (the paper's finding: visual dependency is
//! sparse). The reward is verifiable: 1 when the token right after the first `IS` is the right answer
//! and the response is otherwise the question's template (format and answer), else 0. The masked image I' blackens each cell (all its features 0) with probability 0.5, drawn afresh
//! for every rollout, as the official code blackens 14x14 patches.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The three kinds of question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// Which colour is cell i?
    ColourAt,
    /// How many cells have colour c?
    Count,
    /// Do cells i and j have the same colour?
    Same,
}

impl Kind {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::ColourAt => "colour-at",
            Kind::Count => "count",
            Kind::Same => "same",
        }
    }
}

/// Which task family: the response grammar and the verifier (`--task`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Template responses: every token but the answer is fixed by the question (this file's table).
    #[default]
    Template,
    /// Chains of cell reads with free filler tokens the verifier ignores ([`super::chain`]).
    Chain,
}

impl Family {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Family::Template => "template",
            Family::Chain => "chain",
        }
    }
}

/// The task's sizes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskConfig {
    /// The task family.
    #[serde(default)]
    pub family: Family,
    /// Grid rows.
    pub rows: usize,
    /// Grid columns.
    pub cols: usize,
    /// Number of colours (at least 2).
    pub colours: usize,
    /// Which kinds of question are asked, drawn uniformly.
    pub kinds: Vec<Kind>,
    /// Probability that a cell is blackened in the masked image.
    pub mask_prob: f64,
    /// Chain family: number of distinct filler ("reasoning") words, THINK_0 ..
    #[serde(default)]
    pub fillers: usize,
    /// Chain family: the base model's responses hold 0 ..= this many fillers before `IS`.
    #[serde(default)]
    pub max_fillers: usize,
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            rows: 3,
            cols: 3,
            colours: 3,
            kinds: vec![Kind::ColourAt, Kind::Count, Kind::Same],
            mask_prob: 0.5,
            family: Family::Template,
            fillers: 0,
            max_fillers: 0,
        }
    }
}

impl TaskConfig {
    /// The chain family on a 3x3 grid of 3 colours: 6 filler words, up to 4 in a response.
    pub fn chain() -> Self {
        TaskConfig {
            family: Family::Chain,
            fillers: 6,
            max_fillers: 4,
            ..TaskConfig::default()
        }
    }
}

/// Fixed word tokens, in vocabulary order after the specials.
const WORDS: [&str; 12] = [
    "LOOK", "COLOUR", "IS", "COUNT", "CELLS", "NUMBER", "COMPARE", "AND", "ANSWER", "YES", "NO",
    "EOS",
];

/// Token ids of the task's vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    cells: usize,
    colours: usize,
    /// Chain family only (0 for the template family, whose ids are unchanged by them).
    fillers: usize,
    rows: usize,
}

impl Vocab {
    /// PAD, also the BOS that precedes the first response token.
    pub const PAD: u32 = 0;
    /// Question kind tokens.
    pub const Q_COLOUR: u32 = 1;
    /// See `Q_COLOUR`.
    pub const Q_COUNT: u32 = 2;
    /// See `Q_COLOUR`.
    pub const Q_SAME: u32 = 3;
    const WORDS_AT: u32 = 4;

    /// A word token by name (one of `WORDS`).
    pub fn word(&self, w: &str) -> u32 {
        Self::WORDS_AT + WORDS.iter().position(|&x| x == w).expect("known word") as u32
    }
    /// End of response.
    pub fn eos(&self) -> u32 {
        self.word("EOS")
    }
    /// CELL_i.
    pub fn cell(&self, i: usize) -> u32 {
        Self::WORDS_AT + WORDS.len() as u32 + i as u32
    }
    /// COLOUR_c.
    pub fn colour(&self, c: usize) -> u32 {
        self.cell(self.cells) + c as u32
    }
    /// The digit d, 0 ..= cells.
    pub fn digit(&self, d: usize) -> u32 {
        self.colour(self.colours) + d as u32
    }
    /// The filler word THINK_i (chain family).
    pub fn think(&self, i: usize) -> u32 {
        self.digit(self.cells + 1) + i as u32
    }
    /// Whether `t` is a filler word.
    pub fn is_filler(&self, t: u32) -> bool {
        t >= self.think(0) && t < self.think(self.fillers)
    }
    /// ROW_r (chain family).
    pub fn row(&self, r: usize) -> u32 {
        self.think(self.fillers) + r as u32
    }
    /// CELL_i's index when `t` is a cell token.
    pub fn cell_of(&self, t: u32) -> Option<usize> {
        (t >= self.cell(0) && t < self.cell(self.cells)).then(|| (t - self.cell(0)) as usize)
    }
    /// V.
    pub fn size(&self) -> usize {
        self.row(self.rows) as usize
    }
    /// A readable name of token `t`.
    pub fn name(&self, t: u32) -> String {
        match t {
            0 => "PAD".into(),
            1 => "Q_COLOUR".into(),
            2 => "Q_COUNT".into(),
            3 => "Q_SAME".into(),
            t if t < self.cell(0) => WORDS[(t - Self::WORDS_AT) as usize].into(),
            t if t < self.colour(0) => format!("CELL_{}", t - self.cell(0)),
            t if t < self.digit(0) => format!("COLOUR_{}", t - self.colour(0)),
            t if t < self.think(0) => format!("{}", t - self.digit(0)),
            t if t < self.row(0) => format!("THINK_{}", t - self.think(0)),
            t => format!("ROW_{}", t - self.row(0)),
        }
    }
}

/// One question about one image, with its correct response.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The colour of each cell.
    pub grid: Vec<usize>,
    /// The question kind.
    pub kind: Kind,
    /// The three question tokens.
    pub prompt: [u32; 3],
    /// The correct response, EOS included.
    pub response: Vec<u32>,
    /// Index of the answer token in `response`.
    pub answer_pos: usize,
}

impl Problem {
    /// The right answer token.
    pub fn answer(&self) -> u32 {
        self.response[self.answer_pos]
    }
}

/// The task: its config and vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Sizes.
    pub config: TaskConfig,
    /// Token ids.
    pub vocab: Vocab,
}

impl Task {
    /// Builds the task; the config must have at least one cell, two colours and one kind.
    pub fn new(config: TaskConfig) -> super::error::Result<Task> {
        let bad = |field, value: String, expected| super::error::TrainError::Config {
            field,
            value,
            expected,
        };
        if config.rows * config.cols == 0 || config.rows * config.cols > 64 {
            return Err(bad(
                "grid",
                format!("{}x{}", config.rows, config.cols),
                "1 to 64 cells",
            ));
        }
        if config.colours < 2 || config.colours > 16 {
            return Err(bad(
                "colours",
                config.colours.to_string(),
                "2 to 16 colours",
            ));
        }
        if config.kinds.is_empty() {
            return Err(bad("kinds", "[]".into(), "at least one question kind"));
        }
        if config.kinds.contains(&Kind::Same) && config.rows * config.cols < 2 {
            return Err(bad(
                "kinds",
                "same".into(),
                "two cells or more for same-colour questions",
            ));
        }
        if !(0.0..=1.0).contains(&config.mask_prob) {
            return Err(bad(
                "mask-prob",
                config.mask_prob.to_string(),
                "0 <= p <= 1",
            ));
        }
        let chain = config.family == Family::Chain;
        if chain && config.max_fillers > 0 && config.fillers == 0 {
            return Err(bad(
                "fillers",
                "0".into(),
                "at least one filler word when max_fillers > 0",
            ));
        }
        if config.fillers > 64 || config.max_fillers > 16 {
            return Err(bad(
                "fillers",
                format!("{} words, up to {}", config.fillers, config.max_fillers),
                "at most 64 filler words and 16 fillers",
            ));
        }
        let vocab = Vocab {
            cells: config.rows * config.cols,
            colours: config.colours,
            fillers: if chain { config.fillers } else { 0 },
            rows: if chain { config.rows } else { 0 },
        };
        Ok(Task { config, vocab })
    }

    /// Number of cells.
    pub fn cells(&self) -> usize {
        self.config.rows * self.config.cols
    }

    /// Number of image features (cells x colours).
    pub fn image_dim(&self) -> usize {
        self.cells() * self.config.colours
    }

    /// The longest correct response (same-colour questions), in tokens.
    pub fn max_response_len(&self) -> usize {
        match self.config.family {
            Family::Template => 8,
            Family::Chain => super::chain::max_response_len(self),
        }
    }

    /// Draws a problem.
    pub fn sample(&self, rng: &mut ChaCha8Rng) -> Problem {
        if self.config.family == Family::Chain {
            return super::chain::sample(self, rng);
        }
        let n = self.cells();
        let k = self.config.colours;
        let mut grid: Vec<usize> = (0..n).map(|_| rng.gen_range(0..k)).collect();
        let kind = self.config.kinds[rng.gen_range(0..self.config.kinds.len())];
        let v = &self.vocab;
        let w = |s| v.word(s);
        let (prompt, response) = match kind {
            Kind::ColourAt => {
                let i = rng.gen_range(0..n);
                (
                    [Vocab::Q_COLOUR, v.cell(i), Vocab::PAD],
                    vec![
                        w("LOOK"),
                        v.cell(i),
                        w("COLOUR"),
                        w("IS"),
                        v.colour(grid[i]),
                    ],
                )
            }
            Kind::Count => {
                let c = rng.gen_range(0..k);
                let count = grid.iter().filter(|&&g| g == c).count();
                (
                    [Vocab::Q_COUNT, v.colour(c), Vocab::PAD],
                    vec![
                        w("COUNT"),
                        v.colour(c),
                        w("CELLS"),
                        w("NUMBER"),
                        w("IS"),
                        v.digit(count),
                    ],
                )
            }
            Kind::Same => {
                let i = rng.gen_range(0..n);
                let j = (i + rng.gen_range(1..n)) % n;
                // Half the pairs are made equal, so "no" is not right most of the time.
                if rng.gen_bool(0.5) {
                    grid[j] = grid[i];
                }
                let ans = if grid[i] == grid[j] {
                    w("YES")
                } else {
                    w("NO")
                };
                (
                    [Vocab::Q_SAME, v.cell(i), v.cell(j)],
                    vec![
                        w("COMPARE"),
                        v.cell(i),
                        w("AND"),
                        v.cell(j),
                        w("ANSWER"),
                        w("IS"),
                        ans,
                    ],
                )
            }
        };
        let answer_pos = response.len() - 1;
        let mut response = response;
        response.push(v.eos());
        Problem {
            grid,
            kind,
            prompt,
            response,
            answer_pos,
        }
    }

    /// The answers a question of this kind can have (what the base model is taught to guess among).
    pub fn answer_set(&self, kind: Kind) -> Vec<u32> {
        let v = &self.vocab;
        match kind {
            Kind::ColourAt => (0..self.config.colours).map(|c| v.colour(c)).collect(),
            Kind::Count if self.config.family == Family::Chain => {
                (0..=self.config.cols).map(|d| v.digit(d)).collect()
            }
            Kind::Count => (0..=self.cells()).map(|d| v.digit(d)).collect(),
            Kind::Same => vec![v.word("YES"), v.word("NO")],
        }
    }

    /// The real image's features: one one-hot block of `colours` per cell.
    pub fn image(&self, p: &Problem) -> Vec<f32> {
        let k = self.config.colours;
        let mut x = vec![0.0f32; self.image_dim()];
        for (cell, &c) in p.grid.iter().enumerate() {
            x[cell * k + c] = 1.0;
        }
        x
    }

    /// Number of glimpse features: the features of the (up to two) cells a question names (chain
    /// family: the cell the previous token names, then the question's cells).
    pub fn glimpse_dim(&self) -> usize {
        match self.config.family {
            Family::Template => 2 * self.config.colours,
            Family::Chain => super::chain::glimpse_slots(self) * self.config.colours,
        }
    }

    /// The glimpse of the token that follows `prev`: the features, in `image` (real or masked), of the
    /// cells the question's second and third tokens name, zeros for a slot that names no cell. It is how
    /// the policy attends to the cells a question is about; a count question names none and must read
    /// the whole image. The template family ignores `prev`; the chain family's first slot is the cell
    /// `prev` names (where a read step looks), see [`super::chain::glimpse`].
    pub fn glimpse(&self, prompt: &[u32; 3], prev: u32, image: &[f32]) -> Vec<f32> {
        if self.config.family == Family::Chain {
            return super::chain::glimpse(self, prompt, prev, image);
        }
        let k = self.config.colours;
        let mut g = vec![0.0f32; 2 * k];
        for slot in 0..2 {
            let t = prompt[slot + 1];
            if t >= self.vocab.cell(0) && t < self.vocab.cell(self.cells()) {
                let cell = (t - self.vocab.cell(0)) as usize;
                g[slot * k..(slot + 1) * k].copy_from_slice(&image[cell * k..(cell + 1) * k]);
            }
        }
        g
    }

    /// The masked image I': each cell blackened (features 0) with probability `mask_prob`.
    pub fn masked_image(&self, image: &[f32], rng: &mut ChaCha8Rng) -> Vec<f32> {
        let k = self.config.colours;
        let mut x = image.to_vec();
        for cell in 0..self.cells() {
            if rng.gen_bool(self.config.mask_prob) {
                x[cell * k..(cell + 1) * k]
                    .iter_mut()
                    .for_each(|f| *f = 0.0);
            }
        }
        x
    }

    /// Position of the answer in a sampled response: the token right after the first `IS`.
    pub fn answer_position(&self, response: &[u32]) -> Option<usize> {
        let is = self.vocab.word("IS");
        response
            .iter()
            .position(|&t| t == is)
            .map(|i| i + 1)
            .filter(|&i| i < response.len())
    }

    /// The verifiable reward: 1 when the response is well formed and right: the token after the first
    /// `IS` is the right answer and the rest is the question's template, ending with EOS; else 0.
    /// (A looser check, the answer alone, let the tokens after it drift into noise once the answers were
    /// right, since nothing rewarded stopping: measured, responses grew to the length limit.)
    pub fn reward(&self, p: &Problem, response: &[u32]) -> f32 {
        if self.config.family == Family::Chain {
            return super::chain::reward(self, p, response);
        }
        match self.answer_position(response) {
            Some(i) if response[i] == p.answer() && response == p.response.as_slice() => 1.0,
            _ => 0.0,
        }
    }
}

/// What a response token is, for the score statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenClass {
    /// The token after the first `IS`.
    Answer,
    /// A read colour of the chain family (a colour right after a cell token, before the answer).
    Read,
    /// A filler word (chain family).
    Filler,
    /// Anything else: the question's template.
    Template,
}

impl Task {
    /// The class of `response[i]`, with `answer_at` = [`Task::answer_position`] of the response.
    pub fn token_class(&self, response: &[u32], i: usize, answer_at: Option<usize>) -> TokenClass {
        let v = &self.vocab;
        let t = response[i];
        if answer_at == Some(i) {
            TokenClass::Answer
        } else if v.is_filler(t) {
            TokenClass::Filler
        } else if self.config.family == Family::Chain
            && answer_at.map_or(true, |a| i < a)
            && i > 0
            && v.cell_of(response[i - 1]).is_some()
            && t >= v.colour(0)
            && t < v.colour(self.config.colours)
        {
            TokenClass::Read
        } else {
            TokenClass::Template
        }
    }

    /// A supervised target for the base model's warm-up: the question's response with each
    /// image-dependent token right with probability `skill`, else a uniform guess among its valid values
    /// (template: the answer; chain: every read and the answer, and random fillers, see
    /// [`super::chain::warmup_target`]).
    pub fn warmup_target(&self, p: &Problem, rng: &mut ChaCha8Rng, skill: f64) -> Vec<u32> {
        if self.config.family == Family::Chain {
            return super::chain::warmup_target(self, p, rng, skill);
        }
        let answers = self.answer_set(p.kind);
        let mut target = p.response.clone();
        let guess = answers[rng.gen_range(0..answers.len())];
        if !rng.gen_bool(skill) {
            target[p.answer_pos] = guess;
        }
        target
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn vocabulary_is_dense_and_named() {
        let t = Task::new(TaskConfig::default()).unwrap();
        let v = &t.vocab;
        let names: Vec<String> = (0..v.size() as u32).map(|i| v.name(i)).collect();
        let mut uniq = names.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), names.len(), "{names:?}");
        assert_eq!(v.name(v.digit(9)), "9");
        assert_eq!(v.name(v.cell(8)), "CELL_8");
    }

    #[test]
    fn responses_reward_and_masks() {
        let t = Task::new(TaskConfig::default()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut kinds = std::collections::HashSet::new();
        for _ in 0..300 {
            let p = t.sample(&mut rng);
            kinds.insert(p.kind);
            assert_eq!(t.reward(&p, &p.response), 1.0);
            assert_eq!(t.answer_position(&p.response), Some(p.answer_pos));
            assert!(t.answer_set(p.kind).contains(&p.answer()));
            assert!(p.response.len() <= t.max_response_len());
            let mut wrong = p.response.clone();
            let alt = t
                .answer_set(p.kind)
                .into_iter()
                .find(|&a| a != p.answer())
                .unwrap();
            wrong[p.answer_pos] = alt;
            assert_eq!(t.reward(&p, &wrong), 0.0);
            assert_eq!(t.reward(&p, &p.response[..p.answer_pos]), 0.0);
            assert_eq!(t.reward(&p, &p.response[..p.answer_pos + 1]), 0.0, "no EOS");
            let mut bad_format = p.response.clone();
            bad_format[0] = t.vocab.word("AND");
            assert_eq!(t.reward(&p, &bad_format), 0.0);
            let x = t.image(&p);
            assert_eq!(x.iter().sum::<f32>(), t.cells() as f32);
            let m = t.masked_image(&x, &mut rng);
            for c in 0..t.cells() {
                let block = &m[c * 3..c * 3 + 3];
                assert!(block.iter().all(|&f| f == 0.0) || block == &x[c * 3..c * 3 + 3]);
            }
        }
        assert_eq!(kinds.len(), 3);
    }

    #[test]
    fn bad_configs_are_errors() {
        assert!(Task::new(TaskConfig {
            colours: 1,
            ..Default::default()
        })
        .is_err());
        assert!(Task::new(TaskConfig {
            kinds: vec![],
            ..Default::default()
        })
        .is_err());
        assert!(Task::new(TaskConfig {
            rows: 0,
            ..Default::default()
        })
        .is_err());
    }
}
