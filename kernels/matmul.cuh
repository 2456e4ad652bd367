/*
The dense matmuls, through cuBLASLt: out (N, OC) = inp (N, C) @ weight^T + bias, with weight
(OC, C) row-major as in llm.c, the bias added in cuBLASLt's epilogue; and the backward,
dinp = dout @ weight, dweight += dout^T @ inp (fp32 gradients from floatX operands), dbias +=
the column sums of dout (our own deterministic kernels: partial sums over blocks of 64 rows,
then column_sums of reduce.cuh over the blocks).

cuBLASLt is column-major. A row-major (R, K) matrix is the column-major (K, R) matrix with the
same bytes, so, writing X' for the column-major view of X:
    forward  out' (OC x N) = weight'^T (OC x C) . inp' (C x N)        m=OC n=N  k=C
    dinp     dinp' (C x N) = weight' (C x OC) . dout' (OC x N)        m=C  n=N  k=OC
    dweight  dweight' (C x OC) += inp' (C x N) . dout'^T (N x OC)     m=C  n=OC k=N
Compute is fp32 (CUBLAS_COMPUTE_32F; never TF32), so the FP32 build is exact fp32 math.

Alignment: cuBLASLt's heuristic assumes 256-byte aligned operands unless told otherwise, and its
bias epilogue needs a 16-byte aligned bias. The parameters live in one buffer, so a bias sits at
l * 3C elements (qkv) or l * C: with C not a multiple of 8 in bf16 (of 4 in fp32) it is not
16-byte aligned. So every call states each operand's real alignment, and matmul_forward adds a
misaligned bias with its own kernel instead of the epilogue.

Where cuBLASLt's heuristic has no algorithm with the bias epilogue for a problem (it answers
CUBLAS_STATUS_NOT_SUPPORTED, or finds none: it depends on the library version, the GPU and the
alignments), the matmul runs without it and add_bias_kernel adds the bias: one more pass over
the output, and a note on stderr, once for each such problem. In FP32 the result is the same
bits (the epilogue also adds the fp32 bias to the fp32 sum); in BF16 the bias is added to the
rounded product, one more rounding.
*/
#pragma once

#include "common.cuh"
#include "reduce.cuh"

#if defined(ENABLE_FP32)
static const cudaDataType_t CUDA_FLOATX = CUDA_R_32F;
#else
static const cudaDataType_t CUDA_FLOATX = CUDA_R_16BF;
#endif

#define CUBLASLT_WORKSPACE_BYTES (32 << 20)
#define BIAS_ROWS_PER_BLOCK 64

static cublasLtHandle_t cublaslt_handle;
static void* cublaslt_workspace = NULL;

// cublasLtMatmulAlgoGetHeuristic costs the host some tens of microseconds, about what a matmul of a
// small batch costs the GPU: asked for each of a step's matmuls (12 per GPT-2 layer and step), it
// could leave the GPU waiting on the host. Its answer depends only on the problem (shape, leading
// dimensions, transposes, epilogue, output type) and on the operands' alignment (C is D), so it
// is asked once for each such key, a few dozen in a run, and kept.
struct MatmulKey {
    int v[13];  // m n k lda ldb ldd trans_a trans_b bias d_type, alignment of A B D
};
struct MatmulAlgo {
    MatmulKey key;
    cublasLtMatmulHeuristicResult_t heuristic;
    bool bias_in_epilogue;  // false: asked with a bias, there was no algorithm with the epilogue
};
static std::vector<MatmulAlgo> matmul_algos;

static const MatmulAlgo* matmul_algo_find(const MatmulKey& key) {
    for (const MatmulAlgo& a : matmul_algos) {
        if (memcmp(a.key.v, key.v, sizeof(key.v)) == 0) { return &a; }
    }
    return NULL;
}

// ----------------------------------------------------------------------------
// CUDA kernels

// partial column sums of dout (N, OC) over BIAS_ROWS_PER_BLOCK rows: partials (blocks, OC). The
// row blocks are gridDim.x (up to 2^31 - 1; gridDim.y would stop at 65535 x 64 rows).
__global__ void column_partials_kernel(float* partials, const floatX* dout, int N, int OC) {
    int first = blockIdx.x * BIAS_ROWS_PER_BLOCK, last = min(first + BIAS_ROWS_PER_BLOCK, N);
    int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= OC) { return; }
    float s = 0.0f;
    for (int i = first; i < last; i++) { s += to_float(dout[(size_t)i * OC + j]); }
    partials[(size_t)blockIdx.x * OC + j] = s;
}

