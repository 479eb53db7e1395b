/*
 * errors.cu: planted bugs the executor must report (never hang, never abort the process).
 * Lines marked "MARK:<name>" are looked up by tests/simt_executor.rs to check the reported source line.
 */
#include "vppo_portable.cuh"

#include "simt/tests/selftest.h"

/* One planted misuse of a warp intrinsic per mode (block of 64 threads unless said):
 *   0: lane 5's mask omits lane 5            1: lane 0 gives mask 0xffff, the others 0xffffffff
 *   2: lane 3 exits, the others name it      3: block of 40: warp 1 (8 lanes) names 32 lanes
 *   4: a shuffle reads a lane outside the mask  5: width 12          6: width 64
 *   7: even lanes shuffle, odd lanes ballot with the same mask */
extern "C" __global__ void selftest_warp_error(const VppoSelftestParams p) {
    unsigned int t = SELFTEST_TID;
    unsigned int lane = t % 32;
    int v = static_cast<int>(t);
    int r = 0;
    switch (p.mode) {
    case 0:
        r = __shfl_sync(0xffffffffu & ~(1u << 5), v, 0); // MARK:no-self
        break;
    case 1:
        r = __shfl_sync(lane == 0 ? 0x0000ffffu : 0xffffffffu, v, 0); // MARK:disagree
        break;
    case 2:
        if (lane == 3) {
            return;
        }
        r = __shfl_sync(0xffffffffu, v, 0);
        break;
    case 3:
        r = __shfl_sync(0xffffffffu, v, 0); // MARK:outside-warp
        break;
    case 4:
        if (lane >= 16) {
            return;
        }
        r = __shfl_down_sync(0x0000ffffu, v, 4);
        break;
    case 5:
        r = __shfl_xor_sync(0xffffffffu, v, 1, 12);
        break;
    case 6:
        r = __shfl_xor_sync(0xffffffffu, v, 1, 64);
        break;
    default:
        if (lane % 2 == 0) {
            r = __shfl_sync(0xffffffffu, v, 0);
        } else {
            r = static_cast<int>(__ballot_sync(0xffffffffu, 1));
        }
        break;
    }
    p.out_a[t] = r;
}
VPPO_EXPORT_KERNEL(selftest_warp_error, VppoSelftestParams)

/* A __syncthreads reached at two call sites: threads below 40 at one, the rest at the other. */
extern "C" __global__ void selftest_divergent_barrier(const VppoSelftestParams p) {
    unsigned int t = SELFTEST_TID;
    if (t < 40) {
        __syncthreads(); // MARK:div-a
    } else {
        __syncthreads(); // MARK:div-b
    }
    p.out_a[t] = 1;
}
VPPO_EXPORT_KERNEL(selftest_divergent_barrier, VppoSelftestParams)

/* A deadlock: thread 0 waits at __syncthreads while lanes 1-31 of its warp wait for it at a shuffle;
 * threads of the other warps exit. */
extern "C" __global__ void selftest_deadlock(const VppoSelftestParams p) {
    unsigned int t = SELFTEST_TID;
    if (t >= 32) {
        return;
    }
    if (t == 0) {
        __syncthreads(); // MARK:dead-bar
    } else {
        p.out_a[t] = __shfl_sync(0xffffffffu, 1, 0); // MARK:dead-shfl
    }
}
VPPO_EXPORT_KERNEL(selftest_deadlock, VppoSelftestParams)

/* Exited threads count as arrived at __syncthreads: threads t >= n exit at once; the others write
 * in_a[t] to shared memory, pass two barriers and read their neighbour:
 *   out_a[t] = s[(t + 1) % n] for t < n. */
extern "C" __global__ void selftest_exit_barrier(const VppoSelftestParams p) {
    VPPO_DYNAMIC_SHARED(int, s);
    unsigned int t = SELFTEST_TID;
    unsigned int n = static_cast<unsigned int>(p.n);
    if (t >= n) {
        return;
    }
    s[t] = p.in_a[t];
    __syncthreads();
    int v = s[(t + 1) % n];
    __syncthreads();
    p.out_a[t] = v;
}
VPPO_EXPORT_KERNEL(selftest_exit_barrier, VppoSelftestParams)
