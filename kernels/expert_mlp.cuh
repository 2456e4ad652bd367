/*
The experts: each expert's contiguous slice of routed rows through fc (H x C) + bias, GELU,
fcproj (C x H) + bias, and the backward, as grouped GEMMs over the experts. The row counts live
only on the device (expert_offsets, E+1 prefix sums written by the routing of the same step), so
the host launches for the worst case and each block reads which expert and rows it owns.

Two grouped GEMMs do all the work:
  rows_gemm     Y (rows_e x N) = X (rows_e x K) . W_e  where W_e is (N x K) [transposed] or (K x N)
                the rows vary per expert; epilogue: bias, and GELU keeping the pre-activation
  weights_gemm  dW_e (M x N) += dY_e^T (M x rows_e) . X_e (rows_e x N)
                the depth (the expert's rows) varies; each output element is summed by one thread
                in a fixed order, so the weight gradients are deterministic.
Each comes in three versions, studied in dev/cuda/expert_mlp.cu:
  simt  version 1: CUDA cores, 64 x 64 output tiles, 256 threads each computing 4 x 4 in fp32
        from operands staged in shared memory; any shape, fp32 or bf16 (the FP32 build);
  mma   version 2: tensor cores (kernels/mma.cuh), 128 x 128 output tiles, 8 warps of 64 x 32,
        32-deep stages double-buffered by cp.async, fragments by ldmatrix (.trans where k runs
        down a tile's columns: W_e (K x N) and both operands of weights_gemm); the epilogue
        writes a thread's two adjacent output columns with one store (bf16x2, or float2 for the
        weight gradients); bf16 builds, C and H multiples of 8, 16-byte aligned tensors.
  wgmma version 3: Hopper's warpgroup MMA (kernels/wgmma.cuh), 128 x 128 output tiles of two
        warpgroups, 64-deep stages in a ring of 4 filled by cp.async, operands read by the tensor
        cores from shared memory as they lie in global memory (K-major or MN-major); the
        epilogues are version 2's. Where version 2 applies, in a build with an sm_90a target
        (the Makefile's for sm_90), on an sm_90 GPU (H100, H200). Not yet run on a GPU.
expert_mlp_forward and expert_mlp_backward take the version asked for (train_moe's
--expert-gemm), else version 2 wherever it applies: version 3 becomes the default only once a
GPU has checked and timed it.
*/
#pragma once

#include <initializer_list>
#include "common.cuh"
#include "mma.cuh"
#include "reduce.cuh"
// version 3 needs an sm_90a target: the Makefile defines ENABLE_WGMMA for a build that has one
#if defined(ENABLE_WGMMA) && !defined(ENABLE_FP32)
#define EXPERT_WGMMA_BUILT 1
#include "wgmma.cuh"
#endif

#define XG_TILE 64   // version 1: output tile, rows and columns
#define XG_DEPTH 16  // version 1: depth of one shared-memory stage
#define XM_TILE 128  // version 2: output tile, rows and columns
#define XM_DEPTH 32  // version 2: depth of one cp.async stage

// ----------------------------------------------------------------------------
// CUDA kernels

// --- version 1: CUDA cores ---

// The tile of rows that block `tile` owns: its expert, first row and end row. Tiles of
// `tile_rows` are laid out expert by expert, ceil(rows_e / tile_rows) for expert e. False when
// the block has no work.
__device__ bool find_row_tile(const int* expert_offsets, int E, int tile_rows, int tile, int* expert, int* first, int* end) {
    int before = 0;
    for (int e = 0; e < E; e++) {
        int rows = expert_offsets[e + 1] - expert_offsets[e];
        int tiles = (rows + tile_rows - 1) / tile_rows;
        if (tile < before + tiles) {
            *expert = e;
            *first = expert_offsets[e] + (tile - before) * tile_rows;
            *end = expert_offsets[e + 1];
            return true;
        }
        before += tiles;
    }
    return false;
}

// out[r][n] = sum_k X[r][k] W_e(k, n) (+ bias_e[n]) for the rows r of one expert.
// W_e(k, n) = W[e][n][k] when W_TRANSPOSED (W is (E, N, K)), else W[e][k][n] (W is (E, K, N)).
// With gelu_out: out keeps the pre-activation and gelu_out = gelu(out).
template <bool W_TRANSPOSED>
__global__ void rows_gemm_kernel(floatX* out, floatX* gelu_out, const floatX* X, const floatX* W, const floatX* bias, const int* expert_offsets,
                                 int E, int N, int K) {
    __shared__ float xs[XG_DEPTH][XG_TILE];      // xs[k][r]
    __shared__ float ws[XG_DEPTH][XG_TILE + 4];  // ws[k][n]
    int e, first, end;
    if (!find_row_tile(expert_offsets, E, XG_TILE, blockIdx.x, &e, &first, &end)) { return; }
    int n0 = blockIdx.y * XG_TILE;
    const floatX* We = W + (size_t)e * N * K;
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // this thread's 4 x 4: rows ty*4.., columns tx*4..
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += XG_DEPTH) {
        for (int i = threadIdx.x; i < XG_TILE * XG_DEPTH; i += blockDim.x) {
            int r = i / XG_DEPTH, k = i % XG_DEPTH;  // consecutive threads read consecutive k of a row
            int row = first + r, kk = k0 + k;
            xs[k][r] = (row < end && kk < K) ? to_float(X[(size_t)row * K + kk]) : 0.0f;
        }
        for (int i = threadIdx.x; i < XG_TILE * XG_DEPTH; i += blockDim.x) {
            int n, k;
            if (W_TRANSPOSED) { n = i / XG_DEPTH; k = i % XG_DEPTH; } else { k = i / XG_TILE; n = i % XG_TILE; }
            int nn = n0 + n, kk = k0 + k;
            float w = 0.0f;
            if (nn < N && kk < K) { w = to_float(W_TRANSPOSED ? We[(size_t)nn * K + kk] : We[(size_t)kk * N + nn]); }
            ws[k][n] = w;
        }
        __syncthreads();
        for (int k = 0; k < XG_DEPTH; k++) {
            float a[4], b[4];
            for (int i = 0; i < 4; i++) { a[i] = xs[k][ty * 4 + i]; b[i] = ws[k][tx * 4 + i]; }
            for (int i = 0; i < 4; i++) {
                for (int j = 0; j < 4; j++) { acc[i][j] += a[i] * b[j]; }
            }
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; i++) {
        int row = first + ty * 4 + i;
        if (row >= end) { continue; }
        for (int j = 0; j < 4; j++) {
            int n = n0 + tx * 4 + j;
            if (n >= N) { continue; }
            float v = acc[i][j] + (bias ? to_float(bias[(size_t)e * N + n]) : 0.0f);
            floatX stored = from_float<floatX>(v);
            out[(size_t)row * N + n] = stored;
            if (gelu_out) { gelu_out[(size_t)row * N + n] = from_float<floatX>(gelu_tanh(to_float(stored))); }
        }
    }
}

