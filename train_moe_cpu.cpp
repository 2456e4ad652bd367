/*
train_moe_cpu: the CPU twin of train_moe.cu. GPT-2 (llm.c's math) with Mixture-of-Experts MLPs
upcycled from a dense checkpoint, trained in plain fp32 C++ with OpenMP.

It is the readable specification of the engine (the GPU kernels are checked against it and
against the PyTorch reference dev/train_moe.py) and the engine that runs where no GPU is.

    make train_moe_cpu
    ./train_moe_cpu -m dense.bin -e 8 -k 2 -o out    # upcycle to 8 experts, top-2, and train
    ./train_moe_cpu -h                              # every option

The file reads top to bottom: the matmul core; the dense layers (forward and backward); the
MoE layer (router, routing, permutation, experts, un-permutation, auxiliary losses, and their
backward); the model (parameters, activations, forward, backward, AdamW); sampling and
validation; the training loop. The routing math is in doc/routing.md, upcycling in
doc/upcycling.md, the file formats in doc/formats.md.

Every parallel loop writes disjoint outputs and sums in a fixed order, so results do not
depend on the number of threads and two runs are bit-identical. Every backward function adds
(+=) into the gradients it produces; callers zero what needs zeroing.
*/
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/checkpoint.h"
#include "common/model_config.h"
#include "common/rng.h"
#include "common/training.h"
#include "common/upcycle.h"
#include "common/utils.h"

// ----------------------------------------------------------------------------
// matmul core

#define GEMM_MR 4    // rows of C per register tile
#define GEMM_NR 32   // columns of C per register tile (2 AVX-512 or 4 AVX2 vectors)
#define GEMM_KC 256  // depth of one pass: a 256 x 32 panel of B stays in the L1/L2 cache

// C (M x N) = [C +] op(A) (M x K) @ B (K x N), row-major. op(A) is A stored (M x K) with row
// stride lda, or, with A_TRANSPOSED, A^T where A is stored (K x M). The depth goes in passes of
// GEMM_KC; within a pass each thread owns whole GEMM_MR x GEMM_NR tiles of C and sums over k
// in order, so the result does not depend on the number of threads.
template <bool A_TRANSPOSED>
static void gemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, bool accumulate) {
    int m_tiles = (M + GEMM_MR - 1) / GEMM_MR;
    int n_tiles = (N + GEMM_NR - 1) / GEMM_NR;
    for (int k0 = 0; k0 < K || k0 == 0; k0 += GEMM_KC) {
        int k1 = std::min(k0 + GEMM_KC, K);
        bool add = accumulate || k0 > 0;
        // column tiles outside, so that consecutive tiles of one thread reuse the same panel of B
        #pragma omp parallel for collapse(2) schedule(static)
        for (int nt = 0; nt < n_tiles; nt++) {
            for (int mt = 0; mt < m_tiles; mt++) {
                int i0 = mt * GEMM_MR, j0 = nt * GEMM_NR;
                int mr = std::min(GEMM_MR, M - i0), nr = std::min(GEMM_NR, N - j0);
                float acc[GEMM_MR][GEMM_NR] = {};
                if (mr == GEMM_MR && nr == GEMM_NR) {
                    for (int k = k0; k < k1; k++) {
                        const float* b = B + (size_t)k * ldb + j0;
                        for (int i = 0; i < GEMM_MR; i++) {
                            float a = A_TRANSPOSED ? A[(size_t)k * lda + i0 + i] : A[(size_t)(i0 + i) * lda + k];
                            for (int j = 0; j < GEMM_NR; j++) { acc[i][j] += a * b[j]; }
                        }
                    }
                } else {
                    for (int k = k0; k < k1; k++) {
                        const float* b = B + (size_t)k * ldb + j0;
                        for (int i = 0; i < mr; i++) {
                            float a = A_TRANSPOSED ? A[(size_t)k * lda + i0 + i] : A[(size_t)(i0 + i) * lda + k];
                            for (int j = 0; j < nr; j++) { acc[i][j] += a * b[j]; }
                        }
                    }
                }
                for (int i = 0; i < mr; i++) {
                    float* c = C + (size_t)(i0 + i) * ldc + j0;
                    for (int j = 0; j < nr; j++) { c[j] = (add ? c[j] : 0.0f) + acc[i][j]; }
                }
            }
        }
    }
}

// out (cols x rows) = inp (rows x cols)^T
static void transpose(float* out, const float* inp, int rows, int cols) {
    const int TILE = 32;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int r0 = 0; r0 < rows; r0 += TILE) {
        for (int c0 = 0; c0 < cols; c0 += TILE) {
            for (int r = r0; r < std::min(r0 + TILE, rows); r++) {
                for (int c = c0; c < std::min(c0 + TILE, cols); c++) { out[(size_t)c * rows + r] = inp[(size_t)r * cols + c]; }
            }
        }
    }
}

// ----------------------------------------------------------------------------
// dense layers: forward and backward (N = B*T tokens)

// out (N, C) = wte[token] + wpe[position]
static void encoder_forward(float* out, const int* inp, const float* wte, const float* wpe, int B, int T, int C) {
    #pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            float* o = out + ((size_t)b * T + t) * C;
            const float* e = wte + (size_t)inp[b * T + t] * C;
            const float* p = wpe + (size_t)t * C;
            for (int c = 0; c < C; c++) { o[c] = e[c] + p[c]; }
        }
    }
}

// Each thread owns a range of channels and walks the tokens in order: rows of dwte that
// several tokens share get their sums in one fixed order.
static void encoder_backward(float* dwte, float* dwpe, const float* dout, const int* inp, int B, int T, int C) {
    const int CHUNK = 64;
    #pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < C; c0 += CHUNK) {
        int c1 = std::min(c0 + CHUNK, C);
        for (int b = 0; b < B; b++) {
            for (int t = 0; t < T; t++) {
                const float* d = dout + ((size_t)b * T + t) * C;
                float* e = dwte + (size_t)inp[b * T + t] * C;
                float* p = dwpe + (size_t)t * C;
                for (int c = c0; c < c1; c++) { e[c] += d[c]; p[c] += d[c]; }
            }
        }
    }
}

// out = (x - mean) * rstd * w + b per row, rstd = 1/sqrt(var + 1e-5)
static void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b, int N, int C) {
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float* x = inp + (size_t)i * C;
        float m = 0.0f;
        for (int c = 0; c < C; c++) { m += x[c]; }
        m /= C;
        float v = 0.0f;
        for (int c = 0; c < C; c++) { float d = x[c] - m; v += d * d; }
        v /= C;
        float s = 1.0f / sqrtf(v + 1e-5f);
        float* o = out + (size_t)i * C;
        for (int c = 0; c < C; c++) { o[c] = (x[c] - m) * s * w[c] + b[c]; }
        mean[i] = m;
        rstd[i] = s;
    }
}

static void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                               const float* mean, const float* rstd, int N, int C) {
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float* x = inp + (size_t)i * C;
        const float* d = dout + (size_t)i * C;
        float m = mean[i], s = rstd[i];
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
        for (int c = 0; c < C; c++) {
            float norm = (x[c] - m) * s;
            float dnorm = w[c] * d[c];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= C;
        dnorm_norm_mean /= C;
        float* di = dinp + (size_t)i * C;
        for (int c = 0; c < C; c++) {
            float norm = (x[c] - m) * s;
            di[c] += s * (w[c] * d[c] - dnorm_mean - norm * dnorm_norm_mean);
        }
    }
    // the weight and bias gradients sum over rows: threads own channels, rows go in order
    const int CHUNK = 64;
    #pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < C; c0 += CHUNK) {
        int c1 = std::min(c0 + CHUNK, C);
        for (int i = 0; i < N; i++) {
            const float* x = inp + (size_t)i * C;
            const float* d = dout + (size_t)i * C;
            for (int c = c0; c < c1; c++) {
                dw[c] += (x[c] - mean[i]) * rstd[i] * d[c];
                db[c] += d[c];
            }
        }
    }
}

