/*
 * backward.cu: pass 3 of VPPO, dloss/dlogits (SPEC section 6).
 *
 *     grad[t, v] = g_t * (1[v = y_t] - softmax(a_t)_v) / tau,   softmax(a_t)_v = exp(a_v / tau - lse_t)
 *
 * with g_t = dloss/dlogp_t from pass 2 and lse_t saved by pass 1, so each logits element is read once
 * and each gradient element written once. A row with g_t = 0 (tokens outside the top-k mask when the
 * logp penalty is 0) writes zeros without reading its logits. For the target, (1 - p_y) is formed in f32
 * before the product is rounded to the output type.
 *
 * Shapes: logits [N, V] of dtype T; grad [N, V] of dtype O (f32, or T itself); lse, dlogp, targets [N].
 * With rows [N] (SPEC section 10) logits and grad are [R, V]: the kernel walks the R output rows, finds
 * the token that owns row r by binary search in rows (strictly increasing), and writes zeros for a row
 * that no token reads.
 * grad may be the logits buffer itself (in place, O = T): every element is loaded before the same
 * thread stores over it, and no two threads touch one element.
 *
 * Mapping: one block of kThreads per row, grid-stride over rows; 16-byte loads and stores in the row's
 * aligned middle (when the output row shares that alignment), scalar head and tail. 64-bit offsets.
 *
 * kl_penalty = full (SPEC section 12): the vppo_backward_full_* versions also stream the row of
 * ref_logits (c = ref_logits[row] / tau) and add d_t p_v ((a_v / tau - lse_t) - (c_v - lse_ref_t) - kl_t)
 * / tau, with d_t = dloss/dkl_t, kl_t and lse_ref_t from the forward's reference launch of pass 1 (a
 * term with p_v = 0 adds nothing); a row is written as zeros without reading when g_t = d_t = 0. The
 * 16-byte path then also needs the ref row on the logits row's phase. The other versions compile
 * exactly as before (the extra code is under `if constexpr (kFull)`).
 *
 * Versions: vppo_backward_{f32_f32, f16_f32, f16_f16, bf16_f32, bf16_bf16} (input_output), and
 * vppo_backward_full_{...} of the same pairs.
 *
 * Files: launched by src/exec/backward.rs; the CPU reference of this op is src/reference/backward.rs;
 * tested against it by tests/kernels.rs (every random batch's gradient,
 * in_place_backward_equals_out_of_place), for its bounds by tests/memory_safety.rs, for its register
 * budget by scripts/sass_check.py.
 */
#include "common.cuh"

namespace {

constexpr int kThreads = VPPO_BACKWARD_THREADS;

/* Stores K f32 values as K elements of O at a 16-byte-aligned address. __stcs, not a plain store:
   nvcc 13 split `*(uint4 *)p = v` here into four 32-bit stores (seen in the PTX), and the gradient is
   written once and not read again by this kernel, which is what the streaming hint is for. */
template <typename O, int K> struct VecStore;

template <int K> struct VecStore<float, K> {
    static __device__ __forceinline__ void store(float *dst, const float *v) {
        uint4 *d = reinterpret_cast<uint4 *>(dst);
#pragma unroll
        for (int j = 0; j < K / 4; ++j) {
            __stcs(d + j, make_uint4(__float_as_uint(v[4 * j]), __float_as_uint(v[4 * j + 1]),
                                     __float_as_uint(v[4 * j + 2]), __float_as_uint(v[4 * j + 3])));
        }
    }
};

__device__ __forceinline__ unsigned int bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ unsigned int bits16(__half x) { return __half_as_ushort(x); }

template <typename O> struct VecStore16 {
    static __device__ __forceinline__ unsigned int pair(float lo, float hi) {
        return bits16(Elt<O>::from_f32(lo)) | (bits16(Elt<O>::from_f32(hi)) << 16);
    }
    static __device__ __forceinline__ void store(O *dst, const float *v) {
        __stcs(reinterpret_cast<uint4 *>(dst),
               make_uint4(pair(v[0], v[1]), pair(v[2], v[3]), pair(v[4], v[5]), pair(v[6], v[7])));
    }
};
template <> struct VecStore<__nv_bfloat16, 8> : VecStore16<__nv_bfloat16> {};
template <> struct VecStore<__half, 8> : VecStore16<__half> {};

/* The one vector per row that holds the target: the grad of each element as `one` in backward() forms
   it (the same expression, so the same bits), with (1 - p) at element y_lane. */
template <int K>
__device__ __forceinline__ void target_vector(float *a, int y_lane, float inv_tau, float lse, float scale) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const float prob = VPPO_EXP(a[k] * inv_tau - lse);
        a[k] = scale * (k == y_lane ? 1.0f - prob : -prob);
    }
}

