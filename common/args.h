/*
The command line shared by train_moe (GPU) and train_moe_cpu (CPU twin).

One table, `option_table`, holds every option: its llm.c-style short letter (where it does not
clash), its long name, its type and range, its default and its help line. Parsing, `-h` and the
defaults all read that table, so they cannot disagree. A bad value or an unknown option is one
line on stderr and exit 1. Both `--name value` and `--name=value` are accepted.
*/
#pragma once

#include <cmath>
#include <set>
#include <string>
#include <vector>
#include "model_config.h"
#include "schedule.h"
#include "utils.h"

struct TrainArgs {
    // data, model and files
    std::string train_data;     // token shards (glob)
    std::string val_data;
    std::string model;          // checkpoint path, or a shape such as d12 or 4:128:4:256
    int vocab;                  // V for a model built from a shape
    std::string output_dir;     // logs and checkpoints; empty: none
    std::string tokenizer;
    int resume;
    uint64_t seed;
    // batch and optimisation
    int batch_size;             // B
    int seq_len;                // T
    int total_batch;            // tokens per optimizer step, -1: B*T (no accumulation)
    int recompute;              // GPU engine: 1 recomputes the MLPs' GELU outputs in the backward
    int expert_gemm;            // GPU engine: the expert GEMMs' version (kernels/expert_mlp.cuh), 0: the default
    double lr;
    int warmup;
    double final_lr_frac;
    int lr_schedule;            // LrScheduleKind
    double decay_frac;
    double weight_decay;
    double beta1, beta2, eps;
    double grad_clip;
    int max_steps;              // -1: one epoch of the train data
    // evaluation and output
    int val_every;
    int val_steps;
    int sample_every;
    int gen_tokens;
    int checkpoint_every;
    int stats_every;
    int breakdown;
    // Mixture of Experts
    int experts;
    int topk;
    int granularity;
    std::string moe_layers;
    int init;                   // InitMethod
    double drop_ratio;
    int drop_mode;              // 0 shared, 1 independent
    double noise_std;
    double router_std;
    int weight_scaling;
    int renorm;
    int router;                 // RouterKind
    double capacity_factor;
    int capacity_priority;      // CapacityPriority
    double aux_loss;
    double z_loss;
    std::string init_optimizer; // a dense run's state file whose moments the experts inherit
    // which long names the command line gave (the rest are defaults)
    std::set<std::string> given;
};

enum OptionType { OPT_INT, OPT_U64, OPT_DOUBLE, OPT_STRING, OPT_CHOICE };

struct Option {
    char short_name;       // 0: long name only
    const char* long_name;
    int type;
    void* target;
    const char* default_value;
    double min, max;       // numbers must lie in [min, max]
    const char* choices;   // OPT_CHOICE: "a|b|c", stored as the index
    const char* section;   // for -h
    const char* help;
};

