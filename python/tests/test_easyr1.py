"""vppo.easyr1.policy_loss against an eager port of the official per-micro-batch VPPO update
(huaixuheqing/VPPO-RL: DataParallelPPOActor.update_policy in verl/workers/actor/dp_actor.py and
compute_policy_loss / average_loss in verl/trainer/core_algos.py), written here in our own words and
differentiated by autograd through log_softmax (cross_entropy), on random EasyR1 batches: padded
[bs, L] responses of several lengths (an empty one included), mini-batches split into micro-batches,
the mini-batch TAS range and the token scaling; loss, mask, k, alpha and dloss/dlogits; f32 and bf16;
the [bs, L, V], whole-sequence and padding-free layouts. Small shapes: seconds."""

import math

import pytest
import torch
import torch.nn.functional as F

import vppo.easyr1 as easyr1

# -------------------------------------------------------------------------------------------------
# The official update, ported (the lines of one micro-batch, and the mini-batch range before them)
# -------------------------------------------------------------------------------------------------

OFFICIAL = dict(top_p_perception_tokens=0.4, use_advantage_shaping=True, advantage_scaling_min=0.9,
                use_vppo_on_entropy=False, top_p_entropy_tokens=0.2, clip_ratio_low=0.2,
                clip_ratio_high=0.28, clip_ratio_dual=3.0, loss_type="default", loss_avg_mode="token",
                entropy_penalty_coef=0.06)


def seq_log_probs(logits, labels):
    """log_probs_from_logits without flash-attn: -cross_entropy of the f32 logits."""
    v = logits.shape[-1]
    return -F.cross_entropy(logits.float().reshape(-1, v), labels.reshape(-1),
                            reduction="none").view(labels.shape)


def masked_mean(values, mask, dim=None, eps=1e-8):
    return (values * mask).sum(dim=dim) / (mask.sum(dim=dim) + eps)


def top_p_by_sort(key, response_mask, top_p):
    """The official top-p mask: -inf on padding, a descending sort, the first ceil(L_b * top_p)
    ranks scattered back to token order."""
    valid = response_mask.bool()
    k = torch.ceil(response_mask.sum(dim=1) * top_p).int()
    key = key.clone()
    key[~valid] = -torch.inf
    _, order = torch.sort(key, dim=1, descending=True)
    ranks = torch.arange(key.shape[1]).expand_as(key) < k.unsqueeze(1)
    picked = torch.zeros_like(key, dtype=torch.bool)
    picked.scatter_(1, order, ranks)
    return picked, k


def official_tas_range(old_log_probs, aug_log_probs, response_mask):
    """The pre-computation over the mini-batch (None when it has fewer than two scored responses)."""
    d = (aug_log_probs - old_log_probs).clamp(-20.0, 20.0)
    k3 = torch.clamp(d.exp() - d - 1, min=0.0, max=10.0)
    count = response_mask.sum(dim=1)
    score = (k3 * response_mask).sum(dim=1) / torch.clamp(count, min=1)
    scored = score[count > 0]
    if scored.numel() <= 1:
        return None
    return torch.quantile(scored, 0.0), torch.quantile(scored, 1.0)


