"""The parallel layouts (SPEC section 11) on the extension's CUDA path, on the fake CUDA driver: gloo
ranks in separate Python processes, each with its own fake driver (one fake device each) and its part
of one batch in (fake) device memory, handed to ``_vppo.forward_cuda`` / ``backward_cuda`` as raw
addresses with the reducer ``vppo.torch`` builds for a process group (``_group_reducer``: gloo here,
NCCL on GPUs). See test_cuda_fake.py for the driver and why each run is a fresh process.

Data, vocabulary and sequence parallel: every rank's outputs and gradient (rows, or columns of a
vocabulary shard) are bit-identical to the same layout's CPU path on the SIMT executor (the same
kernels, the same reductions and merges), and together equal the single-process result on the whole
batch (the mask exactly, the loss to rounding). Bad input on one rank (a short old_logp, refused
before the collectives; a NaN found by pass 1 on the device) raises on every rank, with no hang (a
deadline on each run).
"""

import os
import subprocess
import sys
import textwrap

import pytest

from test_cuda_fake import FAKE, PRELUDE, _cc

# The child: PRELUDE (fake driver, device memory helpers), then a gloo group and the layout's body.
DIST_PRELUDE = r'''
import torch.distributed as dist
RANK, SIZE, INIT = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo", init_method=INIT, rank=RANK, world_size=SIZE)
WORLD = vt._group_reducer(vt._group_name(dist.group.WORLD))

def part(b, b0, b1):
    """Responses [b0, b1) of batch b (the tuple of PRELUDE's batch()), each tensor a fresh copy:
    the kernels' split of a row into aligned vectors depends on the row's address, so the CPU
    path's bits equal the device copy's only when both start aligned alike (a row view at a
    58-byte offset would not)."""
    logits, masked, targets, old_logp, adv, cu, rows = b
    t0, t1 = int(cu[b0]), int(cu[b1])
    return (logits[t0:t1].clone(), masked[t0:t1].clone(), targets[t0:t1].clone(),
            old_logp[t0:t1].clone(), adv[b0:b1].clone(),
            (cu[b0:b1 + 1] - t0).to(torch.int32).contiguous(), None)

def cpu_call(options, b, **groups):
    """The CPU path (SIMT executor): scalars and the 13 outputs."""
    logits, masked, targets, old_logp, adv, cu, _ = b
    n, nb = targets.numel(), adv.numel()
    outs = [torch.empty(n, dtype=d) for d in TOKEN] + [torch.empty(nb, dtype=d) for d in RESP]
    scalars = _vppo.forward("simt", options, vt._dtype_name(logits.dtype), logits.shape[1],
                            raw(logits), raw(masked), raw(targets), raw(old_logp), raw(adv), raw(cu),
                            None, None, [raw(o) for o in outs], **groups)
    return scalars, outs

def cpu_grad(options, b, outs, shard=None):
    logits, targets = b[0], b[2]
    lse, dlogp = outs[vt.TOKEN_OUTPUTS.index("lse")], outs[vt.TOKEN_OUTPUTS.index("dlogp")]
    g = torch.empty(logits.shape, dtype=torch.float32)
    if g.numel():
        _vppo.backward("simt", options, vt._dtype_name(logits.dtype), logits.shape[1], raw(logits),
                       "float32", raw(g), raw(targets), raw(lse), raw(dlogp), None, shard)
    return g

def columns(b, c0, c1):
    """Columns [c0, c1) of both logits tensors of batch b, fresh copies."""
    return (b[0][:, c0:c1].contiguous(), b[1][:, c0:c1].contiguous()) + tuple(b[2:])

def pieces(b, t0, t1):
    """Tokens [t0, t1) of batch b as a sequence-parallel rank holds them: its pieces of responses,
    one advantage per piece, and whether its first piece continues the previous rank's."""
    logits, masked, targets, old_logp, adv, cu, _ = b
    cu = cu.tolist()
    keep = [i for i in range(len(cu) - 1) if cu[i] < t1 and cu[i + 1] > t0]
    bounds = [0] + [min(cu[i + 1], t1) - t0 for i in keep]
    continues = bool(keep) and cu[keep[0]] < t0
    return ((logits[t0:t1].clone(), masked[t0:t1].clone(), targets[t0:t1].clone(),
             old_logp[t0:t1].clone(), adv[keep].clone(), torch.tensor(bounds, dtype=torch.int32),
             None), continues)

def cuda_call(options, b, **kw):
    """The CUDA path on the fake device: scalars, the 13 outputs (copied back) and the f32
    gradient from the device outputs (lse, dlogp) by backward_cuda (of the shard's columns with
    vocab_shard)."""
    logits, masked, targets, old_logp, adv, cu, _ = b
    n, nb = targets.numel(), adv.numel()
    dev = [upload(t) for t in (logits, masked, targets, old_logp, adv, cu)]
    outs = [empty(n, d) for d in TOKEN] + [empty(nb, d) for d in RESP]
    scalars = _vppo.forward_cuda(0, STREAM, options, vt._dtype_name(logits.dtype), logits.shape[1],
                                 *dev, None, None, outs, **kw)
    host = [download(o, d) for o, d in zip(outs, TOKEN + RESP)]
    grad = empty(logits.numel(), torch.float32)
    if grad[1]:
        _vppo.backward_cuda(0, STREAM, options, vt._dtype_name(logits.dtype), logits.shape[1], dev[0],
                            "float32", grad, dev[2], outs[vt.TOKEN_OUTPUTS.index("lse")],
                            outs[vt.TOKEN_OUTPUTS.index("dlogp")], None,
                            vocab_shard=kw.get("vocab_shard"))
    return scalars, host, download(grad, torch.float32).view(logits.shape)

def gather(t):
    """Every rank's tensor t, concatenated in rank order (gloo, CPU)."""
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(SIZE)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]]))
    width = max(int(s) for s in sizes)
    pad = torch.zeros((width,) + tuple(t.shape[1:]), dtype=t.dtype)
    pad[:t.shape[0]] = t
    parts = [torch.empty_like(pad) for _ in range(SIZE)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)])
'''