static inline std::vector<Option> option_table(TrainArgs* a) {
    const double BIG = 1e18;
    return {
        {'i', "train-data", OPT_STRING, &a->train_data, "dev/data/tinyshakespeare/tiny_shakespeare_train.bin", 0, 0, NULL, "data, model and files", "train token shards (a glob pattern)"},
        {'j', "val-data", OPT_STRING, &a->val_data, "dev/data/tinyshakespeare/tiny_shakespeare_val.bin", 0, 0, NULL, NULL, "validation token shards (a glob pattern); a missing default disables validation"},
        {'m', "model", OPT_STRING, &a->model, "gpt2_124M.bin", 0, 0, NULL, NULL, "checkpoint to start from (llm.c dense or MoE), or a shape for a fresh GPT-2: d12, d24, d36, d48 or L:C:NH:maxT"},
        {0, "vocab", OPT_INT, &a->vocab, "50257", 1, 1 << 22, NULL, NULL, "vocabulary size V of a model built from a shape (padded to a multiple of 128)"},
        {'o', "output-dir", OPT_STRING, &a->output_dir, "", 0, 0, NULL, NULL, "directory for main.log, moe.log and checkpoints (empty: write nothing)"},
        {0, "tokenizer", OPT_STRING, &a->tokenizer, "dev/data/gpt2_tokenizer.bin", 0, 0, NULL, NULL, "llm.c tokenizer file used to print samples"},
        {'y', "resume", OPT_INT, &a->resume, "0", 0, 1, NULL, NULL, "1: continue from the newest complete checkpoint in the output directory"},
        {0, "seed", OPT_U64, &a->seed, "1337", 0, 0, NULL, NULL, "seed of every random draw (upcycling, init, sampling)"},

        {'b', "batch-size", OPT_INT, &a->batch_size, "4", 1, 1 << 16, NULL, "batch and optimisation", "micro-batch size B (sequences)"},
        {'t', "seq-len", OPT_INT, &a->seq_len, "1024", 1, 1 << 20, NULL, NULL, "sequence length T (tokens)"},
        {'d', "total-batch", OPT_INT, &a->total_batch, "-1", -1, 1 << 30, NULL, NULL, "tokens per optimizer step, a multiple of B*T (gradient accumulation); -1: B*T"},
        {'r', "recompute", OPT_INT, &a->recompute, "1", 0, 1, NULL, NULL, "GPU engine: 1 keeps no MLP's GELU output for the backward but recomputes it there (less memory, the same bits); 0 keeps them. The CPU twin keeps them either way"},
        {0, "expert-gemm", OPT_INT, &a->expert_gemm, "0", 0, 3, NULL, NULL, "GPU engine: the experts' grouped GEMMs, 1 CUDA cores, 2 tensor cores (mma.sync), 3 Hopper's wgmma (an sm_90 GPU and build; not yet run on a GPU); 0: 2 where it applies, else 1. The CPU twin ignores it"},
        {'l', "lr", OPT_DOUBLE, &a->lr, "3e-4", 0, 10, NULL, NULL, "peak learning rate"},
        {'u', "warmup", OPT_INT, &a->warmup, "0", 0, 1 << 30, NULL, NULL, "linear warmup steps"},
        {'q', "final-lr-frac", OPT_DOUBLE, &a->final_lr_frac, "0.1", 0, 1, NULL, NULL, "the learning rate decays to this fraction of the peak"},
        {0, "lr-schedule", OPT_CHOICE, &a->lr_schedule, "cosine", 0, 0, "cosine|constant|wsd", NULL, "after warmup: cosine decay, constant, or warmup-stable-decay"},
        {0, "decay-frac", OPT_DOUBLE, &a->decay_frac, "0.2", 0, 1, NULL, NULL, "wsd: fraction of the steps spent decaying"},
        {'c', "weight-decay", OPT_DOUBLE, &a->weight_decay, "0.0", 0, 10, NULL, NULL, "AdamW decoupled weight decay, on 2-D weights (router included)"},
        {0, "beta1", OPT_DOUBLE, &a->beta1, "0.9", 0, 0.999999, NULL, NULL, "AdamW beta1"},
        {0, "beta2", OPT_DOUBLE, &a->beta2, "0.95", 0, 0.999999, NULL, NULL, "AdamW beta2"},
        {0, "eps", OPT_DOUBLE, &a->eps, "1e-8", 0, 1, NULL, NULL, "AdamW epsilon"},
        {0, "grad-clip", OPT_DOUBLE, &a->grad_clip, "1.0", 0, BIG, NULL, NULL, "clip the global gradient norm to this (0: no clipping)"},
        {'x', "max-steps", OPT_INT, &a->max_steps, "-1", -1, 1 << 30, NULL, NULL, "optimizer steps; -1: one epoch of the train data"},

        {'v', "val-every", OPT_INT, &a->val_every, "20", 0, 1 << 30, NULL, "evaluation and output", "validation loss every this many steps (0: only at the end)"},
        {0, "val-steps", OPT_INT, &a->val_steps, "20", 1, 1 << 30, NULL, NULL, "at most this many validation batches"},
        {'s', "sample-every", OPT_INT, &a->sample_every, "20", 0, 1 << 30, NULL, NULL, "print a text sample every this many steps (0: never)"},
        {'g', "gen-tokens", OPT_INT, &a->gen_tokens, "64", 1, 1 << 20, NULL, NULL, "tokens per sample"},
        {'n', "checkpoint-every", OPT_INT, &a->checkpoint_every, "0", 0, 1 << 30, NULL, NULL, "write model and resume state every this many steps (0: only at the end); needs -o"},
        {0, "stats-every", OPT_INT, &a->stats_every, "20", 0, 1 << 30, NULL, NULL, "print per-layer expert load, dropped fraction and routing entropy every this many steps (0: never)"},
        {0, "breakdown", OPT_INT, &a->breakdown, "0", 0, 1, NULL, NULL, "1: time each part of a step (encoder, attention, MLP, the MoE router, permutation, experts, un-permutation, classifier, optimizer) and print where the time went at the end"},

        {'e', "experts", OPT_INT, &a->experts, "1", 1, 1024, NULL, "mixture of experts", "experts E per MoE layer (1: the dense model, no upcycling)"},
        {'k', "topk", OPT_INT, &a->topk, "2", 1, 1024, NULL, NULL, "experts k per token"},
        {0, "granularity", OPT_INT, &a->granularity, "1", 1, 1024, NULL, NULL, "G: each expert takes a 1/G shard of the dense MLP; E must be a multiple of G"},
        {0, "moe-layers", OPT_STRING, &a->moe_layers, "every2", 0, 0, NULL, NULL, "which MLPs become MoE: every2 (1,3,5,...), all, lastN, or a list such as 1,3,5"},
        {0, "init", OPT_CHOICE, &a->init, "copy", 0, 0, "copy|drop|noise|scratch", NULL, "expert init: naive copy, Drop-Upcycling, noise upcycling, or everything from scratch"},
        {0, "drop-ratio", OPT_DOUBLE, &a->drop_ratio, "0.5", 0, 1, NULL, NULL, "fraction r of each expert's hidden units re-drawn (drop) or perturbed (noise)"},
        {0, "drop-mode", OPT_CHOICE, &a->drop_mode, "shared", 0, 0, "shared|independent", NULL, "one unit set per expert, or one per tensor"},
        {0, "noise-std", OPT_DOUBLE, &a->noise_std, "0.02", 0, BIG, NULL, NULL, "standard deviation of noise upcycling's perturbation"},
        {0, "router-std", OPT_DOUBLE, &a->router_std, "0.02", 0, BIG, NULL, NULL, "router weights start as N(0, router_std^2)"},
        {0, "weight-scaling", OPT_INT, &a->weight_scaling, "1", 0, 1, NULL, NULL, "1: scale expert fcw and fcprojw by sqrt(s), s = E*G/k (renorm 0) or G (renorm 1)"},
        {0, "renorm", OPT_INT, &a->renorm, "1", 0, 1, NULL, NULL, "1: combine weights renormalised over the k chosen experts; 0: raw softmax scores"},
        {0, "router", OPT_CHOICE, &a->router, "topk", 0, 0, "topk|expert", NULL, "token choice top-k, or expert choice (non-causal: an ablation)"},
        {0, "capacity-factor", OPT_DOUBLE, &a->capacity_factor, "0", -BIG, BIG, NULL, NULL, "expert capacity ceil(cf*k*N/E); <= 0: dropless"},
        {0, "capacity-priority", OPT_CHOICE, &a->capacity_priority, "order", 0, 0, "order|score", NULL, "which assignments a full expert keeps: token order or router score (within a choice slot)"},
        {0, "aux-loss", OPT_DOUBLE, &a->aux_loss, "0.01", 0, BIG, NULL, NULL, "load-balancing loss coefficient alpha"},
        {0, "z-loss", OPT_DOUBLE, &a->z_loss, "0", 0, BIG, NULL, NULL, "router z-loss coefficient beta"},
        {0, "init-optimizer", OPT_STRING, &a->init_optimizer, "", 0, 0, NULL, NULL, "state_*.bin of the dense run: every expert starts with its MLP's AdamW moments, the router with none (empty: fresh moments)"},
    };
}

