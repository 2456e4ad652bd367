/*
Kernel study: the experts' MLPs as grouped GEMMs (kernels/expert_mlp.cuh), checked against the
CPU twin's expert_mlp_forward and expert_mlp_backward and timed against cuBLAS doing the same
GEMMs on one dense matrix.

    make -C dev/cuda PRECISION=BF16      # or PRECISION=FP32; GPU_ARCH=90 to choose
    dev/cuda/bin/BF16/expert_mlp         # every version; `expert_mlp 2` runs version 2 alone
    dev/cuda/bin/BF16/expert_mlp 0 --quick   # the small shapes only, no timing (the CPU emulation)

The routed rows are sorted by expert: expert e owns rows expert_offsets[e] .. expert_offsets[e+1]
(prefix sums written on the device by the routing; the host never reads them). Per expert:
    fch = X W_fc^T + b_fc (rows_e x H), fch_gelu = GELU(fch), out = fch_gelu W_proj^T + b_proj
and the backward. Every product is one of two grouped GEMMs:
    rows_gemm     (rows_e x N) = (rows_e x K) . W_e, the rows vary per expert (4 of the 6 GEMMs)
    weights_gemm  dW_e (M x N) += dY_e^T X_e, the depth (rows_e) varies (the 2 weight gradients)
A block reads expert_offsets to find its expert and rows; the grid is launched for the worst case
(max_rows rows and one partial tile per expert), so the host needs no count.

version 1: CUDA cores, fp32 math. 64 x 64 output tiles, 256 threads of 4 x 4, operands staged
           in shared memory 16 deep, converted to fp32 on the way in. Any shape; FP32 and BF16.
version 2: tensor cores, mma.sync m16n8k16 bf16 -> fp32 (sm_80+), BF16 builds, C and H multiples
           of 8. 128 x 128 output tiles, 8 warps of 64 x 32 (4 x 4 mma tiles, 64 fp32
           accumulators per thread), 32-deep stages copied by cp.async into a second buffer while
           the tensor cores work on the first, fragments by ldmatrix; operands whose k runs down
           the tile's columns in memory (W_e (K x N) in the backward, both operands of
           weights_gemm) are read with ldmatrix.trans, so nothing is ever transposed in memory.
version 3: the six GEMMs on Hopper's wgmma (dev/cuda/wgmma.cuh; BF16 builds for sm_90a, which
           the Makefile makes for GPU_ARCH=90): 128 x 128 tiles of two warpgroups, a ring of 4
           cp.async stages 64 deep, operands staged K-major or MN-major as they lie in memory
           and read with wgmma's transpose bit. Described in doc/kernels.md; not yet run on a GPU.
Version 2 graduated: expert_mlp_forward/backward use it where it applies, version 1 elsewhere.

Checks per shape and version, with an empty expert and partial tiles in every shape (and, in
"deep", for version 3 only, more stages than its ring holds): out, fch, fch_gelu, dinp, and the four weight
gradients against the CPU twin (the gradients start from
random values, so += is checked, not =); the rows past expert_offsets[E] never written (they hold
NaN); two backward runs bit-identical.
Tolerances (max |gpu - cpu| / max |cpu|):
  - FP32 1e-5: the same fp32 math summed in another order (measured in the CPU emulation:
    at most 4e-7);
  - BF16 2e-2: both sides start from the same bf16 values, but the GPU rounds fch, fch_gelu,
    out (forward) and dfch_gelu, dfch, dinp (backward) to bf16, 2^-9 relative each, and the
    rounding of fch moves GELU and its derivative.
Timing at GPT-2 124M's MoE layer: B*T = 8192 tokens, top-2, E = 8 experts holding 16384 rows
unevenly (from 1.5x to 0.5x the mean), C = 768, H = 3072. FLOPs: 2 * rows * C * H per GEMM,
six GEMMs (2 forward, 4 backward). The cuBLAS baseline runs the same six GEMMs on all rows as one
expert (kernels/matmul.cuh: cuBLASLt, bias epilogue in the forward); the design target is 85% of
its rate; the forward's two GEMMs are also summed apart. Bytes per forward GEMM: rows x (K + N)
bf16 + E x N x K bf16 weights, far below the FLOPs at 3.35 TB/s, so the speed of light is the
tensor peak: 989 TFLOP/s dense bf16 on an H100 SXM (16384 rows: 0.47 ms for the six GEMMs, 0.16
ms for the forward's two).
*/
#include <functional>
#include "dev_common.cuh"
#include "../../kernels/matmul.cuh"
#include "../../kernels/expert_mlp.cuh"

