//! Sequence parallel VPPO (SPEC section 11): a response may be split into contiguous pieces held by
//! consecutive ranks of a group (token order = rank order, as verl's Ulysses splits sequences). Each
//! rank's batch is its pieces: whole responses, and possibly a first response that continues the
//! previous rank's last one (`continues`), with the same advantage on both sides.
//!
//! Per call, on every rank:
//! 1. pass 1 over the rank's own rows (kernels, or the reference), with its row checks; an error is
//!    this rank's, agreed in round 1 (the data-parallel protocol, [`super::report_failure`]);
//! 2. an all-gather of each rank's layout (N_r, B_r, continues: 3 f64), then of its per-token pass-1
//!    values and advantages, padded to the largest rank (5 max N_r + max B_r f64 per rank: score,
//!    entropy, logp, old_logp, ref_logp; advantages), and of its pieces' boundaries (max B_r + 1);
//! 3. every rank joins the pieces into the group's batch and runs pass 2 on it in f64 (the
//!    reference's mask, Sbar, alpha and loss, O(N + B)): the mask of a split response is exactly that
//!    of the unsplit one (the same per-row scores, ties to the lower global index), its Sbar and k
//!    are the whole response's, and Z and B' are the group's. The rank keeps its own tokens' mask and
//!    dloss/dlogp; the loss and statistics returned are the whole group's, the same on every rank.
//!
//! SPEC 11 sketches a cheaper exchange for the mask (the radix select's digit histograms summed
//! across ranks, for the split responses only); this gathers the per-token values of the group
//! instead (5 f64 per token), which is simpler and exact. The backward is the ordinary one from the
//! returned output ([`Vppo::backward_sequence_parallel`]): the rows are the rank's own.
//!
//! With vocabulary shards of the pieces ([`Vppo::forward_vocab_sequence_parallel`]), step 1 is the
//! vocabulary group's merged pass 1 (src/parallel/vocab.rs: its rounds and gathers over the ranks
//! holding the same pieces), whose per-token values are the same bits on each of them; steps 2 and
//! 3 then run over the sequence group of the ranks holding the same columns, and a data group, if
//! any, reduces pass 2's scalars last. A failure is reported to each group whose first round the
//! rank has not passed, in that order (vocabulary, sequence, data).
//! Tests: tests/sequence_parallel.rs, tests/combined_parallel.rs.

use super::{report_failure, round_one, Collective};
use crate::api::Vppo;
use crate::batch::Batch;
use crate::config::{KlPenalty, VppoConfig};
use crate::device::Device;
use crate::error::{Result, Tensor, VppoError};
use crate::output::{ResponseOutputs, TokenOutputs, VppoOutput};
use crate::reference::PerceptionF64;
use crate::tensor::GradMut;

/// This rank's pass-1 values: the outputs, and the f64 score, entropy and logp pass 2 reads.
struct Local {
    tokens: TokenOutputs,
    score: Vec<f64>,
    entropy: Vec<f64>,
    logp: Vec<f64>,
}

impl Local {
    /// The f64 pass-1 values of a piece (the reference's, or a vocabulary group's merged rows).
    fn of(p: PerceptionF64) -> Local {
        Local {
            tokens: crate::reference::token_outputs(&p),
            score: p.score,
            entropy: p.entropy,
            logp: p.logp,
        }
    }
}

fn pass1(vppo: &Vppo, piece: &Batch) -> Result<Local> {
    super::refuse_full_kl(vppo.config(), "sequence parallel")?;
    // A rank's pieces need not be whole groups (the group's batch is checked for that in pass 2).
    let cfg = &VppoConfig {
        group_size: 1,
        ..vppo.config().clone()
    };
    let valid = piece.validate(cfg)?;
    let widen = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    match vppo.device() {
        Device::Reference => Ok(Local::of(crate::reference::perception::perception(
            piece, cfg,
        )?)),
        _ if piece.n_tokens() == 0 => Ok(Local {
            tokens: TokenOutputs::default(),
            score: Vec::new(),
            entropy: Vec::new(),
            logp: Vec::new(),
        }),
        device => {
            if cfg.temperature < 1.0 {
                crate::reference::perception::check_rows(piece, cfg)?;
            }
            let tokens = crate::exec::perception(&valid, device)?;
            let (score, entropy, logp) = (
                widen(&tokens.score),
                widen(&tokens.entropy),
                widen(&tokens.logp),
            );
            Ok(Local {
                tokens,
                score,
                entropy,
                logp,
            })
        }
    }
}

