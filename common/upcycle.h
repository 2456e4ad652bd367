/*
Upcycling on the host (methods.md sections 3-4, doc/upcycling.md): which layers become MoE,
and how each expert and router row is initialised from the dense checkpoint. It runs once,
before training, in the CPU twin and in the GPU engine alike (the GPU engine uploads the
result), so both engines train the same model from the same seed.

  select_moe_layers   "every2" | "all" | "lastN" | "1,3,5"  ->  one flag per layer
  init_gpt2_scratch   every tensor fresh (GPT-2 init), the MoE-from-scratch baseline
  upcycle_model       dense parameters -> MoE parameters: copy / drop / noise, scaling, router
*/
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>
#include "model_config.h"
#include "rng.h"
#include "utils.h"

struct UpcycleOptions {
    int init;              // InitMethod
    double drop_ratio;     // r: fraction of an expert's hidden units re-drawn (drop) or perturbed (noise)
    int drop_independent;  // 0: one unit set per expert (paper's text), 1: one per tensor (paper's code)
    double noise_std;      // noise upcycling's perturbation
    double router_std;     // router rows ~ N(0, router_std^2)
    int weight_scaling;    // 1: scale fcw and fcprojw by sqrt(s) (He et al.)
    uint64_t seed;
};

// ----------------------------------------------------------------------------
// which layers

static inline void select_moe_layers(const char* spec, int L, int flags[MAX_LAYERS]) {
    for (int l = 0; l < MAX_LAYERS; l++) { flags[l] = 0; }
    if (strcmp(spec, "every2") == 0) {
        for (int l = 1; l < L; l += 2) { flags[l] = 1; }
        if (L < 2) { die("--moe-layers every2 selects layers 1, 3, ...: a %d-layer model has none; use all", L); }
        return;
    }
    if (strcmp(spec, "all") == 0) {
        for (int l = 0; l < L; l++) { flags[l] = 1; }
        return;
    }
    if (strncmp(spec, "last", 4) == 0) {
        char* end;
        long n = strtol(spec + 4, &end, 10);
        if (spec[4] == '\0' || *end != '\0' || n < 1 || n > L) {
            die("--moe-layers %s: expected lastN with N in 1..%d (the model has %d layers)", spec, L, L);
        }
        for (int l = L - (int)n; l < L; l++) { flags[l] = 1; }
        return;
    }
    // an explicit list: "1,3,5"
    const char* p = spec;
    int count = 0;
    while (*p) {
        char* end;
        long l = strtol(p, &end, 10);
        if (end == p || (*end != ',' && *end != '\0')) {
            die("--moe-layers %s: expected every2, all, lastN or a comma-separated list of layer indices", spec);
        }
        if (l < 0 || l >= L) { die("--moe-layers %s: layer %ld is out of range for a %d-layer model (0..%d)", spec, l, L, L - 1); }
        if (flags[l]) { die("--moe-layers %s: layer %ld is listed twice", spec, l); }
        flags[l] = 1;
        count++;
        p = (*end == ',') ? end + 1 : end;
        if (*end == ',' && *p == '\0') { die("--moe-layers %s: trailing comma", spec); }
    }
    if (count == 0) { die("--moe-layers is empty"); }
}

// ----------------------------------------------------------------------------
// GPT-2 initialisation of every tensor (the scratch baseline, and models given as a shape)

static inline void init_gpt2_scratch(const ModelConfig* cfg, float* params, uint64_t seed, double router_std) {
    size_t sizes[NUM_PARAMETER_TENSORS];
    fill_parameter_sizes(sizes, cfg);
    double residual_std = 0.02 / sqrt(2.0 * cfg->num_layers);
    float* p = params;
    for (int t = 0; t < NUM_PARAMETER_TENSORS; t++) {
        size_t n = sizes[t];
        if (parameter_is_bias(t)) {
            for (size_t i = 0; i < n; i++) { p[i] = 0.0f; }
        } else if (parameter_is_layernorm_weight(t)) {
            for (size_t i = 0; i < n; i++) { p[i] = 1.0f; }
        } else {
            double std = t == P_ROUTERW ? router_std : parameter_is_residual_projection(t) ? residual_std : 0.02;
            uint64_t stream = rng_stream(RNG_SCRATCH, 0, 0, (uint64_t)t);
            #pragma omp parallel for schedule(static)
            for (size_t i = 0; i < n; i++) { p[i] = (float)(std * random_normal(seed, stream, i)); }
        }
        p += n;
    }
}

