/*
The host side of a training run, shared by train_moe_cpu and train_moe: from the command line
to the model, the data and the schedule (`run_init`); resuming (`run_start`); the step line,
the routing report and text sampling; checkpoint files (`run_save_checkpoint`); and stopping
cleanly on a signal (`run_catch_stop_signals`). Each engine keeps its own loop, which calls its
own forward, backward and update between these.
*/
#pragma once

#include <atomic>
#include <cmath>
#include <csignal>
#include <string>
#include <time.h>
#include "args.h"
#include "breakdown.h"
#include "dataloader.h"
#include "logger.h"
#include "model_config.h"
#include "model_setup.h"
#include "rng.h"
#include "schedule.h"
#include "tokenizer.h"
#include "train_state.h"

struct OptimizerSettings {
    float beta1, beta2, eps, weight_decay, grad_clip;
};

struct TrainingRun {
    TrainArgs args;
    ModelConfig config;
    float* params;              // host fp32 parameters of the model to train (the engine takes them)
    int B, T;
    int total_batch;            // tokens per optimizer step
    int grad_accum;             // micro-batches per step
    int max_steps;
    int start_step;             // > 0 when resuming
    bool resuming;
    bool have_output;
    bool have_val;
    DataLoader train, val;
    Tokenizer tokenizer;
    Logger logger;
    LrSchedule schedule;
    OptimizerSettings optimizer;
    uint64_t sampler_counter;   // the sampler's RNG position (resume state)
    int adam_step_offset;       // AdamW's step is adam_step_offset + step + 1
    double flops_per_token;     // 6 N_active + 6 L C T, llm.c's estimate with active parameters
    int report_from;            // the first step the next routing report covers
    // the sums of that report so far, as a resume state holds them (train_state.h): run_start
    // fills it (zeros, or the resumed checkpoint's), the engine starts its sums from it
    std::vector<double> routing_window;
    Breakdown breakdown;        // --breakdown 1: the engine marks its steps' parts into it
};

static inline double seconds_now() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Builds everything but the engine's model from the parsed command line in run->args (the
// engines parse it first: -h and bad options need no GPU, and the GPU engine then checks for one
// before anything is read or written).
static inline void run_init(TrainingRun* run) {
    // a line at a time, also into a file or a pipe (| tee): each step's line shows when it ends
    setvbuf(stdout, NULL, _IOLBF, 0);
    TrainArgs& a = run->args;
    breakdown_init(&run->breakdown, a.breakdown != 0);
    run->have_output = !a.output_dir.empty();
    if (a.resume && !run->have_output) { die("-y 1 resumes from the checkpoints in the output directory: give it with -o"); }
    if (run->have_output) { make_dir(a.output_dir.c_str()); }

    // resume: the newest complete checkpoint replaces -m
    run->start_step = 0;
    if (a.resume) {
        int step = latest_checkpoint_step(a.output_dir);
        if (step < 0) {
            warn("-y 1: no complete checkpoint in %s, starting from the beginning", a.output_dir.c_str());
        } else {
            run->start_step = step;
            a.model = checkpoint_path(a.output_dir, "model", step);
            printf("resuming from %s\n", a.model.c_str());
        }
    }
    run->resuming = run->start_step > 0;

    run->params = setup_model(&a, &run->config);
    const ModelConfig& cfg = run->config;
    run->B = a.batch_size;
    run->T = a.seq_len;
    if (run->T > cfg.max_seq_len) { die("-t %d exceeds the model's %d positions (maxT)", run->T, cfg.max_seq_len); }
    int tokens_per_micro = run->B * run->T;
    run->total_batch = a.total_batch < 0 ? tokens_per_micro : a.total_batch;
    if (run->total_batch % tokens_per_micro != 0) {
        die("-d %d: the total batch must be a multiple of B*T = %d tokens", run->total_batch, tokens_per_micro);
    }
    run->grad_accum = run->total_batch / tokens_per_micro;

    dataloader_init(&run->train, a.train_data.c_str(), run->B, run->T, cfg.vocab_size);
    run->have_val = true;
    if (!arg_given(&a, "val-data") && glob_matches_nothing(a.val_data.c_str())) {
        warn("no validation data at %s: validation is off", a.val_data.c_str());
        run->have_val = false;
    } else {
        dataloader_init(&run->val, a.val_data.c_str(), run->B, run->T, cfg.vocab_size);
    }
    tokenizer_init(&run->tokenizer, a.tokenizer.c_str());
    logger_init(&run->logger, NULL, 0);  // closed until run_start
    if (!run->have_output) { printf("no -o: no log and no checkpoints will be written\n"); }

    run->max_steps = a.max_steps;
    if (run->max_steps < 0) { run->max_steps = (int)std::max((int64_t)1, run->train.num_batches / run->grad_accum); }
    run->schedule = {a.lr_schedule, a.lr, a.warmup, run->max_steps, a.final_lr_frac, a.decay_frac};
    run->optimizer = {(float)a.beta1, (float)a.beta2, (float)a.eps, (float)a.weight_decay, (float)a.grad_clip};
    run->sampler_counter = 0;
    run->adam_step_offset = 0;
    run->flops_per_token = 6.0 * count_active_parameters(&cfg) + 6.0 * cfg.num_layers * cfg.channels * run->T;
    printf("batch: B=%d T=%d, %d tokens per step (%d accumulation steps) | %d steps | train %lld batches per epoch\n",
           run->B, run->T, run->total_batch, run->grad_accum, run->max_steps, (long long)run->train.num_batches);
}

