/*
Causal multi-head self-attention, flash-style: no T x T matrix is ever stored. For one batch
row b and head h, with q_i, k_j, v_j the hs-wide slices of qkv (hs = C/NH) and s = 1/sqrt(hs):

    S_ij = s * q_i . k_j            for j <= i (the causal mask; later keys do not exist for i)
    lse_i = log sum_j exp(S_ij)     (kept for the backward, (B, NH, T))
    P_ij = exp(S_ij - lse_i),  O_i = sum_j P_ij v_j

The forward walks the keys in tiles with an online softmax (a running maximum m_i and sum l_i,
rescaling the partial output whenever m_i grows). The backward recomputes P from q, k and lse:

    D_i = dO_i . O_i                    (= sum_j P_ij dP_ij)
    dP_ij = dO_i . v_j,   dS_ij = P_ij (dP_ij - D_i)
    dV_j = sum_i P_ij dO_i,   dK_j = s sum_i dS_ij q_i,   dQ_i = s sum_j dS_ij k_j

It is deterministic: one kernel owns a tile of keys and loops over the query tiles (dK, dV), a
second owns a tile of queries and loops over the key tiles (dQ); every output element is
written by one thread that sums in a fixed order, with no atomics. All arithmetic is fp32;
floatX only in memory (and, in the tensor-core version, the bf16 operands of the products).

Two versions, studied in dev/cuda/attention.cu (versions 1 and 3 there):
  - tiled: CUDA cores, 32 queries x 32 keys per tile, any hs <= 128, fp32 or bf16 (the FP32
    build, and bf16 shapes the second cannot take);
  - mma: tensor cores (mma.sync m16n8k16 bf16 -> fp32, sm_80+), 64-wide tiles fed by cp.async
    double buffering and ldmatrix, bf16 only, for hs a multiple of 8 (zero-padded to 16, 32, 64
    or 128) and 16-byte aligned tensors.
attention_forward and attention_backward pick the mma version whenever it applies, unless the
build defines ATTENTION_TILED_ONLY (to compare the two inside the engine).
*/
#pragma once

#include <cstdint>
#include "common.cuh"
#include "mma.cuh"

#define ATTENTION_MAX_HEAD_SIZE 128

// ----------------------------------------------------------------------------
// CUDA kernels

// --- tiled version (CUDA cores) ---
// A block of 8 warps owns 32 rows (queries in the forward and dQ, keys in dK/dV); warp w owns
// rows w, w+8, w+16, w+24. When a warp scores its rows against a tile of 32 columns, lane c
// holds column c; when it accumulates the hs-wide outputs, lane c holds dims c, c+32, ... (DPL
// of them: dims per lane, ceil(hs/32)).
#define ATT_TILE 32
#define ATT_WARPS 8
#define ATT_ROWS_PER_WARP (ATT_TILE / ATT_WARPS)

// rows [row0, row0 + ATT_TILE) of one head's (T, hs) slice of a tensor whose rows are ld
// elements apart, into shared memory as fp32 (ATT_TILE, stride); rows past T are zero
__device__ __forceinline__ void attention_load_tile_fp32(float* tile, int stride, const floatX* src, size_t ld, int row0, int T,
                                                         int hs) {
    for (int idx = threadIdx.x; idx < ATT_TILE * hs; idx += blockDim.x) {
        int r = idx / hs, d = idx % hs;
        tile[r * stride + d] = row0 + r < T ? to_float(src[(size_t)(row0 + r) * ld + d]) : 0.0f;
    }
}

// out (B, T, C), lse (B, NH, T) from qkv (B, T, 3C).
// grid (ceil(T/32), B*NH), 256 threads; the longest query tiles (the last ones) start first.
// shared memory: q (32, hs), k (32, hs+1), v (32, hs) fp32 (k's odd stride: lanes read different keys)
template <int DPL>
__global__ void __launch_bounds__(ATT_WARPS * WARP_SIZE)
    attention_forward_tiled_kernel(floatX* out, float* lse, const floatX* qkv, int T, int C, int NH) {
    extern __shared__ float att_smem[];
    int hs = C / NH, kstride = hs + 1;
    float* q_tile = att_smem;
    float* k_tile = q_tile + ATT_TILE * hs;
    float* v_tile = k_tile + ATT_TILE * kstride;
    int qt = gridDim.x - 1 - blockIdx.x;
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    int q0 = qt * ATT_TILE;
    size_t ld = 3 * (size_t)C;
    const floatX* q_g = qkv + (size_t)b * T * ld + h * hs;
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    float scale = 1.0f / sqrtf((float)hs);

    attention_load_tile_fp32(q_tile, hs, q_g, ld, q0, T, hs);
    float m[ATT_ROWS_PER_WARP], l[ATT_ROWS_PER_WARP], o[ATT_ROWS_PER_WARP][DPL];
    #pragma unroll
    for (int rr = 0; rr < ATT_ROWS_PER_WARP; rr++) {
        m[rr] = -INFINITY;
        l[rr] = 0.0f;
        #pragma unroll
        for (int k = 0; k < DPL; k++) { o[rr][k] = 0.0f; }
    }
    // key tiles 0..qt hold every key j <= q0 + 31; tile 0 holds key 0 <= i, so every row's
    // maximum is finite from the first tile on
    for (int kt = 0; kt <= qt; kt++) {
        int k0 = kt * ATT_TILE;
        __syncthreads();  // the previous tile's k, v are no longer read
        attention_load_tile_fp32(k_tile, kstride, q_g + C, ld, k0, T, hs);
        attention_load_tile_fp32(v_tile, hs, q_g + 2 * C, ld, k0, T, hs);
        __syncthreads();
        int j = k0 + lane;
        #pragma unroll
        for (int rr = 0; rr < ATT_ROWS_PER_WARP; rr++) {
            int r = warp + rr * ATT_WARPS, i = q0 + r;
            float s = 0.0f;
            for (int d = 0; d < hs; d++) { s += q_tile[r * hs + d] * k_tile[lane * kstride + d]; }
            s *= scale;
            bool valid = j <= i && j < T;
            float m_new = fmaxf(m[rr], warp_reduce_max(valid ? s : -INFINITY));
            float p = valid ? expf(s - m_new) : 0.0f;
            float alpha = expf(m[rr] - m_new);  // 0 on the first tile, where m = -inf
            l[rr] = alpha * l[rr] + warp_reduce_sum(p);
            m[rr] = m_new;
            #pragma unroll
            for (int k = 0; k < DPL; k++) { o[rr][k] *= alpha; }
            #pragma unroll
            for (int c = 0; c < ATT_TILE; c++) {
                float pc = __shfl_sync(0xffffffff, p, c);  // P_i,(k0+c), held by lane c
                #pragma unroll
                for (int k = 0; k < DPL; k++) {
                    int d = lane + k * WARP_SIZE;
                    if (d < hs) { o[rr][k] += pc * v_tile[c * hs + d]; }
                }
            }
        }
    }
    #pragma unroll
    for (int rr = 0; rr < ATT_ROWS_PER_WARP; rr++) {
        int i = q0 + warp + rr * ATT_WARPS;
        if (i >= T) { continue; }
        float inv_l = 1.0f / l[rr];
        floatX* o_g = out + ((size_t)b * T + i) * C + h * hs;
        #pragma unroll
        for (int k = 0; k < DPL; k++) {
            int d = lane + k * WARP_SIZE;
            if (d < hs) { o_g[d] = from_float<floatX>(o[rr][k] * inv_l); }
        }
        if (lane == 0) { lse[(size_t)blockIdx.y * T + i] = m[rr] + logf(l[rr]); }
    }
}

