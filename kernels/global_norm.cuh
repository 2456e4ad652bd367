/*
The squared global L2 norm of all gradients, for clipping. Two stages with a partition that
depends only on n (NORM_BLOCKS fixed slices): each block sums its slice, then one block adds the
slice sums in order. The result is the same on every run and every GPU for the same gradients.
*/
#pragma once

#include "common.cuh"

#define NORM_BLOCKS 1024

// ----------------------------------------------------------------------------
// CUDA kernels

__global__ void norm_partials_kernel(float* partials, const float* x, size_t n) {
    __shared__ float shared[WARP_SIZE];
    size_t slice = (n + NORM_BLOCKS - 1) / NORM_BLOCKS;
    size_t first = blockIdx.x * slice, last = min(first + slice, n);
    float s = 0.0f;
    for (size_t i = first + threadIdx.x; i < last; i += blockDim.x) { s += x[i] * x[i]; }
    s = block_reduce_sum(s, shared);
    if (threadIdx.x == 0) { partials[blockIdx.x] = s; }
}

__global__ void norm_sum_kernel(float* out, const float* partials) {
    __shared__ float shared[WARP_SIZE];
    float s = 0.0f;
    for (int i = threadIdx.x; i < NORM_BLOCKS; i += blockDim.x) { s += partials[i]; }
    s = block_reduce_sum(s, shared);
    if (threadIdx.x == 0) { *out = s; }
}

// ----------------------------------------------------------------------------
// kernel launchers

static size_t global_norm_scratch_floats(size_t n) { return NORM_BLOCKS; }

// *out (device) = sum of grads[i]^2
static void global_norm_squared(float* out, const float* grads, size_t n, float* scratch, cudaStream_t stream) {
    norm_partials_kernel<<<NORM_BLOCKS, 512, 0, stream>>>(scratch, grads, n);
    cudaCheckLaunch();
    norm_sum_kernel<<<1, 1024, 0, stream>>>(out, scratch);
    cudaCheckLaunch();
}