/// [`pass1`] on pieces in GPU memory (`small`: their O(N + B) tensors, copied back): the perception
/// kernel alone, its per-token values copied back.
fn pass1_device(
    vppo: &Vppo,
    gpu: &std::sync::Arc<crate::cuda::Gpu>,
    piece: &crate::exec::DeviceBatch,
    small: &crate::exec::SmallHost,
) -> Result<Local> {
    super::refuse_full_kl(vppo.config(), "sequence parallel")?;
    // A rank's pieces need not be whole groups (the group's batch is checked for that in pass 2).
    let cfg = &VppoConfig {
        group_size: 1,
        ..vppo.config().clone()
    };
    let tokens = crate::exec::perception_device(gpu, piece, small, cfg)?;
    let widen = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let (score, entropy, logp) = (
        widen(&tokens.score),
        widen(&tokens.entropy),
        widen(&tokens.logp),
    );
    Ok(Local {
        tokens,
        score,
        entropy,
        logp,
    })
}

/// A layout error every rank finds alike (from gathered values).
fn layout_error(detail: String) -> VppoError {
    VppoError::Shape {
        tensor: Tensor::CuSeqlens,
        detail,
    }
}

impl Vppo {
    /// The forward of this rank of a sequence-parallel group (module docs). `piece` is this rank's
    /// batch (its rows of the responses it holds, their targets, old_logp, one advantage per piece
    /// and cu_seqlens over its pieces); `continues` says that its first response is the rest of the
    /// previous rank's last one. The returned mask and dloss/dlogp are this rank's tokens', equal to
    /// those of the unsplit batch (the mask exactly); Sbar, k and alpha of each piece are its whole
    /// response's; the loss and statistics are the group's, the same on every rank.
    pub fn forward_sequence_parallel(
        &self,
        piece: &Batch,
        continues: bool,
        group: &dyn Collective,
    ) -> Result<VppoOutput> {
        self.join_pieces(pass1(self, piece), piece, continues, group, None)
    }

    /// Sequence parallel inside data parallel (SPEC 11, the layouts combined): `group` is this
    /// rank's sequence group, `data` its data group (one rank of each sequence group). Pass 2 runs
    /// under the data group's Z, B', Sbar range and beta_max, so the sum over the data group of the
    /// losses is the loss of all the sequence groups' batches together. An error anywhere is an
    /// error on every rank of both groups.
    pub fn forward_sequence_data_parallel(
        &self,
        piece: &Batch,
        continues: bool,
        group: &dyn Collective,
        data: &dyn Collective,
    ) -> Result<VppoOutput> {
        self.join_then_data(pass1(self, piece), piece, continues, group, Some(data))
    }

