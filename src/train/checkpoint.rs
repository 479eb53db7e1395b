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

use crate::error::{Result, VppoError};

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

    /// Rebuilds the generator at the captured position.
    pub fn restore(&self) -> Result<ChaCha8Rng> {
        let bad = || VppoError::Io(format!("checkpoint: malformed rng state {self:?}"));
        if self.seed.len() != 64 {
            return Err(bad());
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos.parse().map_err(|_| bad())?);
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
    /// Writes the checkpoint atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        let text =
            serde_json::to_string(self).map_err(|e| VppoError::Io(format!("checkpoint: {e}")))?;
        std::fs::write(&tmp, text)
            .map_err(|e| VppoError::Io(format!("writing {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| VppoError::Io(format!("writing {}: {e}", path.display())))
    }

    /// Reads a checkpoint.
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| VppoError::Io(format!("reading {}: {e}", path.display())))?;
        let ck: Checkpoint = serde_json::from_str(&text).map_err(|e| {
            VppoError::Io(format!("{} is not a vppo checkpoint: {e}", path.display()))
        })?;
        if ck.version != 1 {
            return Err(VppoError::Io(format!(
                "{}: checkpoint version {} (expected 1)",
                path.display(),
                ck.version
            )));
        }
        if ck.adam_m.len() != ck.params.len() || ck.adam_v.len() != ck.params.len() {
            return Err(VppoError::Io(format!(
                "{}: parameter and optimizer sizes differ",
                path.display()
            )));
        }
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
        std::fs::write(&path, "{not json").unwrap();
        assert!(matches!(Checkpoint::load(&path), Err(VppoError::Io(_))));
    }
}
