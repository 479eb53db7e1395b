"""The VPPO loss as a PyTorch op (SPEC section 13).

``vppo_loss`` is registered with ``torch.library.custom_op`` (``vppo::loss``), with a fake
implementation (so it runs under ``torch.compile`` without a graph break) and an autograd formula
whose backward op computes dloss/dlogits from what the forward saved (``Vppo::backward_saved``).

CUDA tensors run the crate's kernels on their own GPU (``device="cuda"``, the default for them), in
place (no copy of the logits), ordered after torch's current stream of that device. CPU tensors run
the same kernels on the SIMT executor (``device="simt"``, their default) or the f64 reference
(``device="reference"``). A tensor on another device than ``logits`` is an error, never a silent copy.

No libtorch is linked: tensors reach the extension as (data pointer, element count) after the checks
below, and every output is allocated here with ``torch.empty`` (on the logits' device) and filled by
the extension.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _vppo

__all__ = ["vppo_loss", "VppoLoss", "TOKEN_OUTPUTS", "RESPONSE_OUTPUTS", "STATS"]

#: Per-token outputs in ``out`` ([N]; ``mask`` uint8, the others float32).
TOKEN_OUTPUTS = (
    "score",
    "kl",
    "k3",
    "entropy",
    "logp",
    "logp_masked",
    "lse",
    "lse_masked",
    "mask",
    "dlogp",
)
#: Per-response outputs in ``out`` ([B]; ``k`` int32, the others float32).
RESPONSE_OUTPUTS = ("sbar", "k", "alpha")
#: Scalars in ``out`` (0-dim float64 tensors).
STATS = ("pg_loss", "token_normalizer", "clip_fraction", "mean_ratio", "selected_fraction", "kl_loss")

_LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int32, torch.int64)
_DEVICES = ("simt", "reference", "cuda")
_GRAD_DTYPES = ("logits", "f32")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check(name: str, t: Tensor, dtypes, dim: int, on: Optional[torch.device] = None) -> None:
    """Device, dtype, rank and contiguity of one input: metadata only, so it traces. ``on``: the
    device the tensor must be on (that of ``logits``); None: the CPU."""
    if not isinstance(t, Tensor):
        raise TypeError(f"vppo_loss: {name} must be a torch.Tensor, not {type(t).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"vppo_loss: {name} is on {t.device}; the op takes CUDA or CPU tensors (no copy is made)"
        )
    want = torch.device("cpu") if on is None else on
    if t.device != want:
        raise ValueError(
            f"vppo_loss: {name} is on {t.device}, expected {want} (the logits' device; no copy is "
            "made)"
        )
    if t.dtype not in dtypes:
        want = ", ".join(_dtype_name(d) for d in dtypes)
        raise ValueError(f"vppo_loss: {name} has dtype {_dtype_name(t.dtype)}, expected {want}")
    if t.dim() != dim:
        raise ValueError(f"vppo_loss: {name} has shape {tuple(t.shape)}, expected {dim} dimension(s)")
    if not t.is_contiguous():
        raise ValueError(
            f"vppo_loss: {name} is not contiguous (strides {t.stride()}); no silent copy is made: "
            f"pass {name}.contiguous()"
        )


def _on(logits) -> Optional[torch.device]:
    """The device every tensor of a call must be on: the logits' CUDA device, or None (the CPU)."""
    if isinstance(logits, Tensor) and logits.device.type == "cuda":
        return logits.device
    return None


def _check_device(device: str, on: Optional[torch.device]) -> None:
    if device not in _DEVICES:
        raise ValueError(f'vppo_loss: device must be "cuda", "simt" or "reference", not {device!r}')
    if on is not None and device != "cuda":
        raise ValueError(
            f'vppo_loss: device={device!r} runs on the CPU, the logits are on {on} (no copy is made): '
            'use device="cuda" (the default for CUDA tensors)'
        )
    if on is None and device == "cuda":
        raise ValueError('vppo_loss: device="cuda" needs CUDA tensors, the logits are on the CPU')


def _check_inputs(logits, logits_masked, targets, old_logp, advantages, cu_seqlens, rows, masked_rows,
                  device, grad_dtype):
    on = _on(logits)
    _check("logits", logits, _LOGITS_DTYPES, 2, on)
    _check("logits_masked", logits_masked, _LOGITS_DTYPES, 2, on)
    if logits_masked.dtype != logits.dtype:
        raise ValueError(
            f"vppo_loss: logits_masked has dtype {_dtype_name(logits_masked.dtype)}, logits "
            f"{_dtype_name(logits.dtype)}: they must agree"
        )
    if logits_masked.shape[1] != logits.shape[1]:
        raise ValueError(
            f"vppo_loss: logits_masked has V = {logits_masked.shape[1]}, logits V = {logits.shape[1]}"
        )
    _check("targets", targets, _INT_DTYPES, 1, on)
    _check("old_logp", old_logp, (torch.float32,), 1, on)
    _check("advantages", advantages, (torch.float32,), 1, on)
    _check("cu_seqlens", cu_seqlens, _INT_DTYPES, 1, on)
    if rows is not None:
        _check("rows", rows, _INT_DTYPES, 1, on)
    if masked_rows is not None:
        _check("masked_rows", masked_rows, _INT_DTYPES, 1, on)
    _check_device(device, on)
    if grad_dtype not in _GRAD_DTYPES:
        raise ValueError(f'vppo_loss: grad_dtype must be "logits" or "f32", not {grad_dtype!r}')