// D = rowsum(dO * O) per (b, h, t): dsum (B, NH, T) from dout, out (B, T, C). One warp per row.
__global__ void attention_backward_dsum_kernel(float* dsum, const floatX* dout, const floatX* out, int B, int T, int C, int NH) {
    int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;  // (b*T + t)*NH + h
    int lane = threadIdx.x % WARP_SIZE;
    if (row >= B * T * NH) { return; }
    int hs = C / NH, h = row % NH, bt = row / NH, b = bt / T, t = bt % T;
    const floatX* d_g = dout + (size_t)bt * C + h * hs;
    const floatX* o_g = out + (size_t)bt * C + h * hs;
    float sum = 0.0f;
    for (int d = lane; d < hs; d += WARP_SIZE) { sum += to_float(d_g[d]) * to_float(o_g[d]); }
    sum = warp_reduce_sum(sum);
    if (lane == 0) { dsum[((size_t)b * NH + h) * T + t] = sum; }
}

// dK, dV of one tile of 32 keys, looping over the query tiles that can see them (i >= j).
// dqkv (B, T, 3C): writes the k and v thirds. grid (ceil(T/32), B*NH), 256 threads; key tile 0
// (the most query tiles) starts first.
// shared memory: k, v (32, hs), q, dO (32, hs+1), lse, D (32) fp32
template <int DPL>
__global__ void __launch_bounds__(ATT_WARPS * WARP_SIZE)
    attention_backward_dkdv_tiled_kernel(floatX* dqkv, const float* dsum, const floatX* dout, const floatX* qkv, const float* lse,
                                         int T, int C, int NH) {
    extern __shared__ float att_smem[];
    int hs = C / NH, qstride = hs + 1;
    float* k_tile = att_smem;
    float* v_tile = k_tile + ATT_TILE * hs;
    float* q_tile = v_tile + ATT_TILE * hs;
    float* do_tile = q_tile + ATT_TILE * qstride;
    float* lse_tile = do_tile + ATT_TILE * qstride;
    float* dsum_tile = lse_tile + ATT_TILE;
    int kt = blockIdx.x, num_tiles = gridDim.x;
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    int k0 = kt * ATT_TILE;
    size_t ld = 3 * (size_t)C;
    const floatX* q_g = qkv + (size_t)b * T * ld + h * hs;
    const floatX* do_g = dout + (size_t)b * T * C + h * hs;
    const float* lse_g = lse + (size_t)blockIdx.y * T;
    const float* dsum_g = dsum + (size_t)blockIdx.y * T;
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    float scale = 1.0f / sqrtf((float)hs);

    attention_load_tile_fp32(k_tile, hs, q_g + C, ld, k0, T, hs);
    attention_load_tile_fp32(v_tile, hs, q_g + 2 * C, ld, k0, T, hs);
    float dk[ATT_ROWS_PER_WARP][DPL], dv[ATT_ROWS_PER_WARP][DPL];
    #pragma unroll
    for (int rr = 0; rr < ATT_ROWS_PER_WARP; rr++) {
        #pragma unroll
        for (int k = 0; k < DPL; k++) { dk[rr][k] = 0.0f; dv[rr][k] = 0.0f; }
    }
    // query tiles kt..: the first query i >= j >= k0 is in tile kt (queries and keys share the tile size)
    for (int qt = kt; qt < num_tiles; qt++) {
        int q0 = qt * ATT_TILE;
        __syncthreads();  // the previous tile's q, dO are no longer read
        attention_load_tile_fp32(q_tile, qstride, q_g, ld, q0, T, hs);
        attention_load_tile_fp32(do_tile, qstride, do_g, C, q0, T, hs);
        if (threadIdx.x < ATT_TILE) {
            int i = q0 + threadIdx.x;
            lse_tile[threadIdx.x] = i < T ? lse_g[i] : 0.0f;
            dsum_tile[threadIdx.x] = i < T ? dsum_g[i] : 0.0f;
        }
        __syncthreads();
        int i = q0 + lane;
        #pragma unroll
        for (int rr = 0; rr < ATT_ROWS_PER_WARP; rr++) {
            int r = warp + rr * ATT_WARPS, j = k0 + r;
            float s = 0.0f, dp = 0.0f;
            for (int d = 0; d < hs; d++) {
                s += k_tile[r * hs + d] * q_tile[lane * qstride + d];
                dp += v_tile[r * hs + d] * do_tile[lane * qstride + d];
            }
            s *= scale;
            bool valid = i >= j && i < T;  // then also j < T
            float p = valid ? expf(s - lse_tile[lane]) : 0.0f;
            float ds = valid ? p * (dp - dsum_tile[lane]) : 0.0f;
            #pragma unroll
            for (int c = 0; c < ATT_TILE; c++) {
                float pc = __shfl_sync(0xffffffff, p, c);  // P_(q0+c),j, held by lane c
                float dsc = __shfl_sync(0xffffffff, ds, c);
                #pragma unroll
                for (int k = 0; k < DPL; k++) {
                    int d = lane + k * WARP_SIZE;
                    if (d < hs) {
                        dv[rr][k] += pc * do_tile[c * qstride + d];
                        dk[rr][k] += dsc * q_tile[c * qstride + d];
                    }
                }
            }
        }
    }
    #pragma unroll
    for (int rr = 0; rr < ATT_ROWS_PER_WARP; rr++) {
        int j = k0 + warp + rr * ATT_WARPS;
        if (j >= T) { continue; }
        floatX* dk_g = dqkv + ((size_t)b * T + j) * ld + C + h * hs;
        floatX* dv_g = dk_g + C;
        #pragma unroll
        for (int k = 0; k < DPL; k++) {
            int d = lane + k * WARP_SIZE;
            if (d < hs) {
                dk_g[d] = from_float<floatX>(scale * dk[rr][k]);
                dv_g[d] = from_float<floatX>(dv[rr][k]);
            }
        }
    }
}

