/*
A CPU emulation of the slice of CUDA the engine uses, so that the GPU engine's own kernels run,
and are tested, on a machine without a GPU (CI). tests/emu/translate.py rewrites the sources
(kernel launches, dynamic shared memory, inline PTX) and puts this header in front of them.

What is emulated, faithfully enough for the kernels' logic:
  - every CUDA thread of a block is a ucontext coroutine; the blocks of a grid run one after
    the other; __syncthreads and __syncwarp are barriers over the threads still alive, so a
    barrier that not every thread reaches is reported as a deadlock instead of hanging;
  - warp shuffles (__shfl_sync, __shfl_xor_sync, __shfl_up_sync, __shfl_down_sync) exchange
    values between the 32 lanes of a warp through a barrier; a lane that is not there (past the
    block's last thread, or returned) gives all one bits, NaN, where CUDA leaves it undefined;
    __match_any_sync likewise (the lanes holding the same bits, of those taking part), and
    __popc, __clz;
  - __shared__ memory is per block (function statics, since blocks run one at a time), filled
    with 0xFF bytes (NaN) at every block, static and dynamic alike, so reading it before writing
    shows up; launch limits (1024 threads, grid dimensions, and more than 48 KiB of dynamic
    shared memory only after cudaFuncSetAttribute for that kernel, and only up to the device's
    most per block: EMU_SMEM_OPTIN_KIB, default 227 as on Hopper) are checked;
  - the runtime API (memory, copies, streams, events) runs synchronously on host memory (an
    event holds the host clock when recorded, so elapsed times are the emulated work's); every
    cudaMalloc is in a table, so a copy or memset that runs past the allocation it starts in is
    an error, and the total is held to the device's size (EMU_DEVICE_GIB, default 80: an H100;
    cudaMemGetInfo reports it, and cudaMalloc fails past it as on a GPU);
  - cuBLASLt's matmul (the calls kernels/matmul.cuh makes: column-major layouts, transposes,
    leading dimensions, beta, the bias epilogue, fp32 or bf16 operands) in plain loops, with
    its alignment contract: an operand less aligned than the preference's minimum (256 bytes
    unless set lower) or a bias not 16-byte aligned is an error (cudaMalloc gives 256 here too);
  - bf16 is a 16-bit type with round-to-nearest-even conversions, as __float2bfloat16.
  - integer atomicAdd (a thread switches only at a barrier or a shuffle, so it is atomic).
  - the inline PTX of kernels/mma.cuh: mma.sync m16n8k16 bf16 (a warp-wide exchange of the
    fragments, fp32 sums in k order), ldmatrix x4 and .trans (each lane reads the rows whose
    addresses the others give), cp.async (queued per thread and done at cp.async.wait_group in
    the forward order, so a tile read before its wait is still NaN, and at its issue in the
    reverse order); shared addresses are offsets into the block's dynamic shared memory,
    checked for bounds and 16-byte alignment.
  - Hopper's wgmma (kernels/wgmma.cuh): wgmma.mma_async m64nNk16 bf16 -> fp32 with both
    operands in shared memory through matrix descriptors (the layouts without swizzling,
    K-major or MN-major), reading the shared memory at its issue in the forward order and at its
    wgmma.wait_group in the reverse order (so an operand refilled before the wait shows up as a
    difference between the orders); the lanes of a warp giving the same descriptors.
  - races, by running everything in two orders: a thread runs alone until its next barrier or
    shuffle, the threads of a block in turn from thread 0 and the blocks from block 0, or, with
    EMU_ORDER=reverse, from the last thread and the last block. Two accesses to one word by
    different threads with no barrier between them, at least one a write (a missing
    __syncthreads or __syncwarp, a kernel that relies on lockstep execution within a warp, a
    block that reads what another block of the launch writes), happen in one order in one run
    and in the other order in the other, so a race that changes the result fails a check in one
    of the two runs (tests/emu/run.sh runs both). The asynchronous copies and MMAs take effect
    the earliest a GPU may in one order and the latest in the other (async_writes_early), so a
    stage used before its wait or refilled before its readers' wait is a difference too.
  - memory errors, with g++'s sanitizers (tests/emu/run.sh builds with them): cudaMalloc and
    the dynamic shared memory are allocations of exactly the bytes asked for, static __shared__
    arrays are globals, so AddressSanitizer reports an access past any of them or to freed
    memory, as compute-sanitizer's memcheck does on a GPU (also a few bytes past a cudaMalloc,
    where a GPU would not fault); the alignment check reports a vector load from a misaligned
    address. The thread switches are announced to AddressSanitizer (switch_context), and the
    scheduler's own functions are not instrumented (EMU_NOT_CHECKED).
  - full-size runs, sampled (EMU_SAMPLE=1): a launch of more than 64 blocks runs only its last
    block, the device memory is mapped but untouched, cuBLASLt computes two corners from the
    ends of its inner dimension; see sampled() below for what that checks.
What is not: timing, the memory model between warps without a barrier (every write is seen at
once), float atomics, races whose two outcomes happen to be equal. It checks what the kernels
compute, not how fast.
*/
#pragma once

#include <ucontext.h>
#include <time.h>
#include <sys/mman.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <vector>
#include <map>
#include <algorithm>
#if defined(__SANITIZE_ADDRESS__)  // g++ -fsanitize=address: the .memcheck builds of tests/emu/run.sh
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
// The scheduler's own functions are not instrumented: the frames a thread leaves behind when it
// ends (it never returns from thread_entry) then have no redzones to go stale on a stack the
// next block reuses, and the thread switches, shuffles, barriers and the mma arithmetic (on
// registers only) run at full speed.
#define EMU_NOT_CHECKED __attribute__((no_sanitize_address))
#else
#define EMU_NOT_CHECKED
#endif

// ----------------------------------------------------------------------------
// qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)  // only where translate.py's rewrite (a check of each launch) does not apply
#define __shared__ static  // only where translate.py's rewrite (filled at every block) does not apply
#define __align__(n) alignas(n)

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
static dim3 threadIdx, blockIdx, blockDim, gridDim;
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) float2 { float x, y; };
static inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

// ----------------------------------------------------------------------------
// bf16

struct __nv_bfloat16 {
    uint16_t bits;
    __nv_bfloat16() = default;
    explicit __nv_bfloat16(float f) {
        uint32_t u;
        memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) { bits = (uint16_t)((u >> 16) | 0x40); return; }  // NaN stays NaN
        u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
        bits = (uint16_t)(u >> 16);
    }
    operator float() const {
        uint32_t u = (uint32_t)bits << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
};
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
static inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
static inline float __bfloat162float(__nv_bfloat16 b) { return (float)b; }
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16(a), __float2bfloat16(b)}; }

// ----------------------------------------------------------------------------
// device math and helpers the kernels call

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline size_t min(size_t a, size_t b) { return a < b ? a : b; }
static inline size_t max(size_t a, size_t b) { return a > b ? a : b; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, sizeof(u)); return u; }
// a thread runs until its next barrier or shuffle, so a read-modify-write is atomic here
static inline int atomicAdd(int* p, int v) { int old = *p; *p = old + v; return old; }

// ----------------------------------------------------------------------------
// the thread scheduler