// dW[e][m][n] += sum over the rows r of expert e of A[r][m] B[r][n]; A (rows, M), B (rows, N)
__global__ void weights_gemm_kernel(float* dW, const floatX* A, const floatX* B, const int* expert_offsets, int M, int N) {
    __shared__ float as[XG_DEPTH][XG_TILE];      // as[r][m]
    __shared__ float bs[XG_DEPTH][XG_TILE + 4];  // bs[r][n]
    int e = blockIdx.z, m0 = blockIdx.y * XG_TILE, n0 = blockIdx.x * XG_TILE;
    int first = expert_offsets[e], end = expert_offsets[e + 1];
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4] = {};
    for (int r0 = first; r0 < end; r0 += XG_DEPTH) {
        for (int i = threadIdx.x; i < XG_TILE * XG_DEPTH; i += blockDim.x) {
            int r = i / XG_TILE, c = i % XG_TILE;  // consecutive threads read consecutive columns of a row
            int row = r0 + r;
            as[r][c] = (row < end && m0 + c < M) ? to_float(A[(size_t)row * M + m0 + c]) : 0.0f;
            bs[r][c] = (row < end && n0 + c < N) ? to_float(B[(size_t)row * N + n0 + c]) : 0.0f;
        }
        __syncthreads();
        for (int r = 0; r < XG_DEPTH; r++) {
            float a[4], b[4];
            for (int i = 0; i < 4; i++) { a[i] = as[r][ty * 4 + i]; b[i] = bs[r][tx * 4 + i]; }
            for (int i = 0; i < 4; i++) {
                for (int j = 0; j < 4; j++) { acc[i][j] += a[i] * b[j]; }
            }
        }
        __syncthreads();
    }
    float* dWe = dW + (size_t)e * M * N;
    for (int i = 0; i < 4; i++) {
        int m = m0 + ty * 4 + i;
        if (m >= M) { continue; }
        for (int j = 0; j < 4; j++) {
            int n = n0 + tx * 4 + j;
            if (n < N) { dWe[(size_t)m * N + n] += acc[i][j]; }
        }
    }
}

// --- version 2: tensor cores (bf16 builds) ---
// A block computes a 128 x 128 output tile D = A . B over a depth range [k_begin, k_end). Warp w
// owns rows 64 (w / 4) .. +63 and columns 32 (w % 4) .. +31: 4 x 4 mma tiles of 16 x 8, whose
// fp32 accumulators (64 per thread) stay in registers for the whole depth. An operand tile (A:
// 128 rows m, B: 128 columns n) is stored in one of two ways, the way it lies in global memory:
//   k along the rows (K_ALONG): (128, 32 + 8) bf16, row i holds k0..k0+31 of row/column i;
//   k down the columns:         (32, 128 + 8) bf16, row k holds i0..i0+127.
#if !defined(ENABLE_FP32)

#define XM_WARPS 8
#define XM_TILE_ELEMS (XM_TILE * (XM_DEPTH + 8))                  // 5120 >= XM_DEPTH * (XM_TILE + 8) = 4352
#define XM_SMEM_BYTES (2 * 2 * XM_TILE_ELEMS * sizeof(floatX))    // two stages of A and B: 40 KiB

// issue the copies of one operand's stage: element (i, k) for i in i0..i0+127, k in k0..k0+31,
// found at src[i * ld + k] (K_ALONG) or src[k * ld + i]; outside i < i_end, k < k_end it is zero.
// A copy moves 8 bf16 along the contiguous dimension, whose extent must be a multiple of 8.
template <bool K_ALONG>
__device__ __forceinline__ void xm_load_stage(floatX* tile, const floatX* src, int ld, int i0, int i_end, int k0, int k_end) {
    if (K_ALONG) {
        constexpr int CHUNKS = XM_DEPTH / 8;
        for (int idx = threadIdx.x; idx < XM_TILE * CHUNKS; idx += blockDim.x) {
            int i = idx / CHUNKS, k = (idx % CHUNKS) * 8;
            bool inside = i0 + i < i_end && k0 + k < k_end;
            cp_async_16(tile + i * (XM_DEPTH + 8) + k, inside ? src + (size_t)(i0 + i) * ld + k0 + k : src, inside);
        }
    } else {
        constexpr int CHUNKS = XM_TILE / 8;
        for (int idx = threadIdx.x; idx < XM_DEPTH * CHUNKS; idx += blockDim.x) {
            int k = idx / CHUNKS, i = (idx % CHUNKS) * 8;
            bool inside = i0 + i < i_end && k0 + k < k_end;
            cp_async_16(tile + k * (XM_TILE + 8) + i, inside ? src + (size_t)(k0 + k) * ld + i0 + i : src, inside);
        }
    }
}