// The last step before training, once the engine has built its model: fills the AdamW moments
// m, v (the model's size, host memory) with the resume state's, the dense run's
// (--init-optimizer), or leaves them as they are (zeros), and the routing window (the engine
// starts its routing sums from it); then opens the logs. A run that fails to start (a model too
// large for the GPU, a resume state that does not match) leaves no log.
static inline void run_start(TrainingRun* run, float* m, float* v, size_t num_params) {
    size_t window = routing_window_doubles(run->config.num_moe_layers, run->config.num_experts);
    run->routing_window.assign(window, 0.0);
    run->report_from = run->start_step + 1;
    if (run->resuming) {
        TrainState s;
        read_train_state(checkpoint_path(run->args.output_dir, "state", run->start_step).c_str(), &s, m, v, num_params);
        if (s.B != run->B || s.T != run->T || s.grad_accum != run->grad_accum) {
            die("the checkpoint was trained with B=%d T=%d and %d accumulation steps; this run asks for B=%d T=%d and %d",
                s.B, s.T, s.grad_accum, run->B, run->T, run->grad_accum);
        }
        if (s.max_steps != run->max_steps) {
            warn("the checkpoint's run had %d steps, this one %d: the learning-rate schedule changes", s.max_steps, run->max_steps);
        }
        dataloader_seek(&run->train, s.shard_index, s.position);
        run->sampler_counter = s.sampler_counter;
        run->adam_step_offset = s.adam_step_offset;
        if (!s.routing_window.empty()) {  // empty: a version 1 state, a new report from the next step
            if (s.routing_window.size() != window || s.report_from < 1 || s.report_from > s.step + 1) {
                die("the resume state's routing report (%zu values, from step %d) does not fit this model (%zu values) at step %d: the "
                    "file is corrupt", s.routing_window.size(), s.report_from, window, s.step);
            }
            run->routing_window = s.routing_window;
            run->report_from = s.report_from;
        }
    } else if (!run->args.init_optimizer.empty()) {
        run->adam_step_offset = upcycle_optimizer_state(&run->args, &run->config, m, v);
    }
    logger_init(&run->logger, run->have_output ? run->args.output_dir.c_str() : NULL, run->start_step);
}

