//! Checkpoints: everything a run needs to continue bit-identically after an interruption.
//!
//! A checkpoint is one JSON file holding the configuration it was written with, the step reached, the
//! parameters and the AdamW moments (as the bit patterns of their f32 values, so nothing is lost to
//! decimal printing), the AdamW step count, and the exact position of the run's random stream (ChaCha8:
//! seed, stream and word position). It is written to a temporary file and renamed, so an interruption
//! while writing leaves the previous checkpoint intact.

use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::error::{Result, TrainError};

/// The exact state of a ChaCha8 random stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte seed, hex.
    pub seed: String,
    /// The stream id.
    pub stream: u64,
    /// The word position (a u128, as a decimal string: JSON numbers stop at 2^53).
    pub word_pos: String,
}

impl RngState {
    /// Captures `rng`.
    pub fn of(rng: &ChaCha8Rng) -> RngState {
        let seed = rng.get_seed().iter().map(|b| format!("{b:02x}")).collect();
        RngState {
            seed,
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// Rebuilds the generator at the captured position. The seed must be exactly 64 hex digits
    /// (`0-9`, `a-f`, `A-F`: no sign, no other character, whatever its byte length), the word
    /// position a decimal u128.
    pub fn restore(&self) -> std::result::Result<ChaCha8Rng, String> {
        let bad = |what: &str| format!("malformed rng state ({what}): {self:?}");
        let digits = self.seed.as_bytes();
        if digits.len() != 64 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(bad("the seed is not 64 hex digits"));
        }
        let hex = |c: u8| (c as char).to_digit(16).expect("checked: a hex digit") as u8;
        let mut seed = [0u8; 32];
        for (b, pair) in seed.iter_mut().zip(digits.chunks_exact(2)) {
            *b = hex(pair[0]) << 4 | hex(pair[1]);
        }
        let word_pos: u128 = match self.word_pos.bytes().all(|c| c.is_ascii_digit()) {
            true => self.word_pos.parse().map_err(|_| bad("word_pos"))?,
            false => return Err(bad("word_pos is not a decimal number")),
        };
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(word_pos);
        Ok(rng)
    }
}

/// Everything saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version (1).
    pub version: u32,
    /// The training configuration, as JSON (checked against the resuming run's, `steps` aside).
    pub config: serde_json::Value,
    /// Number of RL steps completed.
    pub step: usize,
    /// Parameters, f32 bit patterns.
    pub params: Vec<u32>,
    /// AdamW first moments, f32 bit patterns.
    pub adam_m: Vec<u32>,
    /// AdamW second moments, f32 bit patterns.
    pub adam_v: Vec<u32>,
    /// AdamW step count.
    pub adam_t: u64,
    /// The run's random stream.
    pub rng: RngState,
    /// Greedy accuracy of the model before RL (kept for the summary).
    pub base_eval_acc: f64,
    /// Scores of the most recent steps' tokens, with whether each is an answer token (for the histogram).
    pub recent_scores: Vec<(f32, bool)>,
}

/// f32 values to their bit patterns.
pub fn to_bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Bit patterns back to f32 values.
pub fn from_bits(x: &[u32]) -> Vec<f32> {
    x.iter().map(|&b| f32::from_bits(b)).collect()
}