// The epilogues' stores of two adjacent output columns (at, at + 1), shared with version 3
// (wgmma): a row output rounded to bf16 as stored, with GELU of the stored values (one 4-byte
// store each), or a weight gradient's fp32 pair (one 8-byte read-modify-write)
__device__ __forceinline__ void xm_store_pair(floatX* out, floatX* gelu_out, size_t at, float v0, float v1) {
    float s0 = to_float(from_float<floatX>(v0)), s1 = to_float(from_float<floatX>(v1));  // as stored
    *reinterpret_cast<uint32_t*>(out + at) = pack_bf16x2(s0, s1);
    if (gelu_out) { *reinterpret_cast<uint32_t*>(gelu_out + at) = pack_bf16x2(gelu_tanh(s0), gelu_tanh(s1)); }
}

__device__ __forceinline__ void xm_add_pair(float* dW, size_t at, float a0, float a1) {
    float2* p = reinterpret_cast<float2*>(dW + at);
    float2 w = *p;
    w.x += a0;
    w.y += a1;
    *p = w;
}

// acc += A_s . B_s over one stage: two k-steps of 16, each 4 A fragments, 4 B fragments, 16 mma
template <bool A_K_ALONG, bool B_K_ALONG>
__device__ __forceinline__ void xm_mma_stage(float acc[4][4][4], const floatX* a_s, const floatX* b_s, int warp_m, int warp_n) {
    #pragma unroll
    for (int ks = 0; ks < XM_DEPTH / 16; ks++) {
        uint32_t a[4][4], b[4][2];
        #pragma unroll
        for (int mi = 0; mi < 4; mi++) {
            int m0 = warp_m * 64 + mi * 16;
            if (A_K_ALONG) { ldmatrix_a(a[mi], a_s, XM_DEPTH + 8, m0, ks * 16); } else { ldmatrix_a_trans(a[mi], a_s, XM_TILE + 8, m0, ks * 16); }
        }
        #pragma unroll
        for (int nj = 0; nj < 2; nj++) {
            int n0 = warp_n * 32 + nj * 16;
            if (B_K_ALONG) {
                ldmatrix_b_pair(b[2 * nj], b[2 * nj + 1], b_s, XM_DEPTH + 8, n0, ks * 16);
            } else {
                ldmatrix_b_pair_trans(b[2 * nj], b[2 * nj + 1], b_s, XM_TILE + 8, n0, ks * 16);
            }
        }
        #pragma unroll
        for (int mi = 0; mi < 4; mi++) {
            #pragma unroll
            for (int ni = 0; ni < 4; ni++) { mma_bf16_m16n8k16(acc[mi][ni], a[mi], b[ni]); }
        }
    }
}

// acc = A (rows m0.., m < m_end) . B (columns n0.., n < n_end) over k in [k_begin, k_end); smem holds
// XM_SMEM_BYTES. The next stage is copied while the tensor cores work on the current one.
template <bool A_K_ALONG, bool B_K_ALONG>
__device__ __forceinline__ void xm_block_product(float acc[4][4][4], floatX* smem, const floatX* A, int lda, int m0, int m_end,
                                                 const floatX* B, int ldb, int n0, int n_end, int k_begin, int k_end) {
    int warp = threadIdx.x / WARP_SIZE, warp_m = warp / 4, warp_n = warp % 4;
    #pragma unroll
    for (int mi = 0; mi < 4; mi++) {
        #pragma unroll
        for (int ni = 0; ni < 4; ni++) {
            #pragma unroll
            for (int i = 0; i < 4; i++) { acc[mi][ni][i] = 0.0f; }
        }
    }
    int stages = (k_end - k_begin + XM_DEPTH - 1) / XM_DEPTH;
    if (stages <= 0) { return; }
    // stage buffer b holds A at smem + 2b * XM_TILE_ELEMS and B right after it
    xm_load_stage<A_K_ALONG>(smem, A, lda, m0, m_end, k_begin, k_end);
    xm_load_stage<B_K_ALONG>(smem + XM_TILE_ELEMS, B, ldb, n0, n_end, k_begin, k_end);
    cp_async_commit();
    for (int s = 0; s < stages; s++) {
        if (s + 1 < stages) {
            int k0 = k_begin + (s + 1) * XM_DEPTH;
            floatX* next = smem + ((s + 1) & 1) * 2 * XM_TILE_ELEMS;
            xm_load_stage<A_K_ALONG>(next, A, lda, m0, m_end, k0, k_end);
            xm_load_stage<B_K_ALONG>(next + XM_TILE_ELEMS, B, ldb, n0, n_end, k0, k_end);
            cp_async_commit();
            cp_async_wait<1>();  // stage s has landed, s + 1 may still be in flight
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const floatX* current = smem + (s & 1) * 2 * XM_TILE_ELEMS;
        xm_mma_stage<A_K_ALONG, B_K_ALONG>(acc, current, current + XM_TILE_ELEMS, warp_m, warp_n);
        __syncthreads();  // before the next iteration's copies overwrite this buffer
    }
}

// rows_gemm on tensor cores: out = X W_e (+ bias, GELU) for a 128-row tile of one expert.
// grid (expert_row_tiles(max_rows, E, XM_TILE), ceil(N / 128)), 256 threads, XM_SMEM_BYTES.
template <bool W_TRANSPOSED>
__global__ void __launch_bounds__(XM_WARPS * WARP_SIZE)
    rows_gemm_mma_kernel(floatX* out, floatX* gelu_out, const floatX* X, const floatX* W, const floatX* bias, const int* expert_offsets,
                         int E, int N, int K) {
    extern __shared__ __align__(16) unsigned char xm_smem[];
    int e, first, end;
    if (!find_row_tile(expert_offsets, E, XM_TILE, blockIdx.x, &e, &first, &end)) { return; }
    int n0 = blockIdx.y * XM_TILE;
    const floatX* We = W + (size_t)e * N * K;
    float acc[4][4][4];
    // A = X rows first.., k along the rows; B = W_e: (N, K) holds k along the rows of n, (K, N) down the columns
    xm_block_product<true, W_TRANSPOSED>(acc, reinterpret_cast<floatX*>(xm_smem), X, K, first, end, We, W_TRANSPOSED ? K : N, n0, N, 0, K);
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, g = lane / 4, c = lane % 4;
    // the thread's columns: two adjacent ones n, n + 1 (n even, N a multiple of 8) in each of four
    // 8-column groups, the same for all its rows; their bias read once
    float bias_n[4][2] = {};
    #pragma unroll
    for (int ni = 0; ni < 4; ni++) {
        int n = n0 + (warp % 4) * 32 + ni * 8 + 2 * c;
        if (bias && n < N) {
            bias_n[ni][0] = to_float(bias[(size_t)e * N + n]);
            bias_n[ni][1] = to_float(bias[(size_t)e * N + n + 1]);
        }
    }
    #pragma unroll
    for (int mi = 0; mi < 4; mi++) {
        #pragma unroll
        for (int half = 0; half < 2; half++) {
            int row = first + (warp / 4) * 64 + mi * 16 + g + half * 8;
            if (row >= end) { continue; }
            #pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                int n = n0 + (warp % 4) * 32 + ni * 8 + 2 * c;
                if (n >= N) { continue; }
                xm_store_pair(out, gelu_out, (size_t)row * N + n, acc[mi][ni][half * 2] + bias_n[ni][0],
                              acc[mi][ni][half * 2 + 1] + bias_n[ni][1]);
            }
        }
    }
}

