"""vppo_loss across gloo ranks on this machine (loopback only), SPEC section 11: data parallel (each
rank holds whole responses of one batch, ``process_group``: the sum over ranks of the losses, every
token's dlogp and mask, every response's alpha and every rank's gradient rows equal the
single-process result on the whole batch), vocabulary parallel (``vocab_group``), sequence parallel
(``seq_group``), the combined layouts on a 2 x 2 grid of 4 ranks (data x vocabulary, data x
sequence, sequence x vocabulary), and all three at once on a 2 x 2 x 2 grid of 8. Bad input on one rank raises on every rank (no hang: each run has a deadline)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vppo.torch as vt

from test_torch import call, make_batch

LENGTHS = (5, 0, 7, 4, 3, 6, 1, 2)
CONFIGS = [
    {},
    {"perception": "k3", "shaping": "linear", "tas_scope": "batch"},
    {"aggregation": "seq_mean_token_mean"},
    {"aggregation": "seq_mean_token_sum", "shaping": "none"},
]


def pieces(size):
    """Cut points over the responses for `size` ranks (uneven; with 4 ranks one rank is empty)."""
    b = len(LENGTHS)
    return {2: [0, 3, b], 3: [0, 1, 6, b], 4: [0, 2, 2, 5, b]}[size]


def _close():
    """Every rank waits for the others before tearing the group down: a rank that destroyed it
    while a peer's gloo thread still sent it the last collective's data aborted that peer
    ("terminate called without an active exception", seen once in CI)."""
    dist.barrier()
    dist.destroy_process_group()


def rank_batch(full, b0, b1):
    cu = full["cu_seqlens"]
    t0, t1 = int(cu[b0]), int(cu[b1])
    return dict(logits=full["logits"][t0:t1].clone(), logits_masked=full["logits_masked"][t0:t1].clone(),
                targets=full["targets"][t0:t1].clone(), old_logp=full["old_logp"][t0:t1].clone(),
                advantages=full["advantages"][b0:b1].clone(),
                cu_seqlens=(cu[b0:b1 + 1] - t0).to(torch.int32).contiguous())


def worker(rank, size, init, out_dir, dtype_name, bad_rank):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        dtype = getattr(torch, dtype_name)
        full = make_batch(lengths=LENGTHS, vocab=29, dtype=dtype, seed=size)
        cut = pieces(size)
        mine = rank_batch(full, cut[rank], cut[rank + 1])
        results = []
        # every config with good input, then (with a bad rank) every config with bad input there
        for spoilt, options in [(-1, o) for o in CONFIGS] + \
                [(bad_rank, o) for o in CONFIGS if bad_rank >= 0]:
            b = dict(mine)
            if rank == spoilt:
                b["old_logp"] = b["old_logp"][:-1].clone() if b["old_logp"].numel() else \
                    torch.zeros(1)  # one element too few (or too many): a shape error
            b["logits"] = b["logits"].clone().requires_grad_(True)
            try:
                loss, out = call(b, process_group=dist.group.WORLD, **options)
                loss.backward()
                results.append(("ok", float(loss), out["dlogp"], out["mask"], out["alpha"],
                                b["logits"].grad.float(), float(out["token_normalizer"])))
            except ValueError as e:
                results.append(("error", str(e)))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        _close()


_RUNS = {}


def run(size, dtype, bad_rank=-1, fn=None):
    """Every rank's saved results of `fn` (default `worker`) on `size` gloo ranks; each distinct
    run is spawned once per session and shared by the tests that read it (a spawn costs tens of
    seconds on CI's 2 cores)."""
    key = (size, dtype, bad_rank, fn)
    if key not in _RUNS:
        _RUNS[key] = _spawn(size, dtype, bad_rank, fn)
    return _RUNS[key]


def _spawn(size, dtype, bad_rank, fn):
    with tempfile.TemporaryDirectory() as d:
        init = "file://" + os.path.join(d, "rendezvous")
        ctx = mp.start_processes(fn or worker, args=(size, init, d, str(dtype).replace("torch.", ""),
                                                     bad_rank),
                                 nprocs=size, join=False, start_method="spawn")
        for p in ctx.processes:
            p.join(120)
        alive = [p for p in ctx.processes if p.is_alive()]
        for p in alive:
            p.kill()
        assert not alive, "a rank hangs (no result within 120 s)"
        assert all(p.exitcode == 0 for p in ctx.processes), [p.exitcode for p in ctx.processes]
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(size)]