// out (N, OC) = inp (N, C) @ weight^T + bias, weight (OC, C), bias (OC) or NULL
static void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int N, int C, int OC) {
    static std::vector<float> weight_t;  // weight transposed to (C, OC): the gemm's B operand
    weight_t.resize((size_t)C * OC);
    transpose(weight_t.data(), weight, OC, C);
    gemm<false>(N, OC, C, inp, C, weight_t.data(), OC, out, OC, false);
    if (bias) {
        #pragma omp parallel for schedule(static)
        for (int i = 0; i < N; i++) {
            float* o = out + (size_t)i * OC;
            for (int j = 0; j < OC; j++) { o[j] += bias[j]; }
        }
    }
}

// dinp (N, C) += dout @ weight; dweight (OC, C) += dout^T @ inp; dbias (OC) += column sums
static void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp, const float* weight,
                            int N, int C, int OC) {
    if (dinp) { gemm<false>(N, C, OC, dout, OC, weight, C, dinp, C, true); }
    gemm<true>(OC, C, N, dout, OC, inp, C, dweight, C, true);
    if (dbias) {
        const int CHUNK = 64;
        #pragma omp parallel for schedule(static)
        for (int j0 = 0; j0 < OC; j0 += CHUNK) {
            int j1 = std::min(j0 + CHUNK, OC);
            for (int i = 0; i < N; i++) {
                const float* d = dout + (size_t)i * OC;
                for (int j = j0; j < j1; j++) { dbias[j] += d[j]; }
            }
        }
    }
}

// Causal self-attention. inp (B, T, 3C) holds q, k, v; head h uses channels h*hs .. h*hs+hs-1
// of each. att (B, NH, T, T) keeps the softmax for the backward; out (B, T, C).
static void attention_forward(float* out, float* att, const float* inp, int B, int T, int C, int NH) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel for collapse(3) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            for (int h = 0; h < NH; h++) {
                const float* q = inp + ((size_t)b * T + t) * 3 * C + h * hs;
                float* a = att + (((size_t)b * NH + h) * T + t) * T;
                float maxval = -INFINITY;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* k = inp + ((size_t)b * T + t2) * 3 * C + C + h * hs;
                    float s = 0.0f;
                    for (int i = 0; i < hs; i++) { s += q[i] * k[i]; }
                    s *= scale;
                    a[t2] = s;
                    maxval = std::max(maxval, s);
                }
                float sum = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) { a[t2] = expf(a[t2] - maxval); sum += a[t2]; }
                float inv = 1.0f / sum;
                for (int t2 = 0; t2 <= t; t2++) { a[t2] *= inv; }
                for (int t2 = t + 1; t2 < T; t2++) { a[t2] = 0.0f; }
                float* o = out + ((size_t)b * T + t) * C + h * hs;
                for (int i = 0; i < hs; i++) { o[i] = 0.0f; }
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* v = inp + ((size_t)b * T + t2) * 3 * C + 2 * C + h * hs;
                    for (int i = 0; i < hs; i++) { o[i] += a[t2] * v[i]; }
                }
            }
        }
    }
}

// dinp (B, T, 3C) += gradient of q, k, v. Threads own (b, h) pairs: within one, queries go in
// order, so the sums into dk and dv of earlier positions have a fixed order.
static void attention_backward(float* dinp, const float* dout, const float* inp, const float* att, int B, int T, int C, int NH) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            std::vector<float> datt(T);
            for (int t = 0; t < T; t++) {
                const float* a = att + (((size_t)b * NH + h) * T + t) * T;
                const float* d = dout + ((size_t)b * T + t) * C + h * hs;
                const float* q = inp + ((size_t)b * T + t) * 3 * C + h * hs;
                float* dq = dinp + ((size_t)b * T + t) * 3 * C + h * hs;
                // d att[t2] = dout . v[t2]; then through the softmax
                float dot = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* v = inp + ((size_t)b * T + t2) * 3 * C + 2 * C + h * hs;
                    float s = 0.0f;
                    for (int i = 0; i < hs; i++) { s += d[i] * v[i]; }
                    datt[t2] = s;
                    dot += a[t2] * s;
                }
                for (int t2 = 0; t2 <= t; t2++) {
                    float dpre = a[t2] * (datt[t2] - dot) * scale;
                    size_t row = ((size_t)b * T + t2) * 3 * C;
                    const float* k = inp + row + C + h * hs;
                    float* dk = dinp + row + C + h * hs;
                    float* dv = dinp + row + 2 * C + h * hs;
                    for (int i = 0; i < hs; i++) {
                        dq[i] += dpre * k[i];
                        dk[i] += dpre * q[i];
                        dv[i] += a[t2] * d[i];
                    }
                }
            }
        }
    }
}

#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)

// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
static void gelu_forward(float* out, const float* inp, size_t n) {
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + 0.044715f * x * x * x)));
    }
}

static void gelu_backward(float* dinp, const float* inp, const float* dout, size_t n) {
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        float u = GELU_SCALE * (x + 0.044715f * x * x * x);
        float th = tanhf(u);
        float sech2 = 1.0f - th * th;
        float grad = 0.5f * (1.0f + th) + 0.5f * x * sech2 * GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] += grad * dout[i];
    }
}

static void residual_forward(float* out, const float* a, const float* b, size_t n) {
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) { out[i] = a[i] + b[i]; }
}

// e^x without a libm call, so that the compiler vectorises the loops that use it (glibc's
// vector expf needs -ffast-math). x = n ln2 + r with |r| <= ln2/2 (Cody-Waite, two parts of
// ln2), e^r by Cephes' degree-6 polynomial, 2^n through the exponent bits. About 1 ulp for the
// softmax arguments it serves (x <= 0; below -87 it returns ~1e-38 instead of underflowing).
static inline float exp_poly(float x) {
    x = std::min(std::max(x, -87.0f), 88.0f);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int bits = ((int)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return y * scale;
}

// max and sum of exp(z - max) over n values, in 16 interleaved lanes combined in a fixed order:
// vectorisable without reassociating floats, and the same result on every run
#define LANES 16
static inline float max_of(const float* z, int n) {
    float lane[LANES];
    for (int l = 0; l < LANES; l++) { lane[l] = -INFINITY; }
    int v = 0;
    for (; v + LANES <= n; v += LANES) {
        for (int l = 0; l < LANES; l++) { lane[l] = std::max(lane[l], z[v + l]); }
    }
    float m = -INFINITY;
    for (int l = 0; l < LANES; l++) { m = std::max(m, lane[l]); }
    for (; v < n; v++) { m = std::max(m, z[v]); }
    return m;
}

static inline float sum_exp(const float* z, int n, float maxval) {
    float lane[LANES] = {};
    int v = 0;
    for (; v + LANES <= n; v += LANES) {
        for (int l = 0; l < LANES; l++) { lane[l] += exp_poly(z[v + l] - maxval); }
    }
    float sum = 0.0f;
    for (int l = 0; l < LANES; l++) { sum += lane[l]; }
    for (; v < n; v++) { sum += exp_poly(z[v] - maxval); }
    return sum;
}

// losses (N) = cross-entropy of logits (N, Vp) against targets. The softmax covers the first V
// columns only (the padding never enters); each row's max and sum of exps are kept for the
// backward in row_max, row_sum (N).
static void classifier_forward(float* losses, float* row_max, float* row_sum, const float* logits, const int* targets, int N, int V, int Vp) {
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float* z = logits + (size_t)i * Vp;
        float maxval = max_of(z, V);
        float sum = sum_exp(z, V, maxval);
        row_max[i] = maxval;
        row_sum[i] = sum;
        losses[i] = logf(sum) + maxval - z[targets[i]];
    }
}

