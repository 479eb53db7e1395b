#!/usr/bin/env python3
"""VPPO loss: this crate against eager PyTorch (and Liger-Kernel's GRPO loss on a GPU), same inputs.

What it does, for each size:
  1. writes a random packed batch (SPEC section 1) with the `safetensors` package to a temp dir;
  2. check: compares the eager PyTorch implementation below with the crate's outputs (from the op
     `vt.vppo_loss` in-process, or from `vppo loss` with --vppo-impl cli) (loss, per-token score/kl/k3/logp/entropy, the mask where no near-tie decides it,
     sbar/alpha, dloss/dlogits) with the tolerances stated in CHECK_TOL;
  3. times eager PyTorch: forward, and forward + backward (autograd), median of --iters after
     --warmup, with torch.cuda.Event on a GPU and time.perf_counter on the CPU; peak extra memory with
     torch.cuda.max_memory_allocated on a GPU, and on the CPU the process's peak resident set (VmHWM,
     reset through /proc/self/clear_refs) minus the resident set before;
  4. times the crate: in-process by default, `vt.vppo_loss` forward and forward + backward on the same
     tensors as eager PyTorch (CUDA tensors used in place on a GPU; the SIMT executor on the CPU), peak
     memory as torch's allocator peak plus the crate's own allocations; or, with --vppo-impl cli (or
     when the package is not installed), `vppo bench --input FILE --json` (the file is read once by
     vppo, outside its timings; see src/bench.rs);
  5. on a GPU, when `import liger_kernel` works: times Liger's triton_grpo_loss plus a separate
     full-vocabulary KL pass (the closest existing fused alternative; see time_liger);
and prints one table. Nothing is installed: torch, numpy and safetensors must be importable.

The eager implementation follows the structure of the official VPPO code (an EasyR1 fork): log-probs
by log_softmax in float32 and gather, the entropy from the softmax, the token score (k3 as the official
code, or the exact full-vocabulary KL, the crate's default), a per-response top-k mask by torch.sort
(stable, so ties go to the lower index, as SPEC section 3 asks), mean-preserving TAS, the DAPO clipped
surrogate with dual clip, token-mean over all response tokens, and the logp penalty 0.06. The
defaults are the crate's (VppoConfig::default()).

Run (from the repository root, after `cargo build --release`):
  python3 bench/compare_torch.py --device cpu --sizes 256,1024 --vocab 32000 --dtype bf16,f32
  python3 bench/compare_torch.py --device cuda --sizes 1024,4096,16384 --vocab 151936 --dtype bf16
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

# The crate's defaults (SPEC; VppoConfig::default()).
DEFAULTS = dict(
    perception="full-kl",
    score_clamp=10.0,
    top_fraction=0.4,
    beta_min=0.9,
    eps_low=0.2,
    eps_high=0.28,
    dual_clip=3.0,
    logp_penalty=0.06,
    temperature=1.0,
)
TAS_MIN_SPREAD = 1e-6
TAS_MEAN_EPS = 1e-8
LOG_RATIO_CLAMP = 20.0

# Tolerances of the check, eager PyTorch (float32 arithmetic on logits widened exactly from their
# dtype) against the crate's f64 reference rounded to f32. They are what f32 log_softmax over a
# vocabulary of V achieves: errors grow like V * 2^-24 relative to the row's scale.
CHECK_TOL = dict(
    loss=dict(rtol=1e-4, atol=1e-6),
    logp=dict(rtol=1e-4, atol=1e-4),
    entropy=dict(rtol=1e-4, atol=1e-4),
    kl=dict(rtol=1e-3, atol=1e-4),
    k3=dict(rtol=1e-3, atol=1e-4),
    score=dict(rtol=1e-3, atol=1e-4),
    sbar=dict(rtol=1e-3, atol=1e-4),
    alpha=dict(rtol=1e-3, atol=1e-4),
    # dloss/dlogits: max |error| relative to max |grad|
    grad_rel=1e-4,
    # a response's mask is compared exactly when the gap between the k-th and (k+1)-th highest scores
    # is larger than this (else a near-tie may fall either way in f32 vs f64)
    mask_gap=1e-4,
)

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


# --------------------------------------------------------------------------------------------------
# The eager PyTorch VPPO loss
# --------------------------------------------------------------------------------------------------


def log_probs_from_logits(logits, labels):
    """log softmax(logits)[label] per row, in float32 (as the official code computes log-probs)."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    return logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits):
    """-sum_v p_v log p_v per row, float32; p_v = 0 terms give 0."""
    logits = logits.float()
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