// weights_gemm on tensor cores: dW_e (m0.., n0..) += A_e^T B_e over the expert's rows.
// grid (ceil(N / 128), ceil(M / 128), E), 256 threads, XM_SMEM_BYTES.
__global__ void __launch_bounds__(XM_WARPS * WARP_SIZE)
    weights_gemm_mma_kernel(float* dW, const floatX* A, const floatX* B, const int* expert_offsets, int M, int N) {
    extern __shared__ __align__(16) unsigned char xm_smem[];
    int e = blockIdx.z, m0 = blockIdx.y * XM_TILE, n0 = blockIdx.x * XM_TILE;
    int first = expert_offsets[e], end = expert_offsets[e + 1];
    if (first == end) { return; }
    float acc[4][4][4];
    // the depth is the expert's rows: both A (rows, M) and B (rows, N) hold k down the columns
    xm_block_product<false, false>(acc, reinterpret_cast<floatX*>(xm_smem), A, M, m0, M, B, N, n0, N, first, end);
    float* dWe = dW + (size_t)e * M * N;
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, g = lane / 4, c = lane % 4;
    #pragma unroll
    for (int mi = 0; mi < 4; mi++) {
        #pragma unroll
        for (int half = 0; half < 2; half++) {
            int m = m0 + (warp / 4) * 64 + mi * 16 + g + half * 8;
            if (m >= M) { continue; }
            #pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                int n = n0 + (warp % 4) * 32 + ni * 8 + 2 * c;  // columns n, n + 1 (n even, N a multiple of 8)
                if (n >= N) { continue; }
                xm_add_pair(dWe, (size_t)m * N + n, acc[mi][ni][half * 2], acc[mi][ni][half * 2 + 1]);
            }
        }
    }
}

#endif  // !ENABLE_FP32

// --- version 3: Hopper's wgmma (kernels/wgmma.cuh; bf16 builds with an sm_90a target) ---
// A block owns a 128 x 128 output tile; its two warpgroups own 64 rows each, one wgmma
// m64n128k16 per 16 of depth, 64 fp32 accumulators per thread. Operands come by cp.async in
// stages 64 deep, 4 stages in a ring (128 KiB): the copies run two stages ahead, and one stage's
// wgmmas may still run while the next are issued (wgmma_wait<1>), so a stage is refilled only two
// iterations after it was read. An operand is staged the way it lies in global memory, K-major
// (k along its rows: X, and W_e (N, K) in the forward) or MN-major (k down its columns: W_e
// (K, N) in the backward's dX, both operands of the weight gradients), which wgmma reads with
// its transpose bit, so nothing is transposed in memory. The epilogues are version 2's.
// Speed of light as version 2's (the tensor peak); what wgmma adds over mma.sync: no ldmatrix
// (the tensor cores read shared memory themselves) and 64 x 128 x 16 per instruction.
#if defined(EXPERT_WGMMA_BUILT)

#define XW_TILE 128                                     // output tile: rows and columns
#define XW_DEPTH 64                                     // depth of one stage
#define XW_STAGES 4
#define XW_OPERAND_ELEMS (XW_TILE * XW_DEPTH)           // one operand's stage, bf16
#define XW_SMEM_BYTES (XW_STAGES * 2 * XW_OPERAND_ELEMS * sizeof(floatX))  // 128 KiB
#define XW_LBO 128                                      // bytes between core matrices along k
#define XW_SBO (XW_DEPTH / 8 * 128)                     // bytes between core matrices along i (m or n): 1024

