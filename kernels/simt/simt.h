/*
 * simt.h: the CUDA surface the kernels use, as host C++17, for the SIMT executor (simt.cpp).
 *
 * Included through kernels/vppo_portable.cuh when VPPO_SIMT is defined. Each block's threads run as
 * fibers on the calling OS thread; blocks run one after another. Warp lanes are threads 32w .. 32w+31
 * in linear thread order (x fastest). Every synchronizing call (__syncthreads, __syncwarp, the
 * shuffles, the votes, __activemask) is a scheduling point; everything else runs without interruption,
 * so the atomics are plain read-modify-writes.
 *
 * What is checked (an error stops the launch and names the kernel, block, thread and source line):
 * a warp mask without the calling lane, naming an exited lane or a lane outside the warp, masks that
 * disagree, a shuffle reading a lane outside the mask, a width that is not a power of two in [1, 32],
 * lanes meeting at different warp operations, __syncthreads reached at different call sites, and a
 * deadlock (no thread can run while some have not exited).
 *
 * Schedules (VppoSimtLaunch.schedule): forward and reverse lane order run each thread until it blocks,
 * then the next one in order; run-ahead lets one warp run as far as it can (to a __syncthreads, or a wait
 * on a lane of another warp) before any other warp runs, the leading warp changing at every barrier.
 * Code that is right only by luck of scheduling fails in some of them.
 *
 * Test settings (simt_abi.h, VppoSimtTestMode, per OS thread): a grid cap, so that each block of a
 * grid-stride kernel handles many rows and reuses its shared memory; and the race check.
 *
 * Race check: each kernel is also compiled with -fsanitize=thread instrumentation (build/simt.rs: every
 * memory access calls __tsan_read4(addr) and the like), against no sanitizer runtime: the executor
 * defines those hooks itself (simt.cpp). With VppoSimtTestMode.race_check set, a launch runs that
 * build, and the hooks keep, for every byte of the block's shared memory, its last write and the reads
 * since, each with the thread and its position in happens-before: __syncthreads orders everything
 * before it with everything after; a warp operation (shuffle, vote, __syncwarp) orders what the lanes of
 * its mask did before it with what they do after (vector clocks over the lanes of a warp); two atomics
 * never conflict. Two accesses of different threads to one byte, at least one a write, with no such
 * order between them, stop the launch with a report naming the kernel, the block, the byte, both
 * threads and both source lines (addr2line over the instrumented code's line tables), as
 * compute-sanitizer's racecheck would. Every schedule is checked, not only the one that ran: the order
 * is that of the synchronization, not of the interleaving. Global memory is not checked (blocks run one
 * after another, and the kernels' threads write disjoint global elements); a plain access is checked
 * against the last atomic of each byte only.
 *
 * Limits: each thread has a 64 KiB stack (a guard page below it: overflowing it faults); threads are not
 * preempted, so a spin loop waiting for another thread's write without a synchronizing call in it never
 * ends (write such code with __syncthreads or warp collectives); a launch from inside a kernel is an
 * error; at most 227 KiB of dynamic shared memory per block, as on sm_90.
 */
#ifndef VPPO_SIMT_H
#define VPPO_SIMT_H

#ifndef __cplusplus
#error "simt.h is C++: compile the kernels with -x c++ -DVPPO_SIMT"
#endif

/* Every standard header first: the CUDA keywords below are macros and must not reach them. */
#include <atomic>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <math.h>
#include <stdint.h>
#include <type_traits>

#include "simt_abi.h"

/* ---------------------------------------------------------------------------------------------- */
/* Keywords                                                                                        */
/* ---------------------------------------------------------------------------------------------- */

#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
/* __restrict__ is a g++ keyword already. */

/* Static shared arrays have no home in the executor: every block's shared memory is the dynamic
 * buffer, poisoned at each block's start. */