#: The run of 3 ranks also calls every config with a bad old_logp on rank 1 (the same spawn).
DATA_BAD_RANK = {3: 1}


@pytest.mark.parametrize("size,dtype", [(2, torch.float32), (4, torch.bfloat16), (3, torch.float16)])
def test_the_sum_over_ranks_is_the_single_process_loss(size, dtype):
    got = run(size, dtype, bad_rank=DATA_BAD_RANK.get(size, -1))
    full = make_batch(lengths=LENGTHS, vocab=29, dtype=dtype, seed=size)
    for c, options in enumerate(CONFIGS):
        logits = full["logits"].clone().requires_grad_(True)
        b = dict(full, logits=logits)
        loss, out = call(b, **options)
        loss.backward()
        ranks = [r[c] for r in got]
        assert all(r[0] == "ok" for r in ranks), ranks
        total = sum(r[1] for r in ranks)
        want = loss.item()
        assert abs(total - want) <= 1e-5 * max(1.0, abs(want)), (options, total, want)
        assert torch.equal(torch.cat([r[3] for r in ranks]), out["mask"]), options
        torch.testing.assert_close(torch.cat([r[2] for r in ranks]), out["dlogp"], rtol=1e-5,
                                   atol=1e-7)
        torch.testing.assert_close(torch.cat([r[4] for r in ranks]), out["alpha"], rtol=1e-5,
                                   atol=1e-7)
        tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
        torch.testing.assert_close(torch.cat([r[5] for r in ranks]), logits.grad.float(), rtol=tol,
                                   atol=tol)
        assert all(r[6] == float(out["token_normalizer"]) for r in ranks)


def test_bad_input_on_one_rank_raises_on_every_rank():
    got = run(3, torch.float16, bad_rank=DATA_BAD_RANK[3])
    for rank, results in enumerate(got):
        assert len(results) == 2 * len(CONFIGS)
        for r in results[len(CONFIGS):]:
            assert r[0] == "error", (rank, r)
            if rank == 1:
                assert "old_logp" in r[1], r[1]
            else:
                assert "rank(s) of the group reported an error" in r[1], r[1]


# -------------------------------------------------------------------------------------------------
# Vocabulary parallel: each rank holds columns of both logits tensors
# -------------------------------------------------------------------------------------------------

VOCAB = 29


def vocab_cuts(size):
    return {2: [0, 11, VOCAB], 3: [0, 1, 17, VOCAB]}[size]


