/*
The fused classifier: for each row of logits (N, Vp), the cross-entropy against its target over
the first V columns (the padding never enters the softmax), and, when a loss scale is given, the
gradient (softmax - onehot(target)) * dloss written over the logits in place, 0 in the padding.
One block per row and two passes over it: one read for the softmax's max and sum together
(online softmax), one read and write for the gradient. No probability matrix is ever stored.

Speed of light (GPT-2, V = 50257, Vp = 50304, bf16): a row is 100.6 KB read twice and written
once, 302 KB per token; B*T = 8192 tokens move 2.47 GB, 0.74 ms at an H100's 3.35 TB/s. The
FLOPs (one exp per logit per pass) are negligible: the kernel is bound by memory.
*/
#pragma once

#include "common.cuh"

// ----------------------------------------------------------------------------
// online softmax (Milakov and Gimelshein, 2018)

// A running softmax denominator: the largest logit seen and the sum of exp(z - max) over the
// logits seen. Adding a logit larger than the max rescales the sum; two partial sums over
// disjoint logits merge the same way, so one read of the row gives both max and sum.
struct SoftmaxStats {
    float max, sum;
};

__device__ __forceinline__ SoftmaxStats softmax_add(SoftmaxStats a, float z) {
    if (z > a.max) { return {z, a.sum * expf(a.max - z) + 1.0f}; }  // exp(-inf) = 0 for the first logit
    return {a.max, a.sum + expf(z - a.max)};                         // a NaN logit lands here and stays
}

__device__ __forceinline__ SoftmaxStats softmax_merge(SoftmaxStats a, SoftmaxStats b) {
    if (a.max == -INFINITY) { return b; }  // two sides with no logit would give exp(-inf - -inf) = NaN
    float m = fmaxf(a.max, b.max);
    return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};  // symmetric in a and b
}

// The merge over the warp in an xor butterfly; the merge is symmetric, so every lane ends with
// the same value.
__device__ __forceinline__ SoftmaxStats warp_reduce_softmax(SoftmaxStats v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        SoftmaxStats other = {__shfl_xor_sync(0xffffffff, v.max, offset), __shfl_xor_sync(0xffffffff, v.sum, offset)};
        v = softmax_merge(v, other);
    }
    return v;
}

// The merge over the block, returned to every thread, in a fixed tree (bit-identical runs), as
// block_reduce_sum; `shared` holds at least 32 entries.
__device__ __forceinline__ SoftmaxStats block_reduce_softmax(SoftmaxStats v, SoftmaxStats* shared) {
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
    v = warp_reduce_softmax(v);
    __syncthreads();  // a previous use of `shared` is over
    if (lane == 0) { shared[warp] = v; }
    __syncthreads();
    v = lane < warps ? shared[lane] : SoftmaxStats{-INFINITY, 0.0f};
    return warp_reduce_softmax(v);
}

// The row's loss from its merged stats, written by thread 0; returns the target. Every thread
// has read z[target] when it returns, so the row may then be overwritten with the gradient.
__device__ __forceinline__ int classifier_row_loss(const floatX* z, SoftmaxStats stats, float* losses, const int* targets) {
    int target = targets[blockIdx.x];
    float target_logit = to_float(z[target]);
    __syncthreads();
    if (threadIdx.x == 0) { losses[blockIdx.x] = logf(stats.sum) + stats.max - target_logit; }
    return target;
}

// dloss * (softmax - onehot(target)) at column v for logit zv, 0 in the padding (v >= V)
__device__ __forceinline__ float classifier_gradient(float zv, int v, int V, int target, SoftmaxStats stats, float dloss) {
    if (v >= V) { return 0.0f; }
    return expf(zv - stats.max) * (dloss / stats.sum) - (v == target ? dloss : 0.0f);
}

// ----------------------------------------------------------------------------
// CUDA kernels

__global__ void classifier_kernel(floatX* logits, float* losses, const int* targets, float dloss, int V, int Vp) {
    __shared__ SoftmaxStats shared[WARP_SIZE];
    floatX* z = logits + (size_t)blockIdx.x * Vp;
    SoftmaxStats stats = {-INFINITY, 0.0f};
    for (int v = threadIdx.x; v < V; v += blockDim.x) { stats = softmax_add(stats, to_float(z[v])); }
    stats = block_reduce_softmax(stats, shared);
    int target = classifier_row_loss(z, stats, losses, targets);
    if (dloss == 0.0f) { return; }
    for (int v = threadIdx.x; v < Vp; v += blockDim.x) { z[v] = from_float<floatX>(classifier_gradient(to_float(z[v]), v, V, target, stats, dloss)); }
}

// ----------------------------------------------------------------------------
// kernel launchers

// losses (N); with dloss != 0, logits (N, Vp) become dlogits in place
static void classifier_forward_backward(floatX* logits, float* losses, const int* targets, float dloss, int N, int V, int Vp, cudaStream_t stream) {
    if (V > Vp) { die("classifier: V=%d exceeds the padded vocabulary Vp=%d", V, Vp); }
    classifier_kernel<<<N, 1024, 0, stream>>>(logits, losses, targets, dloss, V, Vp);
    cudaCheckLaunch();
}
