/*
--breakdown 1: where a training step's time goes. As an engine issues a step's work it marks
where each part begins (each engine's mark_forward and mark_backward: the encoder, a layer's
attention, its MLP or its MoE router, permutation, experts and un-permutation, the layer norms,
the classifier, the optimizer); the time from one mark to the next belongs to the first mark's
part.
train_moe records a CUDA event at each mark and reads them once the step has ended, so nothing
waits inside the step; train_moe_cpu reads the host's clock. At the end of training it prints a
table: each part's forward and backward time per step (the median over the steps after the
first, whose warm-up is not typical) and its share of the marked time. The marks do not change
what is computed: a run with --breakdown 1 trains the same bits (tested).
*/
#pragma once

#include <algorithm>
#include <array>
#include <cstdio>
#include <vector>

enum StepPart {
    PART_ENCODER,
    PART_LAYERNORM,   // the layer norms, with the residual adds fused into them
    PART_ATTENTION,   // qkv matmul, attention, output projection
    PART_MLP,         // a dense layer's fc, GELU, fcproj
    PART_ROUTER,      // MoE: logits, softmax, top-k, the row layout, their backward
    PART_PERMUTE,     // MoE: the gather into expert order, and its backward
    PART_EXPERTS,     // MoE: the experts' MLPs over their rows
    PART_UNPERMUTE,   // MoE: the weighted sum back into token order, and its backward
    PART_CLASSIFIER,  // the logits matmul, cross-entropy and its gradient, the loss sums
    PART_OPTIMIZER,   // the gradients' zeroing and global norm, AdamW
    NUM_STEP_PARTS
};
static const char* const STEP_PART_NAMES[NUM_STEP_PARTS] = {"encoder", "layer norms", "attention", "dense MLP", "MoE router",
                                                             "MoE permute", "MoE experts", "MoE unpermute", "classifier", "optimizer"};

// a part's forward (slot 2 part) or backward (2 part + 1; the optimizer's time counts as backward);
// the end of a step closes the last part
enum { BREAKDOWN_SLOTS = 2 * NUM_STEP_PARTS, BREAKDOWN_END = -1 };
static inline int breakdown_slot(StepPart part, bool backward) { return 2 * (int)part + (backward ? 1 : 0); }

struct Breakdown {
    bool on;                      // --breakdown 1
    bool recording;               // inside a training step (validation and sampling are not marked)
    std::vector<int> slots;       // this step's marks, in order
    std::vector<double> seconds;  // the host clock at each mark (train_moe_cpu; train_moe has events)
    std::vector<std::array<double, BREAKDOWN_SLOTS>> steps;  // ms per slot, one entry per step
};

static inline void breakdown_init(Breakdown* b, bool on) {
    b->on = on;
    b->recording = false;
}

// a training step begins: its marks count (with --breakdown 1)
static inline void breakdown_begin_step(Breakdown* b) {
    b->recording = b->on;
    b->slots.clear();
    b->seconds.clear();
}

// Adds a finished step: interval_ms[i] is the time from mark i to mark i + 1 (count - 1 of them)
static inline void breakdown_add_step(Breakdown* b, const double* interval_ms, int count) {
    std::array<double, BREAKDOWN_SLOTS> ms;
    ms.fill(0.0);
    for (int i = 0; i + 1 < count; i++) {
        if (b->slots[i] >= 0) { ms[b->slots[i]] += interval_ms[i]; }
    }
    b->steps.push_back(ms);
    b->slots.clear();
    b->recording = false;
}

// the host's marks: a mark at `now` seconds; the step's end, a last mark that closes its last part
static inline void breakdown_mark_host(Breakdown* b, int slot, double now) {
    if (!b->recording) { return; }
    b->slots.push_back(slot);
    b->seconds.push_back(now);
}
static inline void breakdown_end_step_host(Breakdown* b, double now) {
    if (!b->recording) { return; }
    breakdown_mark_host(b, BREAKDOWN_END, now);
    std::vector<double> ms;
    for (size_t i = 0; i + 1 < b->seconds.size(); i++) { ms.push_back(1e3 * (b->seconds[i + 1] - b->seconds[i])); }
    breakdown_add_step(b, ms.data(), (int)b->slots.size());
}

static inline double breakdown_median(std::vector<double> v) {
    if (v.empty()) { return 0.0; }
    std::sort(v.begin(), v.end());
    return v[(v.size() - 1) / 2];
}

// The table, after training: per part, the median over the steps after the first (over all of
// them when there is only one); parts never marked are left out.
static inline void breakdown_print(const Breakdown* b) {
    if (!b->on || b->steps.empty()) { return; }
    size_t first = b->steps.size() > 1 ? 1 : 0;
    double median[BREAKDOWN_SLOTS], total = 0.0;
    bool marked[BREAKDOWN_SLOTS] = {};
    for (int s = 0; s < BREAKDOWN_SLOTS; s++) {
        std::vector<double> v;
        for (size_t i = first; i < b->steps.size(); i++) {
            v.push_back(b->steps[i][s]);
            marked[s] |= b->steps[i][s] > 0.0;
        }
        median[s] = breakdown_median(v);
        total += median[s];
    }
    printf("where a step's time went (--breakdown 1), ms per step, the median of steps %zu..%zu:\n", first + 1, b->steps.size());
    printf("  %-14s %10s %10s %8s\n", "part", "forward", "backward", "share");  // the optimizer's under backward
    for (int p = 0; p < NUM_STEP_PARTS; p++) {
        int f = 2 * p, k = 2 * p + 1;
        if (!marked[f] && !marked[k]) { continue; }
        printf("  %-14s %10.3f %10.3f %7.1f%%\n", STEP_PART_NAMES[p], median[f], median[k], total > 0 ? 100.0 * (median[f] + median[k]) / total : 0.0);
    }
    printf("  %-14s %21.3f\n", "total", total);
}
