/*
Kernel study: the routing and the permutation around the experts (kernels/router.cuh,
kernels/permute.cuh), checked against the CPU twin and timed against the experts' own GEMMs.

    make -C dev/cuda PRECISION=BF16      # or PRECISION=FP32; GPU_ARCH=90 to choose
    dev/cuda/bin/BF16/routing            # checks, then timing
    dev/cuda/bin/BF16/routing 0 --quick  # the small shapes only, no timing (the CPU emulation)

One version of each kernel (the engine's), the study's subject being what the routing costs:
  router_forward   router_scores_kernel (a warp per token: E dot products, softmax, top-k,
                   combine weights), route_select_kernel (a block per expert: the capacity
                   rule, by score a radix select of the cut, the expert's rows by a scan in
                   token order), route_rows_kernel (one block: offsets, each token's rows, the
                   auxiliary losses);
  permute_tokens   a warp per row gathers its token's h row;
  unpermute_tokens a warp per token sums its rows times their combine weights, in combine order;
  and in the backward unpermute_tokens_backward, permute_tokens_backward and router_backward.
The design target: routing, permutation and un-permutation together under 5% of a step. The
timing prints them, per MoE layer and forward plus backward, beside the same layer's expert
GEMMs (kernels/expert_mlp.cuh), which are about two thirds of an MoE layer's FLOPs.

Checks per routing mode (dropless top-2, renormalised or not; a capacity with order and with
score priority; expert choice), on inputs whose logits have no near-ties, and on inputs made of
a few distinct tokens repeated, whose exact ties the capacity cuts through: the row layout
(expert_offsets, the token of every row, each token's rows) equal to the twin's, the combine
weights of the rows, the permuted rows (an exact copy) and the un-permuted output.
Tolerances: combine weights 1e-5 (fp32 softmax on both sides, dot products summed in another
order); un-permuted output 1e-5 (FP32) and 1e-2 (BF16: the output is rounded to bf16, 2^-9).
The backward of these kernels is checked through the whole model by test_moe.
Speed of light at the timing shapes (C = 768, bf16; router_forward timed as its two steps, the
scores and the layout). 8192 tokens, E = 8, top-2: the router's logits are 2 * N * C * E =
0.1 GFLOP; permute and un-permute each move 16384 rows of 1536 bytes in and out (about 75 MB,
22 us at 3.35 TB/s). 65536 tokens (B=64 x T=1024, the benchmark's batch), top-2 of 8: 8x all of
that; the expert MLP is 6 GEMMs of 2 * rows * C * H = 3.7 TFLOP forward and backward. 65536
tokens, top-8 of 64 (G=8, H=384): 524288 rows, permute 1.6 GB in and out (0.48 ms), logits
6.4 GFLOP in fp32, the expert MLP 1.9 TFLOP. The layout reads and writes a few ints per
candidate (N * k of them, at most 0.5 M: about 10 MB, 3 us at full bandwidth), but its second
kernel is a single block, bound by latency rather than bandwidth: the two 65536-token shapes
say what that costs where it matters.
*/
#include "dev_common.cuh"
#include "../../kernels/router.cuh"
#include "../../kernels/permute.cuh"
#include "../../kernels/expert_mlp.cuh"

struct Mode {
    const char* name;
    int E, k, renorm, router;
    float capacity_factor;
    int priority;
};

static ModelConfig routing_config(const Mode& m, int C) {
    ModelConfig cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.channels = C;
    cfg.num_experts = m.E;
    cfg.top_k = m.k;
    cfg.renorm = m.renorm;
    cfg.router = m.router;
    cfg.capacity_factor = m.capacity_factor;
    cfg.capacity_priority = m.priority;
    return cfg;
}

template <typename T>
static std::vector<T> device_ints(const T* d, size_t n) {
    std::vector<T> v(n);
    if (n > 0) { cudaCheck(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost)); }
    return v;
}

static bool same_ints(const int* a, const int* b, size_t n) { return n == 0 || memcmp(a, b, n * sizeof(int)) == 0; }