// ----------------------------------------------------------------------------
// upcycling

struct TensorStats { double mean, std; };

// mean and unbiased (n-1) standard deviation, two passes in double
static inline TensorStats tensor_stats(const float* x, size_t n) {
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) { sum += x[i]; }
    double mean = sum / (double)n;
    double sq = 0.0;
    for (size_t i = 0; i < n; i++) { double d = x[i] - mean; sq += d * d; }
    TensorStats s = {mean, n > 1 ? sqrt(sq / (double)(n - 1)) : 0.0};
    return s;
}

// The m hidden units (of H) with the smallest random keys, ties to the smaller unit.
// Returned as a mask: selected[u] = 1.
static inline void choose_unit_set(std::vector<char>& selected, int H, int m, uint64_t seed, uint64_t stream) {
    std::vector<std::pair<uint64_t, int>> keys(H);
    for (int u = 0; u < H; u++) { keys[u] = std::make_pair(random_u64(seed, stream, (uint64_t)u), u); }
    std::sort(keys.begin(), keys.end());
    selected.assign(H, 0);
    for (int i = 0; i < m; i++) { selected[keys[i].second] = 1; }
}

// s in "scale fcw and fcprojw by sqrt(s)": the factor that keeps the expected output of the
// k combined fine-grained experts at the dense output's scale
static inline double expert_output_scale(const ModelConfig* cfg) {
    if (cfg->router == ROUTER_TOPK && cfg->renorm == 0) {
        return (double)cfg->num_experts * cfg->granularity / cfg->top_k;
    }
    return (double)cfg->granularity;
}

// One expert of MoE layer l: copy dense shard g, then re-draw (drop) or perturb (noise) the
// chosen units. fcw (H, C), fcb (H), fcprojw (C, H) are the expert's own tensors.
static inline void init_expert_units(float* fcw, float* fcb, float* fcprojw, int l, int e, int H, int C,
                                     const TensorStats stats[3], const UpcycleOptions* opt) {
    int m = (int)floor(opt->drop_ratio * H);
    if (m <= 0) { return; }
    std::vector<char> units[3];
    for (int t = 0; t < 3; t++) {
        int which = opt->drop_independent ? t : 0;
        if (t > 0 && !opt->drop_independent) { units[t] = units[0]; continue; }
        choose_unit_set(units[t], H, m, opt->seed, rng_stream(RNG_UNIT_SET, l, e, which));
    }
    bool drop = opt->init == INIT_DROP;
    int purpose = drop ? RNG_DROP_VALUES : RNG_NOISE_VALUES;
    uint64_t s_fcw = rng_stream(purpose, l, e, 0), s_fcb = rng_stream(purpose, l, e, 1), s_proj = rng_stream(purpose, l, e, 2);
    // new value of element (flat index i, old value x) of tensor t
    auto redraw = [&](int t, uint64_t stream, size_t i, float x) -> float {
        double n = random_normal(opt->seed, stream, i);
        return drop ? (float)(stats[t].mean + stats[t].std * n) : (float)((double)x + opt->noise_std * n);
    };
    for (int u = 0; u < H; u++) {
        if (units[0][u]) {
            for (int j = 0; j < C; j++) { size_t i = (size_t)u * C + j; fcw[i] = redraw(0, s_fcw, i, fcw[i]); }
        }
        if (units[1][u]) { fcb[u] = redraw(1, s_fcb, (size_t)u, fcb[u]); }
        if (units[2][u]) {
            for (int o = 0; o < C; o++) { size_t i = (size_t)o * H + u; fcprojw[i] = redraw(2, s_proj, i, fcprojw[i]); }
        }
    }
}