LENGTHS = (5, 0, 7, 4, 3, 6, 1, 2)

DATA = r'''
LENGTHS = %r
CUTS = [0, 3, 8]  # two ranks, uneven
for options, dtype in [(vt._options_json({}), torch.float32),
                       (vt._options_json({"perception": "k3", "shaping": "linear",
                                          "tas_scope": "batch"}), torch.bfloat16),
                       (vt._options_json({"aggregation": "seq_mean_token_mean"}), torch.float32)]:
    full = batch(lengths=LENGTHS, vocab=29, dtype=dtype, seed=7)
    mine = part(full, CUTS[RANK], CUTS[RANK + 1])
    got, got_outs, got_grad = cuda_call(options, mine, group=WORLD)
    # The CPU data-parallel path: the same bits.
    want, want_outs = cpu_call(options, mine, group=WORLD)
    assert got == want, (options, got, want)
    for name, x, y in zip(vt.TOKEN_OUTPUTS + vt.RESPONSE_OUTPUTS, got_outs, want_outs):
        assert same(x, y), name
    assert same(got_grad, cpu_grad(options, mine, want_outs))
    # Together: the single-process result on the whole batch.
    one, one_outs = cpu_call(options, full)
    total = torch.tensor([got[0]], dtype=torch.float64)
    dist.all_reduce(total)
    assert abs(float(total) - one[0]) <= 1e-5 * max(1.0, abs(one[0])), (float(total), one[0])
    mask = vt.TOKEN_OUTPUTS.index("mask")
    assert torch.equal(gather(got_outs[mask]), one_outs[mask])
    dlogp = vt.TOKEN_OUTPUTS.index("dlogp")
    torch.testing.assert_close(gather(got_outs[dlogp]), one_outs[dlogp], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gather(got_grad), cpu_grad(options, full, one_outs), rtol=1e-5,
                               atol=1e-6)
    assert got[2] == one[2]  # token_normalizer: the whole batch's N

# Bad input on rank 1 only: every rank raises, none hangs.
options = vt._options_json({})
full = batch(lengths=LENGTHS, vocab=29, seed=8)
for spoil in ("short old_logp", "nan"):
    b = list(part(full, CUTS[RANK], CUTS[RANK + 1]))
    if RANK == 1:
        if spoil == "nan":
            b[0] = b[0].clone()
            b[0][0, 3] = float("nan")
        else:
            b[3] = b[3][:-1].contiguous()
    try:
        cuda_call(options, b, group=WORLD)
        raise SystemExit(f"no error for {spoil} on rank 1")
    except ValueError as e:
        if RANK == 1:
            assert ("old_logp" if spoil != "nan" else "logits") in str(e), e
        else:
            assert "rank(s) of the group reported an error" in str(e), e
dist.barrier()
dist.destroy_process_group()
print("ok")
''' % (LENGTHS,)


