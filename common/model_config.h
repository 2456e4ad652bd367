/*
The model's shape: GPT-2 dimensions, which layers are MoE, the routing options, and the
parameter layout shared by both engines, the checkpoints and the tests.

Parameters are 21 tensors in one contiguous buffer, in the MoE checkpoint's order
(doc/formats.md). A dense model (E = 1) has no MoE layers: tensors 16..20 are empty and the
first 16 are exactly llm.c's. In an MoE model the dense MLP tensors (10..13) hold only the
layers that stayed dense, in layer order; `dense_slot[l]` and `moe_slot[l]` say where layer
l's MLP lives.
*/
#pragma once

#include <cstddef>
#include <cstdint>
#include "utils.h"

#define MAX_LAYERS 224   // the MoE header stores one flag per layer in slots 32..255

enum RouterKind { ROUTER_TOPK = 0, ROUTER_EXPERT = 1 };
enum CapacityPriority { PRIORITY_ORDER = 0, PRIORITY_SCORE = 1 };
enum InitMethod { INIT_COPY = 0, INIT_DROP = 1, INIT_NOISE = 2, INIT_SCRATCH = 3 };

struct ModelConfig {
    int max_seq_len;        // maxT
    int vocab_size;         // V
    int padded_vocab_size;  // Vp, V rounded up (50304 for GPT-2)
    int num_layers;         // L
    int num_heads;          // NH
    int channels;           // C
    // Mixture of Experts
    int num_experts;        // E, 1 = dense
    int top_k;              // k, experts per token (token choice)
    int granularity;        // G, each expert holds 4C/G hidden units
    int expert_hidden;      // H = 4C/G
    int num_moe_layers;     // Lm
    int num_dense_layers;   // Ld = L - Lm
    int is_moe_layer[MAX_LAYERS];
    int moe_slot[MAX_LAYERS];    // index among MoE layers, -1 for a dense layer
    int dense_slot[MAX_LAYERS];  // index among dense layers, -1 for an MoE layer
    int renorm;             // 1: combine weights renormalised over the chosen experts
    int router;             // RouterKind
    float capacity_factor;  // <= 0: dropless
    int capacity_priority;  // CapacityPriority
    int init_method;        // InitMethod the experts came from (information only)
};

// ----------------------------------------------------------------------------
// parameter layout

#define NUM_PARAMETER_TENSORS 21
enum ParameterIndex {
    P_WTE, P_WPE, P_LN1W, P_LN1B, P_QKVW, P_QKVB, P_ATTPROJW, P_ATTPROJB, P_LN2W, P_LN2B,
    P_FCW, P_FCB, P_FCPROJW, P_FCPROJB, P_LNFW, P_LNFB,
    P_ROUTERW, P_EXPERT_FCW, P_EXPERT_FCB, P_EXPERT_FCPROJW, P_EXPERT_FCPROJB
};

static const char* const PARAMETER_NAMES[NUM_PARAMETER_TENSORS] = {
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b",
    "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb",
    "routerw", "expert_fcw", "expert_fcb", "expert_fcprojw", "expert_fcprojb"};

// AdamW's weight decay applies to the 2-D weights only (biases and layer norms are exempt)
static inline bool parameter_is_decayed(int i) {
    return i == P_WTE || i == P_WPE || i == P_QKVW || i == P_ATTPROJW || i == P_FCW ||
           i == P_FCPROJW || i == P_ROUTERW || i == P_EXPERT_FCW || i == P_EXPERT_FCPROJW;
}

// the residual projections, whose GPT-2 init is scaled by 1/sqrt(2L)
static inline bool parameter_is_residual_projection(int i) {
    return i == P_ATTPROJW || i == P_FCPROJW || i == P_EXPERT_FCPROJW;
}

static inline bool parameter_is_bias(int i) {
    return i == P_QKVB || i == P_ATTPROJB || i == P_FCB || i == P_FCPROJB || i == P_LN1B ||
           i == P_LN2B || i == P_LNFB || i == P_EXPERT_FCB || i == P_EXPERT_FCPROJB;
}

static inline bool parameter_is_layernorm_weight(int i) {
    return i == P_LN1W || i == P_LN2W || i == P_LNFW;
}