#define NUM_VERSIONS 3

// version 3 exists in BF16 builds for sm_90a (the Makefile's GPU_ARCH=90 defines ENABLE_WGMMA; so
// does the CPU emulation)
#if defined(ENABLE_WGMMA) && !defined(ENABLE_FP32)
#define WGMMA_BUILT 1
#include "wgmma.cuh"
#endif

static bool version_applies(int version, int C, int H) {
#if defined(ENABLE_FP32)
    (void)C; (void)H;
    return version == 1;
#else
    if (version == 3) {
#if defined(WGMMA_BUILT)
        return C % 8 == 0 && H % 8 == 0;
#else
        return false;
#endif
    }
    return version == 1 || (version == 2 && C % 8 == 0 && H % 8 == 0);
#endif
}

// ----------------------------------------------------------------------------
// version 3: the six GEMMs on Hopper's wgmma (dev/cuda/wgmma.cuh).
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
#if defined(WGMMA_BUILT)

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
#endif  // WGMMA_BUILT

// rows_gemm and weights_gemm (kernels/expert_mlp.cuh) in any version, 3 included
static void any_rows_gemm(int version, floatX* out, floatX* gelu_out, const floatX* X, const floatX* W, bool w_transposed, const floatX* bias,
                          const int* expert_offsets, int max_rows, int E, int N, int K) {
#if defined(WGMMA_BUILT)
    if (version == 3) {
        dim3 grid(expert_row_tiles(max_rows, E, XW_TILE), ceil_div_int(N, XW_TILE));
        if (w_transposed) {
            allow_dynamic_smem(rows_gemm_wgmma_kernel<true>, XW_SMEM_BYTES, "expert_mlp version 3 (wgmma)");
            rows_gemm_wgmma_kernel<true><<<grid, 256, XW_SMEM_BYTES>>>(out, gelu_out, X, W, bias, expert_offsets, E, N, K);
        } else {
            allow_dynamic_smem(rows_gemm_wgmma_kernel<false>, XW_SMEM_BYTES, "expert_mlp version 3 (wgmma)");
            rows_gemm_wgmma_kernel<false><<<grid, 256, XW_SMEM_BYTES>>>(out, gelu_out, X, W, bias, expert_offsets, E, N, K);
        }
        cudaCheckLaunch();
        return;
    }
#endif
    rows_gemm(version, out, gelu_out, X, W, w_transposed, bias, expert_offsets, max_rows, E, N, K, 0);
}

static void any_weights_gemm(int version, float* dW, const floatX* A, const floatX* B, const int* expert_offsets, int E, int M, int N) {
#if defined(WGMMA_BUILT)
    if (version == 3) {
        allow_dynamic_smem(weights_gemm_wgmma_kernel, XW_SMEM_BYTES, "expert_mlp version 3 (wgmma)");
        weights_gemm_wgmma_kernel<<<dim3(ceil_div_int(N, XW_TILE), ceil_div_int(M, XW_TILE), E), 256, XW_SMEM_BYTES>>>(dW, A, B, expert_offsets,
                                                                                                                    M, N);
        cudaCheckLaunch();
        return;
    }
#endif
    weights_gemm(version, dW, A, B, expert_offsets, E, M, N, 0);
}

// the study's forward and backward: versions 1 and 2 as the engine runs them
// (expert_mlp_forward/backward), version 3 the same sequence with its GEMMs on wgmma
static void forward(int version, floatX* out, floatX* fch, floatX* fch_gelu, const floatX* inp, const int* expert_offsets, int max_rows,
                    const floatX* fcw, const floatX* fcb, const floatX* fcprojw, const floatX* fcprojb, int E, int C, int H) {
    if (version != 3) {
        expert_mlp_forward(out, fch, fch_gelu, inp, expert_offsets, max_rows, fcw, fcb, fcprojw, fcprojb, E, C, H, 0, version);
        return;
    }
    any_rows_gemm(3, fch, fch_gelu, inp, fcw, true, fcb, expert_offsets, max_rows, E, H, C);
    any_rows_gemm(3, out, NULL, fch_gelu, fcprojw, true, fcprojb, expert_offsets, max_rows, E, C, H);
}

