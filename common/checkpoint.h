/*
Model checkpoints (doc/formats.md): llm.c's dense model file (read versions 3 fp32 and 5 bf16,
write 3) and the engine's MoE checkpoint (version 1, fp32, with a checksum). Both are written
atomically. The reader checks the magic, the version, every dimension and the file size the
header implies, then that every value is finite, and says what it expected and what it found.
*/
#pragma once

#include <cmath>
#include "model_config.h"
#include "utils.h"

#define DENSE_MAGIC 20240326
#define MOE_MAGIC 20261122
#define MOE_VERSION 1

// header slots of the MoE checkpoint
enum MoeHeaderSlot {
    HDR_EXPERTS = 8, HDR_TOPK = 9, HDR_GRANULARITY = 10, HDR_HIDDEN = 11, HDR_MOE_LAYERS = 12,
    HDR_RENORM = 13, HDR_ROUTER = 14, HDR_CAPACITY = 15, HDR_PRIORITY = 16, HDR_INIT = 17,
    HDR_CHECKSUM = 18, HDR_LAYER_FLAGS = 32
};

// Reads the 1024-byte header of a checkpoint; dies with a clear message when there is none.
static inline void read_header(const char* path, int header[256], int64_t* size_out) {
    int64_t size = file_size(path);
    if (size < 0) { die("%s: no such file", path); }
    if (size < 1024) { die("%s: truncated: %lld bytes, too small for the 1024-byte header", path, (long long)size); }
    FILE* f = fopen_check(path, "rb");
    fread_check(header, sizeof(int), 256, f, path);
    fclose(f);
    *size_out = size;
}

static inline bool is_moe_checkpoint(const char* path) {
    int header[256];
    int64_t size;
    read_header(path, header, &size);
    return header[0] == MOE_MAGIC;
}

static inline void check_finite(const char* path, const float* params, const ModelConfig* cfg) {
    size_t sizes[NUM_PARAMETER_TENSORS];
    fill_parameter_sizes(sizes, cfg);
    const float* p = params;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t bad = 0;
        for (size_t j = 0; j < sizes[i]; j++) { bad += !std::isfinite(p[j]); }
        if (bad > 0) { die("%s: tensor %s holds %zu non-finite values: the file is corrupt", path, PARAMETER_NAMES[i], bad); }
        p += sizes[i];
    }
}

static inline void config_from_dense_header(ModelConfig* cfg, const int* header) {
    memset(cfg, 0, sizeof(*cfg));
    cfg->max_seq_len = header[2];
    cfg->vocab_size = header[3];
    cfg->num_layers = header[4];
    cfg->num_heads = header[5];
    cfg->channels = header[6];
    cfg->padded_vocab_size = header[7];
    cfg->num_experts = 1;
    cfg->top_k = 1;
    cfg->granularity = 1;
}

static inline void describe_size_mismatch(const char* path, const ModelConfig* cfg, size_t expected, int64_t found) {
    die("%s: header says L=%d C=%d NH=%d V=%d Vp=%d maxT=%d E=%d (%zu parameters), so %zu bytes, "
        "but the file holds %lld bytes (%s)", path, cfg->num_layers, cfg->channels, cfg->num_heads,
        cfg->vocab_size, cfg->padded_vocab_size, cfg->max_seq_len, cfg->num_experts,
        count_parameters(cfg), expected, (long long)found, found < (int64_t)expected ? "truncated" : "trailing bytes");
}