// distinct > 0: token t's h is row t % distinct, so tokens tie exactly (equal inputs give equal
// scores in either engine) and a capacity cuts through groups of equal scores: the tie rule
// (lower token first) decides who is kept.
static void validate_mode(const Mode& m, int N, int C, int distinct = 0) {
    ModelConfig cfg = routing_config(m, C);
    int E = m.E, k = m.k, rows_max = max_routing_rows(&cfg, N);
    // the router weights spread the logits by ~1 between experts: no near-ties among N tokens
    std::vector<float> h = round_to_floatX(random_vector((size_t)N * C, 11 + E));
    for (int t = distinct; distinct > 0 && t < N; t++) { memcpy(&h[(size_t)t * C], &h[(size_t)(t % distinct) * C], C * sizeof(float)); }
    std::vector<float> routerw = random_vector((size_t)E * C, 12 + E, 0.2f);
    std::vector<float> expert_output = round_to_floatX(random_vector((size_t)rows_max * C, 13 + E));

    // the CPU twin
    std::vector<float> logits((size_t)N * E), probs((size_t)N * E);
    cpu::router_forward(logits.data(), probs.data(), h.data(), routerw.data(), N, C, E);
    int choices = N * std::max(k, E);
    std::vector<int> choice_expert(choices), choice_row(choices), tokens_per_expert(E), expert_offsets(E + 1), row_token(rows_max),
        token_row_offsets(N + 1), token_rows(rows_max), assignments(E);
    std::vector<float> choice_weight(choices), row_weight(rows_max);
    cpu::Routing r = {};
    r.choice_expert = choice_expert.data();
    r.choice_weight = choice_weight.data();
    r.choice_row = choice_row.data();
    r.tokens_per_expert = tokens_per_expert.data();
    r.expert_offsets = expert_offsets.data();
    r.row_token = row_token.data();
    r.row_weight = row_weight.data();
    r.token_row_offsets = token_row_offsets.data();
    r.token_rows = token_rows.data();
    r.assignments = assignments.data();
    cpu::route_tokens(&r, logits.data(), probs.data(), &cfg, N);
    int rows = r.num_rows;
    std::vector<float> permuted_ref((size_t)rows * C), y_ref((size_t)N * C);
    cpu::permute_tokens(permuted_ref.data(), h.data(), row_token.data(), rows, C);
    cpu::unpermute_tokens(y_ref.data(), expert_output.data(), &r, N, C);

    // the GPU
    DeviceRouting dr;
    DeviceBuffers routing_buffers;
    routing_add_buffers(&dr, &routing_buffers, N, E, k, rows_max, C, NULL);
    buffers_allocate(&routing_buffers);
    routing_ready(&dr);
    floatX* d_h = to_device<floatX>(h);
    float* d_routerw = to_device<float>(routerw);
    floatX* d_expert_output = to_device<floatX>(expert_output);
    floatX* d_permuted = cuda_malloc<floatX>((size_t)rows_max * C);
    floatX* d_y = cuda_malloc<floatX>((size_t)N * C);
    router_forward(&dr, d_h, d_routerw, &cfg, N, C, 0);
    permute_tokens(d_permuted, d_h, &dr, C, 0);
    unpermute_tokens(d_y, d_expert_output, &dr, N, C, 0);
    cudaCheck(cudaDeviceSynchronize());

    char shape[160], name[256];
    snprintf(shape, sizeof(shape), "%s N=%d C=%d E=%d k=%d%s", m.name, N, C, E, k, distinct > 0 ? " tied tokens" : "");
    std::vector<int> offsets = device_ints(dr.expert_offsets, E + 1);
    bool layout = same_ints(offsets.data(), expert_offsets.data(), E + 1);
    int gpu_rows = offsets[E];
    layout = layout && gpu_rows == rows && same_ints(device_ints(dr.row_token, rows).data(), row_token.data(), rows) &&
             same_ints(device_ints(dr.token_row_offsets, N + 1).data(), token_row_offsets.data(), N + 1) &&
             same_ints(device_ints(dr.token_rows, rows).data(), token_rows.data(), rows);
    char detail[160];
    snprintf(detail, sizeof(detail), "%d rows (twin: %d), expert offsets, row tokens and each token's rows %s", gpu_rows, rows,
             layout ? "equal" : "differ");
    snprintf(name, sizeof(name), "router_forward layout [%s]", shape);
    check_true(name, layout, detail);
    if (layout) {
        std::vector<float> w(rows);
        cudaCheck(cudaMemcpy(w.data(), dr.row_weight, rows * sizeof(float), cudaMemcpyDeviceToHost));
        snprintf(name, sizeof(name), "router_forward combine weights [%s]", shape);
        check_close(name, w, std::vector<float>(row_weight.begin(), row_weight.begin() + rows), 1e-5, 1e-5);
        snprintf(name, sizeof(name), "permute_tokens [%s]", shape);
        std::vector<float> permuted = to_host(d_permuted, (size_t)rows * C);
        check_true(name, memcmp(permuted.data(), permuted_ref.data(), permuted.size() * sizeof(float)) == 0, "every row an exact copy");
        snprintf(name, sizeof(name), "unpermute_tokens [%s]", shape);
        check_close(name, to_host(d_y, (size_t)N * C), y_ref, 1e-5, 1e-2);
    }
    buffers_free(&routing_buffers);
    for (void* p : std::initializer_list<void*>{d_h, d_routerw, d_expert_output, d_permuted, d_y}) { cudaCheck(cudaFree(p)); }
}

