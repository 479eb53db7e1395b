/*
 * A CUDA driver library (libcuda.so) that runs kernels on the crate's SIMT executor.
 *
 * Why: the host side of the GPU backend (src/cuda/, the CUDA branches of src/kernels.rs, the
 * device-resident API, the benchmarks' timing) talks to the driver through cudarc. Without a GPU that
 * code would never run in CI. This library implements the part of the driver API that cudarc calls
 * for the crate, synchronously and on the host, and checks what a real driver checks (a current
 * context for every call, live handles, copies inside live allocations, the dynamic shared memory
 * opt-in), so the CUDA code paths run end to end against the same kernels.
 *
 * How it is used (tests/common/fake_cuda.rs): the test compiles this file with the C compiler into a
 * shared object whose SONAME is "libcuda.so", dlopens it by path before cudarc loads the driver, and
 * calls vppo_fake_cuda_install with a function that maps a kernel name to its SIMT entry point
 * (`vppo::kernels::simt_entry`). cudarc then dlopens "libcuda.so", which the dynamic loader resolves to
 * the object already loaded under that SONAME.
 *
 * Memory: device memory is host memory, filled with 0xFF bytes at allocation (NaN for floats) so that
 * code reading memory it never wrote shows up in results. Every allocation has its own mapping with an
 * inaccessible guard page right after its end (or, with VPPO_FAKE_CUDA_GUARD=start, right before its
 * start), and a freed allocation is unmapped, so a kernel that reads or writes outside its buffers, or
 * uses a freed one, faults; the fault report names the kernel. Host-side copies and memsets are
 * range-checked against the live allocations, and so is every pointer in a launch's parameters.
 *
 * Streams: every stream, the default one too, queues its work and runs it only when something waits
 * for it (a synchronize, a copy back to pageable host memory, an event waited for), and streams are
 * ordered with each other only by events. So work not ordered after another stream's reads memory that
 * is not written yet, and results read without waiting for them are not there. Events record host
 * time when they run.
 *
 * Devices: one, or VPPO_FAKE_CUDA_DEVICES=n of them (at most FAKE_MAX_DEVICES, for ranks as threads of
 * one process: tests/fake_nccl/), each with its primary context and default stream. Streams and
 * allocations belong to the device whose context was current when they were made; a stream used with
 * another device's context current is an invalid handle, as on a GPU.
 *
 * What it is not: a GPU. Kernels run on the SIMT executor with its lane order, one at a time, under the
 * executor's test settings of the draining thread: VPPO_SIMT_GRID_CAP=n in the environment caps every
 * grid at n blocks (the crate's kernels loop over the grid), VPPO_SIMT_RACE_CHECK=1 runs the race check
 * (kernels/simt/simt.h).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

/* The launch descriptor of kernels/simt/simt_abi.h (all fields 4 bytes). */
typedef struct {
    uint32_t grid_x, grid_y, grid_z;
    uint32_t block_x, block_y, block_z;
    uint32_t shared_bytes;
    int32_t schedule; /* 0 forward lanes, 1 reverse, 2 run-ahead */
} SimtLaunch;

typedef int (*SimtEntry)(const SimtLaunch *launch, const void *params, char *err, size_t err_len);
typedef SimtEntry (*Resolver)(const char *kernel_name);
/* The params struct of `kernel_name`: its size, and the byte offsets of its pointer fields (returns
 * their count). */
typedef size_t (*PointerFields)(const char *kernel_name, const size_t **offsets, size_t *params_bytes);

/* The device this library pretends to be: an H100 SXM's limits. */
#define FAKE_SMS 132
#define FAKE_SHARED_OPTIN (227 * 1024)
#define FAKE_SHARED_DEFAULT (48 * 1024)
#define FAKE_TOTAL_MEM (80ull << 30)
#define FAKE_MAX_DEVICES 8
#define FATBIN_MAGIC 0xBA55ED50u

#define HANDLE_MAGIC_STREAM 0x5354524du
#define HANDLE_MAGIC_EVENT 0x4556454eu
#define HANDLE_MAGIC_MODULE 0x4d4f4455u
#define HANDLE_MAGIC_FUNCTION 0x46554e43u
#define HANDLE_MAGIC_DEAD 0xdeaddeadu

typedef struct FakeCtx {
    int refcount;
} FakeCtx; /* the primary context of device (this - g_primary) */
struct Op;
typedef struct FakeStream {
    uint32_t magic;
    struct Op *ops; /* queued work, run from `head` when something waits for this stream */
    size_t head, count, cap;
    uint64_t enqueued; /* operations ever queued: the last one's position */
    uint64_t executed; /* operations ever run: positions 1 ..= executed are done */
    int draining;
    int device; /* whose context was current at its creation */
} FakeStream;
typedef struct FakeEvent {
    uint32_t magic;
    unsigned flags;
    FakeStream *stream; /* where it was last recorded (NULL: never recorded) */
    uint64_t pos;       /* that record's position in the stream */
    double ms;          /* host time when that record ran */
} FakeEvent;
struct FakeFunction;
/* One queued operation of a stream. */
enum OpKind { OP_KERNEL, OP_HTOD, OP_DTOD, OP_MEMSET, OP_FREE, OP_RECORD, OP_WAIT };
typedef struct Op {
    enum OpKind kind;
    struct FakeFunction *f;
    SimtLaunch dims;
    unsigned char *bytes; /* kernel parameters, or the staged host data of a copy */
    CUdeviceptr dst, src;
    size_t n;
    unsigned char value;
    FakeEvent *event;      /* OP_RECORD */
    FakeStream *on;        /* OP_WAIT: the stream waited for ... */
    uint64_t pos;          /* ... up to this position; OP_RECORD: its own position */
} Op;
typedef struct FakeModule {
    uint32_t magic;
    unsigned char *image; /* a copy of the fatbin (the caller may free its own after loading) */
    size_t image_bytes;
} FakeModule;
typedef struct FakeFunction {
    uint32_t magic;
    SimtEntry entry;
    const size_t *pointer_offsets;
    size_t pointer_count;
    size_t params_bytes;
    int max_dynamic_shared;
    char name[128];
} FakeFunction;

