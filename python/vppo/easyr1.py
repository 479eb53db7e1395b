"""The official VPPO update as one call of :func:`vppo.torch.vppo_loss`.

The official code (huaixuheqing/VPPO-RL, an EasyR1 fork) computes, per micro-batch, in
``DataParallelPPOActor.update_policy`` (verl/workers/actor/dp_actor.py) and ``compute_policy_loss``
(verl/trainer/core_algos.py):

1. k3 scores ``clamp(exp(d) - d - 1, 0, 10)`` with ``d = clamp(aug_log_probs - old_log_probs, -20, 20)``;
2. the per-response top-p mask: the ``ceil(top_p * L_b)`` tokens of highest k3 (sort + scatter),
   optionally OR-ed with the same mask on the entropy (``use_vppo_on_entropy``);
3. the mean-preserving advantage scaling: mean k3 per response, normalised by the mini-batch min and
   max (computed once per mini-batch, before its micro-batches), mapped to
   ``[beta_min, beta_min + (1 - beta_min) / (mean n_b + 1e-8)]``;
4. ``compute_policy_loss`` (the dual-clip PPO surrogate, or gspo, gspo_token, cispo) on the masked
   tokens, averaged per token or per sequence (``loss_avg_mode``);
5. the entropy penalty ``coef * -masked_mean(log_probs)``;
6. the token scaling ``loss * sum(response_mask) * world_size / total_response_tokens``.

:func:`policy_loss` is that block, on EasyR1's padded tensors, as one ``vt.vppo_loss`` call, and
:func:`minibatch_tas_range` is the mini-batch range of step 3. In ``update_policy``::

    for mini_batch in mini_batches:
        mb = mini_batch.batch
        tas = easyr1.minibatch_tas_range(mb["old_log_probs"], mb["aug_log_probs"], mb["response_mask"])
        for micro_batch in micro_batches:
            ...  # the forward (and a no-grad forward on the masked images: below)
            loss, out = easyr1.policy_loss(
                output.logits, masked_logits, responses, response_mask, old_log_probs, advantages,
                tas_range=tas, total_response_tokens=total_response_tokens, world_size=world_size,
                response_start=-response_length - 1)
            loss.backward()

What the drop-in needs that EasyR1 does not keep: the official trainer keeps only ``aug_log_probs``
[bs, L], the log-probs of the sampled tokens under the masked image, computed once at rollout by the
old policy. ``vt.vppo_loss`` computes those log-probs itself (``perception="k3"``: k3 from
``logp_masked - old_logp``), in the same pass over the vocabulary as the real image's, from the
masked image's logits: it has no input for precomputed ones. So :func:`policy_loss` takes
``logits_masked``, the model's logits for the same positions given the masked image (no gradient
flows to them). It is exactly the official block when those logits come from the policy that
computed ``aug_log_probs``, the old one. Keeping the old policy's [N, V] masked logits from rollout
to update is not practical at real sizes; what a trainer can do is a no-grad forward of the masked
images by the current model in each micro-batch (one more forward, no backward), which is the old
policy until the batch's first optimizer step (the whole update with one mini-batch per batch and
one PPO epoch) and the current one after it, where the official scores stay those of the old policy.
An input of ``vt.vppo_loss`` taking ``aug_log_probs`` directly (no masked logits: half the reads of
pass 1, and the official semantics in every mini-batch) is not there yet: it is a change of the op
and its kernels, not of this module.

Where the results may differ from the official ones (tests/test_easyr1.py checks the rest equal to
rounding): the op computes k3 in double with ``expm1`` (the official f32 ``exp(d) - d - 1`` loses
digits for small d), so tokens whose k3 agree to f32 rounding may rank otherwise; k_b = ceil(top_p L_b)
in exact arithmetic (the official ceil of an f32 product can be one more); ties of the top-k go to the
lower token index (the official sort breaks them arbitrarily); the entropy mask ranks the f32 entropy
(the official code takes it in the logits' dtype). ``loss_type="gspo"``: the fork's
``compute_policy_loss`` multiplies the [bs] sequence log-ratio by the [bs, L] mask without
``unsqueeze(-1)`` (a broadcast error unless bs = L, a wrong pairing when bs = L); the drop-in does
what is meant, s_b on every token of b (SPEC section 12), as the fork's ``gspo_token`` does. Not
covered: the KL penalty ``full`` (the other official KL penalties are, through
``ref_log_probs``), advantages that vary within a response (GAE), Ulysses sequence parallelism.

No [N, V] tensor is copied: the logits are viewed as [R, V] and read through row indices (SPEC
section 10); only O(bs * L) index tensors are built (with one host synchronization, the nonzero of the
response mask, besides the op's own validation copy). Eager only (the indices depend on the data).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import torch as vt

__all__ = ["policy_loss", "minibatch_tas_range", "to_padded"]

_LOSS_TYPES = {"default": "ppo", "gspo": "gspo", "gspo_token": "gspo_token", "cispo": "cispo"}
#: The official kl_penalty names (core_algos.compute_kl) and the op's.
_KL_PENALTIES = {"kl": "k1", "abs": "abs", "mse": "mse", "low_var_kl": "k3"}


def minibatch_tas_range(old_log_probs: Tensor, aug_log_probs: Tensor,
                        response_mask: Tensor) -> Optional[Tuple[float, float]]:
    """The official mini-batch range of the sensitivity scores, computed before the micro-batches.

    ``old_log_probs``, ``aug_log_probs`` and ``response_mask`` are the mini-batch's [bs, L] tensors.
    Per response, the mean over its tokens of ``clamp(exp(d) - d - 1, 0, 10)`` with
    ``d = clamp(aug_log_probs - old_log_probs, -20, 20)``; the range is the (min, max) of those means
    over the non-empty responses, in the official code's f32 arithmetic, or None when there are fewer
    than two non-empty responses (the official code then scales no advantage). Pass it to every
    :func:`policy_loss` call of the mini-batch as ``tas_range``.
    """
    for name, t in (("old_log_probs", old_log_probs), ("aug_log_probs", aug_log_probs),
                    ("response_mask", response_mask)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"minibatch_tas_range: {name} must be a [bs, L] tensor")
        if t.shape != old_log_probs.shape:
            raise ValueError(f"minibatch_tas_range: {name} has shape {tuple(t.shape)}, "
                             f"old_log_probs {tuple(old_log_probs.shape)}")
    with torch.no_grad():
        mask = response_mask.to(torch.float32)
        d = (aug_log_probs.float() - old_log_probs.float()).clamp(-20.0, 20.0)
        k3 = (d.exp() - d - 1).clamp(0.0, 10.0)
        count = mask.sum(dim=1)
        score = (k3 * mask).sum(dim=1) / count.clamp(min=1)
        valid = score[count > 0]
        if valid.numel() <= 1:
            return None
        return float(valid.min()), float(valid.max())


def to_padded(values: Tensor, response_mask: Tensor) -> Tensor:
    """A per-token output of :func:`policy_loss` ([N], in the order of the response tokens) as EasyR1's
    [bs, L] layout: zero where ``response_mask`` is 0."""
    valid = response_mask != 0
    padded = values.new_zeros(valid.shape)
    padded[valid] = values
    return padded


def _rows(name: str, logits: Tensor, bs: int, length: int, pos_b: Tensor, pos_j: Tensor,
          response_start: Optional[int], indices: Optional[Tensor],
          seqlen: Optional[int]) -> Tuple[Tensor, Tensor]:
    """``logits`` as an [R, V] view and the row each response token (pos_b, pos_j) reads."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"policy_loss: {name} must be a torch.Tensor")
    if not logits.is_contiguous():
        raise ValueError(
            f"policy_loss: {name} is not contiguous (strides {logits.stride()}); no copy is made: pass "
            "the model's whole logits (output.logits) and response_start (EasyR1's slice "
            "[:, -L - 1:-1] is response_start=-L - 1), not a slice of them")
    if logits.dim() == 3:
        if logits.shape[0] != bs:
            raise ValueError(f"policy_loss: {name} has {logits.shape[0]} sequences, responses {bs}")
        s = logits.shape[1]
        if s == length:
            start = 0  # [bs, L, V]: exactly the positions that predict the response tokens
        elif response_start is None:
            raise ValueError(
                f"policy_loss: {name} has {s} positions and the responses {length}: give "
                "response_start, the position of the logits that predict the first response "
                "token (-L - 1 for EasyR1's full-sequence logits)")
        else:
            start = response_start + s if response_start < 0 else response_start
        if start < 0 or start + length > s:
            raise ValueError(f"policy_loss: {name} positions [{start}, {start + length}) are outside "
                             f"its {s} positions")
        rows = pos_b * s + start + pos_j
        return logits.view(bs * s, logits.shape[2]), rows
    if logits.dim() == 2:
        # Padding-free: the rows of unpad_input's `indices` (flat positions in [bs, seqlen]).
        if indices is None or seqlen is None:
            raise ValueError(f"policy_loss: {name} is 2-D (padding-free [total_nnz, V]): pass "
                             "indices (from unpad_input) and seqlen")
        if indices.dim() != 1 or indices.numel() != logits.shape[0]:
            raise ValueError(f"policy_loss: indices has shape {tuple(indices.shape)}, expected "
                             f"[{logits.shape[0]}] (one per row of {name})")
        start = seqlen - length - 1 if response_start is None else (
            response_start + seqlen if response_start < 0 else response_start)
        if start < 0 or start + length > seqlen:
            raise ValueError(f"policy_loss: positions [{start}, {start + length}) are outside "
                             f"seqlen = {seqlen}")
        flat = pos_b * seqlen + start + pos_j
        idx = indices.to(device=flat.device, dtype=torch.int64)
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError("policy_loss: indices is not strictly increasing")
        rows = torch.searchsorted(idx, flat)
        inside = rows < idx.numel()
        found = torch.zeros_like(inside)
        found[inside] = idx[rows[inside]] == flat[inside]
        if not bool(found.all()):
            t = int((~found).nonzero()[0, 0])
            raise ValueError(
                f"policy_loss: {name}: response {int(pos_b[t])} token {int(pos_j[t])} reads position "
                f"{start + int(pos_j[t])}, which is not in indices (padding)")
        return logits, rows
    raise ValueError(f"policy_loss: {name} has shape {tuple(logits.shape)}: expected [bs, S, V] or "
                     "[total_nnz, V]")