    /// Vocabulary parallel inside sequence parallel, optionally inside data parallel (SPEC 11, the
    /// layouts combined): `shard` holds this rank's pieces (as [`Vppo::forward_sequence_parallel`]'s
    /// `piece`) and of their logits rows the columns [at.start, at.start + shard.vocab) (as
    /// [`Vppo::forward_vocab_parallel`]'s shard). `vocab` is the group of the ranks holding the
    /// same pieces (all the columns), `seq` that of the ranks holding the same columns of the
    /// other pieces of this group's responses, in token order, and `data`, if any, that of the
    /// ranks at this position of the other data replicas.
    ///
    /// The vocabulary group merges its shards' states (the per-token values of the pieces, the
    /// same bits on each of its ranks), then the sequence group joins the pieces and runs pass 2
    /// (under the data group's Z, B', Sbar range and beta_max with `data`). The outputs are
    /// [`Vppo::forward_sequence_parallel`]'s (this rank's tokens, its pieces' whole responses, the
    /// sequence group's loss), the same on every rank of the vocabulary group; the backward is
    /// [`Vppo::backward_vocab_parallel`] (this rank's rows and columns). An error on any rank is an
    /// error on every rank of every group.
    pub fn forward_vocab_sequence_parallel(
        &self,
        shard: &Batch,
        at: super::VocabShard,
        continues: bool,
        vocab: &dyn Collective,
        seq: &dyn Collective,
        data: Option<&dyn Collective>,
    ) -> Result<VppoOutput> {
        // A rank's pieces need not be whole groups of G responses (the sequence group's batch is
        // checked for that in pass 2), so the vocabulary stage checks them with G = 1.
        let pieces_cfg = VppoConfig {
            group_size: 1,
            ..self.config().clone()
        };
        let local = match Vppo::new(pieces_cfg, self.device()) {
            Ok(v) => v.vocab_perception(shard, at, vocab).map(Local::of),
            Err(e) => report_failure(vocab).and(Err(e)),
        };
        self.join_then_data(local, shard, continues, seq, data)
    }

    /// [`Vppo::forward_sequence_parallel`] (with `data`: [`Vppo::forward_sequence_data_parallel`])
    /// on pieces in GPU memory ([`Vppo::forward_device`]'s batch): pass 1 on the GPU, its per-token
    /// values and the O(N + B) tensors copied back, then the same gathers and host pass 2, so the
    /// outputs are the host path's bits on the same GPU. The backward is
    /// [`Vppo::backward_saved_device`] from the output's lse and dlogp (the rank's own rows).
    pub fn forward_device_sequence_parallel(
        &self,
        piece: &crate::exec::DeviceBatch,
        continues: bool,
        group: &dyn Collective,
        data: Option<&dyn Collective>,
    ) -> Result<VppoOutput> {
        let small = self.gpu().and_then(|gpu| {
            let small = crate::exec::device_small_tensors(&gpu, piece)?;
            Ok((gpu, small))
        });
        let (local, small) = match small {
            Ok((gpu, small)) => (pass1_device(self, &gpu, piece, &small), Some(small)),
            Err(e) => (Err(e), None),
        };
        let batch = small
            .as_ref()
            .map(|s| s.batch(piece.vocab))
            .unwrap_or_default();
        self.join_then_data(local, &batch, continues, group, data)
    }

    /// [`Vppo::forward_vocab_sequence_parallel`] on a shard of pieces in GPU memory: the
    /// vocabulary group's merged pass 1 from states computed on the GPU
    /// ([`Vppo::forward_device_vocab_parallel`]'s), then the sequence group's gathers and host
    /// pass 2, under the data group's values with `data`. The outputs are the host path's bits on
    /// the same GPU; the backward is [`Vppo::backward_saved_device_vocab_parallel`].
    pub fn forward_device_vocab_sequence_parallel(
        &self,
        shard: &crate::exec::DeviceBatch,
        at: super::VocabShard,
        continues: bool,
        vocab: &dyn Collective,
        seq: &dyn Collective,
        data: Option<&dyn Collective>,
    ) -> Result<VppoOutput> {
        let pieces_cfg = VppoConfig {
            group_size: 1,
            ..self.config().clone()
        };
        let local = match Vppo::new(pieces_cfg, self.device()) {
            Ok(v) => v.vocab_perception_device(shard, at, vocab),
            Err(e) => report_failure(vocab).and(Err(e)),
        };
        let (local, small) = match local {
            Ok((p, small)) => (Ok(Local::of(p)), Some(small)),
            Err(e) => (Err(e), None),
        };
        let batch = small
            .as_ref()
            .map(|s| s.batch(shard.vocab))
            .unwrap_or_default();
        self.join_then_data(local, &batch, continues, seq, data)
    }

