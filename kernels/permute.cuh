/*
Permutation between token order and expert order (doc/routing.md sections 3, 4, 6), over the
layout router_forward wrote on the device. The number of rows is known only on the device
(expert_offsets[E]), so the launches cover the worst case (max_rows) and the extra warps return.

  permute_tokens            expert_input[row] = h[row_token[row]]                 warp per row
  unpermute_tokens          y[t] = sum over t's rows, in combine order, of
                            row_weight[row] * expert_output[row]; 0 for no row    warp per token
  unpermute_tokens_backward dexpert_output[row] = row_weight[row] * dy[token]
                            drow_weight[row] = dy[token] . expert_output[row]     warp per row
  permute_tokens_backward   dh[t] = sum over t's rows of dexpert_input[row]       warp per token

Each token reads its own rows and sums them in a fixed order: no atomics, deterministic. All four
move 2 or 3 row-sized vectors per row and do almost no arithmetic: they are bound by memory
bandwidth (speed of light: rows * C * sizeof(floatX) * 2 or 3 bytes at ~3 TB/s on an H100).
*/
#pragma once

#include "common.cuh"
#include "router.cuh"

#define PERMUTE_WARPS 8  // rows or tokens per block

// ----------------------------------------------------------------------------
// CUDA kernels

__global__ void permute_kernel(floatX* expert_input, const floatX* h, const int* row_token, const int* num_rows, int max_rows, int C) {
    int row = blockIdx.x * PERMUTE_WARPS + threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    if (row >= max_rows || row >= *num_rows) { return; }
    const floatX* src = h + (size_t)row_token[row] * C;
    floatX* dst = expert_input + (size_t)row * C;
    for (int c = lane; c < C; c += WARP_SIZE) { dst[c] = src[c]; }
}

__global__ void unpermute_kernel(floatX* y, const floatX* expert_output, const int* token_row_offsets, const int* token_rows,
                                 const float* row_weight, int N, int C) {
    int t = blockIdx.x * PERMUTE_WARPS + threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    if (t >= N) { return; }
    int first = token_row_offsets[t], end = token_row_offsets[t + 1];
    floatX* yt = y + (size_t)t * C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float acc = 0.0f;
        for (int i = first; i < end; i++) {
            int row = token_rows[i];
            acc += row_weight[row] * to_float(expert_output[(size_t)row * C + c]);
        }
        yt[c] = from_float<floatX>(acc);
    }
}

__global__ void unpermute_backward_kernel(floatX* dexpert_output, float* drow_weight, const floatX* dy, const floatX* expert_output,
                                          const int* row_token, const float* row_weight, const int* num_rows, int max_rows, int C) {
    int row = blockIdx.x * PERMUTE_WARPS + threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    if (row >= max_rows || row >= *num_rows) { return; }
    const floatX* d = dy + (size_t)row_token[row] * C;
    const floatX* o = expert_output + (size_t)row * C;
    floatX* dout = dexpert_output + (size_t)row * C;
    float w = row_weight[row], dw = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float dc = to_float(d[c]);
        dout[c] = from_float<floatX>(w * dc);
        dw += dc * to_float(o[c]);
    }
    dw = warp_reduce_sum(dw);
    if (lane == 0) { drow_weight[row] = dw; }
}

__global__ void permute_backward_kernel(floatX* dh, const floatX* dexpert_input, const int* token_row_offsets, const int* token_rows, int N, int C) {
    int t = blockIdx.x * PERMUTE_WARPS + threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    if (t >= N) { return; }
    int first = token_row_offsets[t], end = token_row_offsets[t + 1];
    floatX* d = dh + (size_t)t * C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float acc = 0.0f;
        for (int i = first; i < end; i++) { acc += to_float(dexpert_input[(size_t)token_rows[i] * C + c]); }
        d[c] = from_float<floatX>(acc);
    }
}

// ----------------------------------------------------------------------------
// kernel launchers

// expert_input (max_rows, C): the routed rows of h (n, C), expert-contiguous
static void permute_tokens(floatX* expert_input, const floatX* h, const DeviceRouting* r, int C, cudaStream_t stream) {
    if (r->max_rows == 0) { return; }
    permute_kernel<<<ceil_div_int(r->max_rows, PERMUTE_WARPS), PERMUTE_WARPS * WARP_SIZE, 0, stream>>>(
        expert_input, h, r->row_token, r->expert_offsets + r->E, r->max_rows, C);
    cudaCheckLaunch();
}

// y (n, C) = each token's rows weighted and summed (overwritten)
static void unpermute_tokens(floatX* y, const floatX* expert_output, const DeviceRouting* r, int n, int C, cudaStream_t stream) {
    unpermute_kernel<<<ceil_div_int(n, PERMUTE_WARPS), PERMUTE_WARPS * WARP_SIZE, 0, stream>>>(y, expert_output, r->token_row_offsets,
                                                                                                r->token_rows, r->row_weight, n, C);
    cudaCheckLaunch();
}

// dexpert_output (max_rows, C) and r->drow_weight overwritten on the used rows, from dy (n, C)
static void unpermute_tokens_backward(floatX* dexpert_output, DeviceRouting* r, const floatX* dy, const floatX* expert_output, int C,
                                      cudaStream_t stream) {
    if (r->max_rows == 0) { return; }
    unpermute_backward_kernel<<<ceil_div_int(r->max_rows, PERMUTE_WARPS), PERMUTE_WARPS * WARP_SIZE, 0, stream>>>(
        dexpert_output, r->drow_weight, dy, expert_output, r->row_token, r->row_weight, r->expert_offsets + r->E, r->max_rows, C);
    cudaCheckLaunch();
}

// dh (n, C) = each token's rows of dexpert_input summed (overwritten; the router adds its share after)
static void permute_tokens_backward(floatX* dh, const floatX* dexpert_input, const DeviceRouting* r, int n, int C, cudaStream_t stream) {
    permute_backward_kernel<<<ceil_div_int(n, PERMUTE_WARPS), PERMUTE_WARPS * WARP_SIZE, 0, stream>>>(dh, dexpert_input, r->token_row_offsets,
                                                                                                       r->token_rows, n, C);
    cudaCheckLaunch();
}
