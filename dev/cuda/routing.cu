/*
Kernel study: the routing and the permutation around the experts (kernels/router.cuh,
kernels/permute.cuh), checked against the CPU twin and timed against the experts' own GEMMs.

    make -C dev/cuda PRECISION=BF16      # or PRECISION=FP32; GPU_ARCH=90 to choose
    dev/cuda/bin/BF16/routing            # checks of both versions, then timing
    dev/cuda/bin/BF16/routing 2          # version 2 alone
    dev/cuda/bin/BF16/routing 0 --quick  # the small shapes only, no timing (the CPU emulation)

The engine's kernels, the study's subject being what the routing costs, in three versions: 1, the
engine's until 2026-12-06; 2, the engine's until 2026-12-07; and 3, the engine's (kernels/router.cuh):
  router_forward   the logits h . Wr^T, in
                   version 1 by a warp per token (E dot products of length C, every warp
                     reading all of Wr for its token: E C floats, 196 KB at E = 64, C = 768),
                   version 2 by router_gemm_kernel (tiles of tokens x experts through shared
                     memory, Wr read once per tile of tokens);
                   then router_scores_kernel (a warp per token: softmax, top-k, combine
                   weights), then the layout, in
                   version 1: E + 2 blocks in all. A block per
                     expert keeps its candidates (the capacity rule) and numbers its rows by
                     scans over all N tokens; one block makes the offsets, every row and each
                     token's rows; one block sums the routing entropy over all N x E p;
                   version 2: only where something may be dropped, the capacity rule by a
                     block per expert over all N tokens (route_keep_v2_kernel); then a
                     counting sort over tiles of about 256 candidates: counts per tile and
                     expert, a block per expert scanning its counts, one block for the offsets
                     and losses, a block per tile placing its candidates (a warp at a time,
                     __match_any_sync for the ranks within a warp) and its tokens' rows;
                   version 3: version 2 with the capacity rule spread over blocks of (chunk of
                     at least 512 tokens, expert), about 1024 of them (route_keep: counts per
                     chunk, a plan per expert, the radix select's histograms per chunk);
  permute_tokens   a warp per row gathers its token's h row;
  unpermute_tokens a warp per token sums its rows times their combine weights, in combine order;
  and in the backward unpermute_tokens_backward, permute_tokens_backward and router_backward:
  router_backward_kernel (a warp per token: dz), then the products dh += dz . Wr and dWr +=
  dz^T h (partial sums over chunks of 128 tokens, then the chunks summed by column_sums), in version 1 by a warp
  per token for dh (all of Wr again) and a block per (chunk, 128 channels, expert) for dWr (the
  chunk's h read once per expert), in versions 2 and 3 by router_gemm_kernel.
The design target: routing, permutation and un-permutation together under 5% of a step. The
timing prints them, per MoE layer and forward plus backward, beside the same layer's expert
GEMMs (kernels/expert_mlp.cuh), which are about two thirds of an MoE layer's FLOPs.

Checks per version and routing mode (dropless top-2, renormalised or not; a capacity
with order and with score priority; expert choice; version 2 only where something may be
dropped, as it is version 3 elsewhere; and, for versions 2 and 3, 300 experts top-4 and
expert choice among 300, for more experts than a tile block has threads and more candidates per
token than a tile holds; and 8300 tokens top-32 of 64, for more tiles than a scan's pass takes), on inputs whose logits have no near-ties, and on inputs made of a few distinct tokens
repeated, whose exact ties the capacity cuts through: the row layout (expert_offsets, the token
of every row, each token's rows) equal to the twin's, the combine weights of the rows, the
permuted rows (an exact copy), the un-permuted output, the assignments and dropped counts
(exactly), the balance and z losses and the routing entropy; then router_backward from random
combine-weight gradients with both auxiliary losses: dz, dh (added onto a random dh) and dWr
against the twin's router_backward.
Tolerances: combine weights 1e-5 (fp32 softmax on both sides, dot products summed in another
order); losses and entropy 1e-5 (the same, and sums in another order); un-permuted output 1e-5
(FP32) and 1e-2 (BF16: the output is rounded to bf16, 2^-9); dz and dWr 1e-5 (fp32 on both
sides, sums in another order), dh as the un-permuted output.
The backward of the permutations is checked through the whole model by test_moe.
Speed of light at the timing shapes (C = 768, bf16; router_forward timed as its two steps, the
scores and the layout). 8192 tokens, E = 8, top-2: the router's logits are 2 * N * C * E =
0.1 GFLOP; permute and un-permute each move 16384 rows of 1536 bytes in and out (about 75 MB,
22 us at 3.35 TB/s). 65536 tokens (B=64 x T=1024, the benchmark's batch), top-2 of 8: 8x all of
that; the expert MLP is 6 GEMMs of 2 * rows * C * H = 3.7 TFLOP forward and backward. 65536
tokens, top-8 of 64 (G=8, H=384): 524288 rows, permute 1.6 GB in and out (0.48 ms), logits
6.4 GFLOP in fp32, the expert MLP 1.9 TFLOP. The router's three products (logits, dh, dWr) are
6.4 GFLOP each there, 19 GFLOP in all: 0.29 ms at an H100 SXM's 67 TFLOP/s of fp32 on CUDA cores. Version 1 moves
Wr through L1 and L2 once per token for the logits and again for dh (12.9 GB each at E = 64) and
h once per expert for dWr (6.4 GB); version 2 about 0.3 GB for each product. The layout reads and writes a few ints per
candidate (N * k of them, at most 0.5 M: about 10 MB) and reads p once (N * E floats, 17 MB at
E = 64): about 10 us at full bandwidth. Version 1 is bound by latency instead (its second and
third kernels are single blocks); the two 65536-token shapes say what each version costs where
it matters. Version 2's capacity rule is bound by latency too: E blocks (8 at E = 8) each walk all
N tokens in rounds of 1024, a block scan per round and slot, and four radix passes over the
tokens again where the cut is by score (at N = 65536, about 64 rounds each, with the histogram's
shared-memory atomics all on the few bins that one expert's probabilities fall in); version 3
does the same work over about 1024 blocks, with a warp's atomics on one bin merged into one, and
is bound by its 3 to 11 launches (the 65536-token capacity and expert choice shapes time both).
*/
#include "dev_common.cuh"
#include "../../kernels/router.cuh"
#include "../../kernels/permute.cuh"
#include "../../kernels/expert_mlp.cuh"