namespace emu {

[[noreturn]] static void fail(const char* what) {
    fprintf(stderr, "CUDA emulation: %s\n", what);
    exit(3);
}

// A kernel's __launch_bounds__(max_threads), which translate.py turns into this call at the top
// of its body: a GPU refuses a launch of more threads ("too many resources requested"), since
// ptxas fitted the kernel's registers to that many.
static void launch_bounds(unsigned long long max_threads, const char* kernel) {
    unsigned long long threads = (unsigned long long)blockDim.x * blockDim.y * blockDim.z;
    if (threads > max_threads) {
        char what[200];
        snprintf(what, sizeof(what), "launch of %s with %llu threads, more than its __launch_bounds__ (%llu)", kernel, threads, max_threads);
        fail(what);
    }
}

enum Wait { RUNNING, AT_WARP_BARRIER, AT_BLOCK_BARRIER, DONE };

// Context switches. On x86-64 a few instructions that save the callee-saved registers and the
// stack pointer (swapcontext would also make a system call for the signal mask, every switch);
// elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
struct Context { void* sp; };
#else
struct Context { ucontext_t uc; };
#endif

// Leaves the running context `from` for `to`, whose stack is `to_stack_bytes` at `to_stack`;
// returns when something switches back to `from`. `ending`: `from` is never resumed. Under
// AddressSanitizer every switch is announced, so that it knows which stack is in use.
EMU_NOT_CHECKED static void switch_context(Context* from, Context* to, const void* to_stack, size_t to_stack_bytes, bool ending) {
#if defined(EMU_ASAN)
    void* fake_stack = NULL;
    __sanitizer_start_switch_fiber(ending ? NULL : &fake_stack, to_stack, to_stack_bytes);
#else
    (void)to_stack, (void)to_stack_bytes, (void)ending;
#endif
#if defined(__x86_64__)
    emu_switch(&from->sp, to->sp);
#else
    swapcontext(&from->uc, &to->uc);
#endif
#if defined(EMU_ASAN)
    __sanitizer_finish_switch_fiber(fake_stack, NULL, NULL);
#endif
}

struct Thread {
    Context context;
    unsigned x, y, z;
    int warp, lane;
    Wait wait;
    unsigned generation;  // of the barrier it waits at
    unsigned exchanges;   // warp exchanges done (shuffles, ldmatrix, mma), whose parity picks the slots
};

// a cp.async in flight: done at the cp.async.wait_group that covers its group, or already at
// its issue (see async_writes_early below)
struct AsyncCopy {
    void* dst;
    const void* src;
    int bytes, src_bytes;  // bytes past src_bytes are zero-filled
    bool done;
};
struct AsyncCopies {
    std::vector<AsyncCopy> issued;  // in issue order, committed groups first
    std::vector<int> group_sizes;   // the committed groups, oldest first
};

// a wgmma.mma_async in flight: done at its issue or at the wgmma.wait_group that covers its group
// (see async_writes_early), reading the shared memory then, into the thread's accumulators
struct AsyncMma {
    std::vector<float*> d;  // the thread's n/2 accumulators (the asm's "+f" operands)
    uint64_t desc_a, desc_b;
    bool scale_d;           // false: D = A B, the old D ignored
    bool trans_a, trans_b;  // MN-major operands
    bool done;
};
struct AsyncMmas {
    std::vector<AsyncMma> issued;   // in issue order, committed groups first
    std::vector<int> group_sizes;   // the committed groups, oldest first
};

static const size_t STACK_BYTES = 128 << 10;
static const size_t EXCHANGE_WORDS = 3;  // an mma's six 32-bit A and B registers

// A std::vector whose element access the scheduler's unchecked functions can inline (g++ does
// not inline a checked std::vector::operator[] into an EMU_NOT_CHECKED function).
template <typename T>
struct Array {
    std::vector<T> storage;
    T* p = NULL;
    size_t n = 0;
    void assign(size_t count, const T& value) { storage.assign(count, value); p = storage.data(); n = count; }
    EMU_NOT_CHECKED T& operator[](size_t i) { return p[i]; }
    EMU_NOT_CHECKED size_t size() const { return n; }
    EMU_NOT_CHECKED T* begin() { return p; }
    EMU_NOT_CHECKED T* end() { return p + n; }
};

struct Block {
    Array<Thread> threads;
    Context scheduler;
    int current;
    Array<int> warp_live, warp_arrived;
    Array<unsigned> warp_generation;
    int block_live, block_arrived;
    unsigned block_generation;
    Array<uint64_t> exchange;  // per thread two slots of EXCHANGE_WORDS, used in turn
    Array<unsigned> exchange_number;  // per slot, the exchange that wrote it (the writer's count)
    Array<AsyncCopies> async_copies;  // per thread
    Array<AsyncMmas> async_mmas;      // per thread
    unsigned char* dynamic_shared = NULL;  // exactly the launch's bytes (16-byte aligned), so that
    size_t dynamic_shared_bytes = 0;       // AddressSanitizer sees an access past them
    const void* scheduler_stack = NULL;    // the stack of the launching code, for switch_context
    size_t scheduler_stack_bytes = 0;
    bool started_by_scheduler = false;     // the fresh thread about to run was started by run_block
    const std::function<void()>* body;
    char* stacks = NULL;
    size_t stacks_for = 0;
};
static Block B;

EMU_NOT_CHECKED static char* thread_stack(int i) { return B.stacks + (size_t)i * STACK_BYTES; }

// EMU_ORDER=reverse: threads and blocks run from the last one down (races, see the top of the
// file). Read once as the program starts: every thread switch asks for it.
static const bool emu_reverse_order = [] {
    const char* order = getenv("EMU_ORDER");
    if (order == NULL || strcmp(order, "forward") == 0) { return false; }
    if (strcmp(order, "reverse") == 0) { return true; }
    fail("EMU_ORDER must be forward or reverse");
}();
EMU_NOT_CHECKED static inline bool reverse_order() { return emu_reverse_order; }

EMU_NOT_CHECKED static Thread& me() { return B.threads[B.current]; }

static unsigned long long block_serial;  // counts the blocks run, across launches

// Called after the declaration of each static __shared__ variable (translate.py adds the call;
// the variable is a function static): the first thread of each block to reach it fills it with
// 0xFF bytes (NaN, or -1), as dynamic shared memory is at every block, so that a read before any
// write in this block shows up instead of seeing what the previous block left there.
static void shared_at_block_start(void* variable, size_t bytes) {
    struct Filled { void* variable; unsigned long long block; };
    static std::vector<Filled> filled;  // in the block it was last filled in
    for (Filled& f : filled) {
        if (f.variable != variable) { continue; }
        if (f.block != block_serial) {
            memset(variable, 0xFF, bytes);
            f.block = block_serial;
        }
        return;
    }
    filled.push_back({variable, block_serial});
    memset(variable, 0xFF, bytes);
}

EMU_NOT_CHECKED static bool runnable(const Thread& t);

// Runs the first runnable thread from `first` on (downwards in reverse order), round robin,
// which may be the current one; the scheduler when every thread has ended. A live thread that
// cannot run while none can is a barrier that some threads never reach.
EMU_NOT_CHECKED static void switch_from(int first) {
    int n = (int)B.threads.size(), from = B.current;
    bool down = reverse_order();
    for (int step = 0, i = first; step < n; step++, i = down ? (i == 0 ? n - 1 : i - 1) : (i == n - 1 ? 0 : i + 1)) {
        Thread& t = B.threads[i];
        if (!runnable(t)) { continue; }
        t.wait = RUNNING;
        B.current = i;
        threadIdx = dim3(t.x, t.y, t.z);
        if (i == from) { return; }
        switch_context(&B.threads[from].context, &t.context, thread_stack(i), STACK_BYTES, B.threads[from].wait == DONE);
        return;
    }
    for (const Thread& t : B.threads) {
        if (t.wait != DONE) { fail("deadlock: some threads wait at a barrier that others never reach"); }
    }
    switch_context(&B.threads[from].context, &B.scheduler, B.scheduler_stack, B.scheduler_stack_bytes, true);
}

// The current thread stops at a barrier or ends: the next one in order runs.
EMU_NOT_CHECKED static void switch_to_next() {
    int n = (int)B.threads.size();
    switch_from(reverse_order() ? (B.current + n - 1) % n : (B.current + 1) % n);
}

// The current thread completed a barrier: the threads it releases, itself included, start again
// from the group's first one (its last one in reverse order), so that between two barriers they
// always run in ascending (descending) order, whichever arrived last.
EMU_NOT_CHECKED static void restart_group(int lowest, int highest) {
    switch_from(reverse_order() ? highest : lowest);
}

EMU_NOT_CHECKED static void warp_barrier() {
    Thread& t = me();
    unsigned g = B.warp_generation[t.warp];
    if (++B.warp_arrived[t.warp] == B.warp_live[t.warp]) {
        B.warp_arrived[t.warp] = 0;
        B.warp_generation[t.warp]++;
        int lowest = t.warp * 32, highest = std::min(lowest + 31, (int)B.threads.size() - 1);
        restart_group(lowest, highest);
        return;
    }
    t.wait = AT_WARP_BARRIER;
    t.generation = g;
    switch_to_next();
}

EMU_NOT_CHECKED static void block_barrier() {
    Thread& t = me();
    unsigned g = B.block_generation;
    if (++B.block_arrived == B.block_live) {
        B.block_arrived = 0;
        B.block_generation++;
        restart_group(0, (int)B.threads.size() - 1);
        return;
    }
    t.wait = AT_BLOCK_BARRIER;
    t.generation = g;
    switch_to_next();
}

EMU_NOT_CHECKED static void thread_entry() {
#if defined(EMU_ASAN)
    // the first run of a thread: finish the switch that started it, learning the launching
    // code's stack when that is what it came from
    const void* from_stack;
    size_t from_stack_bytes;
    __sanitizer_finish_switch_fiber(NULL, &from_stack, &from_stack_bytes);
    if (B.started_by_scheduler) {
        B.scheduler_stack = from_stack;
        B.scheduler_stack_bytes = from_stack_bytes;
        B.started_by_scheduler = false;
    }
#endif
    (*B.body)();
    Thread& t = me();
    // its accumulators were the kernel's registers: gone now
    if (!B.async_mmas[B.current].group_sizes.empty() || !B.async_mmas[B.current].issued.empty()) { fail("a thread ended with a wgmma.mma_async it never waited for (wgmma.wait_group)"); }
    t.wait = DONE;
    // a barrier the others wait at may now be complete without this thread
    if (--B.warp_live[t.warp] > 0 && B.warp_arrived[t.warp] == B.warp_live[t.warp]) {
        B.warp_arrived[t.warp] = 0;
        B.warp_generation[t.warp]++;
    }
    if (--B.block_live > 0 && B.block_arrived == B.block_live) {
        B.block_arrived = 0;
        B.block_generation++;
    }
    switch_to_next();  // never resumed
    __builtin_unreachable();
}

// a fresh context that starts in thread_entry on its own stack
static void make_context(Thread& t, char* stack) {
#if defined(__x86_64__)
    uintptr_t top = ((uintptr_t)stack + STACK_BYTES) & ~(uintptr_t)15;
    void** sp = (void**)(top - 16);  // thread_entry starts with rsp = 8 mod 16, as after a call
    *sp = (void*)thread_entry;       // emu_switch's ret goes there
    sp -= 6;                         // the six callee-saved registers it pops
    for (int r = 0; r < 6; r++) { sp[r] = NULL; }
    t.context.sp = sp;
#else
    getcontext(&t.context.uc);
    t.context.uc.uc_stack.ss_sp = stack;
    t.context.uc.uc_stack.ss_size = STACK_BYTES;
    t.context.uc.uc_link = NULL;  // thread_entry never returns
    makecontext(&t.context.uc, thread_entry, 0);
#endif
}

EMU_NOT_CHECKED static bool runnable(const Thread& t) {
    switch (t.wait) {
        case RUNNING: return true;
        case AT_WARP_BARRIER: return B.warp_generation[t.warp] != t.generation;
        case AT_BLOCK_BARRIER: return B.block_generation != t.generation;
        default: return false;
    }
}

static void run_block(unsigned bx, unsigned by, unsigned bz, size_t shared_bytes) {
    block_serial++;
    int n = blockDim.x * blockDim.y * blockDim.z, warps = (n + 31) / 32;
    B.threads.assign(n, Thread());
    B.warp_live.assign(warps, 0);
    B.warp_arrived.assign(warps, 0);
    B.warp_generation.assign(warps, 0);
    B.block_live = n;
    B.block_arrived = 0;
    B.block_generation = 0;
    B.exchange.assign(2 * (size_t)n * EXCHANGE_WORDS, 0);
    B.exchange_number.assign(2 * (size_t)n, 0);
    B.async_copies.assign(n, AsyncCopies());
    B.async_mmas.assign(n, AsyncMmas());
    free(B.dynamic_shared);
    B.dynamic_shared_bytes = shared_bytes;
    if (posix_memalign((void**)&B.dynamic_shared, 16, std::max<size_t>(shared_bytes, 1)) != 0) { fail("cannot allocate the shared memory"); }
    memset(B.dynamic_shared, 0xFF, shared_bytes);
    if (B.stacks_for < (size_t)n) {
        if (B.stacks) { munmap(B.stacks, B.stacks_for * STACK_BYTES); }
        B.stacks = (char*)mmap(NULL, (size_t)n * STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (B.stacks == MAP_FAILED) { fail("cannot map the thread stacks"); }
        B.stacks_for = n;
    }
    blockIdx = dim3(bx, by, bz);
    for (int i = 0; i < n; i++) {
        Thread& t = B.threads[i];
        t.x = i % blockDim.x;
        t.y = (i / blockDim.x) % blockDim.y;
        t.z = i / (blockDim.x * blockDim.y);
        t.warp = i / 32;
        t.lane = i % 32;
        t.wait = RUNNING;
        t.exchanges = 0;
        B.warp_live[t.warp]++;
        make_context(t, thread_stack(i));
    }
    // thread 0 starts (the last one in reverse order); from then on the threads hand over to
    // each other (switch_to_next) and the last one to end comes back here
    B.current = reverse_order() ? n - 1 : 0;
    Thread& first = B.threads[B.current];
    threadIdx = dim3(first.x, first.y, first.z);
    B.started_by_scheduler = true;
    switch_context(&B.scheduler, &first.context, thread_stack(B.current), STACK_BYTES, false);
}

// EMU_SAMPLE=1: a launch of more than SAMPLE_WHOLE_BLOCKS blocks runs only its last block (the
// largest blockIdx, so the largest indices); smaller ones (the reductions, the routing layout,
// whose outputs later launches index with) run whole. The device memory is mapped but not
// touched (it reads as zero), and cuBLASLt computes two corners of its output, each from the
// first and last of the inner dimension (a few pages read, not whole columns). A training step
// at full size (T=1024, B=64, GPT-2's vocabulary) then runs in seconds and still checks what small
// shapes cannot: the launch limits at real grid sizes, the index arithmetic of the last blocks
// (with -fsanitize=signed-integer-overflow an int that overflows is reported), copies and
// cuBLASLt operands inside their allocations, and the device memory the engine allocates. What
// it computes is not checked, and the data-dependent work (expert rows: the untouched routing
// sends every token to expert 0) is not at its full size.
static const unsigned long long SAMPLE_WHOLE_BLOCKS = 64;
static bool sampled() {
    static const bool on = getenv("EMU_SAMPLE") != NULL && strcmp(getenv("EMU_SAMPLE"), "1") == 0;
    return on;
}
struct LaunchCounts { unsigned long long launches = 0, blocks = 0, blocks_run = 0; };
static LaunchCounts launch_counts;
static void print_launch_counts() {
    fprintf(stderr, "CUDA emulation, sampled: %llu launches, %llu of their %llu blocks run\n", launch_counts.launches,
            launch_counts.blocks_run, launch_counts.blocks);
}

// The most dynamic shared memory a block may have once its kernel asks (cudaDevAttrMaxShared-
// MemoryPerBlockOptin): EMU_SMEM_OPTIN_KIB, default 227 (Hopper); 163 is an A100, 99 the sm_86
// and sm_89 cards (RTX 30 and 40 series, A10, L4, L40).
static size_t device_shared_optin() {
    static const size_t bytes = (size_t)(getenv("EMU_SMEM_OPTIN_KIB") ? atoi(getenv("EMU_SMEM_OPTIN_KIB")) : 227) * 1024;
    return bytes;
}
// the dynamic shared memory each kernel may use (cudaFuncSetAttribute); without it, 48 KiB
static std::map<const void*, size_t>& shared_limits() {
    static std::map<const void*, size_t> limits;
    return limits;
}
static size_t shared_limit(const void* kernel) {
    auto it = shared_limits().find(kernel);
    return it == shared_limits().end() ? 48 * 1024 : it->second;
}
template <typename F> static const void* kernel_id(F* kernel) { return reinterpret_cast<const void*>(kernel); }

// Runs body as every thread of every block of the grid, one block after another (from the last
// in reverse order); with EMU_SAMPLE=1, of more than SAMPLE_WHOLE_BLOCKS blocks only the last.
static void launch(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
    unsigned long long n = (unsigned long long)block.x * block.y * block.z;
    if (n == 0 || n > 1024 || block.z > 64) { fail("launch: invalid block size"); }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
        char what[160];
        snprintf(what, sizeof(what), "launch: invalid grid size (%u, %u, %u): x is at most 2^31-1, y and z at most 65535", grid.x, grid.y, grid.z);
        fail(what);
    }
    if (shared_bytes > device_shared_optin()) {
        char what[160];
        snprintf(what, sizeof(what), "launch: %zu bytes of dynamic shared memory, more than the device's %zu per block", shared_bytes,
                 device_shared_optin());
        fail(what);
    }
    if (shared_bytes > shared_limit(kernel)) {
        char what[200];
        snprintf(what, sizeof(what), "launch: %zu bytes of dynamic shared memory, more than 48 KiB, without cudaFuncSetAttribute("
                 "kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, >= %zu) first", shared_bytes, shared_bytes);
        fail(what);
    }
    B.body = &body;
    blockDim = block;
    gridDim = grid;
    unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    if (sampled() && launch_counts.launches++ == 0) { atexit(print_launch_counts); }
    launch_counts.blocks += blocks;
    for (unsigned long long b = sampled() && blocks > SAMPLE_WHOLE_BLOCKS ? blocks - 1 : 0; b < blocks; b++) {
        unsigned long long i = reverse_order() ? blocks - 1 - b : b;
        launch_counts.blocks_run++;
        run_block(i % grid.x, i / grid.x % grid.y, i / grid.x / grid.y, shared_bytes);
    }
}


// Every lane writes `count` words to its slot, waits for the warp, and gets the slots of the
// warp's 32 lanes (EXCHANGE_WORDS apart; a lane past the block's last thread reads zeros).
// Consecutive exchanges use alternate slots: a lane cannot write a slot again before every lane
// has passed the barrier of the exchange in between, so one barrier per exchange is enough.
EMU_NOT_CHECKED static const uint64_t* warp_exchange(const uint64_t* words, size_t count) {
    Thread& t = me();
    size_t n = B.threads.size(), half = t.exchanges++ & 1, parity = half * n * EXCHANGE_WORDS;
    memcpy(&B.exchange[parity + B.current * EXCHANGE_WORDS], words, count * sizeof(uint64_t));
    B.exchange_number[half * n + B.current] = t.exchanges;
    warp_barrier();
    return &B.exchange[parity + (size_t)t.warp * 32 * EXCHANGE_WORDS];
}

// whether thread `src` (of this thread's warp) took part in this thread's last exchange: it
// wrote its slot in it, not in an earlier one before it returned, nor never (past the block's end)
EMU_NOT_CHECKED static bool took_part(size_t src) {
    const Thread& t = me();
    return src < B.threads.size() && B.exchange_number[((t.exchanges - 1) & 1) * B.threads.size() + src] == t.exchanges;
}

template <typename T>
EMU_NOT_CHECKED static T shuffle(T v, int source_lane) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    const uint64_t* slots = warp_exchange(&bits, 1);
    size_t src = (size_t)me().warp * 32 + source_lane;
    // A lane past the block's last thread, or one that has returned, takes no part: what it
    // gives is undefined in CUDA, and all one bits here (NaN as a float, -1 as an int), so that a
    // result that depends on it shows (an exited lane's slot would hold a stale, plausible value)
    uint64_t undefined = ~(uint64_t)0;
    T out;
    memcpy(&out, &undefined, sizeof(T));
    if (source_lane >= 0 && source_lane < 32 && took_part(src)) {
        memcpy(&out, &slots[source_lane * EXCHANGE_WORDS], sizeof(T));
    }
    return out;
}

