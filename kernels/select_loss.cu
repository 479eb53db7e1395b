/*
 * select_loss.cu: pass 2 of VPPO, per response (SPEC sections 3 to 6, up to dloss/dlogp).
 *
 * vppo_select: Token-level Gradient Filtering.
 *     k_b     = ceil(top_fraction * L_b), exactly: top_fraction = frac_num / frac_den, 128-bit integers
 *     mask[t] = 1 for the k_b tokens of response b with the highest score; ties to the lower index
 *     Sbar_b  = mean score of response b (0 when L_b = 0)
 *   One block per response (grid-stride over responses). The k_b-th largest score is found by a radix
 *   select on the float bits mapped to ordered 32-bit keys: 8 passes of VPPO_RADIX_BITS = 4 bits; in each pass every warp
 *   counts its 32 keys into 16 bins with 5 ballots and one popc per lane (no atomics), the warp counts
 *   are summed in warp order, and the digit holding the k-th key extends the prefix. Then the tokens
 *   above the k-th key are selected, and of those equal to it the first (by index) that are still
 *   needed, found with a ballot prefix scan in index order. Exactly k_b tokens, deterministic.
 *   mask_by (SPEC section 12): entropy runs the same select on the entropy with
 *   k = ceil(entropy_top_fraction * L_b) in place of the score's; perception-or-entropy runs both and
 *   ORs the second into the first. Sbar and k_b are always the perception ones.
 *
 *   For the loss pass, the same blocks write token_response[t] = b for every token of response b
 *   (the loss reads a token's response from it: no search over cu_seqlens) and, in the GSPO modes,
 *   s_b = mean of logp - old_logp over b and m_b = the masked count of b (per-thread sums in index
 *   order, then the fixed tree of block_sum).
 *
 * Pass 2b: Trajectory-level Advantage Shaping and the clipped surrogate, three kernels.
 *   vppo_loss_prep, one block of kLossThreads, per response:
 *   Phase 1, per scope (batch, or groups of G): lo/hi of Sbar over responses with L_b > 0 (or the
 *   caller's range), n_b = clamp((Sbar_b - lo) / (hi - lo), 0, 1), alpha_b by the shaping rule; alpha = 1
 *   when hi - lo <= VPPO_TAS_MIN_SPREAD (1e-6) and for empty responses. Then B' (the non-empty
 *   responses, or the caller's) and every per-response constant of the per-token loss (A'_b, the
 *   aggregation weight, s_b, gspo's gradient share), written once to `responses`: the per-token kernel
 *   does no division by L_b, B' or Z.
 *   vppo_loss, a grid over tiles of kTileTokens tokens (blocks loop over tiles), per token:
 *   r = exp(clamp(logp - old_logp, -C, C)) with C = VPPO_LOG_RATIO_CLAMP (20),
 *   l_t = max(-A' r, -A' clamp(r)), the
 *   dual clip for A' < 0, the aggregation weight, and g_t = dloss/dlogp_t with no gradient through an
 *   active clamp or clip. Loss types (SPEC section 12): in the GSPO modes every token of b uses s_b
 *   as its log-ratio; gspo's gradient through s_b is m_b w_b dl/ds / L_b on every token of b (l, w and
 *   A' are the same for all tokens of b); cispo is l_t = -A' logp_t c_t with c_t = clamp(r_t) a
 *   constant. The KL penalty (SPEC section 12, with kl_penalty != VPPO_KL_NONE): kl_t of every
 *   response token (masked or not) from k1 = logp - ref_logp, weighted as pg without the mask;
 *   kl_coef * w_t * d kl_t / d logp_t joins g_t (kl_term). Per-token arithmetic in double (N values
 *   only: it costs nothing next to pass 1). A token's response comes from token_response, and its
 *   constants are loaded again only where the response changes (a warp's tokens are consecutive).
 *   Each tile's sums: per thread in index order, then per warp and over the warps in a fixed tree
 *   (block_sums), into partials[tile].
 *   vppo_loss_finish, one block: the tiles' sums, per thread in tile order and then in the same fixed
 *   tree, into totals. A tile's tokens, threads and order do not depend on the grid, so the loss is
 *   bit-identical run to run and for any grid (the SIMT executor's grid cap, any GPU).
 *
 * Shapes: score, entropy, logp, old_logp, ref_logp, mask, dlogp, token_response [N]; cu_seqlens [B + 1];
 * advantages, sbar, alpha, k, seq_log_ratio, seq_selected, responses [B]; partials [ceil(N / kTileTokens)].
 *
 * Files: launched by src/exec/select_loss.rs; the CPU reference of these ops is src/reference/select.rs
 * (vppo_select), shaping.rs, surrogate.rs and kl.rs (vppo_loss); tested against it by tests/kernels.rs
 * (mask_equals_reference, long_responses_match_reference, every random batch's loss and dlogp,
 * bit_identical_across_runs_and_lane_orders, loss_bits_do_not_depend_on_the_grid) and tests/variants.rs
 * (the variants of SPEC section 12).
 */
