/*
The router of an MoE layer, in fp32 always (doc/routing.md sections 1, 2, 5, 6). Everything the
permutation and the experts need is decided on the device: the host never waits for a count.

  router_forward    router_scores: logits z = h . Wr^T, p = softmax(z), top-k by z (ties to the
                    lower expert), combine weights (renormalised or not); then route_layout: the
                    capacity rule (dropless, or a capacity with order or score priority) or
                    expert choice, the expert-contiguous row layout, each token's rows, and the
                    load-balancing and z losses.
  router_backward   combine-weight gradients (from unpermute_tokens_backward) and the auxiliary
                    losses through the softmax to dh += dz . Wr and dWr += dz^T h.
  routing_stats_*   the per-layer report: expert shares, dropped fraction, routing entropy.

The kernels:
  router_gemm_kernel     the router's three products (the logits h . Wr^T, dh += dz . Wr, and dWr
                         as partial sums of dz^T h over chunks of tokens), tiled in fp32 on the CUDA
                         cores: Wr and h cross L2 once per tile, not once per token.
  router_scores_kernel   one warp per token: softmax and log-sum-exp of its logits, then k rounds
                         of a warp arg-max for the top-k and the combine weights.
  route_keep_*_kernel    where something may be dropped (a capacity, expert choice): which of
                         its candidates each expert keeps, slot by slot (by score, a radix select
                         of the cut key in four 8-bit passes, ties in token order), over blocks
                         of (chunk of tokens, expert). Dropless token choice, the default, keeps
                         every candidate and skips them.
  The row layout, a counting sort of the kept candidates by expert that keeps token order, over
  tiles of whole tokens with about ROUTE_TILE = 256 candidates each, 8 tokens at least (N k / 256
  tiles: 512 for top-2 at N = 65536):
  route_count_kernel     a block per tile: each expert's kept candidates and assignments in the
                         tile (shared-memory counts), the sums of p and of the entropy over its
                         tokens;
  route_scan_kernel      a block per expert: its counts scanned over the tiles (its rows before
                         each tile), its rows, assignments and sum of p;
  route_offsets_kernel   one block: the expert offsets (a scan over the experts), each tile's
                         first token row (a scan over the tiles), the losses;
  route_place_kernel     a block per tile: each kept candidate's row, the candidates taken in
                         order a warp at a time (__match_any_sync groups a warp's lanes by expert,
                         the lanes before a candidate in its group count its rank), the row's
                         token and weight; then each token's rows.
  Their work is O(N k + N E) in all, spread over the tiles and the experts; the one block reads
  E + 2 numbers per tile and the N log-sum-exps (the study's version 1 used E blocks that each
  read all N k choices, one block that went through every token's rows, and one every p).
  router_backward_kernel one warp per token: dw -> dp -> dz; then router_gemm_kernel for
                         dh += dz . Wr and dWr's partial sums, column_sums (reduce.cuh) for
                         the chunks.
Every sum has a fixed order: two runs give the same bits.
*/
#pragma once

#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "common.cuh"
#include "reduce.cuh"
#include "../common/model_config.h"

#define ROUTE_THREADS 1024      // the blocks of route_offsets_kernel and routing_stats_kernel
#define ROUTE_TILE 256          // a tile's candidates (about), and the blocks of the other layout kernels
#define ROUTE_MAX_EXPERTS 1024  // the most experts a config allows (model_config.h), at most ROUTE_THREADS
#define ROUTER_TOKEN_CHUNK 128  // tokens per partial sum of dWr

// A token's candidates: k (token choice), or E (expert choice: every expert may take it)
__host__ __device__ inline int route_per_token(bool expert_choice, int E, int k) { return expert_choice ? E : k; }
// The layout's tiles: whole tokens, about ROUTE_TILE candidates but 8 tokens at least, so that the
// per-tile scratch (16 bytes per tile and expert) stays within half of p's N E floats when every
// expert is a candidate (expert choice), and no tile has more tokens than route_place_kernel has
// threads
#define ROUTE_MIN_TILE_TOKENS 8
__host__ __device__ inline int route_tile_tokens(int per_token) {
    return per_token * ROUTE_MIN_TILE_TOKENS < ROUTE_TILE ? ROUTE_TILE / per_token : ROUTE_MIN_TILE_TOKENS;
}

// One MoE layer's routing of one micro-batch, on the device. Rows are the kept (token, expert)
// pairs, expert by expert, in token order within an expert (doc/routing.md section 3).
struct DeviceRouting {
    int N, E, k, C, max_rows;  // the sizes the buffers hold (k = 0 for expert choice)
    bool expert_choice;        // the routing they are for
    int n;                     // tokens of the last forward
    // per token
    float* logits;             // (N, E) fp32
    float* probs;              // (N, E) softmax of the logits
    float* lse;                // (N) log-sum-exp of each token's logits
    int* choice_expert;        // (N*k) token choice: token t's j-th expert, by decreasing logit
    float* choice_weight;      // (N*k) token choice: its combine weight
    int* choice_row;           // (N*k) token choice: its row, or -1 where capacity dropped it
    int* pair_row;             // (N*E) expert choice: the row of (token, expert), or -1
    // the rows
    int* tokens_per_expert;    // (E) kept rows of each expert
    int* expert_offsets;       // (E+1) first row of each expert; expert_offsets[E] rows in all
    int* row_token;            // (max_rows) the token of each row
    float* row_weight;         // (max_rows) its combine weight
    int* token_row_offsets;    // (N+1) each token's rows, in combine order
    int* token_rows;           // (max_rows)
    // this forward's counts and losses
    int* assignments;          // (E) choices of each expert before dropping (expert choice: the tokens it takes)
    double* prob_sums;         // (E) sum over the tokens of p[t][e], for the balance loss
    int* counts;               // (2) assignments in all, dropped ones
    float* balance_loss;       // (1) E * sum_e f_e P_e
    float* z_loss;             // (1) mean_t lse_t^2
    double* entropy;           // (1) sum over the tokens of the routing entropy -sum_e p log p
    // the layout's scratch, per tile of route_tile_tokens tokens
    int tiles;                 // tiles the buffers hold
    int* tile_rows;            // (E, tiles) kept candidates of e in tile b; then e's rows before tile b
    int* tile_assigned;        // (E, tiles) e's assignments in tile b
    double* tile_prob_sums;    // (E, tiles) sum over tile b's tokens of p[t][e]
    double* tile_entropy;      // (tiles) sum over tile b's tokens of -sum_e p log p
    int* tile_row_start;       // (tiles) kept candidates in tile b; then the first of its tokens' rows
    // the capacity rule's scratch, per expert and chunk of route_keep_chunks: only for a config
    // that may drop (a capacity, expert choice), NULL otherwise
    int* keep_counts;          // (E, k, chunks) token choice: e's candidates in slot j of chunk s
    int* keep_hist;            // (E, chunks, 256) by score: a radix pass's histogram of the cut slot's keys
    int* keep_ties;            // (E, chunks) the cut slot's candidates equal to the cut key before chunk s
    int* keep_plan;            // (E, KEEP_PLAN_INTS) e's slots kept whole, cut slot and cut key
    // backward: scratch of one layer's backward, which a model's MoE layers share (backward_owner)
    float* drow_weight;        // (max_rows) dL/d row_weight, from unpermute_tokens_backward
    float* dlogits;            // (N, E)
    float* drouterw_partial;   // (ceil(N / ROUTER_TOKEN_CHUNK), E, C)
    const DeviceRouting* backward_owner;  // the routing whose backward buffers these are, or NULL: its own
    // accumulated between two reports: assignments (E), total, dropped, entropy sum, tokens
    double* stats;             // (E + 4)
    // the tests' teacher forcing (NULL in training): decisions taken as given instead of made,
    // so that a test can compare the kernels' arithmetic with a reference's at equal decisions
    const int* forced_choice_expert;  // (N*k) token choice: token t's j-th expert
    const int* forced_keep;           // (N*k), expert choice (N*E): 1 where the candidate is kept
};

// ----------------------------------------------------------------------------
// CUDA kernels

