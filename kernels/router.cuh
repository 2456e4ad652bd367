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
  router_scores_kernel   one warp per token. E dot products of length C (lanes over channels,
                         warp sums), softmax and log-sum-exp, then k rounds of a warp arg-max for
                         the top-k and the combine weights.
  route_select_kernel    a block per expert: which of its candidates it keeps, slot by slot (the
                         capacity rule; by score, a radix select of the cut key in four 8-bit
                         passes, ties in token order), then their rows within the expert, in
                         token order. O(N k / 1024) per thread and pass.
  route_rows_kernel      one block for the layer: the expert offsets, every row's token and
                         weight, each token's rows (a scan over the tokens), the auxiliary losses.
  Both order tokens the same way: tiles of 1024 consecutive tokens, one per thread, so that a
  warp reads 32 neighbouring tokens' choices (a few cache lines, not 32), a block scan within
  the tile and a running total across tiles (N / 1024 scans a pass).
  router_backward_kernel one warp per token: dw -> dp -> dz, and dh += dz . Wr.
  router_weight_grad_*   dWr as partial sums over chunks of tokens, then the chunks in order.
Every sum has a fixed order: two runs give the same bits.
*/
#pragma once

#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "common.cuh"
#include "../common/model_config.h"

#define ROUTE_THREADS 1024      // the blocks of route_select_kernel and route_rows_kernel
#define ROUTER_TOKEN_CHUNK 128  // tokens per partial sum of dWr

// One MoE layer's routing of one micro-batch, on the device. Rows are the kept (token, expert)
// pairs, expert by expert, in token order within an expert (doc/routing.md section 3).
struct DeviceRouting {
    int N, E, k, C, max_rows;  // the sizes the buffers hold
    int n;                     // tokens of the last forward
    // per token
    float* logits;             // (N, E) fp32
    float* probs;              // (N, E) softmax of the logits
    float* lse;                // (N) log-sum-exp of each token's logits
    int* choice_expert;        // (N*k) token choice: token t's j-th expert, by decreasing logit
    float* choice_weight;      // (N*k) its combine weight
    int* choice_row;           // (N*k) its row, or -1 where capacity dropped it
    int* pair_row;             // (N*E) expert choice: the row of (token, expert), or -1
    // the rows
    int* tokens_per_expert;    // (E) kept rows of each expert
    int* expert_offsets;       // (E+1) first row of each expert; expert_offsets[E] rows in all
    int* row_token;            // (max_rows) the token of each row
    float* row_weight;         // (max_rows) its combine weight
    int* token_row_offsets;    // (N+1) each token's rows, in combine order
    int* token_rows;           // (max_rows)
    // this forward's counts and losses
    int* assignments;          // (E) choices of each expert before dropping
    double* prob_sums;         // (E) sum over the tokens of p[t][e], for the balance loss
    int* counts;               // (2) assignments in all, dropped ones
    float* balance_loss;       // (1) E * sum_e f_e P_e
    float* z_loss;             // (1) mean_t lse_t^2
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

// Warp arg-max of (value, index) pairs under "larger value, then lower index"; -1 loses to all.
__device__ __forceinline__ void warp_argmax(float* value, int* index) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        float v = __shfl_xor_sync(0xffffffff, *value, offset);
        int i = __shfl_xor_sync(0xffffffff, *index, offset);
        bool better = i >= 0 && (*index < 0 || v > *value || (v == *value && i < *index));
        if (better) { *value = v; *index = i; }
    }
}