#include "common.cuh"

namespace {

constexpr int kSelectThreads = VPPO_SELECT_THREADS;
constexpr int kLossThreads = VPPO_LOSS_THREADS;
constexpr int kTileThreads = VPPO_LOSS_TILE_THREADS;
constexpr int kTokensPerThread = VPPO_LOSS_TOKENS_PER_THREAD;
constexpr int64_t kTileTokens = VPPO_LOSS_TILE_TOKENS;
static_assert(kTileTokens == (int64_t)kTileThreads * kTokensPerThread, "a tile is every thread's tokens");
static_assert(kTileThreads % 32 == 0, "a tile's warps are whole");
constexpr int kMaxWarps = 32;
constexpr unsigned int kDigitMask = VPPO_RADIX_DIGITS - 1; /* the digit of a key: (key >> shift) & this */
static_assert(VPPO_RADIX_BITS == 4, "radix_select counts a digit with one ballot per bit: 4 of them");

/* Shared memory of vppo_select: per-warp bin counts, the scan of warp totals, the select state. */
struct SelectShared {
    int counts[kMaxWarps][VPPO_RADIX_DIGITS];
    int warp_total[kMaxWarps];
    double sum_scratch[kMaxWarps];
    unsigned int prefix;
    int remaining;
};
static_assert(sizeof(SelectShared) == VPPO_SELECT_SHARED_BYTES, "SelectShared changed: update vppo_params.h");

__device__ __forceinline__ int64_t topk_count(int64_t len, uint64_t num, uint64_t den) {
    const unsigned __int128 prod = (unsigned __int128)num * (unsigned __int128)len;
    return (int64_t)((prod + den - 1) / den);
}

/*
 * The key of the k-th largest score among keys[0, len) (k in [1, len)) and how many tokens equal to it
 * are to be selected. Every thread returns the same values.
 */
__device__ void radix_select(const float *score, int64_t len, int64_t k, SelectShared &sh,
                             unsigned int &kth_key, int &need_equal) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    unsigned int prefix = 0u, prefix_mask = 0u;
    int remaining = (int)k; /* rank of the wanted key among the keys that match the prefix */
    for (int shift = 32 - VPPO_RADIX_BITS; shift >= 0; shift -= VPPO_RADIX_BITS) {
        int mine = 0; /* lane d < VPPO_RADIX_DIGITS counts digit d */
        for (int64_t base = (int64_t)warp * 32; base < len; base += blockDim.x) {
            const int64_t i = base + lane;
            unsigned int key = 0u;
            bool match = false;
            if (i < len) {
                key = float_key(score[i]);
                match = (key & prefix_mask) == prefix;
            }
            const unsigned int digit = (key >> shift) & kDigitMask;
            const unsigned int in = __ballot_sync(VPPO_FULL_MASK, match);
            const unsigned int b0 = __ballot_sync(VPPO_FULL_MASK, digit & 1u);
            const unsigned int b1 = __ballot_sync(VPPO_FULL_MASK, digit & 2u);
            const unsigned int b2 = __ballot_sync(VPPO_FULL_MASK, digit & 4u);
            const unsigned int b3 = __ballot_sync(VPPO_FULL_MASK, digit & 8u);
            const unsigned int d = (unsigned int)lane & kDigitMask;
            const unsigned int sel = in & ((d & 1u) ? b0 : ~b0) & ((d & 2u) ? b1 : ~b1) &
                                     ((d & 4u) ? b2 : ~b2) & ((d & 8u) ? b3 : ~b3);
            mine += __popc(sel);
        }
        if (lane < VPPO_RADIX_DIGITS) sh.counts[warp][lane] = mine;
        __syncthreads();
        if (threadIdx.x == 0) {
            /* Walk the digits from the largest down until the k-th key falls in one. */
            int above = 0;
            for (int d = VPPO_RADIX_DIGITS - 1; d >= 0; --d) {
                int c = 0;
                for (int w = 0; w < nwarps; ++w) c += sh.counts[w][d];
                if (above + c >= remaining) {
                    sh.prefix = prefix | ((unsigned int)d << shift);
                    sh.remaining = remaining - above;
                    break;
                }
                above += c;
            }
        }
        __syncthreads();
        prefix = sh.prefix;
        remaining = sh.remaining;
        prefix_mask |= kDigitMask << shift;
        /* No third barrier: the next pass writes counts, which thread 0 read before the barrier above,
           and thread 0 rewrites the state only after the next pass's first barrier, which every
           thread reaches after reading this one. */
    }
    kth_key = prefix;
    need_equal = remaining;
}

