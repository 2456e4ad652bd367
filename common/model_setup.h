/*
From the command line to the model to train, on the host, for both engines:

  -m d12 | L:C:NH:maxT     a fresh GPT-2 of that shape (E > 1: an MoE from scratch)
  -m dense.bin, -e 1       the dense model as it is
  -m dense.bin, -e 8 ...   upcycled into an MoE (doc/upcycling.md)
  -m moe.bin               an MoE checkpoint; E, G and the MoE layers come from the file,
                           the routing options too unless the command line names them

`setup_model` returns the finished configuration and fp32 parameters; the GPU engine uploads
them. It prints one summary line of what it built.
*/
#pragma once

#include "args.h"
#include "checkpoint.h"
#include "model_config.h"
#include "train_state.h"
#include "upcycle.h"

// "d12" and friends are llm.c's GPT-2 shapes; "L:C:NH:maxT" any other. False if spec is neither.
static inline bool parse_model_shape(const char* spec, int vocab, ModelConfig* cfg) {
    int L = 0, C = 0, NH = 0, maxT = 1024;
    if (strcmp(spec, "d12") == 0) { L = 12; C = 768; NH = 12; }
    else if (strcmp(spec, "d24") == 0) { L = 24; C = 1024; NH = 16; }
    else if (strcmp(spec, "d36") == 0) { L = 36; C = 1280; NH = 20; }
    else if (strcmp(spec, "d48") == 0) { L = 48; C = 1600; NH = 25; }
    else {
        char tail;
        if (sscanf(spec, "%d:%d:%d:%d%c", &L, &C, &NH, &maxT, &tail) != 4) { return false; }
    }
    memset(cfg, 0, sizeof(*cfg));
    cfg->num_layers = L;
    cfg->channels = C;
    cfg->num_heads = NH;
    cfg->max_seq_len = maxT;
    cfg->vocab_size = vocab;
    cfg->padded_vocab_size = (int)ceil_div(vocab, 128) * 128;
    cfg->num_experts = 1;
    cfg->top_k = 1;
    cfg->granularity = 1;
    std::string what = std::string("--model ") + spec;
    validate_dimensions(cfg, what.c_str());
    config_finalize(cfg);
    return true;
}

// The routing options on the command line (given or default) written into cfg.
static inline void apply_routing_args(ModelConfig* cfg, const TrainArgs* a, bool only_given) {
    if (!only_given || arg_given(a, "topk")) { cfg->top_k = a->topk; }
    if (!only_given || arg_given(a, "renorm")) { cfg->renorm = a->renorm; }
    if (!only_given || arg_given(a, "router")) { cfg->router = a->router; }
    if (!only_given || arg_given(a, "capacity-factor")) { cfg->capacity_factor = (float)a->capacity_factor; }
    if (!only_given || arg_given(a, "capacity-priority")) { cfg->capacity_priority = a->capacity_priority; }
}

// The MoE layout the command line asks for, on top of the dense dimensions in cfg.
static inline void apply_moe_args(ModelConfig* cfg, const TrainArgs* a) {
    cfg->num_experts = a->experts;
    cfg->granularity = a->granularity;
    cfg->init_method = a->init;
    apply_routing_args(cfg, a, false);
    select_moe_layers(a->moe_layers.c_str(), cfg->num_layers, cfg->is_moe_layer);
    config_finalize(cfg);
    validate_moe(cfg, "command line");
}

static inline UpcycleOptions upcycle_options(const TrainArgs* a) {
    UpcycleOptions opt;
    opt.init = a->init;
    opt.drop_ratio = a->drop_ratio;
    opt.drop_independent = a->drop_mode;
    opt.noise_std = a->noise_std;
    opt.router_std = a->router_std;
    opt.weight_scaling = a->weight_scaling;
    opt.seed = a->seed;
    return opt;
}

static inline std::string moe_layer_list(const ModelConfig* cfg) {
    std::string s;
    for (int l = 0; l < cfg->num_layers; l++) {
        if (cfg->is_moe_layer[l]) { s += (s.empty() ? "" : ",") + std::to_string(l); }
    }
    return s;
}

static inline void print_model_summary(const ModelConfig* cfg, const char* how) {
    printf("model: %s | L=%d C=%d NH=%d V=%d Vp=%d maxT=%d | %.2fM parameters", how, cfg->num_layers,
           cfg->channels, cfg->num_heads, cfg->vocab_size, cfg->padded_vocab_size, cfg->max_seq_len,
           count_parameters(cfg) / 1e6);
    if (cfg->num_experts > 1) {
        static const char* routers[] = {"top-k", "expert choice"};
        printf(", %.2fM active per token\n", count_active_parameters(cfg) / 1e6);
        printf("moe: E=%d k=%d G=%d H=%d | MoE layers %s | router %s, renorm %d, capacity factor %g%s, priority %s\n",
               cfg->num_experts, cfg->top_k, cfg->granularity, cfg->expert_hidden, moe_layer_list(cfg).c_str(),
               routers[cfg->router], cfg->renorm, cfg->capacity_factor,
               cfg->capacity_factor <= 0 && cfg->router == ROUTER_TOPK ? " (dropless)" : "",
               cfg->capacity_priority == PRIORITY_ORDER ? "order" : "score");
        if (cfg->router == ROUTER_EXPERT) {
            warn("expert choice routing lets a token's experts depend on later tokens of the batch: "
                 "non-causal in a decoder, use it as an ablation only");
        }
    } else {
        printf("\n");
    }
}