static void backward(int version, floatX* dinp, float* dfcw, float* dfcb, float* dfcprojw, float* dfcprojb, floatX* dfch, floatX* dfch_gelu,
                     const floatX* dout, const floatX* inp, const floatX* fch, const floatX* fch_gelu, const int* expert_offsets, int max_rows,
                     const floatX* fcw, const floatX* fcprojw, int E, int C, int H) {
    if (version != 3) {
        expert_mlp_backward(dinp, dfcw, dfcb, dfcprojw, dfcprojb, dfch, dfch_gelu, dout, inp, fch, fch_gelu, expert_offsets, max_rows, fcw,
                            fcprojw, E, C, H, 0, version);
        return;
    }
    any_rows_gemm(3, dfch_gelu, NULL, dout, fcprojw, false, NULL, expert_offsets, max_rows, E, H, C);
    any_weights_gemm(3, dfcprojw, dout, fch_gelu, expert_offsets, E, C, H);
    expert_bias_grad_kernel<<<dim3(ceil_div_int(C, COLUMN_SUM_COLUMNS), E), dim3(COLUMN_SUM_COLUMNS, COLUMN_SUM_LANES)>>>(dfcprojb, dout,
                                                                                                                       expert_offsets, C);
    cudaCheckLaunch();
    expert_gelu_backward_kernel<<<ceil_div_int((long long)max_rows * H, 256), 256>>>(dfch, fch, dfch_gelu, expert_offsets, E, H);
    cudaCheckLaunch();
    any_rows_gemm(3, dinp, NULL, dfch, fcw, false, NULL, expert_offsets, max_rows, E, C, H);
    any_weights_gemm(3, dfcw, dfch, inp, expert_offsets, E, H, C);
    expert_bias_grad_kernel<<<dim3(ceil_div_int(H, COLUMN_SUM_COLUMNS), E), dim3(COLUMN_SUM_COLUMNS, COLUMN_SUM_LANES)>>>(dfcb, dfch,
                                                                                                                       expert_offsets, H);
    cudaCheckLaunch();
}

struct Shape {
    const char* name;
    int E, C, H;
    std::vector<int> rows_per_expert;  // some zero: an expert nobody chose
    int max_rows;                      // the buffers' rows (>= the sum, as in the engine)
    int first_version = 1;             // the versions it is for: first_version and later
};

// the expert weights and gradients of one layer, host copies (fp32, rounded as floatX holds them)
struct Experts {
    std::vector<float> fcw, fcb, fcprojw, fcprojb;
};

static Experts random_experts(int E, int C, int H, uint64_t seed, float std) {
    Experts x;
    x.fcw = round_to_floatX(random_vector((size_t)E * H * C, seed, std));
    x.fcb = round_to_floatX(random_vector((size_t)E * H, seed + 1, std));
    x.fcprojw = round_to_floatX(random_vector((size_t)E * C * H, seed + 2, std));
    x.fcprojb = round_to_floatX(random_vector((size_t)E * C, seed + 3, std));
    return x;
}

static std::vector<int> offsets_of(const std::vector<int>& rows_per_expert) {
    std::vector<int> offsets(1, 0);
    for (int n : rows_per_expert) { offsets.push_back(offsets.back() + n); }
    return offsets;
}

// whether rows [used, max_rows) of a (max_rows, width) floatX buffer still hold the 0xFF fill
static bool rows_untouched(const floatX* d, int used, int max_rows, int width) {
    size_t bytes = (size_t)(max_rows - used) * width * sizeof(floatX);
    std::vector<unsigned char> host(bytes);
    cudaCheck(cudaMemcpy(host.data(), d + (size_t)used * width, bytes, cudaMemcpyDeviceToHost));
    for (unsigned char b : host) {
        if (b != 0xFF) { return false; }
    }
    return true;
}