/*
 * mask[i] = 1 for the k keys of key[0, len) with the highest value, ties to the lower index; with
 * kUnion, mask[i] |= that instead (the perception-or-entropy mask). Each thread writes (and, with
 * kUnion, reads) only its own indices i = threadIdx.x + j blockDim.x, in both branches.
 */
template <bool kUnion>
__device__ __forceinline__ void mark_topk(const float *key_of, int64_t len, int64_t k, SelectShared &sh, uint8_t *mask) {
    if (k >= len) {
        for (int64_t i = threadIdx.x; i < len; i += blockDim.x) mask[i] = 1;
        return;
    }
    unsigned int kth = 0u;
    int need_equal = 0;
    radix_select(key_of, len, k, sh, kth, need_equal);

    /* Keys above the k-th: selected. Keys equal: the first need_equal of them in index order. */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    int taken = 0; /* equal keys already met in earlier chunks */
    for (int64_t base = 0; base < len; base += blockDim.x) {
        const int64_t i = base + threadIdx.x;
        unsigned int key = 0u;
        if (i < len) key = float_key(key_of[i]);
        const bool equal = i < len && key == kth;
        const unsigned int eq = __ballot_sync(VPPO_FULL_MASK, equal);
        if (lane == 0) sh.warp_total[warp] = __popc(eq);
        __syncthreads();
        int before = taken + __popc(eq & ((1u << lane) - 1u));
        for (int w = 0; w < warp; ++w) before += sh.warp_total[w];
        if (i < len) {
            const uint8_t sel = (key > kth || (equal && before < need_equal)) ? 1 : 0;
            mask[i] = kUnion ? (uint8_t)(mask[i] | sel) : sel;
        }
        for (int w = 0; w < nwarps; ++w) taken += sh.warp_total[w];
        /* warp_total is rewritten by the next chunk. */
        __syncthreads();
    }
}

__device__ void select_response(const VppoSelectParams &p, int64_t b, SelectShared &sh) {
    const int64_t start = p.cu_seqlens[b];
    const int64_t len = (int64_t)p.cu_seqlens[b + 1] - start;
    const float *score = p.score + start;
    uint8_t *mask = p.mask + start;
    const int64_t k = topk_count(len, p.frac_num, p.frac_den);

    /* Sbar: per-thread sums in index order, then the fixed tree of block_sum. */
    double part = 0.0;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
        part += (double)score[i];
        if (p.token_response) p.token_response[start + i] = (int32_t)b;
    }
    const double total = block_sum(part, sh.sum_scratch);
    if (threadIdx.x == 0) {
        p.k[b] = (int32_t)k;
        p.sbar[b] = len > 0 ? (float)(total / (double)len) : 0.0f;
    }

    /* SPEC section 12: the entropy mask replaces or joins the perception mask; Sbar and k stay the
       perception ones. Every branch ends with a barrier after its last shared-memory access. */
    if (p.mask_by != VPPO_MASK_BY_ENTROPY) mark_topk<false>(score, len, k, sh, mask);
    if (p.mask_by == VPPO_MASK_BY_PERCEPTION) return;
    const int64_t k_entropy = topk_count(len, p.entropy_frac_num, p.entropy_frac_den);
    const float *entropy = p.entropy + start;
    if (p.mask_by == VPPO_MASK_BY_ENTROPY) {
        mark_topk<false>(entropy, len, k_entropy, sh, mask);
    } else {
        mark_topk<true>(entropy, len, k_entropy, sh, mask);
    }
}