static inline void fill_parameter_sizes(size_t sizes[NUM_PARAMETER_TENSORS], const ModelConfig* cfg) {
    size_t C = cfg->channels, L = cfg->num_layers, Vp = cfg->padded_vocab_size;
    size_t maxT = cfg->max_seq_len, Ld = cfg->num_dense_layers, Lm = cfg->num_moe_layers;
    size_t E = cfg->num_experts, H = cfg->expert_hidden;
    sizes[P_WTE] = Vp * C;
    sizes[P_WPE] = maxT * C;
    sizes[P_LN1W] = L * C;
    sizes[P_LN1B] = L * C;
    sizes[P_QKVW] = L * 3 * C * C;
    sizes[P_QKVB] = L * 3 * C;
    sizes[P_ATTPROJW] = L * C * C;
    sizes[P_ATTPROJB] = L * C;
    sizes[P_LN2W] = L * C;
    sizes[P_LN2B] = L * C;
    sizes[P_FCW] = Ld * 4 * C * C;
    sizes[P_FCB] = Ld * 4 * C;
    sizes[P_FCPROJW] = Ld * C * 4 * C;
    sizes[P_FCPROJB] = Ld * C;
    sizes[P_LNFW] = C;
    sizes[P_LNFB] = C;
    sizes[P_ROUTERW] = Lm * E * C;
    sizes[P_EXPERT_FCW] = Lm * E * H * C;
    sizes[P_EXPERT_FCB] = Lm * E * H;
    sizes[P_EXPERT_FCPROJW] = Lm * E * C * H;
    sizes[P_EXPERT_FCPROJB] = Lm * E * C;
}

static inline size_t count_parameters(const ModelConfig* cfg) {
    size_t sizes[NUM_PARAMETER_TENSORS];
    fill_parameter_sizes(sizes, cfg);
    size_t total = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) { total += sizes[i]; }
    return total;
}

// Parameters active for one token: everything but the experts a token does not visit.
// The basis of the "active FLOPs" in the MFU figure.
static inline size_t count_active_parameters(const ModelConfig* cfg) {
    size_t sizes[NUM_PARAMETER_TENSORS];
    fill_parameter_sizes(sizes, cfg);
    size_t total = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) { total += sizes[i]; }
    if (cfg->num_experts > 1) {
        size_t per_expert = 2 * (size_t)cfg->expert_hidden * cfg->channels + cfg->expert_hidden + cfg->channels;
        size_t k = cfg->router == ROUTER_TOPK ? cfg->top_k : (size_t)(cfg->capacity_factor > 0 ? cfg->capacity_factor : cfg->top_k);
        total -= (size_t)cfg->num_moe_layers * (cfg->num_experts - k) * per_expert;
    }
    return total;
}

// A struct of pointers into the one parameter buffer, named like llm.c's. The GPU engine
// instantiates it with its own element type.
template <typename T>
struct ParameterTensors {
    T* wte;             // (Vp, C)
    T* wpe;             // (maxT, C)
    T* ln1w;            // (L, C)
    T* ln1b;            // (L, C)
    T* qkvw;            // (L, 3C, C)
    T* qkvb;            // (L, 3C)
    T* attprojw;        // (L, C, C)
    T* attprojb;        // (L, C)
    T* ln2w;            // (L, C)
    T* ln2b;            // (L, C)
    T* fcw;             // (Ld, 4C, C)
    T* fcb;             // (Ld, 4C)
    T* fcprojw;         // (Ld, C, 4C)
    T* fcprojb;         // (Ld, C)
    T* lnfw;            // (C)
    T* lnfb;            // (C)
    T* routerw;         // (Lm, E, C)
    T* expert_fcw;      // (Lm, E, H, C)
    T* expert_fcb;      // (Lm, E, H)
    T* expert_fcprojw;  // (Lm, E, C, H)
    T* expert_fcprojb;  // (Lm, E, C)
};

// each tensor's first element, by ParameterIndex
template <typename T>
static inline void parameter_pointers(T* ptrs[NUM_PARAMETER_TENSORS], T* memory, const size_t sizes[NUM_PARAMETER_TENSORS]) {
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        ptrs[i] = memory;
        memory += sizes[i];
    }
}

template <typename T>
static inline void point_parameters(ParameterTensors<T>* p, T* memory, const size_t sizes[NUM_PARAMETER_TENSORS]) {
    T* t[NUM_PARAMETER_TENSORS];
    parameter_pointers(t, memory, sizes);
    p->wte = t[P_WTE]; p->wpe = t[P_WPE]; p->ln1w = t[P_LN1W]; p->ln1b = t[P_LN1B];
    p->qkvw = t[P_QKVW]; p->qkvb = t[P_QKVB]; p->attprojw = t[P_ATTPROJW]; p->attprojb = t[P_ATTPROJB];
    p->ln2w = t[P_LN2W]; p->ln2b = t[P_LN2B]; p->fcw = t[P_FCW]; p->fcb = t[P_FCB];
    p->fcprojw = t[P_FCPROJW]; p->fcprojb = t[P_FCPROJB]; p->lnfw = t[P_LNFW]; p->lnfb = t[P_LNFB];
    p->routerw = t[P_ROUTERW]; p->expert_fcw = t[P_EXPERT_FCW]; p->expert_fcb = t[P_EXPERT_FCB];
    p->expert_fcprojw = t[P_EXPERT_FCPROJW]; p->expert_fcprojb = t[P_EXPERT_FCPROJB];
}

