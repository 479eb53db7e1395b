"""vppo.torch.kl (SPEC section 13): the exact per-token KL(p || q) of two logits tensors, against an
eager PyTorch port (F.kl_div with log_target=True summed over the vocabulary, autograd through both
log_softmaxes), on both CPU executors, all dtypes, rows, -inf entries, opcheck, torch.compile and
the errors. The Rust side: tests/kl_div.rs."""

import pytest
import torch
import torch.nn.functional as F

import vppo.torch as vt

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def grid(gen, *shape):
    """Logits on a grid of 1/64 in [-6, 6]: exact in every dtype."""
    return torch.randint(-384, 385, shape, generator=gen).to(torch.float32) / 64.0


def pair(seed, n, v, dtype=torch.float32, rows_p=0, rows_q=0):
    gen = torch.Generator().manual_seed(seed)
    p = grid(gen, n + rows_p, v)
    q = grid(gen, n + rows_q, v)
    # half the rows of q near p's (small KL, where cancellation would show)
    pr = torch.sort(torch.randperm(n + rows_p, generator=gen)[:n]).values if rows_p else None
    qr = torch.sort(torch.randperm(n + rows_q, generator=gen)[:n]).values if rows_q else None
    for t in range(0, n, 2):
        a = t if pr is None else int(pr[t])
        b = t if qr is None else int(qr[t])
        q[b] = p[a] + grid(gen, v) / 16.0
    return p.to(dtype), q.to(dtype), pr, qr