// ----------------------------------------------------------------------------
// version 1: the engine's layout until 2026-12-06, E + 2 blocks in all. A block per expert decides
// which of its candidates it keeps (route_keep_expert, below, as version 2's route_keep_v2_kernel) and then
// numbers the kept ones in token order, reading all N tokens' choices; then one block for the
// whole layer computes the expert offsets, every row and each token's rows; and one more block the
// routing entropy over all N x E probabilities (before, the statistics kernel's own pass).
// Versions 2 and 3 (3 the engine's, kernels/router.cuh) spread the same work over tiles of the tokens.

// The capacity rule of versions 1 and 2: a block per expert over all N tokens (version 3, the
// engine's route_keep, spreads it over chunks of the tokens).

// Radix select over the block: the need-th largest key (need >= 1) among expert e's candidates in
// slot j, each thread taking every blockDim.x-th token. Returns the key and sets *ties_kept to how
// many candidates equal to it are kept (need minus those above it). Four passes of 8 bits from
// the top: a histogram of the candidates that match the digits found so far, then the bin in which
// the need-th largest falls. The histogram counts integers, so the result does not depend on the
// order of the atomics.
__device__ unsigned route_select_key(const DeviceRouting& r, const RouteLayoutArgs& a, int j, int e, int need, int* ties_kept) {
    __shared__ int hist[256];
    __shared__ int found[2];  // the bin of this pass, the need left within it
    unsigned prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) { hist[b] = 0; }
        __syncthreads();  // hist is zero; and every thread has read the last pass's `found`
        for (int t = threadIdx.x; t < a.N; t += blockDim.x) {
            int i = route_candidate(r, a, t, j, e);
            unsigned key = i >= 0 ? route_key(r, a, t, e) : 0u;
            if (i >= 0 && (key & mask) == prefix) { atomicAdd(&hist[(key >> shift) & 255], 1); }
        }
        __syncthreads();
        if (threadIdx.x < WARP_SIZE) { route_find_bin(hist, need, found); }  // the engine's (kernels/router.cuh)
        __syncthreads();
        prefix |= (unsigned)found[0] << shift;
        need = found[1];
        mask |= 255u << shift;
    }
    *ties_kept = need;
    return prefix;
}

