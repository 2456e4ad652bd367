/*
Kernel study: the encoder's backward (kernels/encoder.cuh), dwte[token] += the gradient rows of
every position holding that token and dwpe[t] += the rows at position t, without float atomics,
checked against the CPU twin's encoder_backward; and the forward against encoder_forward.

    make -C dev/cuda PRECISION=BF16       # or PRECISION=FP32; GPU_ARCH=90 to choose
    dev/cuda/bin/BF16/encoder             # both versions, then timing
    dev/cuda/bin/BF16/encoder 2           # version 2 alone
    dev/cuda/bin/BF16/encoder 0 --quick   # the small shapes only, no timing (the CPU emulation)

Both versions sort the positions by token on the host (stably: a bucket per token, its positions
in order) and sum each bucket's rows in a fixed order, so each is deterministic:
version 1: a block per bucket, 256 threads over the channels, each walking the whole bucket
           (the engine's kernel until 2026-12). In text a few tokens hold a large share of the
           positions (Tiny Shakespeare at B=64, T=1024: the newline 4,900 of 65,536, the comma
           3,900), and the block with the longest bucket works alone long after the others:
           for each of its channels, one load after another, the whole bucket long.
version 2: the buckets cut into chunks of 64 positions, a block per chunk and 256 channels,
           each thread's loads 8 at a time ahead of their adds; a bucket of one chunk adds its
           sum into dwte directly, a longer one writes a partial sum per chunk, which a second
           kernel adds in chunk order (encoder_backward, the engine's).
The two sum in different orders (version 2: chunk sums, then their sum), so their results differ
in the last bits; each is checked against the twin, which walks the positions in order.

Checks per version: dwte and dwpe, added onto random gradients already there (the backward
accumulates over micro-batches), on random tokens from a small vocabulary; on tokens placed so
that buckets have exactly 64 positions (one full chunk), 65 (a chunk and one), 128 and 200
(several chunks, the last partial), with C = 300 (a channel block only partly used); on a batch
of one token only (one bucket of every position); and on a text-like batch (Zipf's law over
GPT-2's vocabulary) at C = 768. Then the encoder forward. Tolerances: dwte and dwpe 1e-5 in
both precisions (fp32 sums on both sides, of the same floatX inputs, in another order); the
forward exact in FP32, 1e-2 in BF16 (the output is rounded to bf16, 2^-9 relative).

Speed of light at the timing shape (B=64, T=1024, C=768, bf16, tokens by Zipf's law over 50,257
with exponent 1, so that the commonest token is 8.8% of them, as the newline in Tiny
Shakespeare): dout is read twice, once for dwte and once for dwpe (2 x 100.7 MB), dwte read and
written at each distinct token's row (fp32; about 15,200 distinct tokens, 93 MB), dwpe at each
position's (6.3 MB): 0.30 GB, 0.09 ms at an H100's 3.35 TB/s. The timing prints those bytes (from
the batch's own count of distinct tokens) and the rate over them. The FLOPs, one add per
element read, do not count. The host's share (the stable sort and the chunks), which the engine
runs while the GPU computes the forward, is timed too.
*/
#include <chrono>
#include "dev_common.cuh"
#include "../../kernels/encoder.cuh"

#define NUM_VERSIONS 2

// ----------------------------------------------------------------------------
// version 1: a block per bucket

// positions (N) sorted stably by token, bucket starts (N+1) and the token of each bucket (N);
// returns the number of buckets
static int prepare_buckets(const int* tokens, int N, int* positions, int* starts, int* bucket_tokens) {
    for (int i = 0; i < N; i++) { positions[i] = i; }
    std::stable_sort(positions, positions + N, [&](int a, int b) { return tokens[a] < tokens[b]; });
    int buckets = 0;
    for (int i = 0; i < N; i++) {
        if (i == 0 || tokens[positions[i]] != tokens[positions[i - 1]]) {
            starts[buckets] = i;
            bucket_tokens[buckets] = tokens[positions[i]];
            buckets++;
        }
    }
    starts[buckets] = N;
    return buckets;
}

