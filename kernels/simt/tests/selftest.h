/*
 * selftest.h: the one parameter struct of the SIMT executor's self-test kernels (kernels/simt/tests/).
 * Mirrored by hand in src/simt.rs (`selftest::SelftestParams`); every field is 8 or 4 bytes, no padding.
 * Which buffers a kernel reads and writes is said above each kernel.
 */
#ifndef VPPO_SIMT_SELFTEST_H
#define VPPO_SIMT_SELFTEST_H

#include <stdint.h>

typedef struct VppoSelftestParams {
    const int32_t *in_a;
    const int32_t *in_b;
    const uint32_t *in_mask;
    const float *in_f;
    const uint64_t *in_u64;
    int32_t *out_a;
    int32_t *out_b;
    uint32_t *out_u;
    float *out_f;
    uint64_t *out_u64;
    int32_t mode;  /* which variant of the kernel */
    int32_t width; /* shuffle width */
    int32_t n;     /* elements per block, where a kernel says so */
    int32_t pad0;
} VppoSelftestParams;

/* The thread's linear index in its block (x fastest), as the executor numbers lanes. */
#define SELFTEST_TID (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z))

#endif /* VPPO_SIMT_SELFTEST_H */