// The capacity rule for expert e, by the whole block (route_keep_v2_kernel runs a block per expert,
// only with a capacity, for expert choice, or under the tests' teacher forcing: dropless token
// choice keeps everything). Slot by slot (all first choices before any second choice), a slot's
// candidates are all kept while they fit in what is left of the capacity; in the slot where it
// runs out, the first ones by priority are kept: by order, the first in token order; by score
// (and for expert choice), those above the cut key found by route_select_key, and of those equal
// to it the first in token order. Later slots keep nothing. Writes keep[i] = 0 (kept) or -1
// (choice_row for token choice, pair_row for expert choice: the blocks write disjoint
// candidates). Passes in token order go through tiles of blockDim.x consecutive tokens, a token
// per thread (neighbouring threads read neighbouring tokens' choices), a block scan ordering
// each tile and a running count of the tiles before it.
__device__ void route_keep_expert(const DeviceRouting& r, const RouteLayoutArgs& a, int e, int* scan_shared) {
    int N = a.N, threads = blockDim.x;
    int slots = a.expert_choice ? 1 : a.k;
    int* keep = a.expert_choice ? r.pair_row : r.choice_row;

    int left = a.cap < 0 ? INT_MAX : a.cap;  // rows e may still take
    for (int j = 0; j < slots; j++) {
        int mine = 0, count;
        for (int t = threadIdx.x; t < N; t += threads) { mine += route_candidate(r, a, t, j, e) >= 0; }
        block_exclusive_scan(mine, scan_shared, &count);
        if (r.forced_keep) {  // the tests' teacher forcing
            for (int t = threadIdx.x; t < N; t += threads) {
                int i = route_candidate(r, a, t, j, e);
                if (i >= 0) { keep[i] = r.forced_keep[i] ? 0 : -1; }
            }
            continue;
        }
        // all kept while they fit, none once the capacity is spent; in the slot where it runs out,
        // keys above the cut and the first ties_kept of those equal to it, in token order
        bool cut_here = count > left && left > 0;  // the same in every thread
        unsigned cut = 0;  // by order every key is 0: the first `left` in token order
        int ties_kept = left;
        if (cut_here && route_by_score(a)) { cut = route_select_key(r, a, j, e, left, &ties_kept); }
        int ties_before = 0;  // candidates equal to the cut in the earlier tiles
        for (int base = 0; base < N; base += threads) {
            int t = base + threadIdx.x;
            int i = t < N ? route_candidate(r, a, t, j, e) : -1;
            unsigned key = i >= 0 ? route_key(r, a, t, e) : 0u;
            bool tied = i >= 0 && key == cut;
            int tie = 0, tile_ties = 0;  // this candidate's rank among the tied ones, in token order
            if (cut_here) { tie = ties_before + block_exclusive_scan(tied, scan_shared, &tile_ties); }
            if (i >= 0) { keep[i] = count <= left || (cut_here && (key > cut || (tied && tie < ties_kept))) ? 0 : -1; }
            ties_before += tile_ties;
        }
        left = max(0, left - count);
    }
}

__global__ void __launch_bounds__(ROUTE_THREADS) route_keep_v2_kernel(DeviceRouting r, RouteLayoutArgs a) {
    __shared__ int scan_shared[WARP_SIZE + 1];
    route_keep_expert(r, a, blockIdx.x, scan_shared);
}

__global__ void __launch_bounds__(ROUTE_THREADS) route_select_v1_kernel(DeviceRouting r, RouteLayoutArgs a) {
    __shared__ int scan_shared[WARP_SIZE + 1];
    __shared__ double sum_shared[WARP_SIZE];
    int e = blockIdx.x, N = a.N, threads = blockDim.x, slots = a.expert_choice ? 1 : a.k;
    int* keep = a.expert_choice ? r.pair_row : r.choice_row;
    route_keep_expert(r, a, e, scan_shared);  // keep[i] = 0 or -1 for e's candidates i
    __syncthreads();
    // e's rows, in token order, in tiles of `threads` tokens; its candidates; and P_e's sum
    int rows = 0, candidates = 0;  // e's rows in the earlier tiles; this thread's candidates
    double P = 0.0;
    for (int base = 0; base < N; base += threads) {
        int t = base + threadIdx.x, kept = 0, tile_rows;
        if (t < N) {
            for (int j = 0; j < slots; j++) {
                int i = route_candidate(r, a, t, j, e);
                candidates += i >= 0;
                kept += i >= 0 && keep[i] == 0;
            }
            P += r.probs[(size_t)t * a.E + e];
        }
        int row = rows + block_exclusive_scan(kept, scan_shared, &tile_rows);
        if (t < N) {
            for (int j = 0; j < slots; j++) {
                int i = route_candidate(r, a, t, j, e);
                if (i >= 0 && keep[i] == 0) { keep[i] = row++; }
            }
        }
        rows += tile_rows;
    }
    int all_candidates = block_reduce_sum(candidates, scan_shared);
    P = block_reduce_sum(P, sum_shared);
    if (threadIdx.x == 0) {
        r.tokens_per_expert[e] = rows;
        r.assignments[e] = a.expert_choice ? rows : all_candidates;  // expert choice: the tokens e takes
        r.prob_sums[e] = P;
    }
}