// the lanes of this thread's warp (of those taking part) whose value has the same bits as its own
EMU_NOT_CHECKED static unsigned match_any(uint64_t bits) {
    const uint64_t* slots = warp_exchange(&bits, 1);
    size_t first = (size_t)me().warp * 32;
    unsigned same = 0;
    for (int lane = 0; lane < 32; lane++) {
        if (took_part(first + lane) && slots[lane * EXCHANGE_WORDS] == bits) { same |= 1u << lane; }
    }
    return same;
}

// ----------------------------------------------------------------------------
// inline PTX (kernels/mma.cuh): tests/emu/translate.py turns asm volatile("ptx" : outputs : inputs)
// into ptx("ptx", {out(..), .., in(..), ..}), outputs by address and inputs by value

struct Operand {
    void* address;   // an output
    uint64_t value;  // an input's bits
};
template <typename T> static Operand out(T& x) { return {(void*)&x, 0}; }
template <typename T> static Operand in(T x) {
    static_assert(sizeof(T) <= 8, "asm operand of more than 8 bytes");
    Operand o = {NULL, 0};
    memcpy(&o.value, &x, sizeof(T));
    return o;
}

static unsigned char* shared_base() { return B.dynamic_shared; }
static size_t shared_size() { return B.dynamic_shared_bytes; }

