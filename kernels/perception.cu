/*
 * perception.cu: pass 1 of VPPO, token perception (SPEC section 2).
 *
 * For each token t, with a = logits[t] / tau, b = logits_masked[t] / tau, y = targets[t]:
 *
 *     lse_a = logsumexp(a)                lse_b = logsumexp(b)
 *     logp  = a[y] - lse_a                logp_masked = b[y] - lse_b
 *     kl    = sum_v p_v (a_v - b_v) - lse_a + lse_b,        p = softmax(a)
 *     k3    = exp(d) - d - 1,  d = clamp(logp_masked - old_logp, -20, 20)
 *     entropy = -sum_v p_v (a_v - lse_a)
 *     score = clamp(kl or k3, 0, score_clamp)
 *
 * Shapes: logits, logits_masked [N, V] of dtype T (f32, f16, bf16); targets, old_logp and every output
 * [N]. Offsets are 64-bit: N * V passes 2^31 in real use (16,384 x 151,936 = 2.5e9).
 *
 * Mapping: one block of kThreads threads per row, rows in a grid-stride loop (the grid is capped on the
 * host, so any N runs: there is no grid-dimension limit to hit, unlike a grid.y of one row per block).
 * Each thread streams its share of both rows once, with 16-byte loads where the two rows share an
 * alignment (two loads of each row in flight per thread), and keeps an online-softmax state:
 *
 *     m_a, s_a = sum e^(a_v - m_a), e_a = sum e^(a_v - m_a)(a_v - m_a), f_b = sum e^(a_v - m_a)(b_v - m_b)
 *     m_b, s_b = sum e^(b_v - m_b)
 *
 * so that lse_a = m_a + log s_a, entropy = log s_a - e_a / s_a and kl = (e_a - f_b) / s_a + log(s_b / s_a). The
 * states are merged across the block in a fixed order (each lane of warp 0 folds kThreads / 32 states,
 * then a butterfly), so the outputs are bit-identical run to run.
 *
 * p_v = 0 exactly when a_v = -inf: such a term contributes nothing (never 0 * inf). A term with a_v
 * finite and b_v = -inf makes kl = +inf (a flag, not an inf inside w), and the score clamp then gives
 * score_clamp. Bad values (NaN or +inf, an all -inf row, the target at -inf, a target out of range) set
 * the status word to the minimum of (row << 8 | code) over bad rows: the first bad row, whatever the
 * schedule, with the codes ordered as the CPU reference checks them.
 *
 * Versions: vppo_perception_{f32,f16,bf16}. The CPU reference of this op is src/reference/perception.rs.
 */
#include "common.cuh"

