/*
Kernel study: the fused classifier (kernels/classifier.cuh), cross-entropy and its gradient over
the logits in place, checked against the CPU twin's classifier_forward and classifier_backward.

    make -C dev/cuda PRECISION=BF16          # or PRECISION=FP32; GPU_ARCH=90 to choose
    dev/cuda/bin/BF16/classifier             # every version; `classifier 2` runs version 2 alone
    dev/cuda/bin/BF16/classifier 0 --quick   # the small shapes only, no timing (the CPU emulation)

Per row of logits z (Vp columns, the first V real): loss = log(sum exp z) - z[target], and with a
loss scale d, z becomes d * (softmax(z) - onehot(target)), 0 in the padding. One block of 1024
threads per row in every version; they differ in how often they read the row:
version 1: three passes, the max, then the sum of exp(z - max), then the gradient: the row is
           read three times and written once (the engine's kernel until 2026-12).
version 2: online softmax (Milakov and Gimelshein, 2018): one pass keeps the running max and the
           sum rescaled whenever the max grows, merged over the block in a fixed tree; then the
           gradient. Read twice, written once. The engine's kernel (classifier_forward_backward).
version 3: version 2 with 16-byte loads and stores (8 bf16 or 4 fp32 logits per thread and
           access) instead of one logit; needs Vp a multiple of 8 (GPT-2's 50304 is).
The three share the loss and the gradient's formula (classifier_row_loss, classifier_gradient in
kernels/classifier.cuh): the gradient pass must read z[target] before any thread overwrites it.

Checks per shape and version: the losses (forward only, dloss = 0) and the logits left exactly as
they were; then the losses and dlogits with a loss scale, the padding exactly 0. Shapes: V below
the block's 1024 threads, V not a multiple of anything, targets at the first and the last real
column, a row of rising logits (the online max grows at every logit, the sum is rescaled every
time) and a row with one logit far above the rest (the softmax nearly one-hot).
Tolerances (max |gpu - cpu| / max |cpu|): losses 1e-5 in both precisions (both sides start
from the same floatX logits and sum in fp32, in another order, the twin with its own exp);
dlogits 1e-5 (FP32) and 1e-2 (BF16: the gradient is rounded to bf16, 2^-9 relative).
Speed of light at GPT-2's shape (B*T = 8192 rows, V = 50257, Vp = 50304, bf16): one read of
the logits is 824 MB; the forward and backward need two reads and one write, 2.47 GB, 0.74 ms at
an H100 SXM's 3.35 TB/s (0.51 ms at an H200's 4.8 TB/s). Version 1 moves 3.30 GB. The FLOPs, a
few per logit, are negligible. The timing prints each version's time and its rate counted on the
2.47 GB that any version must move, so the rates compare directly with the memory's peak. A row
(100 KB) does not stay in L1, but 132 blocks' rows (13 MB) do stay in the 50 MB L2: version 1's
extra read may cost less than its bytes suggest, which is what the timing is for.
*/
#include "dev_common.cuh"
#include "../../kernels/classifier.cuh"

#define NUM_VERSIONS 3

// ----------------------------------------------------------------------------
// version 1: three passes

__global__ void classifier_three_pass_kernel(floatX* logits, float* losses, const int* targets, float dloss, int V, int Vp) {
    __shared__ float shared[WARP_SIZE];
    floatX* z = logits + (size_t)blockIdx.x * Vp;
    float maxval = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) { maxval = fmaxf(maxval, to_float(z[v])); }
    maxval = block_reduce_max(maxval, shared);
    float sum = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) { sum += expf(to_float(z[v]) - maxval); }
    sum = block_reduce_sum(sum, shared);
    SoftmaxStats stats = {maxval, sum};
    int target = classifier_row_loss(z, stats, losses, targets);
    if (dloss == 0.0f) { return; }
    for (int v = threadIdx.x; v < Vp; v += blockDim.x) { z[v] = from_float<floatX>(classifier_gradient(to_float(z[v]), v, V, target, stats, dloss)); }
}

// ----------------------------------------------------------------------------
// version 3: online softmax, 16-byte accesses

// PACK logits in one 16-byte load or store
constexpr int PACK = 16 / sizeof(floatX);
union Pack {
    int4 bits;
    floatX x[PACK];
};

