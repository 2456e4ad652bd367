/*
The emulation's own check that running the threads in two orders exposes races. Each kernel
below but the last has a deliberate race, the kind a missing barrier or wait makes; the program prints
one line per kernel with what the kernel computed. tests/emu/run.sh runs it with EMU_ORDER=forward
and EMU_ORDER=reverse and expects every racy kernel's line to differ between the two runs and the
race-free kernel's line to be the same. (Valid CUDA too: on a GPU the racy results are whatever
the hardware's timing gives.)
*/
#include <cstdio>
#include <cuda_runtime.h>

static const int THREADS = 64;

// A lower thread writes, the higher ones read, no barrier: right when thread 0 runs first.
__global__ void broadcast_without_barrier(int* out) {
    __shared__ int value;
    if (threadIdx.x == 0) { value = 0; }
    __syncthreads();
    if (threadIdx.x == 0) { value = 7; }
    out[threadIdx.x] = value;  // a __syncthreads() missing before this read
}

// Every thread writes its slot, thread 0 reads them all, no barrier: right when thread 0 runs last.
__global__ void gather_without_barrier(int* out) {
    __shared__ int slots[THREADS];
    slots[threadIdx.x] = 0;
    __syncthreads();
    slots[threadIdx.x] = threadIdx.x;
    if (threadIdx.x == 0) {  // a __syncthreads() missing before this
        int sum = 0;
        for (int i = 0; i < THREADS; i++) { sum += slots[i]; }
        out[0] = sum;
    }
}

// Lane 0 of each warp writes the warp's value, the other lanes read it, no __syncwarp: a kernel
// that relies on the lanes of a warp running in lockstep.
__global__ void warp_broadcast_without_syncwarp(int* out) {
    __shared__ int value[THREADS / 32];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { value[warp] = 0; }
    __syncthreads();
    if (lane == 0) { value[warp] = 10 + warp; }
    out[threadIdx.x] = value[warp];  // a __syncwarp() missing before this read
}

// Block 0 writes what block 1 reads within one launch: no order between blocks is guaranteed.
__global__ void across_blocks(int* flag, int* out) {
    if (threadIdx.x != 0) { return; }
    if (blockIdx.x == 0) { *flag = 1; }
    if (blockIdx.x == 1) { out[0] = *flag; }
}

// A thread reads the shared memory its own cp.async fills before cp.async.wait_group: right only
// when the copy lands early (the reverse order's timing; see async_writes_early in cuda_emu.h).
__global__ void cp_async_read_before_wait(const int* in, int* out) {
    extern __shared__ int4 staged[];
    staged[threadIdx.x] = make_int4(0, 0, 0, 0);
    __syncthreads();
    unsigned dst = (unsigned)__cvta_generic_to_shared(&staged[threadIdx.x]);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(in + 4 * threadIdx.x), "r"(16) : "memory");
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    out[threadIdx.x] = staged[threadIdx.x].x;  // a cp.async.wait_group 0 missing before this read
    asm volatile("cp.async.wait_group %0;\n" ::"n"(0) : "memory");
}

// One warpgroup's wgmma m64n8k16 of ones (A 64 x 16, B 8 x 16, K-major without swizzling, core
// matrices 128 bytes apart along k and 256 along the rows); thread 0 then refills B with twos
// before its wgmma.wait_group: right only when the wgmma reads its operands at issue.
__global__ void wgmma_operand_refilled_before_wait(int* out) {
    extern __shared__ unsigned short operands[];  // bf16 bits: A (1024), then B (128)
    const unsigned short one = 0x3F80, two = 0x4000;
    for (int i = threadIdx.x; i < 1024 + 128; i += blockDim.x) { operands[i] = one; }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    unsigned a = (unsigned)__cvta_generic_to_shared(operands), b = (unsigned)__cvta_generic_to_shared(operands + 1024);
    unsigned long long desc_a = (a >> 4) | (128ull >> 4 << 16) | (256ull >> 4 << 32), desc_b = (b >> 4) | (128ull >> 4 << 16) | (256ull >> 4 << 32);
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0, %1, %2, %3}, %4, %5, p, 1, 1, %7, %8;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "l"(desc_a), "l"(desc_b), "r"(0), "n"(0), "n"(0));
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    if (threadIdx.x == 0) {  // a wgmma.wait_group 0 missing before these writes
        for (int i = 1024; i < 1024 + 128; i++) { operands[i] = two; }
    }
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(0) : "memory");
    out[threadIdx.x] = (int)(d[0] + d[1] + d[2] + d[3]);
}

// The first kernel with its barrier: the same in both orders.
__global__ void broadcast_with_barrier(int* out) {
    __shared__ int value;
    if (threadIdx.x == 0) { value = 7; }
    __syncthreads();
    out[threadIdx.x] = value;
}

// Prints NAME: the first n outputs.
static void print_outputs(const char* name, const int* d_out, int n) {
    int host[THREADS];
    cudaMemcpy(host, d_out, n * sizeof(int), cudaMemcpyDeviceToHost);
    printf("%s:", name);
    for (int i = 0; i < n; i++) { printf(" %d", host[i]); }
    printf("\n");
}

int main() {
    int *d_out, *d_flag;
    cudaMalloc(&d_out, THREADS * sizeof(int));
    cudaMalloc(&d_flag, sizeof(int));

    cudaMemset(d_out, 0, THREADS * sizeof(int));
    broadcast_without_barrier<<<1, THREADS>>>(d_out);
    print_outputs("racy broadcast_without_barrier", d_out, THREADS);

    cudaMemset(d_out, 0, THREADS * sizeof(int));
    gather_without_barrier<<<1, THREADS>>>(d_out);
    print_outputs("racy gather_without_barrier", d_out, 1);

    cudaMemset(d_out, 0, THREADS * sizeof(int));
    warp_broadcast_without_syncwarp<<<1, THREADS>>>(d_out);
    print_outputs("racy warp_broadcast_without_syncwarp", d_out, THREADS);

    cudaMemset(d_out, 0, THREADS * sizeof(int));
    cudaMemset(d_flag, 0, sizeof(int));
    across_blocks<<<2, 32>>>(d_flag, d_out);
    print_outputs("racy across_blocks", d_out, 1);

    int ramp[4 * THREADS];
    for (int i = 0; i < 4 * THREADS; i++) { ramp[i] = i + 1; }
    int* d_in;
    cudaMalloc(&d_in, sizeof(ramp));
    cudaMemcpy(d_in, ramp, sizeof(ramp), cudaMemcpyHostToDevice);
    cudaMemset(d_out, 0, THREADS * sizeof(int));
    cp_async_read_before_wait<<<1, THREADS, THREADS * 16>>>(d_in, d_out);
    print_outputs("racy cp_async_read_before_wait", d_out, THREADS);
    cudaFree(d_in);

    int* d_wide;
    cudaMalloc(&d_wide, 128 * sizeof(int));
    wgmma_operand_refilled_before_wait<<<1, 128, (1024 + 128) * 2>>>(d_wide);
    print_outputs("racy wgmma_operand_refilled_before_wait", d_wide, THREADS);
    cudaFree(d_wide);

    cudaMemset(d_out, 0, THREADS * sizeof(int));
    broadcast_with_barrier<<<1, THREADS>>>(d_out);
    print_outputs("safe broadcast_with_barrier", d_out, THREADS);

    cudaFree(d_out);
    cudaFree(d_flag);
    return 0;
}