static void validate_shape(const Shape& sh, int first, int last) {
    first = std::max(first, sh.first_version);
    bool any = false;
    for (int version = first; version <= last; version++) { any = any || version_applies(version, sh.C, sh.H); }
    if (!any) { return; }
    int E = sh.E, C = sh.C, H = sh.H, max_rows = sh.max_rows;
    std::vector<int> offsets = offsets_of(sh.rows_per_expert);
    int rows = offsets[E];
    Experts w = random_experts(E, C, H, 100 + C, 0.1f);
    Experts grad0 = random_experts(E, C, H, 200 + C, 0.01f);  // the gradients before the backward adds
    std::vector<float> inp = round_to_floatX(random_vector((size_t)rows * C, 300 + C));
    std::vector<float> dout = round_to_floatX(random_vector((size_t)rows * C, 400 + C));

    // the CPU twin
    std::vector<float> out_ref((size_t)rows * C), fch_ref((size_t)rows * H), fch_gelu_ref((size_t)rows * H);
    cpu::expert_mlp_forward(out_ref.data(), fch_ref.data(), fch_gelu_ref.data(), inp.data(), offsets.data(), w.fcw.data(), w.fcb.data(),
                            w.fcprojw.data(), w.fcprojb.data(), E, C, H);
    std::vector<float> dinp_ref((size_t)rows * C, 0.0f), dfch((size_t)rows * H), dfch_gelu((size_t)rows * H);
    Experts grad_ref = grad0;
    cpu::expert_mlp_backward(dinp_ref.data(), grad_ref.fcw.data(), grad_ref.fcb.data(), grad_ref.fcprojw.data(), grad_ref.fcprojb.data(),
                             dfch.data(), dfch_gelu.data(), dout.data(), inp.data(), fch_ref.data(), fch_gelu_ref.data(), offsets.data(),
                             w.fcw.data(), w.fcprojw.data(), E, C, H);

    // the GPU: inputs padded to max_rows rows
    std::vector<float> inp_padded(inp), dout_padded(dout);
    inp_padded.resize((size_t)max_rows * C, 0.0f);
    dout_padded.resize((size_t)max_rows * C, 0.0f);
    floatX* d_inp = to_device<floatX>(inp_padded);
    floatX* d_dout = to_device<floatX>(dout_padded);
    floatX* d_fcw = to_device<floatX>(w.fcw);
    floatX* d_fcb = to_device<floatX>(w.fcb);
    floatX* d_fcprojw = to_device<floatX>(w.fcprojw);
    floatX* d_fcprojb = to_device<floatX>(w.fcprojb);
    int* d_offsets = cuda_malloc<int>(E + 1);
    cudaCheck(cudaMemcpy(d_offsets, offsets.data(), (E + 1) * sizeof(int), cudaMemcpyHostToDevice));
    floatX* d_out = cuda_malloc<floatX>((size_t)max_rows * C);
    floatX* d_fch = cuda_malloc<floatX>((size_t)max_rows * H);
    floatX* d_fch_gelu = cuda_malloc<floatX>((size_t)max_rows * H);
    floatX* d_dinp = cuda_malloc<floatX>((size_t)max_rows * C);
    floatX* d_dfch = cuda_malloc<floatX>((size_t)max_rows * H);
    floatX* d_dfch_gelu = cuda_malloc<floatX>((size_t)max_rows * H);
    float* d_dfcw = cuda_malloc<float>(w.fcw.size());
    float* d_dfcb = cuda_malloc<float>(w.fcb.size());
    float* d_dfcprojw = cuda_malloc<float>(w.fcprojw.size());
    float* d_dfcprojb = cuda_malloc<float>(w.fcprojb.size());

    char shape[160];
    snprintf(shape, sizeof(shape), "%s E=%d C=%d H=%d rows=%d", sh.name, E, C, H, rows);
    for (int version = 1; version <= NUM_VERSIONS; version++) {
        if (version < first || version > last) { continue; }
        if (!version_applies(version, C, H)) {
            printf("SKIP version %d [%s]: not built for this precision, or C, H not multiples of 8\n", version, shape);
            continue;
        }
        char name[256];
        cudaCheck(cudaMemset(d_out, 0xff, (size_t)max_rows * C * sizeof(floatX)));  // NaN where nothing is written
        cudaCheck(cudaMemset(d_fch, 0xff, (size_t)max_rows * H * sizeof(floatX)));
        cudaCheck(cudaMemset(d_fch_gelu, 0xff, (size_t)max_rows * H * sizeof(floatX)));
        forward(version, d_out, d_fch, d_fch_gelu, d_inp, d_offsets, max_rows, d_fcw, d_fcb, d_fcprojw, d_fcprojb, E, C, H);
        cudaCheck(cudaDeviceSynchronize());
        snprintf(name, sizeof(name), "expert_mlp_forward out v%d [%s]", version, shape);
        check_close(name, to_host(d_out, (size_t)rows * C), out_ref, 1e-5, 2e-2);
        snprintf(name, sizeof(name), "expert_mlp_forward fch v%d [%s]", version, shape);
        check_close(name, to_host(d_fch, (size_t)rows * H), fch_ref, 1e-5, 2e-2);
        snprintf(name, sizeof(name), "expert_mlp_forward fch_gelu v%d [%s]", version, shape);
        check_close(name, to_host(d_fch_gelu, (size_t)rows * H), fch_gelu_ref, 1e-5, 2e-2);
        snprintf(name, sizeof(name), "expert_mlp_forward rows past the used ones v%d [%s]", version, shape);
        check_true(name, rows_untouched(d_out, rows, max_rows, C) && rows_untouched(d_fch, rows, max_rows, H),
                   "never written (still NaN)");

        // dinp, then the four weight gradients, which start from grad0: the backward adds to them
        const std::vector<float>* refs[5] = {&dinp_ref, &grad_ref.fcw, &grad_ref.fcb, &grad_ref.fcprojw, &grad_ref.fcprojb};
        const std::vector<float>* starts[4] = {&grad0.fcw, &grad0.fcb, &grad0.fcprojw, &grad0.fcprojb};
        float* d_grads[4] = {d_dfcw, d_dfcb, d_dfcprojw, d_dfcprojb};
        const char* names[5] = {"dinp", "dfcw", "dfcb", "dfcprojw", "dfcprojb"};
        std::vector<float> runs[2];
        for (int run = 0; run < 2; run++) {
            cudaCheck(cudaMemset(d_dinp, 0xff, (size_t)max_rows * C * sizeof(floatX)));
            cudaCheck(cudaMemset(d_dfch, 0xff, (size_t)max_rows * H * sizeof(floatX)));
            cudaCheck(cudaMemset(d_dfch_gelu, 0xff, (size_t)max_rows * H * sizeof(floatX)));
            for (int t = 0; t < 4; t++) {
                cudaCheck(cudaMemcpy(d_grads[t], starts[t]->data(), starts[t]->size() * sizeof(float), cudaMemcpyHostToDevice));
            }
            backward(version, d_dinp, d_dfcw, d_dfcb, d_dfcprojw, d_dfcprojb, d_dfch, d_dfch_gelu, d_dout, d_inp, d_fch, d_fch_gelu, d_offsets,
                     max_rows, d_fcw, d_fcprojw, E, C, H);
            cudaCheck(cudaDeviceSynchronize());
            runs[run] = to_host(d_dinp, (size_t)rows * C);
            for (int t = 0; t < 4; t++) {
                std::vector<float> v = to_host(d_grads[t], starts[t]->size());
                runs[run].insert(runs[run].end(), v.begin(), v.end());
            }
        }
        size_t at = 0;
        for (int t = 0; t < 5; t++) {
            std::vector<float> part(runs[0].begin() + at, runs[0].begin() + at + refs[t]->size());
            at += refs[t]->size();
            snprintf(name, sizeof(name), "expert_mlp_backward %s v%d [%s]", names[t], version, shape);
            check_close(name, part, *refs[t], 1e-5, 2e-2);
        }
        snprintf(name, sizeof(name), "expert_mlp_backward deterministic v%d [%s]", version, shape);
        check_true(name, memcmp(runs[0].data(), runs[1].data(), runs[0].size() * sizeof(float)) == 0, "two runs bit-identical");
    }
    for (void* p : std::initializer_list<void*>{d_inp, d_dout, d_fcw, d_fcb, d_fcprojw, d_fcprojb, d_offsets, d_out, d_fch, d_fch_gelu, d_dinp,
                                                d_dfch, d_dfch_gelu, d_dfcw, d_dfcb, d_dfcprojw, d_dfcprojb}) {
        cudaCheck(cudaFree(p));
    }
}