// dQ of one tile of 32 queries, looping over the key tiles it sees (j <= i).
// dqkv (B, T, 3C): writes the q third. grid (ceil(T/32), B*NH), 256 threads; the longest query
// tiles start first.
// shared memory: q, dO (32, hs), k, v (32, hs+1) fp32
template <int DPL>
__global__ void __launch_bounds__(ATT_WARPS * WARP_SIZE)
    attention_backward_dq_tiled_kernel(floatX* dqkv, const float* dsum, const floatX* dout, const floatX* qkv, const float* lse,
                                       int T, int C, int NH) {
    extern __shared__ float att_smem[];
    int hs = C / NH, kstride = hs + 1;
    float* q_tile = att_smem;
    float* do_tile = q_tile + ATT_TILE * hs;
    float* k_tile = do_tile + ATT_TILE * hs;
    float* v_tile = k_tile + ATT_TILE * kstride;
    int qt = gridDim.x - 1 - blockIdx.x;
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    int q0 = qt * ATT_TILE;
    size_t ld = 3 * (size_t)C;
    const floatX* q_g = qkv + (size_t)b * T * ld + h * hs;
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    float scale = 1.0f / sqrtf((float)hs);

    attention_load_tile_fp32(q_tile, hs, q_g, ld, q0, T, hs);
    attention_load_tile_fp32(do_tile, hs, dout + (size_t)b * T * C + h * hs, C, q0, T, hs);
    float row_lse[ATT_ROWS_PER_WARP], row_dsum[ATT_ROWS_PER_WARP], dq[ATT_ROWS_PER_WARP][DPL];
    #pragma unroll
    for (int rr = 0; rr < ATT_ROWS_PER_WARP; rr++) {
        int i = q0 + warp + rr * ATT_WARPS;
        row_lse[rr] = i < T ? lse[(size_t)blockIdx.y * T + i] : 0.0f;
        row_dsum[rr] = i < T ? dsum[(size_t)blockIdx.y * T + i] : 0.0f;
        #pragma unroll
        for (int k = 0; k < DPL; k++) { dq[rr][k] = 0.0f; }
    }
    for (int kt = 0; kt <= qt; kt++) {
        int k0 = kt * ATT_TILE;
        __syncthreads();  // the previous tile's k, v are no longer read
        attention_load_tile_fp32(k_tile, kstride, q_g + C, ld, k0, T, hs);
        attention_load_tile_fp32(v_tile, kstride, q_g + 2 * C, ld, k0, T, hs);
        __syncthreads();
        int j = k0 + lane;
        #pragma unroll
        for (int rr = 0; rr < ATT_ROWS_PER_WARP; rr++) {
            int r = warp + rr * ATT_WARPS, i = q0 + r;
            float s = 0.0f, dp = 0.0f;
            for (int d = 0; d < hs; d++) {
                s += q_tile[r * hs + d] * k_tile[lane * kstride + d];
                dp += do_tile[r * hs + d] * v_tile[lane * kstride + d];
            }
            s *= scale;
            bool valid = j <= i && i < T;  // then also j < T
            float p = valid ? expf(s - row_lse[rr]) : 0.0f;
            float ds = valid ? p * (dp - row_dsum[rr]) : 0.0f;
            #pragma unroll
            for (int c = 0; c < ATT_TILE; c++) {
                float dsc = __shfl_sync(0xffffffff, ds, c);  // dS_i,(k0+c), held by lane c
                #pragma unroll
                for (int k = 0; k < DPL; k++) {
                    int d = lane + k * WARP_SIZE;
                    if (d < hs) { dq[rr][k] += dsc * k_tile[c * kstride + d]; }
                }
            }
        }
    }
    #pragma unroll
    for (int rr = 0; rr < ATT_ROWS_PER_WARP; rr++) {
        int i = q0 + warp + rr * ATT_WARPS;
        if (i >= T) { continue; }
        floatX* dq_g = dqkv + ((size_t)b * T + i) * ld + h * hs;
        #pragma unroll
        for (int k = 0; k < DPL; k++) {
            int d = lane + k * WARP_SIZE;
            if (d < hs) { dq_g[d] = from_float<floatX>(scale * dq[rr][k]); }
        }
    }
}

// --- mma version (tensor cores, bf16) ---
// Built from kernels/mma.cuh (fragment layouts, cp.async, ldmatrix). A warp owns 16 rows. The D
// fragments of scores become, packed to bf16, the A fragments of the next product (P V, P^T dO,
// dS^T Q, dS K) without leaving the registers. Tiles come from global memory by cp.async into a
// second shared-memory buffer while the tensor cores work on the current one.
#define ATT_MMA_WARPS 4
#define ATT_MMA_ROWS (ATT_MMA_WARPS * 16)  // rows a block owns: 64
#define LOG2E_F 1.4426950408889634f
#define LN2_F 0.6931471805599453f

// issue the copies of rows [row0, row0 + ROWS) of a head's (T, hs) bf16 slice into a row-major
// (ROWS, HS + 8) tile; rows past T and columns past hs are zero-filled
template <int ROWS, int HS>
__device__ __forceinline__ void attention_load_tile_async(__nv_bfloat16* tile, const __nv_bfloat16* src, size_t ld, int row0, int T,
                                                          int hs) {
    constexpr int CHUNKS = HS / 8;
    for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += blockDim.x) {
        int r = idx / CHUNKS, d = (idx % CHUNKS) * 8;
        bool inside = row0 + r < T && d < hs;
        cp_async_16(tile + r * (HS + 8) + d, inside ? src + (size_t)(row0 + r) * ld + d : src, inside);
    }
}

// issue the copies of n values of a (T) row of floats from i0 on; past T zero-filled
__device__ __forceinline__ void attention_load_row_async(float* dst, const float* src, int i0, int n, int T) {
    for (int r = threadIdx.x; r < n; r += blockDim.x) {
        bool inside = i0 + r < T;
        cp_async_4(dst + r, inside ? src + i0 + r : src, inside);
    }
}

