/*
Layer norm, out = (x - mean) * rstd * w + b with rstd = 1/sqrt(var + 1e-5) (population
variance), fused with the residual add that precedes every layer norm of a block, and its
backward. One warp per row; fp32 statistics. The weight and bias gradients sum over rows: each
block of LN_ROWS_PER_BLOCK rows writes its partial sums into scratch, and column_sums
(reduce.cuh) adds the partials in a fixed order, so the result is the same on every run.
*/
#pragma once

#include "common.cuh"
#include "reduce.cuh"

#define LN_ROWS_PER_BLOCK 32

// ----------------------------------------------------------------------------
// CUDA kernels

// one warp per row; with `a` and `b`, the row is a + b, stored into `residual`
__global__ void layernorm_forward_kernel(floatX* residual, floatX* out, float* mean, float* rstd, const floatX* a, const floatX* b,
                                         const floatX* weight, const floatX* bias, int N, int C) {
    int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= N) { return; }
    const floatX* xa = a + (size_t)row * C;
    const floatX* xb = b ? b + (size_t)row * C : NULL;
    floatX* res = residual ? residual + (size_t)row * C : NULL;
    float sum = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float x = to_float(xa[c]);
        if (xb) {
            // the residual is rounded to floatX, and the statistics use the rounded value
            floatX r = from_float<floatX>(x + to_float(xb[c]));
            res[c] = r;
            x = to_float(r);
        }
        sum += x;
    }
    const floatX* x_row = res ? res : xa;
    float m = warp_reduce_sum(sum) / C;
    float var = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float d = to_float(x_row[c]) - m;
        var += d * d;
    }
    float s = rsqrtf(warp_reduce_sum(var) / C + 1e-5f);
    floatX* o = out + (size_t)row * C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        o[c] = from_float<floatX>((to_float(x_row[c]) - m) * s * to_float(weight[c]) + to_float(bias[c]));
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

// dinp += per row; one warp per row
__global__ void layernorm_backward_dinp_kernel(floatX* dinp, const floatX* dout, const floatX* inp, const floatX* weight,
                                               const float* mean, const float* rstd, int N, int C) {
    int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= N) { return; }
    const floatX* x = inp + (size_t)row * C;
    const floatX* d = dout + (size_t)row * C;
    float m = mean[row], s = rstd[row];
    float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float norm = (to_float(x[c]) - m) * s;
        float dnorm = to_float(weight[c]) * to_float(d[c]);
        dnorm_mean += dnorm;
        dnorm_norm_mean += dnorm * norm;
    }
    dnorm_mean = warp_reduce_sum(dnorm_mean) / C;
    dnorm_norm_mean = warp_reduce_sum(dnorm_norm_mean) / C;
    floatX* di = dinp + (size_t)row * C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float norm = (to_float(x[c]) - m) * s;
        float g = s * (to_float(weight[c]) * to_float(d[c]) - dnorm_mean - norm * dnorm_norm_mean);
        di[c] = from_float<floatX>(to_float(di[c]) + g);
    }
}

// partial sums of dout * norm and dout over LN_ROWS_PER_BLOCK rows: partials (blocks, 2C)
__global__ void layernorm_backward_partials_kernel(float* partials, const floatX* dout, const floatX* inp, const float* mean,
                                                   const float* rstd, int N, int C) {
    int first = blockIdx.x * LN_ROWS_PER_BLOCK, last = min(first + LN_ROWS_PER_BLOCK, N);
    float* p = partials + (size_t)blockIdx.x * 2 * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float dw = 0.0f, db = 0.0f;
        for (int i = first; i < last; i++) {
            float d = to_float(dout[(size_t)i * C + c]);
            dw += d * (to_float(inp[(size_t)i * C + c]) - mean[i]) * rstd[i];
            db += d;
        }
        p[c] = dw;
        p[C + c] = db;
    }
}

// ----------------------------------------------------------------------------
// kernel launchers

static void layernorm_forward(floatX* out, float* mean, float* rstd, const floatX* inp, const floatX* weight, const floatX* bias, int N, int C,
                              cudaStream_t stream) {
    layernorm_forward_kernel<<<ceil_div_int(N, 8), 256, 0, stream>>>(NULL, out, mean, rstd, inp, NULL, weight, bias, N, C);
    cudaCheckLaunch();
}

// residual = a + b, out = layernorm(residual)
static void residual_layernorm_forward(floatX* residual, floatX* out, float* mean, float* rstd, const floatX* a, const floatX* b,
                                       const floatX* weight, const floatX* bias, int N, int C, cudaStream_t stream) {
    layernorm_forward_kernel<<<ceil_div_int(N, 8), 256, 0, stream>>>(residual, out, mean, rstd, a, b, weight, bias, N, C);
    cudaCheckLaunch();
}

static size_t layernorm_backward_scratch_floats(int N, int C) { return (size_t)ceil_div_int(N, LN_ROWS_PER_BLOCK) * 2 * C; }

// dinp (N, C) += ; dweight, dbias (C) fp32 +=
static void layernorm_backward(floatX* dinp, float* dweight, float* dbias, float* scratch, const floatX* dout, const floatX* inp,
                               const floatX* weight, const float* mean, const float* rstd, int N, int C, cudaStream_t stream) {
    layernorm_backward_dinp_kernel<<<ceil_div_int(N, 8), 256, 0, stream>>>(dinp, dout, inp, weight, mean, rstd, N, C);
    cudaCheckLaunch();
    int blocks = ceil_div_int(N, LN_ROWS_PER_BLOCK);
    layernorm_backward_partials_kernel<<<blocks, 256, 0, stream>>>(scratch, dout, inp, mean, rstd, N, C);
    cudaCheckLaunch();
    column_sums(dweight, scratch, 2 * (size_t)C, blocks, C, stream);
    column_sums(dbias, scratch + C, 2 * (size_t)C, blocks, C, stream);
}
