/*
Learning-rate schedules (methods.md section 5), computed in double then rounded to fp32:
linear warmup, then cosine decay to final_frac * lr, or constant, or warmup-stable-decay
(constant, then a linear decay over the last decay_frac of the steps).
*/
#pragma once

#include <cmath>

enum LrScheduleKind { LR_COSINE = 0, LR_CONSTANT = 1, LR_WSD = 2 };

struct LrSchedule {
    int kind;
    double lr;          // the peak
    int warmup;         // steps of linear warmup
    int max_steps;
    double final_frac;  // the floor, as a fraction of the peak
    double decay_frac;  // WSD: the fraction of steps spent decaying
};

static inline float learning_rate_at(const LrSchedule* s, int step) {
    if (s->warmup > 0 && step < s->warmup) { return (float)(s->lr * (step + 1) / s->warmup); }
    double min_lr = s->lr * s->final_frac;
    double lr = s->lr;
    if (s->kind == LR_COSINE) {
        double ratio = s->max_steps > s->warmup ? (double)(step - s->warmup) / (double)(s->max_steps - s->warmup) : 0.0;
        lr = min_lr + 0.5 * (1.0 + cos(M_PI * ratio)) * (s->lr - min_lr);
    } else if (s->kind == LR_WSD) {
        int decay_steps = (int)(s->decay_frac * s->max_steps);
        int decay_start = s->max_steps - decay_steps;
        if (step >= decay_start && decay_steps > 0) {
            lr = s->lr + (double)(step - decay_start + 1) / decay_steps * (min_lr - s->lr);
        }
    }
    return (float)lr;
}