// out (B, T, C), lse (B, NH, T) from qkv (B, T, 3C), bf16. HS: hs rounded up to 16, 32, 64, 128.
// grid (ceil(T/64), B*NH), 128 threads: warp w owns queries q0 + 16w .. q0 + 16w + 15; key tiles
// of 64; the longest query tiles (the last ones) start first. Scores are kept in log2 units.
// shared memory: q (64, HS+8), k and v (64, HS+8) twice (the current and the next key tile), bf16
template <int HS>
__global__ void __launch_bounds__(ATT_MMA_WARPS * WARP_SIZE)
    attention_forward_mma_kernel(__nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv, int T, int C, int NH) {
    constexpr int BQ = ATT_MMA_ROWS, BK = ATT_MMA_ROWS, LDS = HS + 8, TILE = BK * LDS;
    extern __shared__ __align__(16) unsigned char att_mma_smem[];
    __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(att_mma_smem);
    __nv_bfloat16* k_s = q_s + BQ * LDS;  // two tiles
    __nv_bfloat16* v_s = k_s + 2 * TILE;  // two tiles
    int hs = C / NH;
    int qt = gridDim.x - 1 - blockIdx.x;
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    int q0 = qt * BQ;
    size_t ld = 3 * (size_t)C;
    const __nv_bfloat16* q_g = qkv + (size_t)b * T * ld + h * hs;
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, g = lane / 4, c = lane % 4;
    float scale_log2 = LOG2E_F / sqrtf((float)hs);

    attention_load_tile_async<BQ, HS>(q_s, q_g, ld, q0, T, hs);
    attention_load_tile_async<BK, HS>(k_s, q_g + C, ld, 0, T, hs);
    attention_load_tile_async<BK, HS>(v_s, q_g + 2 * C, ld, 0, T, hs);
    cp_async_commit();
    uint32_t q_frag[HS / 16][4];
    int row_i[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};  // the queries of this thread's D rows
    float o[HS / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    for (int nt = 0; nt < HS / 8; nt++) {
        for (int e = 0; e < 4; e++) { o[nt][e] = 0.0f; }
    }
    // key tiles 0..qt hold every key j <= q0 + 63; tile 0 holds key 0 <= i, so every row's
    // maximum is finite from the first tile on. Rows i >= T see zero q and are not written.
    for (int kt = 0; kt <= qt; kt++) {
        int k0 = kt * BK;
        const __nv_bfloat16* k_cur = k_s + (kt & 1) * TILE;
        const __nv_bfloat16* v_cur = v_s + (kt & 1) * TILE;
        if (kt < qt) {  // the next tile into the other buffers, read last in iteration kt - 1
            attention_load_tile_async<BK, HS>(k_s + ((kt + 1) & 1) * TILE, q_g + C, ld, k0 + BK, T, hs);
            attention_load_tile_async<BK, HS>(v_s + ((kt + 1) & 1) * TILE, q_g + 2 * C, ld, k0 + BK, T, hs);
        }
        cp_async_commit();
        cp_async_wait<1>();  // everything but the group just issued: tile kt (and q) are here
        __syncthreads();
        if (kt == 0) {
            for (int ks = 0; ks < HS / 16; ks++) { ldmatrix_a(q_frag[ks], q_s, LDS, warp * 16, ks * 16); }
        }
        // S (16 x 64) = Q K^T
        float s[BK / 8][4];
        for (int nt = 0; nt < BK / 8; nt++) {
            for (int e = 0; e < 4; e++) { s[nt][e] = 0.0f; }
        }
        for (int ks = 0; ks < HS / 16; ks++) {
            for (int nt = 0; nt < BK / 8; nt += 2) {
                uint32_t b_lo[2], b_hi[2];
                ldmatrix_b_pair(b_lo, b_hi, k_cur, LDS, nt * 8, ks * 16);
                mma_bf16_m16n8k16(s[nt], q_frag[ks], b_lo);
                mma_bf16_m16n8k16(s[nt + 1], q_frag[ks], b_hi);
            }
        }
        // online softmax; a row's 64 scores are spread over the 4 threads of its quad. Only the
        // diagonal tile (kt == qt) holds keys j > i; the others skip the mask.
        float m_new[2] = {m[0], m[1]};
        for (int nt = 0; nt < BK / 8; nt++) {
            for (int e = 0; e < 4; e++) {
                float x = s[nt][e] * scale_log2;
                if (kt == qt && k0 + nt * 8 + 2 * c + (e & 1) > row_i[e / 2]) { x = -INFINITY; }
                s[nt][e] = x;
                m_new[e / 2] = fmaxf(m_new[e / 2], x);
            }
        }
        for (int r = 0; r < 2; r++) {
            m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(0xffffffff, m_new[r], 1));
            m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(0xffffffff, m_new[r], 2));
            float alpha = exp2f(m[r] - m_new[r]);  // 0 on the first tile, where m = -inf
            m[r] = m_new[r];
            l[r] *= alpha;  // this thread's part of the row sum; the quad's parts are added at the end
            for (int nt = 0; nt < HS / 8; nt++) {
                o[nt][2 * r] *= alpha;
                o[nt][2 * r + 1] *= alpha;
            }
        }
        for (int nt = 0; nt < BK / 8; nt++) {
            for (int e = 0; e < 4; e++) {
                float p = exp2f(s[nt][e] - m[e / 2]);
                s[nt][e] = p;
                l[e / 2] += p;
            }
        }
        // O (16 x HS) += P (16 x 64) V (64 x HS)
        for (int kk = 0; kk < BK / 16; kk++) {
            uint32_t p_frag[4];
            pack_a_from_accumulators(p_frag, s[2 * kk], s[2 * kk + 1]);
            for (int nt = 0; nt < HS / 8; nt += 2) {
                uint32_t b_lo[2], b_hi[2];
                ldmatrix_b_pair_trans(b_lo, b_hi, v_cur, LDS, nt * 8, kk * 16);
                mma_bf16_m16n8k16(o[nt], p_frag, b_lo);
                mma_bf16_m16n8k16(o[nt + 1], p_frag, b_hi);
            }
        }
        __syncthreads();  // this tile's buffers are refilled in iteration kt + 1
    }
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 2);
        int i = row_i[r];
        if (i >= T) { continue; }
        float inv_l = 1.0f / l[r];
        __nv_bfloat16* o_g = out + ((size_t)b * T + i) * C + h * hs;
        for (int nt = 0; nt < HS / 8; nt++) {
            int d = nt * 8 + 2 * c;
            if (d < hs) {  // hs % 8 == 0: d + 1 < hs too
                *reinterpret_cast<__nv_bfloat162*>(o_g + d) = __floats2bfloat162_rn(o[nt][2 * r] * inv_l, o[nt][2 * r + 1] * inv_l);
            }
        }
        if (c == 0) { lse[(size_t)blockIdx.y * T + i] = (m[r] + log2f(l[r])) * LN2_F; }
    }
}

// The query tile of the mma backward: 64 queries, 32 for HS = 128 (fewer accumulator registers)
template <int HS>
struct AttentionMmaBackward {
    static constexpr int BQ = HS > 64 ? 32 : 64;
};