// The six GEMMs of one MoE layer's forward and backward at GPT-2 124M's shape, versions first..last
// against cuBLAS on the same rows as one dense expert
static void benchmark(int first, int last) {
    const int E = 8, C = 768, H = 3072, tokens = 8 * 1024, k = 2, rows = tokens * k;
    std::vector<int> rows_per_expert(E);  // 1.5x the mean for expert 0 down to 0.5x for expert 7
    int assigned = 0;
    for (int e = 0; e < E; e++) {
        rows_per_expert[e] = e == E - 1 ? rows - assigned : (int)(rows / E * (1.5 - e / (double)(E - 1)));
        assigned += rows_per_expert[e];
    }
    std::vector<int> offsets = offsets_of(rows_per_expert);
    int* d_offsets = cuda_malloc<int>(E + 1);
    cudaCheck(cudaMemcpy(d_offsets, offsets.data(), (E + 1) * sizeof(int), cudaMemcpyHostToDevice));
    floatX* x_c = to_device<floatX>(random_vector((size_t)rows * C, 1, 1.0f));   // (rows, C): inp, dout
    floatX* y_c = cuda_malloc<floatX>((size_t)rows * C);                         // (rows, C): out, dinp
    floatX* x_h = to_device<floatX>(random_vector((size_t)rows * H, 2, 1.0f));   // (rows, H): fch_gelu, dfch
    floatX* y_h = cuda_malloc<floatX>((size_t)rows * H);                         // (rows, H): fch, dfch_gelu
    floatX* g_h = cuda_malloc<floatX>((size_t)rows * H);
    floatX* w_hc = to_device<floatX>(random_vector((size_t)E * H * C, 3, 0.02f));  // fcw (E, H, C)
    floatX* w_ch = to_device<floatX>(random_vector((size_t)E * C * H, 4, 0.02f));  // fcprojw (E, C, H)
    floatX* b_h = to_device<floatX>(random_vector((size_t)E * H, 5, 0.02f));
    floatX* b_c = to_device<floatX>(random_vector((size_t)E * C, 6, 0.02f));
    float* dw = cuda_malloc<float>((size_t)E * H * C);
    cudaCheck(cudaMemset(dw, 0, (size_t)E * H * C * sizeof(float)));
    matmul_setup();
    double gemm_flops = 2.0 * rows * C * H;
    printf("timing: E=%d C=%d H=%d, %d rows (top-%d of %d tokens), experts from %d to %d rows (%s)\n", E, C, H, rows, k, tokens,
           rows_per_expert[0], rows_per_expert[E - 1], PRECISION_NAME);
    printf("FLOPs: 2*rows*C*H = %.1f GFLOP per GEMM, 6 GEMMs; speed of light on an H100 SXM: 989 TFLOP/s dense bf16 (tensor), "
           "67 TFLOP/s fp32 (CUDA cores)\n", gemm_flops * 1e-9);
    struct Gemm {
        const char* name;
        std::function<void(int)> ours;  // version -> launch
        std::function<void()> cublas;
        bool forward;                   // of the forward (the two are also summed apart)
    };
    Gemm gemms[6] = {
        {"fc forward (+bias, GELU)", [&](int v) { any_rows_gemm(v, y_h, g_h, x_c, w_hc, true, b_h, d_offsets, rows, E, H, C); },
         [&]() { matmul_forward(y_h, x_c, w_hc, b_h, rows, C, H, 0); }, true},
        {"fcproj forward (+bias)", [&](int v) { any_rows_gemm(v, y_c, NULL, x_h, w_ch, true, b_c, d_offsets, rows, E, C, H); },
         [&]() { matmul_forward(y_c, x_h, w_ch, b_c, rows, H, C, 0); }, true},
        {"fcproj backward dX", [&](int v) { any_rows_gemm(v, y_h, NULL, x_c, w_ch, false, NULL, d_offsets, rows, E, H, C); },
         [&]() { cublaslt_matmul(y_h, CUDA_FLOATX, H, w_ch, false, H, x_c, false, C, H, rows, C, NULL, 0.0f, 0); }, false},
        {"fcproj backward dW", [&](int v) { any_weights_gemm(v, dw, x_c, x_h, d_offsets, E, C, H); },
         [&]() { cublaslt_matmul(dw, CUDA_R_32F, H, x_h, false, H, x_c, true, C, H, C, rows, NULL, 1.0f, 0); }, false},
        {"fc backward dX", [&](int v) { any_rows_gemm(v, y_c, NULL, x_h, w_hc, false, NULL, d_offsets, rows, E, C, H); },
         [&]() { cublaslt_matmul(y_c, CUDA_FLOATX, C, w_hc, false, C, x_h, false, H, C, rows, H, NULL, 0.0f, 0); }, false},
        {"fc backward dW", [&](int v) { any_weights_gemm(v, dw, x_h, x_c, d_offsets, E, H, C); },
         [&]() { cublaslt_matmul(dw, CUDA_R_32F, C, x_c, false, C, x_h, true, H, C, H, rows, NULL, 1.0f, 0); }, false},
    };
    double total_cublas = 0.0, forward_cublas = 0.0;
    std::vector<double> total(NUM_VERSIONS + 1, 0.0), forward_total(NUM_VERSIONS + 1, 0.0);
    for (const Gemm& gm : gemms) {
        float ms_cublas = benchmark_ms(20, gm.cublas);
        total_cublas += ms_cublas;
        if (gm.forward) { forward_cublas += ms_cublas; }
        printf("%-26s cuBLAS     %7.3f ms %6.1f TFLOP/s\n", gm.name, ms_cublas, gemm_flops / (ms_cublas * 1e-3) * 1e-12);
        for (int version = 1; version <= NUM_VERSIONS; version++) {
            if (version < first || version > last || !version_applies(version, C, H)) { continue; }
            float ms = benchmark_ms(20, [&]() { gm.ours(version); });
            total[version] += ms;
            if (gm.forward) { forward_total[version] += ms; }
            printf("%-26s version %d  %7.3f ms %6.1f TFLOP/s, %5.1f%% of cuBLAS\n", gm.name, version, ms,
                   gemm_flops / (ms * 1e-3) * 1e-12, 100.0 * ms_cublas / ms);
        }
    }
    printf("six GEMMs: cuBLAS %.3f ms (%.1f TFLOP/s)\n", total_cublas, 6 * gemm_flops / (total_cublas * 1e-3) * 1e-12);
    for (int version = 1; version <= NUM_VERSIONS; version++) {
        if (total[version] == 0.0) { continue; }
        printf("six GEMMs: version %d %.3f ms (%.1f TFLOP/s), %.1f%% of cuBLAS's rate (target 85%%)\n", version, total[version],
               6 * gemm_flops / (total[version] * 1e-3) * 1e-12, 100.0 * total_cublas / total[version]);
    }
    for (int version = 1; version <= NUM_VERSIONS; version++) {  // the forward's two GEMMs apart
        if (forward_total[version] == 0.0) { continue; }
        printf("forward's two GEMMs: version %d %.3f ms (%.1f TFLOP/s), %.1f%% of cuBLAS's rate (cuBLAS %.3f ms)\n", version,
               forward_total[version], 2 * gemm_flops / (forward_total[version] * 1e-3) * 1e-12, 100.0 * forward_cublas / forward_total[version],
               forward_cublas);
    }
    matmul_teardown();
    for (void* p : std::initializer_list<void*>{d_offsets, x_c, y_c, x_h, y_h, g_h, w_hc, w_ch, b_h, b_c, dw}) { cudaCheck(cudaFree(p)); }
}