/*
 * The GSPO modes' s_b and m_b of response b, after its mask is written: each thread reads back only
 * the mask bytes it wrote itself (mark_topk's indices threadIdx.x + j blockDim.x), so no barrier is
 * needed before; the sums are per thread in index order, then block_sum's fixed tree.
 */
__device__ void seq_sums(const VppoSelectParams &p, int64_t b, SelectShared &sh) {
    const int64_t start = p.cu_seqlens[b];
    const int64_t len = (int64_t)p.cu_seqlens[b + 1] - start;
    double part = 0.0, count = 0.0; /* the count in double: exact below 2^53 */
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
        part += (double)p.logp[start + i] - (double)p.old_logp[start + i];
        count += p.mask[start + i] != 0 ? 1.0 : 0.0;
    }
    const double sum = block_sum(part, sh.sum_scratch);
    const double selected = block_sum(count, sh.sum_scratch);
    if (threadIdx.x == 0) {
        p.seq_log_ratio[b] = len > 0 ? sum / (double)len : 0.0;
        p.seq_selected[b] = (int32_t)selected;
    }
}

/* ---------------------------------------------------------------------------------------------- */

struct LossShared {
    double d[kMaxWarps];
    long long i[kMaxWarps];
    float f[kMaxWarps];
};
static_assert(sizeof(LossShared) == VPPO_LOSS_SHARED_BYTES, "LossShared changed: update vppo_params.h");

/* The sums of the loss over some tokens (a thread's, a tile's, the batch's). */
struct Sums {
    double pg, kl, logp, ratio;
    long long selected, clipped;
};

/* Shared memory of vppo_loss and vppo_loss_finish: the warps' Sums. */
struct TileShared {
    double d[kMaxWarps][4];
    long long i[kMaxWarps][2];
};
static_assert(sizeof(TileShared) == VPPO_LOSS_TILE_SHARED_BYTES, "TileShared changed: update vppo_params.h");

/*
 * The block's total of every thread's Sums, every thread gets it: per warp by butterfly, then the warp
 * totals by butterfly in warp 0's lanes order, as block_reduce, with the six sums sharing its two
 * barriers (the first publishes the warp totals, the second keeps the next call from overwriting them
 * before every thread has read them).
 */
__device__ __forceinline__ Sums block_sums(Sums s, TileShared &sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const SumOp add;
    s.pg = warp_reduce(s.pg, add);
    s.kl = warp_reduce(s.kl, add);
    s.logp = warp_reduce(s.logp, add);
    s.ratio = warp_reduce(s.ratio, add);
    s.selected = warp_reduce(s.selected, add);
    s.clipped = warp_reduce(s.clipped, add);
    if (lane == 0) {
        sh.d[warp][0] = s.pg;
        sh.d[warp][1] = s.kl;
        sh.d[warp][2] = s.logp;
        sh.d[warp][3] = s.ratio;
        sh.i[warp][0] = s.selected;
        sh.i[warp][1] = s.clipped;
    }
    __syncthreads();
    Sums t = {0.0, 0.0, 0.0, 0.0, 0, 0};
    if (lane < nwarps) {
        t.pg = sh.d[lane][0];
        t.kl = sh.d[lane][1];
        t.logp = sh.d[lane][2];
        t.ratio = sh.d[lane][3];
        t.selected = sh.i[lane][0];
        t.clipped = sh.i[lane][1];
    }
    t.pg = warp_reduce(t.pg, add);
    t.kl = warp_reduce(t.kl, add);
    t.logp = warp_reduce(t.logp, add);
    t.ratio = warp_reduce(t.ratio, add);
    t.selected = warp_reduce(t.selected, add);
    t.clipped = warp_reduce(t.clipped, add);
    __syncthreads();
    return t;
}