// dK, dV of one tile of 64 keys (warp w owns keys k0 + 16w ..), looping over the query tiles of
// BQ queries that can see them. dqkv (B, T, 3C): writes the k and v thirds.
// grid (ceil(T/64), B*NH), 128 threads; key tile 0 (the most query tiles) starts first.
// shared memory: k, v (64, HS+8) bf16; q, dO (BQ, HS+8) bf16 and lse, D (BQ) fp32 twice (the
// current and the next query tile)
template <int HS>
__global__ void __launch_bounds__(ATT_MMA_WARPS * WARP_SIZE)
    attention_backward_dkdv_mma_kernel(__nv_bfloat16* dqkv, const float* dsum, const __nv_bfloat16* dout, const __nv_bfloat16* qkv,
                                       const float* lse, int T, int C, int NH) {
    constexpr int BK = ATT_MMA_ROWS, BQ = AttentionMmaBackward<HS>::BQ, LDS = HS + 8, TILE = BQ * LDS;
    extern __shared__ __align__(16) unsigned char att_mma_smem[];
    __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(att_mma_smem);
    __nv_bfloat16* v_s = k_s + BK * LDS;
    __nv_bfloat16* q_s = v_s + BK * LDS;  // two tiles
    __nv_bfloat16* do_s = q_s + 2 * TILE;  // two tiles
    float* lse_s = reinterpret_cast<float*>(do_s + 2 * TILE);  // two rows of BQ
    float* dsum_s = lse_s + 2 * BQ;                            // two rows of BQ
    int hs = C / NH;
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    int k0 = blockIdx.x * BK;
    size_t ld = 3 * (size_t)C;
    const __nv_bfloat16* q_g = qkv + (size_t)b * T * ld + h * hs;
    const __nv_bfloat16* do_g = dout + (size_t)b * T * C + h * hs;
    const float* lse_g = lse + (size_t)blockIdx.y * T;
    const float* dsum_g = dsum + (size_t)blockIdx.y * T;
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, g = lane / 4, c = lane % 4;
    float scale = 1.0f / sqrtf((float)hs), scale_log2 = scale * LOG2E_F;

    // query tiles from the one holding query k0 (BK is a multiple of BQ, so it starts at k0)
    int first = k0 / BQ, num_q_tiles = (T + BQ - 1) / BQ;
    attention_load_tile_async<BK, HS>(k_s, q_g + C, ld, k0, T, hs);
    attention_load_tile_async<BK, HS>(v_s, q_g + 2 * C, ld, k0, T, hs);
    attention_load_tile_async<BQ, HS>(q_s, q_g, ld, first * BQ, T, hs);
    attention_load_tile_async<BQ, HS>(do_s, do_g, C, first * BQ, T, hs);
    attention_load_row_async(lse_s, lse_g, first * BQ, BQ, T);
    attention_load_row_async(dsum_s, dsum_g, first * BQ, BQ, T);
    cp_async_commit();
    int row_j[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};  // the keys of this thread's D rows
    float dk[HS / 8][4], dv[HS / 8][4];
    for (int nt = 0; nt < HS / 8; nt++) {
        for (int e = 0; e < 4; e++) { dk[nt][e] = 0.0f; dv[nt][e] = 0.0f; }
    }
    for (int qtile = first; qtile < num_q_tiles; qtile++) {
        int q0 = qtile * BQ, cur = (qtile - first) & 1, next = cur ^ 1;
        if (qtile + 1 < num_q_tiles) {  // the next tile into the other buffers, read last in the previous iteration
            attention_load_tile_async<BQ, HS>(q_s + next * TILE, q_g, ld, q0 + BQ, T, hs);
            attention_load_tile_async<BQ, HS>(do_s + next * TILE, do_g, C, q0 + BQ, T, hs);
            attention_load_row_async(lse_s + next * BQ, lse_g, q0 + BQ, BQ, T);
            attention_load_row_async(dsum_s + next * BQ, dsum_g, q0 + BQ, BQ, T);
        }
        cp_async_commit();
        cp_async_wait<1>();  // everything but the group just issued: this tile (and k, v) are here
        __syncthreads();
        const __nv_bfloat16* q_cur = q_s + cur * TILE;
        const __nv_bfloat16* do_cur = do_s + cur * TILE;
        const float* lse_cur = lse_s + cur * BQ;
        const float* dsum_cur = dsum_s + cur * BQ;
        // S^T (16 keys x BQ queries) = K Q^T and dP^T = V dO^T
        float st[BQ / 8][4], dpt[BQ / 8][4];
        for (int nt = 0; nt < BQ / 8; nt++) {
            for (int e = 0; e < 4; e++) { st[nt][e] = 0.0f; dpt[nt][e] = 0.0f; }
        }
        for (int ks = 0; ks < HS / 16; ks++) {
            uint32_t k_frag[4], v_frag[4];
            ldmatrix_a(k_frag, k_s, LDS, warp * 16, ks * 16);
            ldmatrix_a(v_frag, v_s, LDS, warp * 16, ks * 16);
            for (int nt = 0; nt < BQ / 8; nt += 2) {
                uint32_t b_lo[2], b_hi[2];
                ldmatrix_b_pair(b_lo, b_hi, q_cur, LDS, nt * 8, ks * 16);
                mma_bf16_m16n8k16(st[nt], k_frag, b_lo);
                mma_bf16_m16n8k16(st[nt + 1], k_frag, b_hi);
                ldmatrix_b_pair(b_lo, b_hi, do_cur, LDS, nt * 8, ks * 16);
                mma_bf16_m16n8k16(dpt[nt], v_frag, b_lo);
                mma_bf16_m16n8k16(dpt[nt + 1], v_frag, b_hi);
            }
        }
        // P^T and dS^T = P^T (dP^T - D), in place. A (key, query) pair is kept where i >= j and
        // i < T (then also j < T): everywhere in the tile when q0 >= k0 + 63 and q0 + BQ <= T.
        bool masked_tile = q0 < k0 + BK - 1 || q0 + BQ > T;
        for (int nt = 0; nt < BQ / 8; nt++) {
            for (int e = 0; e < 4; e++) {
                int col = nt * 8 + 2 * c + (e & 1), i = q0 + col;
                bool valid = !masked_tile || (i >= row_j[e / 2] && i < T);
                float p = valid ? exp2f(st[nt][e] * scale_log2 - lse_cur[col] * LOG2E_F) : 0.0f;
                st[nt][e] = p;
                dpt[nt][e] = valid ? p * (dpt[nt][e] - dsum_cur[col]) : 0.0f;
            }
        }
        // dV (16 x HS) += P^T (16 x BQ) dO (BQ x HS);  dK += dS^T Q
        for (int kk = 0; kk < BQ / 16; kk++) {
            uint32_t p_frag[4], ds_frag[4];
            pack_a_from_accumulators(p_frag, st[2 * kk], st[2 * kk + 1]);
            pack_a_from_accumulators(ds_frag, dpt[2 * kk], dpt[2 * kk + 1]);
            for (int nt = 0; nt < HS / 8; nt += 2) {
                uint32_t b_lo[2], b_hi[2];
                ldmatrix_b_pair_trans(b_lo, b_hi, do_cur, LDS, nt * 8, kk * 16);
                mma_bf16_m16n8k16(dv[nt], p_frag, b_lo);
                mma_bf16_m16n8k16(dv[nt + 1], p_frag, b_hi);
                ldmatrix_b_pair_trans(b_lo, b_hi, q_cur, LDS, nt * 8, kk * 16);
                mma_bf16_m16n8k16(dk[nt], ds_frag, b_lo);
                mma_bf16_m16n8k16(dk[nt + 1], ds_frag, b_hi);
            }
        }
        __syncthreads();  // this tile's buffers are refilled in the next iteration
    }
    for (int r = 0; r < 2; r++) {
        int j = row_j[r];
        if (j >= T) { continue; }
        __nv_bfloat16* dk_g = dqkv + ((size_t)b * T + j) * ld + C + h * hs;
        __nv_bfloat16* dv_g = dk_g + C;
        for (int nt = 0; nt < HS / 8; nt++) {
            int d = nt * 8 + 2 * c;
            if (d < hs) {
                *reinterpret_cast<__nv_bfloat162*>(dk_g + d) = __floats2bfloat162_rn(scale * dk[nt][2 * r], scale * dk[nt][2 * r + 1]);
                *reinterpret_cast<__nv_bfloat162*>(dv_g + d) = __floats2bfloat162_rn(dv[nt][2 * r], dv[nt][2 * r + 1]);
            }
        }
    }
}