#define __shared__                                                                                     \
    static_assert(false, "__shared__ is not supported by the SIMT executor: "                         \
                         "use VPPO_DYNAMIC_SHARED(T, name) (kernels/vppo_portable.cuh)");             \
    static

/* ---------------------------------------------------------------------------------------------- */
/* Built-in types                                                                                  */
/* ---------------------------------------------------------------------------------------------- */

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

static inline int2 make_int2(int x, int y) { return int2{x, y}; }
static inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
static inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
static inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
    return uint4{x, y, z, w};
}
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }

static constexpr int warpSize = 32;

/* ---------------------------------------------------------------------------------------------- */
/* The executor's per-OS-thread state (defined in simt.cpp)                                        */
/* ---------------------------------------------------------------------------------------------- */

namespace vppo_simt {
namespace detail {

/* The running fiber's thread index and the running block's coordinates. Fibers of one block share the
 * OS thread, so thread-local storage is the block's storage; t_thread_idx is switched with the fiber. */
extern __thread uint3 t_thread_idx;
extern __thread uint3 t_block_idx;
extern __thread uint3 t_block_dim;
extern __thread uint3 t_grid_dim;
extern __thread unsigned char *t_shared;

enum WarpOpKind : int {
    OP_SHFL_IDX = 0,
    OP_SHFL_UP = 1,
    OP_SHFL_DOWN = 2,
    OP_SHFL_XOR = 3,
    OP_BALLOT = 4,
    OP_ANY = 5,
    OP_ALL = 6,
    OP_SYNCWARP = 7,
};

/* A warp collective: returns the shuffled value (shuffles), the ballot / predicate (votes), or 0.
 * On an error it does not return to the caller: the launch stops. */
uint64_t warp_op(int op, unsigned int mask, uint64_t value, int size, int b, int width, const char *file,
                 int line);
unsigned int activemask(const char *file, int line);
void syncthreads(const char *file, int line);
/* A global access of `align` bytes at p that is not `align`-aligned: on a GPU a misaligned address
 * fault. Stops the launch with a message naming the thread, the address and the source line. */
[[noreturn]] void misaligned(const void *p, size_t align, const char *file, int line);

/* Runs `body(params)` for every thread of every block; 0, or non-zero with a message in err. With
 * race_check, the body is the instrumented build's and its shared-memory accesses are checked. */
int run_launch(const char *kernel, const VppoSimtLaunch *launch, void (*body)(const void *),
               const void *params, char *err, size_t err_len, bool race_check);

/* The entry point of a kernel's race-checked build (NULL: there is none). */
typedef int (*RaceCheckedEntry)(const VppoSimtLaunch *, const void *, char *, size_t);

/* True when the calling thread's test mode asks for the race check. */
bool race_check_requested();

/* Runs the race-checked build of `kernel` (or reports that there is none). */
int run_race_checked(const char *kernel, RaceCheckedEntry entry, const VppoSimtLaunch *launch,
                     const void *params, char *err, size_t err_len);

/* Brackets an atomic read-modify-write of `bytes` at `addr` in the race-checked build: the access is
 * recorded as atomic, and the plain loads and stores that implement it are not recorded. */
void atomic_begin(const void *addr, size_t bytes);
void atomic_end();

template <class T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp value must fit 64 bits");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return bits;
}
template <class T> inline T from_bits(uint64_t bits) {
    T v;
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}

} // namespace detail
} // namespace vppo_simt

#define threadIdx (static_cast<const uint3 &>(::vppo_simt::detail::t_thread_idx))
#define blockIdx (static_cast<const uint3 &>(::vppo_simt::detail::t_block_idx))
#define blockDim (static_cast<const dim3>(::vppo_simt::detail::t_block_dim))
#define gridDim (static_cast<const dim3>(::vppo_simt::detail::t_grid_dim))

#define VPPO_DYNAMIC_SHARED(T, name) T *name = reinterpret_cast<T *>(::vppo_simt::detail::t_shared)

