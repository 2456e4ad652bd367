/*
Deterministic sums. Scalars the training loop keeps on the device, so that a step needs no
host-device synchronisation until its end: the mean cross-entropy of a micro-batch, and running
sums of per-step values (losses over micro-steps, auxiliary losses over layers). And the column
sums of a matrix of partial sums, the second stage of every weight gradient that sums over
tokens without atomics (a bias, a layer norm's weight and bias, the router's weight: each block
of tokens writes a row of partial sums, then their columns are summed). Sums go in a fixed
order: a fixed stride per thread, a fixed tree.
*/
#pragma once

#include "common.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

// *acc += scale * sum(values[0..n)), one block
__global__ void accumulate_sum_kernel(float* acc, const float* values, int n, float scale) {
    __shared__ float shared[WARP_SIZE];
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { s += values[i]; }
    s = block_reduce_sum(s, shared);
    if (threadIdx.x == 0) { *acc += scale * s; }
}

// out[j] += the sum over first <= i < last of in[i ld + j], for the block's COLUMN_SUM_COLUMNS
// columns j = blockIdx.x * COLUMN_SUM_COLUMNS + threadIdx.x below cols, with COLUMN_SUM_LANES
// threads per column (a block of dim3(COLUMN_SUM_COLUMNS, COLUMN_SUM_LANES)): thread y sums rows
// first + y, first + y + 32, ... in order (a warp reads 32 adjacent values of a row), then a fixed
// tree in shared memory adds the 32 sums. No thread walks more than (last - first) / 32 values:
// with one thread per column (the kernels before 2026-12-07) a thread walked all of them, one
// load after another (a bias's 1024 partial rows at B=64, a layer norm's 2048), on as few as 3
// blocks for 768 columns, a chain of loads at the end of every weight gradient while the rest
// of the GPU waited. Used by column_sums_kernel (the rows of a matrix of partial sums) and by
// expert_mlp.cuh's bias gradients (an expert's rows).
#define COLUMN_SUM_COLUMNS 32
#define COLUMN_SUM_LANES 32
template <typename T>
__device__ void column_sums_block(float* out, const T* in, size_t ld, int first, int last, int cols) {
    __shared__ float lane_sums[COLUMN_SUM_LANES][COLUMN_SUM_COLUMNS];
    int j = blockIdx.x * COLUMN_SUM_COLUMNS + threadIdx.x, y = threadIdx.y;
    float s = 0.0f;
    if (j < cols) {
        for (int i = first + y; i < last; i += COLUMN_SUM_LANES) { s += to_float(in[(size_t)i * ld + j]); }
    }
    lane_sums[y][threadIdx.x] = s;
    for (int half = COLUMN_SUM_LANES / 2; half > 0; half /= 2) {
        __syncthreads();
        if (y < half) { lane_sums[y][threadIdx.x] += lane_sums[y + half][threadIdx.x]; }
    }
    if (y == 0 && j < cols) { out[j] += lane_sums[0][threadIdx.x]; }
}

// out[j] += the sum over i < rows of in[i ld + j], for j < cols. Speed of light: the matrix read
// once, 3 MB for a 768-wide bias at B=64 (1 us at 3.35 TB/s, from L2 faster still).
__global__ void column_sums_kernel(float* out, const float* in, size_t ld, int rows, int cols) {
    column_sums_block(out, in, ld, 0, rows, cols);
}

// ----------------------------------------------------------------------------
// kernel launchers

// out (cols) += the column sums of in (rows x cols, rows ld apart); out and in on the device
static void column_sums(float* out, const float* in, size_t ld, int rows, int cols, cudaStream_t stream) {
    column_sums_kernel<<<ceil_div_int(cols, COLUMN_SUM_COLUMNS), dim3(COLUMN_SUM_COLUMNS, COLUMN_SUM_LANES), 0, stream>>>(out, in, ld, rows, cols);
    cudaCheckLaunch();
}

// *acc += scale * (values[0] + ... + values[n-1]); acc and values on the device
static void accumulate_sum(float* acc, const float* values, int n, float scale, cudaStream_t stream) {
    accumulate_sum_kernel<<<1, 1024, 0, stream>>>(acc, values, n, scale);
    cudaCheckLaunch();
}