def _check_ref_logp(ref_logp, on=None):
    if ref_logp is not None:
        _check("ref_logp", ref_logp, (torch.float32,), 1, on)


def _check_ref_logits(ref_logits, logits):
    """``ref_logits`` (kl_penalty = full): the dtype and shape of ``logits`` (read through the same
    rows); the crate checks the rest."""
    if ref_logits is None:
        return
    _check("ref_logits", ref_logits, _LOGITS_DTYPES, 2, _on(logits))
    if ref_logits.dtype != logits.dtype or ref_logits.shape != logits.shape:
        raise ValueError(
            f"vppo_loss: ref_logits is {_dtype_name(ref_logits.dtype)} {tuple(ref_logits.shape)}, "
            f"logits {_dtype_name(logits.dtype)} {tuple(logits.shape)}: they must agree"
        )


def _as(name: str, t: Tensor, dtype: torch.dtype) -> Tensor:
    """An index tensor as the extension reads it (int32 or int64): an O(N) conversion, range checked
    so that no value is silently truncated."""
    if t.dtype == dtype:
        return t
    if dtype == torch.int32 and t.numel() > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < -(2**31) or hi >= 2**31:
            bad = lo if lo < -(2**31) else hi
            raise ValueError(f"vppo_loss: {name} has the value {bad}, outside int32")
    return t.to(dtype)


def _raw(t: Tensor) -> Tuple[int, int]:
    return (t.data_ptr(), t.numel())


def _options_json(options: dict) -> str:
    """The loss options as the JSON object the extension parses. Written by hand with plain string
    operations so that torch.compile traces it without a graph break."""
    parts = []
    for key in sorted(options):
        value = options[key]
        if value is None and key == "dual_clip":
            value = "none"  # dual_clip=None turns the dual clip off (the command line's `none`)
        if value is None:
            text = "null"
        elif value is True:
            text = "true"
        elif value is False:
            text = "false"
        elif isinstance(value, str):
            if '"' in value or "\\" in value:
                raise ValueError(f"vppo_loss: option {key} has the value {value!r}")
            text = '"' + value + '"'
        elif isinstance(value, (tuple, list)):
            text = "[" + ",".join(repr(float(x)) for x in value) + "]"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            raise ValueError(f"vppo_loss: option {key} has the value {value!r}")
        parts.append('"' + key + '":' + text)
    return "{" + ",".join(parts) + "}"


# -------------------------------------------------------------------------------------------------
# Data parallel (SPEC section 11): the reductions go through torch.distributed
# -------------------------------------------------------------------------------------------------

#: The process groups ``vppo_loss`` was given, by the name the op carries (an op argument must be a
#: plain value, so the group itself stays here).
_GROUPS: dict = {}


def _check_vocab_shard(vocab_start, vocab_size, logits, in_place) -> Tuple[int, int]:
    """This rank's (first column, V) of a vocabulary group, checked: 0 <= vocab_start,
    vocab_start + V_r <= V < 2^31 (target ids are int32)."""
    if in_place:
        raise ValueError("vppo_loss: vocab_group is not combined with in_place yet")
    if vocab_start is None:
        raise ValueError("vppo_loss: vocab_group needs vocab_start, this rank's first column")
    start, total = int(vocab_start), int(vocab_size)
    width = logits.shape[-1] if isinstance(logits, Tensor) else 0
    if start < 0 or total < 0 or total >= 2**31 or start + width > total:
        raise ValueError(
            f"vppo_loss: vocab_start {start} with {width} columns does not fit a vocabulary of "
            f"vocab_size {total} (0 <= vocab_start, vocab_start + the shard's width <= vocab_size "
            "< 2^31)"
        )
    return start, total


def _group_name(group) -> str:
    name = f"vppo-group-{id(group)}"
    _GROUPS[name] = group
    return name


def _group_reducer(name: str):
    """(rank, size, reduce) for the extension: ``reduce(values, op)`` all-gathers float64 values
    over the group and combines them in rank order ("sum" or "max"), so that every rank receives the
    same bits whatever the backend's own reduction order, or returns them concatenated ("gather")."""
    import torch.distributed as dist

    group = _GROUPS[name]
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    on = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        on = torch.device("cuda", torch.cuda.current_device())

    def reduce(values, op):
        mine = torch.tensor(values, dtype=torch.float64, device=on)
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine, group=group)
        if op == "gather":
            return torch.cat(parts).cpu().tolist()
        acc = parts[0]
        for p in parts[1:]:
            acc = acc + p if op == "sum" else torch.maximum(acc, p)
        return acc.cpu().tolist()

    return (rank, size, reduce)


