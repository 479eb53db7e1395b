/*
 * perception.cu: pass 1 of VPPO, token perception (SPEC section 2).
 *
 * For each token t, with a = logits[t] / tau, b = logits_masked[t] / tau, y = targets[t]:
 *
 *     lse_a = logsumexp(a)                lse_b = logsumexp(b)
 *     logp  = a[y] - lse_a                logp_masked = b[y] - lse_b
 *     kl    = sum_v p_v (a_v - b_v) - lse_a + lse_b,        p = softmax(a)
 *     k3    = exp(d) - d - 1,  d = clamp(logp_masked - old_logp, -C, C),  C = VPPO_LOG_RATIO_CLAMP = 20
 *     entropy = -sum_v p_v (a_v - lse_a)
 *     score = clamp(kl or k3, 0, score_clamp)
 *
 * Shapes: logits, logits_masked [N, V] of dtype T (f32, f16, bf16), or [R, V] and [R', V] read through
 * the row indices rows / masked_rows [N] (SPEC section 10); targets, old_logp and every output [N]. Offsets are 64-bit: N * V passes 2^31 in real use (16,384 x 151,936 = 2.5e9).
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
 * the status word to the minimum of VPPO_STATUS_WORD(row, code) over bad rows: the first bad row, whatever the
 * schedule, with the codes ordered as the CPU reference checks them.
 *
 * Versions: vppo_perception_{f32,f16,bf16}.
 *
 * Files: launched by src/exec/perception.rs (which also turns the status word into an error); the CPU
 * reference of this op is src/reference/perception.rs; tested against it by tests/kernels.rs (every
 * random batch, errors_match_reference, many_rows_grid_stride, vocab_70001, mutant_is_caught), for its
 * error reports by tests/errors.rs, for its register budget by scripts/sass_check.py.
 */
#include "common.cuh"