def vocab_worker(rank, size, init, out_dir, dtype_name, bad_rank):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        dtype = getattr(torch, dtype_name)
        full = make_batch(lengths=LENGTHS, vocab=VOCAB, dtype=dtype, seed=10 + size)
        c0, c1 = vocab_cuts(size)[rank:rank + 2]
        results = []
        # two configs with good input, then (with a bad rank) a NaN in its shard
        for spoilt, options in [(-1, o) for o in CONFIGS[:2]] + \
                [(bad_rank, o) for o in CONFIGS[:2] if bad_rank >= 0]:
            logits = full["logits"][:, c0:c1].contiguous().requires_grad_(True)
            masked = full["logits_masked"][:, c0:c1].contiguous()
            if rank == spoilt:
                masked[0, 0] = float("nan")
            b = dict(full, logits=logits, logits_masked=masked)
            try:
                loss, out = call(b, vocab_group=dist.group.WORLD, vocab_start=c0, **options)
                loss.backward()
                results.append(("ok", loss.item(), {k: out[k] for k in ("score", "lse", "mask",
                                                                        "dlogp", "alpha")},
                                logits.grad.float()))
            except ValueError as e:
                results.append(("error", str(e)))
        if bad_rank >= 0:
            # a vocab_start that does not fit vocab_size on the bad rank only: refused in
            # vppo.torch before the extension, and reported to the group (no rank waits)
            logits = full["logits"][:, c0:c1].contiguous()
            start = VOCAB if rank == bad_rank else c0
            try:
                call(dict(full, logits=logits, logits_masked=full["logits_masked"][:, c0:c1]
                          .contiguous()), vocab_group=dist.group.WORLD, vocab_start=start,
                     vocab_size=VOCAB)
                results.append(("ok",))
            except ValueError as e:
                results.append(("error", str(e)))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        _close()


#: The run of 3 ranks also calls with a NaN in rank 2's shard, then a vocab_start beyond
#: vocab_size there (the same spawn).
VOCAB_BAD_RANK = {3: 2}


# Groups of 2 vocabulary ranks run in the grid and cube tests below (each spawn costs CI seconds).
@pytest.mark.parametrize("size,dtype", [(3, torch.bfloat16)])
def test_vocabulary_shards_give_the_unsharded_loss(size, dtype):
    got = run(size, dtype, bad_rank=VOCAB_BAD_RANK.get(size, -1), fn=vocab_worker)
    full = make_batch(lengths=LENGTHS, vocab=VOCAB, dtype=dtype, seed=10 + size)
    cuts = vocab_cuts(size)
    for c, options in enumerate(CONFIGS[:2]):
        logits = full["logits"].clone().requires_grad_(True)
        loss, out = call(dict(full, logits=logits), **options)
        loss.backward()
        ranks = [r[c] for r in got]
        assert all(r[0] == "ok" for r in ranks), ranks
        for r in ranks[1:]:  # bit-identical on every rank
            assert r[1] == ranks[0][1]
            assert all(torch.equal(r[2][k], ranks[0][2][k]) for k in r[2])
        want = loss.item()
        assert abs(ranks[0][1] - want) <= 1e-5 * max(1.0, abs(want)), (options, ranks[0][1], want)
        assert torch.equal(ranks[0][2]["mask"], out["mask"])
        for k in ("score", "lse", "dlogp", "alpha"):
            torch.testing.assert_close(ranks[0][2][k], out[k], rtol=2e-5, atol=1e-6)
        tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
        grad = torch.cat([r[3] for r in ranks], dim=1)
        assert [r[3].shape[1] for r in ranks] == [b - a for a, b in zip(cuts, cuts[1:])]
        torch.testing.assert_close(grad, logits.grad.float(), rtol=tol, atol=tol)


def test_a_nan_in_one_vocabulary_shard_raises_on_every_rank():
    got = run(3, torch.bfloat16, bad_rank=VOCAB_BAD_RANK[3], fn=vocab_worker)
    for rank, results in enumerate(got):
        assert len(results) == 5
        for i, r in enumerate(results[2:]):
            assert r[0] == "error", (rank, r)
            mine = "does not fit a vocabulary" if i == 2 else "logits_masked"
            want = mine if rank == 2 else "rank(s) of the group reported an error"
            assert want in r[1], r[1]


# -------------------------------------------------------------------------------------------------
# Sequence parallel: responses cut at token positions, pieces on consecutive ranks
# -------------------------------------------------------------------------------------------------