// The router's three products, tiled on the CUDA cores in fp32 (the router is fp32; with at
// most E = 1024 columns its products are 2 N E C FLOPs, 6.4 GFLOP at N = 65536, E = 64, C = 768,
// small beside the experts'):
//   logits   Z (n, E)   = H (n, C) . Wr (E, C)^T                       router_logits
//   dh       dH (n, C) += dZ (n, E) . Wr (E, C)                        router_backward
//   dWr      partial[chunk] (E, C) = dZ^T . H over the chunk's 128 tokens, then the chunks summed
//            (column_sums, reduce.cuh)                                  router_backward
// One kernel for the three: out (M, N) = sum over k of A(m, k) B(k, n), where A(m, k) is
// A[m a_m + k a_k] and B(k, n) is B[k b_k + n b_n] (one of each pair of strides is 1). A block
// computes a TM x TN tile (TM TN = 4096, a 4 x 4 square of outputs per thread), taking k in
// slices of ROUTER_GEMM_K through shared memory; the narrow side (the experts of the logits, of
// dWr) gets a tile of 8 to 64, so that few threads idle where E is small. gridDim.x holds the
// M tiles of each batch, batch after batch: the batches are dWr's chunks, each its own range of
// k and its own output (out + batch o_batch). Each output is one thread's sum over k in
// increasing order, one fused multiply-add at a time: the same bits whatever the tile, and for
// dh and dWr the same as the warp-per-token kernels these replaced (which read all of Wr once
// per token: 12.9 GB of L1 and L2 traffic at the shape above, where these read it once per tile
// of tokens).
#define ROUTER_GEMM_THREADS 256
#define ROUTER_GEMM_K 16

template <int TM, int TN, typename TA, typename TB, typename TO, bool ACCUMULATE>
__global__ void __launch_bounds__(ROUTER_GEMM_THREADS)
router_gemm_kernel(TO* out, int ldo, size_t o_batch, const TA* A, size_t a_m, size_t a_k, const TB* B, size_t b_k, size_t b_n, int M, int N,
                   int K, int k_per_batch, int m_tiles) {
    static_assert(TM * TN == 16 * ROUTER_GEMM_THREADS, "a 4 x 4 square of outputs per thread");
    // the slices, k-major (a thread's 4 rows, and 4 columns, side by side), a column of padding
    // against bank conflicts where neighbouring threads store neighbouring k
    __shared__ float As[ROUTER_GEMM_K][TM + 1];
    __shared__ float Bs[ROUTER_GEMM_K][TN + 1];
    int m_tile = blockIdx.x % m_tiles, batch = blockIdx.x / m_tiles;
    int m0 = m_tile * TM, n0 = blockIdx.y * TN;
    int k_begin = batch * k_per_batch, k_end = min(K, k_begin + k_per_batch);
    int tx = threadIdx.x % (TN / 4), ty = threadIdx.x / (TN / 4);  // this thread's outputs: rows 4 ty.., columns 4 tx..
    float acc[4][4] = {};
    for (int k0 = k_begin; k0 < k_end; k0 += ROUTER_GEMM_K) {
        // the slices, zero outside the matrices; neighbouring threads read along the contiguous side
        for (int i = threadIdx.x; i < TM * ROUTER_GEMM_K; i += ROUTER_GEMM_THREADS) {
            int m = a_k == 1 ? i / ROUTER_GEMM_K : i % TM, kk = a_k == 1 ? i % ROUTER_GEMM_K : i / TM;
            int gm = m0 + m, gk = k0 + kk;
            As[kk][m] = gm < M && gk < k_end ? to_float(A[gm * a_m + gk * a_k]) : 0.0f;
        }
        for (int i = threadIdx.x; i < TN * ROUTER_GEMM_K; i += ROUTER_GEMM_THREADS) {
            int n = b_n == 1 ? i % TN : i / ROUTER_GEMM_K, kk = b_n == 1 ? i / TN : i % ROUTER_GEMM_K;
            int gn = n0 + n, gk = k0 + kk;
            Bs[kk][n] = gn < N && gk < k_end ? to_float(B[gk * b_k + gn * b_n]) : 0.0f;
        }
        __syncthreads();
        int slice = min(ROUTER_GEMM_K, k_end - k0);  // not past the end: no extra (zero) terms in the sums
        for (int kk = 0; kk < slice; kk++) {
            float a[4], b[4];
            for (int i = 0; i < 4; i++) { a[i] = As[kk][4 * ty + i]; }
            for (int j = 0; j < 4; j++) { b[j] = Bs[kk][4 * tx + j]; }
            for (int i = 0; i < 4; i++) {
                for (int j = 0; j < 4; j++) { acc[i][j] += a[i] * b[j]; }
            }
        }
        __syncthreads();  // the slices are read before the next ones overwrite them
    }
    TO* o = out + batch * o_batch;
    for (int i = 0; i < 4; i++) {
        int m = m0 + 4 * ty + i;
        if (m >= M) { continue; }
        for (int j = 0; j < 4; j++) {
            int n = n0 + 4 * tx + j;
            if (n >= N) { continue; }
            TO* y = o + (size_t)m * ldo + n;
            *y = ACCUMULATE ? from_float<TO>(to_float(*y) + acc[i][j]) : from_float<TO>(acc[i][j]);
        }
    }
}

// The narrow side's tile: the power of two from 8 to 64 that holds `width` (the experts), or 64
static int router_gemm_narrow_tile(int width) {
    int tile = 8;
    while (tile < width && tile < 64) { tile *= 2; }
    return tile;
}

// One product for router_gemm_kernel: out (M, N) (+)= A . B, strides and batches as above.
template <typename TA, typename TB, typename TO>
struct RouterGemm {
    TO* out;
    int ldo;
    size_t o_batch;
    const TA* A;
    size_t a_m, a_k;
    const TB* B;
    size_t b_k, b_n;
    int M, N, K, k_per_batch;
};

template <int TM, int TN, bool ACCUMULATE, typename TA, typename TB, typename TO>
static void router_gemm_launch(const RouterGemm<TA, TB, TO>& g, cudaStream_t stream) {
    int m_tiles = ceil_div_int(g.M, TM), batches = ceil_div_int(g.K, g.k_per_batch);
    dim3 grid((unsigned)m_tiles * batches, ceil_div_int(g.N, TN));
    router_gemm_kernel<TM, TN, TA, TB, TO, ACCUMULATE><<<grid, ROUTER_GEMM_THREADS, 0, stream>>>(
        g.out, g.ldo, g.o_batch, g.A, g.a_m, g.a_k, g.B, g.b_k, g.b_n, g.M, g.N, g.K, g.k_per_batch, m_tiles);
    cudaCheckLaunch();
}

// g with a NARROW-wide tile on its narrow side (N where NARROW_N, else M)
template <int NARROW, bool NARROW_N, bool ACCUMULATE, typename TA, typename TB, typename TO>
static void router_gemm_narrow(const RouterGemm<TA, TB, TO>& g, cudaStream_t stream) {
    constexpr int WIDE = 16 * ROUTER_GEMM_THREADS / NARROW;
    if constexpr (NARROW_N) {
        router_gemm_launch<WIDE, NARROW, ACCUMULATE>(g, stream);
    } else {
        router_gemm_launch<NARROW, WIDE, ACCUMULATE>(g, stream);
    }
}

// Runs g with the tile its narrow side asks for: N for the logits (N = E) and dh (N = C: a 64 x
// 64 tile at GPT-2's widths), M for dWr (M = E).
template <bool NARROW_N, bool ACCUMULATE, typename TA, typename TB, typename TO>
static void router_gemm(const RouterGemm<TA, TB, TO>& g, cudaStream_t stream) {
    switch (router_gemm_narrow_tile(NARROW_N ? g.N : g.M)) {
    case 8: router_gemm_narrow<8, NARROW_N, ACCUMULATE>(g, stream); break;
    case 16: router_gemm_narrow<16, NARROW_N, ACCUMULATE>(g, stream); break;
    case 32: router_gemm_narrow<32, NARROW_N, ACCUMULATE>(g, stream); break;
    default: router_gemm_narrow<64, NARROW_N, ACCUMULATE>(g, stream); break;
    }
}

// Warp arg-max of (value, index) pairs under "larger value, then lower index"; -1 loses to all.
__device__ __forceinline__ void warp_argmax(float* value, int* index) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        float v = __shfl_xor_sync(0xffffffff, *value, offset);
        int i = __shfl_xor_sync(0xffffffff, *index, offset);
        bool better = i >= 0 && (*index < 0 || v > *value || (v == *value && i < *index));
        if (better) { *value = v; *index = i; }
    }
}