namespace {

constexpr int kThreads = VPPO_PERCEPTION_THREADS;
/* On sm_90, 6 resident blocks of 256 per SM (75 % occupancy): ptxas keeps the kernel within 40
   registers (65,536 / (6 x 256) = 42, allocated in steps of 8); the static SASS check holds it there.
   ptxas for sm_8x spills at 40, so there the bound is 5 blocks (48 registers). */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kMinBlocks = 6;
#else
constexpr int kMinBlocks = 5;
#endif

enum : unsigned int {
    kFlagKlInf = 1u /* some v with a_v > -inf and b_v = -inf: kl = +inf */
};

/*
 * One thread's (or a merged group's) online-softmax state over part of a row, in raw logit units (the
 * 1 / tau is applied once per row, in the epilogue, not per element):
 *   m_a = max a_v,  s_a = sum e_v,  e_a = sum e_v (a_v - m_a),  f_b = sum e_v (b_v - m_b),
 *   m_b = max b_v,  s_b = sum 2^((b_v - m_b) k),     with e_v = 2^((a_v - m_a) k), k = log2(e) / tau.
 * Then lse_a = m_a / tau + log s_a, entropy = log s_a - e_a / (tau s_a) and
 * kl = (e_a - f_b) / (tau s_a) + log(s_b / s_a). Both sums see the logits centred on their own maximum,
 * so a masked row that is (nearly) the real row shifted by a constant gives nearly equal terms whose
 * rounding errors cancel: kl keeps its relative precision when it is small, where the textbook
 * w / s_a - lse_a + lse_b loses eps * (|lse_a| + |lse_b|) to cancellation (tests/kernels.rs,
 * small_kl_keeps_relative_precision).
 *
 * No per-element validity tests: a NaN or +inf makes s_a (or s_b) NaN, an all -inf row leaves it 0, and
 * the epilogue classifies the row from the merged state. That and exp2f keep the loop at about 20
 * instructions per (a, b) pair, below what 3 TB/s of bf16 pairs leaves per SM and clock.
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

/* Moves the a-side base of st to m (> st.m_a): e_a, s_a and f_b are rescaled by 2^((m_a - m) k).
   e_a becomes f e_a + (f d) s_a, the scale applied before the product with s_a: when the base jumps
   far (one logit of 1e38 in a row of zeros) d s_a alone overflows f32 while f is 0 and the exact
   result is 0, and f (e_a + d s_a) would give 0 * inf = NaN. f d is bounded by tau / e. */
__device__ __forceinline__ void rebase_a(RowState &st, float m, float k) {
    /* With s_a = 0 nothing has been added (and m_a may be -inf, where (m_a - m) * s_a is -inf * 0). */
    if (st.s_a > 0.0f) {
        const float d = st.m_a - m;
        const float f = exp2f(d * k);
        st.e_a = f * st.e_a + (f * d) * st.s_a;
        st.s_a *= f;
        st.f_b *= f;
    }
    st.m_a = m;
}

/* Moves the b-side base of st to m (> st.m_b): s_b is rescaled, f_b shifted by (m_b - m) s_a. Without
   a finite b so far (s_b = 0), f_b holds no term: every finite a met an infinite b (kl = +inf). */
__device__ __forceinline__ void rebase_b(RowState &st, float m, float k) {
    if (st.s_b > 0.0f) {
        const float d = st.m_b - m;
        st.f_b += d * st.s_a;
        st.s_b *= exp2f(d * k);
    }
    st.m_b = m;
}

/* Adds K values of each row to the state, the exact per-element way: -inf terms have p = 0 and add
   exactly nothing (never 0 * inf), a finite a over an infinite b sets the kl = +inf flag; NaN and +inf
   fall through and poison s_a or s_b, which the epilogue reports. The bases already cover the chunk. */
template <int K>
__device__ __forceinline__ void fold_chunk_slow(RowState &st, const float *a, const float *b, float k) {
#pragma unroll
    for (int i = 0; i < K; ++i) {
        const bool a_in = a[i] != -INFINITY, b_in = b[i] != -INFINITY;
        const float da = a_in ? a[i] - st.m_a : 0.0f;
        const float db = b_in ? b[i] - st.m_b : 0.0f;
        const float ea = a_in ? VPPO_EXP2(da * k) : 0.0f;
        const float eb = b_in ? VPPO_EXP2(db * k) : 0.0f;
        st.s_a += ea;
        st.e_a += ea * da;
        st.f_b += ea * db;
        st.s_b += eb;
        st.flags |= (a_in && !b_in) ? kFlagKlInf : 0u;
    }
}

/*
 * Folds K values of each row into the state; the maxima move once per chunk at most. A chunk without
 * -inf (the common case: one min over it) takes the same arithmetic without the per-element tests, so
 * the bits are those of fold_chunk_slow: with every a_v and b_v above -inf, its tests all pass and its
 * selects pick the computed terms (fminf ignores a NaN, which both paths let through alike).
 */
template <int K>
__device__ __forceinline__ void fold_chunk(RowState &st, const float *a, const float *b, float k) {
    float ca = a[0], cb = b[0], lo = fminf(a[0], b[0]);
#pragma unroll
    for (int i = 1; i < K; ++i) {
        ca = fmaxf(ca, a[i]);
        cb = fmaxf(cb, b[i]);
        lo = fminf(lo, fminf(a[i], b[i]));
    }
    if (ca > st.m_a) rebase_a(st, ca, k);
    if (cb > st.m_b) rebase_b(st, cb, k);
    if (lo == -INFINITY) {
        fold_chunk_slow<K>(st, a, b, k);
        return;
    }
#pragma unroll
    for (int i = 0; i < K; ++i) {
        const float da = a[i] - st.m_a, db = b[i] - st.m_b;
        const float ea = VPPO_EXP2(da * k), eb = VPPO_EXP2(db * k);
        st.s_a += ea;
        st.e_a += ea * da;
        st.f_b += ea * db;
        st.s_b += eb;
    }
}

/* Merges state o into st (associative up to rounding; the order of merges is fixed by the caller). */
__device__ __forceinline__ void merge(RowState &st, RowState o, float k) {
    st.flags |= o.flags;
    /* Common bases first (f_b depends on both), then add. The a-side first: it scales s_a (to 0 when
       the other state's maximum is far above), so the b-side shift (m_b - m) s_a is formed from the
       scaled s_a and cannot overflow where the exact term vanishes (the two rebases commute exactly). */
    if (o.m_a > st.m_a) rebase_a(st, o.m_a, k); else if (st.m_a > o.m_a) rebase_a(o, st.m_a, k);
    if (o.m_b > st.m_b) rebase_b(st, o.m_b, k); else if (st.m_b > o.m_b) rebase_b(o, st.m_b, k);
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
    o.flags = __shfl_xor_sync(VPPO_FULL_MASK, st.flags, off);
    return o;
}

__device__ __forceinline__ void report(long long *status, int64_t row, int code) {
    atomicMin(status, VPPO_STATUS_WORD(row, code));
}

/* Streams row t of both tensors into this thread's state. */
template <typename T>
__device__ __forceinline__ RowState stream_row(const T *ra, const T *rb, int64_t vocab, float k) {
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
        const float a = Elt<T>::load(ra + v), b = Elt<T>::load(rb + v);
        fold_chunk<1>(st, &a, &b, k);
    }