__global__ void classifier_packed_kernel(floatX* logits, float* losses, const int* targets, float dloss, int V, int Vp) {
    __shared__ SoftmaxStats shared[WARP_SIZE];
    floatX* z = logits + (size_t)blockIdx.x * Vp;  // 16-byte aligned: Vp % PACK == 0
    SoftmaxStats stats = {-INFINITY, 0.0f};
    for (int v0 = threadIdx.x * PACK; v0 < V; v0 += blockDim.x * PACK) {
        Pack p;
        p.bits = *reinterpret_cast<const int4*>(z + v0);  // the last pack may reach into the padding
        for (int i = 0; i < PACK && v0 + i < V; i++) { stats = softmax_add(stats, to_float(p.x[i])); }
    }
    stats = block_reduce_softmax(stats, shared);
    int target = classifier_row_loss(z, stats, losses, targets);
    if (dloss == 0.0f) { return; }
    for (int v0 = threadIdx.x * PACK; v0 < Vp; v0 += blockDim.x * PACK) {
        Pack p;
        p.bits = *reinterpret_cast<const int4*>(z + v0);
        for (int i = 0; i < PACK; i++) { p.x[i] = from_float<floatX>(classifier_gradient(to_float(p.x[i]), v0 + i, V, target, stats, dloss)); }
        *reinterpret_cast<int4*>(z + v0) = p.bits;
    }
}

static bool version_applies(int version, int Vp) { return version != 3 || Vp % 8 == 0; }

static void run_version(int version, floatX* logits, float* losses, const int* targets, float dloss, int N, int V, int Vp) {
    switch (version) {
        case 1: classifier_three_pass_kernel<<<N, 1024>>>(logits, losses, targets, dloss, V, Vp); break;
        case 2: classifier_forward_backward(logits, losses, targets, dloss, N, V, Vp, 0); break;
        case 3: classifier_packed_kernel<<<N, 1024>>>(logits, losses, targets, dloss, V, Vp); break;
    }
    cudaCheckLaunch();
}

// ----------------------------------------------------------------------------
// checks

// N rows of random logits (standard deviation `spread`), rounded to floatX; row 0 targets the
// first column, row 1 the last real one; with N >= 4, row 2 rises (z[v] = v / V * 8) and row 3
// has one logit 30 above the rest
static void make_inputs(std::vector<float>* logits, std::vector<int>* targets, int N, int V, int Vp, float spread) {
    *logits = random_vector((size_t)N * Vp, 31 + V, spread);
    targets->resize(N);
    for (int i = 0; i < N; i++) {
        float* z = logits->data() + (size_t)i * Vp;
        if (N >= 4 && i == 2) {
            for (int v = 0; v < V; v++) { z[v] = 8.0f * v / V; }
        }
        if (N >= 4 && i == 3) { z[V / 3] = 30.0f; }
        for (int v = V; v < Vp; v++) { z[v] = 1e4f; }  // padding: would dominate the softmax if it entered
        (*targets)[i] = i == 0 ? 0 : i == 1 ? V - 1 : (int)(random_u64(41, (uint64_t)V, i) % V);
    }
    *logits = round_to_floatX(*logits);
}

static void validate(int version, int N, int V, int Vp, float spread) {
    std::vector<float> logits;
    std::vector<int> targets;
    make_inputs(&logits, &targets, N, V, Vp, spread);
    float dloss = 1.0f / N;

    // the CPU twin
    std::vector<float> losses_ref(N), row_max(N), row_sum(N), dlogits_ref = logits;
    cpu::classifier_forward(losses_ref.data(), row_max.data(), row_sum.data(), logits.data(), targets.data(), N, V, Vp);
    cpu::classifier_backward(dlogits_ref.data(), row_max.data(), row_sum.data(), targets.data(), dloss, N, V, Vp);

    // the GPU: forward only, then forward and backward
    floatX* d_logits = to_device<floatX>(logits);
    float* d_losses = cuda_malloc<float>(N);
    int* d_targets = cuda_malloc<int>(N);
    cudaCheck(cudaMemcpy(d_targets, targets.data(), N * sizeof(int), cudaMemcpyHostToDevice));
    char shape[96], name[160];
    snprintf(shape, sizeof(shape), "version %d, N=%d V=%d Vp=%d spread %g", version, N, V, Vp, spread);

    run_version(version, d_logits, d_losses, d_targets, 0.0f, N, V, Vp);
    snprintf(name, sizeof(name), "classifier forward losses [%s]", shape);
    check_close(name, to_host(d_losses, N), losses_ref, 1e-5, 1e-5);
    std::vector<float> after = to_host(d_logits, (size_t)N * Vp);
    snprintf(name, sizeof(name), "classifier forward leaves the logits [%s]", shape);
    check_true(name, memcmp(after.data(), logits.data(), after.size() * sizeof(float)) == 0, "every logit as it was");

    cudaCheck(cudaMemset(d_losses, 0xFF, N * sizeof(float)));  // NaN: the second run must write them again
    run_version(version, d_logits, d_losses, d_targets, dloss, N, V, Vp);
    snprintf(name, sizeof(name), "classifier losses with the gradient [%s]", shape);
    check_close(name, to_host(d_losses, N), losses_ref, 1e-5, 1e-5);
    std::vector<float> dlogits = to_host(d_logits, (size_t)N * Vp);
    snprintf(name, sizeof(name), "classifier dlogits [%s]", shape);
    check_close(name, dlogits, dlogits_ref, 1e-5, 1e-2);
    bool padding_zero = true;
    for (int i = 0; i < N; i++) {
        for (int v = V; v < Vp; v++) { padding_zero &= dlogits[(size_t)i * Vp + v] == 0.0f; }
    }
    snprintf(name, sizeof(name), "classifier dlogits padding [%s]", shape);
    check_true(name, padding_zero, "every padding column exactly 0");

    for (void* p : std::initializer_list<void*>{d_logits, d_losses, d_targets}) { cudaCheck(cudaFree(p)); }
}