/* alpha for the responses first .. first + count - 1 of one scope, given its lo and hi. */
__device__ __forceinline__ double shaped_alpha(const VppoLossParams &p, double sb, double lo, double hi,
                                               double mean_n) {
    const double n = fmin(fmax((sb - lo) / (hi - lo), 0.0), 1.0);
    const double beta_min = p.beta_min;
    const double beta_max = p.shaping == VPPO_SHAPING_MEAN_PRESERVING
                                ? beta_min + (1.0 - beta_min) / (mean_n + VPPO_TAS_MEAN_EPS)
                                : p.beta_max;
    return beta_min + n * (beta_max - beta_min);
}

__device__ __forceinline__ int64_t resp_len(const VppoLossParams &p, int64_t b) {
    return (int64_t)p.cu_seqlens[b + 1] - p.cu_seqlens[b];
}

/* Phase 1 for the batch scope: block-wide lo, hi and mean n. */
__device__ void alpha_batch(const VppoLossParams &p, LossShared &sh) {
    float lo_part = INFINITY, hi_part = -INFINITY;
    for (int64_t b = threadIdx.x; b < p.n_responses; b += blockDim.x) {
        if (resp_len(p, b) > 0) {
            lo_part = fminf(lo_part, p.sbar[b]);
            hi_part = fmaxf(hi_part, p.sbar[b]);
        }
    }
    double lo = block_min(lo_part, sh.f), hi = block_max(hi_part, sh.f);
    if (p.has_range) { lo = p.range_lo; hi = p.range_hi; }
    const bool flat = !(hi - lo > VPPO_TAS_MIN_SPREAD); /* also true when no response has tokens */
    double n_part = 0.0;
    long long c_part = 0;
    if (!flat) {
        for (int64_t b = threadIdx.x; b < p.n_responses; b += blockDim.x) {
            if (resp_len(p, b) > 0) {
                n_part += fmin(fmax(((double)p.sbar[b] - lo) / (hi - lo), 0.0), 1.0);
                c_part += 1;
            }
        }
    }
    const double n_sum = block_sum(n_part, sh.d);
    const long long count = block_sum(c_part, sh.i);
    const double mean_n = count > 0 ? n_sum / (double)count : 0.0;
    for (int64_t b = threadIdx.x; b < p.n_responses; b += blockDim.x) {
        const bool shaped = !flat && resp_len(p, b) > 0;
        p.alpha[b] = shaped ? (float)shaped_alpha(p, p.sbar[b], lo, hi, mean_n) : 1.0f;
    }
}

/* Phase 1 for the group scope: one thread per group, sequential over its G responses. */
__device__ void alpha_groups(const VppoLossParams &p) {
    const int64_t g_size = p.group_size, n_groups = p.n_responses / g_size;
    for (int64_t g = threadIdx.x; g < n_groups; g += blockDim.x) {
        const int64_t first = g * g_size;
        double lo = INFINITY, hi = -INFINITY;
        for (int64_t b = first; b < first + g_size; ++b) {
            if (resp_len(p, b) > 0) { lo = fmin(lo, (double)p.sbar[b]); hi = fmax(hi, (double)p.sbar[b]); }
        }
        if (p.has_range) { lo = p.range_lo; hi = p.range_hi; }
        const bool flat = !(hi - lo > VPPO_TAS_MIN_SPREAD);
        double n_sum = 0.0;
        long long count = 0;
        if (!flat) {
            for (int64_t b = first; b < first + g_size; ++b) {
                if (resp_len(p, b) > 0) {
                    n_sum += fmin(fmax(((double)p.sbar[b] - lo) / (hi - lo), 0.0), 1.0);
                    ++count;
                }
            }
        }
        const double mean_n = count > 0 ? n_sum / (double)count : 0.0;
        for (int64_t b = first; b < first + g_size; ++b) {
            const bool shaped = !flat && resp_len(p, b) > 0;
            p.alpha[b] = shaped ? (float)shaped_alpha(p, p.sbar[b], lo, hi, mean_n) : 1.0f;
        }
    }
}