/* Statistics for the tests (mirrored by tests/common/fake_cuda.rs `Stats`). */
typedef struct VppoFakeCudaStats {
    uint64_t launches;
    uint64_t htod_copies;
    uint64_t dtoh_copies;
    uint64_t htod_bytes;
    uint64_t dtoh_bytes;
    uint64_t dtod_bytes;
    uint64_t memset_bytes;
    uint64_t allocs;
    uint64_t live_allocs;
    uint64_t live_bytes;
    uint64_t alloc_bytes; /* bytes of every allocation, never decreased */
} VppoFakeCudaStats;

typedef struct {
    uintptr_t base; /* the address handed out */
    size_t size;    /* bytes asked for */
    void *map;      /* the mapping holding it and its guard page */
    size_t map_bytes;
    int device; /* whose context was current at the allocation */
} Alloc;

/* Where the guard page of each allocation goes (VPPO_FAKE_CUDA_GUARD): right after its last byte,
 * up to 16 bytes of alignment slack ("end", the default: an access past the end faults), or right
 * before its first byte ("start": an access before the start faults). */
enum { GUARD_END, GUARD_START };
static int g_guard = GUARD_END;
static size_t g_page;
static const char *volatile g_running_kernel; /* for the fault report */
static void install_fault_report(void);

/* One lock for everything: the "device" executes one call at a time, in the order they are made,
 * which is the order a single stream gives. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_err_lock = PTHREAD_MUTEX_INITIALIZER; /* g_last_error only */
static Resolver g_resolve;
static PointerFields g_pointer_fields;
static int g_schedule;
static int g_initialised;
static FakeCtx g_primary[FAKE_MAX_DEVICES];
static int g_ndevices = 1; /* VPPO_FAKE_CUDA_DEVICES */
static FakeStream g_defaults[FAKE_MAX_DEVICES]; /* each device's default stream (set up by cuInit) */
static Alloc *g_allocs;
static size_t g_nallocs, g_cap_allocs;
static VppoFakeCudaStats g_stats;
static CUresult g_sticky; /* the first error of queued work, reported by the next synchronizing call */
static FakeStream **g_streams; /* every created stream (destroyed ones stay, marked dead) */
static size_t g_nstreams, g_cap_streams;
static char g_last_error[2048];
static __thread FakeCtx *t_current;

#define LOCKED(expr)                  \
    do {                              \
        pthread_mutex_lock(&g_lock);  \
        CUresult rc_ = (expr);        \
        pthread_mutex_unlock(&g_lock); \
        return rc_;                   \
    } while (0)

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

/* Records (for vppo_fake_cuda_last_error) and prints why a call failed. */
__attribute__((format(printf, 1, 2))) static void fail(const char *fmt, ...) {
    pthread_mutex_lock(&g_err_lock);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_last_error, sizeof g_last_error, fmt, ap);
    va_end(ap);
    fprintf(stderr, "fake libcuda: %s\n", g_last_error);
    pthread_mutex_unlock(&g_err_lock);
}

/* ------------------------------------------------------------------------------------------------
 * Entry points for the tests
 * ---------------------------------------------------------------------------------------------- */

int vppo_fake_cuda_install(Resolver resolve, PointerFields pointer_fields, int schedule) {
    pthread_mutex_lock(&g_lock);
    g_resolve = resolve;
    g_pointer_fields = pointer_fields;
    const char *guard = getenv("VPPO_FAKE_CUDA_GUARD");
    g_guard = guard && strcmp(guard, "start") == 0 ? GUARD_START : GUARD_END;
    const char *devices = getenv("VPPO_FAKE_CUDA_DEVICES");
    int rc = 0;
    if (devices && *devices) {
        char *end;
        long n = strtol(devices, &end, 10);
        if (*end || n < 1 || n > FAKE_MAX_DEVICES) {
            fail("VPPO_FAKE_CUDA_DEVICES=%s: expected a count of devices in 1..=%d", devices, FAKE_MAX_DEVICES);
            rc = -1;
        } else {
            g_ndevices = (int)n;
        }
    }
    install_fault_report();
    g_schedule = schedule;
    pthread_mutex_unlock(&g_lock);
    return rc;
}


void vppo_fake_cuda_stats(VppoFakeCudaStats *out) {
    pthread_mutex_lock(&g_lock);
    *out = g_stats;
    pthread_mutex_unlock(&g_lock);
}

void vppo_fake_cuda_last_error(char *out, size_t len) {
    pthread_mutex_lock(&g_err_lock);
    snprintf(out, len, "%s", g_last_error);
    pthread_mutex_unlock(&g_err_lock);
}

/* ------------------------------------------------------------------------------------------------
 * Errors, init, devices, contexts
 * ---------------------------------------------------------------------------------------------- */

static const char *error_name(CUresult e) {
    switch (e) {
    case CUDA_SUCCESS: return "CUDA_SUCCESS";
    case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
    case CUDA_ERROR_NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
    case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case CUDA_ERROR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
    case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
    case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case CUDA_ERROR_NOT_READY: return "CUDA_ERROR_NOT_READY";
    case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
    case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
    case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
    default: return NULL;
    }
}

CUresult cuGetErrorName(CUresult e, const char **out) {
    const char *n = error_name(e);
    if (!out || !n) return CUDA_ERROR_INVALID_VALUE;
    *out = n;
    return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult e, const char **out) {
    const char *n = error_name(e);
    if (!out || !n) return CUDA_ERROR_INVALID_VALUE;
    *out = e == CUDA_ERROR_LAUNCH_FAILED ? "the SIMT executor stopped the kernel (see stderr)"
                                         : "reported by the vppo fake CUDA driver";
    return CUDA_SUCCESS;
}