__global__ void __launch_bounds__(ROUTE_THREADS) route_rows_v1_kernel(DeviceRouting r, RouteLayoutArgs a) {
    __shared__ int scan_shared[WARP_SIZE + 1];
    __shared__ double sum_shared[WARP_SIZE];
    int N = a.N, E = a.E, threads = blockDim.x;
    bool ec = a.expert_choice;
    int per_token = route_per_token(ec, E, a.k);
    int* keep = ec ? r.pair_row : r.choice_row;
    if (threadIdx.x == 0) {
        int offset = 0;
        for (int e = 0; e < E; e++) {
            r.expert_offsets[e] = offset;
            offset += r.tokens_per_expert[e];
        }
        int M = ec ? offset : N * a.k;
        double balance = 0.0;
        for (int e = 0; e < E; e++) { balance += (double)r.assignments[e] / M * (r.prob_sums[e] / N); }
        r.expert_offsets[E] = offset;
        r.counts[0] = M;
        r.counts[1] = M - offset;
        *r.balance_loss = (float)(E * balance);
    }
    __syncthreads();  // the offsets are visible to the block
    // each token's rows, in token order, in tiles of `threads` tokens
    int total = 0;  // the rows of the tokens in the earlier tiles
    for (int base = 0; base < N; base += threads) {
        int t = base + threadIdx.x, count = 0, tile_rows;
        if (t < N) {
            for (int j = 0; j < per_token; j++) { count += keep[(size_t)t * per_token + j] >= 0; }
        }
        int at = total + block_exclusive_scan(count, scan_shared, &tile_rows);
        if (t < N) {
            r.token_row_offsets[t] = at;
            for (int j = 0; j < per_token; j++) {
                int i = t * per_token + j;
                if (keep[i] < 0) { continue; }
                int e = route_expert(r, a, i);
                int row = r.expert_offsets[e] + keep[i];
                keep[i] = row;
                r.row_token[row] = t;
                r.row_weight[row] = ec ? r.probs[i] : r.choice_weight[i];
                r.token_rows[at++] = row;
            }
        }
        total += tile_rows;
    }
    double z2 = 0.0;
    for (int t = threadIdx.x; t < N; t += threads) { z2 += (double)r.lse[t] * r.lse[t]; }
    z2 = block_reduce_sum(z2, sum_shared);
    if (threadIdx.x == 0) {
        r.token_row_offsets[N] = total;
        *r.z_loss = (float)(z2 / N);
    }
}

__global__ void __launch_bounds__(ROUTE_THREADS) route_entropy_v1_kernel(DeviceRouting r, int N, int E) {
    __shared__ double shared[WARP_SIZE];
    double h = 0.0;
    for (int t = threadIdx.x; t < N; t += blockDim.x) {
        for (int e = 0; e < E; e++) {
            double p = r.probs[(size_t)t * E + e];
            if (p > 0) { h -= p * log(p); }
        }
    }
    h = block_reduce_sum(h, shared);
    if (threadIdx.x == 0) { *r.entropy = h; }
}

static void route_layout_v1(DeviceRouting* r, const ModelConfig* cfg, cudaStream_t stream) {
    RouteLayoutArgs a = route_layout_args(r, cfg);
    route_select_v1_kernel<<<a.E, ROUTE_THREADS, 0, stream>>>(*r, a);
    cudaCheckLaunch();
    route_rows_v1_kernel<<<1, ROUTE_THREADS, 0, stream>>>(*r, a);
    cudaCheckLaunch();
    route_entropy_v1_kernel<<<1, ROUTE_THREADS, 0, stream>>>(*r, a.N, a.E);
    cudaCheckLaunch();
}

// version 2: the capacity rule by a block per expert, then the engine's row layout
static void route_layout_v2(DeviceRouting* r, const ModelConfig* cfg, cudaStream_t stream) {
    RouteLayoutArgs a = route_layout_args(r, cfg);
    if (a.cap >= 0 || r->forced_keep) {
        route_keep_v2_kernel<<<a.E, ROUTE_THREADS, 0, stream>>>(*r, a);
        cudaCheckLaunch();
    }
    route_rows(r, a, stream);
}

