"""vppo.torch on CUDA tensors, on a real GPU: the op's CUDA path (the crate's kernels on torch's
memory and torch's current stream) against the same kernels on the SIMT executor, the f64 reference
and the eager PyTorch loss of test_torch.py; rows, both gradient dtypes, in place, a side stream,
opcheck, torch.compile, errors, and the device memory the op takes; and vt.kl on CUDA tensors against
the SIMT executor and the eager port of test_kl.py.

Skipped without a GPU: CI has none, and the PyPI torch wheel it installs has no CUDA. On a GPU,
scripts/gpu-check.sh runs this file (step `pytest`). The same CUDA path runs in CI on the fake CUDA
driver through raw pointers (test_cuda_fake.py); what only this file checks is the torch glue
(``torch.cuda.current_stream``, CUDA ``torch.empty``, autograd on CUDA tensors) and real hardware.

A GPU's exp2 and log2 (MUFU) are not the executor's, so results agree with the SIMT run to a few ulps,
not bit for bit: f32 values to 1e-5 relative, bf16/f16 gradients to one rounding of their dtype; the
mask and k exactly (random scores have no near-ties at that scale).
"""

import pytest
import torch

import vppo.torch as vt
from vppo import _vppo
from test_kl import eager_kl, pair, tolerance
from test_torch import DTYPES, OPTION_SETS, eager_loss_and_grad, make_batch, vppo_loss_and_grad

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (scripts/gpu-check.sh runs this file on one)")

GPU = torch.device("cuda", 0)


def to_cuda(b):
    return {k: None if v is None else v.to(GPU) for k, v in b.items()}


def run(b, device, **kw):
    """Loss, outputs and dloss/dlogits of vt.vppo_loss on batch b (its tensors' device)."""
    return vppo_loss_and_grad(b, device=device, **kw)


def rounding(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]