    /* Two vectors of each row per iteration, all four 16-byte loads issued before any is used: four
       loads in flight per thread. The stride is the compile-time kThreads (every launch of this kernel
       has VPPO_PERCEPTION_THREADS threads per block, as its shared memory is sized for), so the second vector is an immediate offset of the first's address.
       A thread's last vector, when it has an odd count, is folded after the loop; each thread folds the
       vectors tid, tid + nth, tid + 2 nth, ... in that order. The index is 32-bit (fewer registers): a
       row of more than 2^30 vectors is walked in slices of 2^30, a multiple of the stride. The loads are
       __ldcs (evict-first): the logits are read once, and the 10 GB stream would otherwise push the
       small per-token outputs that pass 2 reads next out of L2. */
    constexpr int64_t kSlice = int64_t(1) << 30;
    for (int64_t base = 0; base < sp.nvec; base += kSlice) {
        const uint4 *va = reinterpret_cast<const uint4 *>(ra + sp.head) + base;
        const uint4 *vb = reinterpret_cast<const uint4 *>(rb + sp.head) + base;
        const int n = (int)(sp.nvec - base < kSlice ? sp.nvec - base : kSlice);
        int i = (int)tid;
        float a[K], b[K];
        for (; i + kThreads < n; i += 2 * kThreads) {
            const uint4 xa0 = __ldcs(va + i), xb0 = __ldcs(vb + i);
            const uint4 xa1 = __ldcs(va + i + kThreads), xb1 = __ldcs(vb + i + kThreads);
            Elt<T>::unpack(xa0, a);
            Elt<T>::unpack(xb0, b);
            fold_chunk<K>(st, a, b, k);
            Elt<T>::unpack(xa1, a);
            Elt<T>::unpack(xb1, b);
            fold_chunk<K>(st, a, b, k);
        }
        if (i < n) {
            Elt<T>::unpack(__ldcs(va + i), a);
            Elt<T>::unpack(__ldcs(vb + i), b);
            fold_chunk<K>(st, a, b, k);
        }
    }

    for (int64_t v = sp.head + sp.nvec * K + tid; v < vocab; v += nth) {
        const float a = Elt<T>::load(ra + v), b = Elt<T>::load(rb + v);
        fold_chunk<1>(st, &a, &b, k);
    }
    return st;
}

/*
 * Merges the block's states; the result is valid in warp 0. `smem` holds blockDim.x states. Order:
 * lane l of warp 0 folds the states of threads l, l + 32, l + 64, ... in that order, then a butterfly.
 */