/* Two levels, so that a kernel name that is itself a macro (the renamed mutant and race-check builds,
 * build/simt.rs) is expanded before it is pasted into the entry's name.
 *
 * The race-check build (VPPO_SIMT_RACECHECK, every kernel name `k` defined as `k_racecheck`) defines
 * vppo_simt_k_racecheck; the plain build's vppo_simt_k runs it when the calling thread's test mode asks
 * for the race check (a plain reference, so the twin is linked wherever the kernel is). */
#define VPPO_EXPORT_KERNEL(name, ParamsT) VPPO_EXPORT_KERNEL_(name, ParamsT)
#ifdef VPPO_SIMT_RACECHECK
#define VPPO_EXPORT_KERNEL_(name, ParamsT)                                                             \
    extern "C" int vppo_simt_##name(const VppoSimtLaunch *launch, const void *params, char *err,       \
                                    size_t err_len) {                                                  \
        return ::vppo_simt::detail::run_launch(                                                        \
            #name, launch, [](const void *vppo_p) { name(*static_cast<const ParamsT *>(vppo_p)); },    \
            params, err, err_len, true);                                                               \
    }
#else
#ifdef VPPO_SIMT_NO_RACECHECK /* a build without a race-checked twin (the exp x 1.001 mutant) */
#define VPPO_SIMT_RACECHECK_ENTRY(name) nullptr
#else
#define VPPO_SIMT_RACECHECK_ENTRY(name) vppo_simt_##name##_racecheck
#endif
#define VPPO_EXPORT_KERNEL_(name, ParamsT)                                                             \
    extern "C" int vppo_simt_##name##_racecheck(const VppoSimtLaunch *, const void *, char *, size_t); \
    extern "C" int vppo_simt_##name(const VppoSimtLaunch *launch, const void *params, char *err,       \
                                    size_t err_len) {                                                  \
        if (::vppo_simt::detail::race_check_requested()) {                                             \
            return ::vppo_simt::detail::run_race_checked(#name, VPPO_SIMT_RACECHECK_ENTRY(name),       \
                                                         launch, params, err, err_len);                \
        }                                                                                              \
        return ::vppo_simt::detail::run_launch(                                                        \
            #name, launch, [](const void *vppo_p) { name(*static_cast<const ParamsT *>(vppo_p)); },    \
            params, err, err_len, false);                                                              \
    }
#endif

/* ---------------------------------------------------------------------------------------------- */
/* __nv_bfloat16 and __half: 2-byte raw bits, round-to-nearest-even conversions                    */
/* ---------------------------------------------------------------------------------------------- */

namespace vppo_simt {
namespace detail {

inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_bf16_rne(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return static_cast<uint16_t>((u >> 16) | 0x0040u); /* NaN stays NaN (quiet), sign kept */
    }
    /* Add half an ulp of bf16, plus one when the kept part is odd: ties go to even. Overflow carries
     * into the exponent and gives inf, as it should. */
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_f16_rne(float f) {
    uint32_t u = f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu)); /* quiet NaN */
    }
    if (a == 0x7f800000u) {
        return static_cast<uint16_t>(sign | 0x7c00u);
    }
    int e = static_cast<int>(a >> 23) - 127;
    if (e > 15) {
        return static_cast<uint16_t>(sign | 0x7c00u); /* >= 2^16: beyond the largest finite half */
    }
    if (e >= -14) { /* a normal half */
        uint32_t mant = a & 0x7fffffu;
        uint32_t h = (static_cast<uint32_t>(e + 15) << 10) | (mant >> 13);
        uint32_t rem = mant & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) {
            h += 1; /* may carry into the exponent, up to inf: right for RNE */
        }
        return static_cast<uint16_t>(sign | h);
    }
    if (e < -25) {
        return static_cast<uint16_t>(sign); /* below half the smallest subnormal (2^-25): zero */
    }
    /* A half subnormal: the value in units of 2^-24 is mant * 2^(e + 1), shift = -(e + 1) in [14, 24]. */
    uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    int shift = -(e + 1);
    uint32_t h = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u))) {
        h += 1; /* may become 0x400, the smallest normal: right */
    }
    return static_cast<uint16_t>(sign | h);
}