// One warp per token, after router_gemm has written the logits: softmax, lse and, for token
// choice (k > 0), the top-k and weights. Shared memory: per warp, E floats (the logits) and E ints
// (taken flags).
__global__ void router_scores_kernel(const float* logits, float* probs, float* lse, int* choice_expert, float* choice_weight,
                                     const int* forced_choice, int N, int E, int k, int renorm) {
    extern __shared__ float smem[];
    int warps = blockDim.x / WARP_SIZE, warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    float* z = smem + warp * E;
    int* taken = (int*)(smem + warps * E) + warp * E;
    int t = blockIdx.x * warps + warp;
    if (t >= N) { return; }  // the whole warp leaves together
    for (int e = lane; e < E; e += WARP_SIZE) { z[e] = logits[(size_t)t * E + e]; }
    __syncwarp();
    float maxval = -INFINITY;
    for (int e = lane; e < E; e += WARP_SIZE) { maxval = fmaxf(maxval, z[e]); }
    maxval = warp_reduce_max(maxval);
    float sum = 0.0f;
    for (int e = lane; e < E; e += WARP_SIZE) { sum += expf(z[e] - maxval); }
    sum = warp_reduce_sum(sum);
    float* pt = probs + (size_t)t * E;
    for (int e = lane; e < E; e += WARP_SIZE) {
        pt[e] = expf(z[e] - maxval) / sum;
        taken[e] = 0;
    }
    if (lane == 0) { lse[t] = maxval + logf(sum); }
    __syncwarp();
    // top-k by logit: k rounds of an arg-max over the experts not yet taken
    float chosen_sum = 0.0f;
    for (int j = 0; j < k; j++) {
        float best = -INFINITY;
        int best_e = -1;
        for (int e = lane; e < E; e += WARP_SIZE) {
            if (!taken[e] && (best_e < 0 || z[e] > best)) { best = z[e]; best_e = e; }
        }
        warp_argmax(&best, &best_e);
        if (forced_choice) { best_e = forced_choice[(size_t)t * k + j]; }  // the tests' teacher forcing
        if (lane == 0) {
            taken[best_e] = 1;
            choice_expert[(size_t)t * k + j] = best_e;
        }
        __syncwarp();
        chosen_sum += pt[best_e];  // every lane, in choice order (pt was written by this warp)
    }
    for (int j = lane; j < k; j += WARP_SIZE) {
        float pj = pt[choice_expert[(size_t)t * k + j]];
        choice_weight[(size_t)t * k + j] = renorm ? pj / chosen_sum : pj;
    }
}

// Inclusive prefix sum over the warp's lanes
__device__ __forceinline__ int warp_inclusive_scan(int v) {
    int lane = threadIdx.x % WARP_SIZE;
    for (int offset = 1; offset < WARP_SIZE; offset <<= 1) {
        int u = __shfl_up_sync(0xffffffff, v, offset);
        if (lane >= offset) { v += u; }
    }
    return v;
}

// Exclusive prefix sum over the block of one int per thread; *total gets the sum. `shared`
// holds 33 ints. Every thread must call it.
__device__ int block_exclusive_scan(int v, int* shared, int* total) {
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
    int inclusive = warp_inclusive_scan(v);
    __syncthreads();  // earlier users of `shared` are done
    if (lane == WARP_SIZE - 1) { shared[warp] = inclusive; }
    __syncthreads();
    if (warp == 0) {
        int s = lane < warps ? shared[lane] : 0, x = s;
        for (int offset = 1; offset < WARP_SIZE; offset <<= 1) {
            int u = __shfl_up_sync(0xffffffff, x, offset);
            if (lane >= offset) { x += u; }
        }
        if (lane < warps) { shared[lane] = x - s; }  // exclusive prefix of the warp totals
        if (lane == WARP_SIZE - 1) { shared[WARP_SIZE] = x; }
    }
    __syncthreads();
    *total = shared[WARP_SIZE];
    return shared[warp] + inclusive - v;
}

// The layout's sizes. Token choice: N*k candidates i = t*k + j (token t's j-th choice); cap < 0
// is dropless. Expert choice: N*E candidates i = t*E + e, and cap tokens per expert.
struct RouteLayoutArgs {
    int N, E, k, cap, priority, expert_choice;
};

// Expert e's candidate of token t in choice slot j, or -1. Expert choice has one slot, in which
// every token is a candidate of every expert.
__device__ __forceinline__ int route_candidate(const DeviceRouting& r, const RouteLayoutArgs& a, int t, int j, int e) {
    if (a.expert_choice) { return t * a.E + e; }
    int i = t * a.k + j;
    return r.choice_expert[i] == e ? i : -1;
}

// The priority of a candidate within its slot (larger first, equal ones in token order): its
// probability by score (a p >= 0 compares as its bits do), none by order.
__host__ __device__ __forceinline__ bool route_by_score(const RouteLayoutArgs& a) { return a.expert_choice || a.priority == PRIORITY_SCORE; }
__device__ __forceinline__ unsigned route_key(const DeviceRouting& r, const RouteLayoutArgs& a, int t, int e) {
    return route_by_score(a) ? __float_as_uint(r.probs[(size_t)t * a.E + e]) : 0u;
}

// The expert of candidate i
__device__ __forceinline__ int route_expert(const DeviceRouting& r, const RouteLayoutArgs& a, int i) {
    return a.expert_choice ? i % a.E : r.choice_expert[i];
}

// The capacity rule (doc/routing.md section 2), run only where something may be dropped (a
// capacity, expert choice, or the tests' teacher forcing: dropless token choice keeps every
// candidate). For each expert e, slot by slot (all first choices before any second choice), a
// slot's candidates are all kept while they fit in what is left of the capacity; in the slot
// where it runs out (the cut slot) the first ones by priority are kept: by order, the first in
// token order; by score (and for expert choice), those above the cut key, the left-th largest
// key of the slot, and of those equal to it the first in token order. Later slots keep nothing.
// The work is spread over blocks of (chunk of tokens, expert), about ROUTE_KEEP_BLOCKS of them:
//   route_keep_count_kernel      (chunk, expert), token choice: e's candidates per slot in the chunk;
//   route_keep_plan_kernel       a block per expert: the slots kept whole and the cut slot, from
//                                the counts; by order, the cut slot's candidates before each chunk;
//   route_keep_histogram_kernel  (chunk, expert), by score, four passes of 8 bits from the top: a
//   route_keep_select_kernel     histogram of the cut slot's keys that match the digits found so
//                                far, then (a block per expert) the bin where the left-th largest
//                                falls; after the last pass the key is whole, and the last
//                                histograms count the candidates equal to it in each chunk;
//   route_keep_mark_kernel       (chunk, expert): keep[i] = 0 (kept) or -1 for e's candidates, the
//                                ties ranked in token order by a block scan and the ties of the
//                                earlier chunks.
// Every count is an integer: the decisions do not depend on the order of the atomics. (Version 2
// of dev/cuda/routing.cu ran all of it in one block per expert over all N tokens, E blocks in
// all, a chain of block scans and radix passes over 64 rounds of 1024 tokens at N = 65536.)
#define ROUTE_KEEP_THREADS 256     // the blocks of the capacity rule: a thread per histogram bin
#define ROUTE_KEEP_BLOCKS 1024     // (chunk, expert) blocks aimed at: about 8 per multiprocessor
#define ROUTE_KEEP_MIN_CHUNK 512   // tokens a chunk holds at least
// an expert's plan (keep_plan, KEEP_PLAN_INTS ints an expert)
#define KEEP_FULL_SLOTS 0  // the slots kept whole, 0 .. full - 1
#define KEEP_CUT_SLOT 1    // the slot the capacity runs out in while some is left, or -1
#define KEEP_CUT_KEY 2     // the digits of the cut key found so far (the whole key at the end)
#define KEEP_KEY_MASK 3    // the bits of the key those digits are
#define KEEP_NEED 4        // the candidates still to keep among those matching the digits; at the
                           // end, of those equal to the cut key, how many are kept
#define KEEP_PLAN_INTS 8

