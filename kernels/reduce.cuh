/*
Scalars the training loop keeps on the device, so that a step needs no host-device
synchronisation until its end: the mean cross-entropy of a micro-batch, and running sums of
per-step values (losses over micro-steps, auxiliary losses over layers). Sums go in a fixed
order: one block, a fixed stride per thread, a fixed tree.
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

// ----------------------------------------------------------------------------
// kernel launchers

// *acc += scale * (values[0] + ... + values[n-1]); acc and values on the device
static void accumulate_sum(float* acc, const float* values, int n, float scale, cudaStream_t stream) {
    accumulate_sum_kernel<<<1, 1024, 0, stream>>>(acc, values, n, scale);
    cudaCheckLaunch();
}