// the model file, the resume state, then the DONE marker (train_state.h); host buffers, and the
// routing report's sums so far (routing_window_doubles of them)
static inline void run_save_checkpoint(TrainingRun* run, int step, const float* params, const float* m, const float* v,
                                       size_t num_params, const std::vector<double>& routing_window) {
    const std::string& dir = run->args.output_dir;
    std::string model_path = checkpoint_path(dir, "model", step), state_path = checkpoint_path(dir, "state", step);
    write_checkpoint(model_path.c_str(), &run->config, params);
    TrainState s;
    s.step = step;
    s.B = run->B;
    s.T = run->T;
    s.grad_accum = run->grad_accum;
    s.num_params = num_params;
    s.shard_index = run->train.shard_index;
    s.position = run->train.position;
    s.sampler_counter = run->sampler_counter;
    s.max_steps = run->max_steps;
    s.adam_step_offset = run->adam_step_offset;
    s.report_from = run->report_from;
    s.routing_window = routing_window;
    write_train_state(state_path.c_str(), &s, m, v);
    write_done_marker(dir, step);
    printf("wrote %s and %s\n", model_path.c_str(), state_path.c_str());
}

// ----------------------------------------------------------------------------
// stopping cleanly: SIGINT (Ctrl-C) or SIGTERM (kill, a batch scheduler's time limit) asks the
// run to stop at the top of the next step, after the step under way has finished and a
// checkpoint has been written there (with -o), so that -y 1 continues the run bit-identically
// (the same as if it had never stopped). A second signal stops at once, as without the handler;
// the checkpoints already written are intact either way (each file is written whole, then
// renamed). Until the training loop starts, a signal stops at once: nothing is lost yet.

// The first signal received, 0 while none. Atomic, not just volatile: a signal sent to the process
// goes to any of its threads (OpenMP's, the CUDA driver's), so two signals that arrive together
// may run the handler on two threads at once; the compare-and-swap lets exactly one of them be the first.
static std::atomic<int> run_stop_signal(0);
static_assert(std::atomic<int>::is_always_lock_free, "a signal handler may use only lock-free atomics");