// The chunks of the capacity rule for n tokens of E experts, ROUTE_KEEP_MIN_CHUNK tokens at least
__host__ __device__ inline int route_keep_chunks(int n, int E) {
    int by_tokens = (n + ROUTE_KEEP_MIN_CHUNK - 1) / ROUTE_KEEP_MIN_CHUNK, by_blocks = ROUTE_KEEP_BLOCKS / E;
    return max(1, min(by_tokens, by_blocks));
}
// tokens t0 .. t1 - 1 of chunk s (of `chunks`; the last may hold fewer, or none)
__device__ __forceinline__ void route_keep_chunk(int n, int chunks, int s, int* t0, int* t1) {
    int per_chunk = (n + chunks - 1) / chunks;
    *t0 = min(n, s * per_chunk);
    *t1 = min(n, *t0 + per_chunk);
}

// counter[bin] += 1 for every lane whose bin is not -1, one atomicAdd per bin held by the warp
// (its lanes with the same bin find each other): 32 lanes adding to one bin cost one atomic, not
// 32 in a row. Every lane of the warp must call it.
__device__ __forceinline__ void warp_count(int* counter, int bin) {
    unsigned same = __match_any_sync(0xffffffff, bin);
    if (bin >= 0 && (int)(threadIdx.x % WARP_SIZE) == 31 - __clz((int)same)) { atomicAdd(&counter[bin], __popc(same)); }
}

// Exclusive scan of one expert's per-chunk counts, count(s) for s < chunks, into out[s], by one
// warp (every lane calls it) in rounds of 32 chunks
template <typename F>
__device__ void route_keep_scan_chunks(int* out, int chunks, F count) {
    int lane = threadIdx.x % WARP_SIZE, before = 0;
    for (int base = 0; base < chunks; base += WARP_SIZE) {
        int s = base + lane, v = s < chunks ? count(s) : 0;
        int inclusive = warp_inclusive_scan(v);
        if (s < chunks) { out[s] = before + inclusive - v; }
        before += __shfl_sync(0xffffffff, inclusive, WARP_SIZE - 1);
    }
}

__global__ void __launch_bounds__(ROUTE_KEEP_THREADS) route_keep_count_kernel(DeviceRouting r, RouteLayoutArgs a, int chunks) {
    extern __shared__ int slot_count[];  // (k)
    int s = blockIdx.x, e = blockIdx.y, k = a.k, t0, t1;
    route_keep_chunk(a.N, chunks, s, &t0, &t1);
    for (int j = threadIdx.x; j < k; j += blockDim.x) { slot_count[j] = 0; }
    __syncthreads();
    // the chunk's candidates i = t k + j in order, a thread each (neighbouring threads, neighbouring ints)
    for (int base = t0 * k; base < t1 * k; base += blockDim.x) {
        int i = base + threadIdx.x;
        warp_count(slot_count, i < t1 * k && r.choice_expert[i] == e ? i % k : -1);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < k; j += blockDim.x) { r.keep_counts[((size_t)e * k + j) * chunks + s] = slot_count[j]; }
}

__global__ void __launch_bounds__(ROUTE_KEEP_THREADS) route_keep_plan_kernel(DeviceRouting r, RouteLayoutArgs a, int chunks) {
    __shared__ int scan_shared[WARP_SIZE + 1];
    int e = blockIdx.x, slots = a.expert_choice ? 1 : a.k;
    const int* counts = r.keep_counts + (size_t)e * a.k * chunks;  // token choice: (k, chunks)
    int left = a.cap, full = slots, cut_slot = -1;
    for (int j = 0; j < slots; j++) {
        int count = a.N;  // expert choice: every token is a candidate
        if (!a.expert_choice) {
            int mine = 0;
            for (int s = threadIdx.x; s < chunks; s += blockDim.x) { mine += counts[(size_t)j * chunks + s]; }
            count = block_reduce_sum(mine, scan_shared);  // the same in every thread
        }
        if (count > left) {
            full = j;
            cut_slot = left > 0 ? j : -1;  // none left: this slot and the later ones keep nothing
            break;
        }
        left -= count;
    }
    if (threadIdx.x == 0) {
        int* plan = r.keep_plan + (size_t)e * KEEP_PLAN_INTS;
        plan[KEEP_FULL_SLOTS] = full;
        plan[KEEP_CUT_SLOT] = cut_slot;
        plan[KEEP_CUT_KEY] = 0;
        plan[KEEP_KEY_MASK] = route_by_score(a) ? 0 : -1;  // by order every key is 0: the cut key is found
        plan[KEEP_NEED] = left;
    }
    if (cut_slot >= 0 && !route_by_score(a) && threadIdx.x < WARP_SIZE) {  // by order the ties are all of the cut slot's candidates
        route_keep_scan_chunks(r.keep_ties + (size_t)e * chunks, chunks, [&](int s) { return counts[(size_t)cut_slot * chunks + s]; });
    }
}

__global__ void __launch_bounds__(ROUTE_KEEP_THREADS) route_keep_histogram_kernel(DeviceRouting r, RouteLayoutArgs a, int chunks, int shift) {
    __shared__ int hist[256];
    int s = blockIdx.x, e = blockIdx.y, t0, t1;
    const int* plan = r.keep_plan + (size_t)e * KEEP_PLAN_INTS;
    int j = plan[KEEP_CUT_SLOT];
    if (j < 0) { return; }  // the whole block: e keeps or drops whole slots
    unsigned prefix = (unsigned)plan[KEEP_CUT_KEY], mask = (unsigned)plan[KEEP_KEY_MASK];
    route_keep_chunk(a.N, chunks, s, &t0, &t1);
    hist[threadIdx.x] = 0;
    __syncthreads();
    for (int base = t0; base < t1; base += blockDim.x) {
        int t = base + threadIdx.x, bin = -1;
        if (t < t1 && route_candidate(r, a, t, j, e) >= 0) {
            unsigned key = route_key(r, a, t, e);
            if ((key & mask) == prefix) { bin = (key >> shift) & 255; }
        }
        warp_count(hist, bin);
    }
    __syncthreads();
    r.keep_hist[((size_t)e * chunks + s) * 256 + threadIdx.x] = hist[threadIdx.x];
}

// By one warp, over the 256 counts of a radix pass's histogram (bin b: the keys whose digit is b):
// the bin in which the need-th largest key falls (need >= 1), into found[0], and how many of that
// bin's keys are still needed, into found[1]; the lane that finds it writes them (none where the
// histogram holds fewer than need keys). Lane l holds the bins 255 - 8l down to 248 - 8l, so the
// lanes before it hold the larger keys.
__device__ void route_find_bin(const int* hist, int need, int* found) {
    int lane = threadIdx.x % WARP_SIZE, top = 255 - 8 * lane, mine = 0;
    for (int b = top; b > top - 8; b--) { mine += hist[b]; }
    int above = warp_inclusive_scan(mine) - mine;  // the keys in the bins of the earlier lanes
    if (above < need && above + mine >= need) {
        int b = top, left = need - above;
        while (hist[b] < left) { left -= hist[b--]; }
        found[0] = b;
        found[1] = left;
    }
}

__global__ void __launch_bounds__(ROUTE_KEEP_THREADS) route_keep_select_kernel(DeviceRouting r, int chunks, int shift) {
    __shared__ int total[256];
    __shared__ int found[2];  // the bin, the need left within it
    int e = blockIdx.x;
    int* plan = r.keep_plan + (size_t)e * KEEP_PLAN_INTS;
    if (plan[KEEP_CUT_SLOT] < 0) { return; }
    const int* hist = r.keep_hist + (size_t)e * chunks * 256;
    int need = plan[KEEP_NEED], sum = 0;
    for (int s = 0; s < chunks; s++) { sum += hist[(size_t)s * 256 + threadIdx.x]; }
    total[threadIdx.x] = sum;
    if (threadIdx.x == 0) {  // found below whenever the histograms are whole; defined even when not
        found[0] = 0;        // (the sampled emulation of a full-size step runs one block of a launch)
        found[1] = need;
    }
    __syncthreads();
    if (threadIdx.x < WARP_SIZE) { route_find_bin(total, need, found); }
    __syncthreads();
    int bin = found[0];
    if (threadIdx.x == 0) {
        plan[KEEP_CUT_KEY] |= bin << shift;
        plan[KEEP_KEY_MASK] |= 255 << shift;
        plan[KEEP_NEED] = found[1];
    }
    if (shift == 0 && threadIdx.x < WARP_SIZE) {  // the key is whole: bin `bin` of the last histograms counts the keys equal to it
        route_keep_scan_chunks(r.keep_ties + (size_t)e * chunks, chunks, [&](int s) { return hist[(size_t)s * 256 + bin]; });
    }
}