def _spawn(tmp_path, body, size):
    """Runs the child script with `body` on `size` gloo ranks; every rank must print ok."""
    from vppo import _vppo  # noqa: F401  (the extension must be importable)

    cc = _cc()
    if not FAKE.exists() or cc is None:
        pytest.skip("needs the repository's tests/fake_cuda/libcuda.c and a C compiler")
    so = tmp_path / "libcuda.so"
    subprocess.run([*cc, "-shared", "-fPIC", "-O1", "-std=c11", "-pthread",
                    "-Wl,-soname,libcuda.so", "-o", str(so), str(FAKE)], check=True)
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(PRELUDE) + textwrap.dedent(DIST_PRELUDE)
                      + textwrap.dedent(body))
    init = "file://" + str(tmp_path / "rendezvous")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    procs = [subprocess.Popen([sys.executable, str(script), str(so), str(r), str(size), init],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(size)]
    texts = []
    try:
        for p in procs:
            texts.append(p.communicate(timeout=180)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError("a rank hangs (no result within 180 s)")
    joined = "\n".join(f"--- rank {r}:\n{t}" for r, t in enumerate(texts))
    if "kernels not built" in joined:
        pytest.skip("this build of the extension has no CUDA kernels (no nvcc at build time)")
    for p, t in zip(procs, texts):
        assert p.returncode == 0 and t.strip().endswith("ok"), joined


def test_data_parallel_on_the_fake_driver_is_the_cpu_path(tmp_path):
    _spawn(tmp_path, DATA, 2)


VOCAB = r'''
CUTS = [0, 11, 29]  # uneven shards of V = 29
for options, dtype in [(vt._options_json({}), torch.float32),
                       (vt._options_json({"perception": "k3"}), torch.bfloat16)]:
    full = batch(lengths=%r, vocab=29, dtype=dtype, seed=9)
    c0, c1 = CUTS[RANK], CUTS[RANK + 1]
    mine = columns(full, c0, c1)
    shard = dict(vocab_shard=(c0, 29), vocab_group=WORLD)
    got, got_outs, got_grad = cuda_call(options, mine, **shard)
    want, want_outs = cpu_call(options, mine, **shard)
    assert got == want, (options, got, want)
    for name, x, y in zip(vt.TOKEN_OUTPUTS + vt.RESPONSE_OUTPUTS, got_outs, want_outs):
        assert same(x, y), name
    assert same(got_grad, cpu_grad(options, mine, want_outs, (c0, 29)))
    # Every rank the same outputs; together the unsharded result.
    one, one_outs = cpu_call(options, full)
    assert abs(got[0] - one[0]) <= 1e-5 * max(1.0, abs(one[0])), (got[0], one[0])
    mask = vt.TOKEN_OUTPUTS.index("mask")
    assert torch.equal(got_outs[mask], one_outs[mask])
    grads = gather(got_grad.t().contiguous()).t()  # the shards' columns side by side
    torch.testing.assert_close(grads, cpu_grad(options, full, one_outs), rtol=2e-5, atol=1e-6)
    scores = [torch.empty_like(got_outs[0]) for _ in range(SIZE)]
    dist.all_gather(scores, got_outs[0])
    assert same(scores[0], scores[1])
# A NaN in rank 1's shard: every rank raises.
full = batch(lengths=(3, 4), vocab=29, seed=4)
b = list(columns(full, CUTS[RANK], CUTS[RANK + 1]))
if RANK == 1:
    b[1][2, 5] = float("nan")
try:
    cuda_call(vt._options_json({}), b, vocab_shard=(CUTS[RANK], 29), vocab_group=WORLD)
    raise SystemExit("no error for a NaN in a shard")
except ValueError as e:
    want = "logits_masked" if RANK == 1 else "rank(s) of the group reported an error"
    assert want in str(e), e
dist.barrier()
dist.destroy_process_group()
print("ok")
''' % (LENGTHS,)

SEQUENCE = r'''
CUT = 14  # inside response 3 ([12, 16)): split across the two ranks
for options, dtype in [(vt._options_json({}), torch.float32),
                       (vt._options_json({"aggregation": "seq_mean_token_mean"}), torch.bfloat16)]:
    full = batch(lengths=%r, vocab=29, dtype=dtype, seed=11)
    n = full[2].numel()
    mine, continues = pieces(full, *[(0, CUT), (CUT, n)][RANK])
    assert continues == (RANK == 1)
    seq = dict(seq_continues=continues, seq_group=WORLD)
    got, got_outs, got_grad = cuda_call(options, mine, **seq)
    want, want_outs = cpu_call(options, mine, **seq)
    assert got == want, (options, got, want)
    for name, x, y in zip(vt.TOKEN_OUTPUTS + vt.RESPONSE_OUTPUTS, got_outs, want_outs):
        assert same(x, y), name
    assert same(got_grad, cpu_grad(options, mine, want_outs))
    one, one_outs = cpu_call(options, full)
    assert abs(got[0] - one[0]) <= 1e-5 * max(1.0, abs(one[0])), (got[0], one[0])
    mask = vt.TOKEN_OUTPUTS.index("mask")
    assert torch.equal(gather(got_outs[mask]), one_outs[mask])
    torch.testing.assert_close(gather(got_grad), cpu_grad(options, full, one_outs), rtol=1e-5,
                               atol=1e-6)
dist.barrier()
dist.destroy_process_group()
print("ok")
''' % (LENGTHS,)


def test_vocabulary_parallel_on_the_fake_driver_is_the_cpu_path(tmp_path):
    _spawn(tmp_path, VOCAB, 2)


def test_sequence_parallel_on_the_fake_driver_is_the_cpu_path(tmp_path):
    _spawn(tmp_path, SEQUENCE, 2)