// index of `value` in "a|b|c", or -1
static inline int choice_index(const char* choices, const char* value) {
    int index = 0;
    const char* p = choices;
    size_t n = strlen(value);
    while (true) {
        const char* bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && strncmp(p, value, n) == 0) { return index; }
        if (!bar) { return -1; }
        p = bar + 1;
        index++;
    }
}

static inline std::string option_label(const Option& o) {
    std::string s = o.short_name ? std::string("-") + o.short_name + ", " : std::string("    ");
    return s + "--" + o.long_name;
}

static inline void set_option(const Option& o, const char* value) {
    std::string label = option_label(o);
    char* end = NULL;
    if (o.type == OPT_STRING) {
        *(std::string*)o.target = value;
    } else if (o.type == OPT_CHOICE) {
        int index = choice_index(o.choices, value);
        if (index < 0) { die("%s: '%s' is not one of %s", label.c_str(), value, o.choices); }
        *(int*)o.target = index;
    } else if (o.type == OPT_U64) {
        errno = 0;
        unsigned long long v = strtoull(value, &end, 10);
        if (value[0] == '\0' || value[0] == '-' || *end != '\0' || errno) { die("%s: '%s' is not a non-negative integer", label.c_str(), value); }
        *(uint64_t*)o.target = (uint64_t)v;
    } else if (o.type == OPT_INT) {
        errno = 0;
        long v = strtol(value, &end, 10);
        if (value[0] == '\0' || *end != '\0' || errno) { die("%s: '%s' is not an integer", label.c_str(), value); }
        if (v < o.min || v > o.max) { die("%s: %ld is out of range [%.0f, %.0f]", label.c_str(), v, o.min, o.max); }
        *(int*)o.target = (int)v;
    } else {
        double v = strtod(value, &end);
        if (value[0] == '\0' || *end != '\0' || !std::isfinite(v)) { die("%s: '%s' is not a finite number", label.c_str(), value); }
        if (v < o.min || v > o.max) { die("%s: %g is out of range [%g, %g]", label.c_str(), v, o.min, o.max); }
        *(double*)o.target = v;
    }
}

