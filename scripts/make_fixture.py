#!/usr/bin/env python3
"""Writes the safetensors fixtures that tests/cli.rs feeds to `vppo loss`.

Run once (the outputs are committed):

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install numpy safetensors
    /tmp/venv/bin/python scripts/make_fixture.py

tests/fixtures/batch_f16.safetensors: a packed batch as another program writes it: f16 logits,
int64 targets (numpy's default integer; vppo accepts I64 within the i32 range), int32 cu_seqlens,
f32 old_logp and advantages, plus an unrelated tensor that vppo must ignore.
B = 4 responses of lengths 5, 0, 1, 7 (N = 13), V = 11. logits_masked[3, targets[3]] = -inf
(allowed: kl = +inf, score = score_clamp).

tests/fixtures/expected_f16.safetensors: the outputs of the default (official) configuration
computed here by an independent NumPy implementation of SPEC sections 2 to 6, in float64.
"""
import os

import numpy as np
from safetensors.numpy import save_file

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def make_batch(rng):
    lengths = [5, 0, 1, 7]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    n, v = int(cu[-1]), 11
    logits = (rng.standard_normal((n, v)) * 2.0).astype(np.float16)
    masked = (logits.astype(np.float32) + rng.standard_normal((n, v)).astype(np.float32) * 0.7).astype(np.float16)
    targets = rng.integers(0, v, size=n).astype(np.int64)
    logits[6, (targets[6] + 1) % v] = -np.inf  # a -inf logit away from the target
    masked[3, targets[3]] = -np.inf
    a = logits.astype(np.float64)
    logp = a[np.arange(n), targets] - logsumexp(a)
    old_logp = (logp + rng.uniform(-0.5, 0.5, size=n)).astype(np.float32)
    advantages = np.array([1.0, -0.5, -1.25, 0.75], dtype=np.float32)
    return dict(
        logits=logits,
        logits_masked=masked,
        targets=targets,
        old_logp=old_logp,
        advantages=advantages,
        cu_seqlens=cu,
        unrelated=np.zeros(3, dtype=np.float32),
    )


def logsumexp(x):
    m = np.max(x, axis=-1, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def vppo_official(b):
    """The default configuration: full-kl, clamp 10, top 0.4, mean-preserving TAS over the batch
    (beta_min 0.9), eps 0.2/0.28, dual clip 3, token-mean, logp penalty 0.06, tau 1."""
    a = b["logits"].astype(np.float64)
    m = b["logits_masked"].astype(np.float64)
    y = b["targets"]
    cu = b["cu_seqlens"]
    old = b["old_logp"].astype(np.float64)
    adv = b["advantages"].astype(np.float64)
    n = a.shape[0]
    rows = np.arange(n)

    la = a - logsumexp(a)[:, None]  # log p
    lb = m - logsumexp(m)[:, None]  # log q
    p = np.exp(la)
    logp = la[rows, y]
    logp_masked = lb[rows, y]
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (la - lb), 0.0)
    kl = np.where(np.any((p > 0) & np.isneginf(lb), axis=1), np.inf, terms.sum(axis=1))
    kl = np.where(np.isinf(kl), kl, np.maximum(kl, 0.0))
    with np.errstate(invalid="ignore"):
        entropy = -np.sum(np.where(p > 0, p * la, 0.0), axis=1)
    d = np.clip(logp_masked - old, -20, 20)
    k3 = np.exp(d) - d - 1
    score = np.clip(kl, 0, 10.0)

    mask = np.zeros(n, dtype=np.uint8)
    sbar = np.zeros(len(adv))
    for r in range(len(adv)):
        s, e = cu[r], cu[r + 1]
        if e == s:
            continue
        k = -(-2 * (e - s) // 5)  # ceil(0.4 L) in integers
        order = np.argsort(-score[s:e], kind="stable")
        mask[s + order[:k]] = 1
        sbar[r] = score[s:e].mean()

    live = np.array([cu[r + 1] > cu[r] for r in range(len(adv))])
    alpha = np.ones(len(adv))
    lo, hi = sbar[live].min(), sbar[live].max()
    if hi - lo > 1e-6:
        nb = np.clip((sbar - lo) / (hi - lo), 0, 1)
        beta_max = 0.9 + 0.1 / (nb[live].mean() + 1e-8)
        alpha[live] = 0.9 + nb[live] * (beta_max - 0.9)

    z = float(n)
    loss_pg, dlogp = 0.0, np.full(n, -0.06 / z)
    for r in range(len(adv)):
        ap = alpha[r] * adv[r]
        for t in range(cu[r], cu[r + 1]):
            delta = logp[t] - old[t]
            ratio = np.exp(np.clip(delta, -20, 20))
            rc = np.clip(ratio, 0.8, 1.28)
            u, c = -ap * ratio, -ap * rc
            if 0.8 <= ratio <= 1.28 or u > c:
                l, g = u, -ap * ratio
            else:
                l, g = c, 0.0
            if ap < 0 and l > -ap * 3.0:
                l, g = -ap * 3.0, 0.0
            if mask[t]:
                loss_pg += l / z
                dlogp[t] += g / z
    loss = loss_pg + 0.06 * (-logp.sum()) / z
    onehot = np.zeros_like(p)
    onehot[rows, y] = 1.0
    grad = dlogp[:, None] * (onehot - p)
    return dict(
        loss=np.array([loss]),
        pg_loss=np.array([loss_pg]),
        score=score,
        kl=kl,
        k3=k3,
        entropy=entropy,
        logp=logp,
        mask=mask,
        sbar=sbar,
        alpha=alpha,
        grad_logits=grad,
    )


def main():
    os.makedirs(HERE, exist_ok=True)
    batch = make_batch(np.random.default_rng(20251009))
    save_file(batch, os.path.join(HERE, "batch_f16.safetensors"))
    expected = vppo_official(batch)
    save_file(expected, os.path.join(HERE, "expected_f16.safetensors"))
    print("loss", expected["loss"][0], "mask", expected["mask"], "alpha", expected["alpha"])


if __name__ == "__main__":
    main()