// the shared-space address of p: its offset in the block's dynamic shared memory
static uint32_t shared_address(const void* p) {
    uintptr_t base = (uintptr_t)shared_base(), a = (uintptr_t)p;
    if (a < base || a >= base + shared_size()) { fail("__cvta_generic_to_shared of an address outside the dynamic shared memory"); }
    return (uint32_t)(a - base);
}

// the memory behind `bytes` bytes at a shared-space address, which must be aligned to `align`
static unsigned char* shared_at(uint64_t address, size_t bytes, size_t align, const char* what) {
    if (address % align != 0) { fail(what); }
    if (address + bytes > shared_size()) { fail("shared memory access past the block's dynamic shared memory"); }
    return shared_base() + address;
}

static bool whole_warp() { return B.warp_live[me().warp] == 32; }

static uint32_t load_u32(const unsigned char* p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row l%8 of matrix
// l/8; r[i] gets matrix i's (row l/4, columns 2(l%4), 2(l%4)+1), or with .trans its (rows 2(l%4),
// 2(l%4)+1, column l/4), the first element in the lower half
static void ldmatrix_x4(const Operand* ops, bool trans) {
    if (!whole_warp()) { fail("ldmatrix.sync by a warp with exited threads"); }
    uint64_t address = ops[4].value;
    const uint64_t* slots = warp_exchange(&address, 1);
    int l = me().lane;
    for (int i = 0; i < 4; i++) {
        uint32_t r;
        if (!trans) {
            r = load_u32(shared_at(slots[(8 * i + l / 4) * EXCHANGE_WORDS], 16, 16, "ldmatrix row address not 16-byte aligned") + 4 * (l % 4));
        } else {
            const unsigned char* lo = shared_at(slots[(8 * i + 2 * (l % 4)) * EXCHANGE_WORDS], 16, 16, "ldmatrix row address not 16-byte aligned");
            const unsigned char* hi = shared_at(slots[(8 * i + 2 * (l % 4) + 1) * EXCHANGE_WORDS], 16, 16, "ldmatrix row address not 16-byte aligned");
            uint16_t a, b;
            memcpy(&a, lo + 2 * (l / 4), 2);
            memcpy(&b, hi + 2 * (l / 4), 2);
            r = (uint32_t)a | ((uint32_t)b << 16);
        }
        memcpy(ops[i].address, &r, 4);
    }
}

EMU_NOT_CHECKED static float bf16_half(uint32_t reg, int high) {
    uint32_t u = high ? (reg & 0xFFFF0000u) : (reg << 16);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with D = C: every lane gives its A and B
// registers; each takes from them the rows of A (16 x 16) and columns of B (16 x 8) its four D
// elements need (layouts in kernels/mma.cuh) and adds the 16 exact products to C in k order.
// Lane 4g + c holds D's rows g and g + 8 at columns 2c and 2c + 1; of A, row g's columns 2c, 2c + 1
// (a0) and 2c + 8, 2c + 9 (a2), and the same of row g + 8 (a1, a3); of B, column g's rows 2c,
// 2c + 1 (b0) and 2c + 8, 2c + 9 (b1). So its rows of A come from lanes 4g .. 4g + 3, and its
// columns of B from lanes 4n .. 4n + 3 for n = 2c, 2c + 1.
EMU_NOT_CHECKED static void mma_m16n8k16_bf16(const Operand* ops) {
    if (!whole_warp()) { fail("mma.sync by a warp with exited threads"); }
    uint64_t mine[EXCHANGE_WORDS] = {ops[4].value | (ops[5].value << 32), ops[6].value | (ops[7].value << 32), ops[8].value | (ops[9].value << 32)};
    const uint64_t* slots = warp_exchange(mine, EXCHANGE_WORDS);
    int l = me().lane, g = l / 4, c = l % 4;
    float A[2][16], Bm[2][16];  // A[h][k]: row g + 8h of A; Bm[x][k]: column 2c + x of B
    for (int from = 0; from < 4; from++) {  // the column pair `from` of the lanes in a group
        const uint64_t* w = &slots[(4 * g + from) * EXCHANGE_WORDS];
        uint32_t a[4] = {(uint32_t)w[0], (uint32_t)(w[0] >> 32), (uint32_t)w[1], (uint32_t)(w[1] >> 32)};
        for (int h = 0; h < 2; h++) {
            A[0][2 * from + h] = bf16_half(a[0], h);
            A[1][2 * from + h] = bf16_half(a[1], h);
            A[0][2 * from + 8 + h] = bf16_half(a[2], h);
            A[1][2 * from + 8 + h] = bf16_half(a[3], h);
        }
        for (int x = 0; x < 2; x++) {
            uint64_t b = slots[(4 * (2 * c + x) + from) * EXCHANGE_WORDS + 2];
            for (int h = 0; h < 2; h++) {
                Bm[x][2 * from + h] = bf16_half((uint32_t)b, h);
                Bm[x][2 * from + 8 + h] = bf16_half((uint32_t)(b >> 32), h);
            }
        }
    }
    for (int i = 0; i < 4; i++) {  // D's row g + 8 (i / 2), column 2c + i % 2
        float* d = (float*)ops[i].address;
        float acc = *d;
        for (int k = 0; k < 16; k++) { acc += A[i / 2][k] * Bm[i % 2][k]; }
        *d = acc;
    }
}

// When the asynchronous operations take effect, the earliest or the latest a GPU may: in the
// forward order, a cp.async writes shared memory at its wait_group and a wgmma.mma_async reads it
// at its issue; in the reverse order the copies land at their issue and the wgmmas read at their
// wait_group. A kernel that reads a stage before its copies are waited for, or refills a stage
// that a wgmma not yet waited for reads, then computes differently in the two orders, which
// tests/emu/run.sh compares, like the races between threads.
static bool async_writes_early() { return reverse_order(); }

static void do_copy(AsyncCopy& copy) {
    memcpy(copy.dst, copy.src, copy.src_bytes);
    memset((unsigned char*)copy.dst + copy.src_bytes, 0, copy.bytes - copy.src_bytes);
    copy.done = true;
}

// cp.async.{ca,cg}.shared.global [dst], [src], bytes, src_bytes: queued until its wait_group (or done at once: async_writes_early)
static void cp_async(const char* ptx, const Operand* ops) {
    int bytes = 0;
    const char* p = strchr(ptx, ']');
    if (p) { p = strchr(p + 1, ']'); }
    if (!p || sscanf(p + 1, " , %d", &bytes) != 1 || (bytes != 4 && bytes != 8 && bytes != 16)) { fail("cp.async: size not understood"); }
    AsyncCopy copy;
    copy.dst = shared_at(ops[0].value, bytes, bytes, "cp.async destination not aligned to its size");
    copy.src = (const void*)(uintptr_t)ops[1].value;
    copy.bytes = bytes;
    copy.src_bytes = (int)(uint32_t)ops[2].value;
    if ((uintptr_t)copy.src % bytes != 0) { fail("cp.async source not aligned to its size"); }
    if (copy.src_bytes < 0 || copy.src_bytes > bytes) { fail("cp.async: source size outside 0..size"); }
    copy.done = false;
    if (async_writes_early()) { do_copy(copy); }
    B.async_copies[B.current].issued.push_back(copy);
}

static void cp_async_commit() {
    AsyncCopies& q = B.async_copies[B.current];
    int committed = 0;
    for (int n : q.group_sizes) { committed += n; }
    q.group_sizes.push_back((int)q.issued.size() - committed);
}

// does the copies of the oldest committed groups until at most `pending` remain in flight
static void cp_async_wait(int pending) {
    AsyncCopies& q = B.async_copies[B.current];
    size_t done = 0;
    while ((int)q.group_sizes.size() > pending) {
        for (int i = 0; i < q.group_sizes.front(); i++, done++) {
            AsyncCopy& copy = q.issued[done];
            if (!copy.done) { do_copy(copy); }
        }
        q.group_sizes.erase(q.group_sizes.begin());
    }
    q.issued.erase(q.issued.begin(), q.issued.begin() + done);
}

// --- Hopper's warpgroup MMA (kernels/wgmma.cuh), sm_90a ---
// A warpgroup is 4 consecutive warps (128 threads) of the block; its wgmma instructions must be
// executed by all of them, with the same operands. The emulation checks that the block is made of
// whole warpgroups, and at each wgmma.mma_async that the whole warp is there and gives the same
// descriptors (a warp exchange); the four warps of a warpgroup are not checked against each other.
static void check_warpgroups() {
    if ((blockDim.x * blockDim.y * blockDim.z) % 128 != 0) { fail("wgmma in a block whose threads are not whole warpgroups (128)"); }
}

// element (i, k) of a wgmma operand in shared memory, i the row of A (m) or of B (n), through
// its matrix descriptor: start address, leading (LBO) and stride (SBO) byte offsets, each stored
// >> 4 in bits 0-13, 16-29 and 32-45; bits 49-51 the base offset and 62-63 the swizzle mode.
// Only the layouts without swizzling are emulated: 8 x 8 core matrices of 128 contiguous bytes,
// the next core matrix along k LBO bytes further, the next along i SBO bytes further; inside one,
// K-major (trans 0) 8 rows of i of 8 consecutive k, MN-major (trans 1) 8 rows of k of 8 i.
EMU_NOT_CHECKED static float wgmma_operand(uint64_t desc, int i, int k, bool mn_major) {
    if ((desc >> 62) != 0 || ((desc >> 49) & 7) != 0) { fail("wgmma descriptor: only the layout without swizzling (mode 0, base offset 0) is emulated"); }
    uint64_t start = (desc & 0x3FFF) << 4, lbo = ((desc >> 16) & 0x3FFF) << 4, sbo = ((desc >> 32) & 0x3FFF) << 4;
    uint64_t inside = mn_major ? (uint64_t)(k % 8) * 16 + (uint64_t)(i % 8) * 2 : (uint64_t)(i % 8) * 16 + (uint64_t)(k % 8) * 2;
    uint64_t at = start + (uint64_t)(i / 8) * sbo + (uint64_t)(k / 8) * lbo + inside;
    uint16_t bits;
    memcpy(&bits, shared_at(at, 2, 2, "wgmma operand address not aligned"), 2);
    return bf16_half(bits, 0);
}

// this thread's part of one wgmma: the accumulator layout of m64nNk16 (PTX ISA, "wgmma .m64nNk16
// register fragment layout for accumulator matrix D"): warp w of the warpgroup holds rows
// 16w..16w+15, and per 8 columns j the m16n8 layout of mma.sync, d[4j + i] = (row 16w + g +
// 8 (i / 2), column 8j + 2c + i % 2) with g = lane / 4, c = lane % 4; each sum adds the 16 exact
// products in k order
EMU_NOT_CHECKED static void do_wgmma(AsyncMma& mma) {
    int w = me().warp % 4, g = me().lane / 4, c = me().lane % 4;
    float a[2][16];  // this thread's two rows of A
    for (int h = 0; h < 2; h++) {
        for (int k = 0; k < 16; k++) { a[h][k] = wgmma_operand(mma.desc_a, 16 * w + g + 8 * h, k, mma.trans_a); }
    }
    for (size_t i = 0; i < mma.d.size(); i++) {
        int j = (int)i / 4, row_half = (int)(i % 4) / 2, col = 8 * j + 2 * c + (int)i % 2;
        float acc = mma.scale_d ? *mma.d[i] : 0.0f;
        for (int k = 0; k < 16; k++) { acc += a[row_half][k] * wgmma_operand(mma.desc_b, col, k, mma.trans_b); }
        *mma.d[i] = acc;
    }
    mma.done = true;
}

// wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 {d0..d(N/2-1)}, desc-a, desc-b, p, 1, 1,
// trans-a, trans-b (p = scale-d, set from the operand after the descriptors; the transposes the
// two operands after it, immediates)
static void wgmma_issue(const char* ptx, const Operand* ops, size_t count) {
    check_warpgroups();
    if (!whole_warp()) { fail("wgmma.mma_async by a warp with exited threads"); }
    const char* at = strstr(ptx, "wgmma.mma_async.sync.aligned.m64n");
    int n = 0;
    if (!at || sscanf(at + strlen("wgmma.mma_async.sync.aligned.m64n"), "%d", &n) != 1 || n < 8 || n > 256 || n % 8 != 0 ||
        !strstr(at, "k16.f32.bf16.bf16 ")) {
        fail("wgmma.mma_async: only m64nNk16.f32.bf16.bf16 is emulated");
    }
    char tail[64];
    snprintf(tail, sizeof(tail), ", p, 1, 1, %%%d, %%%d;", n / 2 + 3, n / 2 + 4);
    if (!strstr(at, tail)) { fail("wgmma.mma_async: only scale-a = scale-b = 1, with the transposes as operands, is emulated"); }
    if (count != (size_t)n / 2 + 5) { fail("wgmma.mma_async: expected N/2 accumulators, two descriptors, scale-d and the two transposes"); }
    AsyncMma mma;
    for (int i = 0; i < n / 2; i++) { mma.d.push_back((float*)ops[i].address); }
    mma.desc_a = ops[n / 2].value;
    mma.desc_b = ops[n / 2 + 1].value;
    mma.scale_d = (uint32_t)ops[n / 2 + 2].value != 0;
    if (ops[n / 2 + 3].value > 1 || ops[n / 2 + 4].value > 1) { fail("wgmma.mma_async: a transpose other than 0 or 1"); }
    mma.trans_a = ops[n / 2 + 3].value == 1;
    mma.trans_b = ops[n / 2 + 4].value == 1;
    mma.done = false;
    if (!async_writes_early()) { do_wgmma(mma); }  // reads its operands at once, before the warp goes on
    uint64_t mine[3] = {mma.desc_a, mma.desc_b, (uint64_t)mma.scale_d};
    const uint64_t* slots = warp_exchange(mine, 3);
    for (int lane = 0; lane < 32; lane++) {
        if (memcmp(&slots[lane * EXCHANGE_WORDS], mine, sizeof(mine)) != 0) { fail("wgmma.mma_async: the lanes of a warp gave different descriptors or scale-d"); }
    }
    B.async_mmas[B.current].issued.push_back(mma);
}

static void wgmma_commit() {
    check_warpgroups();
    AsyncMmas& q = B.async_mmas[B.current];
    int committed = 0;
    for (int n : q.group_sizes) { committed += n; }
    q.group_sizes.push_back((int)q.issued.size() - committed);
}

// completes the oldest committed groups until at most `pending` remain
EMU_NOT_CHECKED static void wgmma_wait(int pending) {
    check_warpgroups();
    AsyncMmas& q = B.async_mmas[B.current];
    size_t done = 0;
    while ((int)q.group_sizes.size() > pending) {
        for (int m = 0; m < q.group_sizes.front(); m++, done++) {
            if (!q.issued[done].done) { do_wgmma(q.issued[done]); }
        }
        q.group_sizes.erase(q.group_sizes.begin());
    }
    q.issued.erase(q.issued.begin(), q.issued.begin() + done);
}

EMU_NOT_CHECKED static bool starts_with(const char* s, const char* prefix) {
    while (*prefix && *s == *prefix) { s++, prefix++; }
    return *prefix == 0;
}

// The inline PTX the emulation knows, by the text of the asm statement and its operand count
enum PtxKind { PTX_UNKNOWN, PTX_MMA, PTX_LDMATRIX, PTX_LDMATRIX_TRANS, PTX_CP_ASYNC, PTX_CP_ASYNC_COMMIT, PTX_CP_ASYNC_WAIT, PTX_EMPTY,
               PTX_WGMMA, PTX_WGMMA_FENCE, PTX_WGMMA_COMMIT, PTX_WGMMA_WAIT, PTX_FENCE_PROXY_ASYNC };
EMU_NOT_CHECKED static PtxKind ptx_kind(const char* text, size_t count) {
    if (starts_with(text, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 ") && count == 10) { return PTX_MMA; }
    if (starts_with(text, "ldmatrix.sync.aligned.m8n8.x4.shared.b16 ") && count == 5) { return PTX_LDMATRIX; }
    if (starts_with(text, "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 ") && count == 5) { return PTX_LDMATRIX_TRANS; }
    if ((starts_with(text, "cp.async.cg.shared.global ") || starts_with(text, "cp.async.ca.shared.global ")) && count == 3) { return PTX_CP_ASYNC; }
    if (starts_with(text, "cp.async.commit_group;") && count == 0) { return PTX_CP_ASYNC_COMMIT; }
    if (starts_with(text, "cp.async.wait_group ") && count == 1) { return PTX_CP_ASYNC_WAIT; }
    if (text[0] == 0) { return PTX_EMPTY; }
    if (strstr(text, "wgmma.mma_async.sync.aligned.")) { return PTX_WGMMA; }
    if (starts_with(text, "wgmma.fence.sync.aligned;") && count == 0) { return PTX_WGMMA_FENCE; }
    if (starts_with(text, "wgmma.commit_group.sync.aligned;") && count == 0) { return PTX_WGMMA_COMMIT; }
    if (starts_with(text, "wgmma.wait_group.sync.aligned ") && count == 1) { return PTX_WGMMA_WAIT; }
    if (starts_with(text, "fence.proxy.async.shared::cta;") && count == 0) { return PTX_FENCE_PROXY_ASYNC; }
    return PTX_UNKNOWN;
}

EMU_NOT_CHECKED static void ptx(const char* text, std::initializer_list<Operand> operands) {
    const Operand* ops = operands.begin();
    // each asm statement's text is a string literal of the translated source, the same pointer at
    // every run of it: its kind is looked up once and kept, by the pointer (the comparisons of the
    // text took a fifth of an emulated BF16 test_moe run)
    static const char* known_text[256];
    static uint8_t known_kind[256];
    size_t slot = ((uintptr_t)text >> 3) % 256;
    if (known_text[slot] != text) {
        known_text[slot] = text;
        known_kind[slot] = (uint8_t)ptx_kind(text, operands.size());
    }
    switch ((PtxKind)known_kind[slot]) {
        case PTX_MMA: mma_m16n8k16_bf16(ops); break;
        case PTX_LDMATRIX: ldmatrix_x4(ops, false); break;
        case PTX_LDMATRIX_TRANS: ldmatrix_x4(ops, true); break;
        case PTX_CP_ASYNC: cp_async(text, ops); break;
        case PTX_CP_ASYNC_COMMIT: cp_async_commit(); break;
        case PTX_CP_ASYNC_WAIT: cp_async_wait((int)ops[0].value); break;
        case PTX_EMPTY: break;  // asm volatile("" : "+f"(x)): keeps the compiler from moving x across it, nothing to do
        case PTX_WGMMA: wgmma_issue(text, ops, operands.size()); break;
        case PTX_WGMMA_FENCE: check_warpgroups(); break;
        case PTX_WGMMA_COMMIT: wgmma_commit(); break;
        case PTX_WGMMA_WAIT: wgmma_wait((int)ops[0].value); break;
        case PTX_FENCE_PROXY_ASYNC: break;  // the emulation has one proxy: cp.async's writes are seen by wgmma once done
        default:
            fprintf(stderr, "CUDA emulation: inline PTX not emulated: %s\n", text);
            exit(3);
    }
}

static void* dynamic_shared() { return shared_base(); }

}  // namespace emu

static inline size_t __cvta_generic_to_shared(const void* p) { return emu::shared_address(p); }
static inline void __syncthreads() { emu::block_barrier(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_barrier(); }
template <typename T> static inline T __shfl_sync(unsigned mask, T v, int lane, int width = 32) { return emu::shuffle(v, lane % 32); }
template <typename T> static inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) { return emu::shuffle(v, emu::me().lane ^ m); }
template <typename T> static inline unsigned __match_any_sync(unsigned mask, T v) {
    static_assert(sizeof(T) <= 8, "match of more than 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    return emu::match_any(bits);
}
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
template <typename T> static inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    int lane = emu::me().lane;
    return emu::shuffle(v, lane >= (int)d ? lane - (int)d : lane);
}
template <typename T> static inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    int lane = emu::me().lane;
    return emu::shuffle(v, lane + (int)d < 32 ? lane + (int)d : lane);
}

// ----------------------------------------------------------------------------
// the runtime API, synchronous, on host memory

typedef int cudaError_t;
static const cudaError_t cudaSuccess = 0;
static const cudaError_t cudaErrorMemoryAllocation = 2;
typedef struct emu_stream* cudaStream_t;
typedef struct emu_event* cudaEvent_t;
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice, cudaMemcpyHostToHost, cudaMemcpyDefault };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
static const unsigned cudaEventDisableTiming = 2;
struct cudaDeviceProp {
    char name[256];
    int major, minor, multiProcessorCount;
    size_t sharedMemPerBlockOptin, totalGlobalMem;
};

static inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
static inline cudaError_t cudaGetLastError() { return cudaSuccess; }
namespace emu {
// The device memory: every cudaMalloc in a table, so that copies, memsets and cuBLASLt operands
// are checked against the allocation they start in, and the total against the device's size
// (EMU_DEVICE_GIB, default 80: an H100).
struct Allocation { size_t bytes; void* mapping; size_t mapped; };
static std::map<uintptr_t, Allocation>& allocations() {
    static std::map<uintptr_t, Allocation> table;
    return table;
}
static size_t allocated_bytes = 0;
static size_t device_bytes() {
    static const size_t bytes = (size_t)(getenv("EMU_DEVICE_GIB") ? atof(getenv("EMU_DEVICE_GIB")) : 80.0) * ((size_t)1 << 30);
    return bytes;
}
// p .. p+n must lie in the allocation p points into (a pointer outside every allocation is host memory)
static void check_range(const void* p, size_t n, const char* who) {
    auto& table = allocations();
    auto it = table.upper_bound((uintptr_t)p);
    if (it == table.begin()) { return; }
    --it;
    uintptr_t start = it->first, end = start + it->second.bytes;
    if ((uintptr_t)p >= end) { return; }
    if ((uintptr_t)p + n > end) {
        char what[200];
        snprintf(what, sizeof(what), "%s: %zu bytes at offset %zu of a %zu-byte cudaMalloc, %zu past its end", who, n,
                 (size_t)((uintptr_t)p - start), it->second.bytes, (size_t)((uintptr_t)p + n - end));
        fail(what);
    }
}
// EMU_SAMPLE=1: the memory is mapped, not touched (it reads as zero; no host memory until written,
// or, on kernels that back a read fault with a page of its own, until read: hence the few reads
// of sampled mode), the buffer's end as close to an inaccessible guard page as 256-byte
// alignment allows, and a guard page before its start
static const size_t PAGE = 4096;
static void* map_device(size_t bytes, Allocation* a) {
    size_t span = (bytes + PAGE - 1) / PAGE * PAGE;
    a->mapped = span + 2 * PAGE;
    a->mapping = mmap(NULL, a->mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (a->mapping == MAP_FAILED) { return NULL; }
    char* base = (char*)a->mapping;
    // huge pages: a kernel that reads untouched memory reads the huge zero page (where the
    // kernel maps it), instead of taking a page fault every 4 KiB (about 10 us each on this
    // project's machines: a sampled step took 40 s with 4 KiB pages, 0.4 s with huge pages)
    madvise(base, a->mapped, MADV_HUGEPAGE);
    mprotect(base, PAGE, PROT_NONE);
    mprotect(base + PAGE + span, PAGE, PROT_NONE);
    return base + PAGE + ((span - bytes) & ~(size_t)255);
}
}  // namespace emu

static inline cudaError_t cudaMalloc(void** p, size_t bytes) {
    *p = NULL;
    if (emu::allocated_bytes + bytes > emu::device_bytes()) { return cudaErrorMemoryAllocation; }
    emu::Allocation a = {bytes, NULL, 0};
    if (emu::sampled()) {
        *p = emu::map_device(bytes, &a);
        if (*p == NULL) { return cudaErrorMemoryAllocation; }
    } else {
        // 256-byte aligned, as cudaMalloc; exactly `bytes` long, so that AddressSanitizer sees an
        // access past the end even where a GPU would not fault (compute-sanitizer's memcheck would)
        if (posix_memalign(p, 256, std::max<size_t>(bytes, 1)) != 0) { *p = NULL; return cudaErrorMemoryAllocation; }
        memset(*p, 0xFF, bytes);  // fresh device memory is not zero: NaN shows a read before a write
    }
    emu::allocations()[(uintptr_t)*p] = a;
    emu::allocated_bytes += bytes;
    return cudaSuccess;
}
template <typename T> static inline cudaError_t cudaMalloc(T** p, size_t bytes) { return cudaMalloc((void**)p, bytes); }
static inline cudaError_t cudaFree(void* p) {
    if (p == NULL) { return cudaSuccess; }
    auto it = emu::allocations().find((uintptr_t)p);
    if (it == emu::allocations().end()) { emu::fail("cudaFree of a pointer that cudaMalloc did not return, or freed twice"); }
    emu::allocated_bytes -= it->second.bytes;
    if (it->second.mapping) { munmap(it->second.mapping, it->second.mapped); } else { free(p); }
    emu::allocations().erase(it);
    return cudaSuccess;
}
// pinned host memory: host memory, not counted as the device's
template <typename T> static inline cudaError_t cudaMallocHost(T** p, size_t bytes) {
    return posix_memalign((void**)p, 256, std::max<size_t>(bytes, 1)) == 0 ? cudaSuccess : cudaErrorMemoryAllocation;
}
static inline cudaError_t cudaFreeHost(void* p) { free(p); return cudaSuccess; }
static inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
    emu::check_range(d, n, "cudaMemcpy destination");
    emu::check_range(s, n, "cudaMemcpy source");
    memmove(d, s, n);
    return cudaSuccess;
}
static inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind k, cudaStream_t = 0) { return cudaMemcpy(d, s, n, k); }
static inline cudaError_t cudaMemset(void* d, int v, size_t n) {
    emu::check_range(d, n, "cudaMemset");
    char* p = (char*)d;
    if (emu::sampled() && v == 0 && n > 2 * emu::PAGE) {
        // zeroing whole pages of a mapping gives them back: they read as zero, and cost no memory
        char* first = (char*)(((uintptr_t)p + emu::PAGE - 1) / emu::PAGE * emu::PAGE);
        char* last = (char*)(((uintptr_t)p + n) / emu::PAGE * emu::PAGE);
        memset(p, 0, first - p);
        madvise(first, last - first, MADV_DONTNEED);
        memset(last, 0, p + n - last);
        return cudaSuccess;
    }
    memset(d, v, n);
    return cudaSuccess;
}
static inline cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t = 0) { return cudaMemset(d, v, n); }
static inline cudaError_t cudaStreamCreate(cudaStream_t* s) { *s = (cudaStream_t)1; return cudaSuccess; }
static inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
static inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
static inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
// An event holds the host's clock when it was recorded: the emulation runs everything at once, so
// that is when the work before it ended, and cudaEventElapsedTime gives the emulated work's time.
struct emu_event { double seconds = 0.0; };
static inline double emu_seconds_now() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}
static inline cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = new emu_event(); return cudaSuccess; }
static inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { *e = new emu_event(); return cudaSuccess; }
static inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = 0) { e->seconds = emu_seconds_now(); return cudaSuccess; }
static inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
static inline cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
static inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
    *ms = (float)(1e3 * (end->seconds - start->seconds));
    return cudaSuccess;
}
template <typename F> static inline cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute, int value) {
    if (value < 0 || (size_t)value > emu::device_shared_optin()) { emu::fail("cudaFuncSetAttribute: more shared memory than the device has per block"); }
    emu::shared_limits()[emu::kernel_id(kernel)] = value;
    return cudaSuccess;
}
static inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
static inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin };
static inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
    *value = (int)emu::device_shared_optin();
    return cudaSuccess;
}
static inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "CPU emulation");
    p->major = 9;
    p->multiProcessorCount = 1;
    p->sharedMemPerBlockOptin = emu::device_shared_optin();
    p->totalGlobalMem = emu::device_bytes();
    return cudaSuccess;
}
static inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total) {
    *total = emu::device_bytes();
    *free_bytes = *total - emu::allocated_bytes;
    return cudaSuccess;
}

