/*
 * kl_div.cu: the backward of the general KL op, vppo.torch.kl (SPEC section 13): the exact per-token
 * KL(p || q) of two logits tensors, differentiable with respect to both.
 *
 * For token t, with a = p_logits[p_row(t)] / tau, b = q_logits[q_row(t)] / tau, p = softmax(a),
 * q = softmax(b), kl_t = KL(p || q) = sum_v p_v (log p_v - log q_v) and u_t = dL/dkl_t:
 *
 *     grad_p[v] = u_t p_v ((log p_v - log q_v) - kl_t) / tau,   log p_v = a_v - lse_p
 *     grad_q[v] = u_t (q_v - p_v) / tau,                         log q_v = b_v - lse_q
 *
 * from lse_p, lse_q and kl_t saved by the forward (the perception kernel, kernels/perception.cu, in
 * partial mode: per row the online-softmax state of both rows, finished on the host). Each element of
 * both rows is read once and each element of both gradient rows written once. A term with p_v = 0
 * (a_v = -inf) has grad_p[v] = 0, never 0 * inf; b_v = -inf where a_v is finite makes kl = +inf, which
 * the forward reports as an error, so it never reaches here. A token with u_t = 0 writes zeros
 * without reading its rows.
 *
 * Shapes: p_logits [R, V] and q_logits [R', V] of dtype T (f32, f16, bf16), both gradients of their
 * input's shape and dtype. Without p_rows, R = N and token t reads row t; with p_rows [N] (strictly
 * increasing, validated on the host) token t reads row p_rows[t]; likewise q_rows (the host passes
 * p_rows again when q_logits is read through them). Rows no token reads are zero in the gradient.
 *
 * Mapping: one block of kThreads per item, grid-stride over R + R' items: item r < R is row r of
 * p_logits (its token found by binary search in p_rows; the block then streams both of the token's
 * rows and writes both gradient rows), item R + r is row r of q_logits, which the block only zeroes
 * when no token reads it. 16-byte loads and stores in the aligned middle when all four rows share
 * their 16-byte phase, scalar head and tail; 64-bit offsets.
 *
 * Versions: vppo_kl_div_backward_{f32,f16,bf16}.
 *
 * Files: launched by src/exec/kl_div.rs; the CPU reference of this op is src/reference/kl_div.rs
 * (`kl_div_backward`); the Rust API is src/kl_div.rs (`KlDiv`); tested against the reference and
 * finite differences by tests/kl_div.rs, its mutants in scripts/mutate.py (KD1..KD9).
 */
#include "common.cuh"

namespace {

constexpr int kThreads = VPPO_KL_DIV_THREADS;

__device__ __forceinline__ unsigned int bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ unsigned int bits16(__half x) { return __half_as_ushort(x); }

/* K f32 values as the 16 bytes of K elements of T (rounded to nearest even for f16 and bf16). */
template <typename T> struct Pack;
template <> struct Pack<float> {
    static __device__ __forceinline__ uint4 of(const float *v) {
        return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                          __float_as_uint(v[3]));
    }
};
template <typename T> struct Pack16 {
    static __device__ __forceinline__ unsigned int pair(float lo, float hi) {
        return bits16(Elt<T>::from_f32(lo)) | (bits16(Elt<T>::from_f32(hi)) << 16);
    }
    static __device__ __forceinline__ uint4 of(const float *v) {
        return make_uint4(pair(v[0], v[1]), pair(v[2], v[3]), pair(v[4], v[5]), pair(v[6], v[7]));
    }
};
template <> struct Pack<__nv_bfloat16> : Pack16<__nv_bfloat16> {};
template <> struct Pack<__half> : Pack16<__half> {};

/* The token that reads row r: r itself without an index, else the t with rows[t] = r (rows is
   strictly increasing: a binary search, the same for every thread of the block), or -1. */
