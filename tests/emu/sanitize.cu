/*
The emulation's own check that its sanitized builds (tests/emu/run.sh, g++ -fsanitize=address
and the alignment and overflow checks of -fsanitize=undefined) catch the memory errors
compute-sanitizer's memcheck catches on a GPU, and that the emulator's own checks (launch
limits, __launch_bounds__, shuffles from lanes that returned, copies inside their allocations,
the sampled runs of EMU_SAMPLE=1) report what they should. `sanitize list` prints each case
with the words its report must contain; `sanitize CASE` runs one. A case with no words must
exit 0 without a report; every other case makes one
deliberate error, most of them ones a GPU would not fault on (a read a few bytes past a
cudaMalloc, which rounds sizes up), so that they would otherwise go unnoticed, and must stop with
its report. (Valid CUDA too: on a GPU the errors are undefined or a failed launch.)
*/
#include <cassert>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cuda_runtime.h>

static const int THREADS = 64;

// In-bounds global, static shared, dynamic shared and aligned 16-byte accesses.
__global__ void clean(float* out, const float* in) {
    __shared__ float tile[THREADS];
    extern __shared__ float dynamic[];
    tile[threadIdx.x] = in[threadIdx.x];
    dynamic[threadIdx.x] = 2.0f * in[threadIdx.x];
    __syncthreads();
    int4 four = reinterpret_cast<const int4*>(in)[threadIdx.x / 4];
    out[threadIdx.x] = tile[THREADS - 1 - threadIdx.x] + dynamic[threadIdx.x] + (float)(four.x & 1);
}

// Reads one float past the end of `in` (THREADS floats).
__global__ void global_read_past_end(float* out, const float* in) { out[threadIdx.x] = in[threadIdx.x + 1]; }

// Writes one float past the end of `out` (THREADS floats).
__global__ void global_write_past_end(float* out, const float* in) { out[threadIdx.x + 1] = in[threadIdx.x]; }

// Writes one float past the dynamic shared memory (THREADS floats).
__global__ void dynamic_shared_past_end(float* out, const float* in) {
    extern __shared__ float dynamic[];
    dynamic[threadIdx.x + 1] = in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = dynamic[threadIdx.x];
}

// Reads one float past a static shared array, by index.
__global__ void static_shared_past_end(float* out, const float* in) {
    __shared__ float tile[THREADS];
    tile[threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = tile[threadIdx.x + 1];
}

// The same through a pointer, which the index check cannot see.
__global__ void static_shared_pointer_past_end(float* out, const float* in) {
    __shared__ float tile[THREADS];
    tile[threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    const float* row = tile + threadIdx.x;
    out[threadIdx.x] = row[1];
}

// A 16-byte load from an address 4 bytes past a 16-byte boundary (on a GPU: misaligned address).
__global__ void misaligned_vector_load(float* out, const float* in) {
    if (threadIdx.x != 0) { return; }
    int4 four = *reinterpret_cast<const int4*>(in + 1);
    out[0] = (float)four.x;
}

// Each thread's global index as an int, which overflows past 2^31 - 1 threads (2^21 blocks of
// 1024); only the threads inside `out` write.
__global__ void int_index(float* out, const float* in) {
    int i = (int)blockIdx.x * (int)blockDim.x + (int)threadIdx.x;
    if (i < THREADS) { out[i] = in[i]; }
}
// The same with a 64-bit index, as the engine's kernels compute them.
__global__ void size_t_index(float* out, const float* in) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < THREADS) { out[i] = in[i]; }
}

// A kernel that declares its block size: ptxas may give it as many registers as THREADS threads
// allow, so a GPU refuses a launch of more.
__global__ void __launch_bounds__(THREADS) bounded(float* out, const float* in) { out[threadIdx.x % THREADS] = in[threadIdx.x % THREADS]; }

