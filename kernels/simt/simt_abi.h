/*
 * simt_abi.h: the plain C description of one launch on the SIMT executor (see simt.h), and the
 * executor's per-OS-thread test settings.
 *
 * The Rust mirrors are `vppo::simt::SimtLaunch` and `vppo::simt::TestMode`; keep them identical (all
 * fields 4 bytes, no padding). tests/fake_cuda/libcuda.c has its own copy of VppoSimtLaunch.
 */
#ifndef VPPO_SIMT_ABI_H
#define VPPO_SIMT_ABI_H

#include <stddef.h>
#include <stdint.h>

/* The order in which the executor runs a block's threads (VppoSimtLaunch.schedule). */
enum {
    VPPO_SIMT_FORWARD = 0,   /* thread 0 first; each runs until it blocks, then the next in order */
    VPPO_SIMT_REVERSE = 1,   /* the same, the last thread first */
    VPPO_SIMT_RUN_AHEAD = 2  /* one warp runs as far as it can before any other runs (simt.cpp) */
};

typedef struct VppoSimtLaunch {
    uint32_t grid_x, grid_y, grid_z;    /* blocks in the grid, each >= 1 */
    uint32_t block_x, block_y, block_z; /* threads in a block, each >= 1, product <= 1024 */
    uint32_t shared_bytes;              /* dynamic shared memory per block */
    int32_t schedule;                   /* VPPO_SIMT_FORWARD, _REVERSE or _RUN_AHEAD */
} VppoSimtLaunch;

/*
 * Test settings of the executor, per OS thread. A thread starts with the values of the environment
 * variables VPPO_SIMT_GRID_CAP and VPPO_SIMT_RACE_CHECK (unset: 0), so a child process can be put in a
 * mode as a whole (the fake CUDA driver's reruns); vppo_simt_set_test_mode changes them for the
 * calling thread.
 */
typedef struct VppoSimtTestMode {
    /* 0: launches run as given. n > 0: a grid of more than n blocks in x runs n blocks (gridDim.x = n),
     * so each block of a kernel that loops over the grid (all of the crate's) does the work of many. */
    uint32_t grid_cap;
    /* 1: each kernel runs its race-checked build (simt.h, "Race check"). */
    int32_t race_check;
} VppoSimtTestMode;

#ifdef __cplusplus
extern "C" {
#endif
/* Sets the calling thread's test mode (when `mode` is not NULL) and returns the previous one in
 * `previous` (when not NULL). Returns 0, or 1 when the mode is invalid (race_check not 0 or 1). */
int vppo_simt_set_test_mode(const VppoSimtTestMode *mode, VppoSimtTestMode *previous);
#ifdef __cplusplus
}
#endif

#endif /* VPPO_SIMT_ABI_H */
