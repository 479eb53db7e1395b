"""vppo.torch on CPU tensors: forward and backward against the f64 reference device and against an
eager PyTorch VPPO loss written here (autograd for its gradient), dtypes, rows, in place, opcheck,
torch.compile and errors. Small shapes: the suite runs in seconds."""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import vppo.torch as vt

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_batch(lengths=(5, 0, 7, 4), vocab=33, dtype=torch.float32, seed=0, rows_total=None):
    """A random packed batch. With rows_total, the logits are [rows_total, V] and `rows` picks N
    strictly increasing rows of them."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    r = n if rows_total is None else rows_total
    logits = (torch.randn(r, vocab, generator=g) * 2).to(dtype)
    logits_masked = (logits.float() + torch.randn(r, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    old_logp = (torch.randn(n, generator=g) * 0.3 - 3.0).float()
    advantages = torch.randn(len(lengths), generator=g).float()
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    rows = None
    if rows_total is not None:
        rows = torch.sort(torch.randperm(rows_total, generator=g)[:n]).values
    return dict(logits=logits, logits_masked=logits_masked, targets=targets, old_logp=old_logp,
                advantages=advantages, cu_seqlens=cu, rows=rows)


def call(b, **kw):
    rows = b.get("rows")
    return vt.vppo_loss(b["logits"], b["logits_masked"], b["targets"], b["old_logp"], b["advantages"],
                        b["cu_seqlens"], rows=rows, **kw)


# -------------------------------------------------------------------------------------------------
# The eager PyTorch VPPO loss (SPEC sections 2-5), in f64, gradient by autograd
# -------------------------------------------------------------------------------------------------


def eager_vppo(logits, logits_masked, targets, old_logp, advantages, cu_seqlens, *, top_fraction=0.4,
               perception="full-kl", score_clamp=10.0, shaping="mean-preserving", beta_min=0.9,
               beta_max=1.1, eps_low=0.2, eps_high=0.28, dual_clip=3.0, logp_penalty=0.06):
    """Token-mean aggregation, Z = N, batch scope for mean-preserving, group size 1 for linear."""
    a, b = logits, logits_masked.detach()
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    y = targets.long()[:, None]
    logp = la.gather(1, y)[:, 0]
    logp_m = lb.gather(1, y)[:, 0]
    kl = (la.exp() * (la - lb)).sum(-1)
    d = torch.clamp(logp_m - old_logp, -20, 20)
    k3 = torch.exp(d) - d - 1
    score = torch.clamp((kl if perception == "full-kl" else k3).detach(), 0, score_clamp)
    n = targets.numel()
    cu = cu_seqlens.tolist()
    mask = torch.zeros(n, dtype=torch.float64)
    sbar, ks = [], []
    for s, e in zip(cu[:-1], cu[1:]):
        length = e - s
        k = math.ceil(Fraction(str(top_fraction)) * length)
        ks.append(k)
        order = torch.sort(-score[s:e], stable=True).indices  # ties to the lower index
        mask[s + order[:k]] = 1.0
        sbar.append(score[s:e].mean().item() if length else 0.0)
    live = [i for i in range(len(sbar)) if cu[i + 1] > cu[i]]
    alpha = [1.0] * len(sbar)
    if shaping != "none" and live:
        scopes = [live] if shaping == "mean-preserving" else [[i] for i in live]
        for scope in scopes:
            lo, hi = min(sbar[i] for i in scope), max(sbar[i] for i in scope)
            if hi - lo <= 1e-6:
                continue
            nb = {i: min(max((sbar[i] - lo) / (hi - lo), 0.0), 1.0) for i in scope}
            bmax = beta_max
            if shaping == "mean-preserving":
                bmax = beta_min + (1 - beta_min) / (sum(nb.values()) / len(scope) + 1e-8)
            for i in scope:
                alpha[i] = beta_min + nb[i] * (bmax - beta_min)
    lens = torch.tensor([e - s for s, e in zip(cu[:-1], cu[1:])])
    adv_tok = torch.repeat_interleave(advantages.double() * torch.tensor(alpha, dtype=torch.float64),
                                      lens)
    r = torch.exp(torch.clamp(logp - old_logp.double(), -20, 20))
    rc = torch.clamp(r, 1 - eps_low, 1 + eps_high)
    l = torch.maximum(-adv_tok * r, -adv_tok * rc)
    if dual_clip is not None:
        l = torch.where(adv_tok < 0, torch.minimum(l, -adv_tok * dual_clip), l)
    pg = (mask * l).sum() / n
    loss = pg + logp_penalty * (-logp.sum()) / n
    return loss, dict(score=score, kl=kl, k3=k3, logp=logp, mask=mask, alpha=torch.tensor(alpha, dtype=torch.float64),
                      k=torch.tensor(ks), sbar=torch.tensor(sbar))


def eager_loss_and_grad(b, **options):
    x = b["logits"].double().requires_grad_(True)
    if b.get("rows") is not None:
        picked, masked = x[b["rows"]], b["logits_masked"].double()[b["rows"]]
    else:
        picked, masked = x, b["logits_masked"].double()
    loss, out = eager_vppo(picked, masked, b["targets"], b["old_logp"], b["advantages"],
                           b["cu_seqlens"], **options)
    loss.backward()
    return loss.item(), out, x.grad


def vppo_loss_and_grad(b, **kw):
    x = b["logits"].clone().requires_grad_(True)
    loss, out = vt.vppo_loss(x, b["logits_masked"], b["targets"], b["old_logp"], b["advantages"],
                             b["cu_seqlens"], rows=b.get("rows"), **kw)
    loss.backward()
    return loss, out, x.grad


# -------------------------------------------------------------------------------------------------
# Forward and backward
# -------------------------------------------------------------------------------------------------

OPTION_SETS = [
    {},
    dict(perception="k3", top_fraction=0.5),
    dict(shaping="linear", dual_clip=None, eps_high=0.2),
    dict(shaping="none", top_fraction=1.0, logp_penalty=0.0),
]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_matches_eager_pytorch_f32(options):
    b = make_batch(seed=1)
    ref_loss, ref, ref_grad = eager_loss_and_grad(b, **options)
    loss, out, grad = vppo_loss_and_grad(b, **options)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert torch.equal(out["mask"].double(), ref["mask"])
    assert torch.equal(out["k"].long(), ref["k"])
    torch.testing.assert_close(out["logp"].double(), ref["logp"].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["kl"].double(), ref["kl"].detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["k3"].double(), ref["k3"].detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["alpha"].double(), ref["alpha"], rtol=1e-5, atol=1e-5)
    assert grad.dtype == torch.float32 and grad.shape == b["logits"].shape
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kl_penalty", ["k1", "abs", "mse", "k3", "low_var_kl"])
@pytest.mark.parametrize("device", ["simt", "reference"])
def test_kl_penalty_matches_eager_pytorch(kl_penalty, device):
    """SPEC 12: the official compute_kl on every response token (masked or not), averaged as the
    token-mean policy loss, times kl_coef, added to the loss; the gradient by autograd."""
    b = make_batch(seed=5)
    n = b["targets"].numel()
    g = torch.Generator().manual_seed(9)
    ref_logp = (b["old_logp"] + 1.5 * torch.randn(n, generator=g)).float()
    x = b["logits"].double().requires_grad_(True)
    loss, out = eager_vppo(x, b["logits_masked"].double(), b["targets"], b["old_logp"],
                           b["advantages"], b["cu_seqlens"])
    d = out["logp"] - ref_logp.double()
    if kl_penalty in ("k3", "low_var_kl"):
        kl = torch.clamp(-d, -20, 20)
        kld = torch.clamp(kl.exp() - kl - 1, -10, 10)
    else:
        kld = {"k1": d, "abs": d.abs(), "mse": 0.5 * d.square()}[kl_penalty]
    kl_loss = kld.sum() / n
    (loss + 0.5 * kl_loss).backward()
    got_loss, got, grad = vppo_loss_and_grad(b, ref_logp=ref_logp, kl_penalty=kl_penalty, kl_coef=0.5,
                                             device=device)
    assert got_loss.item() == pytest.approx(loss.item() + 0.5 * kl_loss.item(), rel=1e-5, abs=1e-6)
    assert got["kl_loss"].item() == pytest.approx(kl_loss.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad.double(), x.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", ["simt", "reference"])
@pytest.mark.parametrize("rows_total,in_place", [(None, False), (30, False), (None, True)])
def test_full_kl_penalty_matches_eager_pytorch(device, rows_total, in_place):
    """SPEC 12, kl_penalty="full": the exact KL(pi || pi_ref) over the vocabulary of every response
    token (F.kl_div with log_target, summed over V), token-mean, times kl_coef, added to the loss;
    its gradient by autograd through log_softmax (the reference is constant), with rows and in place."""
    b = make_batch(seed=21, rows_total=rows_total)
    g = torch.Generator().manual_seed(4)
    ref_logits = (b["logits"] + 1.5 * torch.randn(b["logits"].shape, generator=g)).float()
    x = b["logits"].double().requires_grad_(True)
    rows = b["rows"]
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    loss, out = eager_vppo(pick(x), pick(b["logits_masked"].double()), b["targets"], b["old_logp"],
                           b["advantages"], b["cu_seqlens"])
    logp = F.log_softmax(pick(x), -1)
    logr = F.log_softmax(pick(ref_logits.double()), -1)
    kl = F.kl_div(logr, logp, log_target=True, reduction="none").sum(-1)
    n = b["targets"].numel()
    kl_loss = kl.sum() / n
    (loss + 0.5 * kl_loss).backward()
    y = b["logits"].clone().requires_grad_(True)
    source = y * 1.0 if in_place else y  # in place overwrites the op's input: give it a copy
    got_loss, got = vt.vppo_loss(source, b["logits_masked"], b["targets"], b["old_logp"],
                                 b["advantages"], b["cu_seqlens"], rows=rows, ref_logits=ref_logits,
                                 kl_penalty="full", kl_coef=0.5, device=device, in_place=in_place)
    got_loss.backward()
    assert got_loss.item() == pytest.approx(loss.item() + 0.5 * kl_loss.item(), rel=1e-5, abs=1e-6)
    assert got["kl_loss"].item() == pytest.approx(kl_loss.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(got["ref_kl"].double(), kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.grad.double(), x.grad, rtol=1e-4, atol=1e-6)
    # Twice the incoming gradient, twice the gradient (the KL term's too).
    y2 = b["logits"].clone().requires_grad_(True)
    loss2, _ = vt.vppo_loss(y2, b["logits_masked"], b["targets"], b["old_logp"], b["advantages"],
                            b["cu_seqlens"], rows=rows, ref_logits=ref_logits, kl_penalty="full",
                            kl_coef=0.5, device=device)
    (2.0 * loss2).backward()
    torch.testing.assert_close(y2.grad.double(), 2.0 * x.grad, rtol=1e-4, atol=1e-6)


def test_full_kl_penalty_errors():
    b = make_batch(seed=22)
    with pytest.raises(ValueError, match="ref_logits"):
        call(b, kl_penalty="full")
    with pytest.raises(ValueError, match="ref_logits is bfloat16"):
        call(b, kl_penalty="full", ref_logits=b["logits"].bfloat16())
    with pytest.raises(ValueError, match="ref_logits is float32"):
        call(b, kl_penalty="full", ref_logits=b["logits"][:-1].contiguous())


@pytest.mark.parametrize("device", ["simt", "reference"])
def test_ref_logits_are_ignored_under_other_penalties(device):
    """SPEC 12: ref_logits are read by kl_penalty="full" only. Under another penalty the loss and the
    gradient are those without them, and a -inf in them against finite logits makes no NaN: through
    vt.vppo_loss, and through the op itself, whose backward then gets [3, N] zeros for `full`."""
    b = make_batch(seed=24)
    ref = b["logits"].clone()
    ref[2, 5] = float("-inf")
    kw = dict(kl_penalty="k1", ref_logp=b["old_logp"] - 0.1, device=device)
    x = b["logits"].clone().requires_grad_(True)
    loss, out = call(dict(b, logits=x), ref_logits=ref, **kw)
    loss.backward()
    y = b["logits"].clone().requires_grad_(True)
    want, _ = call(dict(b, logits=y), **kw)
    want.backward()
    assert loss.item() == want.item() and "ref_kl" not in out
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad, y.grad)
    # The op itself, given ref_logits under kl_penalty none (the backward's full path ignored).
    args = op_args(b)
    z = args[0]
    result = vt._loss(*args, None, None, ref)
    result[0].backward()
    w = b["logits"].clone().requires_grad_(True)
    call(dict(b, logits=w))[0].backward()
    assert torch.isfinite(z.grad).all() and torch.equal(z.grad, w.grad)


def test_opcheck_full_kl():
    b = make_batch(seed=23)
    # (the op's vocab_group, seq_group, then ref_logits)
    args = op_args(b, kl_penalty="full", kl_coef=0.25) + (None, None, b["logits"] * 0.5)
    torch.library.opcheck(vt._loss, args)


def test_kl_penalty_needs_a_float32_ref_logp():
    b = make_batch(seed=6)
    with pytest.raises(ValueError, match="ref_logp is missing: kl_penalty = k3"):
        call(b, kl_penalty="k3")
    with pytest.raises(ValueError, match="ref_logp has dtype float64"):
        call(b, kl_penalty="k1", ref_logp=b["old_logp"].double())
    bad = b["old_logp"].clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="ref_logp has a non-finite value"):
        call(b, kl_penalty="k1", ref_logp=bad)
    with pytest.raises(ValueError, match="kl-coef"):
        call(b, kl_penalty="k1", ref_logp=b["old_logp"], kl_coef=-1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_simt_matches_reference_device(dtype):
    b = make_batch(dtype=dtype, seed=2)
    loss_s, out_s, grad_s = vppo_loss_and_grad(b, device="simt", perception="k3")
    loss_r, out_r, grad_r = vppo_loss_and_grad(b, device="reference", perception="k3")
    assert loss_s.item() == pytest.approx(loss_r.item(), rel=1e-5, abs=1e-6)
    for name in vt.TOKEN_OUTPUTS + vt.RESPONSE_OUTPUTS:
        assert out_s[name].shape == out_r[name].shape, name
        if name in ("mask", "k"):
            assert torch.equal(out_s[name], out_r[name]), name
        else:
            torch.testing.assert_close(out_s[name], out_r[name], rtol=1e-4, atol=1e-5, msg=name)
    for name in vt.STATS:
        assert out_s[name].item() == pytest.approx(out_r[name].item(), rel=1e-5, abs=1e-7), name
    assert grad_s.dtype == dtype and grad_r.dtype == dtype
    # Both round the same f32-or-better gradient to the dtype: at most one unit apart.
    torch.testing.assert_close(grad_s.float(), grad_r.float(), rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_eager_on_the_same_values(dtype):
    b = make_batch(dtype=dtype, seed=3)
    ref_loss, ref, ref_grad = eager_loss_and_grad(b)  # f64 on exactly the bf16/f16 values
    loss, out, grad = vppo_loss_and_grad(b)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert torch.equal(out["mask"].double(), ref["mask"])
    assert grad.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(grad.double(), ref_grad, rtol=eps, atol=1e-6)


def test_grad_dtype_f32_is_the_unrounded_gradient():
    b = make_batch(dtype=torch.bfloat16, seed=4)
    _, _, ref_grad = eager_loss_and_grad(b)
    x = b["logits"].clone().requires_grad_(True)
    loss, out = vt.vppo_loss(x, b["logits_masked"], b["targets"], b["old_logp"], b["advantages"],
                             b["cu_seqlens"])
    (g32,) = torch.autograd.grad(loss, x, torch.ones(()), retain_graph=True)
    # The backward op itself returns f32 (autograd then stores it in the input's dtype).
    saved = vt._loss_backward(x.detach(), b["targets"], out["lse"], out["dlogp"], None, "{}", "simt",
                              "f32")
    assert saved.dtype == torch.float32
    torch.testing.assert_close(saved.double(), ref_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g32.float(), saved, rtol=1e-2, atol=1e-6)
    loss2, _ = vt.vppo_loss(x, b["logits_masked"], b["targets"], b["old_logp"], b["advantages"],
                            b["cu_seqlens"], grad_dtype="f32")
    (g,) = torch.autograd.grad(loss2, x)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), saved.bfloat16().float(), rtol=0, atol=0)


def test_incoming_gradient_scales_the_gradient():
    b = make_batch(seed=5)
    x = b["logits"].clone().requires_grad_(True)
    loss, _ = call(dict(b, logits=x))
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g3,) = torch.autograd.grad(loss * -2.5, x)
    torch.testing.assert_close(g3, -2.5 * g1, rtol=1e-6, atol=1e-7)


def test_ties_go_to_the_lower_index():
    b = make_batch(lengths=(8,), seed=6)
    # Tokens 2, 4, 5 and 7 see a very different masked row (kl far above 1), the others the same
    # row (kl ~ 0): with score_clamp = 1 the four tie exactly at 1, and k = 2 of 8 takes 2 and 4.
    b["logits_masked"] = b["logits"].clone()
    for t in (2, 4, 5, 7):
        b["logits_masked"][t] = -b["logits"][t] * 4
    _, out = call(b, top_fraction=0.25, score_clamp=1.0)
    assert out["score"][[2, 4, 5, 7]].tolist() == [1.0] * 4
    assert out["mask"].tolist() == [0, 0, 1, 0, 1, 0, 0, 0]
    _, ref, _ = eager_loss_and_grad(b, top_fraction=0.25, score_clamp=1.0)
    assert out["mask"].tolist() == ref["mask"].long().tolist()


# -------------------------------------------------------------------------------------------------
# Rows (SPEC section 10)
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_read_r_by_v_logits_and_give_zero_rows(dtype):
    b = make_batch(dtype=dtype, seed=7, rows_total=30)
    loss, out, grad = vppo_loss_and_grad(b)
    assert grad.shape == (30, b["logits"].shape[1])
    unread = torch.ones(30, dtype=torch.bool)
    unread[b["rows"]] = False
    assert torch.count_nonzero(grad[unread]) == 0
    # The same as the packed [N, V] batch gathered by hand.
    packed = dict(b, logits=b["logits"][b["rows"]].contiguous(),
                  logits_masked=b["logits_masked"][b["rows"]].contiguous(), rows=None)
    loss_p, out_p, grad_p = vppo_loss_and_grad(packed)
    # The same up to f32 rounding (the row path sums in another order).
    assert loss.item() == pytest.approx(loss_p.item(), rel=1e-6)
    torch.testing.assert_close(grad[b["rows"]], grad_p, rtol=1e-5, atol=1e-6)
    assert torch.equal(out["mask"], out_p["mask"])
    if dtype == torch.float32:
        ref_loss, _, ref_grad = eager_loss_and_grad(b)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_masked_rows():
    b = make_batch(seed=8, rows_total=25)
    n = b["targets"].numel()
    g = torch.Generator().manual_seed(9)
    masked_full = torch.randn(40, b["logits"].shape[1], generator=g)
    masked_rows = torch.randperm(40, generator=g)[:n]
    loss, out = vt.vppo_loss(b["logits"], masked_full, b["targets"], b["old_logp"], b["advantages"],
                             b["cu_seqlens"], rows=b["rows"], masked_rows=masked_rows)
    packed = dict(b, logits=b["logits"][b["rows"]].contiguous(),
                  logits_masked=masked_full[masked_rows].contiguous(), rows=None)
    loss_p, out_p = call(packed)
    assert loss.item() == pytest.approx(loss_p.item(), rel=1e-6)
    torch.testing.assert_close(out["kl"], out_p["kl"], rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------
# In place
# -------------------------------------------------------------------------------------------------


def test_in_place_writes_the_gradient_over_the_logits():
    b = make_batch(dtype=torch.bfloat16, seed=10, rows_total=20)
    _, _, grad = vppo_loss_and_grad(b)
    w = torch.randn(b["logits"].shape[1], b["logits"].shape[1], dtype=torch.bfloat16,
                    requires_grad=True)
    h = b["logits"].clone()
    logits = h @ w  # a non-leaf, as a model's output
    logits_before = logits.detach().clone()
    version = logits._version
    loss, _ = vt.vppo_loss(logits, b["logits_masked"], b["targets"], b["old_logp"], b["advantages"],
                           b["cu_seqlens"], rows=b["rows"], in_place=True)
    logits.retain_grad()
    loss.backward()
    assert logits._version > version
    # The logits storage now holds the gradient, and that is what reached w.
    _, _, expected = vppo_loss_and_grad(dict(b, logits=logits_before))
    assert torch.equal(logits.detach(), expected)
    assert torch.equal(logits.grad, expected)
    torch.testing.assert_close(w.grad.float(), (h.t().float() @ expected.float()), rtol=2e-2,
                               atol=2e-2)
    assert grad.shape == expected.shape


def test_in_place_raises_when_the_logits_are_saved_elsewhere():
    """Liger-Kernel #272: an in-place gradient over logits another node saved corrupted that node's
    gradient silently. Here the version counter makes autograd raise."""
    b = make_batch(seed=11)
    x = b["logits"].clone().requires_grad_(True)
    logits = x * 1.0
    other = (logits ** 2).sum()  # PowBackward saves `logits`
    loss, _ = call(dict(b, logits=logits), in_place=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_in_place_error_leaves_the_logits_untouched():
    b = make_batch(seed=12)
    x = b["logits"].clone().requires_grad_(True)
    logits = x * 1.0
    before = logits.detach().clone()
    loss, _ = call(dict(b, logits=logits), in_place=True)
    with pytest.raises(ValueError, match="dlogp"):
        loss.backward(torch.tensor(float("inf")))
    assert torch.equal(logits.detach(), before)


# -------------------------------------------------------------------------------------------------
# torch.library and torch.compile
# -------------------------------------------------------------------------------------------------


def op_args(b, **options):
    return (b["logits"].clone().requires_grad_(True), b["logits_masked"], b["targets"], b["old_logp"],
            b["advantages"], b["cu_seqlens"], b.get("rows"), None, None, vt._options_json(options),
            "simt", "logits", False, None, -1, 0, -1)


@pytest.mark.parametrize("rows_total", [None, 24])
def test_opcheck(rows_total):
    b = make_batch(seed=13, rows_total=rows_total)
    torch.library.opcheck(torch.ops.vppo.loss.default, op_args(b, perception="k3"))


def test_opcheck_backward_ops():
    b = make_batch(seed=14)
    _, out = call(b)
    args = (b["logits"], b["targets"].int(), out["lse"], out["dlogp"], None, "{}", "simt")
    torch.library.opcheck(torch.ops.vppo.loss_backward.default, args + ("logits",))
    torch.library.opcheck(torch.ops.vppo.loss_backward_.default,
                          (b["logits"].clone(),) + args[1:])


def test_compile_fullgraph():
    b = make_batch(seed=15, rows_total=22)
    module = vt.VppoLoss(top_fraction=0.5, perception="k3", dual_clip=None)

    def step(logits, logits_masked, targets, old_logp, advantages, cu, rows):
        loss, out = module(logits, logits_masked, targets, old_logp, advantages, cu, rows=rows)
        return loss * 2.0, out["mask"].sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = b["logits"].clone().requires_grad_(True)
    args = (b["logits_masked"], b["targets"], b["old_logp"], b["advantages"], b["cu_seqlens"],
            b["rows"])
    loss, selected = compiled(x, *args)
    loss.backward()
    y = b["logits"].clone().requires_grad_(True)
    loss_e, selected_e = step(y, *args)
    loss_e.backward()
    assert loss.item() == loss_e.item() and selected.item() == selected_e.item()
    assert torch.equal(x.grad, y.grad)


# -------------------------------------------------------------------------------------------------
# Errors
# -------------------------------------------------------------------------------------------------


def test_crate_errors_are_value_errors_with_its_message():
    b = make_batch(seed=16)
    bad = dict(b, logits=b["logits"].clone())
    bad["logits"][6, 3] = float("nan")
    with pytest.raises(ValueError, match=r"logits.*row 6"):
        call(bad)
    bad = dict(b, targets=b["targets"].clone())
    bad["targets"][2] = 1000
    with pytest.raises(ValueError, match="targets"):
        call(bad)
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(dict(b, cu_seqlens=torch.tensor([0, 5, 5, 12, 15], dtype=torch.int32)))
    with pytest.raises(ValueError, match="top-fraction"):
        call(b, top_fraction=1.5)
    with pytest.raises(ValueError, match="bogus"):
        call(b, bogus=1)
    with pytest.raises(ValueError, match="int32"):
        call(dict(b, targets=b["targets"] + 2**32))


def test_nothing_is_written_for_a_bad_batch():
    b = make_batch(seed=17)
    x = b["logits"].clone().requires_grad_(True)
    old = b["old_logp"].clone()
    old[0] = float("inf")
    with pytest.raises(ValueError, match="old_logp"):
        call(dict(b, logits=x, old_logp=old))
    assert x.grad is None


def test_input_checks_name_the_tensor():
    b = make_batch(seed=18)
    wide = torch.randn(b["logits"].shape[0], 2 * b["logits"].shape[1])[:, ::2]
    with pytest.raises(ValueError, match="logits is not contiguous"):
        call(dict(b, logits=wide))
    with pytest.raises(ValueError, match="logits_masked is not contiguous"):
        call(dict(b, logits_masked=b["logits_masked"].t().contiguous().t()))
    with pytest.raises(ValueError, match="old_logp has dtype float64"):
        call(dict(b, old_logp=b["old_logp"].double()))
    with pytest.raises(ValueError, match="logits_masked has dtype"):
        call(dict(b, logits_masked=b["logits_masked"].half()))
    with pytest.raises(ValueError, match='device="cuda" needs CUDA tensors'):
        call(b, device="cuda")
    with pytest.raises(ValueError, match='device must be "cuda", "simt" or "reference"'):
        call(b, device="gpu")
    with pytest.raises(RuntimeError, match="takes CUDA or CPU tensors"):
        call(dict(b, logits=b["logits"].to("meta")))
    with pytest.raises(RuntimeError, match="old_logp is on meta"):
        call(dict(b, old_logp=b["old_logp"].to("meta")))
    with pytest.raises(ValueError, match="in_place"):
        call(b, in_place=True, grad_dtype="f32")


def test_empty_batch():
    b = make_batch(lengths=(0, 0), seed=19)
    x = b["logits"].clone().requires_grad_(True)
    loss, out = call(dict(b, logits=x))
    assert loss.item() == 0.0 and out["mask"].numel() == 0
    loss.backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", ["simt", "reference"])
@pytest.mark.parametrize("in_place", [False, True])
def test_no_token_read_through_rows_gives_zero_rows(device, in_place):
    """N = 0 with rows over [R, V] logits: the gradient is [R, V] of zeros, not unwritten memory."""
    b = make_batch(lengths=(0, 0), seed=20, rows_total=5)
    x = b["logits"].clone().requires_grad_(True)
    y = x * 1.0 if in_place else x  # in place overwrites its input: a non-leaf
    loss, _ = call(dict(b, logits=y), device=device, in_place=in_place)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
