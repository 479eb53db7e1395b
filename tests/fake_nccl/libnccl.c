/*
 * An NCCL library (libnccl.so) for ranks that are threads of one process, on the fake CUDA driver.
 *
 * Why: src/parallel/nccl.rs talks to NCCL through cudarc, which dlopens "libnccl.so" at first use and
 * looks each function up when it is first called. Without GPUs and NCCL that code would never run in
 * CI. This library implements the calls the crate makes, with NCCL's semantics for a group whose
 * ranks are threads, each on its own fake device (tests/fake_cuda/libcuda.c, VPPO_FAKE_CUDA_DEVICES),
 * and checks what NCCL checks or what would corrupt memory or hang on a GPU: ranks in range and each
 * joined once, one device per rank, buffers that are live allocations of the communicator's device,
 * and every rank calling the same collective with the same count and type.
 *
 * How it is used (tests/common/fake_nccl.rs): compiled with the C compiler into a shared object whose
 * SONAME is "libnccl.so" and dlopened (RTLD_GLOBAL) after the fake driver, whose functions it calls
 * (they resolve to the fake libcuda already loaded); cudarc's dlopen("libnccl.so") then finds it.
 *
 * Semantics: ncclCommInitRank blocks until every rank of the id has joined. A collective is a
 * rendezvous of all ranks: each rank reads its send buffer on its stream (the stream's earlier work
 * runs first), and writes its receive buffer with a copy queued on that stream, so the result is there
 * for work ordered after the call, as on a GPU, and not before. A rank that waits 60 s for the others
 * gets ncclSystemError instead of hanging. The ops: ncclAllGather. Nothing else is modelled.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
} ncclResult_t;

typedef struct {
    char internal[128];
} ncclUniqueId;

/* The fake driver's functions (tests/fake_cuda/libcuda.c). */
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext;
typedef void *CUstream;
extern int cuCtxGetCurrent(CUcontext *ctx);
extern int cuCtxSetCurrent(CUcontext ctx);
extern int cuCtxGetDevice(int *device);
extern int cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s);
extern int cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s);
extern int vppo_fake_cuda_device_of(CUdeviceptr p, size_t n);

#define MAX_RANKS 64
#define WAIT_SECONDS 60
#define COMM_MAGIC 0x4e43434cu /* "NCCL" */
#define ID_MAGIC "vppo-fake-nccl"

/* A collective as one rank called it. */
typedef struct {
    const char *name;
    size_t count;
    int dtype;
} Call;

/* The ranks of one unique id. */
typedef struct Clique {
    ncclUniqueId id;
    int nranks;
    int joined;
    int taken[MAX_RANKS];
    int device[MAX_RANKS];
    int bad_join; /* a rank joined with another size, twice, or on a device already taken */
    /* the collective in progress */
    uint64_t done;   /* collectives completed */
    int arrived;     /* ranks in the current one */
    int leaving;     /* ranks of the last completed one still copying out */
    Call call;       /* the first arrival's */
    int mismatch;
    char mismatch_text[256];
    unsigned char *data; /* nranks * the first arrival's bytes */
    struct Clique *next;
} Clique;

struct ncclComm {
    uint32_t magic;
    Clique *clique;
    int rank;
    int device;
    CUcontext ctx;
    char last_error[512];
};
typedef struct ncclComm *ncclComm_t;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static Clique *g_cliques;
static uint64_t g_ids;
static char g_last_error[512]; /* of calls without a communicator */

__attribute__((format(printf, 2, 3))) static void fail(ncclComm_t comm, const char *fmt, ...) {
    char *out = comm ? comm->last_error : g_last_error;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out, 512, fmt, ap);
    va_end(ap);
    fprintf(stderr, "fake libnccl: %s\n", out);
}

static int valid_comm(ncclComm_t c) { return c && c->magic == COMM_MAGIC; }

static size_t dtype_bytes(int t) {
    switch (t) {
    case 0: case 1: return 1;         /* int8, uint8 */
    case 2: case 3: case 7: return 4; /* int32, uint32, float32 */
    case 4: case 5: case 8: return 8; /* int64, uint64, float64 */
    case 6: case 9: return 2;         /* float16, bfloat16 */
    default: return 0;
    }
}

/* Waits on g_cv (g_lock held) until `*deadline`; 0 on a wake-up, ETIMEDOUT after it. */
static int wait_until(const struct timespec *deadline) { return pthread_cond_timedwait(&g_cv, &g_lock, deadline); }

static struct timespec deadline_from_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_sec += WAIT_SECONDS;
    return t;
}

const char *ncclGetErrorString(ncclResult_t r) {
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
    }
}

const char *ncclGetLastError(ncclComm_t comm) { return valid_comm(comm) ? comm->last_error : g_last_error; }

ncclResult_t ncclGetVersion(int *version) {
    if (!version) return ncclInvalidArgument;
    *version = 23000; /* the 2.30 API cudarc's nccl-02030 bindings describe */
    return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
    if (!id) return ncclInvalidArgument;
    memset(id, 0, sizeof *id);
    pthread_mutex_lock(&g_lock);
    uint64_t n = ++g_ids;
    pthread_mutex_unlock(&g_lock);
    snprintf(id->internal, sizeof id->internal, "%s %llu", ID_MAGIC, (unsigned long long)n);
    return ncclSuccess;
}

