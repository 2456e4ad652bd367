/*
Kernel study: causal self-attention, forward and backward (kernels/attention.cuh), checked
against the CPU twin's attention_forward and attention_backward and timed.

    make -C dev/cuda PRECISION=FP32      # or PRECISION=BF16 (the default); GPU_ARCH=90 to choose
    dev/cuda/bin/FP32/attention          # every version; `attention 2` runs version 2 alone
    dev/cuda/bin/FP32/attention 0 --quick    # the small shapes only, no timing (the CPU emulation)

Every version is flash-style: the forward walks the keys in tiles with an online softmax and
keeps only the log-sum-exp of each query's scores (B, NH, T); the backward recomputes the
probabilities from it, with D = rowsum(dO * O) from a small first kernel, then one kernel for
dK, dV per key tile and one for dQ per query tile. No T x T matrix, no atomics: deterministic.

version 1: tiled on CUDA cores, fp32 math. 32 queries x 32 keys per tile, 8 warps of 4 rows;
           lane c scores column c, then the probabilities go round the warp by shuffles while
           lane c accumulates dims c, c+32, .. of the output. Any hs <= 128; fp32 or bf16.
version 2: tensor cores, mma.sync m16n8k16 bf16 -> fp32 (sm_80+), BF16 builds only. 4 warps of
           16 rows, 64-wide tiles; the scores stay in the accumulator registers and become the
           A operand of the next product (P V, dS K, ...), as in FlashAttention-2. hs a multiple
           of 8, zero-padded to 16, 32, 64 or 128. Tiles go global -> registers -> shared
           memory, with a transposed copy for the operands whose k runs down the tile's rows, and
           fragments are read 32 bits at a time.
version 3: version 2's arithmetic, fed better: cp.async copies the next tile into a second
           buffer while the tensor cores work on the current one, and ldmatrix (.trans for the
           transposed operands) reads four 8x8 fragments per instruction, so no transposed copy
           is stored; the softmax skips the causal mask on tiles wholly below the diagonal.
Measured on an H100 SXM at the timing shape, BF16 build (forward / backward):
  version 1  3.07 / 10.06 ms   (4.2 / 3.2 TFLOP/s)
  version 2  0.22 / 0.68 ms    (58 / 47 TFLOP/s)
  version 3  0.10 / 0.31 ms    (130 / 104 TFLOP/s, 13% / 10% of the bf16 tensor peak)
ncu on version 3 (hs 64): occupancy is bound by registers and shared memory (4 blocks of 4
warps per SM in the forward, 2 in dK/dV, 3-4 in dQ), and the integer/logic pipe, not the
tensor pipe, is the busiest: latency and instruction overhead, not bandwidth, limit it.
Versions 1 and 3 graduated: attention_forward / attention_backward use version 3 where it
applies and version 1 otherwise (the FP32 build, hs not a multiple of 8).

Checks per shape and version: out and lse against the CPU, dqkv against the CPU (the twin's
backward adds into a zeroed dqkv and reads its forward's T x T probabilities), every element of
dqkv written (it is filled with NaN first), and two backward runs bit-identical.
Tolerances (max |gpu - cpu| / max |cpu|):
  - FP32 1e-5: the same fp32 math in another order of summation, over up to T = 1024 terms, and
    D taken as dO . O rather than sum_j P_ij dP_ij (measured on an H100: at most 4.2e-7);
  - BF16 2e-2: the inputs are the same bf16 values on both sides, but out and dqkv are rounded
    to bf16 (2^-9 relative), versions 2 and 3 round P and dS to bf16 as the operands of their
    products, and the backward's D = dO . O uses the bf16-rounded out; dS = P (dP - D) then
    loses digits where dP and D are close (measured on an H100: at most 3.6e-3);
  - lse 1e-5 (FP32) and 1e-4 (BF16): fp32 sums of exact products on both sides.
The timing shape is GPT-2 124M's: B=8, T=1024, C=768, NH=12. FLOPs counted: forward
2 * 2 * B * NH * (T^2 / 2) * hs (Q K^T and P V over the causal half), backward 2.5x that.
*/
#include "dev_common.cuh"
#include "../../kernels/attention.cuh"

#define NUM_VERSIONS 3

// ----------------------------------------------------------------------------
// version 2: tensor cores with plain loads. Each tile goes global -> registers -> shared memory
// (16-byte loads), operands whose k runs down a tile's rows get a transposed copy in shared
// memory, and fragments are read with 32-bit loads. The header's mma version (version 3) keeps
// the same arithmetic and replaces these by cp.async double buffering and ldmatrix.