// dQ of one tile of 64 queries (warp w owns queries q0 + 16w ..), looping over the key tiles of
// BK (the dK/dV kernel's BQ) keys that it sees. dqkv (B, T, 3C): writes the q third.
// grid (ceil(T/64), B*NH), 128 threads; the longest query tiles start first.
// shared memory: q, dO (64, HS+8); k, v (BK, HS+8) twice (the current and the next key tile), bf16
template <int HS>
__global__ void __launch_bounds__(ATT_MMA_WARPS * WARP_SIZE)
    attention_backward_dq_mma_kernel(__nv_bfloat16* dqkv, const float* dsum, const __nv_bfloat16* dout, const __nv_bfloat16* qkv,
                                     const float* lse, int T, int C, int NH) {
    constexpr int BQ = ATT_MMA_ROWS, BK = AttentionMmaBackward<HS>::BQ, LDS = HS + 8, TILE = BK * LDS;
    extern __shared__ __align__(16) unsigned char att_mma_smem[];
    __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(att_mma_smem);
    __nv_bfloat16* do_s = q_s + BQ * LDS;
    __nv_bfloat16* k_s = do_s + BQ * LDS;  // two tiles
    __nv_bfloat16* v_s = k_s + 2 * TILE;   // two tiles
    int hs = C / NH;
    int qt = gridDim.x - 1 - blockIdx.x;
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    int q0 = qt * BQ;
    size_t ld = 3 * (size_t)C;
    const __nv_bfloat16* q_g = qkv + (size_t)b * T * ld + h * hs;
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, g = lane / 4, c = lane % 4;
    float scale = 1.0f / sqrtf((float)hs), scale_log2 = scale * LOG2E_F;

    attention_load_tile_async<BQ, HS>(q_s, q_g, ld, q0, T, hs);
    attention_load_tile_async<BQ, HS>(do_s, dout + (size_t)b * T * C + h * hs, C, q0, T, hs);
    attention_load_tile_async<BK, HS>(k_s, q_g + C, ld, 0, T, hs);
    attention_load_tile_async<BK, HS>(v_s, q_g + 2 * C, ld, 0, T, hs);
    cp_async_commit();
    int row_i[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};  // the queries of this thread's D rows
    float row_lse[2], row_dsum[2];
    for (int r = 0; r < 2; r++) {
        row_lse[r] = row_i[r] < T ? lse[(size_t)blockIdx.y * T + row_i[r]] * LOG2E_F : 0.0f;
        row_dsum[r] = row_i[r] < T ? dsum[(size_t)blockIdx.y * T + row_i[r]] : 0.0f;
    }
    float dq[HS / 8][4];
    for (int nt = 0; nt < HS / 8; nt++) {
        for (int e = 0; e < 4; e++) { dq[nt][e] = 0.0f; }
    }
    // key tiles holding keys 0 .. min(q0 + 63, T - 1)
    int num_k_tiles = min((q0 + BQ - 1) / BK + 1, (T + BK - 1) / BK);
    for (int kt = 0; kt < num_k_tiles; kt++) {
        int k0 = kt * BK, cur = kt & 1, next = cur ^ 1;
        if (kt + 1 < num_k_tiles) {  // the next tile into the other buffers, read last in the previous iteration
            attention_load_tile_async<BK, HS>(k_s + next * TILE, q_g + C, ld, k0 + BK, T, hs);
            attention_load_tile_async<BK, HS>(v_s + next * TILE, q_g + 2 * C, ld, k0 + BK, T, hs);
        }
        cp_async_commit();
        cp_async_wait<1>();  // everything but the group just issued: this tile (and q, dO) are here
        __syncthreads();
        const __nv_bfloat16* k_cur = k_s + cur * TILE;
        const __nv_bfloat16* v_cur = v_s + cur * TILE;
        // S (16 x BK) = Q K^T and dP = dO V^T
        float s[BK / 8][4], dp[BK / 8][4];
        for (int nt = 0; nt < BK / 8; nt++) {
            for (int e = 0; e < 4; e++) { s[nt][e] = 0.0f; dp[nt][e] = 0.0f; }
        }
        for (int ks = 0; ks < HS / 16; ks++) {
            uint32_t q_frag[4], do_frag[4];
            ldmatrix_a(q_frag, q_s, LDS, warp * 16, ks * 16);
            ldmatrix_a(do_frag, do_s, LDS, warp * 16, ks * 16);
            for (int nt = 0; nt < BK / 8; nt += 2) {
                uint32_t b_lo[2], b_hi[2];
                ldmatrix_b_pair(b_lo, b_hi, k_cur, LDS, nt * 8, ks * 16);
                mma_bf16_m16n8k16(s[nt], q_frag, b_lo);
                mma_bf16_m16n8k16(s[nt + 1], q_frag, b_hi);
                ldmatrix_b_pair(b_lo, b_hi, v_cur, LDS, nt * 8, ks * 16);
                mma_bf16_m16n8k16(dp[nt], do_frag, b_lo);
                mma_bf16_m16n8k16(dp[nt + 1], do_frag, b_hi);
            }
        }
        // dS = P (dP - D), into s. A (query, key) pair is kept where j <= i and i < T (then also
        // j < T): everywhere in the tile when k0 + BK - 1 <= q0 and q0 + 64 <= T.
        bool masked_tile = k0 + BK - 1 > q0 || q0 + BQ > T;
        for (int nt = 0; nt < BK / 8; nt++) {
            for (int e = 0; e < 4; e++) {
                int j = k0 + nt * 8 + 2 * c + (e & 1), r = e / 2;
                bool valid = !masked_tile || (j <= row_i[r] && row_i[r] < T);
                float p = valid ? exp2f(s[nt][e] * scale_log2 - row_lse[r]) : 0.0f;
                s[nt][e] = valid ? p * (dp[nt][e] - row_dsum[r]) : 0.0f;
            }
        }
        // dQ (16 x HS) += dS (16 x BK) K (BK x HS)
        for (int kk = 0; kk < BK / 16; kk++) {
            uint32_t ds_frag[4];
            pack_a_from_accumulators(ds_frag, s[2 * kk], s[2 * kk + 1]);
            for (int nt = 0; nt < HS / 8; nt += 2) {
                uint32_t b_lo[2], b_hi[2];
                ldmatrix_b_pair_trans(b_lo, b_hi, k_cur, LDS, nt * 8, kk * 16);
                mma_bf16_m16n8k16(dq[nt], ds_frag, b_lo);
                mma_bf16_m16n8k16(dq[nt + 1], ds_frag, b_hi);
            }
        }
        __syncthreads();  // this tile's buffers are refilled in the next iteration
    }
    for (int r = 0; r < 2; r++) {
        int i = row_i[r];
        if (i >= T) { continue; }
        __nv_bfloat16* dq_g = dqkv + ((size_t)b * T + i) * ld + h * hs;
        for (int nt = 0; nt < HS / 8; nt++) {
            int d = nt * 8 + 2 * c;
            if (d < hs) {
                *reinterpret_cast<__nv_bfloat162*>(dq_g + d) = __floats2bfloat162_rn(scale * dq[nt][2 * r], scale * dq[nt][2 * r + 1]);
            }
        }
    }
}