// ----------------------------------------------------------------------------
// building and checking a configuration

// Fills the derived fields (H, Lm, Ld, slots) from the MoE flags. Call after any change.
static inline void config_finalize(ModelConfig* cfg) {
    if (cfg->num_experts <= 1) {
        cfg->num_experts = 1;
        cfg->granularity = 1;
        for (int l = 0; l < MAX_LAYERS; l++) { cfg->is_moe_layer[l] = 0; }
    }
    cfg->expert_hidden = 4 * cfg->channels / (cfg->granularity > 0 ? cfg->granularity : 1);
    int moe = 0, dense = 0;
    for (int l = 0; l < MAX_LAYERS; l++) {
        cfg->moe_slot[l] = -1;
        cfg->dense_slot[l] = -1;
        if (l >= cfg->num_layers) { continue; }
        if (cfg->is_moe_layer[l]) { cfg->moe_slot[l] = moe++; } else { cfg->dense_slot[l] = dense++; }
    }
    cfg->num_moe_layers = moe;
    cfg->num_dense_layers = dense;
}

// Checks the GPT-2 dimensions; `what` names the source for the message (a file, "--model").
static inline void validate_dimensions(const ModelConfig* c, const char* what) {
    if (c->num_layers < 1 || c->num_layers > MAX_LAYERS) {
        die("%s: L=%d layers, expected 1..%d", what, c->num_layers, MAX_LAYERS);
    }
    if (c->channels < 1 || c->channels > 32768) { die("%s: C=%d channels, expected 1..32768", what, c->channels); }
    if (c->num_heads < 1 || c->channels % c->num_heads != 0) {
        die("%s: NH=%d heads does not divide C=%d channels", what, c->num_heads, c->channels);
    }
    if (c->vocab_size < 1 || c->vocab_size > (1 << 22)) { die("%s: V=%d, expected 1..%d", what, c->vocab_size, 1 << 22); }
    if (c->padded_vocab_size < c->vocab_size || c->padded_vocab_size > (1 << 22)) {
        die("%s: padded vocabulary Vp=%d, expected V=%d..%d", what, c->padded_vocab_size, c->vocab_size, 1 << 22);
    }
    if (c->max_seq_len < 1 || c->max_seq_len > (1 << 20)) {
        die("%s: maxT=%d positions, expected 1..%d", what, c->max_seq_len, 1 << 20);
    }
}

// Checks the MoE fields of a finalised config.
static inline void validate_moe(const ModelConfig* c, const char* what) {
    if (c->num_experts == 1) { return; }
    if (c->num_experts < 1 || c->num_experts > 1024) { die("%s: E=%d experts, expected 1..1024", what, c->num_experts); }
    if (c->granularity < 1 || c->num_experts % c->granularity != 0) {
        die("%s: E=%d experts is not a multiple of the granularity G=%d", what, c->num_experts, c->granularity);
    }
    if ((4 * c->channels) % c->granularity != 0) {
        die("%s: granularity G=%d does not divide the hidden size 4C=%d", what, c->granularity, 4 * c->channels);
    }
    if (c->router == ROUTER_TOPK && (c->top_k < 1 || c->top_k > c->num_experts)) {
        die("%s: top-k k=%d must be between 1 and E=%d", what, c->top_k, c->num_experts);
    }
    if (c->router == ROUTER_TOPK && c->top_k == 1 && c->renorm == 1) {
        die("%s: k=1 with --renorm 1 makes every combine weight 1, so the router gets no gradient; use --renorm 0", what);
    }
    if (c->num_moe_layers < 1) { die("%s: E=%d experts but no layer is an MoE layer", what, c->num_experts); }
}

// Expert choice capacity: each expert takes cap of the N tokens (doc/routing.md).
static inline int expert_choice_capacity(const ModelConfig* c, int N) {
    double cf = c->capacity_factor > 0 ? (double)c->capacity_factor : (double)c->top_k;
    int64_t cap = (int64_t)ceil(cf * (double)N / (double)c->num_experts);
    if (cap > N) { cap = N; }
    if (cap < 1) { cap = 1; }
    return (int)cap;
}

// Token choice capacity per expert, or -1 for dropless.
static inline int token_choice_capacity(const ModelConfig* c, int N) {
    if (c->capacity_factor <= 0) { return -1; }
    return (int)ceil((double)c->capacity_factor * (double)c->top_k * (double)N / (double)c->num_experts);
}

// Most routing rows an MoE layer can produce for N tokens (buffer sizes).
static inline int max_routing_rows(const ModelConfig* c, int N) {
    if (c->router == ROUTER_EXPERT) { return c->num_experts * expert_choice_capacity(c, N); }
    return N * c->top_k;
}