__global__ void encoder_backward_bucket_kernel(float* dwte, const floatX* dout, const int* positions, const int* starts,
                                               const int* bucket_tokens, int C) {
    int b = blockIdx.x;
    int first = starts[b], last = starts[b + 1];
    float* row = dwte + (size_t)bucket_tokens[b] * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float sum = 0.0f;
        for (int i = first; i < last; i++) { sum += to_float(dout[(size_t)positions[i] * C + c]); }
        row[c] += sum;
    }
}

// ----------------------------------------------------------------------------
// both versions: the host's share, then the device's

struct Batch {
    int B, T, N;
    std::vector<int> host;  // version 1: positions, starts, bucket tokens; version 2: an encoder_chunk_ints buffer
    int* device;
    int num_buckets;        // version 1
    EncoderChunks chunks;   // version 2: into `device`
};

// the host's share for `tokens` (not uploaded)
static void prepare(int version, Batch* b, const std::vector<int>& tokens) {
    int N = b->N;
    if (version == 1) {
        b->host.resize(3 * (size_t)N + 1);
        b->num_buckets = prepare_buckets(tokens.data(), N, b->host.data(), b->host.data() + N, b->host.data() + 2 * N + 1);
    } else {
        b->host.resize(encoder_chunk_ints(N));
        EncoderChunks h = encoder_chunks_at(b->host.data(), N);
        encoder_prepare_chunks(tokens.data(), N, &h);
        b->chunks.num_chunks = h.num_chunks;
        b->chunks.num_split = h.num_split;
    }
}

static Batch make_batch(int version, const std::vector<int>& tokens, int B, int T) {
    Batch b;
    b.B = B;
    b.T = T;
    b.N = B * T;
    prepare(version, &b, tokens);
    b.device = cuda_malloc<int>(b.host.size());
    cudaCheck(cudaMemcpy(b.device, b.host.data(), b.host.size() * sizeof(int), cudaMemcpyHostToDevice));
    if (version == 2) {
        EncoderChunks counts = b.chunks;
        b.chunks = encoder_chunks_at(b.device, b.N);
        b.chunks.num_chunks = counts.num_chunks;
        b.chunks.num_split = counts.num_split;
    }
    return b;
}

static void run_version(int version, const Batch& b, float* dwte, float* dwpe, float* scratch, const floatX* dout, int C) {
    if (version == 1) {
        int N = b.N;
        encoder_backward_bucket_kernel<<<b.num_buckets, 256>>>(dwte, dout, b.device, b.device + N, b.device + 2 * N + 1, C);
        cudaCheckLaunch();
        encoder_backward_wpe_kernel<<<ceil_div_int((long long)b.T * C, 256), 256>>>(dwpe, dout, b.B, b.T, C);
        cudaCheckLaunch();
    } else {
        encoder_backward(dwte, dwpe, scratch, dout, b.chunks, b.B, b.T, C, 0);
    }
}

// ----------------------------------------------------------------------------
// inputs

