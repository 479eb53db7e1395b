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
 * vppo_loss: Trajectory-level Advantage Shaping and the clipped surrogate, in one block of kLossThreads.
 *   Phase 1, per scope (batch, or groups of G): lo/hi of Sbar over responses with L_b > 0 (or the
 *   caller's range), n_b = clamp((Sbar_b - lo) / (hi - lo), 0, 1), alpha_b by the shaping rule; alpha = 1
 *   when hi - lo <= VPPO_TAS_MIN_SPREAD (1e-6) and for empty responses.
 *   Phase 2, per token: r = exp(clamp(logp - old_logp, -C, C)) with C = VPPO_LOG_RATIO_CLAMP (20),
 *   l_t = max(-A' r, -A' clamp(r)), the
 *   dual clip for A' < 0, the aggregation weight, and g_t = dloss/dlogp_t with no gradient through an
 *   active clamp or clip. Loss types (SPEC section 12): in the GSPO modes a phase between the two (one
 *   thread per response, sequential over its tokens) writes s_b = mean of logp - old_logp and the
 *   masked count m_b, and every token of b uses s_b as its log-ratio; gspo's gradient through s_b is
 *   m_b w_b dl/ds / L_b on every token of b (l, w and A' are the same for all tokens of b); cispo is
 *   l_t = -A' logp_t c_t with c_t = clamp(r_t) a constant. The KL penalty (SPEC section 12, with
 *   kl_penalty != VPPO_KL_NONE): kl_t of every response token (masked or not) from k1 = logp - ref_logp,
 *   weighted as pg without the mask; kl_coef * w_t * d kl_t / d logp_t joins g_t (kl_term). Per-token
 *   arithmetic in double (N values only: it costs nothing next to pass 1).
 *   Totals are summed per thread in index order and then in a fixed tree: bit-identical loss every run.
 *
 * Shapes: score, entropy, logp, old_logp, ref_logp, mask, dlogp [N]; cu_seqlens [B + 1]; advantages, sbar,
 * alpha, k [B].
 *
 * Files: launched by src/exec/select_loss.rs; the CPU reference of these ops is src/reference/select.rs
 * (vppo_select), shaping.rs, surrogate.rs and kl.rs (vppo_loss); tested against it by tests/kernels.rs
 * (mask_equals_reference, long_responses_match_reference, every random batch's loss and dlogp,
 * bit_identical_across_runs_and_lane_orders) and tests/variants.rs (the variants of SPEC section 12).
 */
#include "common.cuh"

namespace {

constexpr int kSelectThreads = VPPO_SELECT_THREADS;
constexpr int kLossThreads = VPPO_LOSS_THREADS;
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
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) part += (double)score[i];
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

/* ---------------------------------------------------------------------------------------------- */

struct LossShared {
    double d[kMaxWarps];
    long long i[kMaxWarps];
    float f[kMaxWarps];
};
static_assert(sizeof(LossShared) == VPPO_LOSS_SHARED_BYTES, "LossShared changed: update vppo_params.h");

/* Response of token t: the largest b with cu_seqlens[b] <= t (empty responses are skipped over). */
__device__ __forceinline__ int64_t response_of(const int32_t *cu, int64_t n_resp, int64_t t) {
    int64_t lo = 0, hi = n_resp; /* invariant: cu[lo] <= t < cu[hi] */
    while (hi - lo > 1) {
        const int64_t mid = lo + (hi - lo) / 2;
        if ((int64_t)cu[mid] <= t) lo = mid; else hi = mid;
    }
    return lo;
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

__device__ void loss(const VppoLossParams &p, LossShared &sh) {
    /* ---- Phase 1: alpha ---- */
    if (p.shaping == VPPO_SHAPING_NONE) {
        for (int64_t b = threadIdx.x; b < p.n_responses; b += blockDim.x) p.alpha[b] = 1.0f;
    } else if (p.scope == VPPO_SCOPE_GROUP) {
        alpha_groups(p);
    } else {
        alpha_batch(p, sh);
    }
    const bool seq_ratio = p.loss_type == VPPO_LOSS_GSPO || p.loss_type == VPPO_LOSS_GSPO_TOKEN;
    if (seq_ratio) {
        /* s_b and m_b, one thread per response, in index order */
        for (int64_t b = threadIdx.x; b < p.n_responses; b += blockDim.x) {
            const int64_t start = p.cu_seqlens[b], len = resp_len(p, b);
            double sum = 0.0;
            int32_t selected_b = 0;
            for (int64_t t = start; t < start + len; ++t) {
                sum += (double)p.logp[t] - (double)p.old_logp[t];
                selected_b += p.mask[t] != 0;
            }
            p.seq_log_ratio[b] = len > 0 ? sum / (double)len : 0.0;
            p.seq_selected[b] = selected_b;
        }
    }
    long long nonempty_part = 0;
    for (int64_t b = threadIdx.x; b < p.n_responses; b += blockDim.x) nonempty_part += resp_len(p, b) > 0;
    /* B'; its barriers also publish alpha, s_b and m_b */
    const long long own_nonempty = block_sum(nonempty_part, sh.i);
    /* the caller's B' (data parallel: the count over every rank), else this batch's */
    const double n_nonempty = p.response_normalizer > 0.0 ? p.response_normalizer : (double)own_nonempty;

    /* ---- Phase 2: per token ---- */
    const double z = p.token_normalizer;
    const double lo_clip = 1.0 - p.eps_low, hi_clip = 1.0 + p.eps_high;
    const bool has_kl = p.kl_penalty != VPPO_KL_NONE;
    double pg = 0.0, kl_sum = 0.0, logp_sum = 0.0, ratio_sum = 0.0;
    long long selected = 0, clipped = 0;
    for (int64_t t = threadIdx.x; t < p.n_tokens; t += blockDim.x) {
        const int64_t b = response_of(p.cu_seqlens, p.n_responses, t);
        const double adv = (double)p.alpha[b] * (double)p.advantages[b]; /* A' */
        const double logp = p.logp[t];
        /* the log-ratio: per token, or s_b in the GSPO modes */
        const double x = seq_ratio ? p.seq_log_ratio[b] : logp - (double)p.old_logp[t];
        const bool ratio_clamped = x < -VPPO_LOG_RATIO_CLAMP || x > VPPO_LOG_RATIO_CLAMP;
        const double r = exp(fmin(fmax(x, -VPPO_LOG_RATIO_CLAMP), VPPO_LOG_RATIO_CLAMP));
        const double r_clip = fmin(fmax(r, lo_clip), hi_clip);
        const bool inside = r >= lo_clip && r <= hi_clip;
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

        double weight; /* d pg / d (mask l_t) */
        if (p.aggregation == VPPO_AGG_TOKEN_MEAN) weight = 1.0 / z;
        else if (p.aggregation == VPPO_AGG_SEQ_MEAN_TOKEN_MEAN) weight = 1.0 / ((double)resp_len(p, b) * n_nonempty);
        else weight = 1.0 / n_nonempty;

        const bool m = p.mask[t] != 0;
        if (m) {
            pg += l * weight;
            selected += 1;
            clipped += is_clipped;
        }
        logp_sum += logp;
        ratio_sum += r;
        double g; /* d pg / d logp_t */
        if (p.loss_type == VPPO_LOSS_GSPO) {
            /* sum over the m_b masked tokens u of b of w dl_u / ds_b, times ds_b / dlogp_t = 1 / L_b */
            g = (double)p.seq_selected[b] * dl * weight / (double)resp_len(p, b);
        } else {
            g = m ? dl * weight : 0.0;
        }
        if (has_kl) {
            /* every token, masked or not, with the weight of pg */
            double dkl;
            kl_sum += kl_term(p.kl_penalty, logp, (double)p.ref_logp[t], dkl) * weight;
            g += p.kl_coef * weight * dkl;
        }
        p.dlogp[t] = (float)(g - p.logp_penalty / z);
    }
    pg = block_sum(pg, sh.d);
    kl_sum = block_sum(kl_sum, sh.d);
    logp_sum = block_sum(logp_sum, sh.d);
    ratio_sum = block_sum(ratio_sum, sh.d);
    selected = block_sum(selected, sh.i);
    clipped = block_sum(clipped, sh.i);
    if (threadIdx.x == 0) {
        p.totals->pg = pg;
        p.totals->kl = kl_sum;
        p.totals->logp_sum = logp_sum;
        p.totals->ratio_sum = ratio_sum;
        p.totals->n_selected = selected;
        p.totals->n_clipped = clipped;
        p.totals->loss = pg + p.kl_coef * kl_sum + p.logp_penalty * (-logp_sum) / z;
    }
}

} // namespace

extern "C" __global__ void __launch_bounds__(kSelectThreads, 1) vppo_select(const VppoSelectParams p) {
    VPPO_DYNAMIC_SHARED(SelectShared, sh);
    for (int64_t b = blockIdx.x; b < p.n_responses; b += gridDim.x) {
        select_response(p, b, *sh);
        __syncthreads(); /* the next response reuses the shared state */
    }
}
VPPO_EXPORT_KERNEL(vppo_select, VppoSelectParams)

extern "C" __global__ void __launch_bounds__(kLossThreads, 1) vppo_loss(const VppoLossParams p) {
    VPPO_DYNAMIC_SHARED(LossShared, sh);
    loss(p, *sh);
}
VPPO_EXPORT_KERNEL(vppo_loss, VppoLossParams)