// where element (i, k) of an operand stage lies (elements): core matrix (i / 8, k / 8) at the
// 128-byte slot (i / 8) * (XW_DEPTH / 8) + k / 8; inside it row i % 8 (K-major) or k % 8
// (MN-major) of 16 bytes
template <bool K_MAJOR>
__device__ __forceinline__ int xw_offset(int i, int k) {
    int slot = (i / 8) * (XW_DEPTH / 8) + k / 8;
    return slot * 64 + (K_MAJOR ? (i % 8) * 8 + k % 8 : (k % 8) * 8 + i % 8);
}

// issue the copies of one operand's stage: i in i0..i0+127 (those < i_end), k in k0..k0+63 (< k_end),
// element (i, k) at src[i * ld + k] (K_MAJOR) or src[k * ld + i]; zero outside. The 8 chunks of
// 16 bytes a quarter-warp copies fill one core matrix, 128 contiguous bytes (no bank conflict),
// and a warp reads 64 contiguous bytes of each of 8 rows in global memory.
template <bool K_MAJOR>
__device__ __forceinline__ void xw_load_stage(floatX* stage, const floatX* src, int ld, int i0, int i_end, int k0, int k_end) {
    for (int idx = threadIdx.x; idx < XW_TILE * XW_DEPTH / 8; idx += blockDim.x) {
        int i, k;  // the chunk's first element: 8 along k (K_MAJOR) or along i
        if (K_MAJOR) { i = idx % 8 + 8 * (idx / 64); k = (idx / 8) % 8 * 8; } else { k = idx % 8 + 8 * (idx / 128); i = (idx / 8) % 16 * 8; }
        bool inside = i0 + i < i_end && k0 + k < k_end;
        const floatX* from = K_MAJOR ? src + (size_t)(i0 + i) * ld + k0 + k : src + (size_t)(k0 + k) * ld + i0 + i;
        cp_async_16(stage + xw_offset<K_MAJOR>(i, k), inside ? from : src, inside);
    }
}

// acc (this warpgroup's 64 x 128 of the block's 128 x 128) = A (m0.., m < m_end) . B (n0.., n < n_end)
// over k in [k_begin, k_end); smem holds XW_SMEM_BYTES
template <bool A_K_MAJOR, bool B_K_MAJOR>
__device__ __forceinline__ void xw_block_product(float acc[64], floatX* smem, const floatX* A, int lda, int m0, int m_end,
                                                 const floatX* B, int ldb, int n0, int n_end, int k_begin, int k_end) {
    int warpgroup = threadIdx.x / 128;
    #pragma unroll
    for (int i = 0; i < 64; i++) { acc[i] = 0.0f; }
    int tiles = (k_end - k_begin + XW_DEPTH - 1) / XW_DEPTH;
    if (tiles <= 0) { return; }
    auto load = [&](int t) {  // tile t into its stage of the ring: A, then B
        floatX* stage = smem + (t % XW_STAGES) * 2 * XW_OPERAND_ELEMS;
        xw_load_stage<A_K_MAJOR>(stage, A, lda, m0, m_end, k_begin + t * XW_DEPTH, k_end);
        xw_load_stage<B_K_MAJOR>(stage + XW_OPERAND_ELEMS, B, ldb, n0, n_end, k_begin + t * XW_DEPTH, k_end);
    };
    for (int t = 0; t < XW_STAGES - 2; t++) {
        if (t < tiles) { load(t); }
        cp_async_commit();  // a group even when empty: the wait below counts groups
    }
    for (int t = 0; t < tiles; t++) {
        cp_async_wait<XW_STAGES - 3>();  // tile t has landed (t + 1 may be in flight)
        fence_proxy_async();
        __syncthreads();  // every thread's copies of tile t; every wgmma of tile t - 2 done (waited below)
        if (t + XW_STAGES - 2 < tiles) { load(t + XW_STAGES - 2); }  // into tile t - 2's stage, free now
        cp_async_commit();
        const floatX* a_s = smem + (t % XW_STAGES) * 2 * XW_OPERAND_ELEMS + xw_offset<A_K_MAJOR>(64 * warpgroup, 0);  // its 64 rows
        const floatX* b_s = smem + (t % XW_STAGES) * 2 * XW_OPERAND_ELEMS + XW_OPERAND_ELEMS;
        wgmma_fence_accumulators(acc);
        wgmma_fence();
        #pragma unroll
        for (int ks = 0; ks < XW_DEPTH / 16; ks++) {  // k = 16 ks: two core matrices further along k
            wgmma_m64n128k16<A_K_MAJOR ? 0 : 1, B_K_MAJOR ? 0 : 1>(acc, wgmma_descriptor(a_s + xw_offset<A_K_MAJOR>(0, 16 * ks), XW_LBO, XW_SBO),
                                                                  wgmma_descriptor(b_s + xw_offset<B_K_MAJOR>(0, 16 * ks), XW_LBO, XW_SBO), 1);
        }
        wgmma_commit();
        wgmma_fence_accumulators(acc);
        wgmma_wait<1>();  // tile t - 1's wgmmas done: its stage may be refilled at t + 1
        wgmma_fence_accumulators(acc);
    }
    wgmma_wait<0>();
    wgmma_fence_accumulators(acc);
}