/* The token that owns output row r: r itself without rows, else the t with rows[t] = r (rows is
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

/* The full KL penalty's term of one element (see the file comment); 0 where a = -inf (p = 0). */
__device__ __forceinline__ float full_kl_term(float a, float c, float prob, float inv_tau, float lse,
                                              float lse_ref, float kl, float dscale) {
    return a == -INFINITY ? 0.0f : dscale * (prob * ((a * inv_tau - lse) - (c * inv_tau - lse_ref) - kl));
}

template <typename T, typename O, bool kFull>
__device__ void backward(const VppoBackwardParams &p) {
    constexpr int K = Elt<T>::kPerVec;
    const T *logits = static_cast<const T *>(p.logits);
    O *grad = static_cast<O *>(p.grad);
    const int64_t vocab = p.vocab, tid = threadIdx.x, nth = blockDim.x;
    const float inv_tau = p.inv_temperature;

    for (int64_t r = blockIdx.x; r < p.n_rows; r += gridDim.x) {
        const T *ra = logits + r * vocab; /* 64-bit: r * vocab passes 2^31 */
        O *rg = grad + r * vocab;
        const int64_t t = token_of_row(p.rows, p.n_tokens, r);
        const float g = t < 0 ? 0.0f : p.dlogp[t];
        const float d = (kFull && t >= 0) ? p.dref_kl[t] : 0.0f;
        const T *rc = kFull ? static_cast<const T *>(p.ref_logits) + r * vocab : nullptr;
        RowSplit sp = split_row(ra, vocab);
        /* The vector path needs the output row aligned at the same element. */
        if ((reinterpret_cast<uintptr_t>(rg + sp.head) & 15u) != 0) {
            sp.head = vocab;
            sp.nvec = 0;
        }
        if constexpr (kFull) {
            /* ... and the ref row on the phase of the logits row */
            if (((reinterpret_cast<uintptr_t>(ra) ^ reinterpret_cast<uintptr_t>(rc)) & 15u) != 0) {
                sp.head = vocab;
                sp.nvec = 0;
            }
        }
        const int64_t body_end = sp.head + sp.nvec * K;

        if (g == 0.0f && (!kFull || d == 0.0f)) {
            /* No read of the logits: only the write. */
            const float zeros[K] = {};
            for (int64_t v = tid; v < sp.head; v += nth) rg[v] = Elt<O>::from_f32(0.0f);
            for (int64_t i = tid; i < sp.nvec; i += nth) VecStore<O, K>::store(rg + sp.head + i * K, zeros);
            for (int64_t v = body_end + tid; v < vocab; v += nth) rg[v] = Elt<O>::from_f32(0.0f);
            continue;
        }

        const float lse = p.lse[t];
        const float scale = g * inv_tau;
        const int64_t y = p.targets[t];
        /* grad of one element; (1 - p) for the target in f32, then one rounding to O */
        auto one = [&](float a, bool is_target) -> float {
            const float prob = VPPO_EXP(a * inv_tau - lse);
            return scale * (is_target ? 1.0f - prob : -prob);
        };
        /* with the full KL penalty: the element's loss gradient plus its KL term */
        float lse_ref = 0.0f, kl = 0.0f, dscale = 0.0f;
        if constexpr (kFull) {
            lse_ref = p.lse_ref[t];
            kl = p.ref_kl[t];
            dscale = d * inv_tau;
        }
        auto one_full = [&](float a, float c, bool is_target) -> float {
            const float prob = VPPO_EXP(a * inv_tau - lse);
            return scale * (is_target ? 1.0f - prob : -prob) +
                   full_kl_term(a, c, prob, inv_tau, lse, lse_ref, kl, dscale);
        };

        if constexpr (kFull) {
            for (int64_t v = tid; v < sp.head; v += nth)
                rg[v] = Elt<O>::from_f32(one_full(Elt<T>::load(ra + v), Elt<T>::load(rc + v), v == y));
        } else {
        for (int64_t v = tid; v < sp.head; v += nth) rg[v] = Elt<O>::from_f32(one(Elt<T>::load(ra + v), v == y));
        }

        /* The body in 16-byte vectors, with a 32-bit index (a row of more than 2^30 vectors is walked
           in slices of 2^30). The target is tested once per vector (the vector y_vec holds it, at
           element y_lane), not once per element. */
        const int64_t y_body = y - sp.head;
        const int64_t y_vec = (y_body >= 0 && y_body < sp.nvec * K) ? y_body / K : -1;
        const int y_lane = (int)(y_body - y_vec * K);
        constexpr int64_t kSlice = int64_t(1) << 30;
        for (int64_t base = 0; base < sp.nvec; base += kSlice) {
            const uint4 *va = reinterpret_cast<const uint4 *>(ra + sp.head) + base;
            O *rgb = rg + sp.head + base * K;
            const int n = (int)(sp.nvec - base < kSlice ? sp.nvec - base : kSlice);
            const int yv = (y_vec >= base && y_vec < base + n) ? (int)(y_vec - base) : -1;
            for (int i = (int)tid; i < n; i += (int)nth) {
                /* __ldcs (evict-first, coherent), not __ldg: with grad == logits the data is written */
                const uint4 x = __ldcs(va + i);
                float a[K];
                Elt<T>::unpack(x, a);
                if constexpr (kFull) {
                    float c[K];
                    Elt<T>::unpack(__ldcs(reinterpret_cast<const uint4 *>(rc + sp.head) + base + i), c);
#pragma unroll
                    for (int k = 0; k < K; ++k) a[k] = one_full(a[k], c[k], i == yv && k == y_lane);
                } else if (i == yv) {
                    target_vector<K>(a, y_lane, inv_tau, lse, scale);
                } else {
#pragma unroll
                    for (int k = 0; k < K; ++k) a[k] = one(a[k], false);
                }
                VecStore<O, K>::store(rgb + (int64_t)i * K, a);
            }
        }

        if constexpr (kFull) {
            for (int64_t v = body_end + tid; v < vocab; v += nth)
                rg[v] = Elt<O>::from_f32(one_full(Elt<T>::load(ra + v), Elt<T>::load(rc + v), v == y));
        } else {
        for (int64_t v = body_end + tid; v < vocab; v += nth) rg[v] = Elt<O>::from_f32(one(Elt<T>::load(ra + v), v == y));
        }
    }
}

} // namespace

