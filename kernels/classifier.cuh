/*
The fused classifier: for each row of logits (N, Vp), the cross-entropy against its target over
the first V columns (the padding never enters the softmax), and, when a loss scale is given, the
gradient (softmax - onehot(target)) * dloss written over the logits in place, 0 in the padding.
One block per row, one pass for the max and the sum of exps, one for the gradient: no
probability matrix is ever stored.
*/
#pragma once

#include "common.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

__global__ void classifier_kernel(floatX* logits, float* losses, const int* targets, float dloss, int V, int Vp) {
    __shared__ float shared[WARP_SIZE];
    floatX* z = logits + (size_t)blockIdx.x * Vp;
    float maxval = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) { maxval = fmaxf(maxval, to_float(z[v])); }
    maxval = block_reduce_max(maxval, shared);
    float sum = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) { sum += expf(to_float(z[v]) - maxval); }
    sum = block_reduce_sum(sum, shared);
    int target = targets[blockIdx.x];
    float target_logit = to_float(z[target]);
    __syncthreads();  // every thread has read z[target] before any overwrites it
    if (threadIdx.x == 0) { losses[blockIdx.x] = logf(sum) + maxval - target_logit; }
    if (dloss == 0.0f) { return; }
    float scale = dloss / sum;
    for (int v = threadIdx.x; v < Vp; v += blockDim.x) {
        float g = v < V ? expf(to_float(z[v]) - maxval) * scale - (v == target ? dloss : 0.0f) : 0.0f;
        z[v] = from_float<floatX>(g);
    }
}

// ----------------------------------------------------------------------------
// kernel launchers

// losses (N); with dloss != 0, logits (N, Vp) become dlogits in place
static void classifier_forward_backward(floatX* logits, float* losses, const int* targets, float dloss, int N, int V, int Vp, cudaStream_t stream) {
    if (V > Vp) { die("classifier: V=%d exceeds the padded vocabulary Vp=%d", V, Vp); }
    classifier_kernel<<<N, 1024, 0, stream>>>(logits, losses, targets, dloss, V, Vp);
    cudaCheckLaunch();
}