def _reducers(names):
    """The reducers of the groups named (None where a layout is not used), in the order the crate
    runs their first rounds: vocabulary, sequence, data (src/parallel/)."""
    return [None if n is None else _group_reducer(n) for n in names]


class _agreeing:
    """A context in which an error raised on this rank before the extension's collectives is first
    reported to each group (``_vppo.report_failure``, in the crate's order), so that no other rank
    waits for this one."""

    def __init__(self, reducers):
        self.reducers = [r for r in reducers if r is not None]

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None and issubclass(kind, Exception):
            for r in self.reducers:
                _vppo.report_failure(*r)
        return False


# -------------------------------------------------------------------------------------------------
# The ops
# -------------------------------------------------------------------------------------------------


@torch.library.custom_op("vppo::loss", mutates_args=())
def _loss(
    logits: Tensor,
    logits_masked: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    cu_seqlens: Tensor,
    rows: Optional[Tensor],
    masked_rows: Optional[Tensor],
    ref_logp: Optional[Tensor],
    options: str,
    device: str,
    grad_dtype: str,
    in_place: bool,
    group: Optional[str],
    vocab_start: int,
    vocab_size: int,
    seq_continues: int,
    vocab_group: Optional[str] = None,
    seq_group: Optional[str] = None,
    ref_logits: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor, Tensor, Tensor, Tensor]:
    # The last output is kl_penalty = full's [3, N] lse_ref, ref_kl, dref_kl (SPEC section 12),
    # [3, 0] without ref_logits.
    # `group` is the data group; `vocab_group` and `seq_group` the other layouts' (SPEC 11)
    vocab_r, seq_r, data_r = _reducers((vocab_group, seq_group, group))
    with _agreeing((vocab_r, seq_r, data_r)):
        _check_inputs(logits, logits_masked, targets, old_logp, advantages, cu_seqlens, rows,
                      masked_rows, device, grad_dtype)
        _check_ref_logp(ref_logp, _on(logits))
        _check_ref_logits(ref_logits, logits)
        targets = _as("targets", targets, torch.int32)
        cu_seqlens = _as("cu_seqlens", cu_seqlens, torch.int32)
        rows = None if rows is None else _as("rows", rows, torch.int64)
        masked_rows = None if masked_rows is None else _as("masked_rows", masked_rows, torch.int64)
    n, b = targets.numel(), advantages.numel()
    on = logits.device
    token = [torch.empty(n, dtype=torch.uint8 if name == "mask" else torch.float32, device=on)
             for name in TOKEN_OUTPUTS]
    resp = [torch.empty(b, dtype=torch.int32 if name == "k" else torch.float32, device=on)
            for name in RESPONSE_OUTPUTS]
    full = torch.zeros((3, n if ref_logits is not None else 0), dtype=torch.float32, device=on)
    if device == "cuda":
        scalars = _vppo.forward_cuda(
            on.index, torch.cuda.current_stream(on).cuda_stream, options,
            _dtype_name(logits.dtype), logits.shape[1],
            _raw(logits), _raw(logits_masked), _raw(targets), _raw(old_logp), _raw(advantages),
            _raw(cu_seqlens), None if rows is None else _raw(rows),
            None if masked_rows is None else _raw(masked_rows),
            [_raw(t) for t in token + resp],
            None if ref_logp is None else _raw(ref_logp),
            data_r,
            ref_logits=None if ref_logits is None else _raw(ref_logits),
            full_out=None if ref_logits is None else _raw(full),
            vocab_shard=None if vocab_start < 0 else (vocab_start, vocab_size),
            seq_continues=None if seq_continues < 0 else bool(seq_continues),
            vocab_group=vocab_r,
            seq_group=seq_r,
        )
        loss = torch.tensor(scalars[0], dtype=torch.float32, device=on)
        stats = torch.tensor(scalars[1:], dtype=torch.float64, device=on)
        return (loss, *token, *resp, stats, full)
    scalars = _vppo.forward(
        device, options, _dtype_name(logits.dtype), logits.shape[1],
        _raw(logits), _raw(logits_masked), _raw(targets), _raw(old_logp), _raw(advantages),
        _raw(cu_seqlens), None if rows is None else _raw(rows),
        None if masked_rows is None else _raw(masked_rows),
        [_raw(t) for t in token + resp],
        data_r,
        None if vocab_start < 0 else (vocab_start, vocab_size),
        None if ref_logp is None else _raw(ref_logp),
        None if seq_continues < 0 else bool(seq_continues),
        vocab_group=vocab_r,
        seq_group=seq_r,
        ref_logits=None if ref_logits is None else _raw(ref_logits),
        full_out=None if ref_logits is None else _raw(full),
    )
    loss = torch.tensor(scalars[0], dtype=torch.float32)
    stats = torch.tensor(scalars[1:], dtype=torch.float64)
    return (loss, *token, *resp, stats, full)