// In place: logits (N, Vp) become dlogits = (softmax - onehot(target)) * dloss, 0 in the padding
static void classifier_backward(float* logits, const float* row_max, const float* row_sum, const int* targets, float dloss,
                                int N, int V, int Vp) {
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        float* z = logits + (size_t)i * Vp;
        float maxval = row_max[i], scale = dloss / row_sum[i];
        for (int v = 0; v < V; v++) { z[v] = exp_poly(z[v] - maxval) * scale; }
        z[targets[i]] -= dloss;
        for (int v = V; v < Vp; v++) { z[v] = 0.0f; }
    }
}

// ----------------------------------------------------------------------------
// the MoE layer (doc/routing.md)

// Who goes where in one MoE layer for one micro-batch. Rows are the (token, expert) pairs
// that an expert processes, laid out expert by expert, in token order within an expert.
struct Routing {
    int num_rows;
    // token choice: token t's j-th choice is entry t*k + j
    int* choice_expert;      // (N*k) expert of the choice, by decreasing score
    float* choice_weight;    // (N*k) combine weight
    int* choice_row;         // (N*k) its row, or -1 where capacity dropped it
    // the rows
    int* tokens_per_expert;  // (E) kept rows of each expert
    int* expert_offsets;     // (E+1) first row of each expert (prefix sum)
    int* row_token;          // (rows) the token of each row
    float* row_weight;       // (rows) its combine weight
    // each token's rows, in combine order (choice order; expert order for expert choice)
    int* token_row_offsets;  // (N+1)
    int* token_rows;         // (rows)
    // statistics of this micro-batch
    int* assignments;        // (E) choices of each expert before dropping
    int num_assignments;
    int num_dropped;
};

// Routing statistics accumulated between two reports
struct RoutingStats {
    std::vector<double> assignments;  // (E)
    double total_assignments, dropped, entropy_sum, tokens;
};

// logits (N, E) = h @ Wr^T; probs = softmax(logits), fp32 always
static void router_forward(float* logits, float* probs, const float* h, const float* routerw, int N, int C, int E) {
    matmul_forward(logits, h, routerw, NULL, N, C, E);
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const float* z = logits + (size_t)t * E;
        float* p = probs + (size_t)t * E;
        float maxval = -INFINITY;
        for (int e = 0; e < E; e++) { maxval = std::max(maxval, z[e]); }
        float sum = 0.0f;
        for (int e = 0; e < E; e++) { p[e] = expf(z[e] - maxval); sum += p[e]; }
        for (int e = 0; e < E; e++) { p[e] /= sum; }
    }
}

// Decides the routing of N tokens (doc/routing.md, section 2) and lays out the rows.
static void route_tokens(Routing* r, const float* logits, const float* probs, const ModelConfig* cfg, int N) {
    int E = cfg->num_experts, k = cfg->top_k;
    std::vector<int> row_expert;  // expert of each row, in the order rows are admitted
    std::vector<int> row_tok;
    std::vector<float> row_w;
    std::vector<int> row_choice;  // token choice: the choice index t*k + j of each row
    for (int e = 0; e < E; e++) { r->assignments[e] = 0; r->tokens_per_expert[e] = 0; }
    r->num_dropped = 0;

    if (cfg->router == ROUTER_TOPK) {
        // top-k by logit, ties to the lower expert index; then the combine weights
        #pragma omp parallel for schedule(static)
        for (int t = 0; t < N; t++) {
            const float* z = logits + (size_t)t * E;
            const float* p = probs + (size_t)t * E;
            int* chosen = r->choice_expert + (size_t)t * k;
            float sum = 0.0f;
            for (int j = 0; j < k; j++) {
                int best = -1;
                for (int e = 0; e < E; e++) {
                    bool taken = false;
                    for (int i = 0; i < j; i++) { taken |= chosen[i] == e; }
                    if (!taken && (best < 0 || z[e] > z[best])) { best = e; }
                }
                chosen[j] = best;
                sum += p[best];
            }
            for (int j = 0; j < k; j++) {
                float pj = p[chosen[j]];
                r->choice_weight[(size_t)t * k + j] = cfg->renorm ? pj / sum : pj;
            }
        }
        // capacity: admit choices slot by slot, in token order or by score within a slot
        int cap = token_choice_capacity(cfg, N);
        std::vector<int> order(N);
        std::vector<char> kept((size_t)N * k, 1);
        if (cap >= 0) {
            std::vector<int> filled(E, 0);
            for (int j = 0; j < k; j++) {
                for (int t = 0; t < N; t++) { order[t] = t; }
                if (cfg->capacity_priority == PRIORITY_SCORE) {
                    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
                        return probs[(size_t)a * E + r->choice_expert[(size_t)a * k + j]] >
                               probs[(size_t)b * E + r->choice_expert[(size_t)b * k + j]];
                    });
                }
                for (int t : order) {
                    int e = r->choice_expert[(size_t)t * k + j];
                    if (filled[e] < cap) { filled[e]++; } else { kept[(size_t)t * k + j] = 0; }
                }
            }
        }
        for (int i = 0; i < N * k; i++) {
            int e = r->choice_expert[i];
            r->assignments[e]++;
            if (kept[i]) { r->tokens_per_expert[e]++; } else { r->num_dropped++; }
        }
        r->num_assignments = N * k;
        r->expert_offsets[0] = 0;
        for (int e = 0; e < E; e++) { r->expert_offsets[e + 1] = r->expert_offsets[e] + r->tokens_per_expert[e]; }
        // rows: token order within each expert
        std::vector<int> fill(r->expert_offsets, r->expert_offsets + E);
        for (int t = 0; t < N; t++) {
            for (int j = 0; j < k; j++) {
                int i = t * k + j;
                if (!kept[i]) { r->choice_row[i] = -1; continue; }
                int row = fill[r->choice_expert[i]]++;
                r->choice_row[i] = row;
                r->row_token[row] = t;
                r->row_weight[row] = r->choice_weight[i];
            }
        }
        r->num_rows = r->expert_offsets[E];
        // each token's rows in choice order
        r->token_row_offsets[0] = 0;
        for (int t = 0; t < N; t++) {
            int n = 0;
            for (int j = 0; j < k; j++) {
                int row = r->choice_row[t * k + j];
                if (row >= 0) { r->token_rows[r->token_row_offsets[t] + n++] = row; }
            }
            r->token_row_offsets[t + 1] = r->token_row_offsets[t] + n;
        }
        return;
    }

    // expert choice: each expert takes its cap tokens of highest score, ties to the lower token
    int cap = expert_choice_capacity(cfg, N);
    #pragma omp parallel for schedule(static)
    for (int e = 0; e < E; e++) {
        std::vector<int> order(N);
        for (int t = 0; t < N; t++) { order[t] = t; }
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return probs[(size_t)a * E + e] > probs[(size_t)b * E + e]; });
        std::sort(order.begin(), order.begin() + cap);
        for (int c = 0; c < cap; c++) {
            int row = e * cap + c;
            r->row_token[row] = order[c];
            r->row_weight[row] = probs[(size_t)order[c] * E + e];
        }
    }
    r->num_rows = E * cap;
    r->num_assignments = E * cap;
    for (int e = 0; e <= E; e++) { r->expert_offsets[e] = e * cap; }
    for (int e = 0; e < E; e++) { r->tokens_per_expert[e] = cap; r->assignments[e] = cap; }
    // each token's rows in expert order (counting sort by token; rows ascend within a token)
    for (int t = 0; t <= N; t++) { r->token_row_offsets[t] = 0; }
    for (int row = 0; row < r->num_rows; row++) { r->token_row_offsets[r->row_token[row] + 1]++; }
    for (int t = 0; t < N; t++) { r->token_row_offsets[t + 1] += r->token_row_offsets[t]; }
    std::vector<int> fill(r->token_row_offsets, r->token_row_offsets + N);
    for (int row = 0; row < r->num_rows; row++) { r->token_rows[fill[r->row_token[row]]++] = row; }
}