__device__ __forceinline__ RowState block_merge(const RowState &mine, RowState *smem, float k) {
    smem[threadIdx.x] = mine;
    __syncthreads();
    RowState st = empty_state();
    if (threadIdx.x < 32) {
        for (unsigned int j = threadIdx.x; j < blockDim.x; j += 32) merge(st, smem[j], k);
        for (int off = 16; off > 0; off >>= 1) {
            const RowState o = shfl_xor_state(st, off);
            merge(st, o, k);
        }
    }
    return st;
}

/*
 * The cold path, for a row whose f_b overflowed f32 while every other sum is fine: one logit of 1e38 in
 * logits_masked only, in a row of zeros, makes every term e_v (b_v - m_b) about -1e38, and V of them pass
 * 3.4e38, while kl itself (about 1e38 / tau) is finite. The stream marks such a row (kl and score NaN,
 * the other outputs written) and the block comes back to it after its last row, so the hot loop and its
 * registers are untouched. Here the whole block reads both rows twice more: the maxima, then the four
 * sums in double (each e_v formed as the stream forms it, in f32; every product and sum in double),
 * reduced in a fixed order, so the result is bit-identical run to run. The per-element rule is
 * fold_chunk_slow's: a term with a_v or b_v at -inf adds nothing (a finite a_v over b_v = -inf sets the
 * kl = +inf flag, and a flagged row is never marked). kl beyond f32 is still an overflow.
 */
template <typename T>
__device__ void finish_cold_row(const VppoPerceptionParams &p, int64_t t, double *scratch) {
    const T *ra = static_cast<const T *>(p.logits) + (p.rows ? p.rows[t] : t) * p.vocab;
    const T *rb = static_cast<const T *>(p.logits_masked) + (p.masked_rows ? p.masked_rows[t] : t) * p.vocab;
    const float k = p.inv_temperature * 1.4426950408889634f;
    float m_a = -INFINITY, m_b = -INFINITY;
    for (int64_t v = threadIdx.x; v < p.vocab; v += blockDim.x) {
        m_a = fmaxf(m_a, Elt<T>::load(ra + v));
        m_b = fmaxf(m_b, Elt<T>::load(rb + v));
    }
    m_a = block_max(m_a, reinterpret_cast<float *>(scratch));
    m_b = block_max(m_b, reinterpret_cast<float *>(scratch));
    double s_a = 0.0, e_a = 0.0, f_b = 0.0, s_b = 0.0;
    for (int64_t v = threadIdx.x; v < p.vocab; v += blockDim.x) {
        const float a = Elt<T>::load(ra + v), b = Elt<T>::load(rb + v);
        const double ea = a == -INFINITY ? 0.0 : (double)VPPO_EXP2((a - m_a) * k);
        s_a += ea;
        e_a += a == -INFINITY ? 0.0 : ea * ((double)a - (double)m_a);
        f_b += a == -INFINITY || b == -INFINITY ? 0.0 : ea * ((double)b - (double)m_b);
        s_b += b == -INFINITY ? 0.0 : (double)VPPO_EXP2((b - m_b) * k);
    }
    s_a = block_sum(s_a, scratch);
    e_a = block_sum(e_a, scratch);
    f_b = block_sum(f_b, scratch);
    s_b = block_sum(s_b, scratch);
    if (threadIdx.x == 0) {
        const double kl = fmax((e_a - f_b) * (double)p.inv_temperature / s_a + log1p((s_b - s_a) / s_a), 0.0);
        if (!(kl <= 3.4028234663852886e38)) { /* FLT_MAX */
            report(p.status, t, VPPO_ERR_LOGITS_OVERFLOW); /* kl itself is beyond f32 */
        } else {
            p.kl[t] = (float)kl;
            if (p.perception != VPPO_PERCEPTION_K3) p.score[t] = fminf((float)kl, p.score_clamp);
        }
    }
}