// out (N, OC) += bias (OC), for a bias the epilogue cannot take
__global__ void add_bias_kernel(floatX* out, const floatX* bias, int N, int OC) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * OC) { return; }
    out[i] = from_float<floatX>(to_float(out[i]) + to_float(bias[i % OC]));
}

// ----------------------------------------------------------------------------
// kernel launchers

static void matmul_setup() {
    cublasCheck(cublasLtCreate(&cublaslt_handle));
    cudaCheck(cudaMalloc(&cublaslt_workspace, CUBLASLT_WORKSPACE_BYTES));
}

static void matmul_teardown() {
    matmul_algos.clear();
    cudaCheck(cudaFree(cublaslt_workspace));
    cublasCheck(cublasLtDestroy(cublaslt_handle));
}

// the largest power of two up to 256 that divides the address: what cuBLASLt may assume of it
static uint32_t pointer_alignment(const void* p) {
    uint32_t align = 256;
    while (align > 1 && (uintptr_t)p % align != 0) { align /= 2; }
    return align;
}

// the matmul's description: transposes, and the bias epilogue where bias is not NULL
static cublasLtMatmulDesc_t matmul_desc(bool trans_a, bool trans_b, const floatX* bias) {
    cublasLtMatmulDesc_t desc;
    cublasCheck(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
    if (bias) {
        cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    }
    return desc;
}

// cuBLASLt's best algorithm for desc and the layouts, told each operand's real alignment; false
// where it has none (CUBLAS_STATUS_NOT_SUPPORTED, or none found). Any other status is an error.
static bool matmul_heuristic(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a_layout, cublasLtMatrixLayout_t b_layout,
                             cublasLtMatrixLayout_t d_layout, const uint32_t align[4], cublasLtMatmulHeuristicResult_t* result) {
    cublasLtMatmulPreference_t preference;
    cublasCheck(cublasLtMatmulPreferenceCreate(&preference));
    size_t workspace = CUBLASLT_WORKSPACE_BYTES;
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace)));
    const cublasLtMatmulPreferenceAttributes_t align_attribute[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; i++) {
        cublasCheck(cublasLtMatmulPreferenceSetAttribute(preference, align_attribute[i], &align[i], sizeof(align[i])));
    }
    int found = 0;
    cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(cublaslt_handle, desc, a_layout, b_layout, d_layout, d_layout, preference, 1, result, &found);
    cublasCheck(cublasLtMatmulPreferenceDestroy(preference));
    if (status == CUBLAS_STATUS_NOT_SUPPORTED) { return false; }
    cublasCheck(status);
    return found > 0;
}