// rows_gemm on wgmma: out = X W_e (+ bias, GELU keeping the pre-activation) for a 128-row tile of
// one expert; W (E, N, K) when W_TRANSPOSED (B K-major), else (E, K, N) (B MN-major).
// grid (expert_row_tiles(max_rows, E, 128), ceil(N / 128)), 256 threads, XW_SMEM_BYTES.
template <bool W_TRANSPOSED>
__global__ void __launch_bounds__(256)
    rows_gemm_wgmma_kernel(floatX* out, floatX* gelu_out, const floatX* X, const floatX* W, const floatX* bias, const int* expert_offsets,
                           int E, int N, int K) {
    extern __shared__ __align__(128) unsigned char xw_smem[];
    int e, first, end;
    if (!find_row_tile(expert_offsets, E, XW_TILE, blockIdx.x, &e, &first, &end)) { return; }
    int n0 = blockIdx.y * XW_TILE;
    const floatX* We = W + (size_t)e * N * K;
    float acc[64];
    xw_block_product<true, W_TRANSPOSED>(acc, reinterpret_cast<floatX*>(xw_smem), X, K, first, end, We, W_TRANSPOSED ? K : N, n0, N, 0, K);
    // the accumulator layout of wgmma.cuh: warp w of the warpgroup, rows 16w + g (+ 8), columns 8j + 2c (+ 1)
    int lane = threadIdx.x % WARP_SIZE, w = threadIdx.x % 128 / WARP_SIZE, g = lane / 4, c = lane % 4;
    #pragma unroll
    for (int j = 0; j < XW_TILE / 8; j++) {
        int n = n0 + 8 * j + 2 * c;
        if (n >= N) { continue; }
        float b0 = bias ? to_float(bias[(size_t)e * N + n]) : 0.0f, b1 = bias ? to_float(bias[(size_t)e * N + n + 1]) : 0.0f;
        #pragma unroll
        for (int half = 0; half < 2; half++) {
            int row = first + 64 * (threadIdx.x / 128) + 16 * w + g + 8 * half;
            if (row >= end) { continue; }
            xm_store_pair(out, gelu_out, (size_t)row * N + n, acc[4 * j + 2 * half] + b0, acc[4 * j + 2 * half + 1] + b1);
        }
    }
}

// weights_gemm on wgmma: dW_e (m0.., n0..) += A_e^T B_e over the expert's rows, both operands
// MN-major (the rows are the depth). grid (ceil(N / 128), ceil(M / 128), E), 256 threads, XW_SMEM_BYTES.
__global__ void __launch_bounds__(256)
    weights_gemm_wgmma_kernel(float* dW, const floatX* A, const floatX* B, const int* expert_offsets, int M, int N) {
    extern __shared__ __align__(128) unsigned char xw_smem[];
    int e = blockIdx.z, m0 = blockIdx.y * XW_TILE, n0 = blockIdx.x * XW_TILE;
    int first = expert_offsets[e], end = expert_offsets[e + 1];
    if (first == end) { return; }
    float acc[64];
    xw_block_product<false, false>(acc, reinterpret_cast<floatX*>(xw_smem), A, M, m0, M, B, N, n0, N, first, end);
    float* dWe = dW + (size_t)e * M * N;
    int lane = threadIdx.x % WARP_SIZE, w = threadIdx.x % 128 / WARP_SIZE, g = lane / 4, c = lane % 4;
    #pragma unroll
    for (int j = 0; j < XW_TILE / 8; j++) {
        int n = n0 + 8 * j + 2 * c;  // columns n, n + 1 (N a multiple of 8)
        if (n >= N) { continue; }
        #pragma unroll
        for (int half = 0; half < 2; half++) {
            int m = m0 + 64 * (threadIdx.x / 128) + 16 * w + g + 8 * half;
            if (m >= M) { continue; }
            xm_add_pair(dWe, (size_t)m * N + n, acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
        }
    }
}
#endif  // EXPERT_WGMMA_BUILT

// --- both versions ---

// dbias[e][n] += sum over expert e's rows of dY[r][n]: a block takes COLUMN_SUM_COLUMNS columns of
// one expert (blockIdx.y) with COLUMN_SUM_LANES threads per column, in a fixed order
// (column_sums_block, reduce.cuh), so the result does not depend on timing. One thread per column
// would leave a thread ~2000 rows to walk alone at GPT-2's shapes, on 24 blocks for C = 768.
// Speed of light: one read of dY, 16384 rows x 3072 bf16 = 100 MB for dfcb (30 us at 3.35 TB/s),
// 25 MB for dfcprojb (8 us). Not yet measured on a GPU.
__global__ void expert_bias_grad_kernel(float* dbias, const floatX* dY, const int* expert_offsets, int N) {
    int e = blockIdx.y;
    column_sums_block(dbias + (size_t)e * N, dY, (size_t)N, expert_offsets[e], expert_offsets[e + 1], N);
}

// fch_gelu = gelu(fch) over the used rows (the backward's recomputation, --recompute 1): the same
// bits as the forward's fused GELU, which also reads fch as stored
__global__ void expert_gelu_forward_kernel(floatX* fch_gelu, const floatX* fch, const int* expert_offsets, int E, int H) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)expert_offsets[E] * H) { return; }
    fch_gelu[i] = from_float<floatX>(gelu_tanh(to_float(fch[i])));
}

// d fch = gelu'(fch) * d fch_gelu over the used rows
__global__ void expert_gelu_backward_kernel(floatX* dfch, const floatX* fch, const floatX* dfch_gelu, const int* expert_offsets, int E, int H) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)expert_offsets[E] * H) { return; }
    dfch[i] = from_float<floatX>(gelu_tanh_grad(to_float(fch[i])) * to_float(dfch_gelu[i]));
}