    /// [`Vppo::join_pieces`], then, where it failed before the data group's first round, that
    /// failure reported to the data group.
    fn join_then_data(
        &self,
        local: Result<Local>,
        piece: &Batch,
        continues: bool,
        group: &dyn Collective,
        data: Option<&dyn Collective>,
    ) -> Result<VppoOutput> {
        let mut reached = false;
        let result = self.join_pieces(
            local,
            piece,
            continues,
            group,
            data.map(|d| (d, &mut reached)),
        );
        match data {
            Some(d) if result.is_err() && !reached => {
                report_failure(d)?;
                result
            }
            _ => result,
        }
    }

    /// Steps 2 and 3 of the module docs on this rank's pass-1 values `local` (or its error, which
    /// this rank then reports to `group`).
    fn join_pieces(
        &self,
        local: Result<Local>,
        piece: &Batch,
        continues: bool,
        group: &dyn Collective,
        data: Option<(&dyn Collective, &mut bool)>,
    ) -> Result<VppoOutput> {
        let cfg = self.config();
        let local = match local {
            Ok(l) => l,
            Err(e) => {
                report_failure(group)?;
                return Err(e);
            }
        };
        // Round 1, as data parallel: failures, and the config agrees.
        round_one(
            cfg,
            group,
            [0.0, 0.0],
            [f64::NEG_INFINITY, f64::NEG_INFINITY],
        )?;

        // The layout of every rank, then the padded per-token values.
        let (n, b) = (piece.n_tokens(), piece.n_responses());
        let layout = group.all_gather(&[n as f64, b as f64, continues as u8 as f64])?;
        let ranks: Vec<(usize, usize, bool)> = layout
            .chunks_exact(3)
            .map(|x| (x[0] as usize, x[1] as usize, x[2] != 0.0))
            .collect();
        let n_max = ranks.iter().map(|r| r.0).max().unwrap_or(0);
        let b_max = ranks.iter().map(|r| r.1).max().unwrap_or(0);
        let mut mine = vec![0.0; 5 * n_max + b_max];
        for t in 0..n {
            mine[t] = local.score[t];
            mine[n_max + t] = local.entropy[t];
            mine[2 * n_max + t] = local.logp[t];
            mine[3 * n_max + t] = piece.old_logp[t] as f64;
            mine[4 * n_max + t] = piece.ref_logp.map_or(0.0, |r| r[t] as f64);
        }
        for (i, &a) in piece.advantages.iter().enumerate() {
            mine[5 * n_max + i] = a as f64;
        }
        let all = group.all_gather(&mine)?;
        let stride = mine.len();

        // The group's batch: pieces joined where a rank continues the previous one.
        let mut cu = vec![0i32];
        let (mut score, mut entropy, mut logp) = (vec![], vec![], vec![]);
        let (mut old_logp, mut ref_logp) = (vec![], vec![]);
        let mut advantages: Vec<f32> = Vec::new();
        // for this rank: its first token's index and the group response of each of its pieces
        let (mut my_start, mut my_responses) = (0usize, Vec::new());
        for (r, &(n_r, b_r, cont)) in ranks.iter().enumerate() {
            let x = &all[r * stride..(r + 1) * stride];
            if r == group.rank() {
                my_start = score.len();
            }
            score.extend_from_slice(&x[..n_r]);
            entropy.extend_from_slice(&x[n_max..n_max + n_r]);
            logp.extend_from_slice(&x[2 * n_max..2 * n_max + n_r]);
            old_logp.extend(x[3 * n_max..3 * n_max + n_r].iter().map(|&v| v as f32));
            ref_logp.extend(x[4 * n_max..4 * n_max + n_r].iter().map(|&v| v as f32));
            if cont && (r == 0 || b_r == 0 || ranks[r - 1].1 == 0) {
                return Err(layout_error(format!(
                    "rank {r} continues the previous rank's last response, but {}",
                    if r == 0 {
                        "it is the first rank".to_string()
                    } else if b_r == 0 {
                        "it holds no response".to_string()
                    } else {
                        format!("rank {} holds no response", r - 1)
                    }
                )));
            }
            let adv = &x[5 * n_max..5 * n_max + b_r];
            if cont {
                let prev = *advantages.last().unwrap_or(&0.0);
                if prev.to_bits() != (adv[0] as f32).to_bits() {
                    return Err(VppoError::Shape {
                        tensor: Tensor::Advantages,
                        detail: format!(
                            "rank {r} continues a response whose advantage is {prev} on rank {} \
                             and {} here: the pieces of a response share one advantage",
                            r - 1,
                            adv[0]
                        ),
                    });
                }
            }
            // the group's response of each piece: a continuing first piece is the previous one's
            let first = advantages.len() - cont as usize;
            if r == group.rank() {
                my_responses = (first..first + b_r).collect();
            }
            advantages.extend(adv.iter().skip(cont as usize).map(|&v| v as f32));
        }
        // Piece lengths of every rank (a second small gather: B_max + 1 boundaries per rank).
        let mut bounds = vec![0.0; b_max + 1];
        for (i, &c) in piece.cu_seqlens.iter().enumerate() {
            bounds[i] = c as f64;
        }
        let all_bounds = group.all_gather(&bounds)?;
        let mut total = 0i32;
        for (r, &(_, b_r, cont)) in ranks.iter().enumerate() {
            let c = &all_bounds[r * (b_max + 1)..(r + 1) * (b_max + 1)];
            for i in 0..b_r {
                let len = (c[i + 1] - c[i]) as i32;
                total += len;
                if i == 0 && cont {
                    *cu.last_mut().unwrap_or(&mut 0) = total;
                } else {
                    cu.push(total);
                }
            }
        }

        let cfg = self.config();
        let perception = PerceptionF64 {
            score,
            entropy,
            logp,
            ..Default::default()
        };
        // Pass 2 reads old_logp, advantages and cu_seqlens only (each stage checks its inputs).
        let group_batch = Batch {
            old_logp: &old_logp,
            advantages: &advantages,
            cu_seqlens: &cu,
            ref_logp: (cfg.kl_penalty != KlPenalty::None).then_some(&ref_logp[..]),
            ..Default::default()
        };
        let data = data.map(|(d, reached)| {
            *reached = true;
            d
        });
        let f = super::pass2_across(perception, &group_batch, cfg, data)?;
        let t0 = my_start;
        let tokens = TokenOutputs {
            mask: f.mask[t0..t0 + n].to_vec(),
            dlogp: f.surrogate.dlogp[t0..t0 + n]
                .iter()
                .map(|&x| x as f32)
                .collect(),
            ..local.tokens
        };
        let out = VppoOutput {
            loss: f.surrogate.loss,
            pg_loss: f.surrogate.pg_loss,
            kl_loss: f.surrogate.kl_loss,
            token_normalizer: f.surrogate.token_normalizer,
            tokens,
            responses: ResponseOutputs {
                sbar: my_responses.iter().map(|&g| f.sbar[g] as f32).collect(),
                k: my_responses.iter().map(|&g| f.k[g]).collect(),
                alpha: my_responses.iter().map(|&g| f.alpha[g] as f32).collect(),
            },
            stats: f.surrogate.stats,
        };
        out.check_finite()?;
        Ok(out)
    }

    /// dloss/dlogits of this rank's rows from its [`Vppo::forward_sequence_parallel`] output (the
    /// backward of [`Vppo::backward_saved`] on the rank's targets, lse and dloss/dlogp): no collective.
    pub fn backward_sequence_parallel(
        &self,
        piece: &Batch,
        out: &VppoOutput,
        grad: GradMut,
    ) -> Result<()> {
        out.check_for_backward(piece.n_tokens(), Some(piece.n_responses()))?;
        let saved = crate::exec::SavedForward {
            targets: piece.targets,
            lse: &out.tokens.lse,
            dlogp: &out.tokens.dlogp,
            rows: piece.rows,
        };
        self.backward_saved(Some(piece.logits), piece.vocab, &saved, grad)
    }
}