namespace {

constexpr int kThreads = VPPO_PERCEPTION_THREADS;

enum : unsigned int {
    kFlagANonFinite = 1u, /* NaN or +inf in a */
    kFlagBNonFinite = 2u, /* NaN or +inf in b */
    kFlagKlInf = 4u       /* some v with a_v finite and b_v = -inf */
};

/*
 * One thread's (or a merged group's) online-softmax state over part of a row:
 *   m_a, s_a = sum e^(a_v - m_a), e_a = sum e^(a_v - m_a)(a_v - m_a), f_b = sum e^(a_v - m_a)(b_v - m_b),
 *   m_b, s_b = sum e^(b_v - m_b).
 * kl = (e_a - f_b) / s_a + log(s_b / s_a): both sums see the logits centred on their own maximum, so
 * a masked row that is (nearly) the real row shifted by a constant gives nearly equal terms whose
 * rounding errors cancel, and kl keeps its relative precision when it is small; the obvious
 * w / s_a - lse_a + lse_b loses eps * (|lse_a| + |lse_b|) to cancellation instead.
 */
struct RowState {
    float m_a, s_a, e_a, f_b;
    float m_b, s_b;
    unsigned int flags;
};

static_assert(sizeof(RowState) == VPPO_PERCEPTION_STATE_BYTES, "RowState changed: update vppo_params.h");

__device__ __forceinline__ RowState empty_state() {
    RowState st;
    st.m_a = -INFINITY; st.s_a = 0.0f; st.e_a = 0.0f; st.f_b = 0.0f;
    st.m_b = -INFINITY; st.s_b = 0.0f;
    st.flags = 0u;
    return st;
}

/* NaN or +inf: the values SPEC section 7 rejects. -inf is a legal logit. */
__device__ __forceinline__ bool is_bad(float x) { return !(x <= 3.402823466e38f) && !(x == -INFINITY); }

/* Moves the a-side base of st to m (>= st.m_a): e_a, s_a and f_b are rescaled by e^(m_a - m). */
__device__ __forceinline__ void rebase_a(RowState &st, float m) {
    /* With s_a = 0 nothing has been added (and m_a may be -inf, where (m_a - m) * s_a is -inf * 0). */
    if (st.s_a > 0.0f) {
        const float d = st.m_a - m;
        const float f = expf(d);
        st.e_a = f * (st.e_a + d * st.s_a);
        st.s_a *= f;
        st.f_b *= f;
    }
    st.m_a = m;
}

/* Moves the b-side base of st to m (>= st.m_b): s_b is rescaled, f_b shifted by (m_b - m) s_a. Without
   a finite b so far (s_b = 0), f_b holds no term: every finite a met an infinite b (kl = +inf). */
__device__ __forceinline__ void rebase_b(RowState &st, float m) {
    if (st.s_b > 0.0f) {
        const float d = st.m_b - m;
        st.f_b += d * st.s_a;
        st.s_b *= expf(d);
    }
    st.m_b = m;
}

/*
 * Folds K values of each row into the state. The running maxima move once per chunk at most, so the
 * rescaling exp is paid per chunk, not per element. Bad values are flagged and then ignored (the row
 * is an error; ignoring them keeps the arithmetic free of NaN).
 */
template <int K>
__device__ __forceinline__ void fold_chunk(RowState &st, const float *a, const float *b) {
    float ca = -INFINITY, cb = -INFINITY;
#pragma unroll
    for (int i = 0; i < K; ++i) {
        if (is_bad(a[i])) st.flags |= kFlagANonFinite; else ca = fmaxf(ca, a[i]);
        if (is_bad(b[i])) st.flags |= kFlagBNonFinite; else cb = fmaxf(cb, b[i]);
    }
    if (ca > st.m_a) rebase_a(st, ca);
    if (cb > st.m_b) rebase_b(st, cb);
#pragma unroll
    for (int i = 0; i < K; ++i) {
        const float av = a[i], bv = b[i];
        if (av > -INFINITY && !is_bad(av)) {
            const float e = VPPO_EXP(av - st.m_a);
            st.s_a += e;
            st.e_a += e * (av - st.m_a);
            if (bv == -INFINITY) st.flags |= kFlagKlInf;
            else if (!is_bad(bv)) st.f_b += e * (bv - st.m_b);
        }
        if (bv > -INFINITY && !is_bad(bv)) st.s_b += VPPO_EXP(bv - st.m_b);
    }
}

/* Merges state o into st (associative up to rounding; the order of merges is fixed by the caller). */
__device__ __forceinline__ void merge(RowState &st, RowState o) {
    st.flags |= o.flags;
    /* Common bases first (f_b depends on both), then add. */
    if (o.m_b > st.m_b) rebase_b(st, o.m_b); else if (st.m_b > o.m_b) rebase_b(o, st.m_b);
    if (o.m_a > st.m_a) rebase_a(st, o.m_a); else if (st.m_a > o.m_a) rebase_a(o, st.m_a);
    st.s_a += o.s_a;
    st.e_a += o.e_a;
    st.f_b += o.f_b;
    st.s_b += o.s_b;
}

__device__ __forceinline__ RowState shfl_xor_state(const RowState &st, int off) {
    RowState o;
    o.m_a = __shfl_xor_sync(VPPO_FULL_MASK, st.m_a, off);
    o.s_a = __shfl_xor_sync(VPPO_FULL_MASK, st.s_a, off);
    o.e_a = __shfl_xor_sync(VPPO_FULL_MASK, st.e_a, off);
    o.f_b = __shfl_xor_sync(VPPO_FULL_MASK, st.f_b, off);
    o.m_b = __shfl_xor_sync(VPPO_FULL_MASK, st.m_b, off);
    o.s_b = __shfl_xor_sync(VPPO_FULL_MASK, st.s_b, off);
    o.flags = (unsigned int)__shfl_xor_sync(VPPO_FULL_MASK, (int)st.flags, off);
    return o;
}

__device__ __forceinline__ void report(long long *status, int64_t row, int code) {
    atomicMin(status, (long long)((row << 8) | code));
}

/* Streams row t of both tensors into this thread's state. */
template <typename T>
__device__ __forceinline__ RowState stream_row(const T *ra, const T *rb, int64_t vocab, float inv_tau) {
    constexpr int K = Elt<T>::kPerVec;
    RowState st = empty_state();
    RowSplit sp = split_row(ra, vocab);
    /* The 16-byte path needs both rows on the same alignment; otherwise everything is a head. */
    if (((reinterpret_cast<uintptr_t>(ra) ^ reinterpret_cast<uintptr_t>(rb)) & 15u) != 0) {
        sp.head = vocab;
        sp.nvec = 0;
    }
    const int64_t tid = threadIdx.x, nth = blockDim.x;

    for (int64_t v = tid; v < sp.head; v += nth) {
        const float a = Elt<T>::load(ra + v) * inv_tau, b = Elt<T>::load(rb + v) * inv_tau;
        fold_chunk<1>(st, &a, &b);
    }

    const uint4 *va = reinterpret_cast<const uint4 *>(ra + sp.head);
    const uint4 *vb = reinterpret_cast<const uint4 *>(rb + sp.head);
    /* Two vectors of each row per iteration: four independent 16-byte loads in flight per thread. */
    for (int64_t i = tid; i < sp.nvec; i += 2 * nth) {
        const bool second = i + nth < sp.nvec;
        const uint4 xa0 = __ldg(va + i), xb0 = __ldg(vb + i);
        uint4 xa1 = xa0, xb1 = xb0;
        if (second) { xa1 = __ldg(va + i + nth); xb1 = __ldg(vb + i + nth); }
        float a[K], b[K];
        Elt<T>::unpack(xa0, a);
        Elt<T>::unpack(xb0, b);
#pragma unroll
        for (int k = 0; k < K; ++k) { a[k] *= inv_tau; b[k] *= inv_tau; }
        fold_chunk<K>(st, a, b);
        if (second) {
            Elt<T>::unpack(xa1, a);
            Elt<T>::unpack(xb1, b);
#pragma unroll
            for (int k = 0; k < K; ++k) { a[k] *= inv_tau; b[k] *= inv_tau; }
            fold_chunk<K>(st, a, b);
        }
    }

    for (int64_t v = sp.head + sp.nvec * K + tid; v < vocab; v += nth) {
        const float a = Elt<T>::load(ra + v) * inv_tau, b = Elt<T>::load(rb + v) * inv_tau;
        fold_chunk<1>(st, &a, &b);
    }
    return st;
}

/*
 * Merges the block's states; the result is valid in warp 0. `smem` holds blockDim.x states. Order:
 * lane l of warp 0 folds the states of threads l, l + 32, l + 64, ... in that order, then a butterfly.
 */
__device__ __forceinline__ RowState block_merge(const RowState &mine, RowState *smem) {
    smem[threadIdx.x] = mine;
    __syncthreads();
    RowState st = empty_state();
    if (threadIdx.x < 32) {
        for (unsigned int j = threadIdx.x; j < blockDim.x; j += 32) merge(st, smem[j]);
        for (int off = 16; off > 0; off >>= 1) {
            const RowState o = shfl_xor_state(st, off);
            merge(st, o);
        }
    }
    return st;
}

template <typename T>
__device__ void perception(const VppoPerceptionParams &p) {
    VPPO_DYNAMIC_SHARED(RowState, smem);
    const T *logits = static_cast<const T *>(p.logits);
    const T *logits_masked = static_cast<const T *>(p.logits_masked);
    const int64_t vocab = p.vocab;

    for (int64_t t = blockIdx.x; t < p.n_tokens; t += gridDim.x) {
        const int32_t y = p.targets[t];
        if (y < 0 || (int64_t)y >= vocab) {
            if (threadIdx.x == 0) report(p.status, t, VPPO_ERR_TARGET_OUT_OF_RANGE);
            continue; /* uniform across the block: every thread read the same y */
        }
        const T *ra = logits + t * vocab; /* 64-bit: t * vocab passes 2^31 */
        const T *rb = logits_masked + t * vocab;
        const RowState mine = stream_row(ra, rb, vocab, p.inv_temperature);
        const RowState st = block_merge(mine, smem);

        if (threadIdx.x == 0) {
            const float ay = Elt<T>::load(ra + y) * p.inv_temperature;
            const float by = Elt<T>::load(rb + y) * p.inv_temperature;
            int code = VPPO_ERR_NONE;
            if (st.flags & kFlagANonFinite) code = VPPO_ERR_LOGITS_NONFINITE;
            else if (!(st.s_a > 0.0f)) code = VPPO_ERR_LOGITS_ALL_NEG_INF;
            else if (ay == -INFINITY) code = VPPO_ERR_TARGET_NEG_INF;
            else if (st.flags & kFlagBNonFinite) code = VPPO_ERR_MASKED_NONFINITE;
            else if (!(st.s_b > 0.0f)) code = VPPO_ERR_MASKED_ALL_NEG_INF;
            if (code != VPPO_ERR_NONE) {
                report(p.status, t, code);
            } else {
                const float log_sa = logf(st.s_a);
                const float lse_a = st.m_a + log_sa;
                const float lse_b = st.m_b + logf(st.s_b);
                const float logp = ay - lse_a;
                const float logp_masked = by - lse_b; /* -inf when b_y = -inf: allowed */
                /* KL >= 0; the rounding of the last subtraction can make a near-zero value negative. */
                /* log(s_b / s_a) as log1p((s_b - s_a) / s_a): exact subtraction when the sums are close */
                const float kl_sum = (st.e_a - st.f_b) / st.s_a + log1pf((st.s_b - st.s_a) / st.s_a);
                const float kl = (st.flags & kFlagKlInf) ? INFINITY : fmaxf(kl_sum, 0.0f);
                /* k3 in double: exp(d) - d - 1 cancels for small d, and it is one exp per token. */
                const double d = fmin(fmax((double)logp_masked - (double)p.old_logp[t], -20.0), 20.0);
                const float k3 = (float)(expm1(d) - d);
                const float raw = p.perception == VPPO_PERCEPTION_K3 ? k3 : kl;
                /* clamp(raw, 0, c); written so that -0.0 and any negative rounding give +0.0 */
                const float score = raw > 0.0f ? fminf(raw, p.score_clamp) : 0.0f;
                p.lse[t] = lse_a;
                p.lse_masked[t] = lse_b;
                p.logp[t] = logp;
                p.logp_masked[t] = logp_masked;
                p.kl[t] = kl;
                p.k3[t] = k3;
                p.entropy[t] = log_sa - st.e_a / st.s_a;
                p.score[t] = score;
            }
        }
        /* smem is rewritten by the next row's block_merge: every thread must be done reading it. */
        __syncthreads();
    }
}

} // namespace

extern "C" __global__ void __launch_bounds__(kThreads) vppo_perception_f32(const VppoPerceptionParams p) {
    perception<float>(p);
}
VPPO_EXPORT_KERNEL(vppo_perception_f32, VppoPerceptionParams)

extern "C" __global__ void __launch_bounds__(kThreads) vppo_perception_f16(const VppoPerceptionParams p) {
    perception<__half>(p);
}
VPPO_EXPORT_KERNEL(vppo_perception_f16, VppoPerceptionParams)

extern "C" __global__ void __launch_bounds__(kThreads) vppo_perception_bf16(const VppoPerceptionParams p) {
    perception<__nv_bfloat16>(p);
}
VPPO_EXPORT_KERNEL(vppo_perception_bf16, VppoPerceptionParams)
