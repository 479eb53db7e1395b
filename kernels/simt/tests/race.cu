/*
 * race.cu: self-test kernels for the race check (kernels/simt/simt.h): shared-memory accesses that a
 * barrier, a warp operation or atomicity orders, and ones that nothing orders. The comments at the ends
 * of lines (`line: ...`) are what tests/simt_executor.rs looks for in the reports.
 */
#include "vppo_portable.cuh"

#include "simt/tests/selftest.h"

/* One block of blockDim.x (a multiple of 32) threads; shared: blockDim.x + 1 ints. Thread t writes
 * out_a[t]. `mode` picks the pattern (racy: the checker must report it; ordered: it must not):
 *   0 racy:    s[t] = t, then s[(t + 1) % n] is read, no barrier
 *   1 ordered: the same with __syncthreads between
 *   2 ordered: s[t] = t, __syncwarp(), s[t ^ 1] (a lane of the same warp)
 *   3 racy:    the same without the __syncwarp
 *   4 ordered: a __shfl_xor_sync between (every warp operation orders its lanes)
 *   5 ordered: each half-warp syncs its own half (__syncwarp(half)), then reads in that half
 *   6 racy:    the same, reading in the other half
 *   7 ordered: every thread atomicAdds the counter s[n] (set before a barrier), read after a barrier
 *   8 racy:    the same, thread 0 reading the counter with no barrier
 *   9 racy:    every thread reads s[0] (set before a barrier), then thread 32 writes it: no barrier
 *  10 ordered: the same with a barrier before the write
 *  11 racy:    threads 0 and 32 both write s[1]
 */
extern "C" __global__ void selftest_ordering(const VppoSelftestParams p) {
    VPPO_DYNAMIC_SHARED(int, s);
    const unsigned int t = threadIdx.x, n = blockDim.x, lane = t & 31;
    int out = 0;
    switch (p.mode) {
    case 0:
    case 1:
        s[t] = static_cast<int>(t); /* line: write 0 */
        if (p.mode == 1) __syncthreads();
        out = s[(t + 1) % n]; /* line: read 0 */
        break;
    case 2:
    case 3:
    case 4:
        s[t] = static_cast<int>(t);
        if (p.mode == 2) __syncwarp();
        if (p.mode == 4) out = __shfl_xor_sync(0xffffffffu, out, 1);
        out += s[t ^ 1u]; /* line: read 3 */
        break;
    case 5:
    case 6: {
        const unsigned int half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
        s[t] = static_cast<int>(t);
        __syncwarp(half);
        out = s[p.mode == 5 ? t ^ 1u : t ^ 16u];
        break;
    }
    case 7:
    case 8:
        if (t == 0) s[n] = 0;
        __syncthreads();
        atomicAdd(&s[n], 1); /* line: atomic 8 */
        if (p.mode == 7) __syncthreads();
        if (t == 0) out = s[n]; /* line: read 8 */
        break;
    case 9:
    case 10:
        if (t == 0) s[0] = 7;
        __syncthreads();
        out = s[0]; /* line: read 9 */
        if (p.mode == 10) __syncthreads();
        if (t == 32) s[0] = 8; /* line: write 9 */
        break;
    case 11:
        if (t == 0 || t == 32) s[1] = static_cast<int>(t); /* line: write 11 */
        break;
    default:
        break;
    }
    p.out_a[t] = out;
}
VPPO_EXPORT_KERNEL(selftest_ordering, VppoSelftestParams)