// expert_input (rows, C) = h[row_token]: the routed rows in expert-contiguous order
static void permute_tokens(float* expert_input, const float* h, const int* row_token, int rows, int C) {
    #pragma omp parallel for schedule(static)
    for (int row = 0; row < rows; row++) { memcpy(expert_input + (size_t)row * C, h + (size_t)row_token[row] * C, C * sizeof(float)); }
}

// Each expert's contiguous slice of rows through fc (H x C) + bias, GELU, fcproj (C x H) + bias.
// fcw (E, H, C), fcb (E, H), fcprojw (E, C, H), fcprojb (E, C) are one layer's experts.
static void expert_mlp_forward(float* out, float* fch, float* fch_gelu, const float* inp, const int* expert_offsets,
                               const float* fcw, const float* fcb, const float* fcprojw, const float* fcprojb, int E, int C, int H) {
    for (int e = 0; e < E; e++) {
        int first = expert_offsets[e], n = expert_offsets[e + 1] - first;
        if (n == 0) { continue; }
        matmul_forward(fch + (size_t)first * H, inp + (size_t)first * C, fcw + (size_t)e * H * C, fcb + (size_t)e * H, n, C, H);
        gelu_forward(fch_gelu + (size_t)first * H, fch + (size_t)first * H, (size_t)n * H);
        matmul_forward(out + (size_t)first * C, fch_gelu + (size_t)first * H, fcprojw + (size_t)e * C * H, fcprojb + (size_t)e * C, n, H, C);
    }
}

// y (N, C): each token's rows weighted by their combine weights and summed, in combine order.
// Every token reads its own rows: no atomics, deterministic. A token with no row gets 0.
static void unpermute_tokens(float* y, const float* expert_output, const Routing* r, int N, int C) {
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        float* yt = y + (size_t)t * C;
        for (int c = 0; c < C; c++) { yt[c] = 0.0f; }
        for (int i = r->token_row_offsets[t]; i < r->token_row_offsets[t + 1]; i++) {
            int row = r->token_rows[i];
            float w = r->row_weight[row];
            const float* o = expert_output + (size_t)row * C;
            for (int c = 0; c < C; c++) { yt[c] += w * o[c]; }
        }
    }
}

// Load-balancing loss E * sum_e f_e P_e and z-loss mean_t logsumexp(z_t)^2 of one layer.
static void router_aux_losses(float* balance_loss, float* z_loss, const float* logits, const float* probs, const Routing* r, int N, int E) {
    double bal = 0.0, zl = 0.0;
    for (int e = 0; e < E; e++) {
        double P = 0.0;
        for (int t = 0; t < N; t++) { P += probs[(size_t)t * E + e]; }
        bal += (double)r->assignments[e] / r->num_assignments * (P / N);
    }
    for (int t = 0; t < N; t++) {
        const float* z = logits + (size_t)t * E;
        float maxval = -INFINITY;
        for (int e = 0; e < E; e++) { maxval = std::max(maxval, z[e]); }
        double sum = 0.0;
        for (int e = 0; e < E; e++) { sum += exp((double)(z[e] - maxval)); }
        double lse = maxval + log(sum);
        zl += lse * lse;
    }
    *balance_loss = (float)(E * bal);
    *z_loss = (float)(zl / N);
}

static void routing_stats_add(RoutingStats* s, const Routing* r, const float* probs, int N, int E) {
    if (s->assignments.size() != (size_t)E) { s->assignments.assign(E, 0.0); }
    for (int e = 0; e < E; e++) { s->assignments[e] += r->assignments[e]; }
    s->total_assignments += r->num_assignments;
    s->dropped += r->num_dropped;
    for (int t = 0; t < N; t++) {
        double h = 0.0;
        for (int e = 0; e < E; e++) {
            double p = probs[(size_t)t * E + e];
            if (p > 0) { h -= p * log(p); }
        }
        s->entropy_sum += h;
    }
    s->tokens += N;
}

// dexpert_output (rows, C) += w * dy[token]; drow_weight (rows) += dy[token] . expert_output
static void unpermute_tokens_backward(float* dexpert_output, float* drow_weight, const float* dy, const float* expert_output,
                                      const Routing* r, int C) {
    #pragma omp parallel for schedule(static)
    for (int row = 0; row < r->num_rows; row++) {
        const float* d = dy + (size_t)r->row_token[row] * C;
        const float* o = expert_output + (size_t)row * C;
        float* dout = dexpert_output + (size_t)row * C;
        float w = r->row_weight[row], dw = 0.0f;
        for (int c = 0; c < C; c++) {
            dout[c] += w * d[c];
            dw += d[c] * o[c];
        }
        drow_weight[row] += dw;
    }
}

// Backward through each expert's slice. dinp (rows, C) += ; the expert weight gradients += .
// dfch and dfch_gelu are (rows, H) scratch, zeroed here.
static void expert_mlp_backward(float* dinp, float* dfcw, float* dfcb, float* dfcprojw, float* dfcprojb, float* dfch, float* dfch_gelu,
                                const float* dout, const float* inp, const float* fch, const float* fch_gelu, const int* expert_offsets,
                                const float* fcw, const float* fcprojw, int E, int C, int H) {
    int rows = expert_offsets[E];
    memset(dfch, 0, (size_t)rows * H * sizeof(float));
    memset(dfch_gelu, 0, (size_t)rows * H * sizeof(float));
    for (int e = 0; e < E; e++) {
        int first = expert_offsets[e], n = expert_offsets[e + 1] - first;
        if (n == 0) { continue; }
        size_t hoff = (size_t)first * H, coff = (size_t)first * C;
        matmul_backward(dfch_gelu + hoff, dfcprojw + (size_t)e * C * H, dfcprojb + (size_t)e * C, dout + coff, fch_gelu + hoff,
                        fcprojw + (size_t)e * C * H, n, H, C);
        gelu_backward(dfch + hoff, fch + hoff, dfch_gelu + hoff, (size_t)n * H);
        matmul_backward(dinp + coff, dfcw + (size_t)e * H * C, dfcb + (size_t)e * H, dfch + hoff, inp + coff,
                        fcw + (size_t)e * H * C, n, C, H);
    }
}

// dh (N, C) += each token's rows of dexpert_input, summed in combine order
static void permute_tokens_backward(float* dh, const float* dexpert_input, const Routing* r, int N, int C) {
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        float* d = dh + (size_t)t * C;
        for (int i = r->token_row_offsets[t]; i < r->token_row_offsets[t + 1]; i++) {
            const float* g = dexpert_input + (size_t)r->token_rows[i] * C;
            for (int c = 0; c < C; c++) { d[c] += g[c]; }
        }
    }
}