inline float f16_to_f32(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0) {
        float mag = std::ldexp(static_cast<float>(mant), -24); /* exact */
        return sign ? -mag : mag;
    }
    if (exp == 31) {
        return bits_f32(sign | 0x7f800000u | (mant << 13));
    }
    return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

} // namespace detail
} // namespace vppo_simt

struct __nv_bfloat16 {
    unsigned short x; /* raw bits */
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : x(::vppo_simt::detail::f32_to_bf16_rne(f)) {}
    operator float() const { return ::vppo_simt::detail::bf16_to_f32(x); }
};

struct __half {
    unsigned short x; /* raw bits */
    __half() = default;
    __half(float f) : x(::vppo_simt::detail::f32_to_f16_rne(f)) {}
    operator float() const { return ::vppo_simt::detail::f16_to_f32(x); }
};

static_assert(sizeof(__nv_bfloat16) == 2 && sizeof(__half) == 2, "16-bit float types must be 2 bytes");
static_assert(std::is_trivial<__nv_bfloat16>::value && std::is_trivial<__half>::value, "raw bit types");

static inline float __bfloat162float(__nv_bfloat16 h) { return ::vppo_simt::detail::bf16_to_f32(h.x); }
static inline __nv_bfloat16 __float2bfloat16(float f) {
    __nv_bfloat16 h;
    h.x = ::vppo_simt::detail::f32_to_bf16_rne(f);
    return h;
}
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    __nv_bfloat16 h;
    h.x = u;
    return h;
}
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }

static inline float __half2float(__half h) { return ::vppo_simt::detail::f16_to_f32(h.x); }
static inline __half __float2half(float f) {
    __half h;
    h.x = ::vppo_simt::detail::f32_to_f16_rne(f);
    return h;
}
static inline __half __float2half_rn(float f) { return __float2half(f); }
static inline __half __ushort_as_half(unsigned short u) {
    __half h;
    h.x = u;
    return h;
}
static inline unsigned short __half_as_ushort(__half h) { return h.x; }

/* ---------------------------------------------------------------------------------------------- */
/* Synchronization and warp intrinsics                                                             */
/* ---------------------------------------------------------------------------------------------- */

namespace vppo_simt {
namespace detail {

/* Carries the call site into the intrinsic, so diagnostics can name the source line. */
struct CallSite {
    const char *file;
    int line;

#define VPPO_SIMT_SHFL_OVERLOADS(T)                                                                    \
    T shfl(unsigned int mask, T var, int src_lane, int width = warpSize) const {                       \
        return from_bits<T>(warp_op(OP_SHFL_IDX, mask, to_bits(var), sizeof(T), src_lane, width, file, \
                                    line));                                                            \
    }                                                                                                  \
    T shfl_up(unsigned int mask, T var, unsigned int delta, int width = warpSize) const {              \
        return from_bits<T>(warp_op(OP_SHFL_UP, mask, to_bits(var), sizeof(T), static_cast<int>(delta), \
                                    width, file, line));                                               \
    }                                                                                                  \
    T shfl_down(unsigned int mask, T var, unsigned int delta, int width = warpSize) const {            \
        return from_bits<T>(warp_op(OP_SHFL_DOWN, mask, to_bits(var), sizeof(T),                       \
                                    static_cast<int>(delta), width, file, line));                      \
    }                                                                                                  \
    T shfl_xor(unsigned int mask, T var, int lane_mask, int width = warpSize) const {                  \
        return from_bits<T>(warp_op(OP_SHFL_XOR, mask, to_bits(var), sizeof(T), lane_mask, width, file, \
                                    line));                                                            \
    }

