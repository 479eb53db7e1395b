/*
 * simt.cpp: the SIMT executor's scheduler.
 *
 * A launch runs its blocks one after another on the calling OS thread. Each thread of a block is a
 * fiber with its own 64 KiB stack (plus a guard page); fibers and stacks are kept in a per-OS-thread
 * pool and reused across blocks and launches, so a fiber is created once and then only switched.
 * Dynamic shared memory ends right before an inaccessible page, so a kernel that indexes past the
 * shared memory its launch asked for faults instead of reading a neighbour's bytes.
 *
 * Context switches: a fiber is first entered with setcontext (ucontext, which also restores the signal
 * mask: one system call, once per fiber), and from then on every switch is _setjmp/_longjmp, which do
 * not touch the signal mask: a round trip measured 26 ns here against 336 ns for swapcontext (whose
 * sigprocmask is a system call). _FORTIFY_SOURCE is turned off for this file, since its __longjmp_chk
 * refuses jumps between stacks.
 *
 * Scheduling: threads run in forward (0 .. T-1) or reverse order, each until it blocks at a
 * synchronizing call or exits; then it hands the OS thread straight to the next runnable thread in that
 * order (wrapping around: one pass after another), found in a bitmap of runnable threads. Run-ahead
 * instead always hands over to the first runnable thread of the leading warp, or when it has none of the
 * warp after it, and so on: the leading warp runs until all its lanes wait at the barrier (or on a lane
 * of another warp) before any other warp runs; the lead moves to the next warp at every barrier and
 * starts at warp (block index mod warps), so every warp of a block gets ahead of the others. When no thread
 * can run, control returns to the scheduler: threads waiting at __activemask get the lanes of their warp
 * waiting at the same call; otherwise, when every thread that has not exited waits at __syncthreads, the
 * barrier opens if they all wait at the same call site and the launch stops with "divergent
 * __syncthreads" if not; otherwise it is a deadlock. A warp collective completes as soon as the last lane
 * of its mask arrives; that lane carries on without a switch.
 *
 * Race check (simt.h): the __tsan_* hooks at the end of this file record each shared-memory access of the
 * instrumented kernels in a shadow of the block's shared memory; barriers and completed warp operations
 * advance the happens-before state they compare against.
 */
#undef _FORTIFY_SOURCE /* __longjmp_chk would refuse to jump between fiber stacks */

#include "simt.h"

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <fcntl.h>
#include <link.h>
#include <new>
#include <setjmp.h>
#include <string>
#include <sys/mman.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>
#include <vector>

