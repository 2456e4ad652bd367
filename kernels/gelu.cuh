/*
GELU with the tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise,
and its backward (the formulas are gelu_tanh and gelu_tanh_grad in common.cuh, the same as the
CPU twin's).
*/
#pragma once

#include "common.cuh"

// ----------------------------------------------------------------------------
// CUDA kernels

__global__ void gelu_forward_kernel(floatX* out, const floatX* inp, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i] = from_float<floatX>(gelu_tanh(to_float(inp[i]))); }
}

__global__ void gelu_backward_kernel(floatX* dinp, const floatX* inp, const floatX* dout, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { dinp[i] = from_float<floatX>(gelu_tanh_grad(to_float(inp[i])) * to_float(dout[i])); }
}

// ----------------------------------------------------------------------------
// kernel launchers

static void gelu_forward(floatX* out, const floatX* inp, size_t n, cudaStream_t stream) {
    if (n == 0) { return; }
    gelu_forward_kernel<<<ceil_div_int((long long)n, 256), 256, 0, stream>>>(out, inp, n);
    cudaCheckLaunch();
}

// dinp = gelu'(inp) * dout, overwritten (it may be the same buffer as dout)
static void gelu_backward(floatX* dinp, const floatX* inp, const floatX* dout, size_t n, cudaStream_t stream) {
    if (n == 0) { return; }
    gelu_backward_kernel<<<ceil_div_int((long long)n, 256), 256, 0, stream>>>(dinp, inp, dout, n);
    cudaCheckLaunch();
}