// Reads a dense (llm.c) or MoE checkpoint into a freshly allocated fp32 buffer.
static inline float* read_checkpoint(const char* path, ModelConfig* cfg) {
    int header[256];
    int64_t size;
    read_header(path, header, &size);
    bool moe = header[0] == MOE_MAGIC;
    if (header[0] != DENSE_MAGIC && !moe) {
        die("%s: bad magic %d: not an llm.c model file (magic %d) nor an MoE checkpoint (magic %d)",
            path, header[0], DENSE_MAGIC, MOE_MAGIC);
    }
    config_from_dense_header(cfg, header);
    int version = header[1];
    size_t bytes_per_value = 4;
    if (moe) {
        if (version != MOE_VERSION) { die("%s: MoE checkpoint version %d, this engine reads version %d", path, version, MOE_VERSION); }
    } else {
        if (version != 3 && version != 5) { die("%s: llm.c model version %d, expected 3 (fp32) or 5 (bf16)", path, version); }
        if (version == 5) { bytes_per_value = 2; }
    }
    validate_dimensions(cfg, path);
    if (moe) {
        cfg->num_experts = header[HDR_EXPERTS];
        cfg->top_k = header[HDR_TOPK];
        cfg->granularity = header[HDR_GRANULARITY];
        cfg->renorm = header[HDR_RENORM];
        cfg->router = header[HDR_ROUTER];
        cfg->capacity_factor = bits_float(header[HDR_CAPACITY]);
        cfg->capacity_priority = header[HDR_PRIORITY];
        cfg->init_method = header[HDR_INIT];
        if (cfg->num_experts < 2 || cfg->num_experts > 1024) { die("%s: E=%d experts, expected 2..1024", path, cfg->num_experts); }
        if (cfg->granularity < 1) { die("%s: granularity G=%d, expected >= 1", path, cfg->granularity); }
        if (cfg->renorm != 0 && cfg->renorm != 1) { die("%s: renorm flag %d, expected 0 or 1", path, cfg->renorm); }
        if (cfg->router != ROUTER_TOPK && cfg->router != ROUTER_EXPERT) { die("%s: router kind %d, expected 0 or 1", path, cfg->router); }
        if (cfg->capacity_priority != PRIORITY_ORDER && cfg->capacity_priority != PRIORITY_SCORE) {
            die("%s: capacity priority %d, expected 0 or 1", path, cfg->capacity_priority);
        }
        if (!std::isfinite(cfg->capacity_factor)) { die("%s: capacity factor is not a finite number", path); }
        if (cfg->num_layers > MAX_LAYERS) { die("%s: L=%d layers, an MoE checkpoint holds at most %d", path, cfg->num_layers, MAX_LAYERS); }
        for (int l = 0; l < cfg->num_layers; l++) {
            int flag = header[HDR_LAYER_FLAGS + l];
            if (flag != 0 && flag != 1) { die("%s: MoE flag of layer %d is %d, expected 0 or 1", path, l, flag); }
            cfg->is_moe_layer[l] = flag;
        }
        config_finalize(cfg);
        validate_moe(cfg, path);
        if (header[HDR_HIDDEN] != cfg->expert_hidden) {
            die("%s: header says H=%d hidden units per expert, but 4C/G = %d", path, header[HDR_HIDDEN], cfg->expert_hidden);
        }
        if (header[HDR_MOE_LAYERS] != cfg->num_moe_layers) {
            die("%s: header says %d MoE layers but flags %d", path, header[HDR_MOE_LAYERS], cfg->num_moe_layers);
        }
    } else {
        config_finalize(cfg);
    }
    size_t num_params = count_parameters(cfg);
    size_t expected = 1024 + num_params * bytes_per_value;
    if ((int64_t)expected != size) { describe_size_mismatch(path, cfg, expected, size); }

    float* params = (float*)malloc_check(num_params * sizeof(float));
    FILE* f = fopen_check(path, "rb");
    fseek(f, 1024, SEEK_SET);
    if (bytes_per_value == 4) {
        fread_check(params, sizeof(float), num_params, f, path);
    } else {
        uint16_t* raw = (uint16_t*)malloc_check(num_params * sizeof(uint16_t));
        fread_check(raw, sizeof(uint16_t), num_params, f, path);
        for (size_t i = 0; i < num_params; i++) { params[i] = bf16_to_float(raw[i]); }
        free(raw);
    }
    fclose(f);
    if (moe) {
        uint64_t sum = fnv1a(FNV_OFFSET, params, num_params * sizeof(float));
        if (sum != get_u64(header, HDR_CHECKSUM)) {
            die("%s: checksum mismatch (header %016llx, tensors %016llx): the file is corrupt", path,
                (unsigned long long)get_u64(header, HDR_CHECKSUM), (unsigned long long)sum);
        }
    }
    check_finite(path, params, cfg);
    return params;
}

// slots 2..7, the same in both formats
static inline void put_dense_dimensions(int* header, const ModelConfig* cfg) {
    header[2] = cfg->max_seq_len;
    header[3] = cfg->vocab_size;
    header[4] = cfg->num_layers;
    header[5] = cfg->num_heads;
    header[6] = cfg->channels;
    header[7] = cfg->padded_vocab_size;
}

// llm.c version 3 (fp32); only for dense models
static inline void write_dense_checkpoint(const char* path, const ModelConfig* cfg, const float* params) {
    if (cfg->num_experts != 1) { die("write_dense_checkpoint: %s is an MoE model", path); }
    int header[256] = {0};
    header[0] = DENSE_MAGIC;
    header[1] = 3;
    put_dense_dimensions(header, cfg);
    AtomicFile af = atomic_open(path);
    fwrite_check(header, sizeof(int), 256, af.f, path);
    fwrite_check(params, sizeof(float), count_parameters(cfg), af.f, path);
    atomic_commit(af);
}

static inline void write_moe_checkpoint(const char* path, const ModelConfig* cfg, const float* params) {
    if (cfg->num_experts < 2) { die("write_moe_checkpoint: %s is a dense model", path); }
    size_t num_params = count_parameters(cfg);
    int header[256] = {0};
    header[0] = MOE_MAGIC;
    header[1] = MOE_VERSION;
    put_dense_dimensions(header, cfg);
    header[HDR_EXPERTS] = cfg->num_experts;
    header[HDR_TOPK] = cfg->top_k;
    header[HDR_GRANULARITY] = cfg->granularity;
    header[HDR_HIDDEN] = cfg->expert_hidden;
    header[HDR_MOE_LAYERS] = cfg->num_moe_layers;
    header[HDR_RENORM] = cfg->renorm;
    header[HDR_ROUTER] = cfg->router;
    header[HDR_CAPACITY] = float_bits(cfg->capacity_factor);
    header[HDR_PRIORITY] = cfg->capacity_priority;
    header[HDR_INIT] = cfg->init_method;
    put_u64(header, HDR_CHECKSUM, fnv1a(FNV_OFFSET, params, num_params * sizeof(float)));
    for (int l = 0; l < cfg->num_layers; l++) { header[HDR_LAYER_FLAGS + l] = cfg->is_moe_layer[l]; }
    AtomicFile af = atomic_open(path);
    fwrite_check(header, sizeof(int), 256, af.f, path);
    fwrite_check(params, sizeof(float), num_params, af.f, path);
    atomic_commit(af);
}

// the format follows the model: llm.c's file for a dense model, the MoE checkpoint otherwise
static inline void write_checkpoint(const char* path, const ModelConfig* cfg, const float* params) {
    if (cfg->num_experts == 1) { write_dense_checkpoint(path, cfg, params); }
    else { write_moe_checkpoint(path, cfg, params); }
}