@_loss.register_fake
def _loss_fake(logits, logits_masked, targets, old_logp, advantages, cu_seqlens, rows, masked_rows,
               ref_logp, options, device, grad_dtype, in_place, group, vocab_start, vocab_size,
               seq_continues, vocab_group=None, seq_group=None, ref_logits=None):
    n, b = targets.shape[0], advantages.shape[0]
    loss = logits.new_empty((), dtype=torch.float32)
    token = [logits.new_empty((n,), dtype=torch.uint8 if name == "mask" else torch.float32)
             for name in TOKEN_OUTPUTS]
    resp = [logits.new_empty((b,), dtype=torch.int32 if name == "k" else torch.float32)
            for name in RESPONSE_OUTPUTS]
    stats = logits.new_empty((len(STATS),), dtype=torch.float64)
    full = logits.new_empty((3, n if ref_logits is not None else 0), dtype=torch.float32)
    return (loss, *token, *resp, stats, full)


def _check_full(ref_logits, full, logits, targets) -> None:
    """The full KL's backward inputs: both or neither, ``full`` [3, N] float32."""
    if (ref_logits is None) != (full is None):
        raise ValueError("vppo_loss: ref_logits and the full KL's saved tensors go together")
    if ref_logits is None:
        return
    _check_ref_logits(ref_logits, logits)
    _check("full", full, (torch.float32,), 2, _on(logits))
    if tuple(full.shape) != (3, targets.shape[0]):
        raise ValueError(f"vppo_loss: the full KL's saved tensors are {tuple(full.shape)}, "
                         f"expected (3, {targets.shape[0]})")


def _backward_args(logits, targets, lse, dlogp, rows):
    on = _on(logits)
    _check("logits", logits, _LOGITS_DTYPES, 2, on)
    _check("targets", targets, _INT_DTYPES, 1, on)
    _check("lse", lse, (torch.float32,), 1, on)
    _check("dlogp", dlogp, (torch.float32,), 1, on)
    targets = _as("targets", targets, torch.int32)
    if rows is not None:
        _check("rows", rows, _INT_DTYPES, 1, on)
        rows = _as("rows", rows, torch.int64)
    return targets, rows


def _backward_into(grad, logits, targets, lse, dlogp, rows, options, device, vocab_start=-1,
                   vocab_size=0, ref_logits=None, full=None) -> None:
    """Writes dloss/dlogits into ``grad`` from arguments checked by ``_backward_args``; ``logits``
    None means in place (``grad`` holds the logits). With ``vocab_start`` >= 0 the logits are the
    columns [vocab_start, vocab_start + V_r) of a vocabulary of ``vocab_size`` (SPEC section 11)."""
    source = grad if logits is None else logits
    if device == "cuda":
        _vppo.backward_cuda(
            grad.device.index, torch.cuda.current_stream(grad.device).cuda_stream, options,
            _dtype_name(source.dtype), source.shape[1],
            None if logits is None else _raw(logits),
            _dtype_name(grad.dtype), _raw(grad), _raw(targets), _raw(lse), _raw(dlogp),
            None if rows is None else _raw(rows),
            None if ref_logits is None else _raw(ref_logits),
            None if full is None else _raw(full),
            None if vocab_start < 0 else (vocab_start, vocab_size),
        )
        return
    _vppo.backward(
        device, options, _dtype_name(source.dtype), source.shape[1],
        None if logits is None else _raw(logits),
        _dtype_name(grad.dtype), _raw(grad), _raw(targets), _raw(lse), _raw(dlogp),
        None if rows is None else _raw(rows),
        None if vocab_start < 0 else (vocab_start, vocab_size),
        None if ref_logits is None else _raw(ref_logits),
        None if full is None else _raw(full),
    )


@torch.library.custom_op("vppo::loss_backward", mutates_args=())
def _loss_backward(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    dlogp: Tensor,
    rows: Optional[Tensor],
    options: str,
    device: str,
    grad_dtype: str,
    vocab_start: int = -1,
    vocab_size: int = 0,
    ref_logits: Optional[Tensor] = None,
    full: Optional[Tensor] = None,
) -> Tensor:
    """dloss/dlogits [R, V] (zero rows where no token reads) from the saved lse and dlogp; with
    ``vocab_start`` >= 0, of this rank's vocabulary columns; with ``ref_logits``, plus the gradient
    of kl_penalty = full from ``full`` ([3, N]: lse_ref, ref_kl, dref_kl already scaled). ``lse``
    must be the forward's for these logits (autograd passes it): it is checked to be finite, not
    recomputed, and another finite value could make p = exp(a / tau - lse) overflow."""
    targets, rows = _backward_args(logits, targets, lse, dlogp, rows)
    _check_full(ref_logits, full, logits, targets)
    dtype = torch.float32 if grad_dtype == "f32" else logits.dtype
    grad = torch.empty(logits.shape, dtype=dtype, device=logits.device)
    _backward_into(grad, logits, targets, lse, dlogp, rows, options, device, vocab_start, vocab_size,
                   ref_logits, full)
    return grad


