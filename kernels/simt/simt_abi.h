/*
 * simt_abi.h: the plain C description of one launch on the SIMT executor (see simt.h).
 *
 * The Rust mirror is `vppo::simt::SimtLaunch`; keep the two identical (all fields 4 bytes, no padding).
 */
#ifndef VPPO_SIMT_ABI_H
#define VPPO_SIMT_ABI_H

#include <stddef.h>
#include <stdint.h>

typedef struct VppoSimtLaunch {
    uint32_t grid_x, grid_y, grid_z;    /* blocks in the grid, each >= 1 */
    uint32_t block_x, block_y, block_z; /* threads in a block, each >= 1, product <= 1024 */
    uint32_t shared_bytes;              /* dynamic shared memory per block */
    int32_t reverse_lanes;              /* 0: threads run in forward order; 1: in reverse order */
} VppoSimtLaunch;

#endif /* VPPO_SIMT_ABI_H */
