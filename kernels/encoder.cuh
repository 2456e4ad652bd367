/*
The encoder: out[b,t] = wte[token[b,t]] + wpe[t], and its backward. The backward must sum the
rows of all positions that share a token into one row of dwte without float atomics: the host,
which has the tokens before the upload, sorts the positions by token (stably, so each bucket
lists its positions in order) and cuts each bucket into chunks of at most ENCODER_CHUNK
positions. A block per chunk and 256 channels adds the chunk's rows in position order; a bucket
of one chunk (almost all of them) adds its sum into dwte at once, a longer one writes a partial
sum per chunk, and a second kernel adds those in chunk order. dwpe[t] sums over the batch in
order b = 0, 1, ...

Why chunks: the buckets are very unequal. In English text the newline, the comma and " the" are
each 3 to 8% of the tokens (Tiny Shakespeare at B=64, T=1024: 4,900 of 65,536 positions are the
newline). With a block per bucket (the kernel until 2026-12, version 1 of dev/cuda/encoder.cu)
one block walks that bucket alone: 4,900 loads one after another for each of its channels, a
latency-bound chain of milliseconds while the rest of the GPU has long finished. In chunks of 64
no thread waits on more than 64 loads, and those go out 8 at a time. The sums come out in
another order than a plain walk over the bucket (chunk sums, then their sum), the same on every
run.
*/
#pragma once

#include <algorithm>
#include <vector>
#include "common.cuh"

#define ENCODER_CHUNK 64      // positions per chunk: the longest chain of loads a thread waits on
#define ENCODER_THREADS 256   // channels per block
#define ENCODER_IN_FLIGHT 8   // a thread's loads issued before their adds

// The backward's index arrays for up to N positions, in one int buffer (the host fills it, the
// device reads the same layout):
//   positions (N)            the positions sorted stably by token
//   chunk_start (N+1)        chunk i is positions[chunk_start[i] .. chunk_start[i+1])
//   chunk_token (N)          its token
//   chunk_slot (N)           -1: the chunk is its whole bucket, its sum goes into dwte; else the
//                            row of the partial sums it writes
//   split_token (S)          the buckets of more than ENCODER_CHUNK positions, S of them at most
//   split_slot_start (S+1)   split bucket j's partial rows are split_slot_start[j] .. [j+1]
struct EncoderChunks {
    int* positions;
    int* chunk_start;
    int* chunk_token;
    int* chunk_slot;
    int* split_token;
    int* split_slot_start;
    int num_chunks, num_split;
};

// A split bucket has more than ENCODER_CHUNK positions: at most N / (ENCODER_CHUNK + 1) of them.
static int encoder_max_split(int N) { return N / (ENCODER_CHUNK + 1); }

static size_t encoder_chunk_ints(int N) { return 4 * (size_t)N + 1 + 2 * (size_t)encoder_max_split(N) + 1; }

// the arrays inside an encoder_chunk_ints(N) buffer
static EncoderChunks encoder_chunks_at(int* base, int N) {
    EncoderChunks c;
    c.positions = base;
    c.chunk_start = base + N;
    c.chunk_token = base + 2 * (size_t)N + 1;
    c.chunk_slot = base + 3 * (size_t)N + 1;
    c.split_token = base + 4 * (size_t)N + 1;
    c.split_slot_start = c.split_token + encoder_max_split(N);
    c.num_chunks = c.num_split = 0;
    return c;
}

// Partial rows: a split bucket of n positions has ceil(n / ENCODER_CHUNK) < n / ENCODER_CHUNK + 1
// chunks, so all of them together fewer than N / ENCODER_CHUNK + (split buckets).
static size_t encoder_backward_scratch_floats(int N, int C) {
    return ((size_t)N / ENCODER_CHUNK + encoder_max_split(N) + 1) * (size_t)C;
}

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