__global__ void __launch_bounds__(ROUTE_KEEP_THREADS) route_keep_mark_kernel(DeviceRouting r, RouteLayoutArgs a, int chunks) {
    __shared__ int scan_shared[WARP_SIZE + 1];
    int s = blockIdx.x, e = blockIdx.y, slots = a.expert_choice ? 1 : a.k, t0, t1;
    int* keep = a.expert_choice ? r.pair_row : r.choice_row;
    route_keep_chunk(a.N, chunks, s, &t0, &t1);
    if (r.forced_keep) {  // the tests' teacher forcing
        for (int t = t0 + threadIdx.x; t < t1; t += blockDim.x) {
            for (int j = 0; j < slots; j++) {
                int i = route_candidate(r, a, t, j, e);
                if (i >= 0) { keep[i] = r.forced_keep[i] ? 0 : -1; }
            }
        }
        return;
    }
    const int* plan = r.keep_plan + (size_t)e * KEEP_PLAN_INTS;
    int full = plan[KEEP_FULL_SLOTS], cut_slot = plan[KEEP_CUT_SLOT], ties_kept = plan[KEEP_NEED];
    unsigned cut = (unsigned)plan[KEEP_CUT_KEY];
    int ties_before = cut_slot >= 0 ? r.keep_ties[(size_t)e * chunks + s] : 0;  // equal to the cut key in the earlier chunks
    for (int base = t0; base < t1; base += blockDim.x) {
        int t = base + threadIdx.x, cut_i = -1;  // this token's candidate in the cut slot
        bool above = false, tied = false;
        if (t < t1) {
            for (int j = 0; j < slots; j++) {
                int i = route_candidate(r, a, t, j, e);
                if (i < 0) { continue; }
                if (j == cut_slot) {
                    unsigned key = route_key(r, a, t, e);
                    above = key > cut;
                    tied = key == cut;
                    cut_i = i;
                } else {
                    keep[i] = j < full ? 0 : -1;
                }
            }
        }
        if (cut_slot >= 0) {  // the same in the whole block: the ties ranked in token order
            int round_ties, rank = ties_before + block_exclusive_scan(tied, scan_shared, &round_ties);
            if (cut_i >= 0) { keep[cut_i] = above || (tied && rank < ties_kept) ? 0 : -1; }
            ties_before += round_ties;
        }
    }
}

// The layout's tiles: route_tile_tokens whole tokens each, candidates i = first .. last - 1 of
// the tile (i = t * per_token + j, so that a tile's candidates are consecutive and in token order)
struct RouteTile {
    int t0, t1, first, last;
};
__device__ __forceinline__ RouteTile route_tile(const RouteLayoutArgs& a, int b) {
    int per_token = route_per_token(a.expert_choice, a.E, a.k), tokens = route_tile_tokens(per_token);
    RouteTile tile;
    tile.t0 = b * tokens;
    tile.t1 = min(a.N, tile.t0 + tokens);
    tile.first = tile.t0 * per_token;
    tile.last = tile.t1 * per_token;
    return tile;
}

// whether candidate i is kept: all are in dropless token choice (route_keep did not run)
__device__ __forceinline__ bool route_kept(const DeviceRouting& r, const RouteLayoutArgs& a, const int* keep, int i) {
    return (a.cap < 0 && !a.expert_choice && !r.forced_keep) || keep[i] >= 0;
}

// Layout, step 1, a block per tile b: for each expert e, its assignments in the tile (token
// choice: its candidates, before dropping; expert choice: the tokens it takes) and its kept
// candidates (tile_rows), by integer counts in shared memory (their order does not matter); the
// tile's kept candidates in all (tile_row_start[b]); and over the tile's tokens the sums of
// p[t][e] (tile_prob_sums, for the balance loss) and of the routing entropy -p log p
// (tile_entropy, for the report), in a fixed order: groups of E threads take every groups-th
// token (neighbouring threads read neighbouring experts' p), then the groups in order.
__global__ void __launch_bounds__(ROUTE_TILE) route_count_kernel(DeviceRouting r, RouteLayoutArgs a) {
    __shared__ int kept[ROUTE_MAX_EXPERTS], assigned[ROUTE_MAX_EXPERTS];
    __shared__ double partial[ROUTE_TILE];
    __shared__ int scan_shared[WARP_SIZE + 1];
    __shared__ double sum_shared[WARP_SIZE];
    int b = blockIdx.x, E = a.E;
    RouteTile tile = route_tile(a, b);
    const int* keep = a.expert_choice ? r.pair_row : r.choice_row;
    for (int e = threadIdx.x; e < E; e += blockDim.x) { kept[e] = assigned[e] = 0; }
    __syncthreads();
    int mine = 0;  // this thread's kept candidates
    for (int i = tile.first + threadIdx.x; i < tile.last; i += blockDim.x) {
        int e = route_expert(r, a, i);
        bool is_kept = route_kept(r, a, keep, i);
        if (is_kept || !a.expert_choice) { atomicAdd(&assigned[e], 1); }  // expert choice: the tokens e takes
        if (is_kept) {
            atomicAdd(&kept[e], 1);
            mine++;
        }
    }
    int tile_kept = block_reduce_sum(mine, scan_shared);  // after its barriers the counts are complete
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        r.tile_rows[(size_t)e * r.tiles + b] = kept[e];
        r.tile_assigned[(size_t)e * r.tiles + b] = assigned[e];
    }
    if (threadIdx.x == 0) { r.tile_row_start[b] = tile_kept; }

    // sum_t p[t][e] and -sum_t p log p: E > blockDim.x, a thread per expert (the loop over x);
    // otherwise `groups` groups of E threads, each summing every groups-th token
    int groups = E < (int)blockDim.x ? blockDim.x / E : 1;
    double entropy = 0.0;
    for (int x = threadIdx.x; x < groups * E; x += blockDim.x) {
        int e = x % E, g = x / E;
        double p_sum = 0.0;
        for (int t = tile.t0 + g; t < tile.t1; t += groups) {
            double p = r.probs[(size_t)t * E + e];
            p_sum += p;
            if (p > 0) { entropy -= p * log(p); }
        }
        if (groups == 1) {
            r.tile_prob_sums[(size_t)e * r.tiles + b] = p_sum;
        } else {
            partial[x] = p_sum;
        }
    }
    entropy = block_reduce_sum(entropy, sum_shared);  // after its barriers partial is complete
    if (groups > 1) {
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            double p_sum = 0.0;
            for (int g = 0; g < groups; g++) { p_sum += partial[g * E + e]; }
            r.tile_prob_sums[(size_t)e * r.tiles + b] = p_sum;
        }
    }
    if (threadIdx.x == 0) { r.tile_entropy[b] = entropy; }
}

// Layout, step 2, a block per expert e: e's rows in the tiles before each tile (a scan over the
// tiles, written over tile_rows), and e's rows, assignments and sum of p over all the tiles.
__global__ void __launch_bounds__(ROUTE_TILE) route_scan_kernel(DeviceRouting r, int tiles) {
    __shared__ int scan_shared[WARP_SIZE + 1];
    __shared__ double sum_shared[WARP_SIZE];
    int e = blockIdx.x;
    int* rows_before = r.tile_rows + (size_t)e * r.tiles;
    const int* tile_assigned = r.tile_assigned + (size_t)e * r.tiles;
    const double* tile_prob_sums = r.tile_prob_sums + (size_t)e * r.tiles;
    int rows = 0, assigned = 0;  // e's rows in the earlier chunks of tiles; this thread's assignments
    double P = 0.0;
    for (int base = 0; base < tiles; base += blockDim.x) {
        int b = base + threadIdx.x, chunk;
        int count = b < tiles ? rows_before[b] : 0;
        int before = rows + block_exclusive_scan(count, scan_shared, &chunk);
        if (b < tiles) {
            rows_before[b] = before;
            assigned += tile_assigned[b];
            P += tile_prob_sums[b];
        }
        rows += chunk;
    }
    int all_assigned = block_reduce_sum(assigned, scan_shared);
    P = block_reduce_sum(P, sum_shared);
    if (threadIdx.x == 0) {
        r.tokens_per_expert[e] = rows;
        r.assignments[e] = all_assigned;
        r.prob_sums[e] = P;
    }
}