__device__ __forceinline__ int64_t token_of_row(const int64_t *rows, int64_t n, int64_t r) {
    if (rows == nullptr) return r;
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (rows[mid] < r) lo = mid + 1; else hi = mid;
    }
    return (lo < n && rows[lo] == r) ? lo : -1;
}

/* Row t's constants: 1 / tau, both lse, kl and u / tau. */
struct Row {
    float inv_tau, lse_p, lse_q, kl, scale;
};

/* The two gradients of one element, from the raw logits a (of p) and b (of q). */
__device__ __forceinline__ void grad_pair(float a, float b, const Row &r, float &gp, float &gq) {
    const float lp = a * r.inv_tau - r.lse_p; /* log p_v */
    const float lq = b * r.inv_tau - r.lse_q; /* log q_v */
    const float p = VPPO_EXP(lp), q = VPPO_EXP(lq);
    /* p_v = 0 contributes nothing: (lp - lq) is -inf or NaN there, and 0 times it is not 0 */
    gp = a == -INFINITY ? 0.0f : r.scale * (p * ((lp - lq) - r.kl));
    gq = r.scale * (q - p);
}

/* Zeros over one row of V elements of T. */
template <typename T>
__device__ __forceinline__ void zero_row(T *rg, int64_t vocab) {
    constexpr int K = Elt<T>::kPerVec;
    const RowSplit sp = split_row<T>(rg, vocab);
    const int64_t tid = threadIdx.x, nth = blockDim.x;
    for (int64_t v = tid; v < sp.head; v += nth) rg[v] = Elt<T>::from_f32(0.0f);
    uint4 *vg = reinterpret_cast<uint4 *>(rg + sp.head);
    for (int64_t i = tid; i < sp.nvec; i += nth) __stcs(vg + i, make_uint4(0u, 0u, 0u, 0u));
    for (int64_t v = sp.head + sp.nvec * K + tid; v < vocab; v += nth) rg[v] = Elt<T>::from_f32(0.0f);
}

/* Both gradient rows of token t, which reads row rp of p_logits and row rq of q_logits. */
template <typename T>
__device__ void token_rows(const VppoKlDivBackwardParams &p, int64_t t, int64_t rp, int64_t rq) {
    constexpr int K = Elt<T>::kPerVec;
    const int64_t vocab = p.vocab, tid = threadIdx.x, nth = blockDim.x;
    /* 64-bit: row * vocab passes 2^31 */
    const T *ra = static_cast<const T *>(p.p_logits) + rp * vocab;
    const T *rb = static_cast<const T *>(p.q_logits) + rq * vocab;
    T *ga = static_cast<T *>(p.grad_p) + rp * vocab;
    T *gb = static_cast<T *>(p.grad_q) + rq * vocab;
    const float u = p.grad_kl[t];
    if (u == 0.0f) {
        /* No read of the logits: only the writes. */
        zero_row<T>(ga, vocab);
        zero_row<T>(gb, vocab);
        return;
    }
    Row r;
    r.inv_tau = p.inv_temperature;
    r.lse_p = p.lse_p[t];
    r.lse_q = p.lse_q[t];
    r.kl = p.kl[t];
    r.scale = u * p.inv_temperature;

    RowSplit sp = split_row(ra, vocab);
    /* The vector path needs all four rows on the same 16-byte phase; otherwise everything is a head. */
    const uintptr_t a0 = reinterpret_cast<uintptr_t>(ra);
    if ((((a0 ^ reinterpret_cast<uintptr_t>(rb)) | (a0 ^ reinterpret_cast<uintptr_t>(ga)) |
          (a0 ^ reinterpret_cast<uintptr_t>(gb))) & 15u) != 0) {
        sp.head = vocab;
        sp.nvec = 0;
    }
    const int64_t body_end = sp.head + sp.nvec * K;

    for (int64_t v = tid; v < sp.head; v += nth) {
        float gp, gq;
        grad_pair(Elt<T>::load(ra + v), Elt<T>::load(rb + v), r, gp, gq);
        ga[v] = Elt<T>::from_f32(gp);
        gb[v] = Elt<T>::from_f32(gq);
    }

    /* The body in 16-byte vectors with a 32-bit index (a row of more than 2^30 vectors is walked in
       slices of 2^30). Loads are __ldcs (evict-first: each element is read once), stores __stcs. */
    constexpr int64_t kSlice = int64_t(1) << 30;
    for (int64_t base = 0; base < sp.nvec; base += kSlice) {
        const uint4 *va = reinterpret_cast<const uint4 *>(ra + sp.head) + base;
        const uint4 *vb = reinterpret_cast<const uint4 *>(rb + sp.head) + base;
        uint4 *vga = reinterpret_cast<uint4 *>(ga + sp.head) + base;
        uint4 *vgb = reinterpret_cast<uint4 *>(gb + sp.head) + base;
        const int n = (int)(sp.nvec - base < kSlice ? sp.nvec - base : kSlice);
        for (int i = (int)tid; i < n; i += kThreads) {
            const uint4 xa = __ldcs(va + i), xb = __ldcs(vb + i);
            float a[K], b[K];
            Elt<T>::unpack(xa, a);
            Elt<T>::unpack(xb, b);
#pragma unroll
            for (int k = 0; k < K; ++k) grad_pair(a[k], b[k], r, a[k], b[k]);
            __stcs(vga + i, Pack<T>::of(a));
            __stcs(vgb + i, Pack<T>::of(b));
        }
    }

    for (int64_t v = body_end + tid; v < vocab; v += nth) {
        float gp, gq;
        grad_pair(Elt<T>::load(ra + v), Elt<T>::load(rb + v), r, gp, gq);
        ga[v] = Elt<T>::from_f32(gp);
        gb[v] = Elt<T>::from_f32(gq);
    }
}