// One MoE layer at GPT-2 124M's shape: the routing kernels forward and backward against the
// layer's expert GEMMs
// A timing shape: a routing mode at N tokens, experts of hidden width H = 4C / G
struct TimingShape {
    Mode m;
    int N, G;
};

static void benchmark() {
    const int C = 768;
    const TimingShape shapes[] = {
        {{"top-2 dropless", 8, 2, 1, ROUTER_TOPK, 0.0f, PRIORITY_ORDER}, 8192, 1},
        {{"top-2 capacity 1.25, order", 8, 2, 1, ROUTER_TOPK, 1.25f, PRIORITY_ORDER}, 8192, 1},
        {{"top-2 capacity 1.25, score", 8, 2, 1, ROUTER_TOPK, 1.25f, PRIORITY_SCORE}, 8192, 1},
        {{"expert choice, capacity 2", 8, 2, 1, ROUTER_EXPERT, 2.0f, PRIORITY_ORDER}, 8192, 1},
        // B=64 x T=1024, the benchmark's batch: the layout's single block sees 8x the tokens (BF16 only)
        {{"top-2 dropless", 8, 2, 1, ROUTER_TOPK, 0.0f, PRIORITY_ORDER}, 65536, 1},
        {{"top-8 of 64, G=8, dropless", 64, 8, 1, ROUTER_TOPK, 0.0f, PRIORITY_ORDER}, 65536, 8},
    };
    printf("timing: C=%d (%s); median of 20 runs; router_forward = scores + layout\n", C, PRECISION_NAME);
    for (const TimingShape& shape : shapes) {
#if defined(ENABLE_FP32)
        if (shape.N > 8192) { continue; }  // the CUDA-core expert GEMMs would take a minute; the product is bf16
#endif
        const Mode& m = shape.m;
        const int N = shape.N, H = 4 * C / shape.G;
        ModelConfig cfg = routing_config(m, C);
        int rows_max = max_routing_rows(&cfg, N);
        DeviceRouting dr;
        DeviceBuffers routing_buffers;
        routing_add_buffers(&dr, &routing_buffers, N, m.E, m.k, rows_max, C, NULL);
        buffers_allocate(&routing_buffers);
        routing_ready(&dr);
        floatX* d_h = to_device<floatX>(random_vector((size_t)N * C, 21));
        float* d_routerw = to_device<float>(random_vector((size_t)m.E * C, 22, 0.02f));
        floatX* d_rows = cuda_malloc<floatX>((size_t)rows_max * C);
        floatX* d_rows2 = cuda_malloc<floatX>((size_t)rows_max * C);
        floatX* d_y = cuda_malloc<floatX>((size_t)N * C);
        floatX* d_dh = cuda_malloc<floatX>((size_t)N * C);
        float* d_drouterw = cuda_malloc<float>((size_t)m.E * C);
        cudaCheck(cudaMemset(d_drouterw, 0, (size_t)m.E * C * sizeof(float)));
        router_forward(&dr, d_h, d_routerw, &cfg, N, C, 0);
        // the experts' outputs stand in as the permuted inputs (drawing rows_max * C values on
        // the host would take seconds at 65536 tokens); the rows past the used ones are zero
        cudaCheck(cudaMemset(d_rows, 0, (size_t)rows_max * C * sizeof(floatX)));
        permute_tokens(d_rows, d_h, &dr, C, 0);
        float scores_ms = benchmark_ms(20, [&]() { router_scores(&dr, d_h, d_routerw, &cfg, N, C, 0); });
        float layout_ms = benchmark_ms(20, [&]() { route_layout(&dr, &cfg, 0); });
        float permute_ms = benchmark_ms(20, [&]() { permute_tokens(d_rows2, d_h, &dr, C, 0); });
        float unpermute_ms = benchmark_ms(20, [&]() { unpermute_tokens(d_y, d_rows, &dr, N, C, 0); });
        float backward_ms = benchmark_ms(20, [&]() {
            unpermute_tokens_backward(d_rows2, &dr, d_y, d_rows, C, 0);
            permute_tokens_backward(d_dh, d_rows2, &dr, N, C, 0);
            router_backward(d_dh, d_drouterw, &dr, d_h, d_routerw, &cfg, 1.0f / N, 0.0f, N, C, 0);
        });
        // the same layer's expert GEMMs, forward and backward, on the rows this routing made
        int rows = device_ints(dr.expert_offsets, m.E + 1)[m.E];
        floatX* w1 = to_device<floatX>(random_vector((size_t)m.E * H * C, 24, 0.02f));
        floatX* w2 = to_device<floatX>(random_vector((size_t)m.E * C * H, 25, 0.02f));
        floatX* b1 = to_device<floatX>(random_vector((size_t)m.E * H, 26, 0.02f));
        floatX* b2 = to_device<floatX>(random_vector((size_t)m.E * C, 27, 0.02f));
        floatX* fch = cuda_malloc<floatX>((size_t)rows_max * H);
        floatX* fch_gelu = cuda_malloc<floatX>((size_t)rows_max * H);
        floatX* dfch = cuda_malloc<floatX>((size_t)rows_max * H);
        floatX* dfch_gelu = cuda_malloc<floatX>((size_t)rows_max * H);
        float* grads = cuda_malloc<float>((size_t)m.E * (2 * H * C + H + C));
        cudaCheck(cudaMemset(grads, 0, (size_t)m.E * (2 * H * C + H + C) * sizeof(float)));
        float mlp_ms = benchmark_ms(20, [&]() {
            expert_mlp_forward(d_rows2, fch, fch_gelu, d_rows, dr.expert_offsets, rows_max, w1, b1, w2, b2, m.E, C, H, 0);
            expert_mlp_backward(d_rows2, grads, grads + (size_t)m.E * H * C, grads + (size_t)m.E * (H * C + H),
                                grads + (size_t)m.E * (2 * H * C + H), dfch, dfch_gelu, d_rows, d_rows, fch, fch_gelu, dr.expert_offsets,
                                rows_max, w1, w2, m.E, C, H, 0);
        });
        float routing_ms = scores_ms + layout_ms + permute_ms + unpermute_ms + backward_ms;
        printf("%-26s N=%5d H=%4d %6d rows: router_forward %.3f ms (scores %.3f, layout %.3f), permute %.3f ms, unpermute %.3f ms, "
               "backward (all three) %.3f ms; together %.3f ms = %.1f%% of the expert MLP's %.3f ms\n",
               m.name, N, H, rows, scores_ms + layout_ms, scores_ms, layout_ms, permute_ms, unpermute_ms, backward_ms, routing_ms,
               100.0 * routing_ms / mlp_ms, mlp_ms);
        buffers_free(&routing_buffers);
        for (void* p : std::initializer_list<void*>{d_h, d_routerw, d_rows, d_rows2, d_y, d_dh, d_drouterw, w1, w2, b1, b2, fch, fch_gelu, dfch,
                                                    dfch_gelu, grads}) {
            cudaCheck(cudaFree(p));
        }
    }
}