// From the combine-weight gradients and the auxiliary losses to the router (doc/routing.md,
// section 6). dlogits (N, E) is scratch; dh (N, C) += and drouterw (E, C) += .
// alpha and beta already carry the loss scale of this micro-batch.
static void router_backward(float* dh, float* drouterw, float* dlogits, const float* drow_weight, const Routing* r,
                            const float* logits, const float* probs, const float* h, const float* routerw, const ModelConfig* cfg,
                            float alpha, float beta, int N, int C) {
    int E = cfg->num_experts, k = cfg->top_k;
    std::vector<float> balance_grad(E);  // dL_bal/dp[t][e] = E f_e / N, the same for every token
    for (int e = 0; e < E; e++) { balance_grad[e] = alpha * E * ((float)r->assignments[e] / r->num_assignments) / N; }
    // each token's combine-weight gradients dw, by expert (0 for experts it does not use)
    std::vector<float> dw((size_t)N * E, 0.0f);
    if (cfg->router == ROUTER_TOPK) {
        for (int i = 0; i < N * k; i++) {
            int row = r->choice_row[i];
            dw[(size_t)(i / k) * E + r->choice_expert[i]] = row >= 0 ? drow_weight[row] : 0.0f;
        }
    } else {
        for (int e = 0; e < E; e++) {
            for (int row = r->expert_offsets[e]; row < r->expert_offsets[e + 1]; row++) { dw[(size_t)r->row_token[row] * E + e] = drow_weight[row]; }
        }
    }
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const float* p = probs + (size_t)t * E;
        const float* z = logits + (size_t)t * E;
        const float* g = dw.data() + (size_t)t * E;
        std::vector<float> dp(E, 0.0f);
        if (cfg->router == ROUTER_TOPK && cfg->renorm) {
            // w_j = p_j / S over the chosen: dp_i = (dw_i - sum_j w_j dw_j) / S
            const int* chosen = r->choice_expert + (size_t)t * k;
            const float* w = r->choice_weight + (size_t)t * k;
            float S = 0.0f, wdw = 0.0f;
            for (int j = 0; j < k; j++) { S += p[chosen[j]]; wdw += w[j] * g[chosen[j]]; }
            for (int j = 0; j < k; j++) { dp[chosen[j]] = (g[chosen[j]] - wdw) / S; }
        } else {
            for (int e = 0; e < E; e++) { dp[e] = g[e]; }
        }
        for (int e = 0; e < E; e++) { dp[e] += balance_grad[e]; }
        // softmax backward, then the z-loss: d/dz_e of beta * lse^2 / N = 2 beta lse p_e / N
        float pdp = 0.0f;
        for (int e = 0; e < E; e++) { pdp += p[e] * dp[e]; }
        float maxval = -INFINITY;
        for (int e = 0; e < E; e++) { maxval = std::max(maxval, z[e]); }
        float sum = 0.0f;
        for (int e = 0; e < E; e++) { sum += expf(z[e] - maxval); }
        float lse = maxval + logf(sum);
        float* dz = dlogits + (size_t)t * E;
        for (int e = 0; e < E; e++) { dz[e] = p[e] * (dp[e] - pdp) + 2.0f * beta * lse * p[e] / N; }
    }
    matmul_backward(dh, drouterw, NULL, dlogits, h, routerw, N, C, E);
}

// ----------------------------------------------------------------------------
// the model

// Activations of one layer, kept from the forward for the backward
struct LayerActivations {
    float* ln1;            // (N, C)
    float* ln1_mean;       // (N)
    float* ln1_rstd;       // (N)
    float* qkv;            // (N, 3C)
    float* atty;           // (N, C) attention output before its projection
    float* att;            // (B, NH, T, T) attention probabilities
    float* residual2;      // (N, C) the residual after attention
    float* ln2;            // (N, C)
    float* ln2_mean;       // (N)
    float* ln2_rstd;       // (N)
    // dense MLP
    float* fch;            // (N, 4C)
    float* fch_gelu;       // (N, 4C)
    // MoE
    float* router_logits;  // (N, E)
    float* router_probs;   // (N, E)
    Routing routing;
    float* expert_input;   // (rows, C) routed rows, expert-contiguous
    float* expert_fch;     // (rows, H)
    float* expert_fch_gelu;// (rows, H)
    float* expert_output;  // (rows, C)
    float* residual3;      // (N, C) the layer's output
};

struct Model {
    ModelConfig config;
    size_t param_sizes[NUM_PARAMETER_TENSORS];
    size_t num_params;
    float* params_memory;
    ParameterTensors<float> params;
    float* grads_memory;
    ParameterTensors<float> grads;
    float* m_memory;            // AdamW moments
    float* v_memory;
    float aux_alpha, z_beta;    // auxiliary loss coefficients
    // activations, sized for B x T
    int B, T;
    int batch_B, batch_T;       // the shape of the last forward
    float* encoded;             // (N, C)
    std::vector<LayerActivations> layers;
    float* lnf;                 // (N, C)
    float* lnf_mean;            // (N)
    float* lnf_rstd;            // (N)
    float* logits;              // (N, Vp); the backward turns it into dlogits in place
    float* losses;              // (N)
    float* logit_max;           // (N) each row's max and sum of exps, for the backward
    float* logit_sum;           // (N)
    int* inputs;                // (N) of the last forward
    int* targets;               // (N)
    // backward scratch
    float* dresidual;           // (N, C)
    float* dbuf_c;              // (N, C)
    float* dbuf_c2;             // (N, C)
    float* dqkv;                // (N, 3C)
    float* dfch;                // (N, 4C), also (rows, H) for the experts
    float* dfch_gelu;           // (N, 4C), also (rows, H)
    float* dexpert_output;      // (rows, C)
    float* dexpert_input;       // (rows, C)
    float* drow_weight;         // (rows)
    float* drouter_logits;      // (N, E)
    float* mlp_out;             // (N, C) forward scratch: attention projection, MLP/MoE output
    // results of the last forward
    float mean_loss;            // cross-entropy, or -1 without targets
    float aux_loss;             // load-balancing loss summed over MoE layers (before alpha)
    float z_loss;               // z-loss summed over MoE layers (before beta)
    bool collect_stats;         // accumulate routing statistics (training batches only)
    std::vector<RoutingStats> stats;  // per MoE layer
    Breakdown* breakdown;       // --breakdown 1: where a step's time goes (else NULL)
};

// --breakdown 1 (common/breakdown.h): the host clock as each part of a training step begins
static void mark_forward(Model* m, StepPart part) {
    if (m->breakdown) { breakdown_mark_host(m->breakdown, breakdown_slot(part, false), seconds_now()); }
}
static void mark_backward(Model* m, StepPart part) {
    if (m->breakdown) { breakdown_mark_host(m->breakdown, breakdown_slot(part, true), seconds_now()); }
}

static float* alloc_floats(size_t n) { return (float*)calloc_check(n, sizeof(float)); }

// Takes ownership of params. B, T: the largest batch the model will see.
static void model_init(Model* m, const ModelConfig* cfg, float* params, int B, int T, float aux_alpha, float z_beta) {
    m->config = *cfg;
    fill_parameter_sizes(m->param_sizes, cfg);
    m->num_params = count_parameters(cfg);
    m->params_memory = params;
    point_parameters(&m->params, m->params_memory, m->param_sizes);
    m->grads_memory = alloc_floats(m->num_params);
    point_parameters(&m->grads, m->grads_memory, m->param_sizes);
    m->m_memory = alloc_floats(m->num_params);
    m->v_memory = alloc_floats(m->num_params);
    m->aux_alpha = aux_alpha;
    m->z_beta = z_beta;

    size_t N = (size_t)B * T, C = cfg->channels, NH = cfg->num_heads, Vp = cfg->padded_vocab_size;
    size_t E = cfg->num_experts, H = cfg->expert_hidden, k = cfg->top_k;
    size_t rows = cfg->num_experts > 1 ? (size_t)max_routing_rows(cfg, (int)N) : 0;
    m->B = B;
    m->T = T;
    m->encoded = alloc_floats(N * C);
    m->layers.resize(cfg->num_layers);
    for (int l = 0; l < cfg->num_layers; l++) {
        LayerActivations& a = m->layers[l];
        memset(&a, 0, sizeof(a));
        a.ln1 = alloc_floats(N * C);
        a.ln1_mean = alloc_floats(N);
        a.ln1_rstd = alloc_floats(N);
        a.qkv = alloc_floats(N * 3 * C);
        a.atty = alloc_floats(N * C);
        a.att = alloc_floats((size_t)B * NH * T * T);
        a.residual2 = alloc_floats(N * C);
        a.ln2 = alloc_floats(N * C);
        a.ln2_mean = alloc_floats(N);
        a.ln2_rstd = alloc_floats(N);
        a.residual3 = alloc_floats(N * C);
        if (!cfg->is_moe_layer[l]) {
            a.fch = alloc_floats(N * 4 * C);
            a.fch_gelu = alloc_floats(N * 4 * C);
            continue;
        }
        a.router_logits = alloc_floats(N * E);
        a.router_probs = alloc_floats(N * E);
        Routing& r = a.routing;
        r.choice_expert = (int*)calloc_check(N * k, sizeof(int));
        r.choice_weight = alloc_floats(N * k);
        r.choice_row = (int*)calloc_check(N * k, sizeof(int));
        r.tokens_per_expert = (int*)calloc_check(E, sizeof(int));
        r.expert_offsets = (int*)calloc_check(E + 1, sizeof(int));
        r.row_token = (int*)calloc_check(rows, sizeof(int));
        r.row_weight = alloc_floats(rows);
        r.token_row_offsets = (int*)calloc_check(N + 1, sizeof(int));
        r.token_rows = (int*)calloc_check(rows, sizeof(int));
        r.assignments = (int*)calloc_check(E, sizeof(int));
        a.expert_input = alloc_floats(rows * C);
        a.expert_fch = alloc_floats(rows * H);
        a.expert_fch_gelu = alloc_floats(rows * H);
        a.expert_output = alloc_floats(rows * C);
    }
    m->lnf = alloc_floats(N * C);
    m->lnf_mean = alloc_floats(N);
    m->lnf_rstd = alloc_floats(N);
    m->logits = alloc_floats(N * Vp);
    m->losses = alloc_floats(N);
    m->logit_max = alloc_floats(N);
    m->logit_sum = alloc_floats(N);
    m->inputs = (int*)calloc_check(N, sizeof(int));
    m->targets = (int*)calloc_check(N, sizeof(int));
    size_t hidden_rows = std::max(N * 4 * C, rows * H);
    m->dresidual = alloc_floats(N * C);
    m->dbuf_c = alloc_floats(N * C);
    m->dbuf_c2 = alloc_floats(N * C);
    m->dqkv = alloc_floats(N * 3 * C);
    m->dfch = alloc_floats(hidden_rows);
    m->dfch_gelu = alloc_floats(hidden_rows);
    m->dexpert_output = alloc_floats(rows * C);
    m->dexpert_input = alloc_floats(rows * C);
    m->drow_weight = alloc_floats(rows);
    m->drouter_logits = alloc_floats(N * E);
    m->mlp_out = alloc_floats(N * C);
    m->mean_loss = -1.0f;
    m->collect_stats = false;
    m->breakdown = NULL;
    m->stats.assign(cfg->num_moe_layers, RoutingStats());
}