CUresult cuInit(unsigned int flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    if (!g_initialised)
        for (int d = 0; d < FAKE_MAX_DEVICES; d++) g_defaults[d] = (FakeStream){.magic = HANDLE_MAGIC_STREAM, .device = d};
    __atomic_store_n(&g_initialised, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&g_lock);
    return CUDA_SUCCESS;
}

static CUresult need_init(void) {
    return __atomic_load_n(&g_initialised, __ATOMIC_SEQ_CST) ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED;
}

CUresult cuDriverGetVersion(int *v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int *n) {
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    if (need_init()) return CUDA_ERROR_NOT_INITIALIZED;
    *n = g_ndevices;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (need_init()) return CUDA_ERROR_NOT_INITIALIZED;
    if (ordinal < 0 || ordinal >= g_ndevices) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (d < 0 || d >= g_ndevices) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "vppo fake CUDA device (SIMT executor)");
    return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) {
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (d < 0 || d >= g_ndevices) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = (size_t)FAKE_TOTAL_MEM;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    if (d < 0 || d >= g_ndevices) return CUDA_ERROR_INVALID_DEVICE;
    switch (attr) {
    case 1: *v = 1024; break;                     /* MAX_THREADS_PER_BLOCK */
    case 2: case 3: *v = 1024; break;             /* MAX_BLOCK_DIM_X, Y */
    case 4: *v = 64; break;                       /* MAX_BLOCK_DIM_Z */
    case 5: *v = 2147483647; break;               /* MAX_GRID_DIM_X */
    case 6: case 7: *v = 65535; break;            /* MAX_GRID_DIM_Y, Z */
    case 8: *v = FAKE_SHARED_DEFAULT; break;      /* MAX_SHARED_MEMORY_PER_BLOCK */
    case 10: *v = 32; break;                      /* WARP_SIZE */
    case 13: *v = 1980000; break;                 /* CLOCK_RATE (kHz) */
    case 16: *v = FAKE_SMS; break;                /* MULTIPROCESSOR_COUNT */
    case 36: *v = 2619000; break;                 /* MEMORY_CLOCK_RATE (kHz) */
    case 37: *v = 5120; break;                    /* GLOBAL_MEMORY_BUS_WIDTH */
    case 38: *v = 50 * 1024 * 1024; break;        /* L2_CACHE_SIZE */
    case 75: *v = 9; break;                       /* COMPUTE_CAPABILITY_MAJOR */
    case 76: *v = 0; break;                       /* COMPUTE_CAPABILITY_MINOR */
    case 97: *v = FAKE_SHARED_OPTIN; break;       /* MAX_SHARED_MEMORY_PER_BLOCK_OPTIN */
    case 115: *v = 1; break;                      /* MEMORY_POOLS_SUPPORTED: cudarc then allocates async */
    default:
        /* Not modelled: an error, so a new dependency on an attribute shows up instead of reading 0. */
        fail("cuDeviceGetAttribute: attribute %d is not modelled by the fake driver", attr);
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(FakeCtx **ctx, CUdevice d) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    if (need_init()) return CUDA_ERROR_NOT_INITIALIZED;
    if (d < 0 || d >= g_ndevices) return CUDA_ERROR_INVALID_DEVICE;
    __atomic_add_fetch(&g_primary[d].refcount, 1, __ATOMIC_SEQ_CST);
    *ctx = &g_primary[d];
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    if (d < 0 || d >= g_ndevices) return CUDA_ERROR_INVALID_DEVICE;
    int count = __atomic_load_n(&g_primary[d].refcount, __ATOMIC_SEQ_CST);
    while (count > 0 && !__atomic_compare_exchange_n(&g_primary[d].refcount, &count, count - 1, 0, __ATOMIC_SEQ_CST,
                                                      __ATOMIC_SEQ_CST)) {
    }
    return count > 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}

CUresult cuCtxSetCurrent(FakeCtx *ctx) {
    if (ctx && (ctx < g_primary || ctx >= g_primary + g_ndevices)) return CUDA_ERROR_INVALID_CONTEXT;
    t_current = ctx;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(FakeCtx **ctx) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    *ctx = t_current;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetDevice(CUdevice *d) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (!t_current) return CUDA_ERROR_INVALID_CONTEXT;
    *d = (int)(t_current - g_primary);
    return CUDA_SUCCESS;
}

/* The device of the current context (0 when there is none: need_ctx fails those calls). */
static int current_device(void) { return t_current ? (int)(t_current - g_primary) : 0; }

/* Every call that works on the device needs the context current on the calling thread, as on a GPU. */
static CUresult need_ctx(const char *call) {
    if (t_current && __atomic_load_n(&t_current->refcount, __ATOMIC_SEQ_CST) > 0) return CUDA_SUCCESS;
    fail("%s: no current context on this thread", call);
    return CUDA_ERROR_INVALID_CONTEXT;
}

static CUresult ctx_sync(void);
CUresult cuCtxSynchronize(void) { LOCKED(ctx_sync()); }

/* ------------------------------------------------------------------------------------------------
 * Memory
 * ---------------------------------------------------------------------------------------------- */

/* The allocation that holds [p, p + n), or NULL. Call with g_lock held. */
static Alloc *find_alloc(uintptr_t p, size_t n) {
    for (size_t i = 0; i < g_nallocs; i++) {
        Alloc *a = &g_allocs[i];
        if (p >= a->base && p - a->base <= a->size && n <= a->size - (p - a->base)) return a;
    }
    return NULL;
}

/* The device of the live allocation holding [p, p + n), or -1 (for tests/fake_nccl/libnccl.c, which
 * checks that a communicator's buffers are on its device). */
int vppo_fake_cuda_device_of(CUdeviceptr p, size_t n) {
    pthread_mutex_lock(&g_lock);
    Alloc *a = find_alloc((uintptr_t)p, n);
    int d = a ? a->device : -1;
    pthread_mutex_unlock(&g_lock);
    return d;
}

static CUresult check_range(const char *call, CUdeviceptr p, size_t n) {
    if (find_alloc((uintptr_t)p, n)) return CUDA_SUCCESS;
    fail("%s: [0x%llx, +%zu bytes) is not inside a live device allocation", call, p, n);
    return CUDA_ERROR_INVALID_VALUE;
}

/* Reports an access to a guard page (a kernel reading or writing outside its buffers) and lets the
 * default action end the process. */
static void on_fault(int sig, siginfo_t *info, void *ctx) {
    (void)ctx;
    char msg[512];
    const char *k = g_running_kernel;
    int n = snprintf(msg, sizeof msg,
                     "fake libcuda: kernel %s accessed 0x%llx, outside every device allocation (a guard page, "
                     "VPPO_FAKE_CUDA_GUARD=%s)\n",
                     k ? k : "(none running)", (unsigned long long)(uintptr_t)info->si_addr,
                     g_guard == GUARD_END ? "end" : "start");
    if (n > 0) {
        ssize_t w = write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
        (void)w;
    }
    signal(sig, SIG_DFL);
}

static void install_fault_report(void) {
    static int done;
    if (done) return;
    done = 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGBUS, &sa, NULL);
}