#define VPPO_BACKWARD(NAME, T, O, FULL)                                                               \
    extern "C" __global__ void __launch_bounds__(kThreads) NAME(const VppoBackwardParams p) {         \
        backward<T, O, FULL>(p);                                                                      \
    }                                                                                                 \
    VPPO_EXPORT_KERNEL(NAME, VppoBackwardParams)

VPPO_BACKWARD(vppo_backward_f32_f32, float, float, false)
VPPO_BACKWARD(vppo_backward_f16_f32, __half, float, false)
VPPO_BACKWARD(vppo_backward_f16_f16, __half, __half, false)
VPPO_BACKWARD(vppo_backward_bf16_f32, __nv_bfloat16, float, false)
VPPO_BACKWARD(vppo_backward_bf16_bf16, __nv_bfloat16, __nv_bfloat16, false)
VPPO_BACKWARD(vppo_backward_full_f32_f32, float, float, true)
VPPO_BACKWARD(vppo_backward_full_f16_f32, __half, float, true)
VPPO_BACKWARD(vppo_backward_full_f16_f16, __half, __half, true)
VPPO_BACKWARD(vppo_backward_full_bf16_f32, __nv_bfloat16, float, true)
VPPO_BACKWARD(vppo_backward_full_bf16_bf16, __nv_bfloat16, __nv_bfloat16, true)
