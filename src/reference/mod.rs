//! The CPU reference: the oracle every executor is tested against.
//!
//! Every formula of SPEC sections 2 to 6, in f64, for logits in bf16, f16 and f32 (each element is
//! widened exactly to f64). Written for clarity: plain loops, two passes where that is clearer, the
//! formula in a comment over each step. One file per stage, each public with plain slice signatures so
//! a kernel can be tested stage by stage:
//!
//! | stage | function | kernel |
//! | --- | --- | --- |
//! | per token: lse, logp, kl, k3, entropy, score, row checks | [`perception::perception`] | kernels/perception.cu |
//! | per response: top-k mask and k | [`select::topk_mask`] | kernels/select_loss.cu |
//! | per response: Sbar and alpha | [`shaping::sbar`], [`shaping::alpha`] | kernels/select_loss.cu |
//! | loss, dloss/dlogp, statistics | [`surrogate::surrogate`] | kernels/select_loss.cu |
//! | the KL penalty of one token (SPEC section 12) | [`kl::kl_term`], in [`surrogate::surrogate_kl`] | kernels/select_loss.cu |
//! | dloss/dlogits | [`backward::grad_logits`] | kernels/backward.cu |
//! | the KL op (SPEC section 13): KL(p \|\| q) and its gradient to both tensors | [`kl_div::kl_div`], [`kl_div::kl_div_backward`] | kernels/perception.cu (partial mode), kernels/kl_div.cu |
//!
//! The reference selects the top-k on its f64 scores. [`forward`] rounds the per-token and per-response
//! values of [`VppoOutput`] to f32; the loss stays f64. [`backward_into`] recomputes lse and dloss/dlogp
//! in f64 rather than reading the f32 copies of the output, so the gradient is the f64 one rounded once.
//!
//! Every stage function validates its own inputs and returns an error rather than panicking.

pub mod backward;
pub mod kl;
pub mod kl_div;
pub mod perception;
pub mod select;
pub mod shaping;
pub mod surrogate;

pub use perception::PerceptionF64;
pub use surrogate::SurrogateF64;

use crate::batch::Batch;
use crate::config::VppoConfig;
use crate::error::Result;
use crate::output::{ResponseOutputs, TokenOutputs, VppoOutput};
use crate::tensor::GradMut;

/// Every f64 intermediate of one reference evaluation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwardF64 {
    /// Pass 1: per-token values.
    pub perception: PerceptionF64,
    /// The top-k mask `[N]`.
    pub mask: Vec<u8>,
    /// k_b `[B]`.
    pub k: Vec<u32>,
    /// Sbar_b `[B]`.
    pub sbar: Vec<f64>,
    /// alpha_b `[B]`.
    pub alpha: Vec<f64>,
    /// Loss, dloss/dlogp and statistics.
    pub surrogate: SurrogateF64,
    /// The `full` KL penalty's per-token values (SPEC section 12), with that penalty only.
    pub full_kl: Option<kl::FullKlF64>,
}

/// Validates the config and the batch (all of SPEC section 7 that is O(N + B)), then runs every stage
/// in f64. The O(N V) row checks happen in [`perception::perception`] before it computes anything.
pub fn forward_f64(batch: &Batch, cfg: &VppoConfig) -> Result<ForwardF64> {
    batch.validate(cfg)?;
    let perception = perception::perception(batch, cfg)?;
    let full = if cfg.needs_ref_logits() {
        Some(kl::full_kl(batch, cfg.temperature)?)
    } else {
        None
    };
    let mut f = pass2_f64(perception, batch, cfg)?;
    if let Some(mut full) = full {
        // loss = pg + kl_coef * kl_loss + logp_penalty * (-sum logp) / Z, the KL from ref_logits
        let (kl_loss, dkl) = kl::full_kl_loss(&full.kl, batch.cu_seqlens, cfg);
        full.dkl = dkl;
        f.surrogate.kl_loss = kl_loss;
        f.surrogate.loss += cfg.kl_coef * kl_loss;
        f.full_kl = Some(full);
    }
    Ok(f)
}

