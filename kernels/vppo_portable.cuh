/*
 * vppo_portable.cuh: the one header every kernel file includes first.
 *
 * The same kernel source builds two ways:
 *   - with nvcc for the GPU (VPPO_SIMT not defined): the CUDA headers, and the two portability macros
 *     below defined for real CUDA;
 *   - as host C++ with -DVPPO_SIMT for the SIMT executor (kernels/simt/simt.h), which runs each block's
 *     threads as fibers on the CPU.
 *
 * Portability macros (both builds):
 *   VPPO_DYNAMIC_SHARED(T, name);     declares `T *name` pointing at the block's dynamic shared memory
 *                                     (16-byte aligned; size = the launch's shared bytes).
 *   VPPO_EXPORT_KERNEL(name, ParamsT) placed after `extern "C" __global__ void name(const ParamsT p)`;
 *                                     nothing under nvcc, the C entry `vppo_simt_<name>` under SIMT.
 * Static __shared__ arrays are not portable to the executor: use VPPO_DYNAMIC_SHARED.
 */
#ifndef VPPO_PORTABLE_CUH
#define VPPO_PORTABLE_CUH

#ifdef VPPO_SIMT

#include "simt/simt.h"

#else /* nvcc */

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define VPPO_DYNAMIC_SHARED(T, name)                                                                   \
    extern __shared__ __align__(16) unsigned char vppo_smem_[];                                        \
    T *name = reinterpret_cast<T *>(vppo_smem_)

#define VPPO_EXPORT_KERNEL(name, ParamsT)

#endif /* VPPO_SIMT */

#endif /* VPPO_PORTABLE_CUH */