// ----------------------------------------------------------------------------
// cuBLASLt: the matmul kernels/matmul.cuh asks for, column-major, in plain loops (fp32 sums)

typedef int cublasStatus_t;
static const cublasStatus_t CUBLAS_STATUS_SUCCESS = 0;
static const cublasStatus_t CUBLAS_STATUS_NOT_SUPPORTED = 15;
static inline const char* cublasGetStatusString(cublasStatus_t status) {
    switch (status) {
        case 0: return "CUBLAS_STATUS_SUCCESS";
        case 7: return "CUBLAS_STATUS_INVALID_VALUE";
        case 14: return "CUBLAS_STATUS_INTERNAL_ERROR";
        case 15: return "CUBLAS_STATUS_NOT_SUPPORTED";
        default: return "CUBLAS_STATUS_UNKNOWN";
    }
}
enum cudaDataType_t { CUDA_R_32F, CUDA_R_16BF };
typedef cudaDataType_t cudaDataType;
enum cublasComputeType_t { CUBLAS_COMPUTE_32F };
enum cublasOperation_t { CUBLAS_OP_N, CUBLAS_OP_T };
enum cublasLtEpilogue_t { CUBLASLT_EPILOGUE_DEFAULT, CUBLASLT_EPILOGUE_BIAS };
enum cublasLtMatmulDescAttributes_t { CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB, CUBLASLT_MATMUL_DESC_EPILOGUE,
                                      CUBLASLT_MATMUL_DESC_BIAS_POINTER };
