#!/usr/bin/env python3
"""Mutation testing of the kernel sources (kernels/*.cu, kernels/common.cuh).

Each mutant is one exact text substitution in one file. The script copies the repository (tracked and
untracked-but-not-ignored files) to a temporary directory, checks that every mutant's pattern occurs
exactly once in its file (and stops with an error naming the mutant if not: a kernel edit moved the
code under it, so the list needs updating), runs the tests once unmutated (they must pass), then for
each mutant applies it, runs the tests and restores the file. The working tree is never touched.

    scripts/mutate.py                 # every mutant, the deterministic kernel tests
    scripts/mutate.py --list          # the mutants and what they change
    scripts/mutate.py C2 P1           # some mutants only
    scripts/mutate.py --check         # only check that every pattern still matches (seconds)
    scripts/mutate.py --proptests     # also run the random property tests

A mutant is "killed" when some test fails (the failing tests are listed), "survived" when all pass, and
"build error" when it does not compile (that counts as neither and is a bug of this list). Mutants
marked equivalent are expected to survive; docs/TESTING.md says why for each. The exit status is 1
when a non-equivalent mutant survives, or an equivalent one is killed (then it was not equivalent).

The tests run without nvcc (the fake-driver reruns skip themselves), in <repo>/target unless
--target-dir is given: the copy is a different package path, so its artifacts never replace the
working tree's, and the dependencies are reused.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Mutant:
    id: str
    file: str
    find: str
    replace: str
    what: str
    equivalent: str = ""  # why, when the mutant cannot change any result


BARRIER = "__syncthreads();"

MUTANTS = [
    # ---- perception.cu ----
    Mutant("P15", "kernels/perception.cu",
           "            if (p.kl[t] != p.kl[t]) finish_cold_row<T>(p, t, scratch);",
           "            if (false) finish_cold_row<T>(p, t, scratch);",
           "the marked rows (f_b overflowed f32) never finished: kl left NaN"),
    Mutant("P16", "kernels/perception.cu",
           "ea * ((double)b - (double)m_b);",
           "ea * (double)b;",
           "the cold path's f_b not centred on m_b"),
    Mutant("V1", "kernels/perception.cu",
           "            o[6] = (float)(st.flags | (here ? VPPO_PARTIAL_HAS_TARGET : 0u));",
           "            o[6] = (float)(here ? VPPO_PARTIAL_HAS_TARGET : 0u);",
           "a shard's kl = +inf flag dropped from its partial state"),
    Mutant("V2", "kernels/perception.cu",
           "o[2] = st.e_a;",
           "o[2] = 0.0f;",
           "a shard's e_a (entropy and kl) left out of its partial state"),
    Mutant("P1", "kernels/perception.cu",
           "        /* smem is rewritten by the next row's block_merge: every thread must be done reading it. */\n"
           "        __syncthreads();\n",
           "",
           "the end-of-row __syncthreads removed"),
    Mutant("P2", "kernels/perception.cu",
           "    smem[threadIdx.x] = mine;\n    __syncthreads();\n",
           "    smem[threadIdx.x] = mine;\n",
           "block_merge's __syncthreads removed"),
    Mutant("P3", "kernels/perception.cu",
           "st.e_a = f * st.e_a + (f * d) * st.s_a;",
           "st.e_a = f * st.e_a;",
           "rebase_a forgets to shift e_a"),
    Mutant("P4", "kernels/perception.cu",
           "        st.f_b += d * st.s_a;\n",
           "",
           "rebase_b forgets to shift f_b"),
    Mutant("P5", "kernels/perception.cu",
           "    if (o.m_a > st.m_a) rebase_a(st, o.m_a, k); else if (st.m_a > o.m_a) rebase_a(o, st.m_a, k);\n"
           "    if (o.m_b > st.m_b) rebase_b(st, o.m_b, k); else if (st.m_b > o.m_b) rebase_b(o, st.m_b, k);\n",
           "    if (o.m_b > st.m_b) rebase_b(st, o.m_b, k); else if (st.m_b > o.m_b) rebase_b(o, st.m_b, k);\n"
           "    if (o.m_a > st.m_a) rebase_a(st, o.m_a, k); else if (st.m_a > o.m_a) rebase_a(o, st.m_a, k);\n",
           "merge rebases b before a (the b-side shift d_b s_a then uses an unscaled s_a: it overflows "
           "for one logit of 1e38 in a row of zeros, where the exact term vanishes)"),
    Mutant("P6", "kernels/perception.cu",
           "st.flags |= (a_in && !b_in) ? kFlagKlInf : 0u;",
           "st.flags |= (!b_in) ? kFlagKlInf : 0u;",
           "kl = +inf also where p_v = 0 and b_v = -inf"),
    Mutant("P7", "kernels/perception.cu",
           "const float logp = (ay - st.m_a) * inv_tau - log_sa;",
           "const float logp = (ay - st.m_a) * inv_tau - log_sb;",
           "logp uses the masked row's sum"),
    Mutant("P8", "kernels/perception.cu",
           "-VPPO_LOG_RATIO_CLAMP), VPPO_LOG_RATIO_CLAMP);\n                const float k3",
           "-VPPO_LOG_RATIO_CLAMP), 10.0);\n                const float k3",
           "k3's log-ratio clamped at 10, not 20"),
    Mutant("P9", "kernels/perception.cu",
           "raw > 0.0f ? fminf(raw, p.score_clamp) : 0.0f;",
           "raw > 0.0f ? raw : 0.0f;",
           "the score clamp not applied"),
    Mutant("P10", "kernels/perception.cu",
           "            else if (ay == -INFINITY) code = VPPO_ERR_TARGET_NEG_INF;\n",
           "",
           "the target-at--inf check dropped"),
    Mutant("P11", "kernels/perception.cu",
           "atomicMin(status, VPPO_STATUS_WORD(row, code));",
           "atomicMax(status, VPPO_STATUS_WORD(row, code));",
           "the status keeps the maximum report"),
    Mutant("P12", "kernels/perception.cu",
           "& 15u) != 0) {\n        sp.head = vocab;",
           "& 15u) == 99) {\n        sp.head = vocab;",
           "16-byte loads of rows with different alignments"),
    Mutant("P13", "kernels/perception.cu",
           "for (; i + kThreads < n; i += 2 * kThreads) {",
           "for (; i + kThreads <= n; i += 2 * kThreads) {",
           "the second vector load one past the body"),
    Mutant("P14", "kernels/perception.cu",
           "p.entropy[t] = log_sa - e_nat / st.s_a;",
           "p.entropy[t] = log_sa + e_nat / st.s_a;",
           "entropy sign"),
    # ---- common.cuh ----
    Mutant("C1", "kernels/common.cuh",
           "    total = warp_reduce(total, op);\n    __syncthreads();\n",
           "    total = warp_reduce(total, op);\n",
           "block_reduce's second __syncthreads removed"),
    Mutant("C2", "kernels/common.cuh",
           "    if (lane == 0) scratch[warp] = x;\n    __syncthreads();\n",
           "    if (lane == 0) scratch[warp] = x;\n",
           "block_reduce's first __syncthreads removed"),
    Mutant("C3", "kernels/common.cuh",
           "const unsigned int u = x == 0.0f ? 0u : __float_as_uint(x);",
           "const unsigned int u = __float_as_uint(x);",
           "float_key no longer maps -0.0 to +0.0"),
    Mutant("C4", "kernels/common.cuh",
           "T total = lane < nwarps ? scratch[lane] : identity;",
           "T total = ((void)identity, (void)nwarps, scratch[lane]);",
           "block_reduce reads scratch past the last warp"),
    Mutant("C5", "kernels/common.cuh",
           "    if (head > vocab) head = vocab;\n",
           "",
           "split_row lets the head run past a short row"),
    Mutant("C6", "kernels/common.cuh",
           "for (int off = 16; off > 0; off >>= 1) x = op(x, __shfl_xor_sync(VPPO_FULL_MASK, x, off));",
           "for (int off = 16; off > 1; off >>= 1) x = op(x, __shfl_xor_sync(VPPO_FULL_MASK, x, off));",
           "warp_reduce skips the last butterfly step"),
    # ---- select_loss.cu: vppo_select ----
    Mutant("S1", "kernels/select_loss.cu",
           "if (above + c >= remaining) {",
           "if (above + c > remaining) {",
           "the radix digit walk with > instead of >=",
           equivalent="where the k-th key is the smallest of its digit, > passes over that digit: the "
                      "walk ends on a lower key with none of its ties needed, and 'key > kth' selects the "
                      "same k tokens (docs/TESTING.md)"),
    Mutant("S2", "kernels/select_loss.cu",
           "        if (p.seq_log_ratio) seq_sums(p, b, *sh);\n        __syncthreads(); /* the next response reuses the shared state */\n",
           "        if (p.seq_log_ratio) seq_sums(p, b, *sh);\n",
           "vppo_select's end-of-response __syncthreads removed",
           equivalent="every path through select_response (and seq_sums) ends with a __syncthreads after "
                      "its last shared-memory access (block_sum's second barrier, or the scan's)"),
    Mutant("S3", "kernels/select_loss.cu",
           "        /* warp_total is rewritten by the next chunk. */\n        __syncthreads();\n",
           "",
           "the mask scan's end-of-chunk __syncthreads removed"),
    Mutant("S4", "kernels/select_loss.cu",
           "        if (lane < VPPO_RADIX_DIGITS) sh.counts[warp][lane] = mine;\n        __syncthreads();\n",
           "        if (lane < VPPO_RADIX_DIGITS) sh.counts[warp][lane] = mine;\n",
           "the radix pass's first __syncthreads removed"),
    Mutant("S5", "kernels/select_loss.cu",
           "        __syncthreads();\n        prefix = sh.prefix;\n",
           "        prefix = sh.prefix;\n",
           "the radix pass's second __syncthreads removed"),
    Mutant("S6", "kernels/select_loss.cu",
           "(equal && before < need_equal)",
           "(equal && before <= need_equal)",
           "one tied token too many"),
    Mutant("S7", "kernels/select_loss.cu",
           "return (int64_t)((prod + den - 1) / den);",
           "return (int64_t)(prod / den);",
           "k_b rounded down"),
    Mutant("S8", "kernels/select_loss.cu",
           "if (lane == 0) sh.warp_total[warp] = __popc(eq);",
           "if (lane == 0) sh.warp_total[warp] = __popc(eq & 0x7fffffffu);",
           "the scan drops lane 31's tie"),
    # ---- select_loss.cu: vppo_loss ----
    Mutant("L1", "kernels/select_loss.cu",
           "if (p.has_dual_clip && adv < 0.0) {",
           "if (p.has_dual_clip && adv < 0.0 && false) {",
           "the dual clip never applied"),
    Mutant("L2", "kernels/select_loss.cu",
           "        if (ratio_clamped) dl = 0.0;\n",
           "        (void)ratio_clamped;\n",
           "the gradient kept through the log-ratio clamp"),
    Mutant("L3", "kernels/select_loss.cu",
           "r >= c.lo_clip && r <= c.hi_clip",
           "r > c.lo_clip && r <= c.hi_clip",
           "r >= lo_clip -> r > lo_clip"),
    Mutant("L4", "kernels/select_loss.cu",
           "r >= c.lo_clip && r <= c.hi_clip",
           "r >= c.lo_clip && r < c.hi_clip",
           "r <= hi_clip -> r < hi_clip"),
    Mutant("L5", "kernels/select_loss.cu",
           "const bool flat = !(hi - lo > VPPO_TAS_MIN_SPREAD); /* also true when no response has tokens */",
           "const bool flat = !(hi - lo > 1e-3); /* also true when no response has tokens */",
           "TAS flat threshold 1e-6 -> 1e-3, batch scope"),
    Mutant("L6", "kernels/select_loss.cu",
           "        const bool flat = !(hi - lo > VPPO_TAS_MIN_SPREAD);\n        double n_sum",
           "        const bool flat = !(hi - lo > 1e-3);\n        double n_sum",
           "TAS flat threshold 1e-6 -> 1e-3, group scope"),
    Mutant("L7", "kernels/select_loss.cu",
           "(1.0 - beta_min) / (mean_n + VPPO_TAS_MEAN_EPS)",
           "(1.0 - beta_min) / (mean_n + 1e-6)",
           "mean-preserving 1e-8 -> 1e-6"),
    Mutant("L8", "kernels/select_loss.cu",
           "r.weight = 1.0 / ((double)len * n_nonempty);",
           "r.weight = 1.0 / (double)len;",
           "seq-mean-token-mean without the 1 / B'"),
    Mutant("L9", "kernels/select_loss.cu",
           "is_clipped = !inside && clipped_branch > unclipped;",
           "is_clipped = !inside;",
           "a clip counted where the unclipped branch is taken"),
    Mutant("L10", "kernels/select_loss.cu",
           "p.dlogp[t] = (float)(g - c.logp_grad);",
           "p.dlogp[t] = (float)(g + c.logp_grad);",
           "the -logp term's gradient sign"),
    Mutant("L11", "kernels/select_loss.cu",
           "if (p.token_response) p.token_response[start + i] = (int32_t)b;",
           "if (p.token_response) p.token_response[start + i] = (int32_t)(i == 0 && b > 0 ? b - 1 : b);",
           "the token-to-response map off by one at a boundary (a response's first token given to the one before)"),
    Mutant("L12", "kernels/select_loss.cu",
           "        if (resp_len(p, b) > 0) {\n            lo_part",
           "        if (true) {\n            lo_part",
           "empty responses' Sbar enters the batch min/max"),
    Mutant("L13", "kernels/select_loss.cu",
           "const double r_clip = fmin(fmax(r, c.lo_clip), c.hi_clip);",
           "const double r_clip = fmin(r, c.hi_clip);",
           "the lower PPO clip not applied"),
    # ---- select_loss.cu: the grid of vppo_loss (tiles, the response map, the fixed-order sums) ----
    Mutant("G1", "kernels/select_loss.cu",
           "                if (b != cur) {",
           "                if (cur < 0) {",
           "a thread's response constants never reloaded: its first token's response for all its tokens"),
    Mutant("G2", "kernels/select_loss.cu",
           "            const int64_t t = first + 32 * j;",
           "            const int64_t t = first + 32 * ((j + (int)blockIdx.x) % kTokensPerThread);",
           "wrong partial order: a thread sums its tokens in an order that depends on the block handling the tile"),
    Mutant("G3", "kernels/select_loss.cu",
           "    for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {\n"
           "        const int64_t first = tile * kTileTokens + (int64_t)warp * (32 * kTokensPerThread) + lane;\n"
           "        Sums s = {0.0, 0.0, 0.0, 0.0, 0, 0};\n",
           "    Sums s = {0.0, 0.0, 0.0, 0.0, 0, 0};\n"
           "    for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {\n"
           "        const int64_t first = tile * kTileTokens + (int64_t)warp * (32 * kTokensPerThread) + lane;\n",
           "a block's sums carried from one of its tiles into the next (right only when each block has one tile)"),
    Mutant("G4", "kernels/select_loss.cu",
           "    for (int64_t tile = threadIdx.x; tile < n_tiles; tile += blockDim.x) {",
           "    for (int64_t tile = threadIdx.x; tile < n_tiles - 1; tile += blockDim.x) {",
           "the finish kernel leaves out the last tile"),
    Mutant("G5", "kernels/select_loss.cu",
           "        sh.i[warp][1] = s.clipped;\n    }\n    __syncthreads();\n",
           "        sh.i[warp][1] = s.clipped;\n    }\n",
           "block_sums's first __syncthreads removed (the warp totals read before they are written)"),
    Mutant("G6", "kernels/select_loss.cu",
           "    t.clipped = warp_reduce(t.clipped, add);\n    __syncthreads();\n",
           "    t.clipped = warp_reduce(t.clipped, add);\n",
           "block_sums's second __syncthreads removed (the next tile overwrites the warp totals early)"),
    Mutant("G7", "kernels/select_loss.cu",
           "        count += p.mask[start + i] != 0 ? 1.0 : 0.0;",
           "        count += 1.0;",
           "gspo's m_b counts every token of b, not the masked ones"),
    Mutant("G8", "kernels/select_loss.cu",
           "        r.seq_log_ratio = seq_ratio ? p.seq_log_ratio[b] : 0.0;",
           "        r.seq_log_ratio = seq_ratio && b > 0 ? p.seq_log_ratio[b - 1] : 0.0;",
           "the GSPO modes' s_b taken from the response before"),
    # ---- select_loss.cu: vppo_loss's KL penalty (SPEC section 12) ----
    Mutant("K1", "kernels/select_loss.cu",
           "if (penalty == VPPO_KL_K1) { dkl = 1.0; return k1; }",
           "if (penalty == VPPO_KL_K1) { dkl = 0.0; return k1; }",
           "k1's gradient dropped"),
    Mutant("K2", "kernels/select_loss.cu",
           "dkl = k1 > 0.0 ? 1.0 : (k1 < 0.0 ? -1.0 : 0.0);",
           "dkl = k1 >= 0.0 ? 1.0 : -1.0;",
           "abs's gradient 1 at k1 = 0 (autograd's sign is 0 there)"),
    Mutant("K3", "kernels/select_loss.cu",
           "dkl = k1; return 0.5 * k1 * k1;",
           "dkl = k1; return k1 * k1;",
           "mse without the 1/2"),
    Mutant("K4", "kernels/select_loss.cu",
           "const bool clamped = fabs(raw) > VPPO_LOG_RATIO_CLAMP || fabs(e) > VPPO_KL_K3_CLAMP;",
           "const bool clamped = fabs(raw) > VPPO_LOG_RATIO_CLAMP;",
           "k3's gradient kept through the clamp of its value"),
    Mutant("K5", "kernels/select_loss.cu",
           "dkl = clamped ? 0.0 : -em1;",
           "dkl = clamped ? 0.0 : em1;",
           "k3's gradient sign (dx/dlogp = -1 forgotten)"),
    Mutant("K6", "kernels/select_loss.cu",
           "    if (c.has_kl) {\n",
           "    if (c.has_kl && m) {\n",
           "the KL on the masked tokens only (the official code takes every response token)"),
    Mutant("K7", "kernels/select_loss.cu",
           "s.kl += kl_term(p.kl_penalty, logp, (double)__ldg(p.ref_logp + t), dkl) * weight;",
           "s.kl += kl_term(p.kl_penalty, logp, (double)__ldg(p.ref_logp + t), dkl) / p.token_normalizer;",
           "kl_loss weighted 1 / Z in the seq modes too"),
    Mutant("K8", "kernels/select_loss.cu",
           "g += p.kl_coef * weight * dkl;",
           "g += weight * dkl;",
           "kl_coef forgotten in the gradient"),
    Mutant("K9", "kernels/select_loss.cu",
           "p.totals->loss = t.pg + p.kl_coef * t.kl + p.logp_penalty * (-t.logp) / z;",
           "p.totals->loss = t.pg + t.kl + p.logp_penalty * (-t.logp) / z;",
           "kl_coef forgotten in the loss"),
    # ---- backward.cu ----
    Mutant("B1", "kernels/backward.cu",
           "            for (int64_t v = tid; v < sp.head; v += nth) rg[v] = Elt<O>::from_f32(0.0f);\n"
           "            for (int64_t i = tid; i < sp.nvec; i += nth) VecStore<O, K>::store(rg + sp.head + i * K, zeros);\n"
           "            for (int64_t v = body_end + tid; v < vocab; v += nth) rg[v] = Elt<O>::from_f32(0.0f);\n",
           "            for (int64_t i = tid; i < sp.nvec; i += nth) VecStore<O, K>::store(rg + sp.head + i * K, zeros);\n",
           "the g == 0 path writes zeros only in the vector body"),
    Mutant("B2", "kernels/backward.cu",
           "        if (g == 0.0f && (!kFull || d == 0.0f)) {",
           "        if (false) {",
           "no g == 0 fast path (the general path writes -0.0 there)"),
    Mutant("B3", "kernels/backward.cu",
           "return scale * (is_target ? 1.0f - prob : -prob);",
           "return scale * ((void)is_target, -prob);",
           "the target's 1 forgotten (the vector holding the target)"),
    Mutant("B3v", "kernels/backward.cu",
           "a[k] = scale * (k == y_lane ? 1.0f - prob : -prob);",
           "a[k] = scale * ((void)y_lane, -prob);",
           "the target's 1 forgotten (the per-element path)"),
    Mutant("B4", "kernels/backward.cu",
           "if ((reinterpret_cast<uintptr_t>(rg + sp.head) & 15u) != 0) {",
           "if ((reinterpret_cast<uintptr_t>(rg + sp.head) & 15u) == 99) {",
           "16-byte stores to a misaligned output row"),
    # ---- backward.cu, the full KL penalty's versions (tests/variants.rs) ----
    Mutant("F1", "kernels/backward.cu",
           "    return a == -INFINITY ? 0.0f : dscale * (prob * ((a * inv_tau - lse) - (c * inv_tau - lse_ref) - kl));",
           "    return a == -INFINITY ? 0.0f : dscale * (prob * ((a * inv_tau - lse) - (c * inv_tau - lse_ref) + 0.0f * kl));",
           "the full KL's gradient forgets the - kl_t term"),
    Mutant("F2", "kernels/backward.cu",
           "    return a == -INFINITY ? 0.0f : dscale * (prob * ((a * inv_tau - lse) - (c * inv_tau - lse_ref) - kl));",
           "    return dscale * (prob * ((a * inv_tau - lse) - (c * inv_tau - lse_ref) - kl));",
           "the full KL's gradient without the p_v = 0 guard (NaN at -inf logits)"),
    Mutant("F3", "kernels/backward.cu",
           "        if (g == 0.0f && (!kFull || d == 0.0f)) {",
           "        if (g == 0.0f) {",
           "a row with g_t = 0 but a KL weight d_t written as zeros"),
    Mutant("F4", "kernels/backward.cu",
           "            if (((reinterpret_cast<uintptr_t>(ra) ^ reinterpret_cast<uintptr_t>(rc)) & 15u) != 0) {",
           "            if (((reinterpret_cast<uintptr_t>(ra) ^ reinterpret_cast<uintptr_t>(rc)) & 15u) == 99) {",
           "16-byte loads of a ref_logits row on another phase than the logits row"),
    # ---- kl_div.cu (the KL op's backward; tests/kl_div.rs) ----
    Mutant("KD1", "kernels/kl_div.cu",
           "gp = a == -INFINITY ? 0.0f : r.scale * (p * ((lp - lq) - r.kl));",
           "gp = r.scale * (p * ((lp - lq) - r.kl));",
           "grad_p without the p_v = 0 guard (0 * inf = NaN at -inf entries)"),
    Mutant("KD2", "kernels/kl_div.cu",
           "gp = a == -INFINITY ? 0.0f : r.scale * (p * ((lp - lq) - r.kl));",
           "gp = a == -INFINITY ? 0.0f : r.scale * (p * (lp - lq));",
           "grad_p forgets the - kl_t term"),
    Mutant("KD3", "kernels/kl_div.cu",
           "gq = r.scale * (q - p);",
           "gq = r.scale * (p - q);",
           "grad_q with the wrong sign"),
    Mutant("KD4", "kernels/kl_div.cu",
           "    r.scale = u * p.inv_temperature;",
           "    r.scale = u;",
           "the gradients without the 1 / tau of a = logits / tau"),
    Mutant("KD5", "kernels/kl_div.cu",
           "    if (u == 0.0f) {",
           "    if (false) {",
           "no u = 0 fast path (the general path writes -0.0 there)"),
    Mutant("KD6", "kernels/kl_div.cu",
           "            if (token_of_row(p.q_rows, p.n_tokens, r) < 0) {",
           "            if (false) {",
           "rows of q_logits that no token reads are not zeroed"),
    Mutant("KD7", "kernels/kl_div.cu",
           "          (a0 ^ reinterpret_cast<uintptr_t>(gb))) & 15u) != 0) {",
           "          (a0 ^ reinterpret_cast<uintptr_t>(gb))) & 15u) == 99) {",
           "16-byte loads and stores of rows on different 16-byte phases"),
    Mutant("KD8", "kernels/kl_div.cu",
           "                token_rows<T>(p, t, i, p.q_rows ? p.q_rows[t] : t);",
           "                token_rows<T>(p, t, i, t);",
           "q's row taken as the token's index, not through q_rows"),
    Mutant("KD9", "kernels/kl_div.cu",
           "    for (int64_t v = sp.head + sp.nvec * K + tid; v < vocab; v += nth) rg[v] = Elt<T>::from_f32(0.0f);",
           "    for (int64_t v = sp.head + sp.nvec * K + tid; v + 1 < vocab; v += nth) rg[v] = Elt<T>::from_f32(0.0f);",
           "zero_row leaves the last element of a row unwritten"),
]

PROPTESTS = [
    "small_vocab_matches_reference",
    "large_vocab_matches_reference",
    "long_responses_match_reference",
    "mask_equals_reference",
]


def copy_repo(dst):
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True).stdout.split(b"\0")
    for f in files:
        if not f:
            continue
        rel = f.decode()
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue  # deleted in the working tree
        out = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copy2(src, out)


def check_patterns(base, mutants):
    """Every pattern must occur exactly once in its file: else stop, naming the mutant."""
    bad = []
    for m in mutants:
        text = open(os.path.join(base, m.file)).read()
        n = text.count(m.find)
        if n != 1:
            bad.append(f"  {m.id} ({m.what}): pattern found {n} times in {m.file}:\n"
                       + "".join(f"      | {line}\n" for line in m.find.splitlines()))
    if bad:
        sys.exit("scripts/mutate.py: these mutants no longer apply (a kernel edit changed the code they "
                 "mutate; update their patterns in scripts/mutate.py):\n" + "\n".join(bad))


TEST_FILES = ["kernels", "simt_executor", "errors", "variants", "vocab_parallel", "kl_div"]


def test_command(args):
    cmd = ["cargo", "test"]
    for t in args.tests.split(","):
        cmd += ["--test", t]
    if args.release:
        cmd.append("--release")
    cmd += ["--", "--test-threads", str(args.jobs)]
    if not args.proptests:
        for p in PROPTESTS:
            cmd += ["--skip", p]
    return cmd


def run_tests(base, args):
    env = dict(os.environ)
    env["CARGO_TARGET_DIR"] = args.target_dir
    if not args.nvcc:
        # No nvcc: the SIMT build only (the fake-driver reruns skip themselves).
        env["VPPO_NVCC_VENV"] = "/nonexistent"
        for v in ["NVCC", "CUDA_HOME", "CUDA_PATH"]:
            env.pop(v, None)
        env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if not os.path.exists(os.path.join(p, "nvcc")))
        env["VPPO_REQUIRE_NVCC"] = "0"
    t0 = time.time()
    r = subprocess.run(test_command(args), cwd=base, env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    failed = sorted(set(re.findall(r"^test (\S+) \.\.\. FAILED", out, re.M)))
    built = "error: could not compile" not in out and "failed to run custom build command" not in out
    return r.returncode, failed, built, out, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ids", nargs="*", help="mutant ids (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--check", action="store_true", help="only check that every pattern applies")
    ap.add_argument("--proptests", action="store_true", help="also run the random property tests")
    ap.add_argument("--tests", default=",".join(TEST_FILES),
                    help="the test files to run, comma-separated (default: %(default)s)")
    ap.add_argument("--nvcc", action="store_true", help="build with nvcc too (fake-driver reruns)")
    ap.add_argument("--release", action="store_true", help="cargo test --release")
    ap.add_argument("--jobs", type=int, default=2, help="test threads (default 2)")
    ap.add_argument("--target-dir", default=os.path.join(ROOT, "target"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = ap.parse_args()

    mutants = MUTANTS
    if args.ids:
        known = {m.id: m for m in MUTANTS}
        unknown = [i for i in args.ids if i not in known]
        if unknown:
            sys.exit(f"unknown mutant ids: {unknown}")
        mutants = [known[i] for i in args.ids]
    if args.list:
        for m in mutants:
            eq = "  [equivalent]" if m.equivalent else ""
            print(f"{m.id:4} {m.file:26} {m.what}{eq}")
        return 0

    base = tempfile.mkdtemp(prefix="vppo-mutate-")
    try:
        copy_repo(base)
        check_patterns(base, mutants)
        if args.check:
            print(f"all {len(mutants)} mutant patterns apply")
            return 0
        print(f"copy of the repository in {base}; tests: {' '.join(test_command(args))}", flush=True)
        rc, failed, built, out, dt = run_tests(base, args)
        if rc != 0:
            sys.stdout.write(out[-6000:])
            sys.exit(f"the unmutated kernels fail the tests ({failed or 'build'}): fix that first")
        print(f"unmutated: all tests pass ({dt:.0f} s)", flush=True)
        rows = []
        for m in mutants:
            path = os.path.join(base, m.file)
            orig = open(path).read()
            open(path, "w").write(orig.replace(m.find, m.replace, 1))
            try:
                rc, failed, built, out, dt = run_tests(base, args)
            finally:
                open(path, "w").write(orig)
            if not built:
                verdict = "BUILD ERROR"
                tail = "\n".join(l for l in out.splitlines() if "error" in l)[:2000]
                print(tail)
            elif rc != 0:
                verdict = "killed"
            else:
                verdict = "survived"
            bad = (verdict == "survived") != bool(m.equivalent) or verdict == "BUILD ERROR"
            note = ", ".join(failed[:4]) + (f" (+{len(failed) - 4})" if len(failed) > 4 else "")
            if m.equivalent:
                note = ("equivalent: " + note) if note else "equivalent"
            rows.append((m, verdict, note, bad))
            mark = "  <-- UNEXPECTED" if bad else ""
            print(f"{m.id:4} {verdict:11} {dt:5.0f} s  {m.what}: {note}{mark}", flush=True)
        print("\n| mutant | where | change | result | killed by |")
        print("| --- | --- | --- | --- | --- |")
        for m, verdict, note, bad in rows:
            print(f"| {m.id} | {os.path.basename(m.file)} | {m.what} | {verdict} | {note} |")
        n_bad = sum(1 for r in rows if r[3])
        killed = sum(1 for r in rows if r[1] == "killed")
        print(f"\n{killed} killed, {len(rows) - killed} not; {n_bad} unexpected")
        return 1 if n_bad else 0
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