// grid (chunks, channel blocks): a thread adds one channel of the chunk's rows, in position order
__global__ void __launch_bounds__(ENCODER_THREADS)
encoder_backward_chunks_kernel(float* dwte, float* partials, const floatX* dout, const int* positions, const int* chunk_start,
                               const int* chunk_token, const int* chunk_slot, int C) {
    __shared__ int rows[ENCODER_CHUNK];
    int chunk = blockIdx.x, first = chunk_start[chunk], count = chunk_start[chunk + 1] - first;
    for (int i = threadIdx.x; i < count; i += blockDim.x) { rows[i] = positions[first + i]; }
    __syncthreads();
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) { return; }
    float sum = 0.0f;
    int i = 0;
    for (; i + ENCODER_IN_FLIGHT <= count; i += ENCODER_IN_FLIGHT) {  // the loads first, then their adds in order
        float x[ENCODER_IN_FLIGHT];
        for (int j = 0; j < ENCODER_IN_FLIGHT; j++) { x[j] = to_float(dout[(size_t)rows[i + j] * C + c]); }
        for (int j = 0; j < ENCODER_IN_FLIGHT; j++) { sum += x[j]; }
    }
    for (; i < count; i++) { sum += to_float(dout[(size_t)rows[i] * C + c]); }
    int slot = chunk_slot[chunk];
    if (slot < 0) {
        dwte[(size_t)chunk_token[chunk] * C + c] += sum;
    } else {
        partials[(size_t)slot * C + c] = sum;
    }
}

// grid (split buckets, channel blocks): a bucket's chunk sums, in chunk order, into its row of dwte
__global__ void encoder_backward_split_kernel(float* dwte, const float* partials, const int* split_token, const int* split_slot_start, int C) {
    int b = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) { return; }
    float sum = 0.0f;
    for (int s = split_slot_start[b]; s < split_slot_start[b + 1]; s++) { sum += partials[(size_t)s * C + c]; }
    dwte[(size_t)split_token[b] * C + c] += sum;
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

// Host side, per batch: fills ch's arrays (an encoder_chunk_ints buffer for at least N positions)
// for the N tokens and sets its counts: the positions sorted stably by token, each token's bucket
// cut into chunks of ENCODER_CHUNK from its start (the last chunk shorter).
static void encoder_prepare_chunks(const int* tokens, int N, EncoderChunks* ch) {
    int* positions = ch->positions;
    for (int i = 0; i < N; i++) { positions[i] = i; }
    std::stable_sort(positions, positions + N, [&](int a, int b) { return tokens[a] < tokens[b]; });
    int chunks = 0, split = 0, slots = 0;
    for (int first = 0; first < N;) {
        int token = tokens[positions[first]], last = first;
        while (last < N && tokens[positions[last]] == token) { last++; }
        bool is_split = last - first > ENCODER_CHUNK;
        if (is_split) {
            ch->split_token[split] = token;
            ch->split_slot_start[split] = slots;
            split++;
        }
        for (int start = first; start < last; start += ENCODER_CHUNK) {
            ch->chunk_start[chunks] = start;
            ch->chunk_token[chunks] = token;
            ch->chunk_slot[chunks] = is_split ? slots++ : -1;
            chunks++;
        }
        first = last;
    }
    ch->chunk_start[chunks] = N;
    ch->split_slot_start[split] = slots;
    ch->num_chunks = chunks;
    ch->num_split = split;
}

// dwte (Vp, C) and dwpe (maxT, C), fp32, += the gradient of dout (B, T, C); ch: device arrays with
// the counts of the host's encoder_prepare_chunks; scratch: encoder_backward_scratch_floats(B T, C)
static void encoder_backward(float* dwte, float* dwpe, float* scratch, const floatX* dout, const EncoderChunks& ch, int B, int T, int C,
                             cudaStream_t stream) {
    unsigned channel_blocks = (unsigned)ceil_div_int(C, ENCODER_THREADS);
    if (ch.num_chunks > 0) {
        encoder_backward_chunks_kernel<<<dim3(ch.num_chunks, channel_blocks), ENCODER_THREADS, 0, stream>>>(
            dwte, scratch, dout, ch.positions, ch.chunk_start, ch.chunk_token, ch.chunk_slot, C);
        cudaCheckLaunch();
    }
    if (ch.num_split > 0) {
        encoder_backward_split_kernel<<<dim3(ch.num_split, channel_blocks), ENCODER_THREADS, 0, stream>>>(dwte, scratch, ch.split_token,
                                                                                                           ch.split_slot_start, C);
        cudaCheckLaunch();
    }
    encoder_backward_wpe_kernel<<<ceil_div_int((long long)T * C, 256), 256, 0, stream>>>(dwpe, dout, B, T, C);
    cudaCheckLaunch();
}
