/*
What a resumed run needs beyond the parameters, so that it continues bit-identically
(doc/formats.md, "Resume state"): the step, the batch geometry, the data loader's position,
the sampler's RNG counter and AdamW's moments; and, so that its logs continue as if it had never
stopped, the routing statistics summed since the last routing report (version 2).

A checkpoint of step S in the output directory is three files, written in this order:
model_%08d.bin (the model, atomic), state_%08d.bin (this state, atomic), DONE_%08d (an empty
marker). `-y 1` resumes from the newest step with a marker, so a crash while writing is
harmless: the half-written step has no marker yet.
*/
#pragma once

#include <dirent.h>
#include <string>
#include <vector>
#include "utils.h"

#define STATE_MAGIC 20261123
#define STATE_VERSION 2  // 1: no routing window (still read: a run resumed from it starts a new window)

struct TrainState {
    int step;               // optimizer steps taken
    int B, T, grad_accum;
    size_t num_params;
    int shard_index;        // the train loader's position
    int64_t position;
    uint64_t sampler_counter;
    int max_steps;
    int adam_step_offset;   // AdamW steps taken before this run (moments carried over from a dense run)
    // The routing report under way: the first step it covers, and its sums so far, E + 4 doubles
    // per MoE layer in layer order (routing_window_doubles): each expert's assignments, then the
    // assignments in all, the dropped ones, the sum of the tokens' routing entropies, the tokens.
    int report_from;
    std::vector<double> routing_window;
};

static inline size_t routing_window_doubles(int num_moe_layers, int num_experts) { return (size_t)num_moe_layers * (num_experts + 4); }

static inline std::string checkpoint_path(const std::string& dir, const char* kind, int step) {
    char name[64];
    snprintf(name, sizeof(name), "/%s_%08d%s", kind, step, strcmp(kind, "DONE") == 0 ? "" : ".bin");
    return dir + name;
}

static inline void write_train_state(const char* path, const TrainState* s, const float* m, const float* v) {
    int header[256] = {0};
    header[0] = STATE_MAGIC;
    header[1] = STATE_VERSION;
    header[2] = s->step;
    header[3] = s->B;
    header[4] = s->T;
    header[5] = s->grad_accum;
    put_u64(header, 6, s->num_params);
    header[8] = s->shard_index;
    put_u64(header, 9, (uint64_t)s->position);
    put_u64(header, 11, s->sampler_counter);
    uint64_t sum = fnv1a(FNV_OFFSET, m, s->num_params * sizeof(float));
    put_u64(header, 13, fnv1a(sum, v, s->num_params * sizeof(float)));
    header[15] = s->max_steps;
    header[16] = s->adam_step_offset;
    header[17] = (int)s->routing_window.size();
    header[18] = s->report_from;
    put_u64(header, 19, fnv1a(FNV_OFFSET, s->routing_window.data(), s->routing_window.size() * sizeof(double)));
    AtomicFile af = atomic_open(path);
    fwrite_check(header, sizeof(int), 256, af.f, path);
    fwrite_check(m, sizeof(float), s->num_params, af.f, path);
    fwrite_check(v, sizeof(float), s->num_params, af.f, path);
    fwrite_check(s->routing_window.data(), sizeof(double), s->routing_window.size(), af.f, path);
    atomic_commit(af);
}

// m and v must hold expected_params floats each
static inline void read_train_state(const char* path, TrainState* s, float* m, float* v, size_t expected_params) {
    int64_t size = file_size(path);
    if (size < 0) { die("%s: no such file", path); }
    if (size < 1024) { die("%s: truncated: %lld bytes, too small for the 1024-byte header", path, (long long)size); }
    int header[256];
    FILE* f = fopen_check(path, "rb");
    fread_check(header, sizeof(int), 256, f, path);
    if (header[0] != STATE_MAGIC) { die("%s: bad magic %d, expected a resume state (magic %d)", path, header[0], STATE_MAGIC); }
    int version = header[1];
    if (version != 1 && version != 2) { die("%s: state version %d, expected 1 or 2", path, version); }
    s->step = header[2];
    s->B = header[3];
    s->T = header[4];
    s->grad_accum = header[5];
    s->num_params = get_u64(header, 6);
    s->shard_index = header[8];
    s->position = (int64_t)get_u64(header, 9);
    s->sampler_counter = get_u64(header, 11);
    s->max_steps = header[15];
    s->adam_step_offset = header[16];
    int window = version >= 2 ? header[17] : 0;  // version 1: no routing window, a new one from the next step
    s->report_from = version >= 2 ? header[18] : s->step + 1;
    if (s->num_params != expected_params) {
        die("%s: holds optimizer moments for %zu parameters, the model has %zu", path, s->num_params, expected_params);
    }
    if (window < 0 || window > (1 << 24)) { die("%s: a routing window of %d values: the file is corrupt", path, window); }
    int64_t expected = 1024 + 2 * (int64_t)expected_params * 4 + (int64_t)window * 8;
    if (size != expected) { die("%s: expected %lld bytes, the file holds %lld (truncated?)", path, (long long)expected, (long long)size); }
    fread_check(m, sizeof(float), expected_params, f, path);
    fread_check(v, sizeof(float), expected_params, f, path);
    s->routing_window.resize(window);
    fread_check(s->routing_window.data(), sizeof(double), window, f, path);
    fclose(f);
    uint64_t sum = fnv1a(FNV_OFFSET, m, expected_params * sizeof(float));
    bool intact = fnv1a(sum, v, expected_params * sizeof(float)) == get_u64(header, 13);
    if (version >= 2) { intact = intact && fnv1a(FNV_OFFSET, s->routing_window.data(), window * sizeof(double)) == get_u64(header, 19); }
    if (!intact) { die("%s: checksum mismatch: the file is corrupt", path); }
}

static inline void write_done_marker(const std::string& dir, int step) {
    std::string path = checkpoint_path(dir, "DONE", step);
    AtomicFile af = atomic_open(path.c_str());
    atomic_commit(af);
}

// the newest step with a DONE marker in dir, or -1
static inline int latest_checkpoint_step(const std::string& dir) {
    DIR* d = opendir(dir.c_str());
    if (!d) { return -1; }
    int best = -1;
    struct dirent* entry;
    while ((entry = readdir(d)) != NULL) {
        int step;
        char tail;
        if (sscanf(entry->d_name, "DONE_%d%c", &step, &tail) == 1 && step > best) { best = step; }
    }
    closedir(d);
    return best;
}