@_loss_backward.register_fake
def _loss_backward_fake(logits, targets, lse, dlogp, rows, options, device, grad_dtype,
                        vocab_start=-1, vocab_size=0, ref_logits=None, full=None):
    dtype = torch.float32 if grad_dtype == "f32" else logits.dtype
    return logits.new_empty(logits.shape, dtype=dtype)


@torch.library.custom_op("vppo::loss_backward_", mutates_args=("logits",))
def _loss_backward_in_place(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    dlogp: Tensor,
    rows: Optional[Tensor],
    options: str,
    device: str,
    ref_logits: Optional[Tensor] = None,
    full: Optional[Tensor] = None,
) -> None:
    """dloss/dlogits written over ``logits`` (declared mutated: its version counter is bumped, so any
    other saved use of those logits raises in autograd instead of reading a gradient)."""
    targets, rows = _backward_args(logits, targets, lse, dlogp, rows)
    _check_full(ref_logits, full, logits, targets)
    _backward_into(logits, None, targets, lse, dlogp, rows, options, device, -1, 0, ref_logits, full)


@_loss_backward_in_place.register_fake
def _loss_backward_in_place_fake(logits, targets, lse, dlogp, rows, options, device, ref_logits=None,
                                 full=None):
    return None


_LSE = 1 + TOKEN_OUTPUTS.index("lse")
_DLOGP = 1 + TOKEN_OUTPUTS.index("dlogp")


def _setup_context(ctx, inputs, output):
    (logits, _, targets, _, _, _, rows, _, _, options, device, grad_dtype, in_place, _, vocab_start,
     vocab_size) = inputs[:16]
    ref_logits = inputs[19] if len(inputs) > 19 else None
    ctx.save_for_backward(logits, targets, output[_LSE], output[_DLOGP], rows, ref_logits, output[-1])
    ctx.n_inputs = len(inputs)
    ctx.options, ctx.device, ctx.grad_dtype, ctx.in_place = options, device, grad_dtype, in_place
    ctx.vocab_start, ctx.vocab_size = vocab_start, vocab_size
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_):
    logits, targets, lse, dlogp, rows, ref_logits, full = ctx.saved_tensors
    none = (None,) * (ctx.n_inputs - 1)
    if grad_loss is None:
        return (None,) + none
    # dloss/dlogits is linear in dloss/dlogp (and in dloss/dkl_t of the full KL): the incoming
    # gradient of the loss scales both.
    scale = grad_loss.to(torch.float32)
    dlogp = (dlogp * scale).contiguous()
    if ref_logits is None:
        full = None
    else:
        full = torch.stack([full[0], full[1], full[2] * scale]).contiguous()
    if ctx.in_place:
        _loss_backward_in_place(logits, targets, lse, dlogp, rows, ctx.options, ctx.device,
                                ref_logits, full)
        return (logits,) + none
    grad = _loss_backward(logits, targets, lse, dlogp, rows, ctx.options, ctx.device, ctx.grad_dtype,
                          ctx.vocab_start, ctx.vocab_size, ref_logits, full)
    return (grad,) + none