// Lanes 16..31 return, lanes 0..15 then read them through a shuffle: undefined in CUDA (the
// source lane takes no part); the emulation gives all one bits, NaN, so the result shows it.
__global__ void shuffle_from_returned_lane(float* out, const float* in) {
    if (threadIdx.x % 32 >= 16) { return; }
    float v = __shfl_xor_sync(0xffffffff, in[threadIdx.x] + 1.0f, 16);
    assert(!std::isnan(v) && "a shuffle read a lane that had returned");
    out[threadIdx.x] = v;
}
// The same exchange with every lane there: defined, 1.0f from the zero input.
__global__ void shuffle_from_present_lane(float* out, const float* in) {
    float v = __shfl_xor_sync(0xffffffff, in[threadIdx.x] + 1.0f, 16);
    assert(!std::isnan(v) && "a shuffle read a lane that had returned");
    out[threadIdx.x] = v;
}

struct Case {
    const char* name;
    const char* report;  // words the report must contain; "": no report, exit status 0
    void (*kernel)(float*, const float*);
    unsigned blocks = 1, threads = THREADS;
    size_t shared = THREADS * sizeof(float);
    bool allow_shared = false;  // cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, shared) first
    bool sampled = false;       // EMU_SAMPLE=1: only the last block runs
    size_t copy_back = THREADS; // floats copied from the output (THREADS floats) to the host
};
static const unsigned OVERFLOW_BLOCKS = (1u << 21) + 1;  // the last block's first thread is number 2^31
static const Case CASES[] = {
    {"clean", "", clean},
    {"global_read_past_end", "heap-buffer-overflow", global_read_past_end},
    {"global_write_past_end", "heap-buffer-overflow", global_write_past_end},
    {"dynamic_shared_past_end", "heap-buffer-overflow", dynamic_shared_past_end},
    {"static_shared_past_end", "out of bounds", static_shared_past_end},
    {"static_shared_pointer_past_end", "global-buffer-overflow", static_shared_pointer_past_end},
    {"misaligned_vector_load", "misaligned address", misaligned_vector_load},
    {"read_after_free", "heap-use-after-free", global_read_past_end},  // with `in` freed first
    {"copy_past_allocation", "past its end", clean, 1, THREADS, THREADS * sizeof(float), false, false, THREADS + 1},
    {"shared_over_48k_with_attribute", "", clean, 1, THREADS, 64 * 1024, true},
    {"shared_over_48k_without_attribute", "without cudaFuncSetAttribute", clean, 1, THREADS, 64 * 1024},
    {"shuffle_from_present_lane", "", shuffle_from_present_lane},
    {"shuffle_from_returned_lane", "a shuffle read a lane that had returned", shuffle_from_returned_lane},
    {"launch_within_bounds", "", bounded},
    {"launch_past_bounds", "more than its __launch_bounds__ (64)", bounded, 1, 2 * THREADS},
    {"sampled_size_t_index", "", size_t_index, OVERFLOW_BLOCKS, 1024, 0, false, true},
    {"sampled_int_index_overflow", "signed integer overflow", int_index, OVERFLOW_BLOCKS, 1024, 0, false, true},
};

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: sanitize list | sanitize CASE\n");
        return 2;
    }
    if (strcmp(argv[1], "list") == 0) {
        for (const Case& c : CASES) { printf("%s:%s\n", c.name, c.report); }
        return 0;
    }
    for (const Case& c : CASES) {
        if (strcmp(argv[1], c.name) != 0) { continue; }
        if (c.sampled) { setenv("EMU_SAMPLE", "1", 1); }  // before the first launch and cudaMalloc read it
        float *d_out, *d_in;
        cudaMalloc(&d_out, THREADS * sizeof(float));
        cudaMalloc(&d_in, THREADS * sizeof(float));
        cudaMemset(d_in, 0, THREADS * sizeof(float));
        cudaMemset(d_out, 0, THREADS * sizeof(float));
        if (strcmp(c.name, "read_after_free") == 0) { cudaFree(d_in); }
        void (*kernel)(float*, const float*) = c.kernel;
        if (c.allow_shared) { cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)c.shared); }
        kernel<<<c.blocks, c.threads, c.shared>>>(d_out, d_in);
        cudaDeviceSynchronize();
        float host[THREADS + 1];
        cudaMemcpy(host, d_out, c.copy_back * sizeof(float), cudaMemcpyDeviceToHost);
        printf("%s: ran, out[0] = %g\n", c.name, host[0]);
        return 0;
    }
    fprintf(stderr, "sanitize: no case %s\n", argv[1]);
    return 2;
}
