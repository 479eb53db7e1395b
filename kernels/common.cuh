/*
 * common.cuh: what the VPPO kernels share.
 *
 *   - element loaders for the three logits dtypes (f32, f16, bf16), scalar and 16-byte vectors;
 *   - the row splitter that gives each row its scalar head, 16-byte-aligned vector body and scalar tail;
 *   - warp and block reductions with a fixed combination order (the results are bit-identical from run
 *     to run: no float atomics anywhere);
 *   - float <-> ordered-integer keys for the radix select.
 *
 * Everything here compiles twice: with nvcc for the GPU, and as host C++ for the SIMT executor
 * (kernels/simt/), so no inline PTX and no static __shared__ (dynamic shared memory only, through
 * VPPO_DYNAMIC_SHARED).
 */
#ifndef VPPO_COMMON_CUH
#define VPPO_COMMON_CUH

#include "vppo_portable.cuh"
#include "vppo_params.h"

#define VPPO_FULL_MASK 0xffffffffu

/*
 * The per-element exponentials of the softmax passes. VPPO_MUTANT builds a deliberately wrong variant
 * (every exp times 1.001) under other kernel names, for the SIMT executor only: the kernel tests must
 * catch it (tests/kernels.rs, `mutant_is_caught`), which shows their tolerances can fail.
 */
#ifdef VPPO_MUTANT
#define VPPO_EXP(x) (expf(x) * 1.001f)
#define VPPO_EXP2(x) (exp2f(x) * 1.001f)
#else
#define VPPO_EXP(x) expf(x)
#define VPPO_EXP2(x) exp2f(x)
#endif

/* ------------------------------------------------------------------------------------------------ */
/* Element types                                                                                     */
/* ------------------------------------------------------------------------------------------------ */

/* Elt<T>: how to widen one element to f32, how many fit in 16 bytes, how to narrow an f32 back. */
template <typename T> struct Elt;

template <> struct Elt<float> {
    static constexpr int kPerVec = 4;
    static __device__ __forceinline__ float load(const float *p) { return *p; }
    static __device__ __forceinline__ void unpack(const uint4 &v, float *out) {
        out[0] = __uint_as_float(v.x);
        out[1] = __uint_as_float(v.y);
        out[2] = __uint_as_float(v.z);
        out[3] = __uint_as_float(v.w);
    }
    static __device__ __forceinline__ float from_f32(float x) { return x; }
};

/* bf16 is the top half of an f32: widening is a shift, exact. Narrowing rounds to nearest even. */
template <> struct Elt<__nv_bfloat16> {
    static constexpr int kPerVec = 8;
    static __device__ __forceinline__ float load(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
    static __device__ __forceinline__ float lo(unsigned int w) { return __uint_as_float(w << 16); }
    static __device__ __forceinline__ float hi(unsigned int w) { return __uint_as_float(w & 0xffff0000u); }
    static __device__ __forceinline__ void unpack(const uint4 &v, float *out) {
        out[0] = lo(v.x); out[1] = hi(v.x);
        out[2] = lo(v.y); out[3] = hi(v.y);
        out[4] = lo(v.z); out[5] = hi(v.z);
        out[6] = lo(v.w); out[7] = hi(v.w);
    }
    static __device__ __forceinline__ __nv_bfloat16 from_f32(float x) { return __float2bfloat16_rn(x); }
};

template <> struct Elt<__half> {
    static constexpr int kPerVec = 8;
    static __device__ __forceinline__ float load(const __half *p) { return __half2float(*p); }
    static __device__ __forceinline__ float h(unsigned int bits) {
        return __half2float(__ushort_as_half((unsigned short)(bits & 0xffffu)));
    }
    static __device__ __forceinline__ void unpack(const uint4 &v, float *out) {
        out[0] = h(v.x); out[1] = h(v.x >> 16);
        out[2] = h(v.y); out[3] = h(v.y >> 16);
        out[4] = h(v.z); out[5] = h(v.z >> 16);
        out[6] = h(v.w); out[7] = h(v.w >> 16);
    }
    static __device__ __forceinline__ __half from_f32(float x) { return __float2half_rn(x); }
};

/*
 * A row of V elements starting at `row`, split so the middle part can be read with 16-byte loads:
 * elements [0, head) and [head + 16/sizeof(T) * nvec, V) are read one by one. `head` is the number of
 * elements before the first 16-byte boundary (0 when the row starts on one). Rows of one tensor start
 * at different alignments whenever V * sizeof(T) is not a multiple of 16 (V = 151,936 bf16 rows are
 * aligned; a prime V is not), so this is computed per row.
 */
struct RowSplit {
    int64_t head;
    int64_t nvec;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T *row, int64_t vocab) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
    int64_t head = (int64_t)(((16u - (addr & 15u)) & 15u) / sizeof(T));
    /* A row not aligned to the element size cannot happen (the dtype's own alignment), but a row
       shorter than its head is read entirely as head. */
    if (head > vocab) head = vocab;
    RowSplit s;
    s.head = head;
    s.nvec = (vocab - head) / Elt<T>::kPerVec;
    return s;
}

/* ------------------------------------------------------------------------------------------------ */
/* Reductions in a fixed order                                                                        */
/* ------------------------------------------------------------------------------------------------ */

struct SumOp {
    template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};

/* Butterfly over the 32 lanes: every lane ends with the same value, combined in the same order on
   every run. */
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T x, Op op) {
    for (int off = 16; off > 0; off >>= 1) x = op(x, __shfl_xor_sync(VPPO_FULL_MASK, x, off));
    return x;
}

/*
 * Block-wide reduction, every thread gets the result. `scratch` holds at least 32 values of shared
 * memory; `identity` fills the lanes past the last warp. Requires blockDim.x to be a multiple of 32
 * (all launches use 256 or 512). The two barriers: the first makes the warp partials visible, the
 * second keeps a following call from overwriting scratch before every thread has read the total.
 */
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T x, T identity, T *scratch, Op op) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    x = warp_reduce(x, op);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    T total = lane < nwarps ? scratch[lane] : identity;
    total = warp_reduce(total, op);
    __syncthreads();
    return total;
}

__device__ __forceinline__ double block_sum(double x, double *scratch) {
    return block_reduce(x, 0.0, scratch, SumOp());
}
__device__ __forceinline__ long long block_sum(long long x, long long *scratch) {
    return block_reduce(x, 0LL, scratch, SumOp());
}
__device__ __forceinline__ float block_max(float x, float *scratch) {
    return block_reduce(x, -INFINITY, scratch, MaxOp());
}
__device__ __forceinline__ float block_min(float x, float *scratch) {
    return block_reduce(x, INFINITY, scratch, MinOp());
}

/* ------------------------------------------------------------------------------------------------ */
/* Ordered keys                                                                                       */
/* ------------------------------------------------------------------------------------------------ */

/* Maps a float to an unsigned key with the same order (for non-NaN input): flip all bits of a
   negative float, only the sign bit of a positive one. -0.0 is first made +0.0, so the two zeros tie
   as they do under f64 comparison in the reference. */
__device__ __forceinline__ unsigned int float_key(float x) {
    const unsigned int u = x == 0.0f ? 0u : __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#endif /* VPPO_COMMON_CUH */