// Builds the model of the command line (see the top of this file). Returns its parameters.
static inline float* setup_model(const TrainArgs* a, ModelConfig* cfg) {
    static const char* init_names[] = {"copy", "drop", "noise", "scratch"};
    const char* spec = a->model.c_str();
    ModelConfig dense;
    float* params = NULL;
    if (!file_exists(spec) && parse_model_shape(spec, a->vocab, &dense)) {
        if (a->experts > 1 && arg_given(a, "init") && a->init != INIT_SCRATCH) {
            die("--init %s needs a dense checkpoint to upcycle, but -m %s is a shape", init_names[a->init], spec);
        }
        *cfg = dense;
        if (a->experts > 1) {
            TrainArgs scratch_args = *a;
            scratch_args.init = INIT_SCRATCH;
            apply_moe_args(cfg, &scratch_args);
        }
        params = (float*)malloc_check(count_parameters(cfg) * sizeof(float));
        init_gpt2_scratch(cfg, params, a->seed, a->router_std);
        print_model_summary(cfg, (std::string("fresh GPT-2 ") + spec).c_str());
        return params;
    }
    if (!file_exists(spec)) {
        die("model file %s not found: give a checkpoint with -m FILE, or a shape such as -m d12 or -m 4:128:4:256 "
            "to start from scratch (make demo makes a small dense checkpoint)", spec);
    }
    params = read_checkpoint(spec, cfg);
    if (cfg->num_experts > 1) {
        // an MoE checkpoint: its structure is fixed, its routing defaults may be overridden
        if (arg_given(a, "experts") && a->experts != cfg->num_experts) {
            die("%s holds E=%d experts per layer; -e %d conflicts", spec, cfg->num_experts, a->experts);
        }
        if (arg_given(a, "granularity") && a->granularity != cfg->granularity) {
            die("%s has granularity %d; --granularity %d conflicts", spec, cfg->granularity, a->granularity);
        }
        if (arg_given(a, "moe-layers")) {
            int flags[MAX_LAYERS];
            select_moe_layers(a->moe_layers.c_str(), cfg->num_layers, flags);
            for (int l = 0; l < cfg->num_layers; l++) {
                if (flags[l] != cfg->is_moe_layer[l]) {
                    die("%s has MoE layers %s; --moe-layers %s conflicts", spec, moe_layer_list(cfg).c_str(), a->moe_layers.c_str());
                }
            }
        }
        apply_routing_args(cfg, a, true);
        validate_moe(cfg, spec);
        print_model_summary(cfg, (std::string("MoE checkpoint ") + spec).c_str());
        return params;
    }
    if (a->experts == 1) {
        print_model_summary(cfg, (std::string("dense checkpoint ") + spec).c_str());
        return params;
    }
    // upcycle the dense checkpoint
    dense = *cfg;
    apply_moe_args(cfg, a);
    float* moe_params = (float*)malloc_check(count_parameters(cfg) * sizeof(float));
    UpcycleOptions opt = upcycle_options(a);
    upcycle_model(&dense, params, cfg, moe_params, &opt);
    free(params);
    char how[512];
    if (a->init == INIT_DROP || a->init == INIT_NOISE) {
        snprintf(how, sizeof(how), "%s upcycled (init %s, r=%g %s, seed %llu)", spec, init_names[a->init],
                 a->drop_ratio, a->drop_mode ? "independent" : "shared", (unsigned long long)a->seed);
    } else {
        snprintf(how, sizeof(how), "%s upcycled (init %s, seed %llu)", spec, init_names[a->init], (unsigned long long)a->seed);
    }
    print_model_summary(cfg, how);
    return moe_params;
}

// methods.md 4.6: the upcycled model inherits the dense run's AdamW moments. The moments are
// laid out like the parameters, so upcycle_model's copy maps them: shared tensors as they are,
// every expert its MLP shard's moments, unscaled, the router none. Fills m and v (the MoE
// model's size) and returns the dense run's step, where AdamW's bias correction continues.
static inline int upcycle_optimizer_state(const TrainArgs* a, const ModelConfig* cfg, float* m, float* v) {
    const char* path = a->init_optimizer.c_str();
    const char* model = a->model.c_str();
    if (cfg->num_experts == 1 || !file_exists(model) || is_moe_checkpoint(model) || a->init == INIT_SCRATCH) {
        die("--init-optimizer carries a dense run's moments into an upcycled model: it needs -m with a dense checkpoint, -e > 1 "
            "and an init other than scratch");
    }
    ModelConfig dense;
    free(read_checkpoint(model, &dense));
    size_t n = count_parameters(&dense);
    float* dense_m = (float*)malloc_check(n * sizeof(float));
    float* dense_v = (float*)malloc_check(n * sizeof(float));
    TrainState s;
    read_train_state(path, &s, dense_m, dense_v, n);
    UpcycleOptions copy = upcycle_options(a);
    copy.init = INIT_COPY;
    copy.weight_scaling = 0;
    copy.router_std = 0.0;
    upcycle_model(&dense, dense_m, cfg, m, &copy);
    upcycle_model(&dense, dense_v, cfg, v, &copy);
    free(dense_m);
    free(dense_v);
    printf("optimizer: AdamW moments of %s (step %d) carried into every expert; the router starts fresh\n", path, s.step);
    return s.adam_step_offset + s.step;
}
