/*
The experts: each expert's contiguous slice of routed rows through fc (H x C) + bias, GELU,
fcproj (C x H) + bias, and the backward, as grouped GEMMs over the experts. The row counts live
only on the device (expert_offsets, E+1 prefix sums written by the routing of the same step), so
the host launches for the worst case and each block reads which expert and rows it owns.

Two grouped GEMM kernels, 64 x 64 output tiles, 256 threads each computing 4 x 4 in fp32 from
floatX operands staged in shared memory (version 1: CUDA cores; a tensor-core version is the
next step, see dev/cuda):
  rows_gemm     Y (rows_e x N) = X (rows_e x K) . W_e  where W_e is (N x K) [transposed] or (K x N)
                the rows vary per expert; epilogue: bias, and GELU keeping the pre-activation
  weights_gemm  dW_e (M x N) += dY_e^T (M x rows_e) . X_e (rows_e x N)
                the depth (the expert's rows) varies; each output element is summed by one thread
                in row order, so the weight gradients are deterministic.
*/
#pragma once

#include "common.cuh"

#define XG_TILE 64   // output tile, rows and columns
#define XG_DEPTH 16  // depth of one shared-memory stage

// ----------------------------------------------------------------------------
// CUDA kernels

// The tile of rows that block `tile` owns: its expert, first row and end row. Tiles are laid
// out expert by expert, ceil(rows_e / XG_TILE) for expert e. False when the block has no work.
__device__ bool find_row_tile(const int* expert_offsets, int E, int tile, int* expert, int* first, int* end) {
    int before = 0;
    for (int e = 0; e < E; e++) {
        int rows = expert_offsets[e + 1] - expert_offsets[e];
        int tiles = (rows + XG_TILE - 1) / XG_TILE;
        if (tile < before + tiles) {
            *expert = e;
            *first = expert_offsets[e] + (tile - before) * XG_TILE;
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
    if (!find_row_tile(expert_offsets, E, blockIdx.x, &e, &first, &end)) { return; }
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

// dbias[e][n] += sum over expert e's rows of dY[r][n], in row order
__global__ void expert_bias_grad_kernel(float* dbias, const floatX* dY, const int* expert_offsets, int N) {
    int e = blockIdx.y, n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) { return; }
    float s = 0.0f;
    for (int r = expert_offsets[e]; r < expert_offsets[e + 1]; r++) { s += to_float(dY[(size_t)r * N + n]); }
    dbias[(size_t)e * N + n] += s;
}

// d fch = gelu'(fch) * d fch_gelu over the used rows
__global__ void expert_gelu_backward_kernel(floatX* dfch, const floatX* fch, const floatX* dfch_gelu, const int* expert_offsets, int E, int H) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)expert_offsets[E] * H) { return; }
    dfch[i] = from_float<floatX>(gelu_tanh_grad(to_float(fch[i])) * to_float(dfch_gelu[i]));
}

// ----------------------------------------------------------------------------
// kernel launchers

static int expert_row_tiles(int max_rows, int E) { return ceil_div_int(max_rows, XG_TILE) + E; }

// inp (max_rows, C) in expert order; out (max_rows, C); fch, fch_gelu (max_rows, H) kept for the
// backward. fcw (E,H,C), fcb (E,H), fcprojw (E,C,H), fcprojb (E,C).
static void expert_mlp_forward(floatX* out, floatX* fch, floatX* fch_gelu, const floatX* inp, const int* expert_offsets, int max_rows,
                               const floatX* fcw, const floatX* fcb, const floatX* fcprojw, const floatX* fcprojb, int E, int C, int H,
                               cudaStream_t stream) {
    if (max_rows == 0) { return; }
    int tiles = expert_row_tiles(max_rows, E);
    rows_gemm_kernel<true><<<dim3(tiles, ceil_div_int(H, XG_TILE)), 256, 0, stream>>>(fch, fch_gelu, inp, fcw, fcb, expert_offsets, E, H, C);
    cudaCheckLaunch();
    rows_gemm_kernel<true><<<dim3(tiles, ceil_div_int(C, XG_TILE)), 256, 0, stream>>>(out, NULL, fch_gelu, fcprojw, fcprojb, expert_offsets, E, C, H);
    cudaCheckLaunch();
}

// dinp (max_rows, C) overwritten on the used rows; the weight gradients (fp32) +=; dfch, dfch_gelu scratch (max_rows, H)
static void expert_mlp_backward(floatX* dinp, float* dfcw, float* dfcb, float* dfcprojw, float* dfcprojb, floatX* dfch, floatX* dfch_gelu,
                                const floatX* dout, const floatX* inp, const floatX* fch, const floatX* fch_gelu, const int* expert_offsets,
                                int max_rows, const floatX* fcw, const floatX* fcprojw, int E, int C, int H, cudaStream_t stream) {
    if (max_rows == 0) { return; }
    int tiles = expert_row_tiles(max_rows, E);
    // fcproj: d fch_gelu = dout . fcprojw_e (C x H, so W_e(k=c, n=h) = fcprojw[e][c][h]); dW = dout^T fch_gelu; db = sums of dout
    rows_gemm_kernel<false><<<dim3(tiles, ceil_div_int(H, XG_TILE)), 256, 0, stream>>>(dfch_gelu, NULL, dout, fcprojw, NULL, expert_offsets, E, H, C);
    cudaCheckLaunch();
    weights_gemm_kernel<<<dim3(ceil_div_int(H, XG_TILE), ceil_div_int(C, XG_TILE), E), 256, 0, stream>>>(dfcprojw, dout, fch_gelu, expert_offsets, C, H);
    cudaCheckLaunch();
    expert_bias_grad_kernel<<<dim3(ceil_div_int(C, 256), E), 256, 0, stream>>>(dfcprojb, dout, expert_offsets, C);
    cudaCheckLaunch();
    expert_gelu_backward_kernel<<<ceil_div_int((long long)max_rows * H, 256), 256, 0, stream>>>(dfch, fch, dfch_gelu, expert_offsets, E, H);
    cudaCheckLaunch();
    // fc: dinp = dfch . fcw_e (H x C, W_e(k=h, n=c) = fcw[e][h][c]); dW = dfch^T inp; db = sums of dfch
    rows_gemm_kernel<false><<<dim3(tiles, ceil_div_int(C, XG_TILE)), 256, 0, stream>>>(dinp, NULL, dfch, fcw, NULL, expert_offsets, E, C, H);
    cudaCheckLaunch();
    weights_gemm_kernel<<<dim3(ceil_div_int(C, XG_TILE), ceil_div_int(H, XG_TILE), E), 256, 0, stream>>>(dfcw, dfch, inp, expert_offsets, H, C);
    cudaCheckLaunch();
    expert_bias_grad_kernel<<<dim3(ceil_div_int(H, 256), E), 256, 0, stream>>>(dfcb, dfch, expert_offsets, H);
    cudaCheckLaunch();
}