static inline void print_usage(const char* program, TrainArgs* scratch) {
    printf("usage: %s [options]\n", program);
    printf("Upcycles a dense GPT-2 (llm.c checkpoint) into a Mixture of Experts and trains it.\n");
    printf("Example: %s -m model.bin -e 8 -k 2   (8 experts, top-2, every other layer)\n", program);
    for (const Option& o : option_table(scratch)) {
        if (o.section) { printf("\n%s:\n", o.section); }
        std::string left = option_label(o);
        if (o.type == OPT_CHOICE) { left += std::string(" ") + o.choices; }
        else if (o.type == OPT_STRING) { left += " STR"; }
        else if (o.type == OPT_DOUBLE) { left += " X"; }
        else { left += " N"; }
        printf("  %-38s %s [default: %s]\n", left.c_str(), o.help, o.default_value[0] ? o.default_value : "none");
    }
}

// Parses argv into a. Exits 0 after -h, 1 on any bad option or value.
static inline void parse_args(int argc, char** argv, TrainArgs* a) {
    std::vector<Option> table = option_table(a);
    for (const Option& o : table) { set_option(o, o.default_value); }
    a->given.clear();
    for (int i = 1; i < argc; i++) {
        const char* arg = argv[i];
        if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0) {
            print_usage(argv[0], a);
            exit(0);
        }
        const Option* found = NULL;
        const char* value = NULL;
        if (arg[0] == '-' && arg[1] == '-') {
            std::string name = arg + 2;
            size_t eq = name.find('=');
            if (eq != std::string::npos) {
                value = arg + 2 + eq + 1;
                name = name.substr(0, eq);
            }
            for (const Option& o : table) { if (name == o.long_name) { found = &o; } }
        } else if (arg[0] == '-' && arg[1] != '\0' && arg[2] == '\0') {
            for (const Option& o : table) { if (o.short_name == arg[1]) { found = &o; } }
        }
        if (!found) { die("unknown option '%s' (%s -h lists them all)", arg, argv[0]); }
        if (!value) {
            if (i + 1 >= argc) { die("option %s needs a value", arg); }
            value = argv[++i];
        }
        set_option(*found, value);
        a->given.insert(found->long_name);
    }
}

static inline bool arg_given(const TrainArgs* a, const char* long_name) { return a->given.count(long_name) > 0; }
