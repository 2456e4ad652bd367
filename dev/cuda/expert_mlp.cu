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
version 3: the six GEMMs on Hopper's wgmma (kernels/wgmma.cuh; BF16 builds for sm_90a, which
           the Makefile makes for GPU_ARCH=90): 128 x 128 tiles of two warpgroups, a ring of 4
           cp.async stages 64 deep, operands staged K-major or MN-major as they lie in memory
           and read with wgmma's transpose bit. Described in doc/kernels.md; not yet run on a GPU.
Version 2 graduated: expert_mlp_forward/backward use it where it applies, version 1 elsewhere.
Version 3 is in the engine too, taken only when asked for (train_moe --expert-gemm 3) until a GPU
has checked and timed it here.

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

// version 3 exists in BF16 builds with an sm_90a target (the Makefile's GPU_ARCH=90 defines
// ENABLE_WGMMA; so does the CPU emulation) and runs on an sm_90 GPU
static bool version_applies(int version, int C, int H) {
#if defined(ENABLE_FP32)
    (void)C; (void)H;
    return version == 1;
#else
    if (version == 3 && !expert_wgmma_here()) { return false; }
    return version == 1 || ((version == 2 || version == 3) && C % 8 == 0 && H % 8 == 0);
#endif
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
        expert_mlp_forward(d_out, d_fch, d_fch_gelu, d_inp, d_offsets, max_rows, d_fcw, d_fcb, d_fcprojw, d_fcprojb, E, C, H, 0, version);
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
            expert_mlp_backward(d_dinp, d_dfcw, d_dfcb, d_dfcprojw, d_dfcprojb, d_dfch, d_dfch_gelu, d_dout, d_inp, d_fch, d_fch_gelu,
                                d_offsets, max_rows, d_fcw, d_fcprojw, E, C, H, 0, version);
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
        {"fc forward (+bias, GELU)", [&](int v) { rows_gemm(v, y_h, g_h, x_c, w_hc, true, b_h, d_offsets, rows, E, H, C, 0); },
         [&]() { matmul_forward(y_h, x_c, w_hc, b_h, rows, C, H, 0); }, true},
        {"fcproj forward (+bias)", [&](int v) { rows_gemm(v, y_c, NULL, x_h, w_ch, true, b_c, d_offsets, rows, E, C, H, 0); },
         [&]() { matmul_forward(y_c, x_h, w_ch, b_c, rows, H, C, 0); }, true},
        {"fcproj backward dX", [&](int v) { rows_gemm(v, y_h, NULL, x_c, w_ch, false, NULL, d_offsets, rows, E, H, C, 0); },
         [&]() { cublaslt_matmul(y_h, CUDA_FLOATX, H, w_ch, false, H, x_c, false, C, H, rows, C, NULL, 0.0f, 0); }, false},
        {"fcproj backward dW", [&](int v) { weights_gemm(v, dw, x_c, x_h, d_offsets, E, C, H, 0); },
         [&]() { cublaslt_matmul(dw, CUDA_R_32F, H, x_h, false, H, x_c, true, C, H, C, rows, NULL, 1.0f, 0); }, false},
        {"fc backward dX", [&](int v) { rows_gemm(v, y_c, NULL, x_h, w_hc, false, NULL, d_offsets, rows, E, C, H, 0); },
         [&]() { cublaslt_matmul(y_c, CUDA_FLOATX, C, w_hc, false, C, x_h, false, H, C, rows, H, NULL, 0.0f, 0); }, false},
        {"fc backward dW", [&](int v) { weights_gemm(v, dw, x_h, x_c, d_offsets, E, H, C, 0); },
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