// N tokens by Zipf's law with exponent 1 over V: P(rank r) ~ 1/r; rank r is token (r - 1) * 7919 % V
// (7919 is prime, so every token appears once), so that the common tokens are not all at the start
static std::vector<int> zipf_tokens(int N, int V, uint64_t seed) {
    std::vector<double> cdf(V);
    double total = 0.0;
    for (int r = 1; r <= V; r++) { cdf[r - 1] = total += 1.0 / r; }
    std::vector<int> tokens(N);
    for (int i = 0; i < N; i++) {
        double u = random_uniform(seed, 5, i) * total;
        int rank = (int)(std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
        tokens[i] = (int)((long long)std::min(rank, V - 1) * 7919 % V);
    }
    return tokens;
}

// random tokens below V, then `count` positions of each of `tokens` at positions spread over the batch
static std::vector<int> placed_tokens(int N, int V, const std::vector<std::pair<int, int>>& placed, uint64_t seed) {
    std::vector<int> tokens(N);
    int first_free = 0;
    for (const std::pair<int, int>& p : placed) { first_free = std::max(first_free, p.first + 1); }
    for (int i = 0; i < N; i++) { tokens[i] = first_free + (int)(random_u64(seed, 3, i) % (uint64_t)(V - first_free)); }
    int next = 0;
    for (const std::pair<int, int>& p : placed) {
        for (int j = 0; j < p.second; j++) {
            tokens[(size_t)next * 7 % N] = p.first;  // 7 is coprime with the (power of two) N
            next++;
        }
    }
    return tokens;
}

// ----------------------------------------------------------------------------
// checks

static void validate(int version, const char* what, const std::vector<int>& tokens, int B, int T, int C, int V) {
    int N = B * T;
    std::vector<float> dout = round_to_floatX(random_vector((size_t)N * C, 11 + C));
    std::vector<float> dwte_ref = random_vector((size_t)V * C, 13, 0.1f), dwpe_ref = random_vector((size_t)T * C, 17, 0.1f);
    floatX* d_dout = to_device<floatX>(dout);
    float* d_dwte = to_device<float>(dwte_ref);
    float* d_dwpe = to_device<float>(dwpe_ref);
    float* d_scratch = cuda_malloc<float>(encoder_backward_scratch_floats(N, C));
    cpu::encoder_backward(dwte_ref.data(), dwpe_ref.data(), dout.data(), tokens.data(), B, T, C);

    Batch b = make_batch(version, tokens, B, T);
    run_version(version, b, d_dwte, d_dwpe, d_scratch, d_dout, C);
    char shape[128], name[192];
    snprintf(shape, sizeof(shape), "version %d, %s, B=%d T=%d C=%d V=%d", version, what, B, T, C, V);
    if (version == 2) {
        snprintf(shape + strlen(shape), sizeof(shape) - strlen(shape), ": %d chunks, %d buckets split", b.chunks.num_chunks, b.chunks.num_split);
    }
    snprintf(name, sizeof(name), "encoder backward dwte [%s]", shape);
    check_close(name, to_host(d_dwte, (size_t)V * C), dwte_ref, 1e-5, 1e-5);
    snprintf(name, sizeof(name), "encoder backward dwpe [%s]", shape);
    check_close(name, to_host(d_dwpe, (size_t)T * C), dwpe_ref, 1e-5, 1e-5);
    for (void* p : std::initializer_list<void*>{d_dout, d_dwte, d_dwpe, d_scratch, b.device}) { cudaCheck(cudaFree(p)); }
}

static void validate_forward(int B, int T, int C, int V) {
    int N = B * T;
    std::vector<int> tokens = placed_tokens(N, V, {}, 19);
    std::vector<float> wte = round_to_floatX(random_vector((size_t)V * C, 23)), wpe = round_to_floatX(random_vector((size_t)T * C, 29));
    std::vector<float> out_ref((size_t)N * C);
    cpu::encoder_forward(out_ref.data(), tokens.data(), wte.data(), wpe.data(), B, T, C);
    floatX* d_wte = to_device<floatX>(wte);
    floatX* d_wpe = to_device<floatX>(wpe);
    floatX* d_out = cuda_malloc<floatX>((size_t)N * C);
    int* d_tokens = cuda_malloc<int>(N);
    cudaCheck(cudaMemcpy(d_tokens, tokens.data(), N * sizeof(int), cudaMemcpyHostToDevice));
    encoder_forward(d_out, d_tokens, d_wte, d_wpe, B, T, C, 0);
    char name[128];
    snprintf(name, sizeof(name), "encoder forward [B=%d T=%d C=%d V=%d]", B, T, C, V);
    check_close(name, to_host(d_out, (size_t)N * C), out_ref, 0.0, 1e-2);
    for (void* p : std::initializer_list<void*>{d_wte, d_wpe, d_out, d_tokens}) { cudaCheck(cudaFree(p)); }
}

// ----------------------------------------------------------------------------
// timing

static void benchmark(int only) {
    const int B = 64, T = 1024, C = 768, V = 50257, N = B * T;
    std::vector<int> tokens = zipf_tokens(N, V, 31);
    std::vector<int> sorted = tokens;
    std::sort(sorted.begin(), sorted.end());
    int distinct = 0, longest = 0;
    for (int i = 0, j = 0; i < N; i = j) {  // the runs of equal tokens: the buckets
        for (j = i; j < N && sorted[j] == sorted[i]; j++) {}
        distinct++;
        longest = std::max(longest, j - i);
    }
    floatX* d_dout = to_device<floatX>(random_vector((size_t)N * C, 37));
    float* d_dwte = cuda_malloc<float>((size_t)V * C);
    float* d_dwpe = cuda_malloc<float>((size_t)T * C);
    float* d_scratch = cuda_malloc<float>(encoder_backward_scratch_floats(N, C));
    cudaCheck(cudaMemset(d_dwte, 0, (size_t)V * C * sizeof(float)));
    cudaCheck(cudaMemset(d_dwpe, 0, (size_t)T * C * sizeof(float)));
    double bytes = 2.0 * N * C * sizeof(floatX) + 2.0 * (distinct + T) * C * sizeof(float);
    printf("timing: B=%d T=%d C=%d (%s), %d distinct tokens, the commonest %d times (%.1f%%); median of 20 runs; "
           "GB/s over the %.1f MB any version must move\n", B, T, C, PRECISION_NAME, distinct, longest, 100.0 * longest / N, bytes * 1e-6);
    for (int version = 1; version <= NUM_VERSIONS; version++) {
        if (only != 0 && version != only) { continue; }
        Batch b = make_batch(version, tokens, B, T);
        std::vector<double> host_ms(5);
        for (double& ms : host_ms) {
            auto start = std::chrono::steady_clock::now();
            prepare(version, &b, tokens);
            ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
        }
        std::sort(host_ms.begin(), host_ms.end());
        float ms = benchmark_ms(20, [&]() { run_version(version, b, d_dwte, d_dwpe, d_scratch, d_dout, C); });
        printf("version %d: %.3f ms, %.0f GB/s; the host's sort and buckets %.2f ms\n", version, ms, bytes / ms * 1e-6, host_ms[2]);
        cudaCheck(cudaFree(b.device));
    }
    for (void* p : std::initializer_list<void*>{d_dout, d_dwte, d_dwpe, d_scratch}) { cudaCheck(cudaFree(p)); }
}

int main(int argc, char** argv) {
    bool quick;
    int only = study_start(argc, argv, "encoder", NUM_VERSIONS, &quick);
    for (int version = 1; version <= NUM_VERSIONS; version++) {
        if (only != 0 && version != only) { continue; }
        validate(version, "random tokens", placed_tokens(32, 50, {}, 41), 2, 16, 32, 50);
        validate(version, "buckets of 64, 65, 128 and 200", placed_tokens(512, 1000, {{7, 200}, {9, 64}, {11, 65}, {13, 128}}, 43), 4, 128, 300, 1000);
        validate(version, "one token only", std::vector<int>(512, 3), 2, 256, 64, 10);
        if (!quick) { validate(version, "Zipf's law", zipf_tokens(8 * 1024, 50257, 47), 8, 1024, 768, 50257); }
    }
    validate_forward(2, 16, 32, 50);
    if (!quick) { validate_forward(8, 1024, 768, 50257); }
    if (!quick) { benchmark(only); }
    printf("%d failures\n", dev_failures);
    return dev_failures;
}