def assert_outputs_close(got, want):
    """CUDA outputs (`got`) against a CPU run of the same kernels (`want`)."""
    for name in vt.TOKEN_OUTPUTS + vt.RESPONSE_OUTPUTS:
        g, w = got[name].cpu(), want[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if name in ("mask", "k"):
            assert torch.equal(g, w), name
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_total", [None, 41])
@pytest.mark.parametrize("grad_dtype", ["logits", "f32"])
def test_cuda_matches_simt_and_reference(dtype, rows_total, grad_dtype):
    b = make_batch(lengths=(37, 0, 61, 12, 90), vocab=1000, dtype=dtype, seed=2,
                   rows_total=None if rows_total is None else 200 + rows_total)
    loss, out, grad = run(to_cuda(b), "cuda", grad_dtype=grad_dtype)
    loss_s, out_s, grad_s = run(b, "simt", grad_dtype=grad_dtype)
    loss_r, _, grad_r = run(b, "reference", grad_dtype="f32")
    assert loss.device == GPU and grad.device == GPU
    assert loss.item() == pytest.approx(loss_s.item(), rel=1e-5, abs=1e-7)
    assert loss.item() == pytest.approx(loss_r.item(), rel=1e-4, abs=1e-6)
    assert_outputs_close(out, out_s)
    assert grad.dtype == grad_s.dtype and grad.shape == grad_s.shape
    tol = 1e-5 if grad.dtype == torch.float32 else rounding(dtype)
    torch.testing.assert_close(grad.cpu(), grad_s, rtol=tol, atol=1e-7)
    torch.testing.assert_close(grad.cpu().float(), grad_r.float(), rtol=max(tol, 1e-4), atol=1e-6)
    if rows_total is not None:
        unread = torch.ones(b["logits"].shape[0], dtype=torch.bool)
        unread[b["rows"]] = False
        assert (grad[unread.to(GPU)] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_backward_op_in_f32_is_the_unrounded_gradient(dtype):
    """grad_dtype="f32": the backward op itself returns f32 (autograd then stores the gradient of a
    bf16 or f16 input in that dtype)."""
    b = make_batch(lengths=(20, 33), vocab=500, dtype=dtype, seed=11)
    c = to_cuda(b)
    _, out = vt.vppo_loss(c["logits"], c["logits_masked"], c["targets"], c["old_logp"],
                          c["advantages"], c["cu_seqlens"])
    got = vt._loss_backward(c["logits"], c["targets"], out["lse"], out["dlogp"], None, "{}", "cuda",
                            "f32")
    _, out_s = vt.vppo_loss(b["logits"], b["logits_masked"], b["targets"], b["old_logp"],
                            b["advantages"], b["cu_seqlens"])
    want = vt._loss_backward(b["logits"], b["targets"], out_s["lse"], out_s["dlogp"], None, "{}",
                             "simt", "f32")
    assert got.dtype == torch.float32 and got.device == GPU
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", OPTION_SETS)
def test_cuda_matches_eager_pytorch(options):
    b = make_batch(lengths=(9, 0, 14, 6), vocab=257, seed=3)
    ref_loss, ref, ref_grad = eager_loss_and_grad(b, **options)
    loss, out, grad = run(to_cuda(b), "cuda", **options)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert torch.equal(out["mask"].cpu().double(), ref["mask"])
    torch.testing.assert_close(out["kl"].cpu().double(), ref["kl"].detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_cuda_in_place_and_the_version_counter():
    b = to_cuda(make_batch(dtype=torch.bfloat16, seed=4, rows_total=30))
    _, _, want = run(b, "cuda")
    x = b["logits"].clone().requires_grad_(True)
    logits = x * 1.0
    version = logits._version
    loss, _ = vt.vppo_loss(logits, b["logits_masked"], b["targets"], b["old_logp"], b["advantages"],
                           b["cu_seqlens"], rows=b["rows"], in_place=True)
    loss.backward()
    assert logits._version > version
    assert torch.equal(logits.detach(), want) and torch.equal(x.grad, want)
    # Liger-Kernel #272: a gradient over logits that another node saved must raise, not corrupt.
    y = b["logits"].clone().requires_grad_(True)
    logits = y * 1.0
    other = (logits ** 2).sum()
    loss, _ = vt.vppo_loss(logits, b["logits_masked"], b["targets"], b["old_logp"], b["advantages"],
                           b["cu_seqlens"], rows=b["rows"], in_place=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_cuda_orders_itself_on_the_current_stream():
    """Inputs still being written on a side stream when the op is called there: the op must wait for
    them (it joins torch's current stream), and work queued after it must see its outputs."""
    b = make_batch(lengths=(300, 200), vocab=4096, dtype=torch.bfloat16, seed=5)
    _, want_out, want_grad = run(to_cuda(b), "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Slow producers queued on `side`: the logits are only right once they have run.
        w = torch.eye(4096, device=GPU)
        logits = b["logits"].to(GPU).float()
        for _ in range(8):
            logits = logits @ w
        x = logits.to(torch.bfloat16).requires_grad_(True)
        loss, out = vt.vppo_loss(x, b["logits_masked"].to(GPU), b["targets"].to(GPU),
                                 b["old_logp"].to(GPU), b["advantages"].to(GPU),
                                 b["cu_seqlens"].to(GPU))
        loss.backward()
        got_kl = out["kl"].clone()  # queued on `side` after the op
        got_grad = x.grad.clone()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.testing.assert_close(got_kl, want_out["kl"], rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)


@pytest.mark.parametrize("in_place", [False, True])
def test_cuda_allocates_no_n_by_v_buffer(in_place):
    """Across forward and backward, torch's allocator gives out at most the gradient (none in place)
    plus O(N + B) outputs, and the crate's own allocations (its buffers do not go through torch's
    allocator; `_vppo.cuda_allocated_bytes` counts them) are O(N + B) too."""
    n_resp, length, vocab = 8, 512, 32768  # N = 4,096; one [N, V] bf16 tensor is 256 MiB
    b = to_cuda(make_batch(lengths=(length,) * n_resp, vocab=vocab, dtype=torch.bfloat16, seed=6))
    n = n_resp * length
    nv_bytes = n * vocab * 2
    small = 256 * (n + n_resp) + (4 << 20)  # outputs and the caching allocator's rounding
    logits = b["logits"].clone().requires_grad_(not in_place)
    leaf = logits
    if in_place:
        # bf16, so that its gradient (the sum of the [N, V] one) needs no f32 copy of it
        leaf = torch.zeros((), dtype=torch.bfloat16, device=GPU, requires_grad=True)
        logits = b["logits"].clone() + leaf  # a non-leaf the gradient may overwrite
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(GPU)
    base = torch.cuda.memory_allocated(GPU)
    crate = _vppo.cuda_allocated_bytes(GPU.index)
    loss, out = vt.vppo_loss(logits, b["logits_masked"], b["targets"], b["old_logp"],
                             b["advantages"], b["cu_seqlens"], in_place=in_place)
    loss.backward()
    torch.cuda.synchronize()
    torch_peak = torch.cuda.max_memory_allocated(GPU) - base
    crate_took = _vppo.cuda_allocated_bytes(GPU.index) - crate
    grad_bytes = 0 if in_place else nv_bytes
    assert torch_peak <= grad_bytes + small, (torch_peak, grad_bytes, small)
    assert 0 < crate_took <= 256 * (n + n_resp) + 65536, (crate_took, n)
    assert torch.isfinite(loss).item()


def test_cuda_opcheck():
    b = to_cuda(make_batch(seed=7, rows_total=24))
    args = (b["logits"].clone().requires_grad_(True), b["logits_masked"], b["targets"], b["old_logp"],
            b["advantages"], b["cu_seqlens"], b["rows"], None, None,
            vt._options_json(dict(perception="k3")), "cuda", "logits", False, None, -1, 0, -1)
    torch.library.opcheck(torch.ops.vppo.loss.default, args)


def test_cuda_compile_fullgraph():
    b = to_cuda(make_batch(seed=8, rows_total=22))
    module = vt.VppoLoss(top_fraction=0.5, perception="k3")

    def step(logits, logits_masked, targets, old_logp, advantages, cu, rows):
        loss, out = module(logits, logits_masked, targets, old_logp, advantages, cu, rows=rows)
        return loss * 2.0, out["mask"].sum()

    compiled = torch.compile(step, fullgraph=True)
    args = (b["logits_masked"], b["targets"], b["old_logp"], b["advantages"], b["cu_seqlens"],
            b["rows"])
    x = b["logits"].clone().requires_grad_(True)
    loss, selected = compiled(x, *args)
    loss.backward()
    y = b["logits"].clone().requires_grad_(True)
    loss_e, selected_e = step(y, *args)
    loss_e.backward()
    assert loss.item() == loss_e.item() and selected.item() == selected_e.item()
    assert torch.equal(x.grad, y.grad)


def test_cuda_errors():
    b = to_cuda(make_batch(seed=9))
    # A small tensor left on the CPU: an error naming it, never a silent copy.
    with pytest.raises(ValueError, match="old_logp"):
        run(dict(b, old_logp=b["old_logp"].cpu()), "cuda")
    with pytest.raises(ValueError, match='device="cuda"'):
        run(b, "simt")
    # Non-contiguous logits: an error naming them.
    wide = torch.cat([b["logits"], b["logits"]], dim=1)[:, ::2]
    assert not wide.is_contiguous()
    with pytest.raises(ValueError, match="logits"):
        vt.vppo_loss(wide, b["logits_masked"], b["targets"], b["old_logp"], b["advantages"],
                     b["cu_seqlens"])
    # A target outside [0, V): the crate's message, and no gradient.
    bad = b["targets"].clone()
    bad[3] = b["logits"].shape[1]
    x = b["logits"].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="targets"):
        vt.vppo_loss(x, b["logits_masked"], bad, b["old_logp"], b["advantages"], b["cu_seqlens"])
    assert x.grad is None


def test_cuda_empty_batch():
    b = to_cuda(make_batch(lengths=(0, 0), seed=10))
    loss, out, grad = run(b, "cuda")
    assert loss.item() == 0.0 and grad.shape == b["logits"].shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [False, True])
def test_cuda_kl_matches_simt_and_eager(dtype, rows):
    p, q, pr, qr = pair(seed=12, n=40, v=3000, dtype=dtype, rows_p=9 if rows else 0,
                        rows_q=5 if rows else 0)
    u = torch.linspace(-1.5, 2.0, 40)

    def run_kl(p, q, pr, qr, u, device):
        x, y = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
        kl = vt.kl(x, y, temperature=0.8, p_rows=pr, q_rows=qr, device=device)
        (kl * u).sum().backward()
        return kl, x.grad, y.grad

    on = [None if t is None else t.to(GPU) for t in (p, q, pr, qr, u)]
    kl, gp, gq = run_kl(*on, "cuda")
    kl_s, gp_s, gq_s = run_kl(p, q, pr, qr, u, "simt")
    assert kl.device == GPU and gp.device == GPU and gp.dtype == dtype
    torch.testing.assert_close(kl.cpu(), kl_s, rtol=1e-5, atol=1e-6)
    tol = 1e-5 if dtype == torch.float32 else rounding(dtype)
    torch.testing.assert_close(gp.cpu(), gp_s, rtol=tol, atol=1e-7)
    torch.testing.assert_close(gq.cpu(), gq_s, rtol=tol, atol=1e-7)
    xe, ye = p.double().requires_grad_(True), q.double().requires_grad_(True)
    want = eager_kl(xe, ye, 0.8, pr, qr)
    (want * u.double()).sum().backward()
    torch.testing.assert_close(kl.cpu().double(), want.detach(), atol=2e-6, rtol=2e-4)
    torch.testing.assert_close(gp.cpu().double(), xe.grad, atol=1e-6, rtol=tolerance(dtype))
    torch.testing.assert_close(gq.cpu().double(), ye.grad, atol=1e-6, rtol=tolerance(dtype))


def test_cuda_kl_opcheck_and_errors():
    p, q, pr, qr = [None if t is None else t.to(GPU) for t in pair(seed=13, n=4, v=8, rows_p=2,
                                                                     rows_q=1)]
    args = (p.clone().requires_grad_(True), q.clone().requires_grad_(True), pr, qr, 1.0, "cuda")
    torch.library.opcheck(torch.ops.vppo.kl.default, args)
    with pytest.raises(ValueError, match="q_logits is on cpu"):
        vt.kl(p, q.cpu(), p_rows=pr, q_rows=qr)


@pytest.mark.parametrize("rows_total,in_place", [(None, False), (60, False), (None, True)])
def test_cuda_full_kl_matches_simt(rows_total, in_place):
    """kl_penalty="full" on CUDA tensors: ref_logits read in place through the same rows, the [3, N]
    saved tensor on the device, the backward's KL term; against the same call on the SIMT executor."""
    b = make_batch(lengths=(20, 0, 31), vocab=600, dtype=torch.bfloat16, seed=15,
                   rows_total=rows_total)
    g = torch.Generator().manual_seed(5)
    ref = (b["logits"].float() + torch.randn(b["logits"].shape, generator=g)).to(torch.bfloat16)
    kw = dict(kl_penalty="full", kl_coef=0.5)

    def full_run(b, ref, device):
        x = b["logits"].clone().requires_grad_(True)
        source = x * 1.0 if in_place else x
        if in_place:
            source.retain_grad()
        loss, out = vt.vppo_loss(source, b["logits_masked"], b["targets"], b["old_logp"],
                                 b["advantages"], b["cu_seqlens"], rows=b.get("rows"),
                                 ref_logits=ref, device=device, in_place=in_place, **kw)
        loss.backward()
        return loss, out, x.grad

    loss, out, grad = full_run(to_cuda(b), ref.to(GPU), "cuda")
    loss_s, out_s, grad_s = full_run(b, ref, "simt")
    assert loss.item() == pytest.approx(loss_s.item(), rel=1e-5, abs=1e-7)
    assert out["kl_loss"].item() == pytest.approx(out_s["kl_loss"].item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(out["ref_kl"].cpu(), out_s["ref_kl"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.cpu(), grad_s, rtol=rounding(torch.bfloat16), atol=1e-7)


# One rank of NCCL is what one GPU allows: the collectives run (through torch.distributed, on the
# device), and the single-process result must come out. The layouts' own tests with 2 to 4 ranks run
# in CI on gloo (test_distributed.py) and on the fake driver (test_cuda_fake_distributed.py).
BACKEND = "nccl"


@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or (BACKEND == "nccl" and not dist.is_nccl_available()):
        pytest.skip(f"this torch has no {BACKEND}")
    if GPU.type == "cuda":
        torch.cuda.set_device(GPU)
    dist.init_process_group(BACKEND, init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["data", "vocab", "seq", "data+vocab+seq"])
def test_cuda_parallel_layouts_with_one_nccl_rank(one_rank, layout):
    b = to_cuda(make_batch(lengths=(30, 0, 45, 17), vocab=777, dtype=torch.bfloat16, seed=16))
    kw = {}
    if "data" in layout:
        kw["process_group"] = one_rank.new_group([0])
    if "vocab" in layout:
        kw.update(vocab_group=one_rank.new_group([0]), vocab_start=0, vocab_size=777)
    if "seq" in layout:
        kw["seq_group"] = one_rank.new_group([0])
    loss, out, grad = run(b, "cuda", **kw)
    want, out_w, grad_w = run(b, "cuda")
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    assert torch.equal(out["mask"], out_w["mask"]) and torch.equal(out["k"], out_w["k"])
    torch.testing.assert_close(out["kl"], out_w["kl"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_w, rtol=rounding(torch.bfloat16), atol=1e-7)