// Layout, step 3, one block of ROUTE_THREADS >= E threads: the expert offsets (a scan over the
// experts, a thread each), each tile's first row in token order (a scan over the tiles, written
// over tile_row_start), the balance and z losses and the entropy, every sum in a fixed order.
__global__ void __launch_bounds__(ROUTE_THREADS) route_offsets_kernel(DeviceRouting r, RouteLayoutArgs a, int tiles) {
    __shared__ int scan_shared[WARP_SIZE + 1];
    __shared__ double sum_shared[WARP_SIZE];
    int N = a.N, E = a.E, e = threadIdx.x, total;
    int offset = block_exclusive_scan(e < E ? r.tokens_per_expert[e] : 0, scan_shared, &total);
    if (e < E) { r.expert_offsets[e] = offset; }
    int M = a.expert_choice ? total : N * a.k;  // assignments in all
    // f_e P_e; the assignments fraction f_e of expert choice is cap / (E cap) = 1/E for every expert
    double balance = e < E ? (double)r.assignments[e] / M * (r.prob_sums[e] / N) : 0.0;
    balance = block_reduce_sum(balance, sum_shared);

    int before = 0;  // the rows of the tokens of the earlier chunks of tiles
    double entropy = 0.0;
    for (int base = 0; base < tiles; base += blockDim.x) {
        int b = base + threadIdx.x, chunk;
        int at = before + block_exclusive_scan(b < tiles ? r.tile_row_start[b] : 0, scan_shared, &chunk);
        if (b < tiles) {
            r.tile_row_start[b] = at;
            entropy += r.tile_entropy[b];
        }
        before += chunk;
    }
    entropy = block_reduce_sum(entropy, sum_shared);
    double z2 = 0.0;
    for (int t = threadIdx.x; t < N; t += blockDim.x) { z2 += (double)r.lse[t] * r.lse[t]; }
    z2 = block_reduce_sum(z2, sum_shared);
    if (threadIdx.x == 0) {
        r.expert_offsets[E] = total;
        r.counts[0] = M;
        r.counts[1] = M - total;
        *r.balance_loss = (float)(E * balance);
        r.token_row_offsets[N] = before;
        *r.z_loss = (float)(z2 / N);
        *r.entropy = entropy;
    }
}

// Layout, step 4, a block per tile b: every kept candidate's row and each token's rows.
//   - The candidates in order, 32 to a warp (one per lane): lanes of the same expert find each
//     other (__match_any_sync, every warp at once); then the warps in turn: a candidate's row is
//     its expert's next row (in shared memory: the expert's offset plus its rows in the earlier
//     tiles, to begin with) plus the same expert's candidates in the lanes before it, and the
//     group's last lane moves the expert's next row past the group. An expert's rows thus follow
//     token order, and the candidate's keep[] entry becomes its row, with the row's token and
//     combine weight.
//   - Then a thread per token: its rows in candidate order (choice order, or expert order), at
//     the tile's first row plus a scan of the tile's tokens' row counts.
__global__ void __launch_bounds__(ROUTE_TILE) route_place_kernel(DeviceRouting r, RouteLayoutArgs a) {
    __shared__ int next_row[ROUTE_MAX_EXPERTS];
    __shared__ int scan_shared[WARP_SIZE + 1];
    int b = blockIdx.x, E = a.E, lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
    int per_token = route_per_token(a.expert_choice, E, a.k);
    RouteTile tile = route_tile(a, b);
    int* keep = a.expert_choice ? r.pair_row : r.choice_row;
    for (int e = threadIdx.x; e < E; e += blockDim.x) { next_row[e] = r.expert_offsets[e] + r.tile_rows[(size_t)e * r.tiles + b]; }
    __syncthreads();
    for (int base = tile.first; base < tile.last; base += blockDim.x) {
        int i = base + threadIdx.x;
        int e = i < tile.last && route_kept(r, a, keep, i) ? route_expert(r, a, i) : -1;
        unsigned same = __match_any_sync(0xffffffff, e);  // the lanes of this warp holding the same expert
        int before = __popc(same & ((1u << lane) - 1));   // of them, those before this lane
        bool last = lane == 31 - __clz((int)same);        // this lane is the group's last
        for (int w = 0; w < warps; w++) {  // the warps in turn: warp w's candidates follow warp w - 1's
            if (warp == w) {
                int row = e >= 0 ? next_row[e] + before : -1;
                __syncwarp();  // every lane has read next_row before the groups' last lanes move it
                if (e >= 0) {
                    keep[i] = row;
                    r.row_token[row] = i / per_token;
                    r.row_weight[row] = a.expert_choice ? r.probs[i] : r.choice_weight[i];  // expert choice: i = t E + e
                    if (last) { next_row[e] = row + 1; }
                }
            }
            __syncthreads();
        }
    }

    // each token's rows, in candidate order (keep[] holds the tile's rows now: the barrier above)
    int t = tile.t0 + threadIdx.x, count = 0, tile_rows;  // tokens per tile <= ROUTE_TILE threads
    if (t < tile.t1) {
        for (int j = 0; j < per_token; j++) { count += keep[(size_t)t * per_token + j] >= 0; }
    }
    int at = r.tile_row_start[b] + block_exclusive_scan(count, scan_shared, &tile_rows);
    if (t < tile.t1) {
        r.token_row_offsets[t] = at;
        for (int j = 0; j < per_token; j++) {
            int row = keep[(size_t)t * per_token + j];
            if (row >= 0) { r.token_rows[at++] = row; }
        }
    }
}

// One warp per token: the combine-weight gradients dw, dp (renorm or not), the balance term,
// the softmax backward and the z term into dz = dlogits[t] (router_gemm then takes dh += dz . Wr
// and dWr += dz^T h).
__global__ void router_backward_kernel(float* dlogits, const float* drow_weight, const int* choice_expert, const float* choice_weight,
                                       const int* choice_row, const int* pair_row, const float* probs, const float* lse,
                                       const int* assignments, const int* counts, float alpha, float beta, int N, int E, int k, int renorm) {
    extern __shared__ float smem[];
    int warps = blockDim.x / WARP_SIZE, warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    float* dp = smem + warp * E;
    int t = blockIdx.x * warps + warp;
    if (t >= N) { return; }
    const float* p = probs + (size_t)t * E;
    if (k > 0) {
        for (int e = lane; e < E; e += WARP_SIZE) { dp[e] = 0.0f; }
        __syncwarp();
        if (lane == 0) {
            // k is small: one lane, in choice order as the CPU twin sums
            const int* chosen = choice_expert + (size_t)t * k;
            float S = 0.0f, wdw = 0.0f;
            for (int j = 0; j < k; j++) {
                int row = choice_row[(size_t)t * k + j];
                float g = row >= 0 ? drow_weight[row] : 0.0f;
                dp[chosen[j]] = g;
                S += p[chosen[j]];
                wdw += choice_weight[(size_t)t * k + j] * g;
            }
            if (renorm) {
                for (int j = 0; j < k; j++) { dp[chosen[j]] = (dp[chosen[j]] - wdw) / S; }
            }
        }
    } else {
        for (int e = lane; e < E; e += WARP_SIZE) {
            int row = pair_row[(size_t)t * E + e];
            dp[e] = row >= 0 ? drow_weight[row] : 0.0f;
        }
    }
    __syncwarp();
    // the balance loss: dL/dp[t][e] = alpha E f_e / N, the same for every token
    float pdp = 0.0f;
    for (int e = lane; e < E; e += WARP_SIZE) {
        dp[e] += alpha * E * ((float)assignments[e] / counts[0]) / N;
        pdp += p[e] * dp[e];
    }
    pdp = warp_reduce_sum(pdp);
    float z_term = 2.0f * beta * lse[t] / N;
    for (int e = lane; e < E; e += WARP_SIZE) { dlogits[(size_t)t * E + e] = p[e] * (dp[e] - pdp) + z_term * p[e]; }
}

// stats += this forward's assignments, counts, entropy sum (route_offsets_kernel's) and tokens;
// one block of at least E threads
__global__ void routing_stats_kernel(double* stats, const int* assignments, const int* counts, const double* entropy, int N, int E) {
    int e = threadIdx.x;
    if (e < E) { stats[e] += assignments[e]; }
    if (e == 0) {
        stats[E] += counts[0];
        stats[E + 1] += counts[1];
        stats[E + 2] += *entropy;
        stats[E + 3] += N;
    }
}