static void model_free(Model* m) {
    free(m->params_memory); free(m->grads_memory); free(m->m_memory); free(m->v_memory);
    free(m->encoded);
    for (LayerActivations& a : m->layers) {
        float* fs[] = {a.ln1, a.ln1_mean, a.ln1_rstd, a.qkv, a.atty, a.att, a.residual2, a.ln2, a.ln2_mean, a.ln2_rstd,
                       a.fch, a.fch_gelu, a.router_logits, a.router_probs, a.expert_input, a.expert_fch, a.expert_fch_gelu,
                       a.expert_output, a.residual3, a.routing.choice_weight, a.routing.row_weight};
        for (float* f : fs) { free(f); }
        int* is[] = {a.routing.choice_expert, a.routing.choice_row, a.routing.tokens_per_expert, a.routing.expert_offsets,
                     a.routing.row_token, a.routing.token_row_offsets, a.routing.token_rows, a.routing.assignments};
        for (int* i : is) { free(i); }
    }
    float* fs[] = {m->lnf, m->lnf_mean, m->lnf_rstd, m->logits, m->losses, m->logit_max, m->logit_sum, m->dresidual, m->dbuf_c, m->dbuf_c2, m->dqkv,
                   m->dfch, m->dfch_gelu, m->dexpert_output, m->dexpert_input, m->drow_weight, m->drouter_logits, m->mlp_out};
    for (float* f : fs) { free(f); }
    free(m->inputs);
    free(m->targets);
}

// The MoE layer l (MoE slot ms) on ln2 (N, C); out (N, C).
static void moe_forward(Model* m, int l, int N, float* out) {
    const ModelConfig* cfg = &m->config;
    LayerActivations& a = m->layers[l];
    int ms = cfg->moe_slot[l], C = cfg->channels, E = cfg->num_experts, H = cfg->expert_hidden;
    const ParameterTensors<float>& p = m->params;
    size_t ex = (size_t)ms * E;
    mark_forward(m, PART_ROUTER);
    router_forward(a.router_logits, a.router_probs, a.ln2, p.routerw + ex * C, N, C, E);
    route_tokens(&a.routing, a.router_logits, a.router_probs, cfg, N);
    mark_forward(m, PART_PERMUTE);
    permute_tokens(a.expert_input, a.ln2, a.routing.row_token, a.routing.num_rows, C);
    mark_forward(m, PART_EXPERTS);
    expert_mlp_forward(a.expert_output, a.expert_fch, a.expert_fch_gelu, a.expert_input, a.routing.expert_offsets,
                       p.expert_fcw + ex * H * C, p.expert_fcb + ex * H, p.expert_fcprojw + ex * C * H, p.expert_fcprojb + ex * C, E, C, H);
    mark_forward(m, PART_UNPERMUTE);
    unpermute_tokens(out, a.expert_output, &a.routing, N, C);
    mark_forward(m, PART_ROUTER);
    float balance, zl;
    router_aux_losses(&balance, &zl, a.router_logits, a.router_probs, &a.routing, N, E);
    m->aux_loss += balance;
    m->z_loss += zl;
    if (m->collect_stats) { routing_stats_add(&m->stats[ms], &a.routing, a.router_probs, N, E); }
}

// Forward over inputs (B, T). With targets, also the per-token and mean cross-entropy.
static void model_forward(Model* m, const int* inputs, const int* targets, int B, int T) {
    const ModelConfig* cfg = &m->config;
    if (B * T > m->B * m->T || T > m->T) { die("model_forward: batch %dx%d exceeds the %dx%d the model was built for", B, T, m->B, m->T); }
    int N = B * T, C = cfg->channels, NH = cfg->num_heads, V = cfg->vocab_size, Vp = cfg->padded_vocab_size;
    for (int i = 0; i < N; i++) {
        if (inputs[i] < 0 || inputs[i] >= V) { die("input token %d is outside the vocabulary [0, %d)", inputs[i], V); }
    }
    memcpy(m->inputs, inputs, N * sizeof(int));
    m->batch_B = B;
    m->batch_T = T;
    const ParameterTensors<float>& p = m->params;
    m->aux_loss = 0.0f;
    m->z_loss = 0.0f;
    mark_forward(m, PART_ENCODER);
    encoder_forward(m->encoded, inputs, p.wte, p.wpe, B, T, C);
    for (int l = 0; l < cfg->num_layers; l++) {
        LayerActivations& a = m->layers[l];
        const float* residual = l == 0 ? m->encoded : m->layers[l - 1].residual3;
        size_t lc = (size_t)l * C;
        mark_forward(m, PART_LAYERNORM);
        layernorm_forward(a.ln1, a.ln1_mean, a.ln1_rstd, residual, p.ln1w + lc, p.ln1b + lc, N, C);
        mark_forward(m, PART_ATTENTION);
        matmul_forward(a.qkv, a.ln1, p.qkvw + lc * 3 * C, p.qkvb + lc * 3, N, C, 3 * C);
        attention_forward(a.atty, a.att, a.qkv, B, T, C, NH);
        matmul_forward(m->mlp_out, a.atty, p.attprojw + lc * C, p.attprojb + lc, N, C, C);
        mark_forward(m, PART_LAYERNORM);
        residual_forward(a.residual2, residual, m->mlp_out, (size_t)N * C);
        layernorm_forward(a.ln2, a.ln2_mean, a.ln2_rstd, a.residual2, p.ln2w + lc, p.ln2b + lc, N, C);
        int ds = cfg->dense_slot[l];
        if (ds >= 0) {
            mark_forward(m, PART_MLP);
            size_t dc = (size_t)ds * C;
            matmul_forward(a.fch, a.ln2, p.fcw + dc * 4 * C, p.fcb + dc * 4, N, C, 4 * C);
            gelu_forward(a.fch_gelu, a.fch, (size_t)N * 4 * C);
            matmul_forward(m->mlp_out, a.fch_gelu, p.fcprojw + dc * 4 * C, p.fcprojb + dc, N, 4 * C, C);
        } else {
            moe_forward(m, l, N, m->mlp_out);
        }
        mark_forward(m, PART_LAYERNORM);
        residual_forward(a.residual3, a.residual2, m->mlp_out, (size_t)N * C);
    }
    const float* last = m->layers[cfg->num_layers - 1].residual3;
    layernorm_forward(m->lnf, m->lnf_mean, m->lnf_rstd, last, p.lnfw, p.lnfb, N, C);
    mark_forward(m, PART_CLASSIFIER);
    matmul_forward(m->logits, m->lnf, p.wte, NULL, N, C, Vp);
    m->mean_loss = -1.0f;
    if (targets) {
        for (int i = 0; i < N; i++) {
            if (targets[i] < 0 || targets[i] >= V) { die("target token %d is outside the vocabulary [0, %d)", targets[i], V); }
        }
        memcpy(m->targets, targets, N * sizeof(int));
        classifier_forward(m->losses, m->logit_max, m->logit_sum, m->logits, targets, N, V, Vp);
        double sum = 0.0;
        for (int i = 0; i < N; i++) { sum += m->losses[i]; }
        m->mean_loss = (float)(sum / N);
    }
}