def official_micro_batch(logits, responses, response_mask, old_log_probs, aug_log_probs, advantages,
                         tas, total_response_tokens, world_size, cfg):
    """One micro-batch's loss (already scaled for accumulation) and what it selected. `logits`
    [bs, L, V] predict the responses (autograd flows through them); `tas` the mini-batch range."""
    log_probs = seq_log_probs(logits, responses)
    token_mask = None
    if cfg["use_vppo_on_entropy"]:
        logp_all = F.log_softmax(logits.float(), dim=-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # Categorical(logits=...).entropy()
        token_mask, _ = top_p_by_sort(entropy.detach(), response_mask, cfg["top_p_entropy_tokens"])
    d = (aug_log_probs - old_log_probs).clamp(-20.0, 20.0)
    k3 = torch.clamp((d.exp() - d - 1).contiguous(), min=0.0, max=10.0)
    picked, k = top_p_by_sort(k3, response_mask, cfg["top_p_perception_tokens"])
    picked = picked & response_mask.bool()
    token_mask = picked if token_mask is None else (token_mask | picked)
    token_mask = token_mask.to(log_probs.dtype)

    scale = None
    if cfg["use_advantage_shaping"]:
        count = response_mask.sum(dim=1)
        score = (k3 * response_mask).sum(dim=1) / torch.clamp(count, min=1)
        scale = torch.ones_like(score)
        if tas is not None and (tas[1] - tas[0]) > 1e-6:
            lo, hi = tas
            scored = count > 0
            norm = torch.clamp((score[scored] - lo) / (hi - lo), 0.0, 1.0)
            t_min = cfg["advantage_scaling_min"]
            t_max = t_min + (1.0 - t_min) / (norm.mean() + 1e-8)
            scale[scored] = t_min + norm * (t_max - t_min)
        advantages = advantages * scale.unsqueeze(1)

    # compute_policy_loss
    neg_kl = log_probs - old_log_probs
    kind = cfg["loss_type"]
    if kind in ("gspo", "gspo_token"):
        in_seq = masked_mean(neg_kl, response_mask, dim=-1)
        if kind == "gspo_token":
            log_ratio = in_seq.detach().unsqueeze(-1) + log_probs - log_probs.detach()
        else:
            # The fork writes `in_seq * response_mask` ([bs] against [bs, L]: a broadcast error
            # unless bs = L); what is meant, and what vt.vppo_loss does, is s_b on every token of b.
            log_ratio = in_seq.unsqueeze(-1) * response_mask
    else:
        log_ratio = neg_kl
    ratio = torch.exp(torch.clamp(log_ratio, -20.0, 20.0))
    clipped = torch.exp(torch.clamp(log_ratio, math.log(1.0 - cfg["clip_ratio_low"]),
                                    math.log(1.0 + cfg["clip_ratio_high"])))
    if kind == "cispo":
        per_token = -advantages * log_probs * clipped.detach()
    else:
        plain, clip_hi = -advantages * ratio, -advantages * clipped
        dual = -advantages * cfg["clip_ratio_dual"]
        upper = torch.max(plain, clip_hi)
        per_token = torch.where(advantages < 0, torch.min(upper, dual), upper)
    per_token = per_token * token_mask.detach()
    if cfg["loss_avg_mode"] == "token":
        pg = masked_mean(per_token, response_mask)
    else:
        pg = ((per_token * response_mask).sum(-1) / (response_mask.sum(-1) + 1e-8)).mean()

    loss = pg
    if cfg.get("use_kl_loss"):  # compute_kl, then average_loss over the response tokens
        lp, ref = log_probs.float(), cfg["ref_log_probs"].float()
        penalty = cfg["kl_penalty"]
        if penalty == "kl":
            kld = lp - ref
        elif penalty == "abs":
            kld = (lp - ref).abs()
        elif penalty == "mse":
            kld = 0.5 * (lp - ref).square()
        else:
            x = (ref - lp).clamp(-20.0, 20.0)
            kld = torch.clamp((x.exp() - x - 1).contiguous(), min=-10.0, max=10.0)
        if cfg["loss_avg_mode"] == "token":
            kl_loss = masked_mean(kld, response_mask)
        else:
            kl_loss = ((kld * response_mask).sum(-1) / (response_mask.sum(-1) + 1e-8)).mean()
        loss = loss + kl_loss * cfg["kl_coef"]
    if cfg["entropy_penalty_coef"]:
        loss = loss + (-masked_mean(log_probs, response_mask)) * cfg["entropy_penalty_coef"]
    loss = loss * torch.sum(response_mask) * world_size / total_response_tokens
    return loss, dict(mask=token_mask, k=k, alpha=scale)


# -------------------------------------------------------------------------------------------------
# Random EasyR1 mini-batches
# -------------------------------------------------------------------------------------------------


def make_mini_batch(lengths, L=9, P=4, V=37, dtype=torch.float32, seed=0, holes=False,
                    temperature=1.0):
    """bs = len(lengths) responses padded to L after prompts left-padded to P, and the model's
    whole-sequence logits [bs, P + L, V] for the real and the masked image. aug_log_probs are the
    masked image's log-probs (as the rollout computes them); old_log_probs differ from them by
    |d| in [0.1, 1.5], so no two k3 of a response are within the official f32 rounding."""
    g = torch.Generator().manual_seed(seed)
    bs, S = len(lengths), P + L
    lengths = torch.tensor(lengths)
    response_mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    if holes:  # any pattern of 0 and 1, not only a prefix
        response_mask = (torch.rand(bs, L, generator=g) < 0.7).long()
        response_mask[0] = 0
    prompt_len = torch.randint(1, P + 1, (bs,), generator=g)
    prompt_mask = (torch.arange(P)[None, :] >= (P - prompt_len)[:, None]).long()
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    responses = torch.randint(0, V, (bs, L), generator=g)
    full = (torch.randn(bs, S, V, generator=g) * 2).to(dtype)
    full_masked = (full.float() + torch.randn(bs, S, V, generator=g) * 0.5).to(dtype)
    aug = seq_log_probs(full_masked[:, -L - 1:-1].float() / temperature, responses)
    sign = torch.where(torch.rand(bs, L, generator=g) < 0.5, -1.0, 1.0)
    old = aug + sign * (0.1 + 1.4 * torch.rand(bs, L, generator=g))
    per_response = torch.randn(bs, generator=g)
    advantages = per_response[:, None] * response_mask  # GRPO's broadcast
    ref = old + 0.3 * torch.randn(bs, L, generator=g)  # a reference policy's log-probs
    return dict(full=full, full_masked=full_masked, responses=responses, response_mask=response_mask,
                attention_mask=attention_mask, old_log_probs=old, aug_log_probs=aug, ref_log_probs=ref,
                advantages=advantages, L=L, S=S, temperature=temperature)


def split(mb, sizes):
    """Micro-batches of the given numbers of responses."""
    out, start = [], 0
    for size in sizes:
        sl = slice(start, start + size)
        out.append({k: (v[sl] if torch.is_tensor(v) else v) for k, v in mb.items()})
        start += size
    return out


def layout(micro, kind):
    """(leaf logits, leaf masked logits, kwargs) of one micro-batch in a layout EasyR1 has, and a
    function giving the official [bs, L, V] logits from the leaf."""
    L, S = micro["L"], micro["S"]
    if kind == "sliced":  # [bs, L, V]
        a = micro["full"][:, -L - 1:-1].contiguous()
        b = micro["full_masked"][:, -L - 1:-1].contiguous()
        return a, b, {}, lambda x: x
    if kind == "full":  # the model's [bs, S, V] and response_start
        return micro["full"].clone(), micro["full_masked"], dict(response_start=-L - 1), \
            lambda x: x[:, -L - 1:-1]
    assert kind == "rmpad"  # padding-free [total_nnz, V], unpad_input's indices
    bs, V = micro["full"].shape[0], micro["full"].shape[2]
    indices = micro["attention_mask"].reshape(-1).nonzero().squeeze(1)
    a = micro["full"].reshape(bs * S, V)[indices].clone()
    b = micro["full_masked"].reshape(bs * S, V)[indices].clone()

    def padded(x):  # pad_input, then the official slice
        full = x.new_zeros(bs * S, V).index_put((indices,), x)
        return full.view(bs, S, V)[:, -L - 1:-1]

    return a, b, dict(indices=indices, seqlen=S), padded


def run_both(mb, sizes, kind="sliced", world_size=2, **cfg):
    """The official port and the drop-in on every micro-batch of `mb`: a list of (official, drop-in)
    results, each (loss, out, grad of the leaf logits). The official code divides the logits by the
    temperature before anything (logits.div_); the drop-in is given it."""
    cfg = {**OFFICIAL, **cfg}
    use_kl = cfg.pop("use_kl_loss", False)
    temperature = mb["temperature"]
    tas = official_tas_range(mb["old_log_probs"], mb["aug_log_probs"], mb["response_mask"])
    tas_ours = easyr1.minibatch_tas_range(mb["old_log_probs"], mb["aug_log_probs"],
                                          mb["response_mask"])
    if tas is None:
        assert tas_ours is None
    else:
        assert tas_ours == (float(tas[0]), float(tas[1]))
    total = torch.sum(mb["response_mask"]) * world_size + 3  # as all-reduced over the ranks
    results = []
    for micro in split(mb, sizes):
        a, b, kw, to_official = layout(micro, kind)
        x = a.clone().requires_grad_(True)
        official_cfg = dict(cfg, use_kl_loss=use_kl, ref_log_probs=micro["ref_log_probs"])
        o_loss, o_out = official_micro_batch(
            to_official(x) / temperature, micro["responses"], micro["response_mask"], micro["old_log_probs"],
            micro["aug_log_probs"], micro["advantages"], tas, total, world_size, official_cfg)
        o_loss.backward()
        y = a.clone().requires_grad_(True)
        loss, out = easyr1.policy_loss(
            y, b, micro["responses"], micro["response_mask"], micro["old_log_probs"],
            micro["advantages"], tas_range=tas_ours, total_response_tokens=total,
            world_size=world_size, temperature=temperature,
            ref_log_probs=micro["ref_log_probs"] if use_kl else None, **kw, **cfg)
        loss.backward()
        results.append(((o_loss, o_out, x.grad), (loss, out, y.grad), micro))
    return results


def assert_same(results, dtype=torch.float32):
    for (o_loss, o_out, o_grad), (loss, out, grad), micro in results:
        mask = micro["response_mask"]
        assert loss.item() == pytest.approx(o_loss.item(), rel=2e-5, abs=1e-7)
        assert torch.equal(easyr1.to_padded(out["mask"], mask).bool(), o_out["mask"].bool())
        assert torch.equal(out["k"].long(), o_out["k"].long())
        if o_out["alpha"] is not None:
            torch.testing.assert_close(out["alpha"], o_out["alpha"], rtol=1e-5, atol=1e-6)
        assert grad.shape == o_grad.shape
        scale = o_grad.abs().max().item() + 1e-30
        if dtype == torch.float32:
            torch.testing.assert_close(grad.float(), o_grad.float(), rtol=1e-4, atol=2e-6 * scale)
        else:  # both rounded to bf16 from f32 values equal to rounding: at most one ulp apart
            torch.testing.assert_close(grad.float(), o_grad.float(), rtol=2 ** -7, atol=1e-3 * scale)


# Lengths 0 (empty) to L = 9 (full), and the padding in between.
LENGTHS = [9, 3, 0, 6, 1, 7]
SIZES = [3, 3]


@pytest.mark.parametrize("kind", ["sliced", "full", "rmpad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_official_update(dtype, kind):
    mb = make_mini_batch(LENGTHS, dtype=dtype, seed=1)
    results = run_both(mb, SIZES, kind=kind)
    assert_same(results, dtype)
    # the range scaled some advantages, the mask dropped some tokens, and the clips were reached
    alphas = torch.cat([r[1][1]["alpha"] for r in results])
    assert (alphas != 1).any()
    assert any(r[1][1]["clip_fraction"].item() > 0 for r in results)


VARIANTS = [
    dict(use_vppo_on_entropy=True, top_p_entropy_tokens=0.3),
    dict(loss_type="gspo"),
    dict(loss_type="gspo_token"),
    dict(loss_type="cispo", clip_ratio_high=0.3),
    dict(loss_avg_mode="seq"),
    dict(loss_avg_mode="seq", loss_type="gspo_token", entropy_penalty_coef=0.0),
    dict(use_advantage_shaping=False, entropy_penalty_coef=0.0, top_p_perception_tokens=0.7),
    dict(advantage_scaling_min=0.8, clip_ratio_low=0.15, clip_ratio_dual=2.5, entropy_penalty_coef=0.1,
         temperature=0.7),
    dict(use_kl_loss=True, kl_penalty="low_var_kl", kl_coef=0.1),
    dict(use_kl_loss=True, kl_penalty="kl", kl_coef=0.5, loss_avg_mode="seq"),
    dict(use_kl_loss=True, kl_penalty="mse", kl_coef=0.2),
    dict(use_kl_loss=True, kl_penalty="abs", kl_coef=0.3, loss_type="gspo_token"),
]


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_the_official_variants(cfg):
    cfg = dict(cfg)
    mb = make_mini_batch(LENGTHS, seed=3, temperature=cfg.pop("temperature", 1.0))
    assert_same(run_both(mb, [2, 4], kind="full", world_size=1, **cfg))


def test_seq_mode_bf16_padding_free():
    mb = make_mini_batch(LENGTHS, dtype=torch.bfloat16, seed=4)
    assert_same(run_both(mb, SIZES, kind="rmpad", loss_avg_mode="seq"), torch.bfloat16)


def test_any_response_mask_pattern():
    """A mask with holes (and an empty first response): the tokens where it is 1 are the response."""
    mb = make_mini_batch([9] * 5, seed=5, holes=True)
    assert_same(run_both(mb, [5]))


def test_one_scored_response_in_the_mini_batch_scales_nothing():
    mb = make_mini_batch([0, 5, 0], seed=6)
    assert easyr1.minibatch_tas_range(mb["old_log_probs"], mb["aug_log_probs"],
                                      mb["response_mask"]) is None
    results = run_both(mb, [3])
    assert_same(results)
    assert torch.equal(results[0][1][1]["alpha"], torch.ones(3))


def test_a_micro_batch_of_empty_responses():
    mb = make_mini_batch([0, 0, 4, 6], seed=7)
    results = run_both(mb, [2, 2], kind="full")
    (o_loss, _, o_grad), (loss, _, grad), _ = results[0]
    assert loss.item() == 0.0 == o_loss.item()
    assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(o_grad, torch.zeros_like(o_grad))
    assert_same(results[1:])


@pytest.mark.parametrize("kind", ["sliced", "full", "rmpad"])
def test_no_copy_of_the_logits(kind, monkeypatch):
    """The op gets views of the caller's logits (the same storage), and the gradient lands in the
    rows the response tokens read, zero elsewhere."""
    seen = []
    real = easyr1.vt.vppo_loss

    def spy(logits, logits_masked, *args, **kw):
        seen.append((logits.data_ptr(), logits_masked.data_ptr()))
        return real(logits, logits_masked, *args, **kw)

    monkeypatch.setattr(easyr1.vt, "vppo_loss", spy)
    micro = split(make_mini_batch(LENGTHS, seed=8), [6])[0]
    a, b, kw, _ = layout(micro, kind)
    x = a.clone().requires_grad_(True)
    loss, out = easyr1.policy_loss(
        x, b, micro["responses"], micro["response_mask"], micro["old_log_probs"],
        micro["advantages"], tas_range=(0.0, 1.0), total_response_tokens=40, **kw)
    assert seen == [(x.data_ptr(), b.data_ptr())]
    loss.backward()
    v = x.shape[-1]
    g = x.grad.reshape(-1, v)
    assert out["rows"].numel() == int(micro["response_mask"].sum())
    read = torch.zeros(g.shape[0], dtype=torch.bool)
    read[out["rows"]] = True
    assert torch.equal(g[~read], torch.zeros_like(g[~read])) and g[read].abs().sum() > 0


# -------------------------------------------------------------------------------------------------
# Errors
# -------------------------------------------------------------------------------------------------


def call(micro, **kw):
    args = dict(tas_range=None, total_response_tokens=10)
    args.update(kw)
    logits = args.pop("logits", micro["full"][:, -micro["L"] - 1:-1].contiguous())
    masked = args.pop("logits_masked", micro["full_masked"][:, -micro["L"] - 1:-1].contiguous())
    return easyr1.policy_loss(logits, masked, micro["responses"], args.pop("response_mask",
                              micro["response_mask"]), micro["old_log_probs"],
                              args.pop("advantages", micro["advantages"]), **args)


def test_errors_name_what_is_wrong():
    micro = make_mini_batch([4, 6, 2], seed=9)
    adv = micro["advantages"].clone()
    adv[1, 3] += 0.5
    with pytest.raises(ValueError, match=r"advantages vary within response 1 .* token 3"):
        call(micro, advantages=adv)
    with pytest.raises(ValueError, match="logits is not contiguous"):
        call(micro, logits=micro["full"][:, -micro["L"] - 1:-1])
    with pytest.raises(ValueError, match="response_start"):
        call(micro, logits=micro["full"])
    with pytest.raises(ValueError, match="indices"):
        call(micro, logits=micro["full"].reshape(-1, micro["full"].shape[2]))
    with pytest.raises(ValueError, match="response_mask has values other than 0 and 1"):
        call(micro, response_mask=micro["response_mask"] * 2)
    with pytest.raises(ValueError, match="loss_avg_mode"):
        call(micro, loss_avg_mode="sum")
    with pytest.raises(ValueError, match="total_response_tokens"):
        call(micro, total_response_tokens=0)
    # the op's own checks come through with its message
    with pytest.raises(ValueError, match="top-fraction"):
        call(micro, top_p_perception_tokens=1.5)
    # padding-free: a response position that is padding in the indices
    bs, S, V = micro["full"].shape
    att = micro["attention_mask"].clone()
    att[2, -micro["L"] - 1 + 1] = 0  # response 2's token 1 is predicted at a padded position
    indices = att.reshape(-1).nonzero().squeeze(1)
    rmpad = micro["full"].reshape(bs * S, V)[indices]
    with pytest.raises(ValueError, match="response 2 token 1 .* not in indices"):
        call(micro, logits=rmpad, logits_masked=rmpad, indices=indices, seqlen=S)