namespace vppo_simt {
namespace detail {

__thread uint3 t_thread_idx;
__thread uint3 t_block_idx;
__thread uint3 t_block_dim;
__thread uint3 t_grid_dim;
__thread unsigned char *t_shared;

namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr uint32_t kMaxThreads = 1024;
constexpr uint32_t kMaxSharedBytes = 227 * 1024; /* the most a block may have on sm_90 */
constexpr int kMaxListed = 8;                     /* threads named in a deadlock / divergence report */

enum State : uint8_t { RUNNABLE, AT_BARRIER, AT_WARP, AT_ACTIVEMASK, EXITED, FAULTED };

struct Fiber {
    ucontext_t uc;
    jmp_buf jb;
    unsigned char *mapping = nullptr;
    size_t mapping_len = 0;
    bool fresh = true;   /* must be entered from the top (fiber_main) */
    bool in_body = false; /* inside the kernel body: cannot be resumed once its block is abandoned */
};

/* What a thread of the running block is doing. */
struct Lane {
    State state;
    int op;
    unsigned int mask;
    int size;
    int b;
    int width;
    uint64_t value;
    uint64_t result;
    const char *file;
    int line;
};

/* Per warp: lanes waiting at a warp collective, lanes that have exited (bit l = lane l). */
struct WarpBits {
    unsigned int arrived;
    unsigned int exited;
};

struct Block {
    jmp_buf sched_jb; /* where a fiber's yield returns to */
    Fiber **fibers;   /* the pool's fibers; thread i runs on fibers[i] */
    Fiber *fiber;     /* the running fiber */
    const char *kernel;
    void (*body)(const void *);
    const void *params;
    uint32_t nthreads;
    int schedule;     /* VPPO_SIMT_FORWARD, _REVERSE or _RUN_AHEAD */
    uint32_t leader;  /* run-ahead: the warp that goes first */
    std::vector<Lane> lanes;
    std::vector<uint64_t> runnable; /* bit i: lanes[i].state == RUNNABLE */
    std::vector<WarpBits> warps;
    std::vector<uint3> tids;
    uint32_t n_exited;
    uint32_t cur;
    bool failed;
    std::string error;
};

struct Pool {
    std::vector<Fiber *> fibers;
    /* Dynamic shared memory: a mapping whose last page is inaccessible; a launch's shared memory ends
     * right before that guard page (16-byte aligned), so an access past its end faults. */
    unsigned char *shared_map = nullptr;
    size_t shared_map_len = 0;
    size_t shared_capacity = 0; /* bytes before the guard page */
    ~Pool() {
        for (Fiber *f : fibers) {
            munmap(f->mapping, f->mapping_len);
            delete f;
        }
        if (shared_map) {
            munmap(shared_map, shared_map_len);
        }
    }
};

thread_local Pool t_pool;
__thread Block *t_blk;

const char *basename_of(const char *path) {
    if (path == nullptr) {
        return "?";
    }
    const char *slash = std::strrchr(path, '/');
    return slash ? slash + 1 : path;
}

const char *op_name(int op) {
    switch (op) {
    case OP_SHFL_IDX:
        return "__shfl_sync";
    case OP_SHFL_UP:
        return "__shfl_up_sync";
    case OP_SHFL_DOWN:
        return "__shfl_down_sync";
    case OP_SHFL_XOR:
        return "__shfl_xor_sync";
    case OP_BALLOT:
        return "__ballot_sync";
    case OP_ANY:
        return "__any_sync";
    case OP_ALL:
        return "__all_sync";
    case OP_SYNCWARP:
        return "__syncwarp";
    default:
        return "warp operation";
    }
}

void appendf(std::string &s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void appendf(std::string &s, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n > 0) {
        s.append(buf, static_cast<size_t>(n) < sizeof buf ? static_cast<size_t>(n) : sizeof buf - 1);
    }
}

std::string block_prefix(const Block &b) {
    std::string s;
    appendf(s, "kernel %s: block (%u,%u,%u): ", b.kernel, t_block_idx.x, t_block_idx.y, t_block_idx.z);
    return s;
}

void append_thread(std::string &s, const Block &b, uint32_t i) {
    const uint3 &t = b.tids[i];
    appendf(s, "thread (%u,%u,%u)", t.x, t.y, t.z);
}

/* A lane's wait, for reports: "__shfl_sync (mask 0xffffffff) at file.cu:12". */
void append_wait(std::string &s, const Lane &l) {
    switch (l.state) {
    case AT_BARRIER:
        appendf(s, "__syncthreads at %s:%d", basename_of(l.file), l.line);
        break;
    case AT_ACTIVEMASK:
        appendf(s, "__activemask at %s:%d", basename_of(l.file), l.line);
        break;
    case AT_WARP:
        appendf(s, "%s (mask 0x%08x) at %s:%d", op_name(l.op), l.mask, basename_of(l.file), l.line);
        break;
    default:
        s += "nothing";
        break;
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Fibers                                                                                            */
/* ------------------------------------------------------------------------------------------------ */

void fiber_main();

inline void set_state(Block &b, uint32_t i, State st) {
    b.lanes[i].state = st;
    uint64_t bit = uint64_t{1} << (i & 63);
    if (st == RUNNABLE) {
        b.runnable[i >> 6] |= bit;
    } else {
        b.runnable[i >> 6] &= ~bit;
    }
}

/* The first runnable thread in the block's order strictly after `from` (-1: from the start), wrapping
 * around; -1 when none. Passing over the threads in order this way is one scheduler pass after another. */
int64_t next_runnable(const Block &b, int64_t from) {
    const int64_t n = b.nthreads;
    const int64_t words = static_cast<int64_t>(b.runnable.size());
    if (b.schedule == VPPO_SIMT_RUN_AHEAD) {
        /* The first runnable lane of the leading warp, else of the warp after it, ... (not `from`). */
        const uint32_t nw = static_cast<uint32_t>(b.warps.size());
        for (uint32_t k = 0; k < nw; k++) {
            const uint32_t w = (b.leader + k) % nw;
            const uint32_t bits = static_cast<uint32_t>(b.runnable[w >> 1] >> ((w & 1) * 32));
            if (bits) {
                return static_cast<int64_t>(w) * 32 + __builtin_ctz(bits);
            }
        }
        return -1;
    }
    if (b.schedule == VPPO_SIMT_FORWARD) {
        int64_t start = from + 1 >= n ? 0 : from + 1;
        for (int64_t pass = 0; pass < 2; pass++) {
            int64_t w = start >> 6;
            uint64_t bits = b.runnable[w] & (~uint64_t{0} << (start & 63));
            for (;;) {
                if (bits) {
                    return (w << 6) + __builtin_ctzll(bits);
                }
                if (++w >= words) {
                    break;
                }
                bits = b.runnable[w];
            }
            if (start == 0) {
                break;
            }
            start = 0;
        }
    } else {
        int64_t start = from < 0 || from - 1 < 0 ? n - 1 : from - 1;
        for (int64_t pass = 0; pass < 2; pass++) {
            int64_t w = start >> 6;
            int sh = 63 - static_cast<int>(start & 63);
            uint64_t bits = b.runnable[w] & (~uint64_t{0} >> sh);
            for (;;) {
                if (bits) {
                    return (w << 6) + 63 - __builtin_clzll(bits);
                }
                if (--w < 0) {
                    break;
                }
                bits = b.runnable[w];
            }
            if (start == n - 1) {
                break;
            }
            start = n - 1;
        }
    }
    return -1;
}

/* Switches to thread i: its fiber is entered from the top when fresh, else where it left off. */
[[noreturn]] void enter(Block &b, uint32_t i) {
    Fiber *f = b.fibers[i];
    b.fiber = f;
    b.cur = i;
    t_thread_idx = b.tids[i];
    if (f->fresh) {
        f->fresh = false;
        getcontext(&f->uc);
        f->uc.uc_stack.ss_sp = f->mapping + static_cast<size_t>(sysconf(_SC_PAGESIZE));
        f->uc.uc_stack.ss_size = kStackBytes;
        f->uc.uc_link = nullptr;
        makecontext(&f->uc, fiber_main, 0);
        setcontext(&f->uc);
        std::abort(); /* setcontext returns only on failure, which cannot happen for a made context */
    }
    _longjmp(f->jb, 1);
}

/* The running thread has blocked or exited (its state says which): hand the OS thread straight to the
 * next runnable thread, or back to the scheduler when there is none. Returns when this thread is
 * resumed. */
[[noreturn]] void hand_over(Block &b) {
    int64_t next = b.failed ? -1 : next_runnable(b, b.cur);
    if (next < 0) {
        _longjmp(b.sched_jb, 1);
    }
    enter(b, static_cast<uint32_t>(next));
}

__attribute__((noinline)) void yield_to_scheduler(Block &b) {
    if (_setjmp(b.fiber->jb) == 0) {
        hand_over(b);
    }
}

/* From the scheduler: runs thread i and whatever it hands over to, until control comes back. */
__attribute__((noinline)) void resume(Block &b, uint32_t i) {
    if (_setjmp(b.sched_jb) == 0) {
        enter(b, i);
    }
}

/* Stops the launch: records the message and leaves this fiber suspended for good. */
[[noreturn]] void fail(std::string msg) {
    Block &b = *t_blk;
    if (!b.failed) {
        b.failed = true;
        b.error = std::move(msg);
    }
    set_state(b, b.cur, FAULTED);
    yield_to_scheduler(b); /* b.failed: straight back to the scheduler */
    /* The scheduler never resumes a faulted fiber (it is restarted from the top on its next use). */
    std::abort();
}

std::string thread_error(const Block &b, uint32_t i, const char *what, const char *file, int line) {
    std::string s = block_prefix(b);
    append_thread(s, b, i);
    appendf(s, ": %s at %s:%d: ", what, basename_of(file), line);
    return s;
}

void thread_exit() {
    Block &b = *t_blk;
    uint32_t i = b.cur;
    set_state(b, i, EXITED);
    b.n_exited++;
    uint32_t base = i & ~31u;
    WarpBits &w = b.warps[i >> 5];
    w.exited |= 1u << (i - base);
    /* A lane of this warp waiting for this one at a warp collective can never complete. */
    for (unsigned int m = w.arrived; m; m &= m - 1) {
        uint32_t j = base + static_cast<uint32_t>(__builtin_ctz(m));
        const Lane &l = b.lanes[j];
        if ((l.mask >> (i - base)) & 1u) {
            std::string s = thread_error(b, j, op_name(l.op), l.file, l.line);
            appendf(s, "mask 0x%08x names lane %u, which exited without reaching it", l.mask, i - base);
            fail(std::move(s));
        }
    }
}

void fiber_main() {
    for (;;) {
        Block *b = t_blk;
        b->fiber->in_body = true;
        b->body(b->params);
        thread_exit(); /* may stop the launch: in_body stays set, so the fiber restarts from the top */
        b->fiber->in_body = false;
        yield_to_scheduler(*b);
    }
}

bool ensure_fibers(uint32_t n, std::string &err) {
    long page = sysconf(_SC_PAGESIZE);
    while (t_pool.fibers.size() < n) {
        size_t len = kStackBytes + static_cast<size_t>(page);
        void *m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (m == MAP_FAILED) {
            err = "cannot map a fiber stack";
            return false;
        }
        if (mprotect(m, static_cast<size_t>(page), PROT_NONE) != 0) { /* the guard page, below the stack */
            munmap(m, len);
            err = "cannot protect a fiber stack's guard page";
            return false;
        }
        Fiber *f = new (std::nothrow) Fiber();
        if (f == nullptr) {
            munmap(m, len);
            err = "out of memory for fibers";
            return false;
        }
        f->mapping = static_cast<unsigned char *>(m);
        f->mapping_len = len;
        t_pool.fibers.push_back(f);
    }
    return true;
}

/* Points t_shared at n bytes (rounded up to 16) that end right before the pool's guard page. */
bool ensure_shared(size_t n, std::string &err) {
    n = (n + 15) / 16 * 16;
    if (n == 0) {
        n = 16;
    }
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    if (t_pool.shared_capacity < n) {
        const size_t capacity = (n + page - 1) / page * page;
        const size_t len = capacity + page;
        void *m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            err = "cannot map shared memory";
            return false;
        }
        unsigned char *map = static_cast<unsigned char *>(m);
        if (mprotect(map + capacity, page, PROT_NONE) != 0) {
            munmap(m, len);
            err = "cannot protect the shared memory guard page";
            return false;
        }
        if (t_pool.shared_map) {
            munmap(t_pool.shared_map, t_pool.shared_map_len);
        }
        t_pool.shared_map = map;
        t_pool.shared_map_len = len;
        t_pool.shared_capacity = capacity;
    }
    t_shared = t_pool.shared_map + t_pool.shared_capacity - n;
    return true;
}

/* ------------------------------------------------------------------------------------------------ */
/* Test mode                                                                                         */
/* ------------------------------------------------------------------------------------------------ */

struct ModeState {
    bool init = false;
    VppoSimtTestMode mode{0, 0};
    std::string env_error; /* a bad environment variable: every launch of this thread reports it */
};
thread_local ModeState t_mode;

ModeState &mode_state() {
    ModeState &m = t_mode;
    if (!m.init) {
        m.init = true;
        const char *cap = std::getenv("VPPO_SIMT_GRID_CAP");
        if (cap != nullptr && *cap != '\0') {
            char *end = nullptr;
            errno = 0;
            unsigned long v = std::strtoul(cap, &end, 10);
            if (errno != 0 || *end != '\0' || v > 0xffffffffu || cap[0] == '-') {
                m.env_error = std::string("VPPO_SIMT_GRID_CAP=") + cap + " is not a block count (0: no cap)";
            } else {
                m.mode.grid_cap = static_cast<uint32_t>(v);
            }
        }
        const char *rc = std::getenv("VPPO_SIMT_RACE_CHECK");
        if (rc != nullptr && *rc != '\0') {
            if (std::strcmp(rc, "0") == 0 || std::strcmp(rc, "1") == 0) {
                m.mode.race_check = rc[0] - '0';
            } else {
                m.env_error = std::string("VPPO_SIMT_RACE_CHECK=") + rc + " is neither 0 nor 1";
            }
        }
    }
    return m;
}

/* ------------------------------------------------------------------------------------------------ */
/* Race check: the shadow of the running block's shared memory                                       */
/* ------------------------------------------------------------------------------------------------ */

enum AccessKind : int { ACC_READ = 0, ACC_WRITE = 1, ACC_ATOMIC = 2 };

/* Per byte of shared memory. An epoch is the stretch between two barriers (numbered per OS thread,
 * never reused, so old records are recognised without clearing them); a record of an older epoch
 * is ordered before everything now. */
struct ByteShadow {
    uint32_t w_epoch; /* the last plain write: its epoch (0: none), ... */
    uint32_t w_clock; /* ... the writer's clock, ... */
    uint32_t seq;     /* plain writes to this byte so far: the read entries below are of this seq */
    uint32_t r_epoch; /* the counts below are of (r_epoch, r_seq) */
    uint32_t r_seq;
    uint16_t w_tid;      /* ... and the writer */
    uint16_t last_entry; /* thread of the latest read or atomic entry */
    uint16_t n_reads;    /* threads with a read entry since the last plain write */
    uint16_t n_atomics;  /* threads with an atomic entry since the last plain write */
    const void *w_pc;
};

/* Thread t's reads and atomics of byte x since its last plain write, in epoch `epoch` (entries[x*T+t]). */
struct Entry {
    uint32_t epoch, seq;
    uint32_t read_clock, atomic_clock; /* 0: none */
    const void *read_pc;
    const void *atomic_pc;
};

struct RaceState {
    unsigned char *base = nullptr; /* the block's shared memory */
    size_t bytes = 0;
    uint32_t nthreads = 0;
    uint32_t epoch = 0;
    int suppress = 0; /* inside an atomic: its own loads and stores are not recorded */
    /* Vector clocks over the lanes of each warp, reset at every barrier: vc[t * 32 + l] is what thread t
     * has seen of lane l of its warp; vc[t * 32 + (t & 31)] is t's own clock (>= 1). */
    std::vector<uint32_t> vc;
    ByteShadow *shadow = nullptr;
    size_t shadow_cap = 0;
    Entry *entries = nullptr;
    size_t entries_cap = 0;
    const void *report_pc[2] = {nullptr, nullptr};
    ~RaceState() {
        if (shadow) munmap(shadow, shadow_cap * sizeof(ByteShadow));
        if (entries) munmap(entries, entries_cap * sizeof(Entry));
    }
};
thread_local RaceState t_race_state;
__thread RaceState *t_race; /* non-null while a race-checked block runs */

constexpr uint64_t kMaxRaceEntries = uint64_t{1} << 26; /* shared bytes x threads: 2 GiB of entries */

template <class T> bool grow(T *&p, size_t &cap, size_t want) {
    if (cap >= want) {
        return true;
    }
    if (p) {
        munmap(p, cap * sizeof(T));
        p = nullptr;
        cap = 0;
    }
    /* Fresh zero pages, touched only where the kernel's accesses land; zeros are records of epoch 0. */
    void *m = mmap(nullptr, want * sizeof(T), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) {
        return false;
    }
    p = static_cast<T *>(m);
    cap = want;
    return true;
}

/* Sizes the shadow for a launch; false with a message when it cannot. */
bool race_prepare(size_t shared_bytes, uint32_t nthreads, std::string &err) {
    RaceState &rs = t_race_state;
    const uint64_t n_entries = static_cast<uint64_t>(shared_bytes) * nthreads;
    if (n_entries > kMaxRaceEntries) {
        appendf(err, "the race check keeps a record per shared byte and thread: %zu bytes x %u threads is over its "
                     "limit of %llu",
                shared_bytes, nthreads, static_cast<unsigned long long>(kMaxRaceEntries));
        return false;
    }
    if (!grow(rs.shadow, rs.shadow_cap, shared_bytes > 0 ? shared_bytes : 1) ||
        !grow(rs.entries, rs.entries_cap, n_entries > 0 ? n_entries : 1)) {
        err = "cannot map the race check's shadow memory";
        return false;
    }
    rs.nthreads = nthreads;
    rs.bytes = shared_bytes;
    rs.vc.assign(static_cast<size_t>(nthreads) * 32, 0);
    return true;
}

/* A new epoch: everything so far is ordered before everything after (a barrier, or a new block). */
void race_new_epoch(RaceState &rs) {
    rs.epoch++;
    std::fill(rs.vc.begin(), rs.vc.end(), 0u);
    for (uint32_t t = 0; t < rs.nthreads; t++) {
        rs.vc[static_cast<size_t>(t) * 32 + (t & 31)] = 1;
    }
}

/* The lanes of `mask` of the warp at `base` completed a warp operation: each has now seen what all of
 * them did before it, and its own clock moves on. */
void race_warp_sync(RaceState &rs, uint32_t base, unsigned int mask) {
    uint32_t joined[32] = {};
    for (unsigned int m = mask; m; m &= m - 1) {
        const uint32_t *v = &rs.vc[static_cast<size_t>(base + __builtin_ctz(m)) * 32];
        for (int l = 0; l < 32; l++) {
            joined[l] = joined[l] > v[l] ? joined[l] : v[l];
        }
    }
    for (unsigned int m = mask; m; m &= m - 1) {
        const int lane = __builtin_ctz(m);
        uint32_t *v = &rs.vc[static_cast<size_t>(base + lane) * 32];
        std::memcpy(v, joined, sizeof joined);
        v[lane] = joined[lane] + 1;
    }
}

/* Did thread t1's access at its clock c1 (this epoch) happen before what thread t2 does now? */
inline bool ordered(const RaceState &rs, uint32_t t1, uint32_t c1, uint32_t t2) {
    return t1 == t2 || ((t1 >> 5) == (t2 >> 5) && rs.vc[static_cast<size_t>(t2) * 32 + (t1 & 31)] >= c1);
}

[[noreturn]] void race_report(RaceState &rs, size_t byte, int kind, const void *pc, int other_kind,
                              uint32_t other, const void *other_pc);

/* Checks thread t's access of `kind` to shared byte x against what is recorded, then records it. */
void race_byte(RaceState &rs, uint32_t t, size_t x, int kind, const void *pc) {
    const uint32_t e = rs.epoch;
    const uint32_t clock = rs.vc[static_cast<size_t>(t) * 32 + (t & 31)];
    ByteShadow &s = rs.shadow[x];
    if (s.r_epoch != e || s.r_seq != s.seq) {
        s.r_epoch = e;
        s.r_seq = s.seq;
        s.n_reads = 0;
        s.n_atomics = 0;
    }
    /* Any access conflicts with another thread's plain write. */
    if (s.w_epoch == e && !ordered(rs, s.w_tid, s.w_clock, t)) {
        race_report(rs, x, kind, pc, ACC_WRITE, s.w_tid, s.w_pc);
    }
    /* A write or an atomic conflicts with plain reads; a read or a write with atomics. */
    const bool vs_reads = kind != ACC_READ && s.n_reads > 0;
    const bool vs_atomics = kind != ACC_ATOMIC && s.n_atomics > 0;
    if (vs_reads || vs_atomics) {
        const uint32_t T = rs.nthreads;
        uint32_t first = 0, end = T;
        if (s.n_reads + s.n_atomics == 1) { /* one thread's entry: only it */
            first = s.last_entry;
            end = first + 1u;
        }
        for (uint32_t o = first; o < end; o++) {
            if (o == t) {
                continue;
            }
            const Entry &en = rs.entries[x * T + o];
            if (en.epoch != e || en.seq != s.seq) {
                continue;
            }
            if (vs_reads && en.read_clock && !ordered(rs, o, en.read_clock, t)) {
                race_report(rs, x, kind, pc, ACC_READ, o, en.read_pc);
            }
            if (vs_atomics && en.atomic_clock && !ordered(rs, o, en.atomic_clock, t)) {
                race_report(rs, x, kind, pc, ACC_ATOMIC, o, en.atomic_pc);
            }
        }
    }
    if (kind == ACC_WRITE) {
        s.w_epoch = e;
        s.w_clock = clock;
        s.w_tid = static_cast<uint16_t>(t);
        s.w_pc = pc;
        s.seq++; /* the reads before it are ordered before it: later accesses check against it alone */
        s.r_seq = s.seq;
        s.n_reads = 0;
        s.n_atomics = 0;
        return;
    }
    Entry &en = rs.entries[x * rs.nthreads + t];
    if (en.epoch != e || en.seq != s.seq) {
        en.epoch = e;
        en.seq = s.seq;
        en.read_clock = 0;
        en.atomic_clock = 0;
    }
    if (kind == ACC_READ) {
        s.n_reads = static_cast<uint16_t>(s.n_reads + (en.read_clock == 0));
        en.read_clock = clock;
        en.read_pc = pc;
    } else {
        s.n_atomics = static_cast<uint16_t>(s.n_atomics + (en.atomic_clock == 0));
        en.atomic_clock = clock;
        en.atomic_pc = pc;
    }
    s.last_entry = static_cast<uint16_t>(t);
}

/* An instrumented access of n bytes at addr by the running thread (from the __tsan_* hooks). */
inline void race_access(const void *addr, size_t n, int kind, const void *pc) {
    RaceState *rs = t_race;
    if (rs == nullptr || rs->suppress) {
        return;
    }
    const uintptr_t a = reinterpret_cast<uintptr_t>(addr), base = reinterpret_cast<uintptr_t>(rs->base);
    if (a >= base + rs->bytes || a + n <= base) {
        return; /* not shared memory */
    }
    const size_t lo = a < base ? 0 : a - base;
    const size_t hi = a + n - base < rs->bytes ? a + n - base : rs->bytes;
    const uint32_t t = t_blk->cur;
    for (size_t x = lo; x < hi; x++) {
        race_byte(*rs, t, x, kind, pc);
    }
}

/* The object file holding code address pc (its path; the main program's through /proc/self/exe) and
 * the address to look up in it; false when none holds it. */
bool object_of(const void *pc, std::string &path, uintptr_t &addr) {
    struct Found {
        uintptr_t pc;
        uintptr_t bias = 0;
        std::string path;
        bool found = false;
    } f;
    f.pc = reinterpret_cast<uintptr_t>(pc);
    dl_iterate_phdr(
        [](struct dl_phdr_info *info, size_t, void *data) -> int {
            Found &fd = *static_cast<Found *>(data);
            for (int i = 0; i < info->dlpi_phnum; i++) {
                const ElfW(Phdr) &ph = info->dlpi_phdr[i];
                const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
                if (ph.p_type == PT_LOAD && fd.pc >= lo && fd.pc < lo + ph.p_memsz) {
                    fd.bias = info->dlpi_addr;
                    fd.path = info->dlpi_name && info->dlpi_name[0] ? info->dlpi_name : "";
                    fd.found = true;
                    return 1;
                }
            }
            return 0;
        },
        &f);
    if (!f.found) {
        return false;
    }
    if (f.path.empty()) { /* the main program (not /proc/self/exe itself, which addr2line would read as itself) */
        char exe[4096];
        ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
        if (len <= 0) {
            return false;
        }
        f.path.assign(exe, static_cast<size_t>(len));
    }
    path = f.path;
    addr = f.pc - f.bias - 1; /* a return address: the call is the byte before */
    return true;
}

/* The output of `addr2line -a -i -e path addrs...`, or "" when it cannot run. */
std::string run_addr2line(const std::string &path, const std::vector<std::string> &addrs) {
    int fds[2];
    if (pipe(fds) != 0) {
        return "";
    }
    std::vector<const char *> argv = {"addr2line", "-a", "-i", "-e", path.c_str()};
    for (const std::string &a : addrs) {
        argv.push_back(a.c_str());
    }
    argv.push_back(nullptr);
    pid_t child = fork();
    if (child == 0) {
        dup2(fds[1], 1);
        int devnull = ::open("/dev/null", O_WRONLY);
        if (devnull >= 0) {
            dup2(devnull, 2);
        }
        close(fds[0]);
        close(fds[1]);
        execvp("addr2line", const_cast<char *const *>(argv.data()));
        _exit(127);
    }
    close(fds[1]);
    std::string out;
    char buf[512];
    ssize_t n;
    while (child > 0 && (n = read(fds[0], buf, sizeof buf)) > 0) {
        out.append(buf, static_cast<size_t>(n));
    }
    close(fds[0]);
    if (child > 0) {
        int st = 0;
        waitpid(child, &st, 0);
    }
    return out;
}

/* Where return addresses into the instrumented code are, each as "file:line", or "file:line (in
 * file:line)" when inlined into another file's code; by addr2line over the line tables. Frames in simt.h
 * (the executor's own atomics) are skipped. */
std::vector<std::string> source_lines(const std::vector<const void *> &pcs) {
    std::vector<std::string> result(pcs.size());
    std::vector<std::string> paths(pcs.size()), addrs(pcs.size());
    for (size_t k = 0; k < pcs.size(); k++) {
        char hex[32];
        std::snprintf(hex, sizeof hex, "%p", pcs[k]);
        uintptr_t addr = 0;
        if (pcs[k] == nullptr || !object_of(pcs[k], paths[k], addr)) {
            result[k] = pcs[k] == nullptr ? "an unknown place" : std::string("pc ") + hex;
            continue;
        }
        char a[32];
        std::snprintf(a, sizeof a, "0x%llx", static_cast<unsigned long long>(addr));
        addrs[k] = a;
        result[k] = std::string("pc ") + hex + " (" + paths[k] + "+" + a + ", no line information)";
    }
    for (size_t k = 0; k < pcs.size(); k++) {
        if (addrs[k].empty() || (k > 0 && paths[k] == paths[0] && !addrs[0].empty())) {
            continue; /* done with the first one's call */
        }
        std::vector<size_t> group;
        std::vector<std::string> group_addrs;
        for (size_t j = k; j < pcs.size(); j++) {
            if (!addrs[j].empty() && paths[j] == paths[k]) {
                group.push_back(j);
                group_addrs.push_back(addrs[j]);
            }
        }
        const std::string out = run_addr2line(paths[k], group_addrs);
        /* -a: each address's frames follow a line with the address; -i: innermost frame first; a frame
         * is "file:line" or "file:line (discriminator n)", "??:0" when unknown. */
        std::vector<std::vector<std::string>> frames(group.size());
        int g = -1;
        size_t pos = 0;
        while (pos < out.size()) {
            size_t nl = out.find('\n', pos);
            std::string line = out.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
            pos = nl == std::string::npos ? out.size() : nl + 1;
            if (line.compare(0, 2, "0x") == 0) {
                g++;
                continue;
            }
            if (g < 0 || g >= static_cast<int>(group.size())) {
                continue;
            }
            size_t sp = line.find(' ');
            if (sp != std::string::npos) {
                line.resize(sp);
            }
            size_t colon = line.rfind(':');
            if (line.empty() || line[0] == '?' || colon == std::string::npos || line.compare(colon, 2, ":?") == 0 ||
                line.substr(colon) == ":0") {
                continue;
            }
            const char *base = basename_of(line.c_str());
            if (std::strncmp(base, "simt.h:", 7) == 0) {
                continue;
            }
            frames[static_cast<size_t>(g)].push_back(base);
        }
        for (size_t m = 0; m < group.size(); m++) {
            const std::vector<std::string> &fr = frames[m];
            if (fr.empty()) {
                continue;
            }
            std::string r = fr.front();
            const std::string &outer = fr.back();
            if (outer.substr(0, outer.find(':')) != r.substr(0, r.find(':'))) {
                r += " (in " + outer + ")";
            }
            result[group[m]] = r;
        }
    }
    return result;
}

const char *kind_present(int kind) {
    return kind == ACC_READ ? "reads" : kind == ACC_WRITE ? "writes" : "does an atomic on";
}
const char *kind_past(int kind) {
    return kind == ACC_READ ? "read" : kind == ACC_WRITE ? "wrote" : "did an atomic on";
}

/* Stops the launch with a race report; the two source lines are filled in by run_launch, outside the
 * fiber (addr2line runs as a child process). */
[[noreturn]] void race_report(RaceState &rs, size_t byte, int kind, const void *pc, int other_kind,
                              uint32_t other, const void *other_pc) {
    Block &b = *t_blk;
    rs.report_pc[0] = pc;
    rs.report_pc[1] = other_pc;
    t_race = nullptr; /* one report per launch */
    std::string s = block_prefix(b);
    appendf(s, "race on shared memory byte %zu (of %zu): ", byte, rs.bytes);
    append_thread(s, b, b.cur);
    appendf(s, " %s it at \x01, and ", kind_present(kind));
    append_thread(s, b, other);
    appendf(s, " %s it at \x02, with no __syncthreads, warp operation or atomic ordering the two",
            kind_past(other_kind));
    fail(std::move(s));
}

/* ------------------------------------------------------------------------------------------------ */
/* Warp collectives                                                                                  */
/* ------------------------------------------------------------------------------------------------ */

/* All lanes of `mask` (warp starting at `base`) have arrived: compute every lane's result per the PTX
 * definition of shfl.sync / vote.sync / bar.warp.sync, and make them runnable. */
void complete_warp_op(Block &b, uint32_t base, unsigned int mask) {
    const Lane &first = b.lanes[base + static_cast<uint32_t>(__builtin_ctz(mask))];
    int op = first.op;
    if (op == OP_BALLOT || op == OP_ANY || op == OP_ALL) {
        unsigned int ballot = 0;
        for (unsigned int m = mask; m; m &= m - 1) {
            uint32_t l = static_cast<uint32_t>(__builtin_ctz(m));
            if (b.lanes[base + l].value != 0) {
                ballot |= 1u << l;
            }
        }
        uint64_t r = op == OP_BALLOT ? ballot : op == OP_ANY ? (ballot != 0) : (ballot == mask);
        for (unsigned int m = mask; m; m &= m - 1) {
            b.lanes[base + static_cast<uint32_t>(__builtin_ctz(m))].result = r;
        }
    } else if (op != OP_SYNCWARP) {
        /* shfl.sync: c = ((32 - width) << 8) | clamp, segmask = c[12:8], clamp 0 for .up, 31 otherwise. */
        int segmask = 32 - first.width;
        for (unsigned int m = mask; m; m &= m - 1) {
            int l = __builtin_ctz(m);
            Lane &lane = b.lanes[base + static_cast<uint32_t>(l)];
            int bval = lane.b & 31;
            int min_lane = l & segmask;
            int clamp = op == OP_SHFL_UP ? 0 : 31;
            int max_lane = min_lane | (clamp & ~segmask);
            int j = l;
            bool p = false;
            switch (op) {
            case OP_SHFL_UP:
                j = l - bval;
                p = j >= max_lane;
                break;
            case OP_SHFL_DOWN:
                j = l + bval;
                p = j <= max_lane;
                break;
            case OP_SHFL_XOR:
                j = l ^ bval;
                p = j <= max_lane;
                break;
            default: /* OP_SHFL_IDX */
                j = min_lane | (bval & ~segmask);
                p = j <= max_lane;
                break;
            }
            if (!p) {
                j = l; /* out of the subsection: the lane keeps its own value */
            }
            if (!((mask >> j) & 1u)) {
                b.cur = base + static_cast<uint32_t>(l); /* name the reading thread */
                std::string s = thread_error(b, base + static_cast<uint32_t>(l), op_name(op), lane.file, lane.line);
                appendf(s, "lane %d reads lane %d, which is not in mask 0x%08x", l, j, mask);
                fail(std::move(s));
            }
            lane.result = b.lanes[base + static_cast<uint32_t>(j)].value;
        }
    }
    if (t_race != nullptr) {
        race_warp_sync(*t_race, base, mask);
    }
    for (unsigned int m = mask; m; m &= m - 1) {
        set_state(b, base + static_cast<uint32_t>(__builtin_ctz(m)), RUNNABLE);
    }
    b.warps[base >> 5].arrived &= ~mask;
}

/* Lane i arrives at (op, mask, size, width) where lane o waits and one names the other. */
void check_meet(Block &b, uint32_t i, const Lane &o, int op, unsigned int mask, int size, int width,
                const char *file, int line) {
    uint32_t l = static_cast<uint32_t>(&o - &b.lanes[i & ~31u]);
    if (o.mask != mask) {
        std::string s = thread_error(b, i, op_name(op), file, line);
        appendf(s, "masks disagree: this lane's mask is 0x%08x, lane %u waits at %s:%d with mask 0x%08x", mask, l,
                basename_of(o.file), o.line, o.mask);
        fail(std::move(s));
    }
    if (o.op != op || o.size != size || o.width != width) {
        std::string s = thread_error(b, i, op_name(op), file, line);
        appendf(s,
                "lanes meet at different warp operations: lane %u waits at %s (%d bytes, width %d) at %s:%d, "
                "this lane has %d bytes, width %d",
                l, op_name(o.op), o.size, o.width, basename_of(o.file), o.line, size, width);
        fail(std::move(s));
    }
}

} // namespace

uint64_t warp_op(int op, unsigned int mask, uint64_t value, int size, int b_arg, int width, const char *file,
                 int line) {
    Block &b = *t_blk;
    uint32_t i = b.cur;
    uint32_t base = i & ~31u;
    uint32_t lane = i - base;
    uint32_t n_lanes = b.nthreads - base < 32 ? b.nthreads - base : 32;
    unsigned int valid = n_lanes == 32 ? 0xffffffffu : (1u << n_lanes) - 1u;
    const char *name = op_name(op);

    if (!((mask >> lane) & 1u)) {
        std::string s = thread_error(b, i, name, file, line);
        appendf(s, "mask 0x%08x does not include the calling lane %u", mask, lane);
        fail(std::move(s));
    }
    if (mask & ~valid) {
        std::string s = thread_error(b, i, name, file, line);
        appendf(s, "mask 0x%08x names lanes outside the warp (it has %u lanes: 0x%08x)", mask, n_lanes, valid);
        fail(std::move(s));
    }
    if (op <= OP_SHFL_XOR && (width < 1 || width > 32 || (width & (width - 1)) != 0)) {
        std::string s = thread_error(b, i, name, file, line);
        appendf(s, "width %d is not a power of two in [1, 32]", width);
        fail(std::move(s));
    }
    WarpBits &w = b.warps[i >> 5];
    if (w.exited & mask) {
        std::string s = thread_error(b, i, name, file, line);
        appendf(s, "mask 0x%08x names lane %d, which has exited", mask, __builtin_ctz(w.exited & mask));
        fail(std::move(s));
    }
    /* Invariant: two waiting lanes P, Q with Q in P's mask have the same mask, operation and width.
     * (a) The waiting lanes of this mask: checking the lowest is enough, by the invariant. */
    unsigned int overlap = w.arrived & mask;
    if (overlap) {
        const Lane &o = b.lanes[base + static_cast<uint32_t>(__builtin_ctz(overlap))];
        check_meet(b, i, o, op, mask, size, width, file, line);
    }
    /* (b) Waiting lanes outside this mask whose own mask names this lane. */
    for (unsigned int m = w.arrived & ~mask; m; m &= m - 1) {
        const Lane &o = b.lanes[base + static_cast<uint32_t>(__builtin_ctz(m))];
        if ((o.mask >> lane) & 1u) {
            check_meet(b, i, o, op, mask, size, width, file, line);
        }
    }

    Lane &me = b.lanes[i];
    me.op = op;
    me.mask = mask;
    me.size = size;
    me.b = b_arg;
    me.width = width;
    me.value = value;
    me.file = file;
    me.line = line;
    set_state(b, i, AT_WARP);
    w.arrived |= 1u << lane;

    if ((w.arrived & mask) == mask) {
        complete_warp_op(b, base, mask);
        b.cur = i;
    } else {
        yield_to_scheduler(b);
    }
    return b.lanes[i].result;
}

unsigned int activemask(const char *file, int line) {
    Block &b = *t_blk;
    Lane &me = b.lanes[b.cur];
    me.file = file;
    me.line = line;
    set_state(b, b.cur, AT_ACTIVEMASK);
    uint32_t i = b.cur;
    yield_to_scheduler(b);
    return static_cast<unsigned int>(b.lanes[i].result);
}

void misaligned(const void *p, size_t align, const char *file, int line) {
    Block &b = *t_blk;
    std::string s = thread_error(b, b.cur, "misaligned global access", file, line);
    appendf(s, "address %p is not %zu-byte aligned", p, align);
    fail(std::move(s));
}

void syncthreads(const char *file, int line) {
    Block &b = *t_blk;
    Lane &me = b.lanes[b.cur];
    me.file = file;
    me.line = line;
    set_state(b, b.cur, AT_BARRIER);
    yield_to_scheduler(b);
}

namespace {

/* No thread is runnable. Returns false (with the error set) when the block cannot go on. */
bool resolve_quiescent(Block &b) {
    /* __activemask: the lanes of a warp waiting at the same call are the converged ones. */
    bool released = false;
    for (uint32_t i = 0; i < b.nthreads; i++) {
        Lane &l = b.lanes[i];
        if (l.state != AT_ACTIVEMASK) {
            continue;
        }
        uint32_t base = i & ~31u;
        uint32_t end = base + 32 < b.nthreads ? base + 32 : b.nthreads;
        unsigned int group = 0;
        for (uint32_t j = i; j < end; j++) {
            const Lane &o = b.lanes[j];
            if (o.state == AT_ACTIVEMASK && o.line == l.line && std::strcmp(o.file, l.file) == 0) {
                group |= 1u << (j - base);
            }
        }
        for (unsigned int m = group; m; m &= m - 1) {
            uint32_t j = base + static_cast<uint32_t>(__builtin_ctz(m));
            b.lanes[j].result = group;
            set_state(b, j, RUNNABLE);
        }
        released = true;
    }
    if (released) {
        return true;
    }

    /* __syncthreads: exited threads count as arrived. */
    bool all_at_barrier = true;
    const Lane *site = nullptr;
    bool same_site = true;
    for (uint32_t i = 0; i < b.nthreads; i++) {
        const Lane &l = b.lanes[i];
        if (l.state == EXITED) {
            continue;
        }
        if (l.state != AT_BARRIER) {
            all_at_barrier = false;
            break;
        }
        if (site == nullptr) {
            site = &l;
        } else if (l.line != site->line || std::strcmp(l.file, site->file) != 0) {
            same_site = false;
        }
    }
    if (all_at_barrier && same_site) {
        for (uint32_t i = 0; i < b.nthreads; i++) {
            if (b.lanes[i].state == AT_BARRIER) {
                set_state(b, i, RUNNABLE);
            }
        }
        if (t_race != nullptr) {
            race_new_epoch(*t_race);
        }
        b.leader = (b.leader + 1) % static_cast<uint32_t>(b.warps.size());
        return true;
    }

    /* Name the first thread of each distinct wait, in linear order. */
    std::string s = block_prefix(b);
    s += all_at_barrier ? "divergent __syncthreads: " : "deadlock: ";
    std::vector<uint32_t> shown;
    uint32_t waiting = 0;
    for (uint32_t i = 0; i < b.nthreads; i++) {
        const Lane &l = b.lanes[i];
        if (l.state == EXITED) {
            continue;
        }
        waiting++;
        bool seen = false;
        for (uint32_t k : shown) {
            const Lane &o = b.lanes[k];
            if (o.state == l.state && o.line == l.line && std::strcmp(o.file, l.file) == 0 &&
                (l.state != AT_WARP || (o.op == l.op && o.mask == l.mask && (k >> 5) == (i >> 5)))) {
                seen = true;
                break;
            }
        }
        if (seen || shown.size() >= static_cast<size_t>(kMaxListed)) {
            continue;
        }
        if (!shown.empty()) {
            s += ", ";
        }
        shown.push_back(i);
        append_thread(s, b, i);
        if (all_at_barrier) {
            appendf(s, " waits at %s:%d", basename_of(l.file), l.line);
        } else {
            s += " waits at ";
            append_wait(s, l);
        }
    }
    appendf(s, " (%u of %u threads waiting)", waiting, b.nthreads);
    b.failed = true;
    b.error = std::move(s);
    return false;
}

/* Runs the current block (t_block_idx) to completion. */
bool run_block(Block &b) {
    for (uint32_t i = 0; i < b.nthreads; i++) {
        set_state(b, i, RUNNABLE);
    }
    for (WarpBits &w : b.warps) {
        w.arrived = 0;
        w.exited = 0;
    }
    b.n_exited = 0;
    b.failed = false;
    const uint32_t block_linear = t_block_idx.x + t_grid_dim.x * (t_block_idx.y + t_grid_dim.y * t_block_idx.z);
    b.leader = block_linear % static_cast<uint32_t>(b.warps.size());
    if (t_race != nullptr) {
        race_new_epoch(*t_race);
    }
    for (;;) {
        /* A new pass from the first thread in order; the threads hand over to each other directly and
         * control comes back here only when none can run. */
        int64_t first = next_runnable(b, -1);
        if (first >= 0) {
            resume(b, static_cast<uint32_t>(first));
            if (b.failed) {
                return false;
            }
            continue;
        }
        if (b.n_exited == b.nthreads) {
            return true;
        }
        if (!resolve_quiescent(b)) {
            return false;
        }
    }
}

int report(const std::string &msg, char *err, size_t err_len) {
    if (err != nullptr && err_len > 0) {
        size_t n = msg.size() < err_len - 1 ? msg.size() : err_len - 1;
        std::memcpy(err, msg.data(), n);
        err[n] = '\0';
    }
    return 1;
}

} // namespace

int run_launch(const char *kernel_name, const VppoSimtLaunch *launch, void (*body)(const void *),
               const void *params, char *err, size_t err_len, bool race_check) {
    std::string e;
    /* The race-check build's kernels are named k_racecheck (build/simt.rs): report them as k. */
    std::string name_buf(kernel_name);
    static const char kSuffix[] = "_racecheck";
    if (race_check && name_buf.size() > sizeof kSuffix - 1 &&
        name_buf.compare(name_buf.size() - (sizeof kSuffix - 1), sizeof kSuffix - 1, kSuffix) == 0) {
        name_buf.resize(name_buf.size() - (sizeof kSuffix - 1));
    }
    const char *kernel = name_buf.c_str();
    if (launch == nullptr) {
        return report(std::string("kernel ") + kernel + ": invalid launch: no launch description", err, err_len);
    }
    const ModeState &mode = mode_state();
    if (!mode.env_error.empty()) {
        return report(std::string("kernel ") + kernel + ": " + mode.env_error, err, err_len);
    }
    const VppoSimtLaunch &L = *launch;
    uint64_t nthreads = static_cast<uint64_t>(L.block_x) * L.block_y * L.block_z;
    if (L.grid_x == 0 || L.grid_y == 0 || L.grid_z == 0 || L.block_x == 0 || L.block_y == 0 || L.block_z == 0) {
        appendf(e, "kernel %s: invalid launch: grid (%u,%u,%u), block (%u,%u,%u): every dimension must be >= 1", kernel,
                L.grid_x, L.grid_y, L.grid_z, L.block_x, L.block_y, L.block_z);
        return report(e, err, err_len);
    }
    if (nthreads > kMaxThreads || L.block_z > 64 || L.grid_y > 65535 || L.grid_z > 65535) {
        appendf(e, "kernel %s: invalid launch: block (%u,%u,%u) has %llu threads (at most 1024, block z <= 64), "
                   "grid (%u,%u,%u) (y, z <= 65535)",
                kernel, L.block_x, L.block_y, L.block_z, static_cast<unsigned long long>(nthreads), L.grid_x, L.grid_y,
                L.grid_z);
        return report(e, err, err_len);
    }
    if (L.shared_bytes > kMaxSharedBytes) {
        appendf(e, "kernel %s: invalid launch: %u bytes of shared memory per block (at most %u)", kernel,
                L.shared_bytes, kMaxSharedBytes);
        return report(e, err, err_len);
    }
    if (L.schedule != VPPO_SIMT_FORWARD && L.schedule != VPPO_SIMT_REVERSE && L.schedule != VPPO_SIMT_RUN_AHEAD) {
        appendf(e, "kernel %s: invalid launch: schedule %d (0 forward, 1 reverse, 2 run-ahead)", kernel, L.schedule);
        return report(e, err, err_len);
    }
    if (t_blk != nullptr) {
        appendf(e, "kernel %s: a launch from inside a kernel (%s) is not supported", kernel, t_blk->kernel);
        return report(e, err, err_len);
    }
    if (!ensure_fibers(static_cast<uint32_t>(nthreads), e) || !ensure_shared(L.shared_bytes, e) ||
        (race_check && !race_prepare(L.shared_bytes, static_cast<uint32_t>(nthreads), e))) {
        return report(std::string("kernel ") + kernel + ": " + e, err, err_len);
    }
    /* The grid cap (a test setting): kernels that loop over the grid see a smaller one. */
    const uint32_t grid_x = mode.mode.grid_cap != 0 && L.grid_x > mode.mode.grid_cap ? mode.mode.grid_cap : L.grid_x;

    Block b;
    b.kernel = kernel;
    b.body = body;
    b.params = params;
    b.nthreads = static_cast<uint32_t>(nthreads);
    b.schedule = L.schedule;
    b.leader = 0;
    b.lanes.assign(b.nthreads, Lane{});
    b.runnable.assign((b.nthreads + 63) / 64, 0);
    b.warps.assign((b.nthreads + 31) / 32, WarpBits{});
    b.fibers = t_pool.fibers.data();
    b.fiber = nullptr;
    b.tids.resize(b.nthreads);
    for (uint32_t i = 0; i < b.nthreads; i++) {
        b.tids[i] = uint3{i % L.block_x, (i / L.block_x) % L.block_y, i / (L.block_x * L.block_y)};
    }
    b.n_exited = 0;
    b.cur = 0;
    b.failed = false;

    t_blk = &b;
    t_block_dim = uint3{L.block_x, L.block_y, L.block_z};
    t_grid_dim = uint3{grid_x, L.grid_y, L.grid_z};
    RaceState &rs = t_race_state;
    if (race_check) {
        rs.base = t_shared;
        rs.report_pc[0] = rs.report_pc[1] = nullptr;
        t_race = &rs;
    }
    bool ok = true;
    for (uint32_t z = 0; ok && z < L.grid_z; z++) {
        for (uint32_t y = 0; ok && y < L.grid_y; y++) {
            for (uint32_t x = 0; ok && x < grid_x; x++) {
                t_block_idx = uint3{x, y, z};
                std::memset(t_shared, 0xff, L.shared_bytes); /* poison: floats read NaN, ints -1 */
                ok = run_block(b);
            }
        }
    }
    t_race = nullptr;
    if (!ok) {
        /* Threads stopped inside the body keep stale frames: restart them from the top next time. */
        for (uint32_t i = 0; i < b.nthreads; i++) {
            Fiber *f = t_pool.fibers[i];
            if (f->in_body) {
                f->in_body = false;
                f->fresh = true;
            }
        }
    }
    t_blk = nullptr;
    if (!ok) {
        if (race_check && b.error.find('\x01') != std::string::npos) { /* a race report: its source lines */
            const std::vector<std::string> lines = source_lines({rs.report_pc[0], rs.report_pc[1]});
            for (int k = 0; k < 2; k++) {
                size_t at = b.error.find(static_cast<char>(k + 1));
                if (at != std::string::npos) {
                    b.error.replace(at, 1, lines[static_cast<size_t>(k)]);
                }
            }
        }
        return report(b.error, err, err_len);
    }
    return 0;
}

bool race_check_requested() { return mode_state().mode.race_check != 0; }

int run_race_checked(const char *kernel, RaceCheckedEntry entry, const VppoSimtLaunch *launch, const void *params,
                     char *err, size_t err_len) {
    if (entry == nullptr) {
        return report(std::string("kernel ") + kernel +
                          ": the race check was asked for (VppoSimtTestMode.race_check), but this build has no "
                          "race-checked copy of the kernel (build/simt.rs makes one of every kernels/*.cu and "
                          "kernels/simt/tests/*.cu)",
                      err, err_len);
    }
    return entry(launch, params, err, err_len);
}

void atomic_begin(const void *addr, size_t bytes) {
    RaceState *rs = t_race;
    if (rs != nullptr) {
        if (rs->suppress == 0) {
            race_access(addr, bytes, ACC_ATOMIC, __builtin_return_address(0));
        }
        rs->suppress++;
    }
}

void atomic_end() {
    RaceState *rs = t_race;
    if (rs != nullptr && rs->suppress > 0) {
        rs->suppress--;
    }
}

} // namespace detail
} // namespace vppo_simt