/*
 * The KL penalty of one token (SPEC section 12; src/reference/kl.rs): kl_t, and d kl_t / d logp_t in
 * dkl, 0 through an active clamp (strictly outside its bounds). k1 = logp - ref_logp; k3 is
 * clamp(exp(x) - x - 1, -K, K), x = clamp(ref_logp - logp, -C, C), computed as expm1(x) - x.
 */
__device__ __forceinline__ double kl_term(int32_t penalty, double logp, double ref_logp, double &dkl) {
    const double k1 = logp - ref_logp;
    if (penalty == VPPO_KL_K1) { dkl = 1.0; return k1; }
    if (penalty == VPPO_KL_ABS) { dkl = k1 > 0.0 ? 1.0 : (k1 < 0.0 ? -1.0 : 0.0); return fabs(k1); }
    if (penalty == VPPO_KL_MSE) { dkl = k1; return 0.5 * k1 * k1; }
    if (penalty == VPPO_KL_K3) {
        const double raw = ref_logp - logp;
        const double x = fmin(fmax(raw, -VPPO_LOG_RATIO_CLAMP), VPPO_LOG_RATIO_CLAMP);
        const double em1 = expm1(x), e = em1 - x;
        const bool clamped = fabs(raw) > VPPO_LOG_RATIO_CLAMP || fabs(e) > VPPO_KL_K3_CLAMP;
        dkl = clamped ? 0.0 : -em1; /* de/dx = exp(x) - 1, dx/dlogp = -1 */
        return fmin(fmax(e, -VPPO_KL_K3_CLAMP), VPPO_KL_K3_CLAMP);
    }
    dkl = 0.0;
    return 0.0;
}

/* vppo_loss_prep: alpha, B' and the per-response constants of the per-token loss. */
__device__ void loss_prep(const VppoLossParams &p, LossShared &sh) {
    /* ---- Phase 1: alpha ---- */
    if (p.shaping == VPPO_SHAPING_NONE) {
        for (int64_t b = threadIdx.x; b < p.n_responses; b += blockDim.x) p.alpha[b] = 1.0f;
    } else if (p.scope == VPPO_SCOPE_GROUP) {
        alpha_groups(p);
    } else {
        alpha_batch(p, sh);
    }
    long long nonempty_part = 0;
    for (int64_t b = threadIdx.x; b < p.n_responses; b += blockDim.x) nonempty_part += resp_len(p, b) > 0;
    /* B'; its barriers also publish alpha (written by another thread in the group scope) */
    const long long own_nonempty = block_sum(nonempty_part, sh.i);
    /* the caller's B' (data parallel: the count over every rank), else this batch's */
    const double n_nonempty = p.response_normalizer > 0.0 ? p.response_normalizer : (double)own_nonempty;

    /* ---- Phase 2: the constants of each response ---- */
    const bool seq_ratio = p.loss_type == VPPO_LOSS_GSPO || p.loss_type == VPPO_LOSS_GSPO_TOKEN;
    for (int64_t b = threadIdx.x; b < p.n_responses; b += blockDim.x) {
        const int64_t len = resp_len(p, b);
        VppoLossResponse r;
        r.adv = (double)p.alpha[b] * (double)p.advantages[b]; /* A' */
        if (len == 0) r.weight = 0.0; /* no token reads it */
        else if (p.aggregation == VPPO_AGG_TOKEN_MEAN) r.weight = 1.0 / p.token_normalizer;
        else if (p.aggregation == VPPO_AGG_SEQ_MEAN_TOKEN_MEAN) r.weight = 1.0 / ((double)len * n_nonempty);
        else r.weight = 1.0 / n_nonempty;
        r.seq_log_ratio = seq_ratio ? p.seq_log_ratio[b] : 0.0;
        /* gspo: the sum over the m_b masked tokens u of b of w dl_u / ds_b (dl the same for all of
           them), times ds_b / dlogp_t = 1 / L_b, is dl times this */
        r.seq_grad = p.loss_type == VPPO_LOSS_GSPO && len > 0
                         ? (double)p.seq_selected[b] * r.weight / (double)len
                         : 0.0;
        p.responses[b] = r;
    }
}