int main(int argc, char** argv) {
    bool quick;
    int only = study_start(argc, argv, "expert_mlp", NUM_VERSIONS, &quick);
    std::vector<Shape> shapes = {
        {"tiny", 4, 32, 128, {37, 0, 133, 30}, 256},              // an empty expert, tiles of 37 and 133 rows
        {"odd", 3, 40, 136, {1, 129, 70}, 210},                   // C, H not multiples of 32: partial stages and columns
        {"C not a multiple of 8", 2, 36, 100, {20, 45}, 80},     // version 1 only
        {"deep", 2, 136, 520, {300, 20}, 384, 3},                 // depths of 9 (H) and 5 (rows) stages of 64: version 3's ring of 4 wraps around
    };
    if (!quick) { shapes.push_back({"GPT-2 124M widths", 8, 768, 3072, {400, 0, 130, 257, 64, 1, 600, 596}, 2304}); }
    // versions 1 and 2 are validated and timed before version 3, the one not yet run on a GPU: a
    // fault of its own (which ends the process) then leaves their figures printed
    std::vector<std::pair<int, int>> passes;
    if (only != 0) { passes.push_back({only, only}); } else { passes = {{1, 2}, {3, 3}}; }
    for (const std::pair<int, int>& pass : passes) {
        for (const Shape& sh : shapes) { validate_shape(sh, pass.first, pass.second); }
        if (!quick) { benchmark(pass.first, pass.second); }
    }
    printf("%d failures\n", dev_failures);
    return dev_failures;
}
