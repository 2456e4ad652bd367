/*
AdamW on one parameter tensor, exactly as torch.optim.AdamW and the CPU twin: global-norm
clipping (scale clip / (norm + 1e-6) when that is below 1), decoupled weight decay first
(p *= 1 - lr wd), then m, v and p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps). The fp32
master weights are updated and, in the BF16 build, rounded into the working copy the other
kernels read. The clipping scale is computed on the device from the squared norm, so the host
never waits for it.
*/
#pragma once

#include "common.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

__global__ void adamw_kernel(float* params, floatX* working, const float* grads, float* m, float* v, size_t n, float lr, float beta1,
                             float beta2, float eps, float weight_decay, float step_size, float bias2_sqrt, float grad_clip,
                             const float* grad_norm_squared) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) { return; }
    float grad_scale = 1.0f;
    if (grad_clip > 0.0f) {
        float coef = grad_clip / (sqrtf(*grad_norm_squared) + 1e-6f);
        if (coef < 1.0f) { grad_scale = coef; }
    }
    float g = grads[i] * grad_scale;
    float mm = beta1 * m[i] + (1.0f - beta1) * g;
    float vv = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mm;
    v[i] = vv;
    float p = params[i] * (1.0f - lr * weight_decay);
    p -= step_size * mm / (sqrtf(vv) / bias2_sqrt + eps);
    params[i] = p;
    if (working) { working[i] = from_float<floatX>(p); }
}

__global__ void copy_to_working_kernel(floatX* dst, const float* src, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { dst[i] = from_float<floatX>(src[i]); }
}

// ----------------------------------------------------------------------------
// kernel launchers

// step t is 1-based; params_working is NULL when the kernels read the master weights (FP32)
static void adamw_update(float* params, floatX* params_working, const float* grads, float* m, float* v, size_t n, float lr, float beta1,
                         float beta2, float eps, float weight_decay, int t, float grad_clip, const float* grad_norm_squared, cudaStream_t stream) {
    if (n == 0) { return; }
    double bias1 = 1.0 - pow((double)beta1, t), bias2 = 1.0 - pow((double)beta2, t);
    adamw_kernel<<<ceil_div_int((long long)n, 512), 512, 0, stream>>>(params, params_working, grads, m, v, n, lr, beta1, beta2, eps,
                                                                      weight_decay, (float)(lr / bias1), (float)sqrt(bias2), grad_clip,
                                                                      grad_norm_squared);
    cudaCheckLaunch();
}

// the working copy from the master weights (start-up)
static void copy_to_working(floatX* dst, const float* src, size_t n, cudaStream_t stream) {
    if (n == 0) { return; }
    copy_to_working_kernel<<<ceil_div_int((long long)n, 512), 512, 0, stream>>>(dst, src, n);
    cudaCheckLaunch();
}