/* The per-response constants of vppo_loss_prep for response b (read-only during vppo_loss). */
__device__ __forceinline__ VppoLossResponse response_constants(const VppoLossParams &p, int32_t b) {
    const VppoLossResponse *q = p.responses + b;
    VppoLossResponse r;
    r.adv = __ldg(&q->adv);
    r.weight = __ldg(&q->weight);
    r.seq_log_ratio = __ldg(&q->seq_log_ratio);
    r.seq_grad = __ldg(&q->seq_grad);
    return r;
}

/* Loop-invariant values of the per-token loss. */
struct TokenConsts {
    double lo_clip, hi_clip; /* 1 - eps_low, 1 + eps_high */
    double logp_grad;        /* d/dlogp_t of logp_penalty * (-sum logp) / Z, negated */
    bool seq_ratio, has_kl;
};

/* Token t of a response with constants r: its terms into s, dloss/dlogp_t into dlogp[t]. */
__device__ __forceinline__ void loss_token(const VppoLossParams &p, const TokenConsts &c, int64_t t,
                                           const VppoLossResponse &rc, Sums &s) {
    const double adv = rc.adv; /* A' */
    const double logp = __ldg(p.logp + t);
    /* the log-ratio: per token, or s_b in the GSPO modes */
    const double x = c.seq_ratio ? rc.seq_log_ratio : logp - (double)__ldg(p.old_logp + t);
    const bool ratio_clamped = x < -VPPO_LOG_RATIO_CLAMP || x > VPPO_LOG_RATIO_CLAMP;
    const double r = exp(fmin(fmax(x, -VPPO_LOG_RATIO_CLAMP), VPPO_LOG_RATIO_CLAMP));
    const double r_clip = fmin(fmax(r, c.lo_clip), c.hi_clip);
    const bool inside = r >= c.lo_clip && r <= c.hi_clip;
    double l, dl; /* l_t and dl_t / d(log-ratio), or dl_t / dlogp_t for cispo */
    bool is_clipped;
    if (p.loss_type == VPPO_LOSS_CISPO) {
        l = -adv * logp * r_clip;
        dl = -adv * r_clip;
        is_clipped = !inside;
    } else {
        const double unclipped = -adv * r, clipped_branch = -adv * r_clip;
        l = fmax(unclipped, clipped_branch);
        /* the unclipped branch's gradient -A' r where it is the one taken */
        dl = (inside || unclipped > clipped_branch) ? -adv * r : 0.0;
        is_clipped = !inside && clipped_branch > unclipped;
        if (p.has_dual_clip && adv < 0.0) {
            const double cap = -adv * p.dual_clip;
            if (l > cap) { l = cap; dl = 0.0; is_clipped = true; }
        }
        if (ratio_clamped) dl = 0.0;
    }

    const double weight = rc.weight; /* d pg / d (mask l_t) */
    const bool m = __ldg(p.mask + t) != 0;
    if (m) {
        s.pg += l * weight;
        s.selected += 1;
        s.clipped += is_clipped;
    }
    s.logp += logp;
    s.ratio += r;
    double g; /* d pg / d logp_t */
    if (p.loss_type == VPPO_LOSS_GSPO) {
        g = dl * rc.seq_grad;
    } else {
        g = m ? dl * weight : 0.0;
    }
    if (c.has_kl) {
        /* every token, masked or not, with the weight of pg */
        double dkl;
        s.kl += kl_term(p.kl_penalty, logp, (double)__ldg(p.ref_logp + t), dkl) * weight;
        g += p.kl_coef * weight * dkl;
    }
    p.dlogp[t] = (float)(g - c.logp_grad);
}

/*
 * vppo_loss: the tiles blockIdx.x, blockIdx.x + gridDim.x, ... Warp w of a tile takes its tokens
 * tile * kTileTokens + w * 32 kTokensPerThread + [0, 32 kTokensPerThread), lane l every 32nd from l, so
 * a thread's consecutive tokens are 32 apart and mostly of one response.
 */