_loss.register_autograd(_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------------------------
# The public API
# -------------------------------------------------------------------------------------------------


def vppo_loss(
    logits: Tensor,
    logits_masked: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    cu_seqlens: Tensor,
    *,
    rows: Optional[Tensor] = None,
    masked_rows: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    ref_logits: Optional[Tensor] = None,
    device: Optional[str] = None,
    grad_dtype: str = "logits",
    in_place: bool = False,
    process_group=None,
    vocab_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    seq_group=None,
    seq_continues: bool = False,
    **options,
):
    """The VPPO loss of a packed batch (SPEC sections 1-8) and its outputs.

    ``logits`` and ``logits_masked`` are [N, V] (or [R, V] read through ``rows`` / ``masked_rows``,
    SPEC section 10) in float32, float16 or bfloat16; ``targets`` [N] and ``cu_seqlens`` [B+1] int32
    or int64; ``old_logp`` [N] and ``advantages`` [B] float32. ``options`` are the command line's loss
    options with ``_`` (``top_fraction=0.4``, ``perception="k3"``, ``dual_clip=None`` turns the dual
    clip off, ``tas_scope``, ``eps_low``, ``loss_type="gspo"`` (SPEC section 12: "ppo", "gspo",
    "gspo_token", "cispo"), ``mask_by="entropy"`` ("perception", "entropy", "perception_or_entropy")
    with ``entropy_top_fraction=0.2``, ``kl_penalty="k3"`` ("none", "k1", "abs", "mse", "k3"; the
    official "kl" and "low_var_kl" too) with ``kl_coef=1e-3``, ...), plus ``tas_range=(lo, hi)``;
    defaults are the command line's. ``ref_logp`` [N] float32: the reference policy's log-prob of
    each target, which any ``kl_penalty`` but "none" needs (SPEC section 12); ``out["kl_loss"]`` is
    the penalty before ``kl_coef``. ``ref_logits`` (the dtype and shape of ``logits``, read through
    the same ``rows``): the reference policy's logits, which ``kl_penalty="full"`` needs: the exact
    KL(pi || pi_ref) over the vocabulary per token (``out["ref_kl"]``), with its gradient in the
    backward (CPU and CUDA tensors). ``device``: for CUDA tensors "cuda" (the default: the kernels on
    the tensors' GPU, in place, ordered after torch's current stream there, with every parallel
    layout below); for CPU tensors "simt" (the default:
    the kernels on the SIMT executor) or "reference" (the f64 reference). ``grad_dtype``: "logits" (default) or "f32" (autograd then stores it in the
    logits' dtype). ``in_place=True``: the backward writes the gradient over ``logits``.

    ``process_group``: data parallel (SPEC section 11). Each rank passes its own whole responses;
    the op reduces over the group (torch.distributed: gloo for CPU tensors, NCCL for CUDA tensors,
    whose batch stays on the GPU) the token count Z, the
    count B' of non-empty responses, the Sbar range and, for mean-preserving shaping, the sum of n_b,
    so that the sum over ranks of the returned losses is the loss of the concatenated batch and
    every rank's gradient rows are that loss's. An engine that averages gradients over ranks must
    multiply the loss by the world size. Bad input on any rank raises on every rank (ValueError).

    ``vocab_group``, ``vocab_start``: vocabulary parallel (SPEC section 11). This rank's logits and
    logits_masked are the columns [vocab_start, vocab_start + V_r) of a vocabulary of ``vocab_size``
    (default: the sum of the ranks' V_r, one all-reduce); targets are global ids; the other inputs
    are the same on every rank. Every rank returns the same loss and outputs (bit-identical), and
    the backward writes the gradient of this rank's columns. Not combined with ``in_place`` yet.

    ``seq_group``, ``seq_continues``: sequence parallel (SPEC section 11). This rank holds pieces of
    responses in token order (its rows, targets, old_logp, one advantage per piece, cu_seqlens over
    its pieces); ``seq_continues=True`` says its first piece continues the previous rank's last
    response (with the same advantage). The mask of a split response is exactly the unsplit one,
    Sbar, k and alpha are its whole response's, and the loss returned is the group's (the same on
    every rank); the backward writes this rank's rows.

    Combined layouts: ``process_group`` with ``vocab_group`` (each data rank's batch sharded over
    its vocabulary group) or with ``seq_group`` (each data rank's batch split over its sequence
    group). ``process_group`` is then the data group of this rank's position in the inner group
    (one rank of each vocabulary or sequence group, all at the same position; create every group
    with ``torch.distributed.new_group`` on every rank). The loss returned is the inner group's
    batch's share of the data group's loss: the sum over the data group is the loss of all the
    batches together. ``vocab_group`` with ``seq_group`` (and optionally ``process_group``): this
    rank holds the columns [vocab_start, vocab_start + V_r) of its pieces; ``vocab_group`` is the
    ranks holding the same pieces, ``seq_group`` the ranks holding the same columns of the other
    pieces, in token order. Bad input on any rank raises on every rank of every group.

    Returns ``(loss, out)``: ``loss`` a 0-dim float32 tensor whose backward gives dloss/dlogits only;
    ``out`` a dict of the per-token (``TOKEN_OUTPUTS``), per-response (``RESPONSE_OUTPUTS``) tensors
    and the statistics (``STATS``). Bad input raises ValueError with the crate's message.
    """
    if device is None:
        device = "cuda" if _on(logits) is not None else "simt"
    seq = -1
    if seq_group is not None:
        seq = int(bool(seq_continues))
    start, total = -1, vocab_size
    if vocab_group is not None and total is None:
        # V from the shards' widths: a collective every rank of the group reaches.
        import torch.distributed as dist

        width = torch.tensor([logits.shape[-1] if isinstance(logits, Tensor) else 0],
                             dtype=torch.int64)
        if dist.get_backend(vocab_group) == "nccl":
            width = width.cuda()
        dist.all_reduce(width, group=vocab_group)
        total = int(width.item())
    names = tuple(None if g is None else _group_name(g) for g in (vocab_group, seq_group, process_group))
    # From here on an error on this rank is reported to its groups first (no rank waits on it).
    with _agreeing(_reducers(names)):
        if vocab_group is not None:
            start, total = _check_vocab_shard(vocab_start, total, logits, in_place)
        else:
            total = 0
        _check_inputs(logits, logits_masked, targets, old_logp, advantages, cu_seqlens, rows,
                      masked_rows, device, grad_dtype)
        _check_ref_logp(ref_logp)
        if in_place and grad_dtype != "logits":
            raise ValueError('vppo_loss: in_place=True writes the gradient in the logits dtype: '
                             'grad_dtype must be "logits"')
        options_json = _options_json(options)
    if options.get("kl_penalty", "none") != "full":
        # Read by kl_penalty = full only (SPEC section 12), ignored otherwise: not carried into the
        # op, so no [3, N] output and no second read of an [N, V] tensor.
        ref_logits = None
    result = _loss(logits, logits_masked, targets, old_logp, advantages, cu_seqlens, rows, masked_rows,
                   ref_logp, options_json, device, grad_dtype, bool(in_place), names[2], start,
                   int(total), seq, names[0], names[1], ref_logits)
    names = TOKEN_OUTPUTS + RESPONSE_OUTPUTS
    out = {name: result[1 + i] for i, name in enumerate(names)}
    stats = result[1 + len(names)]
    for i, name in enumerate(STATS):
        out[name] = stats[i]
    if ref_logits is not None:
        # kl_penalty = full: KL(pi || pi_ref) of every token (SPEC section 12).
        out["ref_kl"] = result[-1][1]
    return result[0], out


class VppoLoss(torch.nn.Module):
    """``vppo_loss`` with its options fixed: ``VppoLoss(top_fraction=0.4, perception="k3")(logits,
    logits_masked, targets, old_logp, advantages, cu_seqlens, rows=...)`` returns ``(loss, out)``."""

    def __init__(self, **options):
        super().__init__()
        self.options = dict(options)

    def forward(self, logits, logits_masked, targets, old_logp, advantages, cu_seqlens, *, rows=None,
                masked_rows=None, ref_logp=None, ref_logits=None, process_group=None,
                vocab_group=None, vocab_start=None, seq_group=None, seq_continues=False):
        return vppo_loss(logits, logits_masked, targets, old_logp, advantages, cu_seqlens, rows=rows,
                         masked_rows=masked_rows, ref_logp=ref_logp, ref_logits=ref_logits,
                         process_group=process_group,
                         vocab_group=vocab_group, vocab_start=vocab_start, seq_group=seq_group,
                         seq_continues=seq_continues, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in sorted(self.options.items()))


# -------------------------------------------------------------------------------------------------
# The KL op (SPEC section 13): pass 1 alone, differentiable with respect to both logits tensors
# -------------------------------------------------------------------------------------------------

__all__ += ["kl"]


def _kl_named(f, *args) -> None:
    """``f(*args)`` with the op's own name in its error message."""
    try:
        f(*args)
    except (ValueError, RuntimeError, TypeError) as e:
        raise type(e)(str(e).replace("vppo_loss:", "vppo.torch.kl:", 1)) from None


def _kl_check(name: str, t: Tensor, dtypes, dim: int, on: Optional[torch.device] = None) -> None:
    """``_check`` with the op's own name in the message; ``on``: the CUDA device of ``p_logits``
    (None: the CPU)."""
    _kl_named(_check, name, t, dtypes, dim, on)


def _kl_inputs(p_logits, q_logits, p_rows, q_rows, device):
    on = _on(p_logits)
    _kl_check("p_logits", p_logits, _LOGITS_DTYPES, 2, on)
    _kl_check("q_logits", q_logits, _LOGITS_DTYPES, 2, on)
    if q_logits.dtype != p_logits.dtype:
        raise ValueError(
            f"vppo.torch.kl: q_logits has dtype {_dtype_name(q_logits.dtype)}, p_logits "
            f"{_dtype_name(p_logits.dtype)}: they must agree"
        )
    if q_logits.shape[1] != p_logits.shape[1]:
        raise ValueError(f"vppo.torch.kl: q_logits has V = {q_logits.shape[1]}, p_logits V = "
                         f"{p_logits.shape[1]}")
    if p_rows is not None:
        _kl_check("p_rows", p_rows, _INT_DTYPES, 1, on)
        p_rows = _as("p_rows", p_rows, torch.int64)
    if q_rows is not None:
        _kl_check("q_rows", q_rows, _INT_DTYPES, 1, on)
        q_rows = _as("q_rows", q_rows, torch.int64)
    _kl_named(_check_device, device, on)
    return p_rows, q_rows


def _kl_tokens(p_logits, p_rows) -> int:
    return p_logits.shape[0] if p_rows is None else p_rows.shape[0]


def _opt_raw(t):
    return None if t is None else _raw(t)


@torch.library.custom_op("vppo::kl", mutates_args=())
def _kl(p_logits: Tensor, q_logits: Tensor, p_rows: Optional[Tensor], q_rows: Optional[Tensor],
        temperature: float, device: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(kl, lse_p, lse_q), each [N] float32."""
    p_rows, q_rows = _kl_inputs(p_logits, q_logits, p_rows, q_rows, device)
    n = _kl_tokens(p_logits, p_rows)
    on = p_logits.device
    kl, lse_p, lse_q = (torch.empty(n, dtype=torch.float32, device=on) for _ in range(3))
    args = (float(temperature), _dtype_name(p_logits.dtype), p_logits.shape[1], _raw(p_logits),
            _raw(q_logits), _opt_raw(p_rows), _opt_raw(q_rows), _raw(kl), _raw(lse_p), _raw(lse_q))
    if device == "cuda":
        _vppo.kl_forward_cuda(on.index, torch.cuda.current_stream(on).cuda_stream, *args)
    else:
        _vppo.kl_forward(device, *args)
    return kl, lse_p, lse_q


@_kl.register_fake
def _kl_fake(p_logits, q_logits, p_rows, q_rows, temperature, device):
    n = _kl_tokens(p_logits, p_rows)
    return tuple(p_logits.new_empty((n,), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("vppo::kl_backward", mutates_args=())
def _kl_backward(p_logits: Tensor, q_logits: Tensor, p_rows: Optional[Tensor],
                 q_rows: Optional[Tensor], kl: Tensor, lse_p: Tensor, lse_q: Tensor, grad_kl: Tensor,
                 temperature: float, device: str) -> Tuple[Tensor, Tensor]:
    """(d/dp_logits, d/dq_logits) of sum_t grad_kl[t] kl_t, in the logits' shapes and dtype; rows
    that no token reads are zero. ``kl``, ``lse_p`` and ``lse_q`` must be ``vppo::kl``'s outputs for
    these logits (autograd passes them): they are checked to be finite, and on CUDA tensors the
    gradients are not read back, so other finite values could give a gradient that overflows."""
    p_rows, q_rows = _kl_inputs(p_logits, q_logits, p_rows, q_rows, device)
    on = p_logits.device
    for name, t in (("kl", kl), ("lse_p", lse_p), ("lse_q", lse_q), ("grad_kl", grad_kl)):
        _kl_check(name, t, (torch.float32,), 1, _on(p_logits))
    grad_p = torch.empty(p_logits.shape, dtype=p_logits.dtype, device=on)
    grad_q = torch.empty(q_logits.shape, dtype=q_logits.dtype, device=on)
    args = (float(temperature), _dtype_name(p_logits.dtype), p_logits.shape[1], _raw(p_logits),
            _raw(q_logits), _opt_raw(p_rows), _opt_raw(q_rows), _raw(kl), _raw(lse_p), _raw(lse_q),
            _raw(grad_kl), _raw(grad_p), _raw(grad_q))
    if device == "cuda":
        _vppo.kl_backward_cuda(on.index, torch.cuda.current_stream(on).cuda_stream, *args)
    else:
        _vppo.kl_backward(device, *args)
    return grad_p, grad_q


@_kl_backward.register_fake
def _kl_backward_fake(p_logits, q_logits, p_rows, q_rows, kl, lse_p, lse_q, grad_kl, temperature,
                      device):
    return p_logits.new_empty(p_logits.shape), q_logits.new_empty(q_logits.shape)


def _kl_setup_context(ctx, inputs, output):
    p_logits, q_logits, p_rows, q_rows, temperature, device = inputs
    kl, lse_p, lse_q = output
    ctx.save_for_backward(p_logits, q_logits, p_rows, q_rows, kl, lse_p, lse_q)
    ctx.temperature, ctx.device = temperature, device
    ctx.mark_non_differentiable(lse_p, lse_q)


def _kl_autograd(ctx, grad_kl, *_):
    p_logits, q_logits, p_rows, q_rows, kl, lse_p, lse_q = ctx.saved_tensors
    if grad_kl is None:
        return (None,) * 6
    grad_kl = grad_kl.to(torch.float32).contiguous()
    grad_p, grad_q = _kl_backward(p_logits, q_logits, p_rows, q_rows, kl, lse_p, lse_q, grad_kl,
                                  ctx.temperature, ctx.device)
    return grad_p, grad_q, None, None, None, None


_kl.register_autograd(_kl_autograd, setup_context=_kl_setup_context)


def kl(p_logits: Tensor, q_logits: Tensor, *, temperature: float = 1.0,
       p_rows: Optional[Tensor] = None, q_rows: Optional[Tensor] = None,
       device: Optional[str] = None) -> Tensor:
    """The exact per-token KL(p || q) [N] float32, p = softmax(p_logits / temperature) and q =
    softmax(q_logits / temperature) over the whole vocabulary, differentiable with respect to both
    logits tensors (SPEC section 13; the op ``vppo::kl``).

    ``p_logits`` [N, V] (or [R, V] read through ``p_rows`` [N], strictly increasing) and
    ``q_logits`` [N, V] (or [R', V] through ``q_rows``, strictly increasing; without ``q_rows``, a
    ``q_logits`` of the shape of ``p_logits`` is read through ``p_rows``) in float32, float16 or
    bfloat16, the same for both. The gradients have the shapes and dtype of the logits (rows no
    token reads are zero). A term with p_v = 0 (-inf logit) adds nothing; KL = +inf (q_v = 0 where
    p_v > 0) raises ValueError naming q_logits, the row and the column, as any bad input does.
    CUDA tensors run the kernels on their own GPU (``device="cuda"``, their default), in place (no
    copy of either logits tensor; the outputs and gradients are allocated on that device), ordered
    after torch's current stream there; every tensor must be on ``p_logits``' device (else
    ValueError, never a silent copy). CPU tensors: ``device`` "simt" (default: the kernels on the
    SIMT executor) or "reference" (f64).
    """
    if device is None:
        device = "cuda" if _on(p_logits) is not None else "simt"
    p_rows, q_rows = _kl_inputs(p_logits, q_logits, p_rows, q_rows, device)
    return _kl(p_logits, q_logits, p_rows, q_rows, float(temperature), device)[0]
