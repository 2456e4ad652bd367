/*
The run's logs in the output directory. main.log keeps llm.c's line format, so llm.c's
plotting tools read it:
    s:<step> trl:<train loss> lr:<learning rate> norm:<grad norm>
    s:<step> tel:<validation loss>
moe.log holds what an MoE adds, one line per MoE layer per report:
    s:<step> layer:<l> load:<% per expert, comma-separated> dropped:<%> entropy:<nats>
    s:<step> aux:<load-balancing loss> z:<z-loss>
A resumed run appends; a fresh run starts the files anew.
*/
#pragma once

#include <string>
#include "utils.h"

struct Logger {
    FILE* main_log;
    FILE* moe_log;
};

static inline void logger_init(Logger* lg, const char* dir, bool resume) {
    lg->main_log = NULL;
    lg->moe_log = NULL;
    if (dir == NULL || dir[0] == '\0') { return; }
    const char* mode = resume ? "a" : "w";
    lg->main_log = fopen_check((std::string(dir) + "/main.log").c_str(), mode);
    lg->moe_log = fopen_check((std::string(dir) + "/moe.log").c_str(), mode);
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

static inline void logger_free(Logger* lg) {
    if (lg->main_log) { fclose(lg->main_log); }
    if (lg->moe_log) { fclose(lg->moe_log); }
}