static Clique *clique_of(const ncclUniqueId *id, int nranks) {
    for (Clique *c = g_cliques; c; c = c->next)
        if (memcmp(&c->id, id, sizeof *id) == 0) return c;
    Clique *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->id = *id;
    c->nranks = nranks;
    c->next = g_cliques;
    g_cliques = c;
    return c;
}

static ncclResult_t init_rank(ncclComm_t *out, int nranks, ncclUniqueId id, int rank) {
    if (!out) return ncclInvalidArgument;
    *out = NULL;
    if (strncmp(id.internal, ID_MAGIC, strlen(ID_MAGIC)) != 0) {
        fail(NULL, "ncclCommInitRank: the id was not made by ncclGetUniqueId");
        return ncclInvalidArgument;
    }
    if (nranks < 1 || nranks > MAX_RANKS || rank < 0 || rank >= nranks) {
        fail(NULL, "ncclCommInitRank: rank %d of %d ranks (the fake supports 1..=%d ranks)", rank, nranks, MAX_RANKS);
        return ncclInvalidArgument;
    }
    CUcontext ctx = NULL;
    int device = -1;
    if (cuCtxGetCurrent(&ctx) || !ctx || cuCtxGetDevice(&device)) {
        fail(NULL, "ncclCommInitRank: rank %d: no current CUDA context on this thread", rank);
        return ncclUnhandledCudaError;
    }
    Clique *c = clique_of(&id, nranks);
    if (!c) return ncclSystemError;
    if (c->nranks != nranks) {
        fail(NULL, "ncclCommInitRank: rank %d joins with %d ranks, another rank with %d", rank, nranks, c->nranks);
        c->bad_join = 1;
    } else if (c->taken[rank]) {
        fail(NULL, "ncclCommInitRank: rank %d joined twice", rank);
        c->bad_join = 1;
    } else {
        for (int r = 0; r < nranks; r++) {
            if (c->taken[r] && c->device[r] == device) {
                fail(NULL, "ncclCommInitRank: duplicate GPU detected: ranks %d and %d both on device %d", r, rank,
                     device);
                c->bad_join = 1;
            }
        }
        c->taken[rank] = 1;
        c->device[rank] = device;
        c->joined++;
    }
    pthread_cond_broadcast(&g_cv);
    struct timespec deadline = deadline_from_now();
    while (!c->bad_join && c->joined < c->nranks) {
        if (wait_until(&deadline) == ETIMEDOUT) {
            fail(NULL, "ncclCommInitRank: rank %d waited %d s for the other ranks (%d of %d joined)", rank,
                 WAIT_SECONDS, c->joined, c->nranks);
            return ncclSystemError;
        }
    }
    if (c->bad_join) {
        if (!g_last_error[0]) fail(NULL, "ncclCommInitRank: another rank joined wrongly");
        return ncclInvalidUsage;
    }
    ncclComm_t comm = calloc(1, sizeof *comm);
    if (!comm) return ncclSystemError;
    *comm = (struct ncclComm){.magic = COMM_MAGIC, .clique = c, .rank = rank, .device = device, .ctx = ctx};
    *out = comm;
    return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank) {
    pthread_mutex_lock(&g_lock);
    ncclResult_t r = init_rank(comm, nranks, id, rank);
    pthread_mutex_unlock(&g_lock);
    return r;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int *count) {
    if (!valid_comm(comm) || !count) return ncclInvalidArgument;
    *count = comm->clique->nranks;
    return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int *rank) {
    if (!valid_comm(comm) || !rank) return ncclInvalidArgument;
    *rank = comm->rank;
    return ncclSuccess;
}

ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int *device) {
    if (!valid_comm(comm) || !device) return ncclInvalidArgument;
    *device = comm->device;
    return ncclSuccess;
}

static ncclResult_t free_comm(ncclComm_t comm) {
    if (!valid_comm(comm)) return ncclInvalidArgument;
    comm->magic = 0; /* a stale handle is recognisably dead (the memory is kept for that) */
    return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    pthread_mutex_lock(&g_lock);
    ncclResult_t r = free_comm(comm);
    pthread_mutex_unlock(&g_lock);
    return r;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) { return ncclCommDestroy(comm); }

/* The rendezvous of one collective (g_lock held): this rank's `bytes` go to slot `rank`; on success
 * *all holds a malloc'ed copy of every rank's slot, in rank order. */