// ----------------------------------------------------------------------------
// kernel launchers

// tokens per block of the warp-per-token kernels, and their shared memory (E floats and E ints per
// warp): 16 KiB at most for the E <= 1024 a config allows, under the 48 KiB default, so their
// launches need no cudaFuncSetAttribute (allow_dynamic_smem)
static int router_warps_per_block(int E) { return E <= 256 ? 8 : 2; }
static size_t router_shared_bytes(int E) { return (size_t)router_warps_per_block(E) * E * (sizeof(float) + sizeof(int)); }

// Adds the routing's buffers to d, for up to N tokens of the config's routing (its experts, top-k
// or expert choice, channels); routing_ready once d is allocated. The choices' arrays are the
// mode's: N*k of each for token choice, N*E rows for expert choice. The backward's three buffers
// live only from unpermute_tokens_backward to the end of router_backward, one layer at a time:
// with backward_owner (an earlier layer's routing of the same sizes) r lists none of its own but
// uses the owner's, so L MoE layers hold one set (at E=64, B=64, T=1024, C=768 a set is 114 MiB,
// 96 of them dWr's partial sums). NULL: r owns its set.
static void routing_add_buffers(DeviceRouting* r, DeviceBuffers* d, const ModelConfig* cfg, int N, const DeviceRouting* backward_owner) {
    memset(r, 0, sizeof(*r));
    bool ec = cfg->router == ROUTER_EXPERT;
    int E = cfg->num_experts, C = cfg->channels, max_rows = max_routing_rows(cfg, N);
    if (E > ROUTE_MAX_EXPERTS) { die("routing_add_buffers: E=%d experts, the layout kernels take at most %d", E, ROUTE_MAX_EXPERTS); }
    r->N = N;
    r->E = E;
    r->k = ec ? 0 : cfg->top_k;
    r->C = C;
    r->expert_choice = ec;
    r->max_rows = max_rows;
    r->tiles = ceil_div_int(N, route_tile_tokens(route_per_token(ec, E, r->k)));
    size_t NE = (size_t)N * E, Nk = (size_t)N * r->k, rows = std::max(max_rows, 1), tiles_E = (size_t)r->tiles * E;
    buffers_add(d, &r->logits, NE);
    buffers_add(d, &r->probs, NE);
    buffers_add(d, &r->lse, N);
    if (ec) {
        buffers_add(d, &r->pair_row, NE);
    } else {
        buffers_add(d, &r->choice_expert, Nk);
        buffers_add(d, &r->choice_weight, Nk);
        buffers_add(d, &r->choice_row, Nk);
    }
    buffers_add(d, &r->tokens_per_expert, E);
    buffers_add(d, &r->expert_offsets, E + 1);
    buffers_add(d, &r->row_token, rows);
    buffers_add(d, &r->row_weight, rows);
    buffers_add(d, &r->token_row_offsets, N + 1);
    buffers_add(d, &r->token_rows, rows);
    buffers_add(d, &r->assignments, E);
    buffers_add(d, &r->prob_sums, E);
    buffers_add(d, &r->counts, 2);
    buffers_add(d, &r->balance_loss, 1);
    buffers_add(d, &r->z_loss, 1);
    buffers_add(d, &r->entropy, 1);
    buffers_add(d, &r->tile_rows, tiles_E);
    buffers_add(d, &r->tile_assigned, tiles_E);
    buffers_add(d, &r->tile_prob_sums, tiles_E);
    buffers_add(d, &r->tile_entropy, r->tiles);
    buffers_add(d, &r->tile_row_start, r->tiles);
    if (ec || cfg->capacity_factor > 0) {  // something may be dropped: the capacity rule's scratch
        size_t chunks_E = (size_t)route_keep_chunks(N, E) * E;
        if (!ec) { buffers_add(d, &r->keep_counts, chunks_E * r->k); }
        if (ec || cfg->capacity_priority == PRIORITY_SCORE) { buffers_add(d, &r->keep_hist, chunks_E * 256); }
        buffers_add(d, &r->keep_ties, chunks_E);
        buffers_add(d, &r->keep_plan, (size_t)E * KEEP_PLAN_INTS);
    }
    buffers_add(d, &r->stats, E + 4);
    r->backward_owner = backward_owner;
    if (backward_owner) {
        const DeviceRouting* o = backward_owner;
        if (o->backward_owner || o->N != N || o->E != E || o->max_rows < max_rows || o->C != C) {
            die("routing_add_buffers: the backward buffers' owner holds N=%d E=%d rows=%d C=%d, this routing needs N=%d E=%d rows=%d C=%d", o->N,
                o->E, o->max_rows, o->C, N, E, max_rows, C);
        }
        return;
    }
    buffers_add(d, &r->drow_weight, rows);
    buffers_add(d, &r->dlogits, NE);
    buffers_add(d, &r->drouterw_partial, (size_t)ceil_div_int(N, ROUTER_TOKEN_CHUNK) * E * C);
}

// once d is allocated: the backward buffers taken from their owner, the statistics cleared
static void routing_ready(DeviceRouting* r) {
    if (r->backward_owner) {
        r->drow_weight = r->backward_owner->drow_weight;
        r->dlogits = r->backward_owner->dlogits;
        r->drouterw_partial = r->backward_owner->drouterw_partial;
    }
    cudaCheck(cudaMemset(r->stats, 0, (r->E + 4) * sizeof(double)));
}

// The routing of n tokens h (n, C) with the fp32 router weights routerw (E, C), in two steps that
// router_forward runs one after the other (the kernel study times them apart):
//   router_scores  the logits (router_logits: router_gemm_kernel), then the softmax and
//                  log-sum-exp of every token and, for token choice, its top-k and combine weights
//                  (router_choose: router_scores_kernel);
//   route_layout   the capacity rule, the expert-contiguous row layout, each token's rows and the
//                  auxiliary losses (route_keep: the route_keep_*_kernels where something may
//                  be dropped; then route_rows: route_count_kernel, route_scan_kernel,
//                  route_offsets_kernel and route_place_kernel).

// logits (n, E) = h (n, C) . routerw (E, C)^T: A(t, c) = h[t C + c], B(c, e) = routerw[e C + c]
static void router_logits(float* logits, const floatX* h, const float* routerw, int n, int C, int E, cudaStream_t stream) {
    RouterGemm<floatX, float, float> g = {logits, E, 0, h, (size_t)C, 1, routerw, 1, (size_t)C, n, E, C, C};
    router_gemm<true, false>(g, stream);
}

// from r->logits of n tokens: probabilities, lse and, for token choice, the choices and weights
static void router_choose(DeviceRouting* r, const ModelConfig* cfg, int n, cudaStream_t stream) {
    int E = cfg->num_experts, k = cfg->router == ROUTER_EXPERT ? 0 : cfg->top_k, warps = router_warps_per_block(E);
    router_scores_kernel<<<ceil_div_int(n, warps), warps * WARP_SIZE, router_shared_bytes(E), stream>>>(
        r->logits, r->probs, r->lse, r->choice_expert, r->choice_weight, r->forced_choice_expert, n, E, k, cfg->renorm);
    cudaCheckLaunch();
}

// checks that n tokens of the config fit r's buffers, and makes them r's tokens
static void router_begin(DeviceRouting* r, const ModelConfig* cfg, int n, int C) {
    int E = cfg->num_experts;
    bool ec = cfg->router == ROUTER_EXPERT;
    int k = ec ? 0 : cfg->top_k;
    if (n > r->N || E != r->E || C != r->C || ec != r->expert_choice || k != r->k || max_routing_rows(cfg, n) > r->max_rows) {
        die("router_forward: %d tokens, E=%d, k=%d, %s, C=%d do not fit the routing buffers (%d, %d, %d, %s, %d)", n, E, k,
            ec ? "expert choice" : "token choice", C, r->N, r->E, r->k, r->expert_choice ? "expert choice" : "token choice", r->C);
    }
    r->n = n;
}

static void router_scores(DeviceRouting* r, const floatX* h, const float* routerw, const ModelConfig* cfg, int n, int C, cudaStream_t stream) {
    router_begin(r, cfg, n, C);
    router_logits(r->logits, h, routerw, n, C, cfg->num_experts, stream);
    router_choose(r, cfg, n, stream);
}

