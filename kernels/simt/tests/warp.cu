/*
 * warp.cu: self-test kernels for the warp intrinsics (shuffles, votes, __activemask, bit functions).
 * The expected values are computed in tests/simt_executor.rs from the CUDA Programming Guide and the
 * PTX ISA; these kernels only call the intrinsics.
 */
#include "vppo_portable.cuh"

#include "simt/tests/selftest.h"

/* One shuffle per thread: out_a[t] = shfl(in_mask[t], in_a[t], in_b[t], width) with mode 0 idx, 1 up,
 * 2 down, 3 xor. A thread with in_mask[t] == 0 exits at once. */
extern "C" __global__ void selftest_shfl(const VppoSelftestParams p) {
    unsigned int t = SELFTEST_TID;
    unsigned int mask = p.in_mask[t];
    if (mask == 0) {
        return;
    }
    int v = p.in_a[t];
    int b = p.in_b[t];
    int r;
    switch (p.mode) {
    case 0:
        r = __shfl_sync(mask, v, b, p.width);
        break;
    case 1:
        r = __shfl_up_sync(mask, v, static_cast<unsigned int>(b), p.width);
        break;
    case 2:
        r = __shfl_down_sync(mask, v, static_cast<unsigned int>(b), p.width);
        break;
    default:
        r = __shfl_xor_sync(mask, v, b, p.width);
        break;
    }
    p.out_a[t] = r;
}
VPPO_EXPORT_KERNEL(selftest_shfl, VppoSelftestParams)

/* Shuffles of every value type, full mask, one warp: the whole value must travel.
 *   out_u64[t]       = __shfl_xor_sync(full, in_u64[t] as unsigned long long, 1)
 *   out_u64[32 + t]  = bits of __shfl_down_sync(full, in_u64[t] as double, 3)
 *   out_u64[64 + t]  = __shfl_sync(full, in_u64[t] as long long, 31 - t)
 *   out_f[t]         = __shfl_up_sync(full, in_f[t], 2)
 *   out_u[t]         = bits of __shfl_xor_sync(full, __half from in_a[t], 4) | bits of the bf16 one << 16
 *   out_a[t]         = __shfl_sync(full, (unsigned) in_a[t], 7, 8) */
extern "C" __global__ void selftest_shfl_types(const VppoSelftestParams p) {
    unsigned int t = SELFTEST_TID;
    const unsigned int full = 0xffffffffu;
    unsigned long long u = p.in_u64[t];
    p.out_u64[t] = __shfl_xor_sync(full, u, 1);
    double d = __longlong_as_double(static_cast<long long>(u));
    p.out_u64[32 + t] = static_cast<unsigned long long>(__double_as_longlong(__shfl_down_sync(full, d, 3)));
    long long ll = static_cast<long long>(u);
    p.out_u64[64 + t] = static_cast<unsigned long long>(__shfl_sync(full, ll, 31 - static_cast<int>(t)));
    p.out_f[t] = __shfl_up_sync(full, p.in_f[t], 2);
    __half h = __ushort_as_half(static_cast<unsigned short>(p.in_a[t] & 0xffff));
    __nv_bfloat16 bf = __ushort_as_bfloat16(static_cast<unsigned short>(p.in_a[t] & 0xffff));
    unsigned int hb = __half_as_ushort(__shfl_xor_sync(full, h, 4));
    unsigned int bb = __bfloat16_as_ushort(__shfl_xor_sync(full, bf, 4));
    p.out_u[t] = hb | (bb << 16);
    p.out_a[t] = static_cast<int>(__shfl_sync(full, static_cast<unsigned int>(p.in_a[t]), 7, 8));
}
VPPO_EXPORT_KERNEL(selftest_shfl_types, VppoSelftestParams)

/* Votes: a thread with in_mask[t] == 0 exits; the others vote on in_a[t] != 0 with mask in_mask[t].
 *   out_u[t] = __ballot_sync, out_a[t] = __any_sync, out_b[t] = __all_sync; then __syncwarp(mask). */
extern "C" __global__ void selftest_vote(const VppoSelftestParams p) {
    unsigned int t = SELFTEST_TID;
    unsigned int mask = p.in_mask[t];
    if (mask == 0) {
        return;
    }
    int pred = p.in_a[t];
    p.out_u[t] = __ballot_sync(mask, pred);
    p.out_a[t] = __any_sync(mask, pred);
    p.out_b[t] = __all_sync(mask, pred);
    __syncwarp(mask);
}
VPPO_EXPORT_KERNEL(selftest_vote, VppoSelftestParams)

/* __activemask in divergent code: a thread with in_a[t] < 0 exits; the others branch on in_a[t] & 1.
 *   out_u[t] = __activemask() in the branch; out_a[t] = __shfl_sync(that mask, t, lowest lane of it). */
extern "C" __global__ void selftest_activemask(const VppoSelftestParams p) {
    unsigned int t = SELFTEST_TID;
    int a = p.in_a[t];
    if (a < 0) {
        return;
    }
    unsigned int m;
    if (a & 1) {
        m = __activemask();
    } else {
        m = __activemask();
    }
    p.out_u[t] = m;
    p.out_a[t] = __shfl_sync(m, static_cast<int>(t), __ffs(static_cast<int>(m)) - 1);
}
VPPO_EXPORT_KERNEL(selftest_activemask, VppoSelftestParams)

/* Bit functions of x = (unsigned) in_a[t] and y = in_u64[t]:
 *   out_a[t] = __popc(x), out_b[t] = __ffs(x), out_u[t] = __brev(x),
 *   out_u64[t] = __clz(x) | __popcll(y) << 8 | __ffsll(y) << 16 | __clzll(y) << 24,
 *   out_u64[n + t] = __brevll(y). */
extern "C" __global__ void selftest_bits(const VppoSelftestParams p) {
    unsigned int t = SELFTEST_TID + blockIdx.x * blockDim.x;
    if (static_cast<int>(t) >= p.n) {
        return;
    }
    unsigned int x = static_cast<unsigned int>(p.in_a[t]);
    unsigned long long y = p.in_u64[t];
    p.out_a[t] = __popc(x);
    p.out_b[t] = __ffs(static_cast<int>(x));
    p.out_u[t] = __brev(x);
    p.out_u64[t] = static_cast<unsigned long long>(__clz(static_cast<int>(x))) |
                   (static_cast<unsigned long long>(__popcll(y)) << 8) |
                   (static_cast<unsigned long long>(__ffsll(static_cast<long long>(y))) << 16) |
                   (static_cast<unsigned long long>(__clzll(static_cast<long long>(y))) << 24);
    p.out_u64[p.n + static_cast<int>(t)] = __brevll(y);
}
VPPO_EXPORT_KERNEL(selftest_bits, VppoSelftestParams)