impl Checkpoint {
    /// Writes the checkpoint atomically: to a temporary file of a name unique to this process and
    /// call ([`crate::io::temp_path`]), then renamed over `path` (two writers never share one).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self).map_err(|e| TrainError::Checkpoint {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        crate::io::write_atomic(path, text.as_bytes()).map_err(|e| TrainError::Checkpoint {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
    }

    /// Reads a checkpoint and checks it can be resumed from: version 1, parameters and moments of
    /// one length, every parameter, first moment and recent score finite, every second moment
    /// finite and >= 0, and a well-formed rng state. The error names the field and the index.
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let bad = |detail: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let ck: Checkpoint =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a vppo checkpoint: {e}")))?;
        if ck.version != 1 {
            return Err(bad(format!("version {} (expected 1)", ck.version)));
        }
        if ck.adam_m.len() != ck.params.len() || ck.adam_v.len() != ck.params.len() {
            return Err(bad(format!(
                "{} parameters but {} first and {} second moments",
                ck.params.len(),
                ck.adam_m.len(),
                ck.adam_v.len()
            )));
        }
        for (field, bits, non_negative) in [
            ("params", &ck.params, false),
            ("adam_m", &ck.adam_m, false),
            ("adam_v", &ck.adam_v, true),
        ] {
            if let Some((i, x)) = bits
                .iter()
                .map(|&b| f32::from_bits(b))
                .enumerate()
                .find(|(_, x)| !x.is_finite() || (non_negative && *x < 0.0))
            {
                return Err(bad(format!(
                    "{field}[{i}] = {x} is not {}",
                    if non_negative {
                        "finite and >= 0"
                    } else {
                        "finite"
                    }
                )));
            }
        }
        if let Some((i, s)) = ck
            .recent_scores
            .iter()
            .enumerate()
            .find(|(_, s)| !s.0.is_finite())
        {
            return Err(bad(format!("recent_scores[{i}] = {} is not finite", s.0)));
        }
        if !ck.base_eval_acc.is_finite() {
            return Err(bad(format!(
                "base_eval_acc = {} is not finite",
                ck.base_eval_acc
            )));
        }
        ck.rng.restore().map_err(bad)?;
        Ok(ck)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn rng_state_round_trips_mid_stream() {
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        rng.set_stream(3);
        for _ in 0..37 {
            rng.gen::<u32>(); // an odd number of words: mid-block
        }
        let st = RngState::of(&rng);
        let mut back = st.restore().unwrap();
        let a: Vec<u64> = (0..20).map(|_| rng.gen()).collect();
        let b: Vec<u64> = (0..20).map(|_| back.gen()).collect();
        assert_eq!(a, b);
        let mut bad = st.clone();
        bad.seed.truncate(10);
        assert!(bad.restore().is_err());
        // A non-ASCII character (a byte slice through it panicked) and a `+f` pair (from_str_radix
        // took the sign) are errors.
        let mut bad = st.clone();
        bad.seed = format!("{}é{}", &st.seed[..30], &st.seed[32..]);
        assert_eq!(bad.seed.chars().count(), 63);
        assert!(bad.restore().is_err());
        bad.seed = format!("é{}", &st.seed[2..]);
        assert_eq!(bad.seed.len(), 64);
        assert!(bad.restore().is_err());
        bad.seed = format!("+f{}", &st.seed[2..]);
        assert!(bad.restore().is_err());
        let mut bad = st.clone();
        bad.word_pos = "+5".into();
        assert!(bad.restore().is_err());
    }

    #[test]
    fn checkpoint_round_trips_bit_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.json");
        let weird = [0.1f32, -0.0, 1e-42, f32::MAX, 3.0e-8];
        let ck = Checkpoint {
            version: 1,
            config: serde_json::json!({"a": 1}),
            step: 7,
            params: to_bits(&weird),
            adam_m: to_bits(&weird),
            adam_v: to_bits(&weird),
            adam_t: 7,
            rng: RngState::of(&ChaCha8Rng::seed_from_u64(1)),
            base_eval_acc: 0.25,
            recent_scores: vec![(0.5, true)],
        };
        ck.save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back, ck);
        assert_eq!(
            from_bits(&back.params)
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            to_bits(&weird)
        );
        // Non-finite parameters, moments or scores are refused, naming the field and index.
        for (edit, needle) in [
            (
                (|c: &mut Checkpoint| c.params[2] = f32::NAN.to_bits()) as fn(&mut Checkpoint),
                "params[2] = NaN",
            ),
            (|c| c.adam_m[0] = f32::INFINITY.to_bits(), "adam_m[0] = inf"),
            (|c| c.adam_v[1] = (-1.0f32).to_bits(), "adam_v[1] = -1"),
        ] {
            let mut bad = ck.clone();
            edit(&mut bad);
            bad.save(&path).unwrap();
            let e = Checkpoint::load(&path).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        // 1e39 in the JSON reads as +inf: refused on load, never drawn (plotters looped on it).
        let mut text = serde_json::to_string(&ck).unwrap();
        text = text.replace("\"recent_scores\":[[0.5,", "\"recent_scores\":[[1e39,");
        assert!(text.contains("1e39"));
        std::fs::write(&path, &text).unwrap();
        let e = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(e.contains("recent_scores[0] = inf"), "{e}");
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            Checkpoint::load(&path),
            Err(TrainError::Checkpoint { .. })
        ));
    }
}