// ----------------------------------------------------------------------------
// kernel launchers

// how allow_dynamic_smem names an attention kernel when the GPU lacks the shared memory it needs
#define ATT_SMEM_WHAT(kind) "the attention " kind " kernel (its shared memory grows with the head size C/NH)"

static void attention_check_shape(const char* who, int B, int T, int C, int NH) {
    if (B < 1 || T < 1 || NH < 1 || C < NH || C % NH != 0) {
        die("%s: expected B, T >= 1 and C a multiple of NH, got B=%d T=%d C=%d NH=%d", who, B, T, C, NH);
    }
    if (C / NH > ATTENTION_MAX_HEAD_SIZE) {
        die("%s: head size C/NH = %d exceeds the %d these kernels hold", who, C / NH, ATTENTION_MAX_HEAD_SIZE);
    }
    if ((long long)B * NH > 65535) { die("%s: B*NH = %lld exceeds the grid's 65535", who, (long long)B * NH); }
}

// --- tiled version ---

template <int DPL>
static void attention_forward_tiled_launch(floatX* out, float* lse, const floatX* qkv, int B, int T, int C, int NH, cudaStream_t stream) {
    int hs = C / NH;
    size_t smem = (size_t)ATT_TILE * (3 * hs + 1) * sizeof(float);  // q, k (stride hs+1), v
    dim3 grid(ceil_div_int(T, ATT_TILE), B * NH);
    allow_dynamic_smem(attention_forward_tiled_kernel<DPL>, smem, ATT_SMEM_WHAT("forward, tiled"));
    attention_forward_tiled_kernel<DPL><<<grid, ATT_WARPS * WARP_SIZE, smem, stream>>>(out, lse, qkv, T, C, NH);
    cudaCheckLaunch();
}

static void attention_forward_tiled(floatX* out, float* lse, const floatX* qkv, int B, int T, int C, int NH, cudaStream_t stream) {
    attention_check_shape("attention_forward", B, T, C, NH);
    int hs = C / NH;
    if (hs <= 32) {
        attention_forward_tiled_launch<1>(out, lse, qkv, B, T, C, NH, stream);
    } else if (hs <= 64) {
        attention_forward_tiled_launch<2>(out, lse, qkv, B, T, C, NH, stream);
    } else {
        attention_forward_tiled_launch<4>(out, lse, qkv, B, T, C, NH, stream);
    }
}

// D = rowsum(dO * O) into dsum (B, NH, T)
static void attention_backward_dsum(float* dsum, const floatX* dout, const floatX* out, int B, int T, int C, int NH, cudaStream_t stream) {
    const int block_size = 256;
    int rows = B * T * NH;
    attention_backward_dsum_kernel<<<ceil_div_int(rows, block_size / WARP_SIZE), block_size, 0, stream>>>(dsum, dout, out, B, T, C, NH);
    cudaCheckLaunch();
}

template <int DPL>
static void attention_backward_tiled_launch(floatX* dqkv, const float* dsum, const floatX* dout, const floatX* qkv, const float* lse,
                                            int B, int T, int C, int NH, cudaStream_t stream) {
    int hs = C / NH;
    dim3 grid(ceil_div_int(T, ATT_TILE), B * NH);
    size_t smem_dkdv = ((size_t)ATT_TILE * (2 * hs + 2 * (hs + 1)) + 2 * ATT_TILE) * sizeof(float);  // k, v, q, dO, lse, D
    allow_dynamic_smem(attention_backward_dkdv_tiled_kernel<DPL>, smem_dkdv, ATT_SMEM_WHAT("backward dK dV, tiled"));
    attention_backward_dkdv_tiled_kernel<DPL><<<grid, ATT_WARPS * WARP_SIZE, smem_dkdv, stream>>>(dqkv, dsum, dout, qkv, lse, T, C, NH);
    cudaCheckLaunch();
    size_t smem_dq = (size_t)ATT_TILE * (2 * hs + 2 * (hs + 1)) * sizeof(float);  // q, dO, k, v
    allow_dynamic_smem(attention_backward_dq_tiled_kernel<DPL>, smem_dq, ATT_SMEM_WHAT("backward dQ, tiled"));
    attention_backward_dq_tiled_kernel<DPL><<<grid, ATT_WARPS * WARP_SIZE, smem_dq, stream>>>(dqkv, dsum, dout, qkv, lse, T, C, NH);
    cudaCheckLaunch();
}

static void attention_backward_tiled(floatX* dqkv, float* scratch, const floatX* dout, const floatX* qkv, const floatX* out,
                                     const float* lse, int B, int T, int C, int NH, cudaStream_t stream) {
    attention_check_shape("attention_backward", B, T, C, NH);
    int hs = C / NH;
    float* dsum = scratch;  // (B, NH, T)
    attention_backward_dsum(dsum, dout, out, B, T, C, NH, stream);
    if (hs <= 32) {
        attention_backward_tiled_launch<1>(dqkv, dsum, dout, qkv, lse, B, T, C, NH, stream);
    } else if (hs <= 64) {
        attention_backward_tiled_launch<2>(dqkv, dsum, dout, qkv, lse, B, T, C, NH, stream);
    } else {
        attention_backward_tiled_launch<4>(dqkv, dsum, dout, qkv, lse, B, T, C, NH, stream);
    }
}

// --- mma version (bf16 builds) ---
#if !defined(ENABLE_FP32)

