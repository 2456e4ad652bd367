/*
The emulation's own check that running the threads in two orders exposes races. Each kernel
below but the last has a deliberate race, the kind a missing barrier makes; the program prints
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

    cudaMemset(d_out, 0, THREADS * sizeof(int));
    broadcast_with_barrier<<<1, THREADS>>>(d_out);
    print_outputs("safe broadcast_with_barrier", d_out, THREADS);

    cudaFree(d_out);
    cudaFree(d_flag);
    return 0;
}