// the layout of the scored tokens by version 1, 2 or 3 (the engine's)
static void run_layout(int version, DeviceRouting* r, const ModelConfig* cfg, cudaStream_t stream) {
    if (version == 1) {
        route_layout_v1(r, cfg, stream);
    } else if (version == 2) {
        route_layout_v2(r, cfg, stream);
    } else {
        route_layout(r, cfg, stream);
    }
}

// Version 1 of the router's products (the engine's until 2026-12-06): the logits and dh by a warp
// per token, each warp reading all of Wr (E C floats) for its token; dWr's partial sums by a block
// per (chunk of tokens, 128 channels, expert), which reads the chunk's h once per expert. Version
// 2 (router_gemm_kernel) reads Wr once per tile of tokens and h once per tile of experts.
__global__ void router_logits_v1_kernel(float* logits, const floatX* h, const float* routerw, int N, int C, int E) {
    int warps = blockDim.x / WARP_SIZE, warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    int t = blockIdx.x * warps + warp;
    if (t >= N) { return; }
    const floatX* ht = h + (size_t)t * C;
    for (int e = 0; e < E; e++) {
        const float* w = routerw + (size_t)e * C;
        float acc = 0.0f;
        for (int c = lane; c < C; c += WARP_SIZE) { acc += to_float(ht[c]) * w[c]; }
        acc = warp_reduce_sum(acc);
        if (lane == 0) { logits[(size_t)t * E + e] = acc; }
    }
}

__global__ void router_dh_v1_kernel(floatX* dh, const float* dlogits, const float* routerw, int N, int C, int E) {
    int warps = blockDim.x / WARP_SIZE, warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    int t = blockIdx.x * warps + warp;
    if (t >= N) { return; }
    floatX* dht = dh + (size_t)t * C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float acc = 0.0f;
        for (int e = 0; e < E; e++) { acc += dlogits[(size_t)t * E + e] * routerw[(size_t)e * C + c]; }
        dht[c] = from_float<floatX>(to_float(dht[c]) + acc);
    }
}

// grid (chunks, ceil(C / 128), E)
__global__ void router_weight_grad_partial_v1_kernel(float* partial, const float* dlogits, const floatX* h, int N, int C, int E) {
    int chunk = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x, e = blockIdx.z;
    if (c >= C) { return; }
    int t0 = chunk * ROUTER_TOKEN_CHUNK, t1 = min(N, t0 + ROUTER_TOKEN_CHUNK);
    float acc = 0.0f;
    for (int t = t0; t < t1; t++) { acc += dlogits[(size_t)t * E + e] * to_float(h[(size_t)t * C + c]); }
    partial[((size_t)chunk * E + e) * C + c] = acc;
}

// router_scores by version 1, or 2 and 3 (the engine's): the logits by either, the rest the engine's
static void run_scores(int version, DeviceRouting* r, const floatX* h, const float* routerw, const ModelConfig* cfg, int n, int C,
                       cudaStream_t stream) {
    if (version == 1) {
        router_begin(r, cfg, n, C);
        router_logits_v1_kernel<<<ceil_div_int(n, 8), 8 * WARP_SIZE, 0, stream>>>(r->logits, h, routerw, n, C, cfg->num_experts);
        cudaCheckLaunch();
        router_choose(r, cfg, n, stream);
    } else {
        router_scores(r, h, routerw, cfg, n, C, stream);
    }
}

// router_backward by version 1, or 2 and 3 (the engine's): dz by the engine's kernel, the products by either
static void run_backward(int version, floatX* dh, float* drouterw, DeviceRouting* r, const floatX* h, const float* routerw,
                         const ModelConfig* cfg, float alpha, float beta, int n, int C, cudaStream_t stream) {
    int E = cfg->num_experts, chunks = ceil_div_int(n, ROUTER_TOKEN_CHUNK);
    router_dlogits(r, cfg, alpha, beta, n, stream);
    if (version == 1) {
        router_dh_v1_kernel<<<ceil_div_int(n, 8), 8 * WARP_SIZE, 0, stream>>>(dh, r->dlogits, routerw, n, C, E);
        cudaCheckLaunch();
        router_weight_grad_partial_v1_kernel<<<dim3(chunks, ceil_div_int(C, 128), E), 128, 0, stream>>>(r->drouterw_partial, r->dlogits, h,
                                                                                                        n, C, E);
        cudaCheckLaunch();
        router_weight_grad_sum(drouterw, r->drouterw_partial, n, C, E, stream);
    } else {
        router_products_backward(dh, drouterw, r, h, routerw, n, C, E, stream);
    }
}