static void model_zero_grad(Model* m) { memset(m->grads_memory, 0, m->num_params * sizeof(float)); }

// Backward of the last forward (which must have had targets), adding into the gradients.
// loss_scale is 1/(gradient-accumulation steps): the loss of this micro-batch is
// loss_scale * (CE + alpha * sum L_bal + beta * sum L_z).
static void model_backward(Model* m, float loss_scale) {
    const ModelConfig* cfg = &m->config;
    if (m->mean_loss < 0) { die("model_backward: the forward had no targets"); }
    int B = m->batch_B, T = m->batch_T;
    int N = B * T, C = cfg->channels, NH = cfg->num_heads, V = cfg->vocab_size, Vp = cfg->padded_vocab_size;
    int E = cfg->num_experts, H = cfg->expert_hidden;
    const ParameterTensors<float>& p = m->params;
    ParameterTensors<float>& g = m->grads;

    mark_backward(m, PART_CLASSIFIER);
    classifier_backward(m->logits, m->logit_max, m->logit_sum, m->targets, loss_scale / N, N, V, Vp);
    float* dlogits = m->logits;
    memset(m->dbuf_c, 0, (size_t)N * C * sizeof(float));
    matmul_backward(m->dbuf_c, g.wte, NULL, dlogits, m->lnf, p.wte, N, C, Vp);
    memset(m->dresidual, 0, (size_t)N * C * sizeof(float));
    const float* last = m->layers[cfg->num_layers - 1].residual3;
    mark_backward(m, PART_LAYERNORM);
    layernorm_backward(m->dresidual, g.lnfw, g.lnfb, m->dbuf_c, last, p.lnfw, m->lnf_mean, m->lnf_rstd, N, C);

    for (int l = cfg->num_layers - 1; l >= 0; l--) {
        LayerActivations& a = m->layers[l];
        const float* residual = l == 0 ? m->encoded : m->layers[l - 1].residual3;
        size_t lc = (size_t)l * C;
        // dresidual holds d(residual3) = d(MLP output) = d(residual2)
        float* dln2 = m->dbuf_c;
        memset(dln2, 0, (size_t)N * C * sizeof(float));
        int ds = cfg->dense_slot[l];
        if (ds >= 0) {
            mark_backward(m, PART_MLP);
            size_t dc = (size_t)ds * C;
            memset(m->dfch_gelu, 0, (size_t)N * 4 * C * sizeof(float));
            memset(m->dfch, 0, (size_t)N * 4 * C * sizeof(float));
            matmul_backward(m->dfch_gelu, g.fcprojw + dc * 4 * C, g.fcprojb + dc, m->dresidual, a.fch_gelu, p.fcprojw + dc * 4 * C, N, 4 * C, C);
            gelu_backward(m->dfch, a.fch, m->dfch_gelu, (size_t)N * 4 * C);
            matmul_backward(dln2, g.fcw + dc * 4 * C, g.fcb + dc * 4, m->dfch, a.ln2, p.fcw + dc * 4 * C, N, C, 4 * C);
        } else {
            int ms = cfg->moe_slot[l];
            size_t ex = (size_t)ms * E;
            Routing& r = a.routing;
            mark_backward(m, PART_UNPERMUTE);
            memset(m->dexpert_output, 0, (size_t)r.num_rows * C * sizeof(float));
            memset(m->dexpert_input, 0, (size_t)r.num_rows * C * sizeof(float));
            memset(m->drow_weight, 0, (size_t)r.num_rows * sizeof(float));
            unpermute_tokens_backward(m->dexpert_output, m->drow_weight, m->dresidual, a.expert_output, &r, C);
            mark_backward(m, PART_EXPERTS);
            expert_mlp_backward(m->dexpert_input, g.expert_fcw + ex * H * C, g.expert_fcb + ex * H, g.expert_fcprojw + ex * C * H,
                                g.expert_fcprojb + ex * C, m->dfch, m->dfch_gelu, m->dexpert_output, a.expert_input, a.expert_fch,
                                a.expert_fch_gelu, r.expert_offsets, p.expert_fcw + ex * H * C, p.expert_fcprojw + ex * C * H, E, C, H);
            mark_backward(m, PART_PERMUTE);
            permute_tokens_backward(dln2, m->dexpert_input, &r, N, C);
            mark_backward(m, PART_ROUTER);
            router_backward(dln2, g.routerw + ex * C, m->drouter_logits, m->drow_weight, &r, a.router_logits, a.router_probs, a.ln2,
                            p.routerw + ex * C, cfg, m->aux_alpha * loss_scale, m->z_beta * loss_scale, N, C);
        }
        mark_backward(m, PART_LAYERNORM);
        layernorm_backward(m->dresidual, g.ln2w + lc, g.ln2b + lc, dln2, a.residual2, p.ln2w + lc, a.ln2_mean, a.ln2_rstd, N, C);
        // dresidual now holds d(residual2) = d(residual) + d(attention projection)
        mark_backward(m, PART_ATTENTION);
        float* datty = m->dbuf_c;
        memset(datty, 0, (size_t)N * C * sizeof(float));
        matmul_backward(datty, g.attprojw + lc * C, g.attprojb + lc, m->dresidual, a.atty, p.attprojw + lc * C, N, C, C);
        memset(m->dqkv, 0, (size_t)N * 3 * C * sizeof(float));
        attention_backward(m->dqkv, datty, a.qkv, a.att, B, T, C, NH);
        float* dln1 = m->dbuf_c2;
        memset(dln1, 0, (size_t)N * C * sizeof(float));
        matmul_backward(dln1, g.qkvw + lc * 3 * C, g.qkvb + lc * 3, m->dqkv, a.ln1, p.qkvw + lc * 3 * C, N, C, 3 * C);
        mark_backward(m, PART_LAYERNORM);
        layernorm_backward(m->dresidual, g.ln1w + lc, g.ln1b + lc, dln1, residual, p.ln1w + lc, a.ln1_mean, a.ln1_rstd, N, C);
    }
    mark_backward(m, PART_ENCODER);
    encoder_backward(g.wte, g.wpe, m->dresidual, m->inputs, B, T, C);
}

// global L2 norm of all gradients, in double over fixed chunks (deterministic)
static float model_grad_norm(const Model* m) {
    const size_t CHUNK = 1 << 16;
    size_t n = m->num_params, chunks = (n + CHUNK - 1) / CHUNK;
    std::vector<double> partial(chunks, 0.0);
    #pragma omp parallel for schedule(static)
    for (size_t c = 0; c < chunks; c++) {
        double s = 0.0;
        for (size_t i = c * CHUNK; i < std::min(n, (c + 1) * CHUNK); i++) { s += (double)m->grads_memory[i] * m->grads_memory[i]; }
        partial[c] = s;
    }
    double total = 0.0;
    for (double s : partial) { total += s; }
    return (float)sqrt(total);
}