static ncclResult_t rendezvous(ncclComm_t comm, Call call, const unsigned char *mine, size_t bytes,
                               unsigned char **all) {
    Clique *c = comm->clique;
    struct timespec deadline = deadline_from_now();
    while (c->leaving > 0) { /* the last collective's ranks are still reading its slots */
        if (wait_until(&deadline) == ETIMEDOUT) goto timeout;
    }
    if (c->arrived == 0) {
        c->call = call;
        c->mismatch = 0;
        c->data = malloc((size_t)c->nranks * (bytes ? bytes : 1));
        if (!c->data) return ncclSystemError;
    } else if (strcmp(c->call.name, call.name) != 0 || c->call.count != call.count || c->call.dtype != call.dtype) {
        if (!c->mismatch)
            snprintf(c->mismatch_text, sizeof c->mismatch_text,
                     "ranks called different collectives: %s of %zu elements of type %d, and on rank %d %s of %zu "
                     "elements of type %d (on a GPU: a hang or corrupt memory)",
                     c->call.name, c->call.count, c->call.dtype, comm->rank, call.name, call.count, call.dtype);
        c->mismatch = 1;
    }
    if (!c->mismatch) memcpy(c->data + (size_t)comm->rank * bytes, mine, bytes);
    uint64_t mine_gen = c->done;
    if (++c->arrived == c->nranks) {
        c->done++;
        c->arrived = 0;
        c->leaving = c->nranks;
        pthread_cond_broadcast(&g_cv);
    } else {
        while (c->done == mine_gen) {
            if (wait_until(&deadline) == ETIMEDOUT) goto timeout;
        }
    }
    ncclResult_t r = ncclSuccess;
    if (c->mismatch) {
        fail(comm, "%s", c->mismatch_text);
        r = ncclInvalidUsage;
    } else {
        *all = malloc((size_t)c->nranks * (bytes ? bytes : 1));
        if (*all)
            memcpy(*all, c->data, (size_t)c->nranks * bytes);
        else
            r = ncclSystemError;
    }
    if (--c->leaving == 0) {
        free(c->data);
        c->data = NULL;
        pthread_cond_broadcast(&g_cv);
    }
    return r;
timeout:
    fail(comm, "%s: rank %d waited %d s for the other ranks (collective #%llu; on a GPU: a hang)", call.name,
         comm->rank, WAIT_SECONDS, (unsigned long long)c->done + 1);
    return ncclSystemError;
}

/* Checks that [p, p + bytes) is a live allocation of the communicator's device. */
static ncclResult_t check_buffer(ncclComm_t comm, const char *call, const char *what, const void *p, size_t bytes) {
    if (bytes == 0) return ncclSuccess;
    int d = vppo_fake_cuda_device_of((CUdeviceptr)(uintptr_t)p, bytes);
    if (d == comm->device) return ncclSuccess;
    if (d < 0)
        fail(comm, "%s (rank %d): %s [%p, +%zu bytes) is not inside a live device allocation", call, comm->rank, what,
             p, bytes);
    else
        fail(comm, "%s (rank %d): %s is on device %d, the communicator on device %d", call, comm->rank, what, d,
             comm->device);
    return ncclInvalidArgument;
}

ncclResult_t ncclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount, int datatype, ncclComm_t comm,
                           CUstream stream) {
    if (!valid_comm(comm)) {
        fail(NULL, "ncclAllGather: invalid communicator");
        return ncclInvalidArgument;
    }
    size_t elem = dtype_bytes(datatype);
    if (!elem) {
        fail(comm, "ncclAllGather: data type %d", datatype);
        return ncclInvalidArgument;
    }
    int nranks = comm->clique->nranks;
    size_t bytes = sendcount * elem;
    if (sendcount && bytes / sendcount != elem) return ncclInvalidArgument;
    ncclResult_t r;
    if ((r = check_buffer(comm, "ncclAllGather", "sendbuff", sendbuff, bytes)) ||
        (r = check_buffer(comm, "ncclAllGather", "recvbuff", recvbuff, bytes * (size_t)nranks)))
        return r;
    /* NCCL works on the communicator's device, whatever context is current. */
    CUcontext saved = NULL;
    cuCtxGetCurrent(&saved);
    if (cuCtxSetCurrent(comm->ctx)) return ncclUnhandledCudaError;
    unsigned char *mine = malloc(bytes ? bytes : 1), *all = NULL;
    if (!mine) {
        r = ncclSystemError;
        goto out;
    }
    /* Into pageable memory the copy waits for the stream's earlier work (the fake driver's rule). */
    if (bytes && cuMemcpyDtoHAsync_v2(mine, (CUdeviceptr)(uintptr_t)sendbuff, bytes, stream)) {
        fail(comm, "ncclAllGather (rank %d): reading sendbuff on its stream failed", comm->rank);
        r = ncclUnhandledCudaError;
        goto out;
    }
    pthread_mutex_lock(&g_lock);
    r = rendezvous(comm, (Call){"ncclAllGather", sendcount, datatype}, mine, bytes, &all);
    pthread_mutex_unlock(&g_lock);
    /* Queued on the stream: there for work ordered after this call (the driver stages the source). */
    if (!r && bytes * (size_t)nranks &&
        cuMemcpyHtoDAsync_v2((CUdeviceptr)(uintptr_t)recvbuff, all, bytes * (size_t)nranks, stream)) {
        fail(comm, "ncclAllGather (rank %d): writing recvbuff on its stream failed", comm->rank);
        r = ncclUnhandledCudaError;
    }
out:
    free(mine);
    free(all);
    cuCtxSetCurrent(saved);
    return r;
}