// ----------------------------------------------------------------------------

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
static void validate_mode(int version, const Mode& m, int N, int C, int distinct = 0) {
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
    routing_add_buffers(&dr, &routing_buffers, &cfg, N, NULL);
    buffers_allocate(&routing_buffers);
    routing_ready(&dr);
    floatX* d_h = to_device<floatX>(h);
    float* d_routerw = to_device<float>(routerw);
    floatX* d_expert_output = to_device<floatX>(expert_output);
    floatX* d_permuted = cuda_malloc<floatX>((size_t)rows_max * C);
    floatX* d_y = cuda_malloc<floatX>((size_t)N * C);
    run_scores(version, &dr, d_h, d_routerw, &cfg, N, C, 0);
    run_layout(version, &dr, &cfg, 0);
    permute_tokens(d_permuted, d_h, &dr, C, 0);
    unpermute_tokens(d_y, d_expert_output, &dr, N, C, 0);
    cudaCheck(cudaDeviceSynchronize());

    char shape[160], name[256];
    snprintf(shape, sizeof(shape), "version %d, %s N=%d C=%d E=%d k=%d%s", version, m.name, N, C, E, k, distinct > 0 ? " tied tokens" : "");
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
    // what the layout adds up: the counts exactly, the losses and the entropy to 1e-5 (sums of
    // the same fp32 probabilities in another order, and dot products summed in another order)
    std::vector<int> assigned = device_ints(dr.assignments, E), counts = device_ints(dr.counts, 2);
    bool counted = same_ints(assigned.data(), assignments.data(), E) && counts[0] == r.num_assignments && counts[1] == r.num_dropped;
    snprintf(detail, sizeof(detail), "assignments of each expert %s, %d in all, %d dropped (twin: %d, %d)", counted ? "equal" : "differ",
             counts[0], counts[1], r.num_assignments, r.num_dropped);
    snprintf(name, sizeof(name), "router_forward counts [%s]", shape);
    check_true(name, counted, detail);
    float balance, z, gpu_balance, gpu_z;
    double gpu_entropy;
    cpu::router_aux_losses(&balance, &z, logits.data(), probs.data(), &r, N, E);
    cpu::RoutingStats stats = {};
    cpu::routing_stats_add(&stats, &r, probs.data(), N, E);
    cudaCheck(cudaMemcpy(&gpu_balance, dr.balance_loss, sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(&gpu_z, dr.z_loss, sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(&gpu_entropy, dr.entropy, sizeof(double), cudaMemcpyDeviceToHost));
    snprintf(name, sizeof(name), "router_forward balance loss [%s]", shape);
    check_close(name, {gpu_balance}, {balance}, 1e-5, 1e-5);
    snprintf(name, sizeof(name), "router_forward z loss [%s]", shape);
    check_close(name, {gpu_z}, {z}, 1e-5, 1e-5);
    snprintf(name, sizeof(name), "router_forward routing entropy per token [%s]", shape);
    check_close(name, {(float)(gpu_entropy / N)}, {(float)(stats.entropy_sum / N)}, 1e-5, 1e-5);

    // the backward from random combine-weight gradients (the rows are the twin's: the layout
    // check above), with the balance and z terms: dz, then dh += dz . Wr onto a random dh, and dWr
    if (layout) {
        const float alpha = 0.01f, beta = 0.001f;
        std::vector<float> drow_weight = random_vector(std::max(rows, 1), 14 + E);
        std::vector<float> dh_ref = round_to_floatX(random_vector((size_t)N * C, 15 + E)), drouterw_ref((size_t)E * C, 0.0f);
        floatX* d_dh = to_device<floatX>(dh_ref);
        float* d_drouterw = to_device<float>(drouterw_ref);
        cudaCheck(cudaMemcpy(dr.drow_weight, drow_weight.data(), rows * sizeof(float), cudaMemcpyHostToDevice));
        if (version == 3) {
            // the tiles (versions 2 and 3) sum each output over k in the same order as version 1's
            // warps, one fused multiply-add at a time: the same bits
            floatX* d_dh1 = to_device<floatX>(dh_ref);
            float* d_drouterw1 = to_device<float>(drouterw_ref);
            run_backward(1, d_dh1, d_drouterw1, &dr, d_h, d_routerw, &cfg, alpha, beta, N, C, 0);
            run_backward(3, d_dh, d_drouterw, &dr, d_h, d_routerw, &cfg, alpha, beta, N, C, 0);
            auto same_bits = [](const std::vector<float>& x, const std::vector<float>& y) {
                return x.size() == y.size() && memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
            };
            bool same = same_bits(to_host(d_dh, (size_t)N * C), to_host(d_dh1, (size_t)N * C)) &&
                        same_bits(to_host(d_drouterw, (size_t)E * C), to_host(d_drouterw1, (size_t)E * C));
            snprintf(name, sizeof(name), "router_backward dh and drouterw, versions 1 and 3 [%s]", shape);
            check_true(name, same, same ? "bit-identical" : "differ");
            for (void* p : std::initializer_list<void*>{d_dh1, d_drouterw1}) { cudaCheck(cudaFree(p)); }
        } else {
            run_backward(version, d_dh, d_drouterw, &dr, d_h, d_routerw, &cfg, alpha, beta, N, C, 0);
        }
        std::vector<float> dlogits_ref((size_t)N * E);
        cpu::router_backward(dh_ref.data(), drouterw_ref.data(), dlogits_ref.data(), drow_weight.data(), &r, logits.data(), probs.data(),
                             h.data(), routerw.data(), &cfg, alpha, beta, N, C);
        // dz to 1e-5 (the same fp32 formulas); dh to 1e-5 in FP32 and 1e-2 in BF16 (rounded to
        // bf16, 2^-9); dWr, fp32 sums of N terms in another order, to 1e-5
        snprintf(name, sizeof(name), "router_backward dlogits [%s]", shape);
        check_close(name, to_host(dr.dlogits, (size_t)N * E), dlogits_ref, 1e-5, 1e-5);
        snprintf(name, sizeof(name), "router_backward dh [%s]", shape);
        check_close(name, to_host(d_dh, (size_t)N * C), dh_ref, 1e-5, 1e-2);
        snprintf(name, sizeof(name), "router_backward drouterw [%s]", shape);
        check_close(name, to_host(d_drouterw, (size_t)E * C), drouterw_ref, 1e-5, 1e-5);
        for (void* p : std::initializer_list<void*>{d_dh, d_drouterw}) { cudaCheck(cudaFree(p)); }
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
        // B=64 x T=1024, the benchmark's batch: version 1's single blocks, and version 2's block per
        // expert where something may be dropped, see 8x the tokens (BF16 only)
        {{"top-2 dropless", 8, 2, 1, ROUTER_TOPK, 0.0f, PRIORITY_ORDER}, 65536, 1},
        {{"top-2 capacity 1.25, score", 8, 2, 1, ROUTER_TOPK, 1.25f, PRIORITY_SCORE}, 65536, 1},
        {{"expert choice, capacity 2", 8, 2, 1, ROUTER_EXPERT, 2.0f, PRIORITY_ORDER}, 65536, 1},
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
        routing_add_buffers(&dr, &routing_buffers, &cfg, N, NULL);
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
        float scores_v1_ms = benchmark_ms(20, [&]() { run_scores(1, &dr, d_h, d_routerw, &cfg, N, C, 0); });
        float scores_ms = benchmark_ms(20, [&]() { router_scores(&dr, d_h, d_routerw, &cfg, N, C, 0); });  // versions 2 and 3, the engine's
        float layout_v1_ms = benchmark_ms(20, [&]() { route_layout_v1(&dr, &cfg, 0); });
        float layout_v2_ms = benchmark_ms(20, [&]() { route_layout_v2(&dr, &cfg, 0); });
        float layout_ms = benchmark_ms(20, [&]() { route_layout(&dr, &cfg, 0); });  // version 3, the engine's
        float permute_ms = benchmark_ms(20, [&]() { permute_tokens(d_rows2, d_h, &dr, C, 0); });
        float unpermute_ms = benchmark_ms(20, [&]() { unpermute_tokens(d_y, d_rows, &dr, N, C, 0); });
        // the backward of all three, with the router's in version 1 or the engine's
        float backward_ms = 0.0f, backward_v1_ms = 0.0f;
        for (int version = 1; version <= 3; version += 2) {
            float ms = benchmark_ms(20, [&]() {
                unpermute_tokens_backward(d_rows2, &dr, d_y, d_rows, C, 0);
                permute_tokens_backward(d_dh, d_rows2, &dr, N, C, 0);
                run_backward(version, d_dh, d_drouterw, &dr, d_h, d_routerw, &cfg, 1.0f / N, 0.0f, N, C, 0);
            });
            (version == 1 ? backward_v1_ms : backward_ms) = ms;
        }
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
        printf("%-26s N=%5d H=%4d %6d rows: router_forward %.3f ms (scores %.3f, version 1 %.3f; layout %.3f, version 1 %.3f, "
               "version 2 %.3f), permute %.3f ms, unpermute %.3f ms, backward (all three) %.3f ms (version 1 of the router's %.3f); "
               "together %.3f ms = %.1f%% of the expert MLP's %.3f ms\n",
               m.name, N, H, rows, scores_ms + layout_ms, scores_ms, scores_v1_ms, layout_ms, layout_v1_ms, layout_v2_ms, permute_ms, unpermute_ms,
               backward_ms, backward_v1_ms, routing_ms, 100.0 * routing_ms / mlp_ms, mlp_ms);
        buffers_free(&routing_buffers);
        for (void* p : std::initializer_list<void*>{d_h, d_routerw, d_rows, d_rows2, d_y, d_dh, d_drouterw, w1, w2, b1, b2, fch, fch_gelu, dfch,
                                                    dfch_gelu, grads}) {
            cudaCheck(cudaFree(p));
        }
    }
}

int main(int argc, char** argv) {
    bool quick;
    int only = study_start(argc, argv, "routing", 3, &quick);
    const Mode modes[] = {
        {"top-2 renormalised, dropless", 8, 2, 1, ROUTER_TOPK, 0.0f, PRIORITY_ORDER},
        {"top-1 not renormalised", 4, 1, 0, ROUTER_TOPK, 0.0f, PRIORITY_ORDER},
        {"top-2 capacity 1.0, order priority", 8, 2, 1, ROUTER_TOPK, 1.0f, PRIORITY_ORDER},
        {"top-2 capacity 0.75, score priority", 8, 2, 1, ROUTER_TOPK, 0.75f, PRIORITY_SCORE},
        {"expert choice, capacity 2", 4, 2, 1, ROUTER_EXPERT, 2.0f, PRIORITY_ORDER},
        // more experts than the layout's tile blocks have threads (several experts a thread), and
        // more candidates per token than a tile holds (a tile of one token, in several passes)
        {"top-4 of 300, dropless", 300, 4, 1, ROUTER_TOPK, 0.0f, PRIORITY_ORDER},
        {"expert choice of 300, capacity 2", 300, 2, 1, ROUTER_EXPERT, 2.0f, PRIORITY_ORDER},
    };
    for (int version = 1; version <= 3; version++) {
        if (only != 0 && version != only) { continue; }
        for (const Mode& m : modes) {
            if (version == 1 && m.E > 8) { continue; }  // the large E test version 2's tiles
            bool may_drop = m.router == ROUTER_EXPERT || m.capacity_factor > 0;
            if (version == 2 && !may_drop) { continue; }  // where nothing is dropped version 2 is version 3
            validate_mode(version, m, 200, 48);
            validate_mode(version, m, 200, 48, 7);  // 7 distinct tokens
            if (m.E <= 8) { validate_mode(version, m, 2500, 18, 300); }  // several tiles of each layout (the large E: already at 200); E C not a multiple of 32
            if (!quick) { validate_mode(version, m, 4096, 768); }
        }
    }
    if (only == 0 || only == 3) {
        // more tiles than the row layout's scans take in one pass (256 a pass in route_scan_kernel,
        // 1024 in route_offsets_kernel): 8300 tokens of 32 candidates, 8 tokens a tile, 1038 tiles
        const Mode many_tiles = {"top-32 of 64, dropless", 64, 32, 1, ROUTER_TOPK, 0.0f, PRIORITY_ORDER};
        validate_mode(3, many_tiles, 8300, 16, 300);
        // more chunks than the capacity rule's scans over the chunks take in one round (32): 17000
        // tokens, E = 2, 34 chunks of 500 tokens; 300 distinct tokens, so that the cut key's ties
        // run through every chunk
        const Mode many_chunks = {"top-1 of 2, capacity 0.9, score priority", 2, 1, 0, ROUTER_TOPK, 0.9f, PRIORITY_SCORE};
        validate_mode(3, many_chunks, 17000, 8, 300);
    }
    if (!quick) {
        benchmark();
    }
    printf("%d failures\n", dev_failures);
    return dev_failures;
}