static void run_on_stop_signal(int sig) {
    int none = 0;
    if (!run_stop_signal.compare_exchange_strong(none, sig)) {  // the second: the default action, which ends the process
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    // only async-signal-safe calls in a handler: write(2), not printf
    static const char msg[] = "\nstop requested: the run stops after this step, with a checkpoint if -o is given (again: stop now)\n";
    ssize_t written = write(STDERR_FILENO, msg, sizeof(msg) - 1);
    (void)written;
}

static inline void run_catch_stop_signals() {
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = run_on_stop_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;  // a read or write the signal interrupts goes on
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
}

// What happens at the top of step `step` (before its update): checkpoint, then stop if a
// signal asked for it, else validation and sample.
static inline bool run_checkpoint_due(const TrainingRun* run, int step) {
    bool last = step == run->max_steps;
    bool every = run->args.checkpoint_every > 0 && step % run->args.checkpoint_every == 0;
    return run->have_output && step > run->start_step && (every || last || run_stop_signal != 0);
}

// true when a signal asked the run to stop (its checkpoint is written by then): says where it
// stopped and how to go on
static inline bool run_stop_due(const TrainingRun* run, int step) {
    if (run_stop_signal == 0) { return false; }
    const char* name = run_stop_signal == SIGINT ? "SIGINT" : "SIGTERM";
    fflush(stdout);
    if (run_checkpoint_due(run, step)) {
        fprintf(stderr, "stopped by %s at step %d of %d: the same command with -y 1 continues from %s\n", name, step,
                run->max_steps, checkpoint_path(run->args.output_dir, "model", step).c_str());
    } else if (!run->have_output) {
        fprintf(stderr, "stopped by %s at step %d of %d: no -o, so nothing was saved\n", name, step, run->max_steps);
    } else {
        fprintf(stderr, "stopped by %s at step %d of %d, before any step of this run: nothing new to save\n", name, step,
                run->max_steps);
    }
    return true;
}

// the process's exit status: 0, or 128 + the signal's number after a stop (130 for SIGINT, 143
// for SIGTERM, what a shell reports for a process the signal ended), so that a script tells an
// interrupted run from a finished one
static inline int run_exit_status() {
    int sig = run_stop_signal;
    return sig == 0 ? 0 : 128 + sig;
}

static inline bool run_validation_due(const TrainingRun* run, int step) {
    return run->have_val && ((run->args.val_every > 0 && step % run->args.val_every == 0) || step == run->max_steps);
}
static inline bool run_sample_due(const TrainingRun* run, int step) {
    return run->args.sample_every > 0 && step > 0 && (step % run->args.sample_every == 0 || step == run->max_steps);
}

// One token from logits (the first V entries) with temperature 1; advances the sampler's counter.
static inline int sample_token(const float* logits, int V, uint64_t seed, uint64_t* counter) {
    float maxval = -INFINITY;
    for (int v = 0; v < V; v++) { maxval = std::max(maxval, logits[v]); }
    double sum = 0.0;
    for (int v = 0; v < V; v++) { sum += exp((double)(logits[v] - maxval)); }
    double coin = random_uniform(seed, rng_stream(RNG_SAMPLER, 0, 0, 0), (*counter)++) * sum, cdf = 0.0;
    for (int v = 0; v < V; v++) {
        cdf += exp((double)(logits[v] - maxval));
        if (coin < cdf) { return v; }
    }
    return V - 1;
}

// `peak_flops` > 0 adds the model FLOPs utilisation against it
static inline void run_print_step(TrainingRun* run, int step, double loss, double aux, double zl, float norm, float lr, double seconds,
                                  double peak_flops) {
    double tok_per_s = run->total_batch / seconds;
    double flops = run->flops_per_token * tok_per_s;
    printf("step %4d/%d | loss %.6f", step, run->max_steps, loss);
    if (run->config.num_experts > 1) { printf(" | aux %.4f z %.4f", aux, zl); }
    printf(" | norm %.4f | lr %.2e | %.1f ms | %.0f tok/s | %.1f GFLOP/s", norm, lr, seconds * 1e3, tok_per_s, flops / 1e9);
    if (peak_flops > 0) { printf(" | MFU %.1f%%", 100.0 * flops / peak_flops); }
    printf("\n");
    logger_train(&run->logger, step, (float)loss, lr, norm);
    if (run->config.num_experts > 1) { logger_moe_losses(&run->logger, step, aux, zl); }
    // A loss or gradient norm that is not finite has already gone into this step's update: stop
    // before the next checkpoint would save the broken parameters (those written are intact).
    if (!std::isfinite(loss) || !std::isfinite(norm)) {
        die("step %d: the loss is %g and the gradient norm %g: training diverged; the checkpoints written before this step are "
            "intact (a lower learning rate -l, or --grad-clip, may help)",
            step, loss, norm);
    }
}

static inline bool run_routing_report_due(const TrainingRun* run, int steps_done) {
    return run->config.num_experts > 1 && run->args.stats_every > 0 && steps_done % run->args.stats_every == 0;
}

// the line above a routing report: the steps it covers, since the last report or the start (a
// resumed run's first report covers only the steps since the resume)
static inline void run_routing_report_header(TrainingRun* run, int steps_done) {
    printf("routing, steps %d..%d:\n", run->report_from, steps_done);
    run->report_from = steps_done + 1;
}

// One MoE layer's routing statistics since the last report: printed and logged.
static inline void run_report_layer(TrainingRun* run, int step, int layer, const double* assignments, double total_assignments,
                                    double dropped, double entropy_sum, double tokens) {
    if (tokens == 0) { return; }
    int E = run->config.num_experts;
    std::string load;
    for (int e = 0; e < E; e++) {
        char buf[32];
        snprintf(buf, sizeof(buf), "%s%.1f", e ? "," : "", 100.0 * assignments[e] / total_assignments);
        load += buf;
    }
    double dropped_pct = 100.0 * dropped / total_assignments, entropy = entropy_sum / tokens;
    printf("  layer %2d | load %% %s | dropped %.2f%% | entropy %.3f nats (max %.3f)\n", layer, load.c_str(), dropped_pct, entropy,
           log((double)E));
    logger_moe_layer(&run->logger, step, layer, load.c_str(), dropped_pct, entropy);
}

static inline void run_free(TrainingRun* run) {
    logger_free(&run->logger);
    dataloader_free(&run->train);
    if (run->have_val) { dataloader_free(&run->val); }
}