def policy_loss(
    logits: Tensor,
    logits_masked: Tensor,
    responses: Tensor,
    response_mask: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    *,
    tas_range: Optional[Tuple[float, float]],
    total_response_tokens: Union[int, float, Tensor],
    world_size: int = 1,
    response_start: Optional[int] = None,
    indices: Optional[Tensor] = None,
    seqlen: Optional[int] = None,
    top_p_perception_tokens: float = 0.4,
    use_advantage_shaping: bool = True,
    advantage_scaling_min: float = 0.9,
    use_vppo_on_entropy: bool = False,
    top_p_entropy_tokens: float = 0.2,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_dual: float = 3.0,
    loss_type: str = "default",
    loss_avg_mode: str = "token",
    entropy_penalty_coef: float = 0.06,
    temperature: float = 1.0,
    ref_log_probs: Optional[Tensor] = None,
    kl_penalty: str = "low_var_kl",
    kl_coef: float = 1e-3,
    device: Optional[str] = None,
    grad_dtype: str = "logits",
    in_place: bool = False,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The official per-micro-batch VPPO loss (perception mask, advantage shaping, policy loss, entropy
    penalty, token scaling) as one ``vt.vppo_loss`` call. Returns ``(loss, out)``; ``loss.backward()``
    is the official ``loss.backward()``.

    Tensors (EasyR1's, of one micro-batch of bs responses padded to L tokens):

    - ``logits``: the policy's logits, one of
      [bs, L, V] (the logits that predict the L response tokens); [bs, S, V], the model's whole
      sequence, with ``response_start`` the position that predicts the first response token
      (``-L - 1`` for EasyR1's ``output.logits``, whose slice ``[:, -L - 1:-1]`` the official code takes;
      it applies to every 3-D tensor of more than L positions);
      or padding-free [total_nnz, V] with ``indices`` (from ``unpad_input``) and ``seqlen`` (the padded
      sequence length; ``response_start`` defaults to ``seqlen - L - 1`` there). Contiguous, f32, f16 or
      bf16, divided by the temperature already or not (then pass ``temperature``: the op divides as
      it reads). It is viewed as [R, V] and read through row indices: no copy.
    - ``logits_masked``: the logits for the same positions given the masked image, in one of the same
      layouts (see the module's docstring for why these, not ``aug_log_probs``, and from which policy).
    - ``responses`` [bs, L] (the sampled tokens), ``response_mask`` [bs, L] (0 or 1; any pattern: the
      tokens where it is 1 are the response, in order), ``old_log_probs`` [bs, L] (f32).
    - ``advantages`` [bs, L]: EasyR1's token-level advantages. ``vt.vppo_loss`` takes one advantage
      per response, so each response's values over its tokens must be equal (EasyR1's GRPO and RLOO
      broadcast one value); otherwise ValueError naming the response (GAE and REINFORCE++ whiten
      token-level returns: not supported). Padded positions are ignored.

    Arguments of the mini-batch:

    - ``tas_range``: :func:`minibatch_tas_range` of the mini-batch (None: no advantage is scaled, as
      the official code does when the mini-batch has fewer than two non-empty responses).
    - ``total_response_tokens``: the official ``total_response_tokens``, the mini-batch's
      ``response_mask`` sum all-reduced over the ranks; ``world_size`` the number of ranks.

    Options, named and defaulting as the official config (the defaults are the paper's 7B run:
    ``top_p_perception_tokens=0.4``, ``advantage_scaling_min=0.9``, clip ratios 0.2 / 0.28 / 3.0,
    ``entropy_penalty_coef=0.06``; ``entropy_penalty_coef=0`` is ``use_entropy_penalty=False``).
    ``loss_type``: "default", "gspo", "gspo_token", "cispo"; ``loss_avg_mode``: "token" or "seq".
    ``device``, ``grad_dtype``, ``in_place``: as ``vt.vppo_loss``.

    The KL loss to a reference policy (the official ``use_kl_loss``): pass ``ref_log_probs`` [bs, L]
    (the official ``model_inputs["ref_log_probs"]``), with ``kl_penalty`` "kl", "abs", "mse" or
    "low_var_kl" (default) and ``kl_coef`` (default 1e-3). The official ``average_loss(kld,
    response_mask)`` over every response token is the op's KL term (``out["kl_loss"]``), under the
    same token scaling as the policy loss. ``kl_penalty="full"`` is not implemented by the op.

    How it maps: ``perception="k3"``, ``top_fraction=top_p_perception_tokens``,
    ``shaping="mean-preserving"`` with ``beta_min=advantage_scaling_min`` and the caller's range,
    ``mask_by="perception_or_entropy"`` with the entropy mask, ``eps_low``/``eps_high``/``dual_clip`` the
    clip ratios, ``logp_penalty=entropy_penalty_coef``. The token scaling is the token normalizer
    Z = total_response_tokens / world_size: with "token" the official loss is
    (sum of masked l_t + coef * sum of -logp_t) / Z exactly (up to the official 1e-8 guards). With "seq"
    it is [(1/bs) sum_b (sum_t mask l_t) / L_b] * n / Z + coef * (sum -logp_t) / Z (n: the micro-batch's
    tokens): the op's seq-mean-token-mean with the response normalizer B' = bs Z / n.

    ``out``: the op's outputs (per token in the order of the response tokens, see :func:`to_padded`;
    per response for all bs responses), plus ``cu_seqlens``, ``rows`` (the row of ``logits`` each
    token reads), ``response_lengths`` and ``advantages`` (the per-response values given to the op).
    """
    for name, t in (("responses", responses), ("response_mask", response_mask),
                    ("old_log_probs", old_log_probs), ("advantages", advantages)):
        if not isinstance(t, Tensor):
            raise TypeError(f"policy_loss: {name} must be a torch.Tensor, not {type(t).__name__}")
        if t.dim() != 2 or t.shape != responses.shape:
            raise ValueError(f"policy_loss: {name} has shape {tuple(t.shape)}, expected [bs, L] = "
                             f"{tuple(responses.shape)}")
    if loss_type not in _LOSS_TYPES:
        raise ValueError(f"policy_loss: loss_type must be one of {', '.join(_LOSS_TYPES)}, "
                         f"not {loss_type!r}")
    if loss_avg_mode not in ("token", "seq"):
        raise ValueError(f'policy_loss: loss_avg_mode must be "token" or "seq", not {loss_avg_mode!r}')
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"policy_loss: world_size must be an int >= 1, not {world_size!r}")
    total = float(total_response_tokens)
    if not total > 0:
        raise ValueError(f"policy_loss: total_response_tokens must be > 0, not {total}")
    if tas_range is not None:
        if len(tas_range) != 2:
            raise ValueError(f"policy_loss: tas_range must be (lo, hi) or None, not {tas_range!r}")
        tas_range = (float(tas_range[0]), float(tas_range[1]))

    bs, length = responses.shape
    valid = response_mask != 0
    if bool((valid & (response_mask != 1)).any()):
        raise ValueError("policy_loss: response_mask has values other than 0 and 1")
    pos = valid.reshape(-1).nonzero().squeeze(1)  # flat [bs * L] positions of the response tokens
    pos_b, pos_j = pos // length, pos % length
    lengths = valid.sum(dim=1)
    cu_seqlens = torch.zeros(bs + 1, dtype=torch.int64, device=pos.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    n = pos.numel()

    adv_tok = advantages.reshape(-1)[pos].to(torch.float32)
    adv = torch.zeros(bs, dtype=torch.float32, device=adv_tok.device)
    live = lengths > 0
    if n:
        adv[live] = adv_tok[cu_seqlens[:-1][live]]
        varies = adv_tok != torch.repeat_interleave(adv, lengths)
        if bool(varies.any()):
            t = int(varies.nonzero()[0, 0])
            b = int(pos_b[t])
            raise ValueError(
                f"policy_loss: advantages vary within response {b} ({float(adv[b])} at its first "
                f"token, {float(adv_tok[t])} at token {int(pos_j[t])}): vt.vppo_loss takes one "
                "advantage per response (GRPO-like estimators); token-level ones (GAE) are not "
                "supported")

    flat, rows = _rows("logits", logits, bs, length, pos_b, pos_j, response_start, indices, seqlen)
    flat_m, rows_m = _rows("logits_masked", logits_masked, bs, length, pos_b, pos_j, response_start,
                           indices, seqlen)

    z = total / world_size
    aggregation = "token_mean" if loss_avg_mode == "token" else "seq_mean_token_mean"

    shaping = "mean_preserving" if use_advantage_shaping and tas_range is not None else "none"
    options = dict(
        perception="k3",
        top_fraction=top_p_perception_tokens,
        shaping=shaping,
        beta_min=advantage_scaling_min,
        tas_scope="batch",
        eps_low=clip_ratio_low,
        eps_high=clip_ratio_high,
        dual_clip=clip_ratio_dual,
        loss_type=_LOSS_TYPES[loss_type],
        aggregation=aggregation,
        token_normalizer=z,
        # seq: the official mean over all bs responses, times the token scaling n / Z
        response_normalizer=bs * z / n if loss_avg_mode == "seq" and n else None,
        logp_penalty=entropy_penalty_coef,
        temperature=temperature,
    )
    if shaping != "none":
        options["tas_range"] = tas_range
    if use_vppo_on_entropy:
        options.update(mask_by="perception_or_entropy", entropy_top_fraction=top_p_entropy_tokens)
    ref_logp = None
    if ref_log_probs is not None:
        if not isinstance(ref_log_probs, Tensor) or ref_log_probs.shape != responses.shape:
            raise ValueError("policy_loss: ref_log_probs must be a [bs, L] tensor like responses, not "
                             f"{getattr(ref_log_probs, 'shape', type(ref_log_probs).__name__)}")
        if kl_penalty not in _KL_PENALTIES:
            raise ValueError(f"policy_loss: kl_penalty must be one of {', '.join(_KL_PENALTIES)}, "
                             f"not {kl_penalty!r}")
        ref_logp = ref_log_probs.reshape(-1)[pos].to(torch.float32)  # [N], O(N)
        options.update(kl_penalty=_KL_PENALTIES[kl_penalty], kl_coef=kl_coef)

    loss, out = vt.vppo_loss(
        flat, flat_m, responses.reshape(-1)[pos], old_log_probs.reshape(-1)[pos].to(torch.float32),
        adv, cu_seqlens, rows=rows, masked_rows=rows_m, ref_logp=ref_logp, device=device,
        grad_dtype=grad_dtype, in_place=in_place, **options)
    out.update(cu_seqlens=cu_seqlens, rows=rows, response_lengths=lengths, advantages=adv)
    return loss, out