// ----------------------------------------------------------------------------
// kernel launchers

// the row tiles a grid launches for at most max_rows rows over E experts: each expert's last tile may be partial
static int expert_row_tiles(int max_rows, int E, int tile_rows) { return ceil_div_int(max_rows, tile_rows) + E; }

static bool aligned16(const void* p) { return (uintptr_t)p % 16 == 0; }

// whether version 2 (tensor cores) takes these shapes and tensors: bf16, C and H multiples of 8
// (16-byte copies), 16-byte aligned tensors (the bf16 operands, and the fp32 weight gradients for their 8-byte updates)
static bool expert_mma_applies(int C, int H, std::initializer_list<const void*> tensors) {
#if defined(ENABLE_FP32)
    (void)C; (void)H; (void)tensors;
    return false;
#else
    if (C % 8 != 0 || H % 8 != 0) { return false; }
    for (const void* p : tensors) {
        if (!aligned16(p)) { return false; }
    }
    return true;
#endif
}

// out (rows, N) = X (rows, K) . W_e (+ bias_e, with gelu_out = GELU(out)) for every expert's rows;
// W is (E, N, K) when w_transposed, else (E, K, N). Version 2 exists in bf16 builds only
// (expert_mlp_pick_version never asks for it in FP32).
static void rows_gemm(int version, floatX* out, floatX* gelu_out, const floatX* X, const floatX* W, bool w_transposed, const floatX* bias,
                      const int* expert_offsets, int max_rows, int E, int N, int K, cudaStream_t stream) {
#if defined(EXPERT_WGMMA_BUILT)
    if (version == 3) {
        dim3 grid(expert_row_tiles(max_rows, E, XW_TILE), ceil_div_int(N, XW_TILE));
        if (w_transposed) {
            allow_dynamic_smem(rows_gemm_wgmma_kernel<true>, XW_SMEM_BYTES, "expert_mlp version 3 (wgmma)");
            rows_gemm_wgmma_kernel<true><<<grid, 256, XW_SMEM_BYTES, stream>>>(out, gelu_out, X, W, bias, expert_offsets, E, N, K);
        } else {
            allow_dynamic_smem(rows_gemm_wgmma_kernel<false>, XW_SMEM_BYTES, "expert_mlp version 3 (wgmma)");
            rows_gemm_wgmma_kernel<false><<<grid, 256, XW_SMEM_BYTES, stream>>>(out, gelu_out, X, W, bias, expert_offsets, E, N, K);
        }
        cudaCheckLaunch();
        return;
    }
#endif
    if (version == 2) {
#if !defined(ENABLE_FP32)
        dim3 grid(expert_row_tiles(max_rows, E, XM_TILE), ceil_div_int(N, XM_TILE));
        if (w_transposed) {
            rows_gemm_mma_kernel<true><<<grid, XM_WARPS * WARP_SIZE, XM_SMEM_BYTES, stream>>>(out, gelu_out, X, W, bias, expert_offsets, E, N, K);
        } else {
            rows_gemm_mma_kernel<false><<<grid, XM_WARPS * WARP_SIZE, XM_SMEM_BYTES, stream>>>(out, gelu_out, X, W, bias, expert_offsets, E, N, K);
        }
        cudaCheckLaunch();
        return;
#endif
    }
    dim3 grid(expert_row_tiles(max_rows, E, XG_TILE), ceil_div_int(N, XG_TILE));
    if (w_transposed) {
        rows_gemm_kernel<true><<<grid, 256, 0, stream>>>(out, gelu_out, X, W, bias, expert_offsets, E, N, K);
    } else {
        rows_gemm_kernel<false><<<grid, 256, 0, stream>>>(out, gelu_out, X, W, bias, expert_offsets, E, N, K);
    }
    cudaCheckLaunch();
}

// dW (E, M, N) += A_e^T (M, rows_e) . B_e (rows_e, N) for every expert
static void weights_gemm(int version, float* dW, const floatX* A, const floatX* B, const int* expert_offsets, int E, int M, int N,
                         cudaStream_t stream) {
#if defined(EXPERT_WGMMA_BUILT)
    if (version == 3) {
        allow_dynamic_smem(weights_gemm_wgmma_kernel, XW_SMEM_BYTES, "expert_mlp version 3 (wgmma)");
        dim3 grid(ceil_div_int(N, XW_TILE), ceil_div_int(M, XW_TILE), E);
        weights_gemm_wgmma_kernel<<<grid, 256, XW_SMEM_BYTES, stream>>>(dW, A, B, expert_offsets, M, N);
        cudaCheckLaunch();
        return;
    }
#endif
    if (version == 2) {
#if !defined(ENABLE_FP32)
        dim3 grid(ceil_div_int(N, XM_TILE), ceil_div_int(M, XM_TILE), E);
        weights_gemm_mma_kernel<<<grid, XM_WARPS * WARP_SIZE, XM_SMEM_BYTES, stream>>>(dW, A, B, expert_offsets, M, N);
        cudaCheckLaunch();
        return;
#endif
    }
    weights_gemm_kernel<<<dim3(ceil_div_int(N, XG_TILE), ceil_div_int(M, XG_TILE), E), 256, 0, stream>>>(dW, A, B, expert_offsets, M, N);
    cudaCheckLaunch();
}

// whether version 3 (wgmma) can run: this binary has its sm_90a code and the GPU is sm_90
static bool expert_wgmma_here() {
#if defined(EXPERT_WGMMA_BUILT)
    static int here = -1;  // asked once
    if (here < 0) {
        int device = 0;
        cudaDeviceProp prop;
        cudaCheck(cudaGetDevice(&device));
        cudaCheck(cudaGetDeviceProperties(&prop, device));
        here = prop.major == 9 && prop.minor == 0;
    }
    return here == 1;
#else
    return false;
#endif
}