template <typename T>
__device__ void perception(const VppoPerceptionParams &p) {
    VPPO_DYNAMIC_SHARED(RowState, smem);
    const T *logits = static_cast<const T *>(p.logits);
    const T *logits_masked = static_cast<const T *>(p.logits_masked);
    const int64_t vocab = p.vocab;

    for (int64_t t = blockIdx.x; t < p.n_tokens; t += gridDim.x) {
        const int32_t y = p.targets[t];
        const bool target_here = y >= 0 && (int64_t)y < vocab;
        if (!target_here && !p.partial) {
            if (threadIdx.x == 0) report(p.status, t, VPPO_ERR_TARGET_OUT_OF_RANGE);
            continue; /* uniform across the block: every thread read the same y */
        }
        /* The rows token t reads (SPEC 10; validated on the host). 64-bit: row * vocab passes 2^31. */
        const int64_t row_a = p.rows ? p.rows[t] : t, row_b = p.masked_rows ? p.masked_rows[t] : t;
        const T *ra = logits + row_a * vocab;
        const T *rb = logits_masked + row_b * vocab;
        const float inv_tau = p.inv_temperature;
        const float k = inv_tau * 1.4426950408889634f; /* log2(e) / tau */
        /* The target's logits are read before the stream (by every thread: one broadcast load per
           warp), so that the row pointers and y are dead during it: fewer registers, 6 blocks per SM. */
        /* In partial mode the target may lie in another shard: a column of this one is read instead
           (the epilogue flags the state as having no target, and the host ignores these two). */
        const int64_t yc = target_here ? (int64_t)y : 0;
        const float ay = Elt<T>::load(ra + yc), by = Elt<T>::load(rb + yc);
        const RowState mine = stream_row(ra, rb, vocab, k);
        const RowState st = block_merge(mine, smem, k);

        if (threadIdx.x == 0 && p.partial) {
            /* A shard's state (vocabulary parallel): the host merges it with the other shards'. */
            float *o = p.partial + t * VPPO_PARTIAL_STATE_FLOATS;
            o[0] = st.m_a; o[1] = st.s_a; o[2] = st.e_a; o[3] = st.f_b;
            o[4] = st.m_b; o[5] = st.s_b;
            /* the target again from memory: kept live across the stream, the flag costs registers */
            const int32_t yy = p.targets[t];
            const bool here = yy >= 0 && (int64_t)yy < vocab;
            o[6] = (float)(st.flags | (here ? VPPO_PARTIAL_HAS_TARGET : 0u));
            o[7] = ay; o[8] = by;
        } else if (threadIdx.x == 0) {
            /* s_a is NaN after a NaN or +inf, 0 for an all -inf row (and lies in [1, V] otherwise). */
            int code = VPPO_ERR_NONE;
            if (!(st.s_a == st.s_a)) code = VPPO_ERR_LOGITS_NONFINITE;
            else if (!(st.s_a > 0.0f)) code = VPPO_ERR_LOGITS_ALL_NEG_INF;
            else if (ay == -INFINITY) code = VPPO_ERR_TARGET_NEG_INF;
            else if (!(st.s_b == st.s_b)) code = VPPO_ERR_MASKED_NONFINITE;
            else if (!(st.s_b > 0.0f)) code = VPPO_ERR_MASKED_ALL_NEG_INF;
            else if (!isfinite(st.e_a)) code = VPPO_ERR_LOGITS_OVERFLOW;
            /* f_b alone overflowed (and kl is not +inf by the flag): the cold path below finishes kl */
            const bool cold = !(st.flags & kFlagKlInf) && !isfinite(st.f_b);
            if (code != VPPO_ERR_NONE) {
                report(p.status, t, code);
            } else {
                const float log_sa = logf(st.s_a), log_sb = logf(st.s_b);
                const float lse_a = st.m_a * inv_tau + log_sa;
                const float lse_b = st.m_b * inv_tau + log_sb;
                /* centred as well: (a_y - m_a) / tau is exact-ish where a_y / tau - lse_a is not */
                const float logp = (ay - st.m_a) * inv_tau - log_sa;
                const float logp_masked = by == -INFINITY ? -INFINITY : (by - st.m_b) * inv_tau - log_sb;
                const float e_nat = st.e_a * inv_tau, f_nat = st.f_b * inv_tau;
                /* log(s_b / s_a) as log1p((s_b - s_a) / s_a): exact subtraction when the sums are close;
                   KL >= 0, and the rounding can leave a near-zero value negative. */
                const float kl_sum = (e_nat - f_nat) / st.s_a + log1pf((st.s_b - st.s_a) / st.s_a);
                const float kl = cold ? NAN : (st.flags & kFlagKlInf) ? INFINITY : fmaxf(kl_sum, 0.0f);
                /* k3 in double: exp(d) - d - 1 cancels for small d, and it is one exp per token. It is
                   >= 0; the clamp keeps a last-ulp rounding of expm1 from making it -0 or -tiny. */
                const double d = fmin(fmax((double)logp_masked - (double)p.old_logp[t], -VPPO_LOG_RATIO_CLAMP), VPPO_LOG_RATIO_CLAMP);
                const float k3 = (float)fmax(expm1(d) - d, 0.0);
                const float raw = p.perception == VPPO_PERCEPTION_K3 ? k3 : kl;
                /* clamp(raw, 0, c); written so that -0.0 and any negative rounding give +0.0 */
                const float score = cold && p.perception != VPPO_PERCEPTION_K3 ? NAN
                                    : raw > 0.0f ? fminf(raw, p.score_clamp) : 0.0f;
                p.lse[t] = lse_a;
                p.lse_masked[t] = lse_b;
                p.logp[t] = logp;
                p.logp_masked[t] = logp_masked;
                p.kl[t] = kl;
                p.k3[t] = k3;
                p.entropy[t] = log_sa - e_nat / st.s_a;
                p.score[t] = score;
            }
        }
        /* smem is rewritten by the next row's block_merge: every thread must be done reading it. */
        __syncthreads();
    }

    /* The cold rows of this block (see finish_cold_row), kl = NaN as thread 0 wrote it above (visible
       to the block after the barrier): each thread looks at one of the block's rows per round, and a
       block-wide count tells whether the round has any. Without cold rows this is one load per thread
       and a reduction per kThreads rows of the block. */
    double *scratch = reinterpret_cast<double *>(smem);
    if (p.partial) return; /* a shard's states: the host merges them (f_b too) */
    for (int64_t first = blockIdx.x; first < p.n_tokens; first += (int64_t)gridDim.x * kThreads) {
        const int64_t mine = first + (int64_t)threadIdx.x * gridDim.x;
        const bool marked = mine < p.n_tokens && p.kl[mine] != p.kl[mine];
        const long long any = block_sum(marked ? 1LL : 0LL, reinterpret_cast<long long *>(scratch));
        if (any == 0) continue; /* uniform: every thread got the same sum */
        for (int j = 0; j < kThreads; ++j) {
            const int64_t t = first + (int64_t)j * gridDim.x;
            if (t >= p.n_tokens) break;
            /* every thread reads the same word: uniform */
            if (p.kl[t] != p.kl[t]) finish_cold_row<T>(p, t, scratch);
            __syncthreads(); /* thread 0's write of kl[t] is seen by all before the next read */
        }
    }
}

} // namespace

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) vppo_perception_f32(const VppoPerceptionParams p) {
    perception<float>(p);
}
VPPO_EXPORT_KERNEL(vppo_perception_f32, VppoPerceptionParams)

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) vppo_perception_f16(const VppoPerceptionParams p) {
    perception<__half>(p);
}
VPPO_EXPORT_KERNEL(vppo_perception_f16, VppoPerceptionParams)

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) vppo_perception_bf16(const VppoPerceptionParams p) {
    perception<__nv_bfloat16>(p);
}
VPPO_EXPORT_KERNEL(vppo_perception_bf16, VppoPerceptionParams)
