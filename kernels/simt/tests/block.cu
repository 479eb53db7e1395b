/*
 * block.cu: self-test kernels for block-level behaviour: reduction, scan, a planted race, shared memory
 * poisoning, atomics, 16-bit float conversions, thread / block coordinates.
 */
#include "vppo_portable.cuh"

#include "simt/tests/selftest.h"

/* Block reduction (blockDim.x a multiple of 32, 1-D): block b sums in_a[b*n .. b*n+n) into out_a[b]
 * and in_f[...] into out_f[b], by strided partial sums, a __shfl_xor_sync butterfly per warp, the warp
 * sums through shared memory, and a last butterfly in warp 0. Shared: 2 * (blockDim.x / 32) words. */
extern "C" __global__ void selftest_reduce(const VppoSelftestParams p) {
    VPPO_DYNAMIC_SHARED(int, warp_int);
    float *warp_float = reinterpret_cast<float *>(warp_int + blockDim.x / 32);
    unsigned int t = threadIdx.x;
    unsigned int lane = t % 32;
    unsigned int warp = t / 32;
    unsigned int n_warps = blockDim.x / 32;
    long long base = static_cast<long long>(blockIdx.x) * p.n;
    int s = 0;
    float f = 0.0f;
    for (int i = static_cast<int>(t); i < p.n; i += static_cast<int>(blockDim.x)) {
        s += p.in_a[base + i];
        f += p.in_f[base + i];
    }
    for (int off = 16; off > 0; off >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, off);
        f += __shfl_xor_sync(0xffffffffu, f, off);
    }
    if (lane == 0) {
        warp_int[warp] = s;
        warp_float[warp] = f;
    }
    __syncthreads();
    if (warp == 0) {
        s = lane < n_warps ? warp_int[lane] : 0;
        f = lane < n_warps ? warp_float[lane] : 0.0f;
        for (int off = 16; off > 0; off >>= 1) {
            s += __shfl_xor_sync(0xffffffffu, s, off);
            f += __shfl_xor_sync(0xffffffffu, f, off);
        }
        if (lane == 0) {
            p.out_a[blockIdx.x] = s;
            p.out_f[blockIdx.x] = f;
        }
    }
}
VPPO_EXPORT_KERNEL(selftest_reduce, VppoSelftestParams)

/* Hillis-Steele inclusive scan of each block's blockDim.x elements of in_a, double-buffered in shared
 * memory with a barrier per step: out_a[i] = sum of in_a over the block up to i. Shared: 2 * blockDim.x
 * ints. */
extern "C" __global__ void selftest_scan(const VppoSelftestParams p) {
    VPPO_DYNAMIC_SHARED(int, buf);
    unsigned int t = threadIdx.x;
    unsigned int n = blockDim.x;
    long long g = static_cast<long long>(blockIdx.x) * n + t;
    int *src = buf;
    int *dst = buf + n;
    src[t] = p.in_a[g];
    __syncthreads();
    for (unsigned int off = 1; off < n; off <<= 1) {
        dst[t] = src[t] + (t >= off ? src[t - off] : 0);
        __syncthreads();
        int *tmp = src;
        src = dst;
        dst = tmp;
    }
    p.out_a[g] = src[t];
}
VPPO_EXPORT_KERNEL(selftest_scan, VppoSelftestParams)

/* A planted race: s[t] = in_a[t], then out_a[t] = s[t] + s[t - 1] (t > 0). Mode 0 omits the barrier
 * between the write and the read; mode 1 has it. Shared: blockDim.x ints. */
extern "C" __global__ void selftest_race(const VppoSelftestParams p) {
    VPPO_DYNAMIC_SHARED(int, s);
    unsigned int t = threadIdx.x;
    s[t] = p.in_a[t];
    if (p.mode == 1) {
        __syncthreads();
    }
    p.out_a[t] = s[t] + (t > 0 ? s[t - 1] : 0);
}
VPPO_EXPORT_KERNEL(selftest_race, VppoSelftestParams)

/* Poisoning: each block reads its shared memory before writing it, then writes it.
 *   out_u[b * blockDim.x + t] = bits of the float at s[t] before the write; out_f[...] = that float;
 *   out_a[...] = the int at s[t] before the write; out_b[b] = address of s modulo 16. */
extern "C" __global__ void selftest_poison(const VppoSelftestParams p) {
    VPPO_DYNAMIC_SHARED(float, s);
    unsigned int t = threadIdx.x;
    unsigned int g = blockIdx.x * blockDim.x + t;
    float before = s[t];
    int before_int;
    memcpy(&before_int, &s[t], sizeof before_int);
    p.out_u[g] = __float_as_uint(before);
    p.out_f[g] = before;
    p.out_a[g] = before_int;
    __syncthreads();
    s[t] = 123.0f;
    if (t == 0) {
        p.out_b[blockIdx.x] = static_cast<int>(reinterpret_cast<uintptr_t>(s) % 16);
    }
}
VPPO_EXPORT_KERNEL(selftest_poison, VppoSelftestParams)

