/*
What the CPU and GPU test programs share: PASS/FAIL lines, the scaled error, per-tensor
comparison of parameter-shaped buffers, a model built from an option string, and the reader of the PyTorch reference's debug state
(doc/formats.md, "Debug state"). Host code only.
*/
#pragma once

#include <cmath>
#include <cstdarg>
#include <string>
#include <vector>
#include "../common/args.h"
#include "../common/model_config.h"
#include "../common/model_setup.h"
#include "../common/utils.h"

static int failures = 0;
static int passes = 0;

static void check(bool ok, const char* name, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    printf("%s %s: ", ok ? "PASS" : "FAIL", name);
    vprintf(fmt, args);
    printf("\n");
    va_end(args);
    fflush(stdout);
    if (ok) { passes++; } else { failures++; }
}

// max |a - b| / max |b|: the error on the scale of the reference tensor
static double scaled_error(const float* a, const float* b, size_t n, double* max_abs_out = NULL) {
    double max_diff = 0.0, max_ref = 0.0;
    for (size_t i = 0; i < n; i++) {
        max_diff = std::max(max_diff, (double)fabsf(a[i] - b[i]));
        max_ref = std::max(max_ref, (double)fabsf(b[i]));
    }
    if (max_abs_out) { *max_abs_out = max_diff; }
    if (max_ref == 0.0) { return max_diff == 0.0 ? 0.0 : INFINITY; }
    return max_diff / max_ref;
}

// |ours - reference| / |reference|, 0 when both are 0
static double relative_error(double ours, double reference) {
    if (reference == 0.0) { return ours == 0.0 ? 0.0 : INFINITY; }
    return fabs(ours - reference) / fabs(reference);
}

// ----------------------------------------------------------------------------
// the reference's debug state (doc/formats.md)

struct DebugState {
    int B, T, V, Vp, C, L, E, k, Lm, n_steps, R, router;
    size_t num_params;
    std::vector<int> inputs, targets;
    std::vector<float> logits;
    float loss, aux_loss, z_loss;
    std::vector<float> grads;
    std::vector<std::vector<int>> route_index, route_kept;
    std::vector<std::vector<float>> route_weight;
    std::vector<float> step_losses;
    std::vector<float> params_after;
};

// The global L2 norm of the reference's step-0 gradients, summed in double: what the gradient
// clipping of step 0 divides by (torch.nn.utils.clip_grad_norm_ computes the same norm).
static double reference_grad_norm(const DebugState& ref) {
    double s = 0.0;
    for (float g : ref.grads) { s += (double)g * g; }
    return sqrt(s);
}

template <typename T>
static void read_vector(std::vector<T>& v, size_t n, FILE* f, const char* path) {
    v.resize(n);
    if (n > 0) { fread_check(v.data(), sizeof(T), n, f, path); }
}

static void read_debug_state(DebugState* s, const char* path) {
    FILE* f = fopen_check(path, "rb");
    int h[256];
    fread_check(h, sizeof(int), 256, f, path);
    if (h[0] != 20261124 || h[1] != 1) { die("%s: not a debug state (magic %d version %d)", path, h[0], h[1]); }
    s->B = h[2]; s->T = h[3]; s->V = h[4]; s->Vp = h[5]; s->C = h[6]; s->L = h[7];
    s->E = h[8]; s->k = h[9]; s->Lm = h[10]; s->n_steps = h[11]; s->R = h[12]; s->router = h[13];
    s->num_params = get_u64(h, 14);
    size_t N = (size_t)s->B * s->T;
    read_vector(s->inputs, N, f, path);
    read_vector(s->targets, N, f, path);
    read_vector(s->logits, N * s->V, f, path);
    float losses[3];
    fread_check(losses, sizeof(float), 3, f, path);
    s->loss = losses[0]; s->aux_loss = losses[1]; s->z_loss = losses[2];
    read_vector(s->grads, s->num_params, f, path);
    s->route_index.resize(s->Lm); s->route_weight.resize(s->Lm); s->route_kept.resize(s->Lm);
    for (int l = 0; l < s->Lm; l++) {
        read_vector(s->route_index[l], s->R, f, path);
        read_vector(s->route_weight[l], s->R, f, path);
        read_vector(s->route_kept[l], s->R, f, path);
    }
    read_vector(s->step_losses, s->n_steps, f, path);
    read_vector(s->params_after, s->num_params, f, path);
    char extra;
    if (fread(&extra, 1, 1, f) != 0) { die("%s: trailing bytes after the debug state", path); }
    fclose(f);
}

// per-tensor scaled errors of two parameter-shaped buffers; returns the worst
static double compare_tensors(const char* name, const float* ours, const float* ref, const size_t sizes[NUM_PARAMETER_TENSORS],
                              double tol) {
    double worst = 0.0;
    std::string detail;
    size_t offset = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        if (sizes[i] == 0) { continue; }
        double abs_err;
        double e = scaled_error(ours + offset, ref + offset, sizes[i], &abs_err);
        char buf[96];
        snprintf(buf, sizeof(buf), "%s%s %.1e", detail.empty() ? "" : ", ", PARAMETER_NAMES[i], e);
        detail += buf;
        worst = std::max(worst, e);
        offset += sizes[i];
    }
    check(worst <= tol, name, "worst scaled error %.2e (tolerance %.0e): %s", worst, tol, detail.c_str());
    return worst;
}

// ----------------------------------------------------------------------------
// the model of an option string, e.g. "-m dense.bin -e 8 -k 2", as the engines' main builds it

static float* build_from_options(const std::string& options, ModelConfig* cfg, TrainArgs* args) {
    std::vector<std::string> words;
    size_t pos = 0;
    while (pos < options.size()) {
        size_t end = options.find(' ', pos);
        if (end == std::string::npos) { end = options.size(); }
        if (end > pos) { words.push_back(options.substr(pos, end - pos)); }
        pos = end + 1;
    }
    std::vector<char*> argv;
    static char program[] = "test";
    argv.push_back(program);
    for (std::string& w : words) { argv.push_back(&w[0]); }
    parse_args((int)argv.size(), argv.data(), args);
    return setup_model(args, cfg);
}