// One warp per token: logits, softmax, lse and, for token choice (k > 0), the top-k and weights.
// Shared memory: per warp, E floats (the logits) and E ints (taken flags).
__global__ void router_scores_kernel(float* logits, float* probs, float* lse, int* choice_expert, float* choice_weight, const floatX* h,
                                     const float* routerw, const int* forced_choice, int N, int C, int E, int k, int renorm) {
    extern __shared__ float smem[];
    int warps = blockDim.x / WARP_SIZE, warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    float* z = smem + warp * E;
    int* taken = (int*)(smem + warps * E) + warp * E;
    int t = blockIdx.x * warps + warp;
    if (t >= N) { return; }  // the whole warp leaves together
    const floatX* ht = h + (size_t)t * C;
    for (int e = 0; e < E; e++) {
        const float* w = routerw + (size_t)e * C;
        float acc = 0.0f;
        for (int c = lane; c < C; c += WARP_SIZE) { acc += to_float(ht[c]) * w[c]; }
        acc = warp_reduce_sum(acc);
        if (lane == 0) { z[e] = acc; }
    }
    __syncwarp();
    float maxval = -INFINITY;
    for (int e = lane; e < E; e += WARP_SIZE) { maxval = fmaxf(maxval, z[e]); }
    maxval = warp_reduce_max(maxval);
    float sum = 0.0f;
    for (int e = lane; e < E; e += WARP_SIZE) { sum += expf(z[e] - maxval); }
    sum = warp_reduce_sum(sum);
    float* pt = probs + (size_t)t * E;
    for (int e = lane; e < E; e += WARP_SIZE) {
        logits[(size_t)t * E + e] = z[e];
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

// Exclusive prefix sum over the block of one int per thread; *total gets the sum. `shared`
// holds 33 ints. Every thread must call it.
__device__ int block_exclusive_scan(int v, int* shared, int* total) {
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
    int inclusive = v;
    for (int offset = 1; offset < WARP_SIZE; offset <<= 1) {
        int u = __shfl_up_sync(0xffffffff, inclusive, offset);
        if (lane >= offset) { inclusive += u; }
    }
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

// Sum over the block in double, returned to every thread; `shared` holds 32 doubles.
__device__ double block_reduce_sum_double(double v, double* shared) {
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
    for (int offset = 16; offset > 0; offset >>= 1) { v += __shfl_xor_sync(0xffffffff, v, offset); }
    __syncthreads();
    if (lane == 0) { shared[warp] = v; }
    __syncthreads();
    v = lane < warps ? shared[lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1) { v += __shfl_xor_sync(0xffffffff, v, offset); }
    return v;
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
__device__ __forceinline__ bool route_by_score(const RouteLayoutArgs& a) { return a.expert_choice || a.priority == PRIORITY_SCORE; }
__device__ __forceinline__ unsigned route_key(const DeviceRouting& r, const RouteLayoutArgs& a, int t, int e) {
    return route_by_score(a) ? __float_as_uint(r.probs[(size_t)t * a.E + e]) : 0u;
}

// Radix select over the block: the need-th largest key (need >= 1) among expert e's candidates in
// slot j, each thread taking every blockDim.x-th token. Returns the key and sets *ties_kept to how
// many candidates equal to it are kept (need minus those above it). Four passes of 8 bits from
// the top: a histogram of the candidates that match the digits found so far, then the bin in which
// the need-th largest falls. The histogram counts integers, so the result does not depend on the
// order of the atomics.
__device__ unsigned route_select_key(const DeviceRouting& r, const RouteLayoutArgs& a, int j, int e, int need, int* ties_kept) {
    __shared__ int hist[256];
    __shared__ unsigned found[2];  // the digits found so far, the need left within them
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
        if (threadIdx.x < WARP_SIZE) {
            // lane l holds the bins 255 - 8l down to 248 - 8l; the lanes before it hold the larger keys
            int lane = threadIdx.x, top = 255 - 8 * lane, sum = 0;
            for (int b = top; b > top - 8; b--) { sum += hist[b]; }
            int above = sum;
            for (int offset = 1; offset < WARP_SIZE; offset <<= 1) {
                int u = __shfl_up_sync(0xffffffff, above, offset);
                if (lane >= offset) { above += u; }
            }
            above -= sum;  // the keys in the bins of the earlier lanes
            if (above < need && above + sum >= need) {  // one lane: the need-th largest is in its bins
                int b = top, left = need - above;
                while (hist[b] < left) { left -= hist[b--]; }
                found[0] = prefix | ((unsigned)b << shift);
                found[1] = (unsigned)left;
            }
        }
        __syncthreads();
        prefix = found[0];
        need = (int)found[1];
        mask |= 255u << shift;
    }
    *ties_kept = need;
    return prefix;
}

// Step 1 of the layout, a block per expert e: which of e's candidates are kept, and the row of each
// kept one among e's rows. Slot by slot (all first choices before any second choice), a slot's
// candidates are all kept while they fit in what is left of the capacity; in the slot where it
// runs out, the first ones by priority are kept: by order, the first in token order; by score
// (and for expert choice), those above the cut key found by route_select_key, and of those equal
// to it the first in token order. Later slots keep nothing. Then the kept candidates in token
// order get e's rows 0, 1, ... Writes keep[i] = that row or -1 (choice_row for token choice,
// pair_row for expert choice: the blocks write disjoint candidates), e's counts, and sum_t p[t][e].
// Passes in token order go through tiles of blockDim.x consecutive tokens, a token per thread
// (neighbouring threads read neighbouring tokens' choices), a block scan ordering each tile and a
// running total carrying the tiles before it.
__global__ void __launch_bounds__(ROUTE_THREADS) route_select_kernel(DeviceRouting r, RouteLayoutArgs a) {
    __shared__ int scan_shared[WARP_SIZE + 1];
    __shared__ double sum_shared[WARP_SIZE];
    int e = blockIdx.x, N = a.N, threads = blockDim.x;
    int slots = a.expert_choice ? 1 : a.k;
    int* keep = a.expert_choice ? r.pair_row : r.choice_row;

    int left = a.cap < 0 ? INT_MAX : a.cap;  // rows e may still take
    int assigned = 0;
    for (int j = 0; j < slots; j++) {
        int mine = 0, count;
        for (int t = threadIdx.x; t < N; t += threads) { mine += route_candidate(r, a, t, j, e) >= 0; }
        block_exclusive_scan(mine, scan_shared, &count);
        assigned += count;
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
    __syncthreads();  // this block's keep[] is written

    // e's rows, in token order; and P_e's sum (each thread's tokens, then a fixed tree over the threads)
    int rows = 0;  // e's rows in the earlier tiles
    double P = 0.0;
    for (int base = 0; base < N; base += threads) {
        int t = base + threadIdx.x, kept = 0, tile_rows;
        if (t < N) {
            for (int j = 0; j < slots; j++) {
                int i = route_candidate(r, a, t, j, e);
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
    P = block_reduce_sum_double(P, sum_shared);
    if (threadIdx.x == 0) {
        r.tokens_per_expert[e] = rows;
        r.assignments[e] = assigned;
        r.prob_sums[e] = P;
    }
}

// Step 2 of the layout, one block: the expert offsets, each candidate's row (expert offset plus
// its row within the expert), the rows' tokens and weights, each token's rows in combine order
// (choice order, or expert order), and the auxiliary losses, every sum in a fixed order.
__global__ void __launch_bounds__(ROUTE_THREADS) route_rows_kernel(DeviceRouting r, RouteLayoutArgs a) {
    __shared__ int scan_shared[WARP_SIZE + 1];
    __shared__ double sum_shared[WARP_SIZE];
    int N = a.N, E = a.E, threads = blockDim.x;
    bool ec = a.expert_choice;
    int per_token = ec ? E : a.k;  // candidates per token
    int M = N * per_token;
    int* keep = ec ? r.pair_row : r.choice_row;
    if (threadIdx.x == 0) {
        int offset = 0;
        double balance = 0.0;
        for (int e = 0; e < E; e++) {
            r.expert_offsets[e] = offset;
            offset += r.tokens_per_expert[e];
            // the assignments fraction f_e of expert choice is cap / (E cap) = 1/E for every expert
            balance += (double)r.assignments[e] / M * (r.prob_sums[e] / N);
        }
        r.expert_offsets[E] = offset;
        r.counts[0] = M;
        r.counts[1] = ec ? 0 : M - offset;
        *r.balance_loss = (float)(E * balance);
    }
    __syncthreads();  // the offsets are visible to the block

    // each token's rows, in token order: tiles of `threads` tokens, as in route_select_kernel
    int total = 0;  // the rows of the tokens in the earlier tiles
    for (int base = 0; base < N; base += threads) {
        int t = base + threadIdx.x, count = 0, tile_rows;
        if (t < N) {
            for (int j = 0; j < per_token; j++) { count += keep[t * per_token + j] >= 0; }
        }
        int at = total + block_exclusive_scan(count, scan_shared, &tile_rows);
        if (t < N) {
            r.token_row_offsets[t] = at;
            for (int j = 0; j < per_token; j++) {
                int i = t * per_token + j;
                if (keep[i] < 0) { continue; }
                int e = ec ? j : r.choice_expert[i];
                int row = r.expert_offsets[e] + keep[i];
                keep[i] = row;
                r.row_token[row] = t;
                r.row_weight[row] = ec ? r.probs[(size_t)t * E + e] : r.choice_weight[i];
                r.token_rows[at++] = row;
            }
        }
        total += tile_rows;
    }
    if (threadIdx.x == 0) { r.token_row_offsets[N] = total; }

    double z2 = 0.0;
    for (int t = threadIdx.x; t < N; t += threads) { z2 += (double)r.lse[t] * r.lse[t]; }
    z2 = block_reduce_sum_double(z2, sum_shared);
    if (threadIdx.x == 0) { *r.z_loss = (float)(z2 / N); }
}

// One warp per token: the combine-weight gradients dw, dp (renorm or not), the balance term,
// the softmax backward and the z term into dz = dlogits[t], then dh[t] += dz . Wr.
__global__ void router_backward_kernel(floatX* dh, float* dlogits, const float* drow_weight, const int* choice_expert,
                                       const float* choice_weight, const int* choice_row, const int* pair_row, const float* probs,
                                       const float* lse, const int* assignments, const int* counts, const float* routerw, float alpha,
                                       float beta, int N, int C, int E, int k, int renorm) {
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
    for (int e = lane; e < E; e += WARP_SIZE) {
        float dz = p[e] * (dp[e] - pdp) + z_term * p[e];
        dlogits[(size_t)t * E + e] = dz;
        dp[e] = dz;
    }
    __syncwarp();
    floatX* dht = dh + (size_t)t * C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float acc = 0.0f;
        for (int e = 0; e < E; e++) { acc += dp[e] * routerw[(size_t)e * C + c]; }
        dht[c] = from_float<floatX>(to_float(dht[c]) + acc);
    }
}

// partial[chunk][e][c] = sum over the chunk's tokens t (in order) of dlogits[t][e] h[t][c];
// grid (chunks, ceil(C / blockDim.x), E): the chunks in gridDim.x, which holds 2^31 - 1 of them
// (gridDim.z would stop at 65535 chunks, 8.4M tokens)
__global__ void router_weight_grad_partial_kernel(float* partial, const float* dlogits, const floatX* h, int N, int C, int E) {
    int chunk = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x, e = blockIdx.z;
    if (c >= C) { return; }
    int t0 = chunk * ROUTER_TOKEN_CHUNK, t1 = min(N, t0 + ROUTER_TOKEN_CHUNK);
    float acc = 0.0f;
    for (int t = t0; t < t1; t++) { acc += dlogits[(size_t)t * E + e] * to_float(h[(size_t)t * C + c]); }
    partial[((size_t)chunk * E + e) * C + c] = acc;
}

// drouterw[e][c] += the chunks' partial sums, in chunk order
__global__ void router_weight_grad_sum_kernel(float* drouterw, const float* partial, int chunks, int C, int E) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= E * C) { return; }
    float acc = 0.0f;
    for (int chunk = 0; chunk < chunks; chunk++) { acc += partial[(size_t)chunk * E * C + i]; }
    drouterw[i] += acc;
}

// stats += this forward's assignments, counts, entropy sum and tokens (one block)
__global__ void routing_stats_kernel(double* stats, const int* assignments, const int* counts, const float* probs, int N, int E) {
    __shared__ double shared[WARP_SIZE];
    double h = 0.0;
    for (int t = threadIdx.x; t < N; t += blockDim.x) {
        for (int e = 0; e < E; e++) {
            double p = probs[(size_t)t * E + e];
            if (p > 0) { h -= p * log(p); }
        }
    }
    h = block_reduce_sum_double(h, shared);
    if (threadIdx.x == 0) {
        for (int e = 0; e < E; e++) { stats[e] += assignments[e]; }
        stats[E] += counts[0];
        stats[E + 1] += counts[1];
        stats[E + 2] += h;
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

// Adds the routing's buffers to d, for up to N tokens, E experts, top-k (expert choice: k = 0 is
// fine), max_rows rows, C channels; routing_ready once d is allocated. The backward's three
// buffers live only from unpermute_tokens_backward to the end of router_backward, one layer at a
// time: with backward_owner (an earlier layer's routing of the same sizes) r lists none of its own
// but uses the owner's, so L MoE layers hold one set (at E=64, B=64, T=1024, C=768 a set is
// 114 MiB, 96 of them dWr's partial sums). NULL: r owns its set.
static void routing_add_buffers(DeviceRouting* r, DeviceBuffers* d, int N, int E, int k, int max_rows, int C,
                                const DeviceRouting* backward_owner) {
    memset(r, 0, sizeof(*r));
    r->N = N;
    r->E = E;
    r->k = k;
    r->C = C;
    r->max_rows = max_rows;
    size_t NE = (size_t)N * E, Nk = (size_t)N * std::max(k, 1), rows = std::max(max_rows, 1);
    buffers_add(d, &r->logits, NE);
    buffers_add(d, &r->probs, NE);
    buffers_add(d, &r->lse, N);
    buffers_add(d, &r->choice_expert, Nk);
    buffers_add(d, &r->choice_weight, Nk);
    buffers_add(d, &r->choice_row, Nk);
    buffers_add(d, &r->pair_row, NE);
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
//   router_scores  the logits, softmax and log-sum-exp of every token and, for token choice, its
//                  top-k and combine weights (router_scores_kernel);
//   route_layout   the capacity rule, the expert-contiguous row layout, each token's rows and the
//                  auxiliary losses (route_select_kernel, then route_rows_kernel).
static void router_scores(DeviceRouting* r, const floatX* h, const float* routerw, const ModelConfig* cfg, int n, int C, cudaStream_t stream) {
    int E = cfg->num_experts;
    bool ec = cfg->router == ROUTER_EXPERT;
    int k = ec ? 0 : cfg->top_k;
    if (n > r->N || E != r->E || C != r->C || (!ec && k != r->k) || max_routing_rows(cfg, n) > r->max_rows) {
        die("router_forward: %d tokens, E=%d, k=%d, C=%d do not fit the routing buffers (%d, %d, %d, %d)", n, E, k, C, r->N, r->E, r->k, r->C);
    }
    r->n = n;
    int warps = router_warps_per_block(E);
    router_scores_kernel<<<ceil_div_int(n, warps), warps * WARP_SIZE, router_shared_bytes(E), stream>>>(
        r->logits, r->probs, r->lse, r->choice_expert, r->choice_weight, h, routerw, r->forced_choice_expert, n, C, E, k, cfg->renorm);
    cudaCheckLaunch();
}

// the layout of the r->n tokens router_scores scored
static void route_layout(DeviceRouting* r, const ModelConfig* cfg, cudaStream_t stream) {
    int n = r->n, E = cfg->num_experts;
    bool ec = cfg->router == ROUTER_EXPERT;
    int k = ec ? 0 : cfg->top_k;
    RouteLayoutArgs a = {n, E, k, ec ? expert_choice_capacity(cfg, n) : token_choice_capacity(cfg, n), cfg->capacity_priority, ec};
    route_select_kernel<<<E, ROUTE_THREADS, 0, stream>>>(*r, a);
    cudaCheckLaunch();
    route_rows_kernel<<<1, ROUTE_THREADS, 0, stream>>>(*r, a);
    cudaCheckLaunch();
}

static void router_forward(DeviceRouting* r, const floatX* h, const float* routerw, const ModelConfig* cfg, int n, int C, cudaStream_t stream) {
    router_scores(r, h, routerw, cfg, n, C, stream);
    route_layout(r, cfg, stream);
}

// dh (n, C) += and drouterw (E, C) += the router's share of the gradient, from r->drow_weight
// (written by unpermute_tokens_backward) and the auxiliary losses. alpha and beta carry the
// micro-batch's loss scale.
static void router_backward(floatX* dh, float* drouterw, DeviceRouting* r, const floatX* h, const float* routerw, const ModelConfig* cfg,
                            float alpha, float beta, int n, int C, cudaStream_t stream) {
    int E = cfg->num_experts, k = cfg->router == ROUTER_EXPERT ? 0 : cfg->top_k;
    int warps = router_warps_per_block(E);
    router_backward_kernel<<<ceil_div_int(n, warps), warps * WARP_SIZE, router_shared_bytes(E), stream>>>(
        dh, r->dlogits, r->drow_weight, r->choice_expert, r->choice_weight, r->choice_row, r->pair_row, r->probs, r->lse, r->assignments,
        r->counts, routerw, alpha, beta, n, C, E, k, cfg->renorm);
    cudaCheckLaunch();
    int chunks = ceil_div_int(n, ROUTER_TOKEN_CHUNK);
    router_weight_grad_partial_kernel<<<dim3(chunks, ceil_div_int(C, 128), E), 128, 0, stream>>>(r->drouterw_partial, r->dlogits, h, n, C, E);
    cudaCheckLaunch();
    router_weight_grad_sum_kernel<<<ceil_div_int((long long)E * C, 256), 256, 0, stream>>>(drouterw, r->drouterw_partial, chunks, C, E);
    cudaCheckLaunch();
}

// adds the last forward's counts and entropy to the report's sums (training batches only)
static void routing_stats_accumulate(DeviceRouting* r, cudaStream_t stream) {
    routing_stats_kernel<<<1, 1024, 0, stream>>>(r->stats, r->assignments, r->counts, r->probs, r->n, r->E);
    cudaCheckLaunch();
}

// reads the sums since the last read (waits for the GPU) and clears them
static void routing_stats_read(DeviceRouting* r, double* assignments, double* total, double* dropped, double* entropy_sum, double* tokens) {
    std::vector<double> s(r->E + 4);
    cudaCheck(cudaDeviceSynchronize());
    cudaCheck(cudaMemcpy(s.data(), r->stats, s.size() * sizeof(double), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemset(r->stats, 0, s.size() * sizeof(double)));
    for (int e = 0; e < r->E; e++) { assignments[e] = s[e]; }
    *total = s[r->E];
    *dropped = s[r->E + 1];
    *entropy_sum = s[r->E + 2];
    *tokens = s[r->E + 3];
}