    VPPO_SIMT_SHFL_OVERLOADS(int)
    VPPO_SIMT_SHFL_OVERLOADS(unsigned int)
    VPPO_SIMT_SHFL_OVERLOADS(long)
    VPPO_SIMT_SHFL_OVERLOADS(unsigned long)
    VPPO_SIMT_SHFL_OVERLOADS(long long)
    VPPO_SIMT_SHFL_OVERLOADS(unsigned long long)
    VPPO_SIMT_SHFL_OVERLOADS(float)
    VPPO_SIMT_SHFL_OVERLOADS(double)
    VPPO_SIMT_SHFL_OVERLOADS(__half)
    VPPO_SIMT_SHFL_OVERLOADS(__nv_bfloat16)
#undef VPPO_SIMT_SHFL_OVERLOADS

    unsigned int ballot(unsigned int mask, int pred) const {
        return static_cast<unsigned int>(warp_op(OP_BALLOT, mask, pred != 0, 4, 0, warpSize, file, line));
    }
    int any(unsigned int mask, int pred) const {
        return static_cast<int>(warp_op(OP_ANY, mask, pred != 0, 4, 0, warpSize, file, line));
    }
    int all(unsigned int mask, int pred) const {
        return static_cast<int>(warp_op(OP_ALL, mask, pred != 0, 4, 0, warpSize, file, line));
    }
    void syncwarp(unsigned int mask = 0xffffffffu) const {
        (void)warp_op(OP_SYNCWARP, mask, 0, 4, 0, warpSize, file, line);
    }
};

} // namespace detail
} // namespace vppo_simt

#define VPPO_SIMT_AT (::vppo_simt::detail::CallSite{__FILE__, __LINE__})
#define __syncthreads() ::vppo_simt::detail::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) VPPO_SIMT_AT.syncwarp(__VA_ARGS__)
#define __shfl_sync(...) VPPO_SIMT_AT.shfl(__VA_ARGS__)
#define __shfl_up_sync(...) VPPO_SIMT_AT.shfl_up(__VA_ARGS__)
#define __shfl_down_sync(...) VPPO_SIMT_AT.shfl_down(__VA_ARGS__)
#define __shfl_xor_sync(...) VPPO_SIMT_AT.shfl_xor(__VA_ARGS__)
#define __ballot_sync(...) VPPO_SIMT_AT.ballot(__VA_ARGS__)
#define __any_sync(...) VPPO_SIMT_AT.any(__VA_ARGS__)
#define __all_sync(...) VPPO_SIMT_AT.all(__VA_ARGS__)
#define __activemask() ::vppo_simt::detail::activemask(__FILE__, __LINE__)

/* Blocks run one after another on one OS thread, so memory is coherent; this only stops the compiler
 * from moving memory accesses across the fence. */
static inline void __threadfence() { std::atomic_signal_fence(std::memory_order_seq_cst); }
static inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }

/* ---------------------------------------------------------------------------------------------- */
/* Bit manipulation and reinterpretation                                                           */
/* ---------------------------------------------------------------------------------------------- */