template <typename T>
__device__ void kl_div_backward(const VppoKlDivBackwardParams &p) {
    const int64_t total = p.n_p_rows + p.n_q_rows;
    for (int64_t i = blockIdx.x; i < total; i += gridDim.x) {
        /* uniform across the block: every thread has the same i and reads the same rows entries */
        if (i < p.n_p_rows) {
            const int64_t t = token_of_row(p.p_rows, p.n_tokens, i);
            if (t < 0) {
                zero_row<T>(static_cast<T *>(p.grad_p) + i * p.vocab, p.vocab);
            } else {
                token_rows<T>(p, t, i, p.q_rows ? p.q_rows[t] : t);
            }
        } else {
            /* a row of q_logits: written by its token's item above, or zero when no token reads it */
            const int64_t r = i - p.n_p_rows;
            if (token_of_row(p.q_rows, p.n_tokens, r) < 0) {
                zero_row<T>(static_cast<T *>(p.grad_q) + r * p.vocab, p.vocab);
            }
        }
    }
}

} // namespace

extern "C" __global__ void __launch_bounds__(kThreads) vppo_kl_div_backward_f32(const VppoKlDivBackwardParams p) {
    kl_div_backward<float>(p);
}
VPPO_EXPORT_KERNEL(vppo_kl_div_backward_f32, VppoKlDivBackwardParams)

extern "C" __global__ void __launch_bounds__(kThreads) vppo_kl_div_backward_f16(const VppoKlDivBackwardParams p) {
    kl_div_backward<__half>(p);
}
VPPO_EXPORT_KERNEL(vppo_kl_div_backward_f16, VppoKlDivBackwardParams)

extern "C" __global__ void __launch_bounds__(kThreads) vppo_kl_div_backward_bf16(const VppoKlDivBackwardParams p) {
    kl_div_backward<__nv_bfloat16>(p);
}
VPPO_EXPORT_KERNEL(vppo_kl_div_backward_bf16, VppoKlDivBackwardParams)