// dense: a finalised dense config (E = 1) and its parameters; moe: the target config (E, G,
// MoE layers, routing options set and finalised) with its buffer allocated.
static inline void upcycle_model(const ModelConfig* dense, const float* dense_params, const ModelConfig* moe,
                                 float* moe_params, const UpcycleOptions* opt) {
    if (opt->init == INIT_SCRATCH) {
        init_gpt2_scratch(moe, moe_params, opt->seed, opt->router_std);
        return;
    }
    size_t dsz[NUM_PARAMETER_TENSORS], msz[NUM_PARAMETER_TENSORS];
    fill_parameter_sizes(dsz, dense);
    fill_parameter_sizes(msz, moe);
    const float* d[NUM_PARAMETER_TENSORS];
    float* p[NUM_PARAMETER_TENSORS];
    parameter_pointers(d, dense_params, dsz);
    parameter_pointers(p, moe_params, msz);
    int C = moe->channels, E = moe->num_experts, G = moe->granularity, H = moe->expert_hidden;
    size_t C4 = 4 * (size_t)C;

    // everything outside the MLPs is the same shape in both layouts
    const int shared_tensors[] = {P_WTE, P_WPE, P_LN1W, P_LN1B, P_QKVW, P_QKVB, P_ATTPROJW, P_ATTPROJB, P_LN2W, P_LN2B, P_LNFW, P_LNFB};
    for (int t : shared_tensors) { memcpy(p[t], d[t], msz[t] * sizeof(float)); }

    double sqrt_s = sqrt(expert_output_scale(moe));
    bool scale = opt->weight_scaling && sqrt_s != 1.0;
    for (int l = 0; l < moe->num_layers; l++) {
        const float* fcw_l = d[P_FCW] + l * C4 * C;
        const float* fcb_l = d[P_FCB] + l * C4;
        const float* fcprojw_l = d[P_FCPROJW] + l * (size_t)C * C4;
        const float* fcprojb_l = d[P_FCPROJB] + (size_t)l * C;
        int ds = moe->dense_slot[l];
        if (ds >= 0) {  // this layer stays dense
            memcpy(p[P_FCW] + ds * C4 * C, fcw_l, C4 * C * sizeof(float));
            memcpy(p[P_FCB] + ds * C4, fcb_l, C4 * sizeof(float));
            memcpy(p[P_FCPROJW] + ds * (size_t)C * C4, fcprojw_l, C * C4 * sizeof(float));
            memcpy(p[P_FCPROJB] + (size_t)ds * C, fcprojb_l, C * sizeof(float));
            continue;
        }
        int ms = moe->moe_slot[l];
        TensorStats stats[3] = {{0, 0}, {0, 0}, {0, 0}};
        if (opt->init == INIT_DROP) {
            stats[0] = tensor_stats(fcw_l, C4 * C);
            stats[1] = tensor_stats(fcb_l, C4);
            stats[2] = tensor_stats(fcprojw_l, C * C4);
        }
        #pragma omp parallel for schedule(dynamic, 1)
        for (int e = 0; e < E; e++) {
            int g = e % G;  // the dense shard this expert copies
            size_t ex = (size_t)ms * E + e;
            float* fcw = p[P_EXPERT_FCW] + ex * H * C;            // (H, C)
            float* fcb = p[P_EXPERT_FCB] + ex * H;                // (H)
            float* fcprojw = p[P_EXPERT_FCPROJW] + ex * C * H;    // (C, H)
            float* fcprojb = p[P_EXPERT_FCPROJB] + ex * C;        // (C)
            memcpy(fcw, fcw_l + (size_t)g * H * C, (size_t)H * C * sizeof(float));
            memcpy(fcb, fcb_l + (size_t)g * H, (size_t)H * sizeof(float));
            for (int o = 0; o < C; o++) {
                memcpy(fcprojw + (size_t)o * H, fcprojw_l + o * C4 + (size_t)g * H, (size_t)H * sizeof(float));
            }
            memcpy(fcprojb, fcprojb_l, C * sizeof(float));
            if (opt->init == INIT_DROP || opt->init == INIT_NOISE) {
                init_expert_units(fcw, fcb, fcprojw, l, e, H, C, stats, opt);
            }
            if (scale) {
                for (size_t i = 0; i < (size_t)H * C; i++) { fcw[i] = (float)((double)fcw[i] * sqrt_s); }
                for (size_t i = 0; i < (size_t)C * H; i++) { fcprojw[i] = (float)((double)fcprojw[i] * sqrt_s); }
            }
            // router row: the G experts of one dense copy (a virtual group) share it
            uint64_t stream = rng_stream(RNG_ROUTER, l, e / G, 0);
            float* row = p[P_ROUTERW] + ex * C;
            for (int j = 0; j < C; j++) { row[j] = (float)(opt->router_std * random_normal(opt->seed, stream, j)); }
        }
    }
}