static inline int __popc(unsigned int x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
static inline int __clzll(long long x) {
    return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
static inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
static inline unsigned long long __brevll(unsigned long long x) {
    return (static_cast<unsigned long long>(__brev(static_cast<unsigned int>(x))) << 32) |
           __brev(static_cast<unsigned int>(x >> 32));
}

static inline int __float_as_int(float f) {
    return static_cast<int>(::vppo_simt::detail::f32_bits(f));
}
static inline unsigned int __float_as_uint(float f) { return ::vppo_simt::detail::f32_bits(f); }
static inline float __int_as_float(int i) {
    return ::vppo_simt::detail::bits_f32(static_cast<uint32_t>(i));
}
static inline float __uint_as_float(unsigned int u) { return ::vppo_simt::detail::bits_f32(u); }
static inline long long __double_as_longlong(double d) {
    long long r;
    std::memcpy(&r, &d, 8);
    return r;
}
static inline double __longlong_as_double(long long i) {
    double r;
    std::memcpy(&r, &i, 8);
    return r;
}

/* The cache-hinted loads and stores: plain accesses on the host, but, as on a GPU, the address must
 * be aligned to the access's size (a 16-byte load from a row whose phase differs faults on a GPU; on
 * x86 it would silently work, so the executor checks it). */
namespace vppo_simt {
namespace detail {
template <class T> static inline const T *aligned(const T *p, const char *file, int line) {
    if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) misaligned(p, alignof(T), file, line);
    return p;
}
template <class T> static inline T ldg(const T *p, const char *file, int line) { return *aligned(p, file, line); }
template <class T> static inline void stcs(T *p, T v, const char *file, int line) {
    *const_cast<T *>(aligned(p, file, line)) = v;
}
} // namespace detail
} // namespace vppo_simt
/* Read-only cached load (ld.global.nc). */
#define __ldg(p) ::vppo_simt::detail::ldg((p), __FILE__, __LINE__)
/* Streaming store (st.global.cs). */
#define __stcs(p, v) ::vppo_simt::detail::stcs((p), (v), __FILE__, __LINE__)
/* Streaming load (ld.global.cs, evict-first). */
#define __ldcs(p) ::vppo_simt::detail::ldg((p), __FILE__, __LINE__)

/* ---------------------------------------------------------------------------------------------- */
/* Atomics: plain read-modify-write (threads never interleave between scheduling points)           */
/* ---------------------------------------------------------------------------------------------- */

#ifdef VPPO_SIMT_RACECHECK
namespace vppo_simt {
namespace detail {
struct AtomicScope {
    AtomicScope(const void *addr, size_t bytes) { atomic_begin(addr, bytes); }
    ~AtomicScope() { atomic_end(); }
    AtomicScope(const AtomicScope &) = delete;
    AtomicScope &operator=(const AtomicScope &) = delete;
};
} // namespace detail
} // namespace vppo_simt
#define VPPO_SIMT_ATOMIC(a) const ::vppo_simt::detail::AtomicScope vppo_atomic_scope_(a, sizeof *(a))
#else
#define VPPO_SIMT_ATOMIC(a) (void)0
#endif

static inline int atomicAdd(int *a, int v) {
    VPPO_SIMT_ATOMIC(a);
    int old = *a;
    *a = static_cast<int>(static_cast<unsigned int>(old) + static_cast<unsigned int>(v)); /* wraps */
    return old;
}
static inline unsigned int atomicAdd(unsigned int *a, unsigned int v) {
    VPPO_SIMT_ATOMIC(a);
    unsigned int old = *a;
    *a = old + v;
    return old;
}
static inline unsigned long long atomicAdd(unsigned long long *a, unsigned long long v) {
    VPPO_SIMT_ATOMIC(a);
    unsigned long long old = *a;
    *a = old + v;
    return old;
}
static inline float atomicAdd(float *a, float v) {
    VPPO_SIMT_ATOMIC(a);
    float old = *a;
    *a = old + v;
    return old;
}
static inline double atomicAdd(double *a, double v) {
    VPPO_SIMT_ATOMIC(a);
    double old = *a;
    *a = old + v;
    return old;
}

#define VPPO_SIMT_ATOMIC_MINMAX(T)                                                                     \
    static inline T atomicMin(T *a, T v) {                                                             \
        VPPO_SIMT_ATOMIC(a);                                                                           \
        T old = *a;                                                                                    \
        *a = v < old ? v : old;                                                                        \
        return old;                                                                                    \
    }                                                                                                  \
    static inline T atomicMax(T *a, T v) {                                                             \
        VPPO_SIMT_ATOMIC(a);                                                                           \
        T old = *a;                                                                                    \
        *a = v > old ? v : old;                                                                        \
        return old;                                                                                    \
    }
VPPO_SIMT_ATOMIC_MINMAX(int)
VPPO_SIMT_ATOMIC_MINMAX(unsigned int)
VPPO_SIMT_ATOMIC_MINMAX(long long)
VPPO_SIMT_ATOMIC_MINMAX(unsigned long long)
#undef VPPO_SIMT_ATOMIC_MINMAX

#define VPPO_SIMT_ATOMIC_BITS(T)                                                                       \
    static inline T atomicCAS(T *a, T compare, T v) {                                                  \
        VPPO_SIMT_ATOMIC(a);                                                                           \
        T old = *a;                                                                                    \
        if (old == compare) {                                                                          \
            *a = v;                                                                                    \
        }                                                                                              \
        return old;                                                                                    \
    }                                                                                                  \
    static inline T atomicExch(T *a, T v) {                                                            \
        VPPO_SIMT_ATOMIC(a);                                                                           \
        T old = *a;                                                                                    \
        *a = v;                                                                                        \
        return old;                                                                                    \
    }                                                                                                  \
    static inline T atomicOr(T *a, T v) {                                                              \
        VPPO_SIMT_ATOMIC(a);                                                                           \
        T old = *a;                                                                                    \
        *a = old | v;                                                                                  \
        return old;                                                                                    \
    }                                                                                                  \
    static inline T atomicAnd(T *a, T v) {                                                             \
        VPPO_SIMT_ATOMIC(a);                                                                           \
        T old = *a;                                                                                    \
        *a = old & v;                                                                                  \
        return old;                                                                                    \
    }
VPPO_SIMT_ATOMIC_BITS(int)
VPPO_SIMT_ATOMIC_BITS(unsigned int)
VPPO_SIMT_ATOMIC_BITS(unsigned long long)
#undef VPPO_SIMT_ATOMIC_BITS

static inline float atomicExch(float *a, float v) {
    VPPO_SIMT_ATOMIC(a);
    float old = *a;
    *a = v;
    return old;
}

/* ---------------------------------------------------------------------------------------------- */
/* Math: CUDA's min/max overloads and the device-only float functions                              */
/* ---------------------------------------------------------------------------------------------- */

#define VPPO_SIMT_MINMAX(R, A, B)                                                                      \
    static inline R min(A a, B b) { return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); } \
    static inline R max(A a, B b) { return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); }
