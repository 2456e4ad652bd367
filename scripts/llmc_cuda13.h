/*
Builds llm.c's train_gpt2cu, the baseline of scripts/bench.sh (LLMC=path), with CUDA 13: CUDA 13
changed cudaMemAdvise's last argument from a device number to a cudaMemLocation, and llm.c
(2024) still passes the number. This overload takes the number, as CUDA 12 did, and passes it on
(cudaCpuDeviceId, -1, is the host). nvcc -include puts it before llm.c's own sources; llm.c
itself is not changed. Our code, not llm.c's.
*/
#pragma once
#include <cuda_runtime.h>

#if CUDART_VERSION >= 13000
static inline cudaError_t cudaMemAdvise(const void* ptr, size_t bytes, cudaMemoryAdvise advice, int device) {
    cudaMemLocation where;
    where.type = device == cudaCpuDeviceId ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
    where.id = device == cudaCpuDeviceId ? 0 : device;
    return cudaMemAdvise(ptr, bytes, advice, where);
}
#endif