// D (m x n, column-major, ldd) = op(A) . op(B) [+ beta D] [+ bias (m)], A and B floatX, D of
// d_type. Returns whether the bias was added: false where cuBLASLt has no algorithm with the
// bias epilogue for this problem, and the caller must add it (matmul_forward does).
static bool cublaslt_matmul(void* D, cudaDataType_t d_type, int ldd, const floatX* A, bool trans_a, int lda, const floatX* B,
                            bool trans_b, int ldb, int m, int n, int k, const floatX* bias, float beta, cudaStream_t stream) {
    // the stored shapes: op(A) is m x k, so A is stored k x m when transposed
    cublasLtMatrixLayout_t a_layout, b_layout, d_layout;
    cublasCheck(cublasLtMatrixLayoutCreate(&a_layout, CUDA_FLOATX, trans_a ? k : m, trans_a ? m : k, lda));
    cublasCheck(cublasLtMatrixLayoutCreate(&b_layout, CUDA_FLOATX, trans_b ? n : k, trans_b ? k : n, ldb));
    cublasCheck(cublasLtMatrixLayoutCreate(&d_layout, d_type, m, n, ldd));
    const uint32_t align[4] = {pointer_alignment(A), pointer_alignment(B), pointer_alignment(D), pointer_alignment(D)};  // C is D
    MatmulKey key = {{m, n, k, lda, ldb, ldd, trans_a, trans_b, bias != NULL, (int)d_type, (int)align[0], (int)align[1], (int)align[3]}};
    const MatmulAlgo* algo = matmul_algo_find(key);
    if (!algo) {  // the first matmul of this key: ask the heuristic, with the bias epilogue first where there is a bias
        MatmulAlgo found = {key, {}, bias != NULL};
        cublasLtMatmulDesc_t desc = matmul_desc(trans_a, trans_b, bias);
        bool ok = matmul_heuristic(desc, a_layout, b_layout, d_layout, align, &found.heuristic);
        cublasCheck(cublasLtMatmulDescDestroy(desc));
        if (!ok && bias) {
            found.bias_in_epilogue = false;
            desc = matmul_desc(trans_a, trans_b, NULL);
            ok = matmul_heuristic(desc, a_layout, b_layout, d_layout, align, &found.heuristic);
            cublasCheck(cublasLtMatmulDescDestroy(desc));
            if (ok) {
                fprintf(stderr, "note: cuBLASLt has no algorithm with the bias epilogue for m=%d n=%d k=%d (%s output); adding the bias in a kernel of its own\n",
                        m, n, k, d_type == CUDA_R_32F ? "fp32" : "bf16");
            }
        }
        if (!ok) {
            die("cuBLASLt has no algorithm for m=%d n=%d k=%d (trans %d %d, bias %s, output %s, alignment of A B D %u %u %u bytes)", m, n, k, trans_a,
                trans_b, bias ? "yes" : "no", d_type == CUDA_R_32F ? "fp32" : "bf16", align[0], align[1], align[3]);
        }
        matmul_algos.push_back(found);
        algo = &matmul_algos.back();
    }
    cublasLtMatmulDesc_t desc = matmul_desc(trans_a, trans_b, algo->bias_in_epilogue ? bias : NULL);
    float alpha = 1.0f;
    cublasCheck(cublasLtMatmul(cublaslt_handle, desc, &alpha, A, a_layout, B, b_layout, &beta, D, d_layout, D, d_layout, &algo->heuristic.algo,
                               cublaslt_workspace, CUBLASLT_WORKSPACE_BYTES, stream));
    cublasCheck(cublasLtMatrixLayoutDestroy(a_layout));
    cublasCheck(cublasLtMatrixLayoutDestroy(b_layout));
    cublasCheck(cublasLtMatrixLayoutDestroy(d_layout));
    cublasCheck(cublasLtMatmulDescDestroy(desc));
    return bias == NULL || algo->bias_in_epilogue;
}

// out (N, OC) = inp (N, C) @ weight^T + bias; bias (OC) or NULL
static void matmul_forward(floatX* out, const floatX* inp, const floatX* weight, const floatX* bias, int N, int C, int OC, cudaStream_t stream) {
    const floatX* epilogue_bias = pointer_alignment(bias) >= 16 ? bias : NULL;  // the epilogue needs a 16-byte aligned bias
    bool added = cublaslt_matmul(out, CUDA_FLOATX, OC, weight, true, C, inp, false, C, OC, N, C, epilogue_bias, 0.0f, stream) && epilogue_bias;
    if (bias && !added) {  // misaligned, or no algorithm with the epilogue
        add_bias_kernel<<<(unsigned)ceil_div_int((size_t)N * OC, 256), 256, 0, stream>>>(out, bias, N, OC);
        cudaCheckLaunch();
    }
}

static size_t matmul_backward_scratch_floats(int N, int OC) { return (size_t)ceil_div_int(N, BIAS_ROWS_PER_BLOCK) * OC; }

// dinp (N, C) = dout @ weight (overwritten; NULL: skipped); dweight (OC, C) fp32 += dout^T @ inp;
// dbias (OC) fp32 += column sums of dout (NULL: skipped)
static void matmul_backward(floatX* dinp, float* dweight, float* dbias, float* scratch, const floatX* dout, const floatX* inp,
                            const floatX* weight, int N, int C, int OC, cudaStream_t stream) {
    if (dinp) { cublaslt_matmul(dinp, CUDA_FLOATX, C, weight, false, C, dout, false, OC, C, N, OC, NULL, 0.0f, stream); }
    cublaslt_matmul(dweight, CUDA_R_32F, C, inp, false, C, dout, true, OC, C, OC, N, NULL, 1.0f, stream);
    if (dbias) {
        int blocks = ceil_div_int(N, BIAS_ROWS_PER_BLOCK);
        column_partials_kernel<<<dim3(blocks, ceil_div_int(OC, 256)), 256, 0, stream>>>(scratch, dout, N, OC);
        cudaCheckLaunch();
        column_sums(dbias, scratch, OC, blocks, OC, stream);
    }
}