// two bf16 at p (p even-aligned): p[0] in the lower half
__device__ __forceinline__ uint32_t load_bf16x2(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// A fragment of rows row0..row0+15, columns col0..col0+15 of a row-major tile (stride ld)
__device__ __forceinline__ void load_a_fragment(uint32_t a[4], const __nv_bfloat16* tile, int ld, int row0, int col0) {
    int g = (threadIdx.x % WARP_SIZE) / 4, c = threadIdx.x % 4;
    const __nv_bfloat16* p = tile + (row0 + g) * ld + col0 + 2 * c;
    a[0] = load_bf16x2(p);
    a[1] = load_bf16x2(p + 8 * ld);
    a[2] = load_bf16x2(p + 8);
    a[3] = load_bf16x2(p + 8 * ld + 8);
}

// B fragment (k 16 x n 8) from a tile holding B^T row-major: n = tile row n0..n0+7, k = tile column k0..k0+15
__device__ __forceinline__ void load_b_fragment(uint32_t b[2], const __nv_bfloat16* tile, int ld, int n0, int k0) {
    int g = (threadIdx.x % WARP_SIZE) / 4, c = threadIdx.x % 4;
    const __nv_bfloat16* p = tile + (n0 + g) * ld + k0 + 2 * c;
    b[0] = load_bf16x2(p);
    b[1] = load_bf16x2(p + 8);
}

// rows [row0, row0 + ROWS) of one head's (T, hs) bf16 slice (rows ld elements apart) into shared
// memory: row-major (ROWS, HS + 8) if `tile`, transposed (HS, ROWS + 8) if `tile_t`; rows past T
// and columns past hs are zero. hs % 8 == 0 and 16-byte aligned rows: one 16-byte load per 8 values.
template <int ROWS, int HS>
__device__ __forceinline__ void attention_load_tile_bf16(__nv_bfloat16* tile, __nv_bfloat16* tile_t, const __nv_bfloat16* src,
                                                         size_t ld, int row0, int T, int hs) {
    constexpr int CHUNKS = HS / 8;
    for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += blockDim.x) {
        int r = idx / CHUNKS, d = (idx % CHUNKS) * 8;
        int4 v = make_int4(0, 0, 0, 0);
        if (row0 + r < T && d < hs) { v = *reinterpret_cast<const int4*>(src + (size_t)(row0 + r) * ld + d); }
        if (tile != nullptr) { *reinterpret_cast<int4*>(tile + r * (HS + 8) + d) = v; }
        if (tile_t != nullptr) {
            const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&v);
            for (int k = 0; k < 8; k++) { tile_t[(d + k) * (ROWS + 8) + r] = e[k]; }
        }
    }
}