/* Atomics from every thread t of every block (global thread id g):
 *   out_a[0] += 1, out_a[1] = min(g), out_a[2] = max(g), out_u[0] |= 1 << (g % 32),
 *   out_u[1] += 2 by an atomicCAS loop, out_a[3] = atomicExch's sum of old values is not checked: the
 *   last value written is, out_f[0] += 0.5, out_u64[0] += g, out_u64[1] (as long long) = min(-g),
 *   out_u64[2] (as double) += 0.25, out_u64[3] = max(g * 2^33) as unsigned long long. */
extern "C" __global__ void selftest_atomics(const VppoSelftestParams p) {
    int g = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    atomicAdd(&p.out_a[0], 1);
    atomicMin(&p.out_a[1], g);
    atomicMax(&p.out_a[2], g);
    atomicOr(&p.out_u[0], 1u << (g % 32));
    unsigned int old = p.out_u[1];
    for (;;) {
        unsigned int seen = atomicCAS(&p.out_u[1], old, old + 2);
        if (seen == old) {
            break;
        }
        old = seen;
    }
    atomicExch(&p.out_a[3], g);
    atomicAdd(&p.out_f[0], 0.5f);
    atomicAdd(reinterpret_cast<unsigned long long *>(&p.out_u64[0]), static_cast<unsigned long long>(g));
    atomicMin(reinterpret_cast<long long *>(&p.out_u64[1]), -static_cast<long long>(g));
    atomicAdd(reinterpret_cast<double *>(&p.out_u64[2]), 0.25);
    atomicMax(reinterpret_cast<unsigned long long *>(&p.out_u64[3]), static_cast<unsigned long long>(g) << 33);
}
VPPO_EXPORT_KERNEL(selftest_atomics, VppoSelftestParams)

/* 16-bit float conversions, one element per global thread i < n:
 *   out_u[i] = bf16 bits of __float2bfloat16(in_f[i]) | half bits of __float2half_rn(in_f[i]) << 16
 *   out_a[i] = bf16 bits of __float2bfloat16_rn(in_f[i]) | half bits of __float2half(in_f[i]) << 16
 *   out_f[2i] = __half2float(bits in_a[i] & 0xffff), out_f[2i+1] = __bfloat162float(same bits). */
extern "C" __global__ void selftest_convert(const VppoSelftestParams p) {
    int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= p.n) {
        return;
    }
    float x = p.in_f[i];
    unsigned int b1 = __bfloat16_as_ushort(__float2bfloat16(x));
    unsigned int h1 = __half_as_ushort(__float2half_rn(x));
    unsigned int b2 = __bfloat16_as_ushort(__float2bfloat16_rn(x));
    unsigned int h2 = __half_as_ushort(__float2half(x));
    p.out_u[i] = b1 | (h1 << 16);
    p.out_a[i] = static_cast<int>(b2 | (h2 << 16));
    unsigned short bits = static_cast<unsigned short>(p.in_a[i] & 0xffff);
    p.out_f[2 * i] = __half2float(__ushort_as_half(bits));
    p.out_f[2 * i + 1] = __bfloat162float(__ushort_as_bfloat16(bits));
}
VPPO_EXPORT_KERNEL(selftest_convert, VppoSelftestParams)

/* Coordinates: for global linear thread g (block-major, x fastest within a block),
 *   out_u64[g] = threadIdx.x | y << 10 | z << 20 | blockIdx.x << 30 | y << 40 | z << 50,
 *   out_u[g] = blockDim.x | y << 10 | z << 20, out_a[g] = gridDim.x | y << 10 | z << 20,
 *   out_b[g] = __ballot_sync(lanes of this warp, threadIdx.y == 1) (one warp per block: <= 32 threads). */
extern "C" __global__ void selftest_dims(const VppoSelftestParams p) {
    unsigned int nt = blockDim.x * blockDim.y * blockDim.z;
    unsigned int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    unsigned int g = b * nt + SELFTEST_TID;
    p.out_u64[g] = static_cast<unsigned long long>(threadIdx.x) | (static_cast<unsigned long long>(threadIdx.y) << 10) |
                   (static_cast<unsigned long long>(threadIdx.z) << 20) |
                   (static_cast<unsigned long long>(blockIdx.x) << 30) |
                   (static_cast<unsigned long long>(blockIdx.y) << 40) |
                   (static_cast<unsigned long long>(blockIdx.z) << 50);
    p.out_u[g] = blockDim.x | (blockDim.y << 10) | (blockDim.z << 20);
    p.out_a[g] = static_cast<int>(gridDim.x | (gridDim.y << 10) | (gridDim.z << 20));
    unsigned int lanes = nt >= 32 ? 0xffffffffu : (1u << nt) - 1u;
    p.out_b[g] = static_cast<int>(__ballot_sync(lanes, threadIdx.y == 1));
}
VPPO_EXPORT_KERNEL(selftest_dims, VppoSelftestParams)