def full_vocab_kl(logits, logits_masked):
    """KL(softmax(a) || softmax(b)) over the whole vocabulary, float32; +inf where p_v > 0, b_v = -inf."""
    logp_a = torch.log_softmax(logits.float(), dim=-1)
    logp_b = torch.log_softmax(logits_masked.float(), dim=-1)
    p = logp_a.exp()
    terms = torch.where(p > 0, p * (logp_a - logp_b), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0.0)


def k_for(top_fraction, length):
    """k = ceil(top_fraction * L) in exact arithmetic (0.4 x 10 is 4)."""
    f = Fraction(repr(top_fraction))
    return -((-f.numerator * length) // f.denominator)


def vppo_loss_eager(logits, logits_masked, targets, old_logp, advantages, cu_seqlens, cfg):
    """The VPPO loss, eager PyTorch. logits [N, V] may require grad; returns (loss, dict of outputs)."""
    tau = cfg["temperature"]
    n = targets.shape[0]
    cu = cu_seqlens.tolist()
    n_resp = len(cu) - 1

    # The policy's log-probs: the only part with a gradient.
    logp = log_probs_from_logits(logits / tau, targets.long())

    # Token perception: no gradient flows through the score, the mask or alpha.
    with torch.no_grad():
        logp_masked = log_probs_from_logits(logits_masked / tau, targets.long())
        entropy = entropy_from_logits(logits / tau)
        d = torch.clamp(logp_masked - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        k3 = torch.exp(d) - d - 1
        kl = full_vocab_kl(logits / tau, logits_masked / tau)
        raw = kl if cfg["perception"] == "full-kl" else k3
        score = torch.clamp(raw, 0.0, cfg["score_clamp"])

        # TGF: per response, the top-k tokens by score; stable sort: ties to the lower index.
        mask = torch.zeros(n, dtype=torch.bool, device=logits.device)
        sbar = torch.zeros(n_resp, dtype=torch.float64, device=logits.device)
        lengths = []
        for b in range(n_resp):
            s, e = cu[b], cu[b + 1]
            lengths.append(e - s)
            if e == s:
                continue
            order = torch.sort(score[s:e], descending=True, stable=True).indices
            mask[s + order[: k_for(cfg["top_fraction"], e - s)]] = True
            sbar[b] = score[s:e].double().mean()

        # TAS, mean-preserving over the batch (the official code).
        alpha = torch.ones(n_resp, dtype=torch.float64, device=logits.device)
        members = [b for b in range(n_resp) if lengths[b] > 0]
        if members:
            sm = sbar[members]
            lo, hi = sm.min(), sm.max()
            if (hi - lo).item() > TAS_MIN_SPREAD:
                nb = ((sm - lo) / (hi - lo)).clamp(0.0, 1.0)
                beta_min = cfg["beta_min"]
                beta_max = beta_min + (1.0 - beta_min) / (nb.mean() + TAS_MEAN_EPS)
                alpha[members] = beta_min + nb * (beta_max - beta_min)
        lens = torch.tensor(lengths, device=logits.device)
        adv_tok = torch.repeat_interleave((alpha * advantages.double()).float(), lens, output_size=n)

    # The DAPO clipped surrogate with dual clip (as EasyR1's compute_policy_loss).
    negative_approx_kl = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(negative_approx_kl)
    pg_losses = -adv_tok * ratio
    pg_losses2 = -adv_tok * torch.clamp(ratio, 1.0 - cfg["eps_low"], 1.0 + cfg["eps_high"])
    clipped = torch.maximum(pg_losses, pg_losses2)
    if cfg["dual_clip"] is not None:
        pg_losses3 = -adv_tok * cfg["dual_clip"]
        clipped = torch.where(adv_tok < 0, torch.minimum(clipped, pg_losses3), clipped)
    z = float(n)  # token-mean over all response tokens, masked or not
    pg_loss = (clipped * mask).sum() / z
    loss = pg_loss + cfg["logp_penalty"] * (-logp.sum()) / z
    outputs = dict(
        logp=logp.detach(),
        logp_masked=logp_masked,
        entropy=entropy,
        kl=kl,
        k3=k3,
        score=score,
        mask=mask,
        sbar=sbar,
        alpha=alpha,
    )
    return loss, outputs


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def make_batch(n, vocab, n_resp, dtype, seed):
    """A random packed batch: logits ~ 2 N(0,1); logits_masked = logits + eps_t N(0,1), eps_t uniform in
    [0, 1.5) per token; uniform targets; old_logp = logp + U(-0.3, 0.3); advantages U(-1, 1); responses
    of lengths drawn around N / B."""
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(n, vocab, generator=g)).to(dtype)
    eps = 1.5 * torch.rand(n, 1, generator=g)
    logits_masked = (logits.float() + eps * torch.randn(n, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g, dtype=torch.int32)
    logp = log_probs_from_logits(logits, targets.long())
    old_logp = (logp + 0.6 * torch.rand(n, generator=g) - 0.3).float()
    advantages = 2.0 * torch.rand(n_resp, generator=g) - 1.0
    # lengths: N / B each, moved by up to half in either direction, summing to N
    base = n // n_resp
    cuts = sorted(
        min(n, max(0, (i * base) + int((torch.rand(1, generator=g).item() - 0.5) * base)))
        for i in range(1, n_resp)
    )
    cu_seqlens = torch.tensor([0] + cuts + [n], dtype=torch.int32)
    batch = dict(
        logits=logits,
        logits_masked=logits_masked,
        targets=targets,
        old_logp=old_logp,
        advantages=advantages.float(),
        cu_seqlens=cu_seqlens,
    )
    return {k: v.contiguous() for k, v in batch.items()}


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# The crate, through its command line
# --------------------------------------------------------------------------------------------------


def run_vppo(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def crate_outputs_cli(args, path, workdir):
    """The crate's outputs for the batch file at `path`, from `vppo loss` (the f64 reference)."""
    out_path = os.path.join(workdir, "out.safetensors")
    run_vppo([args.vppo_bin, "loss", "--input", path, "--output", out_path, "--device", "cpu"])
    return load_file(out_path)


def crate_outputs_op(batch, device):
    """The crate's outputs for `batch`, from the op in-process: vt.vppo_loss on CUDA tensors for
    --device cuda (the kernels on the GPU), on CPU tensors through the SIMT executor otherwise, and its
    backward op for dloss/dlogits in f32 (unrounded, as `vppo loss` writes it)."""
    import vppo.torch as vt

    on, op_device = ("cuda", "cuda") if device == "cuda" else ("cpu", "simt")
    b = to_device(batch, on)
    loss, out = vt.vppo_loss(b["logits"], b["logits_masked"], b["targets"], b["old_logp"],
                             b["advantages"], b["cu_seqlens"], device=op_device)
    grad = vt._loss_backward(b["logits"], b["targets"], out["lse"], out["dlogp"], None, "{}",
                             op_device, "f32")
    crate = {k: out[k].cpu().numpy() for k in ("logp", "entropy", "kl", "k3", "score", "sbar",
                                                "alpha", "mask")}
    crate["loss"] = np.array([loss.item()])
    crate["grad_logits"] = grad.cpu().numpy()
    return crate


def check_against_crate(args, path, batch, workdir):
    """Compares the eager implementation with the crate's outputs (from the op in-process with
    --vppo-impl op, else from `vppo loss`); returns a list of failures."""
    if args.vppo_impl == "op":
        crate = crate_outputs_op(batch, args.device)
    else:
        crate = crate_outputs_cli(args, path, workdir)
    # autograd on an f32 copy of the logits (exactly widened), so the gradient is compared in f32
    logits = batch["logits"].float().requires_grad_(True)
    loss, outs = vppo_loss_eager(
        logits, batch["logits_masked"], batch["targets"], batch["old_logp"],
        batch["advantages"], batch["cu_seqlens"], DEFAULTS,
    )
    loss.backward()
    failures = []

    def close(name, ours, theirs, tol):
        ours = np.asarray(ours, dtype=np.float64)
        theirs = np.asarray(theirs, dtype=np.float64)
        bad = ~np.isclose(ours, theirs, rtol=tol["rtol"], atol=tol["atol"])
        if bad.any():
            i = int(np.argmax(bad))
            failures.append(f"{name}: {int(bad.sum())} of {bad.size} differ, e.g. [{i}] torch "
                            f"{ours.flat[i]} vs vppo {theirs.flat[i]}")

    close("loss", [loss.item()], crate["loss"], CHECK_TOL["loss"])
    for name in ("logp", "entropy", "kl", "k3", "score"):
        close(name, outs[name].cpu().numpy(), crate[name], CHECK_TOL[name])
    close("sbar", outs["sbar"].cpu().numpy(), crate["sbar"], CHECK_TOL["sbar"])
    close("alpha", outs["alpha"].cpu().numpy(), crate["alpha"], CHECK_TOL["alpha"])

    # the mask, exactly, for every response whose k-th / (k+1)-th scores are not a near-tie
    score = crate["score"].astype(np.float64)
    mask_t = outs["mask"].cpu().numpy().astype(np.uint8)
    cu = batch["cu_seqlens"].tolist()
    compared = skipped = 0
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        k = k_for(DEFAULTS["top_fraction"], e - s)
        srt = np.sort(score[s:e])[::-1]
        if k < e - s and srt[k - 1] - srt[k] <= CHECK_TOL["mask_gap"]:
            skipped += 1
            continue
        compared += 1
        if not np.array_equal(mask_t[s:e], crate["mask"][s:e]):
            failures.append(f"mask of response {b} differs")
    grad_t = logits.grad.numpy().astype(np.float64)
    grad_c = crate["grad_logits"].astype(np.float64)
    scale = max(np.abs(grad_c).max(), 1e-30)
    rel = np.abs(grad_t - grad_c).max() / scale
    if rel > CHECK_TOL["grad_rel"]:
        failures.append(f"dloss/dlogits: max |error| / max |grad| = {rel:.3g} > {CHECK_TOL['grad_rel']}")
    return failures, dict(loss_torch=loss.item(), loss_vppo=float(crate["loss"][0]),
                          grad_rel_err=float(rel), mask_compared=compared, mask_skipped=skipped)


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------


def proc_status_bytes(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator bytes on a GPU, resident set (VmHWM) on the CPU."""

    def __init__(self, device):
        self.device = device
        self.extra = None

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.base = proc_status_bytes("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        elif self.base is not None:
            peak = proc_status_bytes("VmHWM")
            self.extra = None if peak is None else max(0, peak - self.base)
        return False


def time_fn(fn, device, warmup, iters):
    """Median and min of fn() in ms (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), min(samples)


def time_loss(loss_of, batch, device, warmup, iters):
    """Forward (no grad) and forward + backward of `loss_of(logits, *rest)` on `batch` (on `device`):
    the two times and the peak extra memory of each, and the forward + backward step itself."""
    b = to_device(batch, device)
    logits = b["logits"].clone().requires_grad_(True)
    args = (b["logits_masked"], b["targets"], b["old_logp"], b["advantages"], b["cu_seqlens"])

    def fwd():
        with torch.no_grad():
            return loss_of(logits, *args)

    def fwd_bwd():
        logits.grad = None  # a fresh gradient each step, as a training step makes
        loss_of(logits, *args).backward()

    with PeakMemory(device) as m_fwd:
        t_fwd = time_fn(fwd, device, warmup, iters)
    logits.grad = None
    with PeakMemory(device) as m_bwd:
        t_bwd = time_fn(fwd_bwd, device, warmup, iters)
    return t_fwd, t_bwd, m_fwd.extra, m_bwd.extra, fwd_bwd


def time_torch(batch, device, warmup, iters):
    t_fwd, t_bwd, m_fwd, m_bwd, _ = time_loss(
        lambda logits, *args: vppo_loss_eager(logits, *args, DEFAULTS)[0], batch, device, warmup,
        iters)
    return t_fwd, t_bwd, m_fwd, m_bwd


class GpuMemorySampler:
    """Samples the GPU's used memory (NVML) while another process runs; peak minus the start."""

    def __init__(self):
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.stop = threading.Event()
        self.base = self.peak = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
            time.sleep(0.002)

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        return False


def time_vppo(args, path, vppo_device):
    cmd = [args.vppo_bin, "bench", "--input", path, "--device", vppo_device,
           "--warmup", str(args.warmup), "--iters", str(args.iters), "--grad", "logits-dtype", "--json"]
    gpu_peak = None
    if vppo_device == "cuda":
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            with GpuMemorySampler() as s:
                report = run_vppo(cmd)
            gpu_peak = s.peak - s.base
        except ImportError:
            report = run_vppo(cmd)
    else:
        report = run_vppo(cmd)
    report["gpu_peak_used_bytes"] = gpu_peak
    return report


def time_op(batch, device, warmup, iters):
    """The crate in-process: vt.vppo_loss forward, and forward + backward (the gradient in the logits
    dtype), on the tensors eager PyTorch times (CUDA tensors for --device cuda, used in place on
    torch's current stream; CPU tensors through the SIMT executor otherwise). Peak memory: torch's
    allocator peak beyond the inputs (the gradient and the outputs) plus, on a GPU, every byte the crate
    allocated itself during one forward + backward (`_vppo.cuda_allocated_bytes`, which torch's
    allocator does not see; an upper bound on what it held)."""
    import vppo.torch as vt
    from vppo import _vppo

    op_device = "cuda" if device == "cuda" else "simt"
    t_fwd, t_bwd, _, m_bwd, fwd_bwd = time_loss(
        lambda logits, *args: vt.vppo_loss(logits, *args, device=op_device)[0], batch, device,
        warmup, iters)
    crate_bytes = 0
    if device == "cuda":
        before = _vppo.cuda_allocated_bytes(torch.cuda.current_device())
        fwd_bwd()
        torch.cuda.synchronize()
        crate_bytes = _vppo.cuda_allocated_bytes(torch.cuda.current_device()) - before
    peak = None if m_bwd is None else m_bwd + crate_bytes
    return t_fwd, t_bwd, peak, crate_bytes


def time_liger(batch, warmup, iters):
    """Liger-Kernel's triton_grpo_loss (one fused pass over the policy logits, gradient in place) plus a
    separate full-vocabulary KL pass for the score (Liger has no fused two-logits KL), the top-k mask
    and the shaping in eager PyTorch. Liger takes [B, L+1, V] logits (it drops the last position) and
    [B, L] completion ids, so the batch is laid out as equal-length responses. Its `delta` stands in
    for the dual clip; it has no logp penalty: its work is a lower bound of VPPO's."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    b = to_device(batch, "cuda")
    n, vocab = b["logits"].shape
    n_resp = b["advantages"].shape[0]
    length = n // n_resp
    n_used = length * n_resp
    logits_bl = torch.empty(n_resp, length + 1, vocab, dtype=b["logits"].dtype, device="cuda")
    logits_bl[:, :length] = b["logits"][:n_used].view(n_resp, length, vocab)
    logits_bl[:, length] = 0
    flat = b["logits"][:n_used]  # the same values as logits_bl[:, :length], contiguous
    masked = b["logits_masked"][:n_used]
    ids = b["targets"][:n_used].view(n_resp, length).long()
    old = b["old_logp"][:n_used].view(n_resp, length)
    adv = b["advantages"]
    logits_bl.requires_grad_(True)

    def kl_pass():
        with torch.no_grad():
            rows = 1024  # row chunks keep the KL's [rows, V] f32 temporaries small
            out = []
            for s in range(0, n_used, rows):
                out.append(full_vocab_kl(flat[s:s + rows], masked[s:s + rows]))
            score = torch.cat(out).clamp(0.0, DEFAULTS["score_clamp"]).view(n_resp, length)
            k = k_for(DEFAULTS["top_fraction"], length)
            order = torch.sort(score, dim=1, descending=True, stable=True).indices
            mask = torch.zeros_like(score).scatter_(1, order[:, :k], 1.0)
            sbar = score.mean(1)
            lo, hi = sbar.min(), sbar.max()
            nb = ((sbar - lo) / (hi - lo).clamp_min(TAS_MIN_SPREAD)).clamp(0, 1)
            beta_max = DEFAULTS["beta_min"] + (1 - DEFAULTS["beta_min"]) / (nb.mean() + TAS_MEAN_EPS)
            alpha = DEFAULTS["beta_min"] + nb * (beta_max - DEFAULTS["beta_min"])
            return mask, alpha * adv

    def liger(shaped, mask):
        # delta caps the ratio at dual_clip (INTELLECT-2's two-sided clip), which for A < 0 is VPPO's
        # dual clip; inplace=False because the timed steps reuse the same logits (Liger's default,
        # inplace=True, overwrites them with the gradient)
        return triton_grpo_loss(logits_bl, old, None, ids, shaped, mask, temperature=1.0, beta=0.0,
                                eps_low=DEFAULTS["eps_low"], eps_high=DEFAULTS["eps_high"],
                                delta=DEFAULTS["dual_clip"], inplace=False)

    def fwd():
        mask, shaped = kl_pass()
        with torch.no_grad():
            per_tok, _, _ = liger(shaped, mask)
            return per_tok.sum() / n_used

    def fwd_bwd():
        logits_bl.grad = None
        mask, shaped = kl_pass()
        per_tok, _, _ = liger(shaped, mask)
        (per_tok * mask).sum().div(n_used).backward()

    with PeakMemory("cuda") as m_fwd:
        t_fwd = time_fn(fwd, "cuda", warmup, iters)
    with PeakMemory("cuda") as m_bwd:
        t_bwd = time_fn(fwd_bwd, "cuda", warmup, iters)
    return t_fwd, t_bwd, m_fwd.extra, m_bwd.extra


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def mib(x):
    return "n/a" if x is None else f"{x / 2**20:,.0f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where eager PyTorch runs; the crate runs on --vppo-devices")
    p.add_argument("--sizes", default="256,1024", help="comma-separated N (tokens)")
    p.add_argument("--vocab", type=int, default=32000, help="V")
    p.add_argument("--dtype", default="bf16", help="comma-separated logits dtypes: bf16, f16, f32")
    p.add_argument("--response-len", type=int, default=512, help="mean response length (B = N / this)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-only", action="store_true", help="check against the crate, no timing")
    p.add_argument("--check-size", type=int, default=96,
                   help="N of the check batch (its V is min(--vocab, 4096)); 0 skips the check")
    p.add_argument("--vppo-impl", choices=["auto", "op", "cli"], default="auto",
                   help="how the crate is called: op = vt.vppo_loss in-process (the package of "
                        "python/, installed), cli = the `vppo bench` / `vppo loss` binary; auto = op "
                        "when `import vppo.torch` works, else cli")
    p.add_argument("--vppo-bin", default="target/release/vppo", help="path to the vppo binary")
    p.add_argument("--vppo-devices", default=None,
                   help="comma-separated vppo --device values to time [default: cpu for --device cpu, "
                        "cuda for --device cuda]")
    p.add_argument("--no-liger", action="store_true", help="skip Liger-Kernel even when importable")
    p.add_argument("--json-out", default=None, help="also write every row as JSON here")
    args = p.parse_args()

    if args.vppo_impl == "auto":
        try:
            import vppo.torch  # noqa: F401
            args.vppo_impl = "op"
        except ImportError:
            args.vppo_impl = "cli"
    if args.vppo_impl == "cli" and not os.path.exists(args.vppo_bin):
        sys.exit(f"no vppo binary at {args.vppo_bin}: run `cargo build --release` or pass --vppo-bin "
                 "(or install the Python package, pip install ./python, for --vppo-impl op)")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no GPU")
    vppo_devices = (args.vppo_devices or ("cuda" if args.device == "cuda" else "cpu")).split(",")
    if args.vppo_impl == "op":
        # In-process, the crate runs where the tensors are: the GPU, or the SIMT executor on the CPU.
        vppo_devices = ["op:cuda" if args.device == "cuda" else "op:simt"]
    dtypes = args.dtype.split(",")
    for d in dtypes:
        if d not in DTYPES:
            sys.exit(f"unknown dtype {d}: use bf16, f16 or f32")
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",")]
    if args.device == "cuda":
        machine = torch.cuda.get_device_name(0)
    else:
        machine = f"CPU, {os.cpu_count()} logical cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"# {machine}", flush=True)
    print(f"# the crate: {'vt.vppo_loss in-process' if args.vppo_impl == 'op' else args.vppo_bin}",
          flush=True)

    with tempfile.TemporaryDirectory(prefix="vppo-compare-") as workdir:
        failures = []
        if args.check_size > 0:
            for d in dtypes:
                vocab = min(args.vocab, 4096)
                n_resp = max(1, args.check_size // 24)
                batch = make_batch(args.check_size, vocab, n_resp, DTYPES[d], args.seed + 1)
                path = os.path.join(workdir, "check.safetensors")
                save_file(batch, path)
                f, info = check_against_crate(args, path, batch, workdir)
                failures += [f"{d}: {x}" for x in f]
                print(f"# check {d} N={args.check_size} V={vocab} B={n_resp}: "
                      f"{'OK' if not f else 'FAILED'} (loss torch {info['loss_torch']:.7g} vs vppo "
                      f"{info['loss_vppo']:.7g}; grad max rel err {info['grad_rel_err']:.2g}; mask "
                      f"compared on {info['mask_compared']} responses, {info['mask_skipped']} near-ties "
                      f"skipped)", flush=True)
            for f in failures:
                print(f"#   {f}")
        if args.check_only:
            sys.exit(1 if failures else 0)

        liger_ok, liger_why = False, "device is not cuda"
        if args.device == "cuda" and not args.no_liger:
            try:
                import liger_kernel  # noqa: F401
                from liger_kernel.transformers.grpo_loss import triton_grpo_loss  # noqa: F401
                liger_ok, liger_why = True, ""
            except ImportError as e:
                liger_why = f"liger_kernel not importable ({e})"
        elif args.no_liger:
            liger_why = "--no-liger"
        if not liger_ok:
            print(f"# Liger-Kernel skipped: {liger_why}")

        rows = []
        header = ("| N | V | dtype | torch fwd ms | torch fwd+bwd ms | vppo device | vppo fwd ms | "
                  "vppo fwd+bwd ms | speedup fwd | speedup fwd+bwd | torch peak MiB (fwd+bwd) | "
                  "vppo peak MiB (fwd+bwd) | memory ratio |")
        print(header)
        print("|---" * (header.count("|") - 1) + "|")
        for d in dtypes:
            for n in sizes:
                n_resp = max(1, n // args.response_len)
                batch = make_batch(n, args.vocab, n_resp, DTYPES[d], args.seed)
                path = os.path.join(workdir, "batch.safetensors")
                save_file(batch, path)
                try:
                    t_fwd, t_bwd, m_fwd, m_bwd = time_torch(batch, args.device, args.warmup, args.iters)
                except torch.OutOfMemoryError as e:
                    print(f"# eager PyTorch ran out of memory at N={n}, V={args.vocab}, {d}: {e}".splitlines()[0])
                    t_fwd = t_bwd = (float("nan"), float("nan"))
                    m_fwd = m_bwd = None
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                for vd in vppo_devices:
                    if args.vppo_impl == "op":
                        o_fwd, o_bwd, v_mem, crate_bytes = time_op(batch, args.device, args.warmup,
                                                                   args.iters)
                        r = dict(forward=dict(median_ms=o_fwd[0], min_ms=o_fwd[1]),
                                 forward_backward=dict(median_ms=o_bwd[0], min_ms=o_bwd[1]),
                                 crate_allocated_bytes=crate_bytes)
                    else:
                        r = time_vppo(args, path, vd)
                    v_fwd = r["forward"]["median_ms"]
                    v_bwd = r["forward_backward"]["median_ms"]
                    if args.vppo_impl == "op":
                        v_mem_note = ("torch.cuda.max_memory_allocated + the crate's own allocations"
                                      if args.device == "cuda" else "process VmHWM")
                    elif vd == "cuda":
                        v_mem = r["gpu_peak_used_bytes"]
                        v_mem_note = "GPU used (NVML), incl. context and input copies"
                    else:
                        v_mem = r["peak_extra_bytes_forward_backward"]
                        v_mem_note = "host VmHWM"
                    # a ratio against less than 1 MiB says more about the measurement than the memory
                    ratio = (m_bwd / v_mem) if (m_bwd and v_mem and v_mem >= 2**20) else None
                    row = dict(n=n, vocab=args.vocab, dtype=d, responses=n_resp, torch_device=args.device,
                               torch_fwd_ms=t_fwd[0], torch_fwd_bwd_ms=t_bwd[0], torch_peak_fwd=m_fwd,
                               torch_peak_fwd_bwd=m_bwd, vppo_device=vd, vppo_fwd_ms=v_fwd,
                               vppo_fwd_bwd_ms=v_bwd, vppo_peak_fwd_bwd=v_mem, vppo_mem_note=v_mem_note,
                               vppo_report=r)
                    rows.append(row)
                    print(f"| {n:,} | {args.vocab:,} | {d} | {t_fwd[0]:.1f} | {t_bwd[0]:.1f} | {vd} | "
                          f"{v_fwd:.1f} | {v_bwd:.1f} | {t_fwd[0] / v_fwd:.2f}x | {t_bwd[0] / v_bwd:.2f}x | "
                          f"{mib(m_bwd)} | {mib(v_mem)} | "
                          f"{'n/a' if ratio is None else f'{ratio:.1f}x'} |", flush=True)
                if liger_ok:
                    try:
                        l_fwd, l_bwd, lm_fwd, lm_bwd = time_liger(batch, args.warmup, args.iters)
                        rows.append(dict(n=n, vocab=args.vocab, dtype=d, liger_fwd_ms=l_fwd[0],
                                         liger_fwd_bwd_ms=l_bwd[0], liger_peak_fwd_bwd=lm_bwd))
                        print(f"| {n:,} | {args.vocab:,} | {d} | (Liger GRPO + KL pass) | | liger | "
                              f"{l_fwd[0]:.1f} | {l_bwd[0]:.1f} | | | | {mib(lm_bwd)} | |", flush=True)
                    except Exception as e:  # noqa: BLE001 - report and go on with the other sizes
                        print(f"# Liger failed at N={n}: {type(e).__name__}: {e}")
                    torch.cuda.empty_cache()
                os.remove(path)
        print("# times: median of --iters; peak memory: extra bytes beyond the inputs (torch: "
              + ("torch.cuda.max_memory_allocated" if args.device == "cuda" else "process VmHWM")
              + "; vppo: " + ({"op:cuda": "torch.cuda.max_memory_allocated + the crate's own "
                               "allocations (_vppo.cuda_allocated_bytes)", "cuda": "GPU used memory "
                               "sampled by NVML"}.get(vppo_devices[0], "process VmHWM"))
              + "), forward + backward, gradient included")
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(dict(machine=machine, rows=rows, check_failures=failures), f, indent=1)
        sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