def eager_kl(p, q, tau=1.0, p_rows=None, q_rows=None):
    """The eager port: KL(p || q) per token with F.kl_div(log q, log p, log_target=True), in f64
    on the same values; autograd through both log_softmaxes gives the reference gradients."""
    a = p if p_rows is None else p[p_rows]
    b = q if q_rows is None else q[q_rows]
    log_p = F.log_softmax(a.double() / tau, dim=-1)
    log_q = F.log_softmax(b.double() / tau, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def tolerance(dtype):
    return {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", ["simt", "reference"])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_matches_eager_pytorch(dtype, device, tau):
    p, q, _, _ = pair(seed=1, n=6, v=37, dtype=dtype)
    x, y = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
    kl = vt.kl(x, y, temperature=tau, device=device)
    assert kl.dtype == torch.float32 and kl.shape == (6,)
    xe = p.double().requires_grad_(True)
    ye = q.double().requires_grad_(True)
    want = eager_kl(xe, ye, tau)
    torch.testing.assert_close(kl.double(), want.detach(), atol=2e-6, rtol=2e-4)
    u = torch.linspace(-1.5, 2.0, 6)
    (kl * u).sum().backward()
    (want * u.double()).sum().backward()
    assert x.grad.dtype == dtype and y.grad.dtype == dtype
    tol = tolerance(dtype)
    torch.testing.assert_close(x.grad.double(), xe.grad, atol=1e-6, rtol=tol)
    torch.testing.assert_close(y.grad.double(), ye.grad, atol=1e-6, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_read_the_logits_in_place(dtype):
    p, q, pr, qr = pair(seed=2, n=5, v=20, dtype=dtype, rows_p=3, rows_q=2)
    x, y = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
    kl = vt.kl(x, y, p_rows=pr, q_rows=qr.int())
    xe = p.double().requires_grad_(True)
    ye = q.double().requires_grad_(True)
    want = eager_kl(xe, ye, 1.0, pr, qr)
    torch.testing.assert_close(kl.double(), want.detach(), atol=2e-6, rtol=2e-4)
    kl.sum().backward()
    want.sum().backward()
    tol = tolerance(dtype)
    torch.testing.assert_close(x.grad.double(), xe.grad, atol=1e-6, rtol=tol)
    torch.testing.assert_close(y.grad.double(), ye.grad, atol=1e-6, rtol=tol)
    # rows no token reads: exact zeros
    unread_p = sorted(set(range(p.shape[0])) - set(pr.tolist()))
    unread_q = sorted(set(range(q.shape[0])) - set(qr.tolist()))
    assert torch.equal(x.grad[unread_p], torch.zeros_like(x.grad[unread_p]))
    assert torch.equal(y.grad[unread_q], torch.zeros_like(y.grad[unread_q]))


def test_q_read_through_p_rows():
    p, q, pr, _ = pair(seed=3, n=4, v=9, rows_p=3)
    q = q[: p.shape[0]] if q.shape[0] >= p.shape[0] else torch.cat([q, q])[: p.shape[0]]
    x, y = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
    kl = vt.kl(x, y, p_rows=pr)
    xe, ye = p.double().requires_grad_(True), q.double().requires_grad_(True)
    want = eager_kl(xe, ye, 1.0, pr, pr)
    torch.testing.assert_close(kl.double(), want.detach(), atol=2e-6, rtol=2e-4)
    kl.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(y.grad.double(), ye.grad, atol=1e-6, rtol=1e-4)


def test_neg_inf_entries():
    """p_v = 0 adds nothing (the eager side masks those terms: F.kl_div gives 0 * -inf = NaN)."""
    p, q, _, _ = pair(seed=4, n=4, v=11)
    p[0, 3] = float("-inf")
    p[1, 5] = float("-inf")
    q[1, 5] = float("-inf")  # both 0
    x, y = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
    kl = vt.kl(x, y)
    xe, ye = p.double().requires_grad_(True), q.double().requires_grad_(True)
    log_p, log_q = F.log_softmax(xe, -1), F.log_softmax(ye, -1)
    finite = torch.isfinite(xe)
    # the terms with p_v = 0 masked on both sides of the product, so that no 0 * inf reaches autograd
    lp, lq = torch.where(finite, log_p, 0.0), torch.where(finite, log_q, 0.0)
    terms = torch.where(finite, lp.exp() * (lp - lq), 0.0)
    want = terms.sum(-1)
    torch.testing.assert_close(kl.double(), want.detach(), atol=2e-6, rtol=2e-4)
    kl.sum().backward()
    want.sum().backward()
    assert x.grad[0, 3] == 0 and x.grad[1, 5] == 0 and y.grad[1, 5] == 0
    torch.testing.assert_close(x.grad.double(), xe.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(y.grad.double(), ye.grad, atol=1e-6, rtol=1e-4)


def test_gradient_is_the_derivative():
    """torch.autograd.gradcheck on the reference device (f64 inside; f32 logits, so a coarse step)."""
    p, q, _, _ = pair(seed=5, n=3, v=5)
    x, y = p.clone().requires_grad_(True), q.clone().requires_grad_(True)
    kl = vt.kl(x, y, temperature=1.3)
    u = torch.tensor([0.5, -1.0, 2.0])
    gx, gy = torch.autograd.grad((kl * u).sum(), (x, y))
    h = 2.0 ** -6
    for base, g, which in ((p, gx, 0), (q, gy, 1)):
        for i in range(base.numel()):
            plus, minus = base.clone(), base.clone()
            plus.view(-1)[i] += h
            minus.view(-1)[i] -= h
            args = ((plus, q), (minus, q)) if which == 0 else ((p, plus), (p, minus))
            fp = (eager_kl(*args[0], 1.3) * u.double()).sum()
            fm = (eager_kl(*args[1], 1.3) * u.double()).sum()
            fd = (fp - fm) / (2 * h)
            assert abs(g.view(-1)[i].item() - fd.item()) <= 2e-4 + 2e-3 * abs(fd.item())


def test_opcheck():
    p, q, pr, qr = pair(seed=6, n=4, v=8, rows_p=2, rows_q=1)
    args = (p.clone().requires_grad_(True), q.clone().requires_grad_(True), pr, qr, 1.0, "simt")
    torch.library.opcheck(torch.ops.vppo.kl.default, args)
    kl, lse_p, lse_q = torch.ops.vppo.kl.default(p, q, pr, qr, 1.0, "simt")
    torch.library.opcheck(torch.ops.vppo.kl_backward.default,
                          (p, q, pr, qr, kl, lse_p, lse_q, torch.ones(4), 1.0, "simt"))


def test_compile_fullgraph():
    p, q, pr, _ = pair(seed=7, n=5, v=16, rows_p=2)

    def step(x, y, rows):
        return (vt.kl(x, y, temperature=0.9, p_rows=rows) * 3.0).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, y = p.clone().requires_grad_(True), q[:5].clone().requires_grad_(True)
    loss = compiled(x, y, pr)
    loss.backward()
    xe, ye = p.clone().requires_grad_(True), q[:5].clone().requires_grad_(True)
    loss_e = step(xe, ye, pr)
    loss_e.backward()
    assert loss.item() == loss_e.item()
    assert torch.equal(x.grad, xe.grad) and torch.equal(y.grad, ye.grad)


def test_kl_infinite_is_an_error_naming_q_row_and_column():
    p = torch.zeros(2, 4)
    q = torch.zeros(2, 4)
    q[1, 2] = float("-inf")
    for device in ("simt", "reference"):
        with pytest.raises(ValueError, match=r"row 1: q_logits is -inf at column 2"):
            vt.kl(p, q, device=device)


@pytest.mark.parametrize("device", ["simt", "reference"])
def test_bad_input_raises_value_error_naming_the_tensor(device):
    p, q, _, _ = pair(seed=8, n=3, v=6)
    bad = p.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="p_logits has a non-finite value .* row 2"):
        vt.kl(bad, q, device=device)
    with pytest.raises(ValueError, match="q_logits row 0 is all -inf"):
        vt.kl(p, torch.full_like(q, float("-inf")), device=device)
    with pytest.raises(ValueError, match="dtype"):
        vt.kl(p, q.to(torch.bfloat16), device=device)
    with pytest.raises(ValueError, match="p_rows position 1"):
        vt.kl(p, q, p_rows=torch.tensor([1, 0, 2]), device=device)
    with pytest.raises(ValueError, match="temperature"):
        vt.kl(p, q, temperature=0.0, device=device)
    with pytest.raises(ValueError, match="not contiguous"):
        vt.kl(p.t().contiguous().t(), q, device=device)



def test_devices_are_checked():
    """device="cuda" needs CUDA tensors (these are on the CPU), an unknown device is refused, and a
    tensor on a device that is neither CPU nor CUDA is never copied (the CUDA path itself runs on
    the fake driver in test_cuda_fake.py, and on a GPU in test_cuda.py)."""
    p, q, _, _ = pair(seed=9, n=3, v=6)
    with pytest.raises(ValueError, match=r'vppo.torch.kl: device="cuda" needs CUDA tensors'):
        vt.kl(p, q, device="cuda")
    with pytest.raises(ValueError, match="vppo.torch.kl: device must be"):
        vt.kl(p, q, device="gpu")
    with pytest.raises(RuntimeError, match="q_logits is on meta"):
        vt.kl(p, q.to("meta"))


def test_empty():
    p = torch.zeros(0, 5, requires_grad=True)
    kl = vt.kl(p, torch.zeros(0, 5))
    assert kl.shape == (0,)
    kl.sum().backward()
    assert p.grad.shape == (0, 5)