__device__ void loss_tiles(const VppoLossParams &p, TileShared &sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    TokenConsts c;
    c.lo_clip = 1.0 - p.eps_low;
    c.hi_clip = 1.0 + p.eps_high;
    c.logp_grad = p.logp_penalty / p.token_normalizer;
    c.seq_ratio = p.loss_type == VPPO_LOSS_GSPO || p.loss_type == VPPO_LOSS_GSPO_TOKEN;
    c.has_kl = p.kl_penalty != VPPO_KL_NONE;
    const int64_t n_tiles = (p.n_tokens + kTileTokens - 1) / kTileTokens;
    for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        const int64_t first = tile * kTileTokens + (int64_t)warp * (32 * kTokensPerThread) + lane;
        Sums s = {0.0, 0.0, 0.0, 0.0, 0, 0};
        int32_t cur = -1; /* the response whose constants rc holds */
        VppoLossResponse rc = {0.0, 0.0, 0.0, 0.0};
#pragma unroll
        for (int j = 0; j < kTokensPerThread; ++j) {
            const int64_t t = first + 32 * j;
            if (t < p.n_tokens) {
                const int32_t b = __ldg(p.token_response + t);
                if (b != cur) {
                    cur = b;
                    rc = response_constants(p, b);
                }
                loss_token(p, c, t, rc, s);
            }
        }
        const Sums total = block_sums(s, sh);
        if (threadIdx.x == 0) {
            VppoLossTotals &out = p.partials[tile];
            out.loss = 0.0;
            out.pg = total.pg;
            out.kl = total.kl;
            out.logp_sum = total.logp;
            out.ratio_sum = total.ratio;
            out.n_selected = total.selected;
            out.n_clipped = total.clipped;
        }
    }
}

/* vppo_loss_finish: the tiles' sums, thread i taking tiles i, i + blockDim.x, ... in order. */
__device__ void loss_finish(const VppoLossParams &p, TileShared &sh) {
    const int64_t n_tiles = (p.n_tokens + kTileTokens - 1) / kTileTokens;
    Sums s = {0.0, 0.0, 0.0, 0.0, 0, 0};
    for (int64_t tile = threadIdx.x; tile < n_tiles; tile += blockDim.x) {
        const VppoLossTotals &q = p.partials[tile];
        s.pg += q.pg;
        s.kl += q.kl;
        s.logp += q.logp_sum;
        s.ratio += q.ratio_sum;
        s.selected += q.n_selected;
        s.clipped += q.n_clipped;
    }
    const Sums t = block_sums(s, sh);
    if (threadIdx.x == 0) {
        const double z = p.token_normalizer;
        p.totals->pg = t.pg;
        p.totals->kl = t.kl;
        p.totals->logp_sum = t.logp;
        p.totals->ratio_sum = t.ratio;
        p.totals->n_selected = t.selected;
        p.totals->n_clipped = t.clipped;
        p.totals->loss = t.pg + p.kl_coef * t.kl + p.logp_penalty * (-t.logp) / z;
    }
}

} // namespace

extern "C" __global__ void __launch_bounds__(kSelectThreads, 1) vppo_select(const VppoSelectParams p) {
    VPPO_DYNAMIC_SHARED(SelectShared, sh);
    for (int64_t b = blockIdx.x; b < p.n_responses; b += gridDim.x) {
        select_response(p, b, *sh);
        if (p.seq_log_ratio) seq_sums(p, b, *sh);
        __syncthreads(); /* the next response reuses the shared state */
    }
}
VPPO_EXPORT_KERNEL(vppo_select, VppoSelectParams)

extern "C" __global__ void __launch_bounds__(kLossThreads, 1) vppo_loss_prep(const VppoLossParams p) {
    VPPO_DYNAMIC_SHARED(LossShared, sh);
    loss_prep(p, *sh);
}
VPPO_EXPORT_KERNEL(vppo_loss_prep, VppoLossParams)

extern "C" __global__ void __launch_bounds__(kTileThreads, 4) vppo_loss(const VppoLossParams p) {
    VPPO_DYNAMIC_SHARED(TileShared, sh);
    loss_tiles(p, *sh);
}
VPPO_EXPORT_KERNEL(vppo_loss, VppoLossParams)

extern "C" __global__ void __launch_bounds__(kLossThreads, 1) vppo_loss_finish(const VppoLossParams p) {
    VPPO_DYNAMIC_SHARED(TileShared, sh);
    loss_finish(p, *sh);
}
VPPO_EXPORT_KERNEL(vppo_loss_finish, VppoLossParams)