enum cublasLtMatmulPreferenceAttributes_t { CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES };
struct emu_lt_desc { cublasOperation_t trans_a = CUBLAS_OP_N, trans_b = CUBLAS_OP_N; cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT; const void* bias = NULL; };
struct emu_lt_layout { cudaDataType_t type; uint64_t rows, cols; int64_t ld; };
typedef emu_lt_desc* cublasLtMatmulDesc_t;
typedef emu_lt_layout* cublasLtMatrixLayout_t;
// the alignment (bytes) an algorithm may assume of A, B, C and D: 256 unless the preference says less
struct emu_lt_pref { uint32_t align[4] = {256, 256, 256, 256}; };
typedef emu_lt_pref* cublasLtMatmulPreference_t;
typedef struct emu_lt_handle* cublasLtHandle_t;
struct cublasLtMatmulAlgo_t { uint32_t align[4]; };
struct cublasLtMatmulHeuristicResult_t { cublasLtMatmulAlgo_t algo; };

static inline cublasStatus_t cublasLtCreate(cublasLtHandle_t* h) { *h = (cublasLtHandle_t)1; return 0; }
static inline cublasStatus_t cublasLtDestroy(cublasLtHandle_t) { return 0; }
static inline cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t, cudaDataType_t) { *d = new emu_lt_desc(); return 0; }
static inline cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) { delete d; return 0; }
static inline cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a, const void* v, size_t) {
    switch (a) {
        case CUBLASLT_MATMUL_DESC_TRANSA: d->trans_a = *(const cublasOperation_t*)v; break;
        case CUBLASLT_MATMUL_DESC_TRANSB: d->trans_b = *(const cublasOperation_t*)v; break;
        case CUBLASLT_MATMUL_DESC_EPILOGUE: d->epilogue = *(const cublasLtEpilogue_t*)v; break;
        case CUBLASLT_MATMUL_DESC_BIAS_POINTER: d->bias = *(const void* const*)v; break;
    }
    return 0;
}
static inline cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType_t t, uint64_t rows, uint64_t cols, int64_t ld) {
    if (ld < (int64_t)rows) { return 7; }  // CUBLAS_STATUS_INVALID_VALUE
    *l = new emu_lt_layout{t, rows, cols, ld};
    return 0;
}
static inline cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) { delete l; return 0; }
static inline cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* p) { *p = new emu_lt_pref(); return 0; }
static inline cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) { delete p; return 0; }
static inline cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t a, const void* v, size_t) {
    if (a != CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES) { p->align[a - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES] = *(const uint32_t*)v; }
    return 0;
}
// EMU_LT_NO_BIAS_EPILOGUE=1: no algorithm takes the bias epilogue (CUBLAS_STATUS_NOT_SUPPORTED, as
// a real cuBLASLt may answer for some problems), so that the caller's way around it is tested
static inline cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                                            cublasLtMatrixLayout_t, cublasLtMatrixLayout_t, cublasLtMatmulPreference_t p, int,
                                                            cublasLtMatmulHeuristicResult_t* result, int* found) {
    static const bool no_bias_epilogue = getenv("EMU_LT_NO_BIAS_EPILOGUE") != NULL && strcmp(getenv("EMU_LT_NO_BIAS_EPILOGUE"), "1") == 0;
    *found = 0;
    if (no_bias_epilogue && d->epilogue == CUBLASLT_EPILOGUE_BIAS) { return CUBLAS_STATUS_NOT_SUPPORTED; }
    memcpy(result->algo.align, p->align, sizeof(p->align));  // the algorithm found relies on these
    *found = 1;
    return 0;
}