// Clips the gradients to the global norm (torch's rule: scale by clip / (norm + 1e-6) when
// that is below 1) and takes AdamW step t (1-based) at learning rate lr. Returns the norm
// before clipping. The update follows torch.optim.AdamW: decay first, then the Adam step.
static float model_update(Model* m, float lr, const OptimizerSettings* o, int t) {
    mark_backward(m, PART_OPTIMIZER);
    float norm = model_grad_norm(m);
    float grad_scale = 1.0f;
    if (o->grad_clip > 0) {
        float coef = o->grad_clip / (norm + 1e-6f);
        if (coef < 1.0f) { grad_scale = coef; }
    }
    double bias1 = 1.0 - pow((double)o->beta1, t), bias2 = 1.0 - pow((double)o->beta2, t);
    float step_size = (float)(lr / bias1);
    float bias2_sqrt = (float)sqrt(bias2);
    const float* ptr = m->params_memory;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t first = ptr - m->params_memory, n = m->param_sizes[i];
        float decay = parameter_is_decayed(i) ? o->weight_decay : 0.0f;
        #pragma omp parallel for schedule(static)
        for (size_t j = first; j < first + n; j++) {
            float g = m->grads_memory[j] * grad_scale;
            float mm = o->beta1 * m->m_memory[j] + (1.0f - o->beta1) * g;
            float vv = o->beta2 * m->v_memory[j] + (1.0f - o->beta2) * g * g;
            m->m_memory[j] = mm;
            m->v_memory[j] = vv;
            float param = m->params_memory[j] * (1.0f - lr * decay);
            m->params_memory[j] = param - step_size * mm / (sqrtf(vv) / bias2_sqrt + o->eps);
        }
        ptr += n;
    }
    return norm;
}

// ----------------------------------------------------------------------------
// sampling and evaluation

// Samples gen_tokens tokens after <|endoftext|> and prints them.
static void sample_text(Model* m, TrainingRun* run) {
    int V = m->config.vocab_size, Vp = m->config.padded_vocab_size;
    int T = std::min(std::min(run->args.gen_tokens + 1, m->T), m->config.max_seq_len);
    std::vector<int> tokens(T, 0);
    tokens[0] = run->tokenizer.eot_token < V ? run->tokenizer.eot_token : 0;
    bool collect = m->collect_stats;
    m->collect_stats = false;
    printf("generating:\n---\n");
    for (int t = 1; t < T; t++) {
        model_forward(m, tokens.data(), NULL, 1, t);
        tokens[t] = sample_token(m->logits + (size_t)(t - 1) * Vp, V, run->args.seed, &run->sampler_counter);
        tokenizer_print(&run->tokenizer, tokens[t]);
        fflush(stdout);
    }
    printf("\n---\n");
    m->collect_stats = collect;
}

static float validation_loss(Model* m, DataLoader* val, int max_batches) {
    dataloader_reset(val);
    int n = (int)std::min((int64_t)max_batches, val->num_batches);
    bool collect = m->collect_stats;
    m->collect_stats = false;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        dataloader_next_batch(val);
        model_forward(m, val->inputs, val->targets, val->B, val->T);
        sum += m->mean_loss;
    }
    m->collect_stats = collect;
    return (float)(sum / n);
}

// The routing sums since the last report, as the resume state holds them (train_state.h): E + 4
// doubles per MoE layer (assignments per expert, in all, dropped, entropy sum, tokens)
static std::vector<double> routing_window_get(const Model* m) {
    std::vector<double> w;
    int E = m->config.num_experts;
    for (const RoutingStats& s : m->stats) {
        for (int e = 0; e < E; e++) { w.push_back(s.assignments.empty() ? 0.0 : s.assignments[e]); }
        w.insert(w.end(), {s.total_assignments, s.dropped, s.entropy_sum, s.tokens});
    }
    return w;
}

static void routing_window_set(Model* m, const std::vector<double>& w) {
    int E = m->config.num_experts;
    if (w.size() != routing_window_doubles((int)m->stats.size(), E)) { die("routing_window_set: %zu values for %zu MoE layers", w.size(), m->stats.size()); }
    const double* p = w.data();
    for (RoutingStats& s : m->stats) {
        s.assignments.assign(p, p + E);
        s.total_assignments = p[E];
        s.dropped = p[E + 1];
        s.entropy_sum = p[E + 2];
        s.tokens = p[E + 3];
        p += E + 4;
    }
}

// each MoE layer's expert load, dropped fraction and routing entropy since the last report
static void report_routing(Model* m, TrainingRun* run, int step) {
    const ModelConfig* cfg = &m->config;
    for (int l = 0; l < cfg->num_layers; l++) {
        int ms = cfg->moe_slot[l];
        if (ms < 0) { continue; }
        RoutingStats& s = m->stats[ms];
        run_report_layer(run, step, l, s.assignments.data(), s.total_assignments, s.dropped, s.entropy_sum, s.tokens);
        s = RoutingStats();
    }
}

// ----------------------------------------------------------------------------
// the training loop

#ifndef TESTING
int main(int argc, char** argv) {
    TrainingRun run;
    parse_args(argc, argv, &run.args);
    run_init(&run);
    Model model;
    model_init(&model, &run.config, run.params, run.B, run.T, (float)run.args.aux_loss, (float)run.args.z_loss);
    run_start(&run, model.m_memory, model.v_memory, model.num_params);
    routing_window_set(&model, run.routing_window);
#ifdef _OPENMP
    printf("CPU twin, fp32, %d OpenMP threads\n", omp_get_max_threads());
#endif

    model.collect_stats = true;
    model.breakdown = run.breakdown.on ? &run.breakdown : NULL;
    run_catch_stop_signals();  // from here on, Ctrl-C or SIGTERM stops at the next step, with a checkpoint
    for (int step = run.start_step; step <= run.max_steps; step++) {
        if (run_checkpoint_due(&run, step)) {
            run_save_checkpoint(&run, step, model.params_memory, model.m_memory, model.v_memory, model.num_params, routing_window_get(&model));
        }
        if (run_stop_due(&run, step)) { break; }
        if (run_validation_due(&run, step)) {
            float val = validation_loss(&model, &run.val, run.args.val_steps);
            printf("step %d | val loss %.6f\n", step, val);
            logger_val(&run.logger, step, val);
        }
        if (run_sample_due(&run, step)) { sample_text(&model, &run); }
        if (step == run.max_steps) { break; }

        double t0 = seconds_now();
        breakdown_begin_step(&run.breakdown);
        mark_backward(&model, PART_OPTIMIZER);
        model_zero_grad(&model);
        double loss = 0.0, aux = 0.0, zl = 0.0;
        for (int micro = 0; micro < run.grad_accum; micro++) {
            dataloader_next_batch(&run.train);
            model_forward(&model, run.train.inputs, run.train.targets, run.B, run.T);
            model_backward(&model, 1.0f / run.grad_accum);
            loss += model.mean_loss / run.grad_accum;
            aux += model.aux_loss / run.grad_accum;
            zl += model.z_loss / run.grad_accum;
        }
        float lr = learning_rate_at(&run.schedule, step);
        float norm = model_update(&model, lr, &run.optimizer, run.adam_step_offset + step + 1);
        breakdown_end_step_host(&run.breakdown, seconds_now());
        run_print_step(&run, step + 1, loss, aux, zl, norm, lr, seconds_now() - t0, 0.0);
        if (run_routing_report_due(&run, step + 1)) {
            run_routing_report_header(&run, step + 1);
            report_routing(&model, &run, step + 1);
        }
    }
    breakdown_print(&run.breakdown);
    run_free(&run);
    model_free(&model);
    return run_exit_status();
}
#endif
