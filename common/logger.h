/*
The run's logs in the output directory. main.log keeps llm.c's line format, so llm.c's
plotting tools read it:
    s:<step> trl:<train loss> lr:<learning rate> norm:<grad norm>
    s:<step> tel:<validation loss>
moe.log holds what an MoE adds, one line per MoE layer per report:
    s:<step> layer:<l> load:<% per expert, comma-separated> dropped:<%> entropy:<nats>
    s:<step> aux:<load-balancing loss> z:<z-loss>
A fresh run starts the files anew. A resumed run first drops the lines of the steps after its
checkpoint, which a run that crashed (or was killed) after the checkpoint had logged, and the
validation of the checkpoint's own step, which it does again; then it appends. So the logs of a
run resumed any number of times are the same as those of a run never stopped: the resume state
holds the routing sums since the last report (train_state.h), so a report that spans the stop
is whole. (A version 1 state has none: a run resumed from one starts a new report.)
*/
#pragma once

#include <string>
#include "utils.h"

struct Logger {
    FILE* main_log;
    FILE* moe_log;
};

// Keeps the lines of a log that a run resumed at step `resume_step` would not write again: a
// line "s:<n> <key>:..." logged after step n's update (the training loss, the MoE lines) stays if
// n <= resume_step; a validation line "s:<n> tel:...", logged at the top of step n, if n <
// resume_step. The file is rewritten whole and renamed into place (a crash keeps the old one).
static inline void logger_trim(const std::string& path, int resume_step) {
    FILE* f = fopen(path.c_str(), "rb");
    if (f == NULL) { return; }  // nothing logged yet
    std::string kept;
    char* line = NULL;  // getline's buffer: any length (moe.log's load lists grow with E)
    size_t capacity = 0;
    while (getline(&line, &capacity, f) != -1) {
        int step = 0;
        char key[8] = "";
        bool keep = true;
        if (sscanf(line, "s:%d %7[a-z]:", &step, key) == 2) {
            keep = strcmp(key, "tel") == 0 ? step < resume_step : step <= resume_step;
        }
        if (keep) { kept += line; }
    }
    free(line);
    fclose(f);
    AtomicFile af = atomic_open(path.c_str());
    fwrite_check(kept.data(), 1, kept.size(), af.f, path.c_str());
    atomic_commit(af);
}

// `resume_step` > 0: a run resumed at that step (its logs trimmed to it, then appended to)
static inline void logger_init(Logger* lg, const char* dir, int resume_step) {
    lg->main_log = NULL;
    lg->moe_log = NULL;
    if (dir == NULL || dir[0] == '\0') { return; }
    std::string main_path = std::string(dir) + "/main.log", moe_path = std::string(dir) + "/moe.log";
    if (resume_step > 0) {
        logger_trim(main_path, resume_step);
        logger_trim(moe_path, resume_step);
    }
    const char* mode = resume_step > 0 ? "a" : "w";
    lg->main_log = fopen_check(main_path.c_str(), mode);
    lg->moe_log = fopen_check(moe_path.c_str(), mode);
}

static inline void logger_train(Logger* lg, int step, float loss, float lr, float norm) {
    if (!lg->main_log) { return; }
    fprintf(lg->main_log, "s:%d trl:%.4f lr:%.6f norm:%.2f\n", step, loss, lr, norm);
    fflush(lg->main_log);
}

static inline void logger_val(Logger* lg, int step, float loss) {
    if (!lg->main_log) { return; }
    fprintf(lg->main_log, "s:%d tel:%.4f\n", step, loss);
    fflush(lg->main_log);
}

// moe.log: the aux losses of step `step`, summed over the MoE layers
static inline void logger_moe_losses(Logger* lg, int step, double aux, double z) {
    if (!lg->moe_log) { return; }
    fprintf(lg->moe_log, "s:%d aux:%.6f z:%.6f\n", step, aux, z);
    fflush(lg->moe_log);
}

// moe.log: one MoE layer's routing report (load per expert in %, dropped %, entropy in nats)
static inline void logger_moe_layer(Logger* lg, int step, int layer, const char* load, double dropped_pct, double entropy) {
    if (!lg->moe_log) { return; }
    fprintf(lg->moe_log, "s:%d layer:%d load:%s dropped:%.4f entropy:%.4f\n", step, layer, load, dropped_pct, entropy);
    fflush(lg->moe_log);
}

static inline void logger_free(Logger* lg) {
    if (lg->main_log) { fclose(lg->main_log); }
    if (lg->moe_log) { fclose(lg->moe_log); }
}