/// Pass 2 (mask, Sbar, alpha, loss and dloss/dlogp) on the pass-1 values `perception` of `batch`'s
/// tokens; only `old_logp`, `advantages` and `cu_seqlens` of `batch` are read. Vocabulary parallel
/// (src/parallel/vocab.rs) runs it on the rows merged across shards.
pub fn pass2_f64(perception: PerceptionF64, batch: &Batch, cfg: &VppoConfig) -> Result<ForwardF64> {
    let (mask, k) = select::mask_for(
        &perception.score,
        &perception.entropy,
        batch.cu_seqlens,
        cfg,
    )?;
    let sbar = shaping::sbar(&perception.score, batch.cu_seqlens)?;
    let alpha = shaping::alpha(&sbar, batch.cu_seqlens, cfg)?;
    let surrogate = surrogate::surrogate_kl(
        &perception.logp,
        batch.old_logp,
        batch.ref_logp,
        &mask,
        &alpha,
        batch.advantages,
        batch.cu_seqlens,
        cfg,
    )?;
    Ok(ForwardF64 {
        perception,
        mask,
        k,
        sbar,
        alpha,
        surrogate,
        full_kl: None,
    })
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// The loss and every output of SPEC section 8 (without dloss/dlogits), computed by the reference.
///
/// N = 0 is not an error: the loss is 0 and the per-token outputs are empty.
pub fn forward(batch: &Batch, cfg: &VppoConfig) -> Result<VppoOutput> {
    Ok(output_of(&forward_f64(batch, cfg)?))
}

/// The per-token outputs of pass 1, rounded to f32; `mask` and `dlogp` (pass 2) are left empty.
pub fn token_outputs(p: &PerceptionF64) -> TokenOutputs {
    TokenOutputs {
        score: to_f32(&p.score),
        kl: to_f32(&p.kl),
        k3: to_f32(&p.k3),
        entropy: to_f32(&p.entropy),
        logp: to_f32(&p.logp),
        logp_masked: to_f32(&p.logp_masked),
        lse: to_f32(&p.lse),
        lse_masked: to_f32(&p.lse_masked),
        mask: Vec::new(),
        dlogp: Vec::new(),
        ..Default::default()
    }
}

/// The [`VppoOutput`] of an f64 evaluation: per-token and per-response values rounded to f32.
pub fn output_of(f: &ForwardF64) -> VppoOutput {
    let p = &f.perception;
    VppoOutput {
        loss: f.surrogate.loss,
        pg_loss: f.surrogate.pg_loss,
        kl_loss: f.surrogate.kl_loss,
        token_normalizer: f.surrogate.token_normalizer,
        tokens: TokenOutputs {
            mask: f.mask.clone(),
            dlogp: to_f32(&f.surrogate.dlogp),
            ref_kl: f.full_kl.as_ref().map_or(Vec::new(), |k| to_f32(&k.kl)),
            lse_ref: f
                .full_kl
                .as_ref()
                .map_or(Vec::new(), |k| to_f32(&k.lse_ref)),
            dref_kl: f.full_kl.as_ref().map_or(Vec::new(), |k| to_f32(&k.dkl)),
            ..token_outputs(p)
        },
        responses: ResponseOutputs {
            sbar: to_f32(&f.sbar),
            k: f.k.clone(),
            alpha: to_f32(&f.alpha),
        },
        stats: f.surrogate.stats,
    }
}

/// dloss/dlogits into `grad` ([N, V], any of f32, f16, bf16), computed by the reference.
///
/// `out` must be the forward output of the same batch and config (its lengths are checked, and
/// its lse and dlogp must be finite, as for every device, although the reference reads neither). The
/// reference recomputes lse and dloss/dlogp in f64 instead of reading the f32 copies in `out`, so the
/// gradient is the f64 value rounded once to the buffer's dtype.
pub fn backward_into(
    batch: &Batch,
    cfg: &VppoConfig,
    out: &VppoOutput,
    grad: GradMut,
) -> Result<()> {
    out.check_for_backward(batch.n_tokens(), Some(batch.n_responses()))?;
    let f = forward_f64(batch, cfg)?;
    if let (Some(full), Some(reference)) = (&f.full_kl, batch.ref_logits) {
        return backward::grad_logits_full_kl(
            batch.logits,
            reference,
            batch.vocab,
            batch.targets,
            &f.perception.row_max,
            &f.perception.lse_centred,
            &f.surrogate.dlogp,
            full,
            cfg.temperature,
            batch.rows,
            grad,
        );
    }
    backward::grad_logits_centred(
        batch.logits,
        batch.vocab,
        batch.targets,
        &f.perception.row_max,
        &f.perception.lse_centred,
        &f.surrogate.dlogp,
        cfg.temperature,
        batch.rows,
        grad,
    )
}
