/*
The encoder: out[b,t] = wte[token[b,t]] + wpe[t], and its backward. The backward must sum the
rows of all positions that share a token into one row of dwte without float atomics: the host,
which has the tokens before the upload, sorts the positions by token (stably, so each bucket
lists its positions in order) and the kernel gives each bucket one block that adds its rows in
that order. dwpe[t] sums over the batch in order b = 0, 1, ...
*/
#pragma once

#include <algorithm>
#include <vector>
#include "common.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

// one block per token (b, t), threads over channels
__global__ void encoder_forward_kernel(floatX* out, const int* tokens, const floatX* wte, const floatX* wpe, int T, int C) {
    int bt = blockIdx.x, t = bt % T;
    const floatX* e = wte + (size_t)tokens[bt] * C;
    const floatX* p = wpe + (size_t)t * C;
    floatX* o = out + (size_t)bt * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) { o[c] = from_float<floatX>(to_float(e[c]) + to_float(p[c])); }
}

// one block per bucket of positions sharing a token
__global__ void encoder_backward_wte_kernel(float* dwte, const floatX* dout, const int* positions, const int* starts,
                                            const int* bucket_tokens, int C) {
    int b = blockIdx.x;
    int first = starts[b], last = starts[b + 1];
    float* row = dwte + (size_t)bucket_tokens[b] * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float sum = 0.0f;
        for (int i = first; i < last; i++) { sum += to_float(dout[(size_t)positions[i] * C + c]); }
        row[c] += sum;
    }
}

// one thread per (t, c)
__global__ void encoder_backward_wpe_kernel(float* dwpe, const floatX* dout, int B, int T, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)T * C) { return; }
    float sum = 0.0f;
    for (int b = 0; b < B; b++) { sum += to_float(dout[(size_t)b * T * C + i]); }
    dwpe[i] += sum;
}

// ----------------------------------------------------------------------------
// kernel launchers

static void encoder_forward(floatX* out, const int* tokens, const floatX* wte, const floatX* wpe, int B, int T, int C, cudaStream_t stream) {
    encoder_forward_kernel<<<B * T, 256, 0, stream>>>(out, tokens, wte, wpe, T, C);
    cudaCheckLaunch();
}

// Host side, per batch: positions (N) sorted stably by token, bucket starts (N+1) and the token of
// each bucket (N). Returns the number of buckets.
static int encoder_prepare_buckets(const int* tokens, int N, int* positions, int* starts, int* bucket_tokens) {
    for (int i = 0; i < N; i++) { positions[i] = i; }
    std::stable_sort(positions, positions + N, [&](int a, int b) { return tokens[a] < tokens[b]; });
    int buckets = 0;
    for (int i = 0; i < N; i++) {
        if (i == 0 || tokens[positions[i]] != tokens[positions[i - 1]]) {
            starts[buckets] = i;
            bucket_tokens[buckets] = tokens[positions[i]];
            buckets++;
        }
    }
    starts[buckets] = N;
    return buckets;
}

// dwte (Vp, C) and dwpe (maxT, C), fp32, += the gradient of dout (B, T, C)
static void encoder_backward(float* dwte, float* dwpe, const floatX* dout, const int* positions, const int* starts, const int* bucket_tokens,
                             int num_buckets, int B, int T, int C, cudaStream_t stream) {
    if (num_buckets > 0) {
        encoder_backward_wte_kernel<<<num_buckets, 256, 0, stream>>>(dwte, dout, positions, starts, bucket_tokens, C);
        cudaCheckLaunch();
    }
    encoder_backward_wpe_kernel<<<ceil_div_int((long long)T * C, 256), 256, 0, stream>>>(dwpe, dout, B, T, C);
    cudaCheckLaunch();
}