// out (B, T, C), lse (B, NH, T) from qkv (B, T, 3C), bf16. HS: hs rounded up to 16, 32, 64, 128.
// grid (ceil(T/64), B*NH), 128 threads: warp w owns queries q0 + 16w .. q0 + 16w + 15; key tiles of 64.
// shared memory: q, k (64, HS+8), v transposed (HS, 72), bf16. Scores are kept in log2 units.
template <int HS>
__global__ void __launch_bounds__(ATT_MMA_WARPS * WARP_SIZE)
    attention_forward_mma_plain_kernel(__nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv, int T, int C, int NH) {
    constexpr int BQ = ATT_MMA_ROWS, BK = ATT_MMA_ROWS, LDS = HS + 8, LDT = BK + 8;
    extern __shared__ __align__(16) unsigned char att_mma_smem[];
    __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(att_mma_smem);
    __nv_bfloat16* k_s = q_s + BQ * LDS;
    __nv_bfloat16* vt_s = k_s + BK * LDS;
    int hs = C / NH;
    int qt = gridDim.x - 1 - blockIdx.x;
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    int q0 = qt * BQ;
    size_t ld = 3 * (size_t)C;
    const __nv_bfloat16* q_g = qkv + (size_t)b * T * ld + h * hs;
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, g = lane / 4, c = lane % 4;
    float scale_log2 = LOG2E_F / sqrtf((float)hs);

    attention_load_tile_bf16<BQ, HS>(q_s, nullptr, q_g, ld, q0, T, hs);
    __syncthreads();
    uint32_t q_frag[HS / 16][4];
    for (int ks = 0; ks < HS / 16; ks++) { load_a_fragment(q_frag[ks], q_s, LDS, warp * 16, ks * 16); }
    int row_i[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};  // the queries of this thread's D rows
    float o[HS / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    for (int nt = 0; nt < HS / 8; nt++) {
        for (int e = 0; e < 4; e++) { o[nt][e] = 0.0f; }
    }
    // key tiles 0..qt hold every key j <= q0 + 63; tile 0 holds key 0 <= i, so every row's
    // maximum is finite from the first tile on. Rows i >= T see zero q and are not written.
    for (int kt = 0; kt <= qt; kt++) {
        int k0 = kt * BK;
        __syncthreads();  // the previous tile's k, v are no longer read
        attention_load_tile_bf16<BK, HS>(k_s, nullptr, q_g + C, ld, k0, T, hs);
        attention_load_tile_bf16<BK, HS>(nullptr, vt_s, q_g + 2 * C, ld, k0, T, hs);
        __syncthreads();
        // S (16 x 64) = Q K^T
        float s[BK / 8][4];
        for (int nt = 0; nt < BK / 8; nt++) {
            for (int e = 0; e < 4; e++) { s[nt][e] = 0.0f; }
            for (int ks = 0; ks < HS / 16; ks++) {
                uint32_t b_frag[2];
                load_b_fragment(b_frag, k_s, LDS, nt * 8, ks * 16);
                mma_bf16_m16n8k16(s[nt], q_frag[ks], b_frag);
            }
        }
        // online softmax; a row's 64 scores are spread over the 4 threads of its quad
        float m_new[2] = {m[0], m[1]};
        for (int nt = 0; nt < BK / 8; nt++) {
            for (int e = 0; e < 4; e++) {
                int j = k0 + nt * 8 + 2 * c + (e & 1);
                float x = j <= row_i[e / 2] ? s[nt][e] * scale_log2 : -INFINITY;
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
            for (int nt = 0; nt < HS / 8; nt++) {
                uint32_t b_frag[2];
                load_b_fragment(b_frag, vt_s, LDT, nt * 8, kk * 16);
                mma_bf16_m16n8k16(o[nt], p_frag, b_frag);
            }
        }
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

// dK, dV of one tile of 64 keys (warp w owns keys k0 + 16w ..), looping over the query tiles of
// BQ queries that can see them. dqkv (B, T, 3C): writes the k and v thirds.
// grid (ceil(T/64), B*NH), 128 threads; key tile 0 (the most query tiles) starts first.
// shared memory: k, v (64, HS+8), q, dO (BQ, HS+8) and transposed (HS, BQ+8) bf16; lse (log2 units), D (BQ) fp32
template <int HS>
__global__ void __launch_bounds__(ATT_MMA_WARPS * WARP_SIZE)
    attention_backward_dkdv_mma_plain_kernel(__nv_bfloat16* dqkv, const float* dsum, const __nv_bfloat16* dout, const __nv_bfloat16* qkv,
                                       const float* lse, int T, int C, int NH) {
    constexpr int BK = ATT_MMA_ROWS, BQ = AttentionMmaBackward<HS>::BQ, LDS = HS + 8, LDT = BQ + 8;
    extern __shared__ __align__(16) unsigned char att_mma_smem[];
    __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(att_mma_smem);
    __nv_bfloat16* v_s = k_s + BK * LDS;
    __nv_bfloat16* q_s = v_s + BK * LDS;
    __nv_bfloat16* qt_s = q_s + BQ * LDS;
    __nv_bfloat16* do_s = qt_s + HS * LDT;
    __nv_bfloat16* dot_s = do_s + BQ * LDS;
    float* lse_s = reinterpret_cast<float*>(dot_s + HS * LDT);
    float* dsum_s = lse_s + BQ;
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

    attention_load_tile_bf16<BK, HS>(k_s, nullptr, q_g + C, ld, k0, T, hs);
    attention_load_tile_bf16<BK, HS>(v_s, nullptr, q_g + 2 * C, ld, k0, T, hs);
    int row_j[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};  // the keys of this thread's D rows
    float dk[HS / 8][4], dv[HS / 8][4];
    for (int nt = 0; nt < HS / 8; nt++) {
        for (int e = 0; e < 4; e++) { dk[nt][e] = 0.0f; dv[nt][e] = 0.0f; }
    }
    // query tiles from the one holding query k0 (BK is a multiple of BQ, so it starts at k0)
    int num_q_tiles = (T + BQ - 1) / BQ;
    for (int qtile = k0 / BQ; qtile < num_q_tiles; qtile++) {
        int q0 = qtile * BQ;
        __syncthreads();  // the previous tile's q, dO, lse, D are no longer read
        attention_load_tile_bf16<BQ, HS>(q_s, qt_s, q_g, ld, q0, T, hs);
        attention_load_tile_bf16<BQ, HS>(do_s, dot_s, do_g, C, q0, T, hs);
        for (int r = threadIdx.x; r < BQ; r += blockDim.x) {
            int i = q0 + r;
            lse_s[r] = i < T ? lse_g[i] * LOG2E_F : 0.0f;
            dsum_s[r] = i < T ? dsum_g[i] : 0.0f;
        }
        __syncthreads();
        // S^T (16 keys x BQ queries) = K Q^T and dP^T = V dO^T
        float st[BQ / 8][4], dpt[BQ / 8][4];
        for (int nt = 0; nt < BQ / 8; nt++) {
            for (int e = 0; e < 4; e++) { st[nt][e] = 0.0f; dpt[nt][e] = 0.0f; }
        }
        for (int ks = 0; ks < HS / 16; ks++) {
            uint32_t k_frag[4], v_frag[4];
            load_a_fragment(k_frag, k_s, LDS, warp * 16, ks * 16);
            load_a_fragment(v_frag, v_s, LDS, warp * 16, ks * 16);
            for (int nt = 0; nt < BQ / 8; nt++) {
                uint32_t b_frag[2];
                load_b_fragment(b_frag, q_s, LDS, nt * 8, ks * 16);
                mma_bf16_m16n8k16(st[nt], k_frag, b_frag);
                load_b_fragment(b_frag, do_s, LDS, nt * 8, ks * 16);
                mma_bf16_m16n8k16(dpt[nt], v_frag, b_frag);
            }
        }
        // P^T and dS^T = P^T (dP^T - D), in place
        for (int nt = 0; nt < BQ / 8; nt++) {
            for (int e = 0; e < 4; e++) {
                int col = nt * 8 + 2 * c + (e & 1), i = q0 + col;
                bool valid = i >= row_j[e / 2] && i < T;  // then also j < T
                float p = valid ? exp2f(st[nt][e] * scale_log2 - lse_s[col]) : 0.0f;
                st[nt][e] = p;
                dpt[nt][e] = valid ? p * (dpt[nt][e] - dsum_s[col]) : 0.0f;
            }
        }
        // dV (16 x HS) += P^T (16 x BQ) dO (BQ x HS);  dK += dS^T Q
        for (int kk = 0; kk < BQ / 16; kk++) {
            uint32_t p_frag[4], ds_frag[4];
            pack_a_from_accumulators(p_frag, st[2 * kk], st[2 * kk + 1]);
            pack_a_from_accumulators(ds_frag, dpt[2 * kk], dpt[2 * kk + 1]);
            for (int nt = 0; nt < HS / 8; nt++) {
                uint32_t b_frag[2];
                load_b_fragment(b_frag, dot_s, LDT, nt * 8, kk * 16);
                mma_bf16_m16n8k16(dv[nt], p_frag, b_frag);
                load_b_fragment(b_frag, qt_s, LDT, nt * 8, kk * 16);
                mma_bf16_m16n8k16(dk[nt], ds_frag, b_frag);
            }
        }
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
// BK = BQ-of-the-dK/dV-kernel keys that it sees. dqkv (B, T, 3C): writes the q third.
// grid (ceil(T/64), B*NH), 128 threads; the longest query tiles start first.
// shared memory: q, dO (64, HS+8), k, v (BK, HS+8), k transposed (HS, BK+8) bf16
template <int HS>
__global__ void __launch_bounds__(ATT_MMA_WARPS * WARP_SIZE)
    attention_backward_dq_mma_plain_kernel(__nv_bfloat16* dqkv, const float* dsum, const __nv_bfloat16* dout, const __nv_bfloat16* qkv,
                                     const float* lse, int T, int C, int NH) {
    constexpr int BQ = ATT_MMA_ROWS, BK = AttentionMmaBackward<HS>::BQ, LDS = HS + 8, LDT = BK + 8;
    extern __shared__ __align__(16) unsigned char att_mma_smem[];
    __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(att_mma_smem);
    __nv_bfloat16* do_s = q_s + BQ * LDS;
    __nv_bfloat16* k_s = do_s + BQ * LDS;
    __nv_bfloat16* kt_s = k_s + BK * LDS;
    __nv_bfloat16* v_s = kt_s + HS * LDT;
    int hs = C / NH;
    int qt = gridDim.x - 1 - blockIdx.x;
    int b = blockIdx.y / NH, h = blockIdx.y % NH;
    int q0 = qt * BQ;
    size_t ld = 3 * (size_t)C;
    const __nv_bfloat16* q_g = qkv + (size_t)b * T * ld + h * hs;
    int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, g = lane / 4, c = lane % 4;
    float scale = 1.0f / sqrtf((float)hs), scale_log2 = scale * LOG2E_F;

    attention_load_tile_bf16<BQ, HS>(q_s, nullptr, q_g, ld, q0, T, hs);
    attention_load_tile_bf16<BQ, HS>(do_s, nullptr, dout + (size_t)b * T * C + h * hs, C, q0, T, hs);
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
        int k0 = kt * BK;
        __syncthreads();  // the previous tile's k, v are no longer read (and q, dO are written)
        attention_load_tile_bf16<BK, HS>(k_s, kt_s, q_g + C, ld, k0, T, hs);
        attention_load_tile_bf16<BK, HS>(v_s, nullptr, q_g + 2 * C, ld, k0, T, hs);
        __syncthreads();
        // S (16 x BK) = Q K^T and dP = dO V^T
        float s[BK / 8][4], dp[BK / 8][4];
        for (int nt = 0; nt < BK / 8; nt++) {
            for (int e = 0; e < 4; e++) { s[nt][e] = 0.0f; dp[nt][e] = 0.0f; }
        }
        for (int ks = 0; ks < HS / 16; ks++) {
            uint32_t q_frag[4], do_frag[4];
            load_a_fragment(q_frag, q_s, LDS, warp * 16, ks * 16);
            load_a_fragment(do_frag, do_s, LDS, warp * 16, ks * 16);
            for (int nt = 0; nt < BK / 8; nt++) {
                uint32_t b_frag[2];
                load_b_fragment(b_frag, k_s, LDS, nt * 8, ks * 16);
                mma_bf16_m16n8k16(s[nt], q_frag, b_frag);
                load_b_fragment(b_frag, v_s, LDS, nt * 8, ks * 16);
                mma_bf16_m16n8k16(dp[nt], do_frag, b_frag);
            }
        }
        // dS = P (dP - D), into s
        for (int nt = 0; nt < BK / 8; nt++) {
            for (int e = 0; e < 4; e++) {
                int j = k0 + nt * 8 + 2 * c + (e & 1), r = e / 2;
                bool valid = j <= row_i[r] && row_i[r] < T;  // then also j < T
                float p = valid ? exp2f(s[nt][e] * scale_log2 - row_lse[r]) : 0.0f;
                s[nt][e] = valid ? p * (dp[nt][e] - row_dsum[r]) : 0.0f;
            }
        }
        // dQ (16 x HS) += dS (16 x BK) K (BK x HS)
        for (int kk = 0; kk < BK / 16; kk++) {
            uint32_t ds_frag[4];
            pack_a_from_accumulators(ds_frag, s[2 * kk], s[2 * kk + 1]);
            for (int nt = 0; nt < HS / 8; nt++) {
                uint32_t b_frag[2];
                load_b_fragment(b_frag, kt_s, LDT, nt * 8, kk * 16);
                mma_bf16_m16n8k16(dq[nt], ds_frag, b_frag);
            }
        }
    }
    for (int r = 0; r < 2; r++) {
        int i = row_i[r];
        if (i >= T) { continue; }
        __nv_bfloat16* dq_g = dqkv + ((size_t)b * T + i) * ld + h * hs;
        for (int nt = 0; nt < HS / 8; nt++) {
            int d = nt * 8 + 2 * c;
            if (d < hs) { *reinterpret_cast<__nv_bfloat162*>(dq_g + d) = __floats2bfloat162_rn(scale * dq[nt][2 * r], scale * dq[nt][2 * r + 1]); }
        }
    }
}

#if !defined(ENABLE_FP32)
template <int HS>
static void attention_forward_v2_launch(floatX* out, float* lse, const floatX* qkv, int B, int T, int C, int NH) {
    constexpr int R = ATT_MMA_ROWS, LDS = HS + 8, LDT = R + 8;
    size_t smem = (size_t)(2 * R * LDS + HS * LDT) * sizeof(floatX);  // q, k (R, LDS), v transposed (HS, LDT)
    allow_dynamic_smem(attention_forward_mma_plain_kernel<HS>, smem, ATT_SMEM_WHAT("forward, mma plain"));
    attention_forward_mma_plain_kernel<HS><<<dim3(ceil_div_int(T, R), B * NH), ATT_MMA_WARPS * WARP_SIZE, smem>>>(out, lse, qkv, T, C, NH);
    cudaCheckLaunch();
}

template <int HS>
static void attention_backward_v2_launch(floatX* dqkv, const float* dsum, const floatX* dout, const floatX* qkv, const float* lse, int B,
                                         int T, int C, int NH) {
    constexpr int R = ATT_MMA_ROWS, BQ = AttentionMmaBackward<HS>::BQ, LDS = HS + 8, LDT = BQ + 8;
    dim3 grid(ceil_div_int(T, R), B * NH);
    // dK, dV: k, v (R, LDS); q, dO (BQ, LDS) and transposed (HS, LDT); lse, D (BQ) fp32
    size_t smem_dkdv = (size_t)(2 * R * LDS + 2 * BQ * LDS + 2 * HS * LDT) * sizeof(floatX) + 2 * BQ * sizeof(float);
    allow_dynamic_smem(attention_backward_dkdv_mma_plain_kernel<HS>, smem_dkdv, ATT_SMEM_WHAT("backward dK dV, mma plain"));
    attention_backward_dkdv_mma_plain_kernel<HS><<<grid, ATT_MMA_WARPS * WARP_SIZE, smem_dkdv>>>(dqkv, dsum, dout, qkv, lse, T, C, NH);
    cudaCheckLaunch();
    // dQ: q, dO (R, LDS); k, v (BQ, LDS); k transposed (HS, LDT)
    size_t smem_dq = (size_t)(2 * R * LDS + 2 * BQ * LDS + HS * LDT) * sizeof(floatX);
    allow_dynamic_smem(attention_backward_dq_mma_plain_kernel<HS>, smem_dq, ATT_SMEM_WHAT("backward dQ, mma plain"));
    attention_backward_dq_mma_plain_kernel<HS><<<grid, ATT_MMA_WARPS * WARP_SIZE, smem_dq>>>(dqkv, dsum, dout, qkv, lse, T, C, NH);
    cudaCheckLaunch();
}

static void attention_forward_v2(floatX* out, float* lse, const floatX* qkv, int B, int T, int C, int NH) {
    attention_check_shape("attention_forward_v2", B, T, C, NH);
    switch (attention_mma_head_size(C / NH)) {
        case 16: attention_forward_v2_launch<16>(out, lse, qkv, B, T, C, NH); break;
        case 32: attention_forward_v2_launch<32>(out, lse, qkv, B, T, C, NH); break;
        case 64: attention_forward_v2_launch<64>(out, lse, qkv, B, T, C, NH); break;
        default: attention_forward_v2_launch<128>(out, lse, qkv, B, T, C, NH); break;
    }
}

static void attention_backward_v2(floatX* dqkv, float* scratch, const floatX* dout, const floatX* qkv, const floatX* out, const float* lse,
                                  int B, int T, int C, int NH) {
    attention_check_shape("attention_backward_v2", B, T, C, NH);
    attention_backward_dsum(scratch, dout, out, B, T, C, NH, 0);
    switch (attention_mma_head_size(C / NH)) {
        case 16: attention_backward_v2_launch<16>(dqkv, scratch, dout, qkv, lse, B, T, C, NH); break;
        case 32: attention_backward_v2_launch<32>(dqkv, scratch, dout, qkv, lse, B, T, C, NH); break;
        case 64: attention_backward_v2_launch<64>(dqkv, scratch, dout, qkv, lse, B, T, C, NH); break;
        default: attention_backward_v2_launch<128>(dqkv, scratch, dout, qkv, lse, B, T, C, NH); break;
    }
}
#endif

static bool version_applies(int version, const floatX* qkv, const floatX* out, const floatX* dqkv, int C, int NH) {
#if defined(ENABLE_FP32)
    (void)qkv; (void)out; (void)dqkv; (void)C; (void)NH;
    return version == 1;
#else
    return version == 1 || ((version == 2 || version == 3) && attention_mma_applies(qkv, out, dqkv, C, NH));
#endif
}

static void attention_forward_version(int version, floatX* out, float* lse, const floatX* qkv, int B, int T, int C, int NH) {
    switch (version) {
        case 1: attention_forward_tiled(out, lse, qkv, B, T, C, NH, 0); break;
#if !defined(ENABLE_FP32)
        case 2: attention_forward_v2(out, lse, qkv, B, T, C, NH); break;
        case 3: attention_forward_mma(out, lse, qkv, B, T, C, NH, 0); break;
#endif
        default: die("attention: no forward version %d", version);
    }
}

static void attention_backward_version(int version, floatX* dqkv, float* scratch, const floatX* dout, const floatX* qkv,
                                       const floatX* out, const float* lse, int B, int T, int C, int NH) {
    switch (version) {
        case 1: attention_backward_tiled(dqkv, scratch, dout, qkv, out, lse, B, T, C, NH, 0); break;
#if !defined(ENABLE_FP32)
        case 2: attention_backward_v2(dqkv, scratch, dout, qkv, out, lse, B, T, C, NH); break;
        case 3: attention_backward_mma(dqkv, scratch, dout, qkv, out, lse, B, T, C, NH, 0); break;
#endif
        default: die("attention: no backward version %d", version);
    }
}

// lse (B, NH, T): log sum_{j<=t} exp(q_t . k_j / sqrt(hs)), in double
static std::vector<float> cpu_attention_lse(const std::vector<float>& qkv, int B, int T, int C, int NH) {
    int hs = C / NH;
    double scale = 1.0 / sqrt((double)hs);
    std::vector<float> lse((size_t)B * NH * T);
    std::vector<double> s(T);
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                const float* q = &qkv[((size_t)b * T + t) * 3 * C + h * hs];
                double mx = -INFINITY;
                for (int j = 0; j <= t; j++) {
                    const float* k = &qkv[((size_t)b * T + j) * 3 * C + C + h * hs];
                    double dot = 0.0;
                    for (int d = 0; d < hs; d++) { dot += (double)q[d] * k[d]; }
                    s[j] = dot * scale;
                    mx = std::max(mx, s[j]);
                }
                double sum = 0.0;
                for (int j = 0; j <= t; j++) { sum += exp(s[j] - mx); }
                lse[((size_t)b * NH + h) * T + t] = (float)(mx + log(sum));
            }
        }
    }
    return lse;
}

struct Shape {
    const char* name;
    int B, T, C, NH;
};

// validates every version (or only `only`) on one shape against the CPU twin
static void validate_shape(const Shape& sh, int only) {
    int B = sh.B, T = sh.T, C = sh.C, NH = sh.NH;
    size_t n_qkv = (size_t)B * T * 3 * C, n_out = (size_t)B * T * C, n_lse = (size_t)B * NH * T;
    std::vector<float> qkv = round_to_floatX(random_vector(n_qkv, 1000 + T));
    std::vector<float> dout = round_to_floatX(random_vector(n_out, 2000 + T));

    // the CPU twin: forward (with its T x T probabilities), lse, backward into a zeroed dqkv
    std::vector<float> out_ref(n_out), att((size_t)B * NH * T * T), dqkv_ref(n_qkv, 0.0f);
    cpu::attention_forward(out_ref.data(), att.data(), qkv.data(), B, T, C, NH);
    cpu::attention_backward(dqkv_ref.data(), dout.data(), qkv.data(), att.data(), B, T, C, NH);
    std::vector<float> lse_ref = cpu_attention_lse(qkv, B, T, C, NH);

    floatX* d_qkv = to_device<floatX>(qkv);
    floatX* d_dout = to_device<floatX>(dout);
    floatX* d_out = cuda_malloc<floatX>(n_out);
    floatX* d_dqkv = cuda_malloc<floatX>(n_qkv);
    float* d_lse = cuda_malloc<float>(n_lse);
    float* d_scratch = cuda_malloc<float>(attention_backward_scratch_floats(B, T, NH));
    char shape[128];
    snprintf(shape, sizeof(shape), "%s B=%d T=%d C=%d NH=%d hs=%d", sh.name, B, T, C, NH, C / NH);
    for (int version = 1; version <= NUM_VERSIONS; version++) {
        if (only != 0 && version != only) { continue; }
        char name[256];
        if (!version_applies(version, d_qkv, d_out, d_dqkv, C, NH)) {
            printf("SKIP version %d [%s]: not built for this precision or head size\n", version, shape);
            continue;
        }
        cudaCheck(cudaMemset(d_out, 0xff, n_out * sizeof(floatX)));  // NaN where nothing is written
        cudaCheck(cudaMemset(d_lse, 0xff, n_lse * sizeof(float)));
        attention_forward_version(version, d_out, d_lse, d_qkv, B, T, C, NH);
        cudaCheck(cudaDeviceSynchronize());
        snprintf(name, sizeof(name), "attention_forward out v%d [%s]", version, shape);
        check_close(name, to_host(d_out, n_out), out_ref, 1e-5, 2e-2);
        snprintf(name, sizeof(name), "attention_forward lse v%d [%s]", version, shape);
        check_close(name, to_host(d_lse, n_lse), lse_ref, 1e-5, 1e-4);

        std::vector<float> runs[2];
        for (int run = 0; run < 2; run++) {
            cudaCheck(cudaMemset(d_dqkv, 0xff, n_qkv * sizeof(floatX)));
            cudaCheck(cudaMemset(d_scratch, 0xff, attention_backward_scratch_floats(B, T, NH) * sizeof(float)));
            attention_backward_version(version, d_dqkv, d_scratch, d_dout, d_qkv, d_out, d_lse, B, T, C, NH);
            cudaCheck(cudaDeviceSynchronize());
            runs[run] = to_host(d_dqkv, n_qkv);
        }
        snprintf(name, sizeof(name), "attention_backward dqkv v%d [%s]", version, shape);
        check_close(name, runs[0], dqkv_ref, 1e-5, 2e-2);
        snprintf(name, sizeof(name), "attention_backward deterministic v%d [%s]", version, shape);
        check_true(name, memcmp(runs[0].data(), runs[1].data(), n_qkv * sizeof(float)) == 0, "two runs bit-identical");
    }
    cudaCheck(cudaFree(d_qkv));
    cudaCheck(cudaFree(d_dout));
    cudaCheck(cudaFree(d_out));
    cudaCheck(cudaFree(d_dqkv));
    cudaCheck(cudaFree(d_lse));
    cudaCheck(cudaFree(d_scratch));
}

// times every version at GPT-2 124M's shape
static void benchmark(int only) {
    int B = 8, T = 1024, C = 768, NH = 12, hs = C / NH;
    size_t n_qkv = (size_t)B * T * 3 * C, n_out = (size_t)B * T * C;
    floatX* d_qkv = to_device<floatX>(random_vector(n_qkv, 3000));
    floatX* d_dout = to_device<floatX>(random_vector(n_out, 4000));
    floatX* d_out = cuda_malloc<floatX>(n_out);
    floatX* d_dqkv = cuda_malloc<floatX>(n_qkv);
    float* d_lse = cuda_malloc<float>((size_t)B * NH * T);
    float* d_scratch = cuda_malloc<float>(attention_backward_scratch_floats(B, T, NH));
    double fwd_flops = 2.0 * 2.0 * B * NH * ((double)T * T / 2.0) * hs;
    double bwd_flops = 2.5 * fwd_flops;
    printf("timing at B=%d T=%d C=%d NH=%d (%s); FLOPs counted: forward 2*2*B*NH*(T^2/2)*hs = %.2f GFLOP, backward 2.5x = %.2f GFLOP\n",
           B, T, C, NH, PRECISION_NAME, fwd_flops * 1e-9, bwd_flops * 1e-9);
    printf("speed of light on H100 SXM: 989 TFLOP/s dense bf16 on tensor cores, 67 TFLOP/s fp32 on CUDA cores\n");
    for (int version = 1; version <= NUM_VERSIONS; version++) {
        if (only != 0 && version != only) { continue; }
        if (!version_applies(version, d_qkv, d_out, d_dqkv, C, NH)) { continue; }
        double peak = version == 1 ? 67.0 : 989.0;
        const char* peak_name = version == 1 ? "fp32 CUDA-core peak" : "bf16 tensor peak";
        float fwd_ms = benchmark_ms(20, [&]() { attention_forward_version(version, d_out, d_lse, d_qkv, B, T, C, NH); });
        float bwd_ms = benchmark_ms(20, [&]() {
            attention_backward_version(version, d_dqkv, d_scratch, d_dout, d_qkv, d_out, d_lse, B, T, C, NH);
        });
        double fwd_tflops = fwd_flops / (fwd_ms * 1e-3) * 1e-12, bwd_tflops = bwd_flops / (bwd_ms * 1e-3) * 1e-12;
        printf("version %d forward:  %8.3f ms, %6.1f TFLOP/s, %5.1f%% of the %s\n", version, fwd_ms, fwd_tflops, 100.0 * fwd_tflops / peak,
               peak_name);
        printf("version %d backward: %8.3f ms, %6.1f TFLOP/s, %5.1f%% of the %s\n", version, bwd_ms, bwd_tflops, 100.0 * bwd_tflops / peak,
               peak_name);
    }
    cudaCheck(cudaFree(d_qkv));
    cudaCheck(cudaFree(d_dout));
    cudaCheck(cudaFree(d_out));
    cudaCheck(cudaFree(d_dqkv));
    cudaCheck(cudaFree(d_lse));
    cudaCheck(cudaFree(d_scratch));
}

int main(int argc, char** argv) {
    bool quick;
    int only = study_start(argc, argv, "attention", NUM_VERSIONS, &quick);
    const Shape shapes[] = {
        {"tiny", 2, 7, 32, 4},          // hs 8: version 2 pads to 16
        {"one token", 2, 1, 64, 2},     // T = 1
        {"hs 16", 2, 65, 64, 4},        // T one past a tile
        {"odd", 3, 100, 96, 2},         // hs 48: version 2 pads to 64
        {"wide heads", 2, 130, 256, 2}, // hs 128
        {"hs 12", 2, 40, 36, 3},        // hs not a multiple of 8: version 1 only
        {"GPT-2 124M", 1, 1024, 768, 12},
    };
    for (const Shape& sh : shapes) {
        if (!quick || sh.T <= 130) { validate_shape(sh, only); }
    }
    if (!quick) { benchmark(only); }
    printf("%d failures\n", dev_failures);
    return dev_failures;
}