/* The fault report runs on a stack of its own (a kernel thread's fiber stack may be nearly full). */
static void ensure_signal_stack(void) {
    static __thread int have;
    if (have) return;
    have = 1;
    stack_t st;
    st.ss_size = 64 * 1024;
    st.ss_sp = malloc(st.ss_size);
    st.ss_flags = 0;
    if (st.ss_sp) sigaltstack(&st, NULL);
}

static CUresult mem_alloc(CUdeviceptr *out, size_t bytes) {
    if (!out || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = need_ctx("cuMemAlloc");
    if (rc) return rc;
    if (!g_page) g_page = (size_t)sysconf(_SC_PAGESIZE);
    /* Data pages, then (or before them) one inaccessible guard page. */
    size_t data = (bytes + 15) / 16 * 16;
    size_t data_pages = (data + g_page - 1) / g_page * g_page;
    size_t map_bytes = data_pages + g_page;
    unsigned char *map = mmap(NULL, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    unsigned char *p, *guard;
    if (g_guard == GUARD_END) {
        guard = map + data_pages;
        p = guard - data; /* 16-byte aligned, as the kernels' vector accesses need */
    } else {
        guard = map;
        p = map + g_page;
    }
    if (mprotect(guard, g_page, PROT_NONE)) {
        munmap(map, map_bytes);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    memset(p, 0xFF, bytes);
    if (g_nallocs == g_cap_allocs) {
        size_t cap = g_cap_allocs ? 2 * g_cap_allocs : 64;
        Alloc *grown = realloc(g_allocs, cap * sizeof *grown);
        if (!grown) {
            munmap(map, map_bytes);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        g_allocs = grown;
        g_cap_allocs = cap;
    }
    g_allocs[g_nallocs++] = (Alloc){(uintptr_t)p, bytes, map, map_bytes, current_device()};
    g_stats.allocs++;
    g_stats.live_allocs++;
    g_stats.live_bytes += bytes;
    g_stats.alloc_bytes += bytes;
    *out = (CUdeviceptr)(uintptr_t)p;
    return CUDA_SUCCESS;
}

static CUresult mem_free(CUdeviceptr p) {
    CUresult rc = need_ctx("cuMemFree");
    if (rc) return rc;
    for (size_t i = 0; i < g_nallocs; i++) {
        if (g_allocs[i].base == (uintptr_t)p) {
            g_stats.live_allocs--;
            g_stats.live_bytes -= g_allocs[i].size;
            munmap(g_allocs[i].map, g_allocs[i].map_bytes);
            g_allocs[i] = g_allocs[--g_nallocs];
            return CUDA_SUCCESS;
        }
    }
    fail("cuMemFree: 0x%llx is not the start of a live allocation", p);
    return CUDA_ERROR_INVALID_VALUE;
}

/* ------------------------------------------------------------------------------------------------
 * Streams. Every stream, the default one included, queues its work and runs it only when something
 * waits for it: a synchronize, a copy back to pageable host memory (synchronous), a synchronous copy or
 * free, or an event recorded there and waited for from another stream. Streams are not ordered with
 * each other unless an event orders them (cudarc creates non-blocking streams, which never synchronize
 * implicitly with the default stream). So work that is not ordered after another stream's work reads
 * memory that is not written yet, and a caller that reads results without waiting for them reads
 * nothing.
 * ---------------------------------------------------------------------------------------------- */


static int is_default(const FakeStream *s) { return s == NULL || (uintptr_t)s == 1 || (uintptr_t)s == 2; }

static int valid_stream(const FakeStream *s) {
    /* NULL is the legacy default stream; 0x1 and 0x2 are CU_STREAM_LEGACY and CU_STREAM_PER_THREAD. */
    return is_default(s) || s->magic == HANDLE_MAGIC_STREAM;
}

/* The stream a handle names (the three default-stream handles are one stream here: the current
 * device's). */
static FakeStream *stream_of(FakeStream *s) { return is_default(s) ? &g_defaults[current_device()] : s; }

/* The checks of every call on a stream (a valid handle, a current context); the stream in *out. */
static CUresult on_stream(const char *call, FakeStream *s, FakeStream **out) {
    if (!valid_stream(s)) {
        fail("%s: invalid stream handle", call);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    *out = stream_of(s);
    CUresult rc = need_ctx(call);
    if (rc) return rc;
    if ((*out)->device != current_device()) {
        fail("%s: a stream of device %d used with the context of device %d current", call, (*out)->device,
             current_device());
        return CUDA_ERROR_INVALID_HANDLE;
    }
    return CUDA_SUCCESS;
}

static int valid_event(const FakeEvent *e) { return e && e->magic == HANDLE_MAGIC_EVENT; }

/* An event is complete when its last record has run (or it was never recorded). */
static int event_done(const FakeEvent *e) { return !e->stream || e->stream->executed >= e->pos; }

static CUresult run_kernel(struct FakeFunction *f, const SimtLaunch *d, const void *params);
static CUresult do_htod(const char *call, CUdeviceptr dst, const void *src, size_t n);
static CUresult do_dtod(const char *call, CUdeviceptr dst, CUdeviceptr src, size_t n);
static CUresult do_memset(const char *call, CUdeviceptr dst, unsigned char v, size_t n);
static CUresult drain_to(FakeStream *s, uint64_t pos);

/* Runs `op`, the next operation of stream `s` (g_lock held). */
static CUresult run_op(FakeStream *s, Op *op) {
    switch (op->kind) {
    case OP_KERNEL: return run_kernel(op->f, &op->dims, op->bytes);
    case OP_HTOD: return do_htod("cuMemcpyHtoD", op->dst, op->bytes, op->n);
    case OP_DTOD: return do_dtod("cuMemcpyDtoD", op->dst, op->src, op->n);
    case OP_MEMSET: return do_memset("cuMemsetD8", op->dst, op->value, op->n);
    case OP_FREE: return mem_free(op->dst);
    case OP_RECORD:
        /* Only the event's latest record sets its time (it may have been recorded again since). */
        if (op->event->stream == s && op->event->pos == op->pos) op->event->ms = now_ms();
        return CUDA_SUCCESS;
    case OP_WAIT: return drain_to(op->on, op->pos);
    }
    return CUDA_ERROR_INVALID_VALUE;
}

/* Runs the queue of `s` until position `pos` has run. A wait can run another stream's queue (an event
 * recorded there); a genuine cycle of waits is reported (a deadlock on a GPU). */
static CUresult drain_to(FakeStream *s, uint64_t pos) {
    if (s->executed >= pos) return CUDA_SUCCESS;
    if (s->draining) {
        fail("a cycle of stream waits (a deadlock on a GPU)");
        return CUDA_ERROR_INVALID_VALUE;
    }
    s->draining = 1;
    CUresult rc = CUDA_SUCCESS;
    while (s->head < s->count && s->executed < pos) {
        Op *op = &s->ops[s->head++];
        CUresult r = run_op(s, op);
        s->executed++;
        free(op->bytes);
        op->bytes = NULL;
        if (r && !rc) rc = r;
    }
    if (s->head == s->count) s->head = s->count = 0;
    s->draining = 0;
    if (rc && !g_sticky) g_sticky = rc;
    return rc;
}

static CUresult drain(FakeStream *s) { return drain_to(s, s->enqueued); }

static CUresult drain_all(void) {
    CUresult rc = CUDA_SUCCESS;
    for (int d = 0; d < g_ndevices; d++) {
        CUresult r = drain(&g_defaults[d]);
        if (r && !rc) rc = r;
    }
    for (size_t i = 0; i < g_nstreams; i++) {
        CUresult r = drain(g_streams[i]);
        if (r && !rc) rc = r;
    }
    return rc;
}

/* What a synchronizing call reports after running queued work that returned `rc`: that error, or
 * else the sticky error of earlier queued work (once). */
static CUresult settle(CUresult rc) {
    CUresult sticky = g_sticky;
    g_sticky = CUDA_SUCCESS;
    return rc ? rc : sticky;
}

static CUresult enqueue(FakeStream *s, Op op) {
    if (s->count == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 16;
        Op *grown = realloc(s->ops, cap * sizeof *grown);
        if (!grown) {
            free(op.bytes);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        s->ops = grown;
        s->cap = cap;
    }
    s->ops[s->count++] = op;
    s->enqueued++;
    return CUDA_SUCCESS;
}

/* A copy of n host bytes, for work that runs later (the caller may reuse its buffer at once). */
static unsigned char *stage(const void *src, size_t n) {
    unsigned char *b = malloc(n ? n : 1);
    if (b && n) memcpy(b, src, n);
    return b;
}

CUresult cuMemAlloc_v2(CUdeviceptr *out, size_t bytes) { LOCKED(mem_alloc(out, bytes)); }

static CUresult mem_free_sync(CUdeviceptr p) {
    CUresult rc = need_ctx("cuMemFree");
    if (rc) return rc;
    rc = drain_all(); /* cuMemFree waits for the device */
    CUresult r = mem_free(p);
    return rc ? rc : r;
}
CUresult cuMemFree_v2(CUdeviceptr p) { LOCKED(mem_free_sync(p)); }

static CUresult mem_alloc_async(CUdeviceptr *out, size_t bytes, FakeStream *s) {
    FakeStream *st;
    CUresult rc = on_stream("cuMemAllocAsync", s, &st);
    return rc ? rc : mem_alloc(out, bytes); /* usable by work queued after this call, so now is fine */
}
static CUresult mem_free_async(CUdeviceptr p, FakeStream *s) {
    FakeStream *st;
    CUresult rc = on_stream("cuMemFreeAsync", s, &st);
    if (rc) return rc;
    Op op = {.kind = OP_FREE, .dst = p};
    return enqueue(st, op);
}
CUresult cuMemAllocAsync(CUdeviceptr *out, size_t bytes, FakeStream *s) { LOCKED(mem_alloc_async(out, bytes, s)); }
CUresult cuMemFreeAsync(CUdeviceptr p, FakeStream *s) { LOCKED(mem_free_async(p, s)); }

CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    if (!free_bytes || !total) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    *total = (size_t)FAKE_TOTAL_MEM;
    *free_bytes = (size_t)(FAKE_TOTAL_MEM - g_stats.live_bytes);
    pthread_mutex_unlock(&g_lock);
    return CUDA_SUCCESS;
}

static CUresult do_htod(const char *call, CUdeviceptr dst, const void *src, size_t n) {
    CUresult rc = check_range(call, dst, n);
    if (rc) return rc;
    memcpy((void *)(uintptr_t)dst, src, n);
    g_stats.htod_copies++;
    g_stats.htod_bytes += n;
    return CUDA_SUCCESS;
}
static CUresult do_dtod(const char *call, CUdeviceptr dst, CUdeviceptr src, size_t n) {
    CUresult rc = check_range(call, dst, n);
    if (rc || (rc = check_range(call, src, n))) return rc;
    memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n);
    g_stats.dtod_bytes += n;
    return CUDA_SUCCESS;
}
static CUresult do_memset(const char *call, CUdeviceptr dst, unsigned char v, size_t n) {
    CUresult rc = check_range(call, dst, n);
    if (rc) return rc;
    memset((void *)(uintptr_t)dst, v, n);
    g_stats.memset_bytes += n;
    return CUDA_SUCCESS;
}

/* Runs what `s` has queued, then reports any error of queued work (a synchronizing call). */
static CUresult sync_stream(FakeStream *s) {
    return settle(drain(s));
}

/* Queues `op` on `st`; a synchronous call (`sync`) then runs the stream's queue. */
static CUresult submit(FakeStream *st, Op op, int sync) {
    CUresult rc = enqueue(st, op);
    if (rc) return rc;
    return sync ? sync_stream(st) : CUDA_SUCCESS;
}

static CUresult htod(const char *call, CUdeviceptr dst, const void *src, size_t n, FakeStream *s, int sync) {
    FakeStream *st;
    CUresult rc = on_stream(call, s, &st);
    if (rc || (rc = check_range(call, dst, n))) return rc;
    if (n && !src) return CUDA_ERROR_INVALID_VALUE;
    /* From pageable memory the source is staged before the call returns; the write is queued. */
    unsigned char *staged = stage(src, n);
    if (!staged) return CUDA_ERROR_OUT_OF_MEMORY;
    Op op = {.kind = OP_HTOD, .bytes = staged, .dst = dst, .n = n};
    return submit(st, op, sync);
}
static CUresult dtoh(const char *call, void *dst, CUdeviceptr src, size_t n, FakeStream *s) {
    FakeStream *st;
    CUresult rc = on_stream(call, s, &st);
    if (rc) return rc;
    if (n && !dst) return CUDA_ERROR_INVALID_VALUE;
    /* Into pageable memory the copy is synchronous: the stream's work before it runs first. */
    if ((rc = sync_stream(st))) return rc;
    if ((rc = check_range(call, src, n))) return rc;
    memcpy(dst, (const void *)(uintptr_t)src, n);
    g_stats.dtoh_copies++;
    g_stats.dtoh_bytes += n;
    return CUDA_SUCCESS;
}
static CUresult dtod(const char *call, CUdeviceptr dst, CUdeviceptr src, size_t n, FakeStream *s, int sync) {
    FakeStream *st;
    CUresult rc = on_stream(call, s, &st);
    if (rc) return rc;
    Op op = {.kind = OP_DTOD, .dst = dst, .src = src, .n = n};
    return submit(st, op, sync);
}
static CUresult memset8(const char *call, CUdeviceptr dst, unsigned char v, size_t n, FakeStream *s, int sync) {
    FakeStream *st;
    CUresult rc = on_stream(call, s, &st);
    if (rc) return rc;
    Op op = {.kind = OP_MEMSET, .dst = dst, .n = n, .value = v};
    return submit(st, op, sync);
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void *h, size_t n) { LOCKED(htod("cuMemcpyHtoD", d, h, n, NULL, 1)); }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void *h, size_t n, FakeStream *s) {
    LOCKED(htod("cuMemcpyHtoDAsync", d, h, n, s, 0));
}
CUresult cuMemcpyDtoH_v2(void *h, CUdeviceptr d, size_t n) { LOCKED(dtoh("cuMemcpyDtoH", h, d, n, NULL)); }
CUresult cuMemcpyDtoHAsync_v2(void *h, CUdeviceptr d, size_t n, FakeStream *s) {
    LOCKED(dtoh("cuMemcpyDtoHAsync", h, d, n, s));
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) { LOCKED(dtod("cuMemcpyDtoD", d, s, n, NULL, 1)); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr src, size_t n, FakeStream *s) {
    LOCKED(dtod("cuMemcpyDtoDAsync", d, src, n, s, 0));
}
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { LOCKED(memset8("cuMemsetD8", d, v, n, NULL, 1)); }
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, FakeStream *s) {
    LOCKED(memset8("cuMemsetD8Async", d, v, n, s, 0));
}

/* ------------------------------------------------------------------------------------------------
 * Streams and events
 * ---------------------------------------------------------------------------------------------- */

#define CU_STREAM_NON_BLOCKING 0x1

static CUresult stream_create(FakeStream **out, unsigned flags) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = need_ctx("cuStreamCreate");
    if (rc) return rc;
    if (flags != CU_STREAM_NON_BLOCKING) {
        /* A blocking stream synchronizes implicitly with the legacy default stream; not modelled. */
        fail("cuStreamCreate: flags 0x%x: only CU_STREAM_NON_BLOCKING streams are modelled", flags);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (g_nstreams == g_cap_streams) {
        size_t cap = g_cap_streams ? 2 * g_cap_streams : 16;
        FakeStream **grown = realloc(g_streams, cap * sizeof *grown);
        if (!grown) return CUDA_ERROR_OUT_OF_MEMORY;
        g_streams = grown;
        g_cap_streams = cap;
    }
    FakeStream *s = calloc(1, sizeof *s);
    if (!s) return CUDA_ERROR_OUT_OF_MEMORY;
    s->magic = HANDLE_MAGIC_STREAM;
    s->device = current_device();
    g_streams[g_nstreams++] = s;
    *out = s;
    return CUDA_SUCCESS;
}
CUresult cuStreamCreate(FakeStream **out, unsigned int flags) { LOCKED(stream_create(out, flags)); }

CUresult cuStreamCreateWithPriority(FakeStream **out, unsigned int flags, int priority) {
    (void)priority;
    return cuStreamCreate(out, flags);
}

static CUresult stream_destroy(FakeStream *s) {
    if (is_default(s) || s->magic != HANDLE_MAGIC_STREAM) return CUDA_ERROR_INVALID_HANDLE;
    /* Work already queued still completes. */
    CUresult rc = drain(s);
    s->magic = HANDLE_MAGIC_DEAD; /* never freed: a stale handle must stay recognisably dead */
    return rc;
}
CUresult cuStreamDestroy_v2(FakeStream *s) { LOCKED(stream_destroy(s)); }

static CUresult stream_sync(FakeStream *s) {
    FakeStream *st;
    CUresult rc = on_stream("cuStreamSynchronize", s, &st);
    return rc ? rc : sync_stream(st);
}
CUresult cuStreamSynchronize(FakeStream *s) { LOCKED(stream_sync(s)); }
/* Running the queue to answer is one legal schedule (the work completes "eventually"). */
CUresult cuStreamQuery(FakeStream *s) { LOCKED(stream_sync(s)); }

static CUresult ctx_sync(void) {
    CUresult rc = need_ctx("cuCtxSynchronize");
    if (rc) return rc;
    return settle(drain_all());
}

static CUresult stream_wait(FakeStream *s, FakeEvent *e) {
    FakeStream *st;
    CUresult rc = on_stream("cuStreamWaitEvent", s, &st);
    if (rc) return rc;
    if (!valid_event(e)) return CUDA_ERROR_INVALID_HANDLE;
    if (event_done(e)) return CUDA_SUCCESS; /* nothing outstanding */
    /* Fixed now: the record current at this call, whatever is recorded into `e` later. */
    Op op = {.kind = OP_WAIT, .on = e->stream, .pos = e->pos};
    return enqueue(st, op);
}
CUresult cuStreamWaitEvent(FakeStream *s, FakeEvent *e, unsigned int flags) {
    (void)flags;
    LOCKED(stream_wait(s, e));
}

CUresult cuEventCreate(FakeEvent **out, unsigned int flags) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = need_ctx("cuEventCreate");
    if (rc) return rc;
    FakeEvent *e = calloc(1, sizeof *e);
    if (!e) return CUDA_ERROR_OUT_OF_MEMORY;
    e->magic = HANDLE_MAGIC_EVENT;
    e->flags = flags;
    *out = e;
    return CUDA_SUCCESS;
}

CUresult cuEventDestroy_v2(FakeEvent *e) {
    if (!valid_event(e)) return CUDA_ERROR_INVALID_HANDLE;
    e->magic = HANDLE_MAGIC_DEAD; /* never freed (see cuStreamDestroy_v2) */
    return CUDA_SUCCESS;
}

static CUresult event_record(FakeEvent *e, FakeStream *s) {
    FakeStream *st;
    CUresult rc = on_stream("cuEventRecord", s, &st);
    if (rc) return rc;
    if (!valid_event(e)) return CUDA_ERROR_INVALID_HANDLE;
    Op op = {.kind = OP_RECORD, .event = e, .pos = st->enqueued + 1};
    if ((rc = enqueue(st, op))) return rc;
    e->stream = st;
    e->pos = st->enqueued;
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(FakeEvent *e, FakeStream *s) { LOCKED(event_record(e, s)); }

static CUresult event_sync(FakeEvent *e) {
    if (!valid_event(e)) return CUDA_ERROR_INVALID_HANDLE;
    return settle(e->stream ? drain_to(e->stream, e->pos) : CUDA_SUCCESS);
}
CUresult cuEventSynchronize(FakeEvent *e) { LOCKED(event_sync(e)); }
CUresult cuEventQuery(FakeEvent *e) { LOCKED(event_sync(e)); }

#define CU_EVENT_DISABLE_TIMING 0x2

static CUresult elapsed(float *ms, FakeEvent *a, FakeEvent *b) {
    if (!ms) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_event(a) || !valid_event(b)) return CUDA_ERROR_INVALID_HANDLE;
    if ((a->flags | b->flags) & CU_EVENT_DISABLE_TIMING) {
        fail("cuEventElapsedTime: an event was created with CU_EVENT_DISABLE_TIMING");
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (!a->stream || !b->stream) return CUDA_ERROR_INVALID_HANDLE; /* never recorded */
    if (!event_done(a) || !event_done(b)) return CUDA_ERROR_NOT_READY;
    *ms = (float)(b->ms - a->ms);
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime(float *ms, FakeEvent *a, FakeEvent *b) { LOCKED(elapsed(ms, a, b)); }
CUresult cuEventElapsedTime_v2(float *ms, FakeEvent *a, FakeEvent *b) { LOCKED(elapsed(ms, a, b)); }

/* ------------------------------------------------------------------------------------------------
 * Modules, functions, launches
 * ---------------------------------------------------------------------------------------------- */

CUresult cuModuleLoadData(FakeModule **out, const void *image) {
    if (!out || !image) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = need_ctx("cuModuleLoadData");
    if (rc) return rc;
    uint32_t magic;
    memcpy(&magic, image, sizeof magic);
    if (magic != FATBIN_MAGIC) {
        fail("cuModuleLoadData: the image is not a fatbin (magic 0x%x, want 0x%x)", magic, FATBIN_MAGIC);
        return CUDA_ERROR_INVALID_IMAGE;
    }
    /* Fatbin header: magic (4 bytes), version (2), header size (2), size of what follows (8). */
    uint16_t header_bytes;
    uint64_t body_bytes;
    memcpy(&header_bytes, (const unsigned char *)image + 6, sizeof header_bytes);
    memcpy(&body_bytes, (const unsigned char *)image + 8, sizeof body_bytes);
    size_t bytes = (size_t)header_bytes + (size_t)body_bytes;
    FakeModule *m = calloc(1, sizeof *m);
    unsigned char *copy = malloc(bytes);
    if (!m || !copy) {
        free(m);
        free(copy);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    memcpy(copy, image, bytes);
    m->magic = HANDLE_MAGIC_MODULE;
    m->image = copy;
    m->image_bytes = bytes;
    *out = m;
    return CUDA_SUCCESS;
}

CUresult cuModuleUnload(FakeModule *m) {
    if (!m || m->magic != HANDLE_MAGIC_MODULE) return CUDA_ERROR_INVALID_HANDLE;
    m->magic = HANDLE_MAGIC_DEAD; /* never freed (see cuStreamDestroy_v2); its image is */
    free(m->image);
    m->image = NULL;
    m->image_bytes = 0;
    return CUDA_SUCCESS;
}

CUresult cuModuleGetFunction(FakeFunction **out, FakeModule *m, const char *name) {
    if (!out || !name) return CUDA_ERROR_INVALID_VALUE;
    if (!m || m->magic != HANDLE_MAGIC_MODULE) return CUDA_ERROR_INVALID_HANDLE;
    CUresult rc = need_ctx("cuModuleGetFunction");
    if (rc) return rc;
    pthread_mutex_lock(&g_lock);
    Resolver resolve = g_resolve;
    pthread_mutex_unlock(&g_lock);
    if (!resolve) {
        fail("cuModuleGetFunction(%s): vppo_fake_cuda_install was not called", name);
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    /* A module has the kernels whose names its fatbin holds (they are stored uncompressed, NUL-ended). */
    size_t len = strlen(name) + 1;
    if (len > sizeof((FakeFunction *)0)->name || !memmem(m->image, m->image_bytes, name, len)) {
        return CUDA_ERROR_NOT_FOUND;
    }
    SimtEntry entry = resolve(name);
    if (!entry) {
        fail("cuModuleGetFunction(%s): in the fatbin, but the SIMT build has no such kernel", name);
        return CUDA_ERROR_NOT_FOUND;
    }
    /* Kept for the life of the process, like the module functions of a loaded module. */
    FakeFunction *f = calloc(1, sizeof *f);
    if (!f) return CUDA_ERROR_OUT_OF_MEMORY;
    f->magic = HANDLE_MAGIC_FUNCTION;
    f->entry = entry;
    f->pointer_count = g_pointer_fields ? g_pointer_fields(name, &f->pointer_offsets, &f->params_bytes) : 0;
    f->max_dynamic_shared = FAKE_SHARED_DEFAULT;
    strcpy(f->name, name);
    *out = f;
    return CUDA_SUCCESS;
}

CUresult cuFuncSetAttribute(FakeFunction *f, int attr, int value) {
    if (!f || f->magic != HANDLE_MAGIC_FUNCTION) return CUDA_ERROR_INVALID_HANDLE;
    if (attr != 8 /* CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES */) return CUDA_ERROR_NOT_SUPPORTED;
    if (value < 0 || value > FAKE_SHARED_OPTIN) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    f->max_dynamic_shared = value;
    pthread_mutex_unlock(&g_lock);
    return CUDA_SUCCESS;
}

static CUresult launch(FakeFunction *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                       unsigned bz, unsigned shared, FakeStream *s, void **params, void **extra) {
    FakeStream *st;
    CUresult rc = on_stream("cuLaunchKernel", s, &st);
    if (rc) return rc;
    if (!f || f->magic != HANDLE_MAGIC_FUNCTION) return CUDA_ERROR_INVALID_HANDLE;
    if (extra || !params || !params[0]) {
        fail("cuLaunchKernel(%s): the crate's kernels take one by-value argument in kernelParams", f->name);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if ((int)shared > f->max_dynamic_shared) {
        fail("cuLaunchKernel(%s): %u bytes of dynamic shared memory, over the function's limit %d", f->name,
             shared, f->max_dynamic_shared);
        return CUDA_ERROR_INVALID_VALUE;
    }
    SimtLaunch d = {gx, gy, gz, bx, by, bz, shared, g_schedule};
    /* Queued: the parameter bytes are copied now, as cuLaunchKernel does. */
    if (!f->params_bytes) {
        fail("cuLaunchKernel(%s): the size of its parameters is unknown, so it cannot be queued", f->name);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    unsigned char *bytes = stage(params[0], f->params_bytes);
    if (!bytes) return CUDA_ERROR_OUT_OF_MEMORY;
    Op op = {.kind = OP_KERNEL, .f = f, .dims = d, .bytes = bytes};
    return enqueue(st, op);
}

static CUresult run_kernel(FakeFunction *f, const SimtLaunch *d, const void *params) {
    /* Every pointer in the params must be a device address, i.e. inside a live allocation (a host
     * address would "work" here, where device memory is host memory, and fault on a GPU). */
    for (size_t i = 0; i < f->pointer_count; i++) {
        uint64_t p;
        memcpy(&p, (const unsigned char *)params + f->pointer_offsets[i], sizeof p);
        if (p && !find_alloc((uintptr_t)p, 1)) {
            fail("cuLaunchKernel(%s): the pointer at byte %zu of the parameters, 0x%llx, is not in a live "
                 "device allocation",
                 f->name, f->pointer_offsets[i], (unsigned long long)p);
            return CUDA_ERROR_INVALID_VALUE;
        }
    }
    char err[2048] = {0};
    g_stats.launches++;
    ensure_signal_stack();
    g_running_kernel = f->name;
    int failed = f->entry(d, params, err, sizeof err);
    g_running_kernel = NULL;
    if (failed) {
        fail("cuLaunchKernel(%s): %s", f->name, err);
        return CUDA_ERROR_LAUNCH_FAILED;
    }
    return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(FakeFunction *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, FakeStream *s, void **params, void **extra) {
    LOCKED(launch(f, gx, gy, gz, bx, by, bz, shared, s, params, extra));
}