VPPO_SIMT_MINMAX(int, int, int)
VPPO_SIMT_MINMAX(unsigned int, unsigned int, unsigned int)
VPPO_SIMT_MINMAX(unsigned int, int, unsigned int)
VPPO_SIMT_MINMAX(unsigned int, unsigned int, int)
VPPO_SIMT_MINMAX(long, long, long)
VPPO_SIMT_MINMAX(unsigned long, unsigned long, unsigned long)
VPPO_SIMT_MINMAX(unsigned long, long, unsigned long)
VPPO_SIMT_MINMAX(unsigned long, unsigned long, long)
VPPO_SIMT_MINMAX(long long, long long, long long)
VPPO_SIMT_MINMAX(unsigned long long, unsigned long long, unsigned long long)
VPPO_SIMT_MINMAX(unsigned long long, long long, unsigned long long)
VPPO_SIMT_MINMAX(unsigned long long, unsigned long long, long long)
VPPO_SIMT_MINMAX(double, double, double)
VPPO_SIMT_MINMAX(double, float, double)
VPPO_SIMT_MINMAX(double, double, float)
#undef VPPO_SIMT_MINMAX
/* float min/max follow fminf/fmaxf (a NaN operand gives the other one), as CUDA's do. */
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }

using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
/* __expf, __logf, __log2f: glibc's <math.h> declares them already (the exact functions). */
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
static inline float __int2float_rn(int i) { return static_cast<float>(i); }
static inline double __ll2double_rn(long long i) { return static_cast<double>(i); }

#endif /* VPPO_SIMT_H */