int main(int argc, char** argv) {
    bool quick;
    study_start(argc, argv, "routing", 1, &quick);  // one version: the engine's
    const Mode modes[] = {
        {"top-2 renormalised, dropless", 8, 2, 1, ROUTER_TOPK, 0.0f, PRIORITY_ORDER},
        {"top-1 not renormalised", 4, 1, 0, ROUTER_TOPK, 0.0f, PRIORITY_ORDER},
        {"top-2 capacity 1.0, order priority", 8, 2, 1, ROUTER_TOPK, 1.0f, PRIORITY_ORDER},
        {"top-2 capacity 0.75, score priority", 8, 2, 1, ROUTER_TOPK, 0.75f, PRIORITY_SCORE},
        {"expert choice, capacity 2", 4, 2, 1, ROUTER_EXPERT, 2.0f, PRIORITY_ORDER},
    };
    for (const Mode& m : modes) {
        validate_mode(m, 200, 48);
        validate_mode(m, 200, 48, 7);     // 7 distinct tokens
        validate_mode(m, 2500, 16, 300);  // several tokens per thread of the layout's blocks
    }
    if (!quick) {
        for (const Mode& m : modes) { validate_mode(m, 4096, 768); }
        benchmark();
    }
    printf("%d failures\n", dev_failures);
    return dev_failures;
}