extern "C" int vppo_simt_set_test_mode(const VppoSimtTestMode *mode, VppoSimtTestMode *previous) {
    vppo_simt::detail::ModeState &m = vppo_simt::detail::mode_state();
    if (previous != nullptr) {
        *previous = m.mode;
    }
    if (mode != nullptr) {
        if (mode->race_check != 0 && mode->race_check != 1) {
            return 1;
        }
        m.mode = *mode;
    }
    return 0;
}

/*
 * The hooks that -fsanitize=thread instrumentation calls (the race-check build of the kernels, see
 * simt.h): every load and store of the instrumented code reports its address here. There is no
 * sanitizer runtime: only accesses to the running block's shared memory are looked at, and only while a
 * race-checked launch runs. The return address is the instrumented access itself.
 */
#define VPPO_RACE_HOOKS(N)                                                                             \
    void __tsan_read##N(void *a) {                                                                     \
        vppo_simt::detail::race_access(a, N, vppo_simt::detail::ACC_READ, __builtin_return_address(0)); \
    }                                                                                                  \
    void __tsan_write##N(void *a) {                                                                    \
        vppo_simt::detail::race_access(a, N, vppo_simt::detail::ACC_WRITE, __builtin_return_address(0)); \
    }                                                                                                  \
    void __tsan_unaligned_read##N(void *a) {                                                           \
        vppo_simt::detail::race_access(a, N, vppo_simt::detail::ACC_READ, __builtin_return_address(0)); \
    }                                                                                                  \
    void __tsan_unaligned_write##N(void *a) {                                                          \
        vppo_simt::detail::race_access(a, N, vppo_simt::detail::ACC_WRITE, __builtin_return_address(0)); \
    }

extern "C" {
VPPO_RACE_HOOKS(1)
VPPO_RACE_HOOKS(2)
VPPO_RACE_HOOKS(4)
VPPO_RACE_HOOKS(8)
VPPO_RACE_HOOKS(16)
void __tsan_read_range(void *a, unsigned long n) {
    vppo_simt::detail::race_access(a, n, vppo_simt::detail::ACC_READ, __builtin_return_address(0));
}
void __tsan_write_range(void *a, unsigned long n) {
    vppo_simt::detail::race_access(a, n, vppo_simt::detail::ACC_WRITE, __builtin_return_address(0));
}
void __tsan_init() {}
void __tsan_func_entry(void *) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void **, void *) {}
void __tsan_vptr_read(void **) {}
void __tsan_atomic_signal_fence(int) {}
void __tsan_atomic_thread_fence(int) {}
}
#undef VPPO_RACE_HOOKS