// whether the mma version takes these tensors: hs a multiple of 8 and 16-byte aligned rows
static bool attention_mma_applies(const floatX* a, const floatX* b, const floatX* c, int C, int NH) {
    return NH > 0 && C % NH == 0 && (C / NH) % 8 == 0 && C / NH <= ATTENTION_MAX_HEAD_SIZE && (uintptr_t)a % 16 == 0 &&
           (uintptr_t)b % 16 == 0 && (uintptr_t)c % 16 == 0;
}

// hs rounded up to the head size an mma kernel is built for
static int attention_mma_head_size(int hs) { return hs <= 16 ? 16 : hs <= 32 ? 32 : hs <= 64 ? 64 : 128; }

template <int HS>
static void attention_forward_mma_launch(floatX* out, float* lse, const floatX* qkv, int B, int T, int C, int NH, cudaStream_t stream) {
    constexpr int R = ATT_MMA_ROWS, LDS = HS + 8;
    size_t smem = (size_t)5 * R * LDS * sizeof(floatX);  // q, two k, two v (R, LDS)
    dim3 grid(ceil_div_int(T, R), B * NH);
    allow_dynamic_smem(attention_forward_mma_kernel<HS>, smem, ATT_SMEM_WHAT("forward, mma"));
    attention_forward_mma_kernel<HS><<<grid, ATT_MMA_WARPS * WARP_SIZE, smem, stream>>>(out, lse, qkv, T, C, NH);
    cudaCheckLaunch();
}

template <int HS>
static void attention_backward_mma_launch(floatX* dqkv, const float* dsum, const floatX* dout, const floatX* qkv, const float* lse,
                                          int B, int T, int C, int NH, cudaStream_t stream) {
    constexpr int R = ATT_MMA_ROWS, BQ = AttentionMmaBackward<HS>::BQ, LDS = HS + 8;
    dim3 grid(ceil_div_int(T, R), B * NH);
    // dK, dV: k, v (R, LDS); two q, two dO (BQ, LDS); two lse, two D (BQ) fp32
    size_t smem_dkdv = (size_t)(2 * R + 4 * BQ) * LDS * sizeof(floatX) + 4 * BQ * sizeof(float);
    allow_dynamic_smem(attention_backward_dkdv_mma_kernel<HS>, smem_dkdv, ATT_SMEM_WHAT("backward dK dV, mma"));
    attention_backward_dkdv_mma_kernel<HS><<<grid, ATT_MMA_WARPS * WARP_SIZE, smem_dkdv, stream>>>(dqkv, dsum, dout, qkv, lse, T, C, NH);
    cudaCheckLaunch();
    // dQ: q, dO (R, LDS); two k, two v (BQ, LDS)
    size_t smem_dq = (size_t)(2 * R + 4 * BQ) * LDS * sizeof(floatX);
    allow_dynamic_smem(attention_backward_dq_mma_kernel<HS>, smem_dq, ATT_SMEM_WHAT("backward dQ, mma"));
    attention_backward_dq_mma_kernel<HS><<<grid, ATT_MMA_WARPS * WARP_SIZE, smem_dq, stream>>>(dqkv, dsum, dout, qkv, lse, T, C, NH);
    cudaCheckLaunch();
}

static void attention_forward_mma(floatX* out, float* lse, const floatX* qkv, int B, int T, int C, int NH, cudaStream_t stream) {
    attention_check_shape("attention_forward", B, T, C, NH);
    if (!attention_mma_applies(qkv, out, out, C, NH)) {
        die("attention_forward_mma: expected hs = C/NH a multiple of 8 and 16-byte aligned qkv and out, got hs=%d", C / NH);
    }
    switch (attention_mma_head_size(C / NH)) {
        case 16: attention_forward_mma_launch<16>(out, lse, qkv, B, T, C, NH, stream); break;
        case 32: attention_forward_mma_launch<32>(out, lse, qkv, B, T, C, NH, stream); break;
        case 64: attention_forward_mma_launch<64>(out, lse, qkv, B, T, C, NH, stream); break;
        default: attention_forward_mma_launch<128>(out, lse, qkv, B, T, C, NH, stream); break;
    }
}

static void attention_backward_mma(floatX* dqkv, float* scratch, const floatX* dout, const floatX* qkv, const floatX* out,
                                   const float* lse, int B, int T, int C, int NH, cudaStream_t stream) {
    attention_check_shape("attention_backward", B, T, C, NH);
    if (!attention_mma_applies(dqkv, dout, qkv, C, NH)) {
        die("attention_backward_mma: expected hs = C/NH a multiple of 8 and 16-byte aligned dqkv, dout and qkv, got hs=%d", C / NH);
    }
    float* dsum = scratch;  // (B, NH, T)
    attention_backward_dsum(dsum, dout, out, B, T, C, NH, stream);
    switch (attention_mma_head_size(C / NH)) {
        case 16: attention_backward_mma_launch<16>(dqkv, dsum, dout, qkv, lse, B, T, C, NH, stream); break;
        case 32: attention_backward_mma_launch<32>(dqkv, dsum, dout, qkv, lse, B, T, C, NH, stream); break;
        case 64: attention_backward_mma_launch<64>(dqkv, dsum, dout, qkv, lse, B, T, C, NH, stream); break;
        default: attention_backward_mma_launch<128>(dqkv, dsum, dout, qkv, lse, B, T, C, NH, stream); break;
    }
}

#endif  // !ENABLE_FP32

// --- the engine's entry points ---

// out (B, T, C) and lse (B, NH, T) from qkv (B, T, 3C)
static void attention_forward(floatX* out, float* lse, const floatX* qkv, int B, int T, int C, int NH, cudaStream_t stream) {
#if !defined(ENABLE_FP32) && !defined(ATTENTION_TILED_ONLY)
    if (attention_mma_applies(qkv, out, out, C, NH)) {
        attention_forward_mma(out, lse, qkv, B, T, C, NH, stream);
        return;
    }
#endif
    attention_forward_tiled(out, lse, qkv, B, T, C, NH, stream);
}

// the floats of scratch attention_backward uses: D = rowsum(dO * O), (B, NH, T)
static size_t attention_backward_scratch_floats(int B, int T, int NH) { return (size_t)B * NH * T; }

// dqkv (B, T, 3C), overwritten, from dout (B, T, C), the forward's qkv, out and lse
static void attention_backward(floatX* dqkv, float* scratch, const floatX* dout, const floatX* qkv, const floatX* out,
                               const float* lse, int B, int T, int C, int NH, cudaStream_t stream) {
#if !defined(ENABLE_FP32) && !defined(ATTENTION_TILED_ONLY)
    if (attention_mma_applies(dqkv, dout, qkv, C, NH)) {
        attention_backward_mma(dqkv, scratch, dout, qkv, out, lse, B, T, C, NH, stream);
        return;
    }
#endif
    attention_backward_tiled(dqkv, scratch, dout, qkv, out, lse, B, T, C, NH, stream);
}