def seq_piece(full, t0, t1):
    """Tokens [t0, t1) of `full` as a rank's pieces, and whether the first continues a response."""
    cu = [int(c) for c in full["cu_seqlens"]]
    n = cu[-1]
    bounds, adv, continues = [0], [], False
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        here = (s >= t0 and (s < t1 or (t1 == n and s == t1))) if s == e else (s < t1 and e > t0)
        if not here:
            continue
        if s < t0 and not adv:
            continues = True
        bounds.append(min(e, t1) - t0)
        adv.append(float(full["advantages"][b]))
    return dict(logits=full["logits"][t0:t1].clone(), logits_masked=full["logits_masked"][t0:t1].clone(),
                targets=full["targets"][t0:t1].clone(), old_logp=full["old_logp"][t0:t1].clone(),
                advantages=torch.tensor(adv, dtype=torch.float32),
                cu_seqlens=torch.tensor(bounds, dtype=torch.int32)), continues


def seq_cuts(size):
    # LENGTHS = (5, 0, 7, 4, 3, 6, 1, 2): response 2 is tokens [5, 12); 3 ranks: 7 and 9 cut inside it
    return {2: [0, 8, 28], 3: [0, 7, 9, 28]}[size]


def seq_worker(rank, size, init, out_dir, dtype_name, bad_rank):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        dtype = getattr(torch, dtype_name)
        full = make_batch(lengths=LENGTHS, vocab=23, dtype=dtype, seed=20 + size)
        t0, t1 = seq_cuts(size)[rank:rank + 2]
        results = []
        for options in CONFIGS[:3]:
            b, continues = seq_piece(full, t0, t1)
            b["logits"].requires_grad_(True)
            loss, out = call(b, seq_group=dist.group.WORLD, seq_continues=continues, **options)
            loss.backward()
            results.append((loss.item(), out["mask"], out["dlogp"], out["alpha"], b["logits"].grad.float()))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        _close()