// the capacity rule's kernels (route_keep_count_kernel and the rest, above) for the layout a
static void route_keep(DeviceRouting* r, const RouteLayoutArgs& a, cudaStream_t stream) {
    static_assert(ROUTE_KEEP_THREADS == 256, "a thread per bin of the radix passes' histograms");
    int chunks = route_keep_chunks(a.N, a.E);
    dim3 grid(chunks, a.E);
    if (!r->forced_keep) {
        if (!a.expert_choice) {
            route_keep_count_kernel<<<grid, ROUTE_KEEP_THREADS, a.k * sizeof(int), stream>>>(*r, a, chunks);
            cudaCheckLaunch();
        }
        route_keep_plan_kernel<<<a.E, ROUTE_KEEP_THREADS, 0, stream>>>(*r, a, chunks);
        cudaCheckLaunch();
        if (route_by_score(a)) {
            for (int shift = 24; shift >= 0; shift -= 8) {
                route_keep_histogram_kernel<<<grid, ROUTE_KEEP_THREADS, 0, stream>>>(*r, a, chunks, shift);
                cudaCheckLaunch();
                route_keep_select_kernel<<<a.E, ROUTE_KEEP_THREADS, 0, stream>>>(*r, chunks, shift);
                cudaCheckLaunch();
            }
        }
    }
    route_keep_mark_kernel<<<grid, ROUTE_KEEP_THREADS, 0, stream>>>(*r, a, chunks);
    cudaCheckLaunch();
}

// the row layout of the kept candidates, and the losses (route_count_kernel and the three after it)
static void route_rows(DeviceRouting* r, const RouteLayoutArgs& a, cudaStream_t stream) {
    int tiles = ceil_div_int(a.N, route_tile_tokens(route_per_token(a.expert_choice, a.E, a.k)));
    route_count_kernel<<<tiles, ROUTE_TILE, 0, stream>>>(*r, a);
    cudaCheckLaunch();
    route_scan_kernel<<<a.E, ROUTE_TILE, 0, stream>>>(*r, tiles);
    cudaCheckLaunch();
    route_offsets_kernel<<<1, ROUTE_THREADS, 0, stream>>>(*r, a, tiles);
    cudaCheckLaunch();
    route_place_kernel<<<tiles, ROUTE_TILE, 0, stream>>>(*r, a);
    cudaCheckLaunch();
}

// the sizes of the layout of the r->n tokens router_scores scored
static RouteLayoutArgs route_layout_args(const DeviceRouting* r, const ModelConfig* cfg) {
    int n = r->n;
    bool ec = cfg->router == ROUTER_EXPERT;
    return {n, cfg->num_experts, ec ? 0 : cfg->top_k, ec ? expert_choice_capacity(cfg, n) : token_choice_capacity(cfg, n),
            cfg->capacity_priority, ec};
}

// the layout of the r->n tokens router_scores scored
static void route_layout(DeviceRouting* r, const ModelConfig* cfg, cudaStream_t stream) {
    RouteLayoutArgs a = route_layout_args(r, cfg);
    if (a.cap >= 0 || r->forced_keep) { route_keep(r, a, stream); }  // dropless token choice keeps every candidate
    route_rows(r, a, stream);
}

static void router_forward(DeviceRouting* r, const floatX* h, const float* routerw, const ModelConfig* cfg, int n, int C, cudaStream_t stream) {
    router_scores(r, h, routerw, cfg, n, C, stream);
    route_layout(r, cfg, stream);
}

// dh (n, C) += and drouterw (E, C) += the router's share of the gradient, from r->drow_weight
// (written by unpermute_tokens_backward) and the auxiliary losses. alpha and beta carry the
// micro-batch's loss scale. Two steps:
//   router_dlogits          dz = dL/dlogits of every token (router_backward_kernel);
//   router_products_backward  dh += dz . Wr and dWr += dz^T h (router_gemm_kernel, then
//                           column_sums over the chunks).
static void router_dlogits(DeviceRouting* r, const ModelConfig* cfg, float alpha, float beta, int n, cudaStream_t stream) {
    int E = cfg->num_experts, k = cfg->router == ROUTER_EXPERT ? 0 : cfg->top_k, warps = router_warps_per_block(E);
    router_backward_kernel<<<ceil_div_int(n, warps), warps * WARP_SIZE, router_shared_bytes(E), stream>>>(
        r->dlogits, r->drow_weight, r->choice_expert, r->choice_weight, r->choice_row, r->pair_row, r->probs, r->lse, r->assignments,
        r->counts, alpha, beta, n, E, k, cfg->renorm);
    cudaCheckLaunch();
}

// drouterw (E, C) += the partial sums of n tokens' chunks (column_sums: a fixed order)
static void router_weight_grad_sum(float* drouterw, const float* partial, int n, int C, int E, cudaStream_t stream) {
    int chunks = ceil_div_int(n, ROUTER_TOKEN_CHUNK);
    column_sums(drouterw, partial, (size_t)E * C, chunks, E * C, stream);
}

// from dz = r->dlogits (n, E): dh (n, C) += dz . routerw (E, C), and drouterw (E, C) += dz^T h, as
// partial sums over chunks of ROUTER_TOKEN_CHUNK tokens (r->drouterw_partial), then their column
// sums over the chunks
static void router_products_backward(floatX* dh, float* drouterw, const DeviceRouting* r, const floatX* h, const float* routerw, int n,
                                     int C, int E, cudaStream_t stream) {
    // A(t, e) = dz[t E + e], B(e, c) = routerw[e C + c]
    RouterGemm<float, float, floatX> dh_product = {dh, C, 0, r->dlogits, (size_t)E, 1, routerw, (size_t)C, 1, n, C, E, E};
    router_gemm<true, true>(dh_product, stream);
    // batch = chunk: partial[chunk] (E, C) = dz^T . h over the chunk, A(e, t) = dz[t E + e], B(t, c) = h[t C + c]
    RouterGemm<float, floatX, float> dw_product = {
        r->drouterw_partial, C, (size_t)E * C, r->dlogits, 1, (size_t)E, h, (size_t)C, 1, E, C, n, ROUTER_TOKEN_CHUNK};
    router_gemm<false, false>(dw_product, stream);
    router_weight_grad_sum(drouterw, r->drouterw_partial, n, C, E, stream);
}

static void router_backward(floatX* dh, float* drouterw, DeviceRouting* r, const floatX* h, const float* routerw, const ModelConfig* cfg,
                            float alpha, float beta, int n, int C, cudaStream_t stream) {
    router_dlogits(r, cfg, alpha, beta, n, stream);
    router_products_backward(dh, drouterw, r, h, routerw, n, C, cfg->num_experts, stream);
}

// adds the last forward's counts and entropy to the report's sums (training batches only)
static void routing_stats_accumulate(DeviceRouting* r, cudaStream_t stream) {
    routing_stats_kernel<<<1, ROUTE_THREADS, 0, stream>>>(r->stats, r->assignments, r->counts, r->entropy, r->n, r->E);
    cudaCheckLaunch();
}

// the sums as they stand (E + 4 doubles: assignments per expert, in all, dropped, entropy sum,
// tokens), without clearing them, for a checkpoint (waits for the GPU); and their setting, for a resumed run
static void routing_stats_copy_out(const DeviceRouting* r, double* out) {
    cudaCheck(cudaDeviceSynchronize());
    cudaCheck(cudaMemcpy(out, r->stats, (r->E + 4) * sizeof(double), cudaMemcpyDeviceToHost));
}

static void routing_stats_copy_in(DeviceRouting* r, const double* in) {
    cudaCheck(cudaMemcpy(r->stats, in, (r->E + 4) * sizeof(double), cudaMemcpyHostToDevice));
}

// reads the sums since the last read (waits for the GPU) and clears them
static void routing_stats_read(DeviceRouting* r, double* assignments, double* total, double* dropped, double* entropy_sum, double* tokens) {
    std::vector<double> s(r->E + 4);
    routing_stats_copy_out(r, s.data());
    cudaCheck(cudaMemset(r->stats, 0, s.size() * sizeof(double)));
    for (int e = 0; e < r->E; e++) { assignments[e] = s[e]; }
    *total = s[r->E];
    *dropped = s[r->E + 1];
    *entropy_sum = s[r->E + 2];
    *tokens = s[r->E + 3];
}