// version 0 means the default: version 2 wherever it applies, else 1. Asking for a version where
// it does not apply is an error.
static int expert_mlp_pick_version(int version, int C, int H, std::initializer_list<const void*> tensors) {
    bool mma = expert_mma_applies(C, H, tensors);
    if (version == 0) { return mma ? 2 : 1; }
    if (version < 1 || version > 3) { die("expert_mlp: no version %d (1, 2 or 3)", version); }
    if (version >= 2 && !mma) {
#if defined(ENABLE_FP32)
        die("expert_mlp: version %d (tensor cores) needs a BF16 build; this one is FP32 (make train_moe PRECISION=BF16)", version);
#else
        if (C % 8 != 0 || H % 8 != 0) { die("expert_mlp: version %d (tensor cores) needs C and H multiples of 8, not C=%d H=%d", version, C, H); }
        die("expert_mlp: version %d (tensor cores) needs 16-byte aligned tensors", version);
#endif
    }
    if (version == 3 && !expert_wgmma_here()) {
        die("expert_mlp: version 3 (wgmma) needs an sm_90 GPU (H100, H200) and a build for it (make train_moe GPU_ARCH=90)");
    }
    return version;
}

// inp (max_rows, C) in expert order; out (max_rows, C); fch, fch_gelu (max_rows, H) kept for the
// backward. fcw (E,H,C), fcb (E,H), fcprojw (E,C,H), fcprojb (E,C).
static void expert_mlp_forward(floatX* out, floatX* fch, floatX* fch_gelu, const floatX* inp, const int* expert_offsets, int max_rows,
                               const floatX* fcw, const floatX* fcb, const floatX* fcprojw, const floatX* fcprojb, int E, int C, int H,
                               cudaStream_t stream, int version = 0) {
    if (max_rows == 0) { return; }
    version = expert_mlp_pick_version(version, C, H, {out, fch, fch_gelu, inp, fcw, fcprojw});
    rows_gemm(version, fch, fch_gelu, inp, fcw, true, fcb, expert_offsets, max_rows, E, H, C, stream);
    rows_gemm(version, out, NULL, fch_gelu, fcprojw, true, fcprojb, expert_offsets, max_rows, E, C, H, stream);
}

// fch_gelu (max_rows, H) = gelu(fch) on the used rows again, for a backward whose forward kept no fch_gelu
static void expert_gelu_recompute(floatX* fch_gelu, const floatX* fch, const int* expert_offsets, int max_rows, int E, int H, cudaStream_t stream) {
    if (max_rows == 0) { return; }
    expert_gelu_forward_kernel<<<ceil_div_int((long long)max_rows * H, 256), 256, 0, stream>>>(fch_gelu, fch, expert_offsets, E, H);
    cudaCheckLaunch();
}

// dinp (max_rows, C) overwritten on the used rows; the weight gradients (fp32) +=; dfch, dfch_gelu
// scratch (max_rows, H). fch_gelu may be the buffer dfch: it is read before dfch is written.
static void expert_mlp_backward(floatX* dinp, float* dfcw, float* dfcb, float* dfcprojw, float* dfcprojb, floatX* dfch, floatX* dfch_gelu,
                                const floatX* dout, const floatX* inp, const floatX* fch, const floatX* fch_gelu, const int* expert_offsets,
                                int max_rows, const floatX* fcw, const floatX* fcprojw, int E, int C, int H, cudaStream_t stream,
                                int version = 0) {
    if (max_rows == 0) { return; }
    version = expert_mlp_pick_version(version, C, H, {dinp, dfcw, dfcprojw, dfch, dfch_gelu, dout, inp, fch, fch_gelu, fcw, fcprojw});
    // fcproj: d fch_gelu = dout . fcprojw_e (C x H, so W_e(k=c, n=h) = fcprojw[e][c][h]); dW = dout^T fch_gelu; db = sums of dout
    rows_gemm(version, dfch_gelu, NULL, dout, fcprojw, false, NULL, expert_offsets, max_rows, E, H, C, stream);
    weights_gemm(version, dfcprojw, dout, fch_gelu, expert_offsets, E, C, H, stream);
    expert_bias_grad_kernel<<<dim3(ceil_div_int(C, COLUMN_SUM_COLUMNS), E), dim3(COLUMN_SUM_COLUMNS, COLUMN_SUM_LANES), 0, stream>>>(
        dfcprojb, dout, expert_offsets, C);
    cudaCheckLaunch();
    expert_gelu_backward_kernel<<<ceil_div_int((long long)max_rows * H, 256), 256, 0, stream>>>(dfch, fch, dfch_gelu, expert_offsets, E, H);
    cudaCheckLaunch();
    // fc: dinp = dfch . fcw_e (H x C, W_e(k=h, n=c) = fcw[e][h][c]); dW = dfch^T inp; db = sums of dfch
    rows_gemm(version, dinp, NULL, dfch, fcw, false, NULL, expert_offsets, max_rows, E, C, H, stream);
    weights_gemm(version, dfcw, dfch, inp, expert_offsets, E, H, C, stream);
    expert_bias_grad_kernel<<<dim3(ceil_div_int(H, COLUMN_SUM_COLUMNS), E), dim3(COLUMN_SUM_COLUMNS, COLUMN_SUM_LANES), 0, stream>>>(
        dfcb, dfch, expert_offsets, H);
    cudaCheckLaunch();
}