# Groups of 2 sequence ranks run in the grid and cube tests below.
@pytest.mark.parametrize("size", [3])
def test_sequence_pieces_give_the_unsplit_mask_and_gradient(size):
    got = run(size, torch.float32, fn=seq_worker)
    full = make_batch(lengths=LENGTHS, vocab=23, dtype=torch.float32, seed=20 + size)
    for c, options in enumerate(CONFIGS[:3]):
        logits = full["logits"].clone().requires_grad_(True)
        loss, out = call(dict(full, logits=logits), **options)
        loss.backward()
        ranks = [r[c] for r in got]
        want = loss.item()
        for r in ranks:  # the group's loss on every rank
            assert abs(r[0] - want) <= 1e-5 * max(1.0, abs(want)), (options, r[0], want)
        assert torch.equal(torch.cat([r[1] for r in ranks]), out["mask"]), options
        torch.testing.assert_close(torch.cat([r[2] for r in ranks]), out["dlogp"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.cat([r[4] for r in ranks]), logits.grad.float(), rtol=1e-5,
                                   atol=1e-7)


# -------------------------------------------------------------------------------------------------
# Layouts combined: 4 ranks as a 2 x 2 grid, outer position rank // 2 (data replica, or sequence
# piece) over inner position rank % 2 (vocabulary shard, or sequence piece); one spawn for all of
# them (`grid`)
# -------------------------------------------------------------------------------------------------


#: The per-token outputs the grid tests compare.
TOKEN_KEYS = ("score", "kl", "entropy", "logp", "lse", "mask", "dlogp")


def grid_groups(rank):
    """(inner group, data group) of `rank`: the inner groups {0, 1}, {2, 3} and the data groups
    {0, 2}, {1, 3}, each created on every rank in the same order (torch.distributed.new_group)."""
    inner = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    data = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return inner[rank // 2], data[rank % 2]


def grid_bad_calls(rank, b, call_it):
    """Two calls with bad input on rank 3 only, each result ("error", message) or ("ok",): a NaN
    in its logits_masked (the crate's row checks), then an old_logp one element short (the
    extension's length checks)."""
    results = []
    for kind in ("nan", "short"):
        bad = dict(b)
        if rank == 3 and kind == "nan":
            bad["logits_masked"] = b["logits_masked"].clone()
            bad["logits_masked"][0, 0] = float("nan")
        if rank == 3 and kind == "short":
            bad["old_logp"] = b["old_logp"][:-1].clone()
        try:
            call_it(bad)
            results.append(("ok",))
        except ValueError as e:
            results.append(("error", str(e)))
    return results


def data_vocab_calls(rank, vocab_g, data_g):
    """Data x vocabulary: replica d holds responses pieces(2)[d:d + 2], its rank i the columns
    vocab_cuts(2)[i:i + 2] of them (bfloat16)."""
    d, i = rank // 2, rank % 2
    full = make_batch(lengths=LENGTHS, vocab=VOCAB, dtype=torch.bfloat16, seed=30)
    b0, b1 = pieces(2)[d:d + 2]
    c0, c1 = vocab_cuts(2)[i:i + 2]
    mine = rank_batch(full, b0, b1)
    mine["logits"] = mine["logits"][:, c0:c1].contiguous()
    mine["logits_masked"] = mine["logits_masked"][:, c0:c1].contiguous()
    results = []
    for options in CONFIGS:
        logits = mine["logits"].clone().requires_grad_(True)
        loss, out = call(dict(mine, logits=logits), process_group=data_g, vocab_group=vocab_g,
                         vocab_start=c0, **options)
        loss.backward()
        results.append((loss.item(), {k: out[k] for k in TOKEN_KEYS + ("alpha",)},
                        logits.grad.float()))
    results.append(grid_bad_calls(rank, mine, lambda b: call(
        b, process_group=data_g, vocab_group=vocab_g, vocab_start=c0)))
    return results


def data_seq_cut(d):
    """Where replica d's tokens are cut between its two sequence ranks: inside response 2 of replica
    0 (tokens [5, 12) of 12) and inside response 4 of replica 1 (its tokens [4, 7) of 16)."""
    return [8, 6][d]


def data_seq_calls(rank, seq_g, data_g):
    """Data x sequence: replica d holds responses pieces(2)[d:d + 2], cut at data_seq_cut(d) between
    its two sequence ranks (float32)."""
    d, i = rank // 2, rank % 2
    full = make_batch(lengths=LENGTHS, vocab=23, dtype=torch.float32, seed=31)
    b0, b1 = pieces(2)[d:d + 2]
    whole = rank_batch(full, b0, b1)
    cut, n = data_seq_cut(d), int(whole["cu_seqlens"][-1])
    t0, t1 = [(0, cut), (cut, n)][i]
    mine, continues = seq_piece(whole, t0, t1)
    results = []
    for options in CONFIGS:
        logits = mine["logits"].clone().requires_grad_(True)
        loss, out = call(dict(mine, logits=logits), process_group=data_g, seq_group=seq_g,
                         seq_continues=continues, **options)
        loss.backward()
        results.append((loss.item(), {k: out[k] for k in TOKEN_KEYS + ("alpha",)},
                        logits.grad.float(), out["token_normalizer"].item()))
    results.append(grid_bad_calls(rank, mine, lambda b: call(
        b, process_group=data_g, seq_group=seq_g, seq_continues=continues)))
    return results


def vocab_seq_calls(rank, vocab_g, seq_g):
    """Vocabulary x sequence: sequence position s = rank // 2 holds tokens seq_cuts(2)[s:s + 2]
    (response 2 is split), its rank v the columns vocab_cuts(2)[v:v + 2] of them (float32)."""
    s, v = rank // 2, rank % 2
    full = make_batch(lengths=LENGTHS, vocab=VOCAB, dtype=torch.float32, seed=32)
    t0, t1 = seq_cuts(2)[s:s + 2]
    c0, c1 = vocab_cuts(2)[v:v + 2]
    mine, continues = seq_piece(full, t0, t1)
    mine["logits"] = mine["logits"][:, c0:c1].contiguous()
    mine["logits_masked"] = mine["logits_masked"][:, c0:c1].contiguous()
    results = []
    for options in CONFIGS:
        logits = mine["logits"].clone().requires_grad_(True)
        loss, out = call(dict(mine, logits=logits), vocab_group=vocab_g, vocab_start=c0,
                         seq_group=seq_g, seq_continues=continues, **options)
        loss.backward()
        results.append((loss.item(), {k: out[k] for k in TOKEN_KEYS}, logits.grad.float()))
    results.append(grid_bad_calls(rank, mine, lambda b: call(
        b, vocab_group=vocab_g, vocab_start=c0, seq_group=seq_g, seq_continues=continues)))
    return results


def grid_worker(rank, size, init, out_dir, dtype_name, bad_rank):
    """Every combined layout in one spawn of 4 ranks (each spawn costs tens of seconds on CI)."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        inner_g, data_g = grid_groups(rank)
        results = {"vocab": data_vocab_calls(rank, inner_g, data_g),
                   "seq": data_seq_calls(rank, inner_g, data_g),
                   # the same grid as sequence position x vocabulary position
                   "vocab_seq": vocab_seq_calls(rank, inner_g, data_g)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        _close()


@pytest.fixture(scope="module")
def grid():
    return run(4, torch.float32, fn=grid_worker)


def check_grid_errors(got):
    for kind, r in enumerate(zip(*[g[-1] for g in got])):
        for rank, x in enumerate(r):
            assert x[0] == "error", (kind, rank, x)
            want = ["logits_masked", "old_logp"][kind] if rank == 3 else \
                "rank(s) of the group reported an error"
            assert want in x[1], (kind, rank, x[1])


def test_data_over_vocabulary_groups_gives_the_single_process_loss(grid):
    got = [g["vocab"] for g in grid]
    full = make_batch(lengths=LENGTHS, vocab=VOCAB, dtype=torch.bfloat16, seed=30)
    cuts = vocab_cuts(2)
    for c, options in enumerate(CONFIGS):
        logits = full["logits"].clone().requires_grad_(True)
        loss, out = call(dict(full, logits=logits), **options)
        loss.backward()
        ranks = [r[c] for r in got]
        for d in (0, 1):  # bit-identical over each vocabulary group
            a, b = ranks[2 * d], ranks[2 * d + 1]
            assert a[0] == b[0], (options, d)
            assert all(torch.equal(a[1][k], b[1][k]) for k in a[1]), (options, d)
        total, want = ranks[0][0] + ranks[2][0], loss.item()
        assert abs(total - want) <= 1e-5 * max(1.0, abs(want)), (options, total, want)
        assert torch.equal(torch.cat([ranks[0][1]["mask"], ranks[2][1]["mask"]]), out["mask"])
        for k in ("score", "lse", "dlogp", "alpha"):
            torch.testing.assert_close(torch.cat([ranks[0][1][k], ranks[2][1][k]]), out[k],
                                       rtol=2e-5, atol=1e-6)
        assert [r[2].shape[1] for r in ranks[:2]] == [b - a for a, b in zip(cuts, cuts[1:])]
        grad = torch.cat([torch.cat([ranks[2 * d][2], ranks[2 * d + 1][2]], dim=1) for d in (0, 1)])
        torch.testing.assert_close(grad, logits.grad.float(), rtol=1e-2, atol=1e-2)
    check_grid_errors(got)


def test_data_over_sequence_groups_gives_the_single_process_loss(grid):
    got = [g["seq"] for g in grid]
    full = make_batch(lengths=LENGTHS, vocab=23, dtype=torch.float32, seed=31)
    for c, options in enumerate(CONFIGS):
        logits = full["logits"].clone().requires_grad_(True)
        loss, out = call(dict(full, logits=logits), **options)
        loss.backward()
        ranks = [r[c] for r in got]
        for d in (0, 1):  # each sequence group returns its batch's loss, the same bits on both
            assert ranks[2 * d][0] == ranks[2 * d + 1][0], (options, d)
            assert ranks[2 * d][3] == ranks[2 * d + 1][3] == float(out["token_normalizer"])
        total, want = ranks[0][0] + ranks[2][0], loss.item()
        assert abs(total - want) <= 1e-5 * max(1.0, abs(want)), (options, total, want)
        # the ranks' tokens in rank order are the batch's
        assert torch.equal(torch.cat([r[1]["mask"] for r in ranks]), out["mask"]), options
        for k in ("score", "lse", "dlogp"):
            torch.testing.assert_close(torch.cat([r[1][k] for r in ranks]), out[k], rtol=1e-5,
                                       atol=1e-7)
        torch.testing.assert_close(torch.cat([r[2] for r in ranks]), logits.grad.float(), rtol=1e-5,
                                   atol=1e-7)
    check_grid_errors(got)


def test_vocabulary_shards_of_sequence_pieces_give_the_single_process_loss(grid):
    got = [g["vocab_seq"] for g in grid]
    full = make_batch(lengths=LENGTHS, vocab=VOCAB, dtype=torch.float32, seed=32)
    cuts, t_cut = vocab_cuts(2), seq_cuts(2)[1]
    for c, options in enumerate(CONFIGS):
        logits = full["logits"].clone().requires_grad_(True)
        loss, out = call(dict(full, logits=logits), **options)
        loss.backward()
        ranks = [r[c] for r in got]
        for s in (0, 1):  # bit-identical over each vocabulary group
            a, b = ranks[2 * s], ranks[2 * s + 1]
            assert all(torch.equal(a[1][k], b[1][k]) for k in TOKEN_KEYS), (options, s)
        assert all(r[0] == ranks[0][0] for r in ranks), options  # the group's loss, on every rank
        want = loss.item()
        assert abs(ranks[0][0] - want) <= 1e-5 * max(1.0, abs(want)), (options, ranks[0][0], want)
        assert torch.equal(torch.cat([ranks[0][1]["mask"], ranks[2][1]["mask"]]), out["mask"])
        for k in ("score", "lse", "dlogp"):
            torch.testing.assert_close(torch.cat([ranks[0][1][k], ranks[2][1][k]]), out[k],
                                       rtol=2e-5, atol=1e-6)
        assert [r[2].shape for r in ranks] == [(n, w) for n in (t_cut, 28 - t_cut)
                                               for w in (cuts[1], VOCAB - cuts[1])]
        grad = torch.cat([torch.cat([ranks[2 * s][2], ranks[2 * s + 1][2]], dim=1) for s in (0, 1)])
        torch.testing.assert_close(grad, logits.grad.float(), rtol=1e-5, atol=1e-6)
    check_grid_errors(got)


def cube_groups(rank):
    """The groups of `rank` = 4 d + 2 s + v on a 2 x 2 x 2 grid of 8 ranks: its vocabulary group (the
    two v of its (d, s)), its sequence group (the two s of its (d, v)) and its data group (the two d
    of its (s, v)), each of the 12 groups created on every rank in the same order."""
    at = lambda d, s, v: 4 * d + 2 * s + v  # noqa: E731
    vocab = {(d, s): dist.new_group([at(d, s, 0), at(d, s, 1)]) for d in (0, 1) for s in (0, 1)}
    seq = {(d, v): dist.new_group([at(d, 0, v), at(d, 1, v)]) for d in (0, 1) for v in (0, 1)}
    data = {(s, v): dist.new_group([at(0, s, v), at(1, s, v)]) for s in (0, 1) for v in (0, 1)}
    d, s, v = rank // 4, (rank // 2) % 2, rank % 2
    return vocab[(d, s)], seq[(d, v)], data[(s, v)]


def cube_worker(rank, size, init, out_dir, dtype_name, bad_rank):
    """Data x sequence x vocabulary on 8 ranks: replica d holds responses pieces(2)[d:d + 2], cut at
    data_seq_cut(d) between its two sequence positions s, each piece's columns vocab_cuts(2)[v:v + 2]
    on its two vocabulary ranks v (float32; the default config, then a NaN on rank 7)."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        vocab_g, seq_g, data_g = cube_groups(rank)
        d, s, v = rank // 4, (rank // 2) % 2, rank % 2
        full = make_batch(lengths=LENGTHS, vocab=VOCAB, dtype=torch.float32, seed=33)
        b0, b1 = pieces(2)[d:d + 2]
        whole = rank_batch(full, b0, b1)
        cut, n = data_seq_cut(d), int(whole["cu_seqlens"][-1])
        t0, t1 = [(0, cut), (cut, n)][s]
        mine, continues = seq_piece(whole, t0, t1)
        c0, c1 = vocab_cuts(2)[v:v + 2]
        mine["logits"] = mine["logits"][:, c0:c1].contiguous()
        mine["logits_masked"] = mine["logits_masked"][:, c0:c1].contiguous()
        groups = dict(process_group=data_g, vocab_group=vocab_g, vocab_start=c0, seq_group=seq_g,
                      seq_continues=continues)
        logits = mine["logits"].clone().requires_grad_(True)
        loss, out = call(dict(mine, logits=logits), **groups)
        loss.backward()
        results = [(loss.item(), {k: out[k] for k in TOKEN_KEYS}, logits.grad.float())]
        bad = dict(mine)
        if rank == 7:
            bad["logits_masked"] = mine["logits_masked"].clone()
            bad["logits_masked"][0, 0] = float("nan")
        try:
            call(bad, **groups)
            results.append(("ok",))
        except ValueError as e:
            results.append(("error", str(e)))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        _close()


def test_data_sequence_and_vocabulary_at_once_give_the_single_process_loss():
    """All three layouts in one call (SPEC section 11), 8 gloo ranks: the sum over the two data
    replicas of their loss (the same on every rank of a replica) is the single-process loss; the
    per-token outputs are bit-identical over each vocabulary group and, concatenated in (replica,
    sequence position) order, those of the whole batch; the gradient tiles the single-process one;
    a NaN on one rank raises on all eight."""
    got = run(8, torch.float32, fn=cube_worker)
    full = make_batch(lengths=LENGTHS, vocab=VOCAB, dtype=torch.float32, seed=33)
    logits = full["logits"].clone().requires_grad_(True)
    loss, out = call(dict(full, logits=logits))
    loss.backward()
    ranks = [r[0] for r in got]
    for r in range(0, 8, 2):  # bit-identical over each vocabulary group
        assert all(torch.equal(ranks[r][1][k], ranks[r + 1][1][k]) for k in TOKEN_KEYS), r
    for d in (0, 1):  # one loss per replica, on each of its four ranks
        assert len({ranks[4 * d + i][0] for i in range(4)}) == 1, d
    total, want = ranks[0][0] + ranks[4][0], loss.item()
    assert abs(total - want) <= 1e-5 * max(1.0, abs(want)), (total, want)
    order = [0, 2, 4, 6]  # (d, s) in token order, v = 0
    assert torch.equal(torch.cat([ranks[r][1]["mask"] for r in order]), out["mask"])
    for k in ("score", "lse", "dlogp"):
        torch.testing.assert_close(torch.cat([ranks[r][1][k] for r in order]), out[k], rtol=2e-5,
                                   atol=1e-6)
    grad = torch.cat([torch.cat([ranks[r][2], ranks[r + 1][2]], dim=1) for r in order])
    torch.testing.assert_close(grad, logits.grad.float(), rtol=1e-5, atol=1e-6)
    for rank, x in enumerate(r[1] for r in got):
        assert x[0] == "error", (rank, x)
        want = "logits_masked" if rank == 7 else "rank(s) of the group reported an error"
        assert want in x[1], (rank, x[1])
