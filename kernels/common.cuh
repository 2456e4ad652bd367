/*
What every kernel header shares: the activation type floatX, checked CUDA and cuBLAS calls, the
list of a program's device buffers (sized before any is allocated), type conversions and
deterministic warp and block reductions.

Precision (make PRECISION=BF16, the default, or PRECISION=FP32):
  - activations and the working copy of the weights are floatX: bf16, or fp32 with -DENABLE_FP32;
  - master weights, gradients and AdamW moments are fp32 always;
  - the router (its weights, logits, softmax, top-k, auxiliary losses) is fp32 always.
Every reduction sums in a fixed order (no float atomics), so two runs are bit-identical on the
same GPU model with the same cuBLAS (cuBLASLt's heuristic picks its algorithm per GPU and version).
*/
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublasLt.h>
#include <cublas_v2.h>
#include <utility>
#include <vector>
#include "../common/utils.h"

#if defined(ENABLE_FP32)
typedef float floatX;
#define PRECISION_NAME "FP32"
#else
typedef __nv_bfloat16 floatX;
#define PRECISION_NAME "BF16"
#endif

#define WARP_SIZE 32

// ----------------------------------------------------------------------------
// checked calls

static inline void cuda_check_(cudaError_t err, const char* file, int line) {
    if (err != cudaSuccess) { die("CUDA error at %s:%d: %s", file, line, cudaGetErrorString(err)); }
}
#define cudaCheck(err) cuda_check_((err), __FILE__, __LINE__)

static inline void cublas_check_(cublasStatus_t status, const char* file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS) { die("cuBLAS error %d (%s) at %s:%d", (int)status, cublasGetStatusString(status), file, line); }
}
#define cublasCheck(status) cublas_check_((status), __FILE__, __LINE__)

// after a launch: the launch's own error (bad configuration), not the kernel's completion
#define cudaCheckLaunch() cudaCheck(cudaGetLastError())

// ----------------------------------------------------------------------------
// dynamic shared memory past the default 48 KiB

// A kernel may use more than 48 KiB of dynamic shared memory per block only after the program
// raises its limit (cudaFuncSetAttribute), and only up to what the GPU has per block: 227 KiB on
// Hopper (sm_90), 163 KiB on A100 (sm_80), 99 KiB on the sm_86 and sm_89 cards (RTX 30 and 40
// series, A10, L4, L40). Before a launch that needs `bytes`, this raises the kernel's limit (once
// per kernel and size), or stops with one line that says which kernel needs what, when the GPU
// cannot give it. `what` names the kernel and the size that sets its need.
static void allow_dynamic_smem(const void* kernel, size_t bytes, const char* what) {
    if (bytes <= 48 * 1024) { return; }
    static int device_limit = 0;  // the GPU's most per block, asked once
    if (device_limit == 0) {
        int device = 0;
        cudaCheck(cudaGetDevice(&device));
        cudaCheck(cudaDeviceGetAttribute(&device_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    }
    if (bytes > (size_t)device_limit) {
        die("%s needs %zu bytes of shared memory per block; this GPU gives at most %d", what, bytes, device_limit);
    }
    static std::vector<std::pair<const void*, size_t>> raised;  // each kernel's limit so far
    for (std::pair<const void*, size_t>& r : raised) {
        if (r.first == kernel) {
            if (r.second < bytes) {
                cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
                r.second = bytes;
            }
            return;
        }
    }
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    raised.push_back({kernel, bytes});
}

template <typename Kernel>
static void allow_dynamic_smem(Kernel* kernel, size_t bytes, const char* what) {
    allow_dynamic_smem((const void*)kernel, bytes, what);
}

// count elements of device memory; running out says how much was asked and how much is free
template <typename T>
static inline T* cuda_malloc(size_t count) {
    T* p = NULL;
    if (count == 0) { return p; }
    cudaError_t err = cudaMalloc(&p, count * sizeof(T));
    if (err == cudaErrorMemoryAllocation) {
        size_t free_bytes = 0, total_bytes = 0;
        cudaMemGetInfo(&free_bytes, &total_bytes);
        die("out of GPU memory: %.1f MiB asked, %.1f of %.1f MiB free; a smaller batch (-b) or sequence (-t) needs less",
            count * sizeof(T) / 1048576.0, free_bytes / 1048576.0, total_bytes / 1048576.0);
    }
    cudaCheck(err);
    return p;
}

// ----------------------------------------------------------------------------
// a program's device buffers, sized before any is allocated

// The list of (where a buffer's pointer goes, its bytes). A program adds every buffer, then
// allocates them all: the total is known before the first cudaMalloc, so a run too large for the
// GPU stops at once with the whole figure, not at whichever buffer happens to be the one that no
// longer fits; and one loop frees them all. Each buffer is still its own cudaMalloc of its exact
// size (the emulation's memcheck sees a kernel that runs past one).
struct DeviceBuffers {
    struct Buffer {
        void** slot;
        size_t bytes;
    };
    std::vector<Buffer> list;
    size_t bytes = 0;   // in all
};

template <typename T>
static inline void buffers_add(DeviceBuffers* d, T** slot, size_t count) {
    *slot = NULL;
    d->list.push_back({(void**)slot, count * sizeof(T)});
    d->bytes += count * sizeof(T);
}

// Allocates every buffer of the list (a caller that wants one clear line when they cannot all fit
// compares d->bytes with cudaMemGetInfo's free bytes first, as train_moe's model_init does).
static inline void buffers_allocate(DeviceBuffers* d) {
    for (const DeviceBuffers::Buffer& b : d->list) { *b.slot = cuda_malloc<char>(b.bytes); }
}

static inline void buffers_free(DeviceBuffers* d) {
    for (const DeviceBuffers::Buffer& b : d->list) {
        cudaCheck(cudaFree(*b.slot));
        *b.slot = NULL;
    }
    d->list.clear();
    d->bytes = 0;
}

static inline int ceil_div_int(long long a, long long b) { return (int)((a + b - 1) / b); }

// ----------------------------------------------------------------------------
// conversions between floatX and fp32

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// ----------------------------------------------------------------------------
// reductions in a fixed order

template <typename T> __device__ __forceinline__ T warp_reduce_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) { v += __shfl_xor_sync(0xffffffff, v, offset); }
    return v;
}

__device__ __forceinline__ float warp_reduce_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) { v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset)); }
    return v;
}

// Sum over the block, returned to every thread. `shared` holds at least 32 values of v's type. The
// order of the additions depends only on blockDim, so the result is the same on every run.
template <typename T> __device__ __forceinline__ T block_reduce_sum(T v, T* shared) {
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
    v = warp_reduce_sum(v);
    __syncthreads();
    if (lane == 0) { shared[warp] = v; }
    __syncthreads();
    v = lane < warps ? shared[lane] : T(0);
    return warp_reduce_sum(v);
}

__device__ __forceinline__ float block_reduce_max(float v, float* shared) {
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
    v = warp_reduce_max(v);
    __syncthreads();
    if (lane == 0) { shared[warp] = v; }
    __syncthreads();
    v = lane < warps ? shared[lane] : -INFINITY;
    return warp_reduce_max(v);
}

// ----------------------------------------------------------------------------
// GELU, tanh approximation (the same formula as the CPU twin)

#define GELU_SCALE_F 0.7978845608028654f  // sqrt(2/pi)

__device__ __forceinline__ float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(GELU_SCALE_F * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float gelu_tanh_grad(float x) {
    float th = tanhf(GELU_SCALE_F * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * GELU_SCALE_F * (1.0f + 3.0f * 0.044715f * x * x);
}