namespace emu {
static inline float load(const void* p, cudaDataType_t t, size_t i) {
    return t == CUDA_R_32F ? ((const float*)p)[i] : (float)((const __nv_bfloat16*)p)[i];
}
static inline size_t element_bytes(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }
static inline void store(void* p, cudaDataType_t t, size_t i, float v) {
    if (t == CUDA_R_32F) { ((float*)p)[i] = v; } else { ((__nv_bfloat16*)p)[i] = __float2bfloat16(v); }
}
}  // namespace emu

// D (m x n) = alpha op(A) op(B) + beta C [+ bias (m), of D's type], column-major; C must be D.
// A pointer less aligned than the algorithm assumes (the preference's minimum alignment, 256
// bytes by default), or a bias not 16-byte aligned, is a misaligned access on a GPU: an error here.
static const cublasStatus_t EMU_CUBLAS_STATUS_MISALIGNED = 14;  // CUBLAS_STATUS_INTERNAL_ERROR
static inline cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t d, const void* alpha, const void* A, cublasLtMatrixLayout_t la,
                                            const void* Bm, cublasLtMatrixLayout_t lb, const void* beta, const void* C, cublasLtMatrixLayout_t lc,
                                            void* D, cublasLtMatrixLayout_t ld, const cublasLtMatmulAlgo_t* algo, void*, size_t, cudaStream_t) {
    const void* operands[4] = {A, Bm, C, D};
    for (int i = 0; i < 4; i++) {
        if ((uintptr_t)operands[i] % algo->align[i] != 0) {
            fprintf(stderr, "emulated cuBLASLt: operand %c at %p is not %u-byte aligned, as the algorithm assumes\n", "ABCD"[i], operands[i], algo->align[i]);
            return EMU_CUBLAS_STATUS_MISALIGNED;
        }
    }
    if (d->epilogue == CUBLASLT_EPILOGUE_BIAS && (uintptr_t)d->bias % 16 != 0) {
        fprintf(stderr, "emulated cuBLASLt: the bias epilogue's pointer %p is not 16-byte aligned\n", d->bias);
        return EMU_CUBLAS_STATUS_MISALIGNED;
    }
    bool ta = d->trans_a == CUBLAS_OP_T, tb = d->trans_b == CUBLAS_OP_T;
    uint64_t m = ld->rows, n = ld->cols, k = ta ? la->rows : la->cols;
    if ((ta ? la->cols : la->rows) != m || (tb ? lb->rows : lb->cols) != n || (tb ? lb->cols : lb->rows) != k) { return 7; }
    if (C != D || lc->rows != m || lc->cols != n) { return 7; }
    // each operand, its last column included, inside the allocation it starts in
    const cublasLtMatrixLayout_t layouts[4] = {la, lb, lc, ld};
    const char* who[4] = {"cuBLASLt operand A", "cuBLASLt operand B", "cuBLASLt operand C", "cuBLASLt operand D"};
    for (int i = 0; i < 4; i++) {
        const emu_lt_layout* l = layouts[i];
        size_t elements = l->cols == 0 ? 0 : (size_t)(l->cols - 1) * l->ld + l->rows;
        emu::check_range(operands[i], elements * emu::element_bytes(l->type), who[i]);
    }
    if (d->epilogue == CUBLASLT_EPILOGUE_BIAS) { emu::check_range(d->bias, m * emu::element_bytes(ld->type), "cuBLASLt bias"); }
    float a = *(const float*)alpha, b = *(const float*)beta;
    // EMU_SAMPLE=1: of the inner dimension, only its first and last elements. That mode checks no
    // values; the operands' extreme addresses are still read, while a whole row of A or column
    // of B would read a page per element, and a kernel that backs a read fault with memory of its
    // own (some do, instead of the zero page) then holds gigabytes: 13 GiB for one column of the
    // fp32 dlogits at B=64, and a run killed for want of memory
    uint64_t inner_step = emu::sampled() && k > 1 ? k - 1 : 1;
    auto element = [&](uint64_t i, uint64_t j) {
        float acc = 0.0f;
        for (uint64_t p = 0; p < k; p += inner_step) {
            float x = emu::load(A, la->type, ta ? i * la->ld + p : p * la->ld + i);
            float y = emu::load(Bm, lb->type, tb ? p * lb->ld + j : j * lb->ld + p);
            acc += x * y;
        }
        float v = a * acc;
        if (b != 0.0f) { v += b * emu::load(D, ld->type, j * ld->ld + i); }
        if (d->epilogue == CUBLASLT_EPILOGUE_BIAS) { v += emu::load(d->bias, ld->type, i); }
        emu::store(D, ld->type, j * ld->ld + i, v);
    };
    if (emu::sampled()) {  // two corners: the first and the last row and column of every operand
        if (m > 0 && n > 0) {
            element(0, 0);
            element(m - 1, n - 1);
        }
        return 0;
    }
    for (uint64_t j = 0; j < n; j++) {
        for (uint64_t i = 0; i < m; i++) { element(i, j); }
    }
    return 0;
}