// ----------------------------------------------------------------------------
// timing

static void benchmark(int only) {
    const int N = 8 * 1024, V = 50257, Vp = 50304;
    std::vector<float> logits;
    std::vector<int> targets;
    make_inputs(&logits, &targets, N, V, Vp, 2.0f);
    floatX* d_logits = to_device<floatX>(logits);
    float* d_losses = cuda_malloc<float>(N);
    int* d_targets = cuda_malloc<int>(N);
    cudaCheck(cudaMemcpy(d_targets, targets.data(), N * sizeof(int), cudaMemcpyHostToDevice));
    double row_bytes = (double)Vp * sizeof(floatX) * N;
    printf("timing: N=%d V=%d Vp=%d (%s); median of 20 runs; GB/s counted on the bytes any version must move\n", N, V, Vp, PRECISION_NAME);
    for (int version = 1; version <= NUM_VERSIONS; version++) {
        if ((only != 0 && version != only) || !version_applies(version, Vp)) { continue; }
        float forward_ms = benchmark_ms(20, [&]() { run_version(version, d_logits, d_losses, d_targets, 0.0f, N, V, Vp); });
        // in place: after the first run the logits are gradients; the bytes and exps are the same
        float both_ms = benchmark_ms(20, [&]() { run_version(version, d_logits, d_losses, d_targets, 1.0f / N, N, V, Vp); });
        printf("version %d: forward (losses only) %.3f ms, %.0f GB/s; forward and backward %.3f ms, %.0f GB/s\n", version, forward_ms,
               row_bytes / forward_ms * 1e-6, both_ms, 3.0 * row_bytes / both_ms * 1e-6);
    }
    for (void* p : std::initializer_list<void*>{d_logits, d_losses, d_targets}) { cudaCheck(cudaFree(p)); }
}

int main(int argc, char** argv) {
    bool quick;
    int only = study_start(argc, argv, "classifier", NUM_VERSIONS, &quick);
    struct Shape {
        int N, V, Vp;
        float spread;
    };
    const Shape shapes[] = {
        {4, 50, 64, 2.0f},      // fewer logits than threads
        {5, 1000, 1008, 4.0f},  // most threads one logit
        {4, 3001, 3008, 2.0f},  // V odd: the last pack partly padding
    };
    const Shape large[] = {
        {6, 50257, 50304, 2.0f},  // GPT-2
        {3, 32000, 32000, 8.0f},  // no padding, a peaked softmax
    };
    for (int version = 1; version <= NUM_VERSIONS; version++) {
        if (only != 0 && version != only) { continue; }
        for (const Shape& s : shapes) {
            if (version_applies(version, s.Vp)) { validate(version, s.N, s.V, s.Vp, s.spread); }
        }
        for (const Shape& s : large) {
            if (!quick && version_applies(version, s.Vp)) { validate(version, s.N, s.V, s.Vp, s.spread); }
        }
    }
    if (!quick) { benchmark(only); }
    printf("%d failures\n", dev_failures);
    return dev_failures;
}
