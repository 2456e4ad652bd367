/*
test_moe_cpu: the CPU twin checked against the PyTorch reference and against exact invariants.
tests/run_tests.sh drives it (make test); every check prints one line, "PASS name: detail" or
"FAIL name: detail", and the exit status is the number of failures.

    ./test_moe_cpu reference NAME STATE REF_MODEL -- [train_moe_cpu options]
        builds the model from the options (upcycling it here), and compares with the reference's
        debug state (dev/train_moe.py debug): the upcycled parameters, logits, losses, every
        gradient, the routing decisions, then n AdamW steps (losses and final parameters).
    ./test_moe_cpu invariants DENSE SHARD SCRATCH_DIR
        properties that hold exactly: copy upcycling keeps the dense function, drop upcycling
        re-draws floor(r*H) units with the dense statistics, capacity follows the priority rule,
        the aux loss formula, gradient accumulation equals the full batch, bf16 checkpoints load.

Tolerances are relative to the largest magnitude in the reference tensor ("scaled error"),
chosen about ten times above the fp32 round-off measured on the test configs (README, "Tests").
*/
#define TESTING
#include "train_moe_cpu.cpp"
#include "tests/test_common.h"

// Tolerances (scaled errors), about ten times the largest error measured over all the test
// configs (fp32 round-off; README "Tests" lists the measured figures). The upcycled parameters
// come out bit-identical here; 1e-6 leaves room for another libm's log and cos.
static const double TOL_PARAMS_INIT = 1e-6;
static const double TOL_LOGITS = 4e-6;        // measured 4.2e-7
static const double TOL_LOSS = 1e-6;          // relative; measured 1.0e-7
static const double TOL_GRADS = 5e-6;         // measured 5.4e-7
static const double TOL_ROUTE_WEIGHT = 1e-6;  // absolute, weights are in [0, 1]; measured 6e-8
static const double TOL_STEP_LOSS = 2e-6;     // relative; measured 2.1e-7
static const double TOL_PARAMS_AFTER = 2e-4;  // measured 2.4e-5: AdamW divides by sqrt(v), small gradients amplify round-off

static void test_against_reference(const char* name, const char* state_path, const char* ref_model, int argc, char** argv) {
    TrainArgs args;
    parse_args(argc, argv, &args);
    ModelConfig cfg;
    float* params = setup_model(&args, &cfg);
    DebugState ref;
    read_debug_state(&ref, state_path);
    int B = ref.B, T = ref.T, N = B * T, V = cfg.vocab_size, Vp = cfg.padded_vocab_size;
    std::string prefix = std::string(name) + ".";
    auto label = [&](const char* what) { static std::string s; s = prefix + what; return s.c_str(); };

    if (ref.num_params != count_parameters(&cfg) || ref.V != V || ref.E != cfg.num_experts || ref.Lm != cfg.num_moe_layers) {
        check(false, label("shapes"), "reference has P=%zu V=%d E=%d Lm=%d, ours P=%zu V=%d E=%d Lm=%d", ref.num_params, ref.V,
              ref.E, ref.Lm, count_parameters(&cfg), V, cfg.num_experts, cfg.num_moe_layers);
        return;
    }
    size_t sizes[NUM_PARAMETER_TENSORS];
    fill_parameter_sizes(sizes, &cfg);

    // 1. the model both sides built (we upcycled, so did the reference)
    ModelConfig ref_cfg;
    float* ref_params = read_checkpoint(ref_model, &ref_cfg);
    compare_tensors(label("initial_parameters"), params, ref_params, sizes, TOL_PARAMS_INIT);
    free(ref_params);

    // 2. the first window of the shard, forward
    Model model;
    model_init(&model, &cfg, params, B, T, (float)args.aux_loss, (float)args.z_loss);
    DataLoader loader;
    dataloader_init(&loader, args.train_data.c_str(), B, T, V);
    dataloader_next_batch(&loader);
    bool same_batch = memcmp(loader.inputs, ref.inputs.data(), N * sizeof(int)) == 0 &&
                      memcmp(loader.targets, ref.targets.data(), N * sizeof(int)) == 0;
    check(same_batch, label("batch"), "inputs and targets of the first window %s", same_batch ? "equal" : "differ");
    model_forward(&model, loader.inputs, loader.targets, B, T);
    std::vector<float> logits((size_t)N * V);
    for (int i = 0; i < N; i++) { memcpy(&logits[(size_t)i * V], model.logits + (size_t)i * Vp, V * sizeof(float)); }
    double e = scaled_error(logits.data(), ref.logits.data(), logits.size());
    check(e <= TOL_LOGITS, label("logits"), "scaled error %.2e (tolerance %.0e)", e, TOL_LOGITS);
    e = relative_error(model.mean_loss, ref.loss);
    check(e <= TOL_LOSS, label("loss"), "ours %.7f reference %.7f, relative error %.1e", model.mean_loss, ref.loss, e);
    if (cfg.num_experts > 1) {
        double ea = fabs(model.aux_loss - ref.aux_loss) / std::max(1e-12, (double)fabs(ref.aux_loss));
        double ez = fabs(model.z_loss - ref.z_loss) / std::max(1e-12, (double)fabs(ref.z_loss));
        check(ea <= TOL_LOSS && ez <= TOL_LOSS, label("aux_losses"), "balance %.7f vs %.7f, z %.7f vs %.7f", model.aux_loss,
              ref.aux_loss, model.z_loss, ref.z_loss);
    }

    // 3. routing decisions, layer by layer; near-ties (top-k logit gap < 1e-5) reported apart
    for (int l = 0; l < cfg.num_layers; l++) {
        int ms = cfg.moe_slot[l];
        if (ms < 0) { continue; }
        const Routing& r = model.layers[l].routing;
        const float* z = model.layers[l].router_logits;
        int E = cfg.num_experts, k = cfg.top_k;
        int mismatches = 0, near_ties = 0, rows = 0;
        double max_w = 0.0;
        if (cfg.router == ROUTER_TOPK) {
            rows = N * k;
            if (ref.R != rows) { check(false, label("routing"), "reference has %d rows, expected %d", ref.R, rows); continue; }
            for (int t = 0; t < N; t++) {
                // gap between the k-th chosen logit and the best unchosen one
                float kth = z[(size_t)t * E + r.choice_expert[(size_t)t * k + k - 1]], best_out = -INFINITY;
                for (int e2 = 0; e2 < E; e2++) {
                    bool chosen = false;
                    for (int j = 0; j < k; j++) { chosen |= r.choice_expert[(size_t)t * k + j] == e2; }
                    if (!chosen) { best_out = std::max(best_out, z[(size_t)t * E + e2]); }
                }
                bool tie = k < E && kth - best_out < 1e-5f;
                near_ties += tie;
                for (int j = 0; j < k; j++) {
                    int i = t * k + j;
                    bool same = r.choice_expert[i] == ref.route_index[ms][i] && (r.choice_row[i] >= 0) == (ref.route_kept[ms][i] != 0);
                    if (!same && !tie) { mismatches++; }
                    if (same) { max_w = std::max(max_w, (double)fabsf(r.choice_weight[i] - ref.route_weight[ms][i])); }
                }
            }
        } else {
            rows = r.num_rows;
            if (ref.R != rows) { check(false, label("routing"), "reference has %d rows, ours %d", ref.R, rows); continue; }
            for (int row = 0; row < rows; row++) {
                bool same = r.row_token[row] == ref.route_index[ms][row];
                mismatches += !same;
                if (same) { max_w = std::max(max_w, (double)fabsf(r.row_weight[row] - ref.route_weight[ms][row])); }
            }
        }
        char what[64];
        snprintf(what, sizeof(what), "routing_layer%d", l);
        check(mismatches == 0 && max_w <= TOL_ROUTE_WEIGHT, label(what),
              "%d rows, %d decisions differ, %d near-ties set aside, %d dropped, combine weights max error %.1e", rows, mismatches,
              near_ties, r.num_dropped, max_w);
    }

    // 4. every gradient of step 0
    model_zero_grad(&model);
    model_backward(&model, 1.0f);
    compare_tensors(label("gradients"), model.grads_memory, ref.grads.data(), sizes, TOL_GRADS);
    double norm = model_grad_norm(&model), ref_norm = reference_grad_norm(ref), e_norm = relative_error(norm, ref_norm);
    check(e_norm <= TOL_LOSS, label("grad_norm"), "ours %.7f reference %.7f (clip %g), relative error %.1e (tolerance %.0e)", norm, ref_norm,
          args.grad_clip, e_norm, TOL_LOSS);

    // 5. n AdamW steps, window s at step s, as the reference did
    LrSchedule schedule = {args.lr_schedule, args.lr, args.warmup, ref.n_steps, args.final_lr_frac, args.decay_frac};
    OptimizerSettings opt = {(float)args.beta1, (float)args.beta2, (float)args.eps, (float)args.weight_decay, (float)args.grad_clip};
    std::vector<float> losses(ref.n_steps);
    losses[0] = model.mean_loss;
    model_update(&model, learning_rate_at(&schedule, 0), &opt, 1);
    for (int s = 1; s < ref.n_steps; s++) {
        dataloader_next_batch(&loader);
        model_forward(&model, loader.inputs, loader.targets, B, T);
        losses[s] = model.mean_loss;
        model_zero_grad(&model);
        model_backward(&model, 1.0f);
        model_update(&model, learning_rate_at(&schedule, s), &opt, s + 1);
    }
    double worst = 0.0;
    std::string detail;
    for (int s = 0; s < ref.n_steps; s++) {
        worst = std::max(worst, relative_error(losses[s], ref.step_losses[s]));
        char buf[48];
        snprintf(buf, sizeof(buf), "%s%.6f/%.6f", s ? " " : "", losses[s], ref.step_losses[s]);
        detail += buf;
    }
    check(worst <= TOL_STEP_LOSS, label("step_losses"), "worst relative error %.1e (tolerance %.0e), ours/reference: %s", worst,
          TOL_STEP_LOSS, detail.c_str());
    compare_tensors(label("parameters_after_steps"), model.params_memory, ref.params_after.data(), sizes, TOL_PARAMS_AFTER);
    dataloader_free(&loader);
    model_free(&model);
}

// ----------------------------------------------------------------------------
// invariants

static std::vector<float> forward_logits(const std::string& options, const int* inputs, int B, int T) {
    ModelConfig cfg;
    TrainArgs args;
    float* params = build_from_options(options, &cfg, &args);
    Model m;
    model_init(&m, &cfg, params, B, T, 0.0f, 0.0f);
    model_forward(&m, inputs, NULL, B, T);
    std::vector<float> logits(m.logits, m.logits + (size_t)B * T * cfg.padded_vocab_size);
    model_free(&m);
    return logits;
}

static void test_copy_upcycling_keeps_dense_function(const char* dense, const int* inputs, int B, int T) {
    std::string base = std::string("-m ") + dense;
    std::vector<float> d = forward_logits(base + " -e 1", inputs, B, T);
    const char* variants[] = {"-e 8 -k 2", "-e 4 -k 3 --moe-layers all", "-e 8 -k 2 --router-std 1.0", "-e 8 -k 8 --moe-layers 0"};
    for (const char* v : variants) {
        std::vector<float> m = forward_logits(base + " " + v, inputs, B, T);
        double e = scaled_error(m.data(), d.data(), d.size());
        char name[160];
        snprintf(name, sizeof(name), "upcycled_copy_matches_dense_logits[%s]", v);
        check(e <= 1e-6, name, "scaled error %.2e vs the dense model (tolerance 1e-6)", e);
    }
    // the test can fail: without renormalisation the weights do not sum to 1
    std::vector<float> m = forward_logits(base + " -e 8 -k 2 --renorm 0 --weight-scaling 0", inputs, B, T);
    double e = scaled_error(m.data(), d.data(), d.size());
    check(e > 1e-3, "upcycled_copy_renorm0_differs_from_dense", "scaled error %.2e (must be large)", e);
}

static void test_drop_upcycling_statistics(const char* dense_path) {
    ModelConfig dense_cfg;
    float* dense = read_checkpoint(dense_path, &dense_cfg);
    size_t dsz[NUM_PARAMETER_TENSORS];
    fill_parameter_sizes(dsz, &dense_cfg);
    ParameterTensors<float> d;
    point_parameters(&d, dense, dsz);
    int C = dense_cfg.channels;
    for (double r : {0.25, 0.5, 1.0}) {
        for (const char* mode : {"shared", "independent"}) {
            ModelConfig cfg;
            TrainArgs args;
            char opts[256];
            snprintf(opts, sizeof(opts), "-m %s -e 4 -k 2 --init drop --drop-ratio %g --drop-mode %s --moe-layers all", dense_path, r, mode);
            float* params = build_from_options(opts, &cfg, &args);
            size_t sz[NUM_PARAMETER_TENSORS];
            fill_parameter_sizes(sz, &cfg);
            ParameterTensors<float> p;
            point_parameters(&p, params, sz);
            int H = cfg.expert_hidden, E = cfg.num_experts, m = (int)floor(r * H);
            bool counts_ok = true, shared_ok = true, bias_kept = true;
            int independent_differs = 0;
            // re-drawn values of fcw, pooled over experts, against the dense statistics
            double sum = 0, sq = 0, n = 0, mean_err_max = 0, std_err_max = 0;
            for (int l = 0; l < cfg.num_layers; l++) {
                const float* fcw_l = d.fcw + (size_t)l * 4 * C * C;
                const float* fcb_l = d.fcb + (size_t)l * 4 * C;
                const float* fcprojw_l = d.fcprojw + (size_t)l * C * 4 * C;
                TensorStats st = tensor_stats(fcw_l, (size_t)4 * C * C);
                sum = sq = n = 0;
                for (int e = 0; e < E; e++) {
                    size_t ex = (size_t)cfg.moe_slot[l] * E + e;
                    const float* fcw = p.expert_fcw + ex * H * C;
                    const float* fcb = p.expert_fcb + ex * H;
                    const float* fcprojw = p.expert_fcprojw + ex * C * H;
                    const float* fcprojb = p.expert_fcprojb + ex * C;
                    int changed_rows = 0, changed_b = 0, changed_cols = 0;
                    std::vector<char> row_changed(H), b_changed(H), col_changed(H);
                    for (int u = 0; u < H; u++) {
                        row_changed[u] = memcmp(fcw + (size_t)u * C, fcw_l + (size_t)u * C, C * sizeof(float)) != 0;
                        b_changed[u] = fcb[u] != fcb_l[u];
                        bool col = false;
                        for (int o = 0; o < C; o++) { col |= fcprojw[(size_t)o * H + u] != fcprojw_l[(size_t)o * 4 * C + u]; }
                        col_changed[u] = col;
                        changed_rows += row_changed[u];
                        changed_b += b_changed[u];
                        changed_cols += col_changed[u];
                        if (row_changed[u]) {
                            for (int j = 0; j < C; j++) { double x = fcw[(size_t)u * C + j]; sum += x; sq += x * x; n++; }
                        }
                    }
                    counts_ok &= changed_rows == m && changed_b == m && changed_cols == m;
                    if (strcmp(mode, "shared") == 0) { shared_ok &= row_changed == b_changed && row_changed == col_changed; }
                    else { independent_differs += row_changed != col_changed; }
                    bias_kept &= memcmp(fcprojb, d.fcprojb + (size_t)l * C, C * sizeof(float)) == 0;
                }
                if (n > 0) {
                    double mean = sum / n, std = sqrt(sq / n - mean * mean);
                    mean_err_max = std::max(mean_err_max, fabs(mean - st.mean) / (st.std / sqrt(n)));  // in standard errors
                    std_err_max = std::max(std_err_max, fabs(std - st.std) / st.std);
                }
            }
            char name[128];
            snprintf(name, sizeof(name), "drop_upcycling_redraws_floor_rH_units[r=%g,%s]", r, mode);
            check(counts_ok && bias_kept, name, "every expert re-drew exactly %d of %d rows, biases and columns; fcprojb kept: %s", m, H,
                  bias_kept ? "yes" : "no");
            snprintf(name, sizeof(name), "drop_upcycling_uses_dense_statistics[r=%g,%s]", r, mode);
            check(mean_err_max < 5.0 && std_err_max < 0.05, name, "re-drawn fcw: mean within %.2f standard errors, std within %.1f%%",
                  mean_err_max, 100 * std_err_max);
            if (strcmp(mode, "shared") == 0) {
                snprintf(name, sizeof(name), "drop_upcycling_shared_units[r=%g]", r);
                check(shared_ok, name, "fcw rows, fcb entries and fcprojw columns re-drawn at the same units");
            } else if (r < 1.0) {
                snprintf(name, sizeof(name), "drop_upcycling_independent_units[r=%g]", r);
                check(independent_differs > 0, name, "%d experts re-drew different units in fcw and fcprojw", independent_differs);
            }
            free(params);
        }
    }
    free(dense);
}

static void test_granularity_shards_and_virtual_groups(const char* dense_path) {
    ModelConfig dense_cfg, cfg;
    float* dense = read_checkpoint(dense_path, &dense_cfg);
    size_t dsz[NUM_PARAMETER_TENSORS], sz[NUM_PARAMETER_TENSORS];
    fill_parameter_sizes(dsz, &dense_cfg);
    ParameterTensors<float> d, p;
    point_parameters(&d, dense, dsz);
    TrainArgs args;
    std::string opts = std::string("-m ") + dense_path + " -e 8 -k 2 --granularity 4 --renorm 0";
    float* params = build_from_options(opts, &cfg, &args);
    fill_parameter_sizes(sz, &cfg);
    point_parameters(&p, params, sz);
    int C = cfg.channels, H = cfg.expert_hidden, E = 8, G = 4;
    double sqrt_s = sqrt((double)E * G / 2);
    bool shards_ok = true, groups_ok = true, groups_distinct = true;
    for (int l = 0; l < cfg.num_layers; l++) {
        int ms = cfg.moe_slot[l];
        if (ms < 0) { continue; }
        for (int e = 0; e < E; e++) {
            size_t ex = (size_t)ms * E + e;
            int g = e % G;
            for (int u = 0; u < H; u++) {
                for (int j = 0; j < C; j++) {
                    float want = (float)((double)d.fcw[((size_t)l * 4 * C + g * H + u) * C + j] * sqrt_s);
                    shards_ok &= p.expert_fcw[(ex * H + u) * C + j] == want;
                }
                shards_ok &= p.expert_fcb[ex * H + u] == d.fcb[(size_t)l * 4 * C + g * H + u];
            }
            const float* row = p.routerw + ex * C;
            const float* first_of_group = p.routerw + ((size_t)ms * E + (e / G) * G) * C;
            groups_ok &= memcmp(row, first_of_group, C * sizeof(float)) == 0;
            if (e >= G) { groups_distinct &= memcmp(row, p.routerw + ((size_t)ms * E + e - G) * C, C * sizeof(float)) != 0; }
        }
    }
    check(shards_ok, "granularity_experts_are_scaled_dense_shards", "G=4: expert e holds shard e mod 4 of fc, scaled by sqrt(E*G/k)=%.3f",
          sqrt_s);
    check(groups_ok && groups_distinct, "granularity_router_rows_shared_per_virtual_group",
          "the 4 experts of one dense copy share a router row; different copies differ");
    free(params);
    free(dense);
}

// a Routing over buffers of its own, for token choice on N tokens
struct RoutingBuffers {
    Routing routing;
    std::vector<int> choice_expert, choice_row, tokens_per_expert, expert_offsets, row_token, token_row_offsets, token_rows, assignments;
    std::vector<float> choice_weight, row_weight;
    RoutingBuffers(int N, int E, int k)
        : choice_expert(N * k), choice_row(N * k), tokens_per_expert(E), expert_offsets(E + 1), row_token(N * k),
          token_row_offsets(N + 1), token_rows(N * k), assignments(E), choice_weight(N * k), row_weight(N * k) {
        Routing& r = routing;
        r.choice_expert = choice_expert.data(); r.choice_weight = choice_weight.data(); r.choice_row = choice_row.data();
        r.tokens_per_expert = tokens_per_expert.data(); r.expert_offsets = expert_offsets.data(); r.row_token = row_token.data();
        r.row_weight = row_weight.data(); r.token_row_offsets = token_row_offsets.data(); r.token_rows = token_rows.data();
        r.assignments = assignments.data();
    }
};

// routing on synthetic scores: capacity keeps, per expert, exactly the earliest assignments
// in priority order (slot first, then token order or score) and drops the rest
static void test_capacity_priority_rule() {
    const int N = 64, E = 4, k = 2;
    for (int priority : {PRIORITY_ORDER, PRIORITY_SCORE}) {
        for (float cf : {0.5f, 1.0f, 1.25f}) {
            ModelConfig cfg;
            memset(&cfg, 0, sizeof(cfg));
            cfg.num_experts = E; cfg.top_k = k; cfg.renorm = 1; cfg.router = ROUTER_TOPK;
            cfg.capacity_factor = cf; cfg.capacity_priority = priority;
            std::vector<float> logits((size_t)N * E), probs((size_t)N * E);
            for (int t = 0; t < N; t++) {
                float sum = 0;
                for (int e = 0; e < E; e++) {
                    // skewed towards expert 0 so that it overflows
                    logits[(size_t)t * E + e] = (float)(random_normal(7, 99, (uint64_t)t * E + e) + (e == 0 ? 1.5 : 0.0));
                    sum += expf(logits[(size_t)t * E + e]);
                }
                for (int e = 0; e < E; e++) { probs[(size_t)t * E + e] = expf(logits[(size_t)t * E + e]) / sum; }
            }
            RoutingBuffers buffers(N, E, k);
            Routing& r = buffers.routing;
            std::vector<int>& ce = buffers.choice_expert;
            std::vector<int>& cr = buffers.choice_row;
            route_tokens(&r, logits.data(), probs.data(), &cfg, N);
            int cap = token_choice_capacity(&cfg, N);
            // priority key of assignment i = t*k + j: (slot, position of t within the slot's order)
            auto key = [&](int i) {
                int t = i / k, j = i % k;
                double within = priority == PRIORITY_ORDER ? t : -probs[(size_t)t * E + ce[i]] + 1e-9 * t;
                return std::make_pair(j, within);
            };
            bool ok = true;
            int dropped = 0;
            for (int e = 0; e < E; e++) {
                int kept = 0, total = 0;
                std::pair<int, double> latest_kept(-1, -INFINITY), earliest_dropped(k, INFINITY);
                for (int i = 0; i < N * k; i++) {
                    if (ce[i] != e) { continue; }
                    total++;
                    if (cr[i] >= 0) { kept++; latest_kept = std::max(latest_kept, key(i)); }
                    else { dropped++; earliest_dropped = std::min(earliest_dropped, key(i)); }
                }
                ok &= kept == std::min(total, cap) && latest_kept < earliest_dropped;
            }
            char name[96];
            snprintf(name, sizeof(name), "capacity_drops_follow_priority[%s,cf=%g]", priority == PRIORITY_ORDER ? "order" : "score", cf);
            check(ok && (cf > 1.0f || dropped > 0), name, "cap %d per expert, %d of %d assignments dropped, kept ones precede dropped ones",
                  cap, dropped, N * k);
        }
    }
}

static void test_aux_loss_formulas() {
    const int N = 32, E = 8, k = 2;
    ModelConfig cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.num_experts = E; cfg.top_k = k; cfg.renorm = 1; cfg.router = ROUTER_TOPK;
    std::vector<float> logits((size_t)N * E, 0.3f), probs((size_t)N * E, 1.0f / E);  // uniform router
    RoutingBuffers buffers(N, E, k);
    Routing& r = buffers.routing;
    std::vector<int>& ce = buffers.choice_expert;
    route_tokens(&r, logits.data(), probs.data(), &cfg, N);
    float bal, zl;
    router_aux_losses(&bal, &zl, logits.data(), probs.data(), &r, N, E);
    double lse = 0.3 + log((double)E);
    check(fabs(bal - 1.0) < 1e-6, "aux_loss_uniform_router_is_one", "L_bal = %.7f (E * sum f_e / E = 1 for any f)", bal);
    check(fabs(zl - lse * lse) < 1e-5, "z_loss_equals_logsumexp_squared", "L_z = %.6f, (0.3 + ln 8)^2 = %.6f", zl, lse * lse);
    bool ties_ok = true;
    for (int t = 0; t < N; t++) { ties_ok &= ce[(size_t)t * k] == 0 && ce[(size_t)t * k + 1] == 1; }
    check(ties_ok, "topk_ties_go_to_lower_expert", "equal logits: every token chose experts 0 and 1");
    // skewed: all tokens prefer expert 3, then 5; f = (1/2 at 3 and 5), P from the scores
    for (int t = 0; t < N; t++) {
        for (int e = 0; e < E; e++) { logits[(size_t)t * E + e] = e == 3 ? 2.0f : e == 5 ? 1.0f : 0.0f; }
        double s = exp(2.0) + exp(1.0) + (E - 2);
        for (int e = 0; e < E; e++) { probs[(size_t)t * E + e] = (float)(exp((double)logits[(size_t)t * E + e]) / s); }
    }
    route_tokens(&r, logits.data(), probs.data(), &cfg, N);
    router_aux_losses(&bal, &zl, logits.data(), probs.data(), &r, N, E);
    double s = exp(2.0) + exp(1.0) + (E - 2);
    double want = E * (0.5 * exp(2.0) / s + 0.5 * exp(1.0) / s);
    check(fabs(bal - want) < 1e-5, "aux_loss_matches_switch_formula", "L_bal = %.6f, E (f3 P3 + f5 P5) = %.6f", bal, want);
}

// dense model: B=4 in one batch and B=2 twice with accumulation give the same gradients
static void test_gradient_accumulation(const char* dense_path, const char* shard) {
    const int T = 16;
    DataLoader dl;
    ModelConfig cfg;
    float* params = read_checkpoint(dense_path, &cfg);
    dataloader_init(&dl, shard, 4, T, cfg.vocab_size);
    dataloader_next_batch(&dl);
    std::vector<float> params_copy(params, params + count_parameters(&cfg));
    Model full, half;
    model_init(&full, &cfg, params, 4, T, 0, 0);
    model_zero_grad(&full);
    model_forward(&full, dl.inputs, dl.targets, 4, T);
    model_backward(&full, 1.0f);
    float* params2 = (float*)malloc_check(params_copy.size() * sizeof(float));
    memcpy(params2, params_copy.data(), params_copy.size() * sizeof(float));
    model_init(&half, &cfg, params2, 2, T, 0, 0);
    model_zero_grad(&half);
    for (int i = 0; i < 2; i++) {
        model_forward(&half, dl.inputs + i * 2 * T, dl.targets + i * 2 * T, 2, T);
        model_backward(&half, 0.5f);
    }
    double e = scaled_error(half.grads_memory, full.grads_memory, full.num_params);
    check(e <= 1e-5, "gradient_accumulation_matches_full_batch", "scaled error %.2e (dense, B=4 vs 2x B=2)", e);
    model_free(&full);
    model_free(&half);
    dataloader_free(&dl);
}

// AdamW's decoupled weight decay: with zero gradients a step multiplies exactly the 2-D weights
// (router and experts included) by 1 - lr * wd and leaves biases and layer norms alone
static void test_weight_decay_rule(const char* dense_path) {
    ModelConfig cfg;
    TrainArgs args;
    float* params = build_from_options(std::string("-m ") + dense_path + " -e 4 -k 2 --init drop", &cfg, &args);
    std::vector<float> before(params, params + count_parameters(&cfg));
    Model m;
    model_init(&m, &cfg, params, 1, 1, 0, 0);
    model_zero_grad(&m);
    OptimizerSettings opt = {0.9f, 0.95f, 1e-8f, 0.1f, 1.0f};
    float lr = 0.01f;
    model_update(&m, lr, &opt, 1);
    std::string detail;
    bool ok = true;
    size_t offset = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        float factor = parameter_is_decayed(i) ? 1.0f - lr * 0.1f : 1.0f;
        size_t wrong = 0;
        for (size_t j = offset; j < offset + m.param_sizes[i]; j++) { wrong += m.params_memory[j] != before[j] * factor; }
        if (parameter_is_decayed(i)) { detail += std::string(detail.empty() ? "" : ",") + PARAMETER_NAMES[i]; }
        ok &= wrong == 0;
        offset += m.param_sizes[i];
    }
    check(ok, "adamw_decays_only_2d_weights", "zero gradients: exactly x(1 - lr wd) on %s; the rest unchanged", detail.c_str());
    model_free(&m);
}

// methods.md 4.6: a dense run's moments land in the upcycled layout: shared tensors as they
// were, every expert its MLP shard's moments (unscaled, even with weight scaling on), router 0
static void test_optimizer_state_carry_over(const char* dense_path, const char* state_path) {
    ModelConfig dense_cfg, cfg;
    free(read_checkpoint(dense_path, &dense_cfg));
    size_t n = count_parameters(&dense_cfg);
    std::vector<float> dm(n), dv(n);
    for (size_t i = 0; i < n; i++) { dm[i] = (float)random_normal(3, 1, i); dv[i] = (float)random_uniform(3, 2, i); }
    TrainState st = {};
    st.step = 42;
    st.B = 1; st.T = 1; st.grad_accum = 1;
    st.num_params = n;
    write_train_state(state_path, &st, dm.data(), dv.data());
    TrainArgs args;
    float* params = build_from_options(std::string("-m ") + dense_path + " -e 8 -k 2 --granularity 2 --renorm 0 --init drop --init-optimizer " + state_path, &cfg, &args);
    size_t N = count_parameters(&cfg);
    std::vector<float> m(N), v(N);
    int offset = upcycle_optimizer_state(&args, &cfg, m.data(), v.data());
    ParameterTensors<float> pd, pm, pdv, pmv;
    size_t dsz[NUM_PARAMETER_TENSORS], msz[NUM_PARAMETER_TENSORS];
    fill_parameter_sizes(dsz, &dense_cfg);
    fill_parameter_sizes(msz, &cfg);
    point_parameters(&pd, dm.data(), dsz);
    point_parameters(&pm, m.data(), msz);
    point_parameters(&pdv, dv.data(), dsz);
    point_parameters(&pmv, v.data(), msz);
    int C = cfg.channels, H = cfg.expert_hidden, E = cfg.num_experts, G = cfg.granularity;
    bool ok = offset == 42 && memcmp(pm.qkvw, pd.qkvw, msz[P_QKVW] * sizeof(float)) == 0 &&
              memcmp(pmv.wte, pdv.wte, msz[P_WTE] * sizeof(float)) == 0;
    for (size_t i = 0; i < msz[P_ROUTERW]; i++) { ok &= pm.routerw[i] == 0.0f && pmv.routerw[i] == 0.0f; }
    for (int l = 0; l < cfg.num_layers; l++) {
        int ms = cfg.moe_slot[l], ds = cfg.dense_slot[l];
        if (ds >= 0) { ok &= memcmp(pm.fcw + (size_t)ds * 4 * C * C, pd.fcw + (size_t)l * 4 * C * C, (size_t)4 * C * C * sizeof(float)) == 0; continue; }
        for (int e = 0; e < E; e++) {
            size_t ex = (size_t)ms * E + e;
            int g = e % G;
            ok &= memcmp(pm.expert_fcw + ex * H * C, pd.fcw + ((size_t)l * 4 * C + (size_t)g * H) * C, (size_t)H * C * sizeof(float)) == 0;
            ok &= memcmp(pmv.expert_fcb + ex * H, pdv.fcb + (size_t)l * 4 * C + (size_t)g * H, H * sizeof(float)) == 0;
            for (int o = 0; o < C; o++) { ok &= pm.expert_fcprojw[(ex * C + o) * H] == pd.fcprojw[((size_t)l * C + o) * 4 * C + (size_t)g * H]; }
        }
    }
    check(ok, "optimizer_moments_carried_into_experts", "step %d continues; experts hold their MLP shard's m and v, the router none", offset);
    free(params);
}

// a shard written by write_shard reads back as windows of B*T+1 tokens that advance by B*T,
// across two shards of one pattern, wrapping to the first at the end (a new epoch)
static void test_shard_roundtrip(const std::string& dir) {
    const int B = 2, T = 3, n0 = 20, n1 = 9;
    std::vector<uint16_t> tokens(n0 + n1);
    for (size_t i = 0; i < tokens.size(); i++) { tokens[i] = (uint16_t)(i * 7 % 50); }
    write_shard((dir + "/roundtrip_000.bin").c_str(), tokens.data(), n0);
    write_shard((dir + "/roundtrip_001.bin").c_str(), tokens.data() + n0, n1);
    DataLoader dl;
    dataloader_init(&dl, (dir + "/roundtrip_*.bin").c_str(), B, T, 50);
    // windows start at 0, 6, 12 in shard 0 (12 + 7 > 20 ends it), 0 in shard 1, then 0 in shard 0 again
    const int starts[] = {0, 6, 12, n0 + 0, 0};
    bool ok = dl.num_batches == 3 + 1;
    for (int start : starts) {
        dataloader_next_batch(&dl);
        for (int i = 0; i < B * T; i++) { ok &= dl.inputs[i] == tokens[start + i] && dl.targets[i] == tokens[start + i + 1]; }
    }
    check(ok, "shards_write_and_read_back_as_windows", "2 shards of %d and %d tokens, B=%d T=%d: windows 0, 6, 12, then shard 2, then a new epoch",
          n0, n1, B, T);
    dataloader_free(&dl);
}

// llm.c's bf16 model file (version 5) loads as the upper halves of the fp32 values. The file is
// written here, independently of the engine's writer.
static void test_bf16_checkpoint_loads(const char* dense_path, const char* tmp_path) {
    ModelConfig cfg, cfg16;
    float* params = read_checkpoint(dense_path, &cfg);
    size_t n = count_parameters(&cfg);
    int header[256];
    FILE* f = fopen_check(dense_path, "rb");
    fread_check(header, sizeof(int), 256, f, dense_path);
    fclose(f);
    header[1] = 5;
    std::vector<uint16_t> half(n);
    for (size_t i = 0; i < n; i++) { uint32_t bits; memcpy(&bits, &params[i], 4); half[i] = (uint16_t)(bits >> 16); }
    f = fopen_check(tmp_path, "wb");
    fwrite_check(header, sizeof(int), 256, f, tmp_path);
    fwrite_check(half.data(), sizeof(uint16_t), n, f, tmp_path);
    fclose(f);
    float* loaded = read_checkpoint(tmp_path, &cfg16);
    size_t exact = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)half[i] << 16;
        float want;
        memcpy(&want, &bits, 4);
        exact += loaded[i] == want;
    }
    check(exact == n && count_parameters(&cfg16) == n, "bf16_checkpoint_loads", "%zu of %zu values are the bf16 halves", exact, n);
    free(params);
    free(loaded);
}

int main(int argc, char** argv) {
    if (argc >= 6 && strcmp(argv[1], "reference") == 0 && strcmp(argv[5], "--") == 0) {
        // argv[5] becomes the program name of the train options
        test_against_reference(argv[2], argv[3], argv[4], argc - 5, argv + 5);
    } else if (argc == 5 && strcmp(argv[1], "invariants") == 0) {
        const char* dense = argv[2];
        const char* shard = argv[3];
        std::string scratch_dir = argv[4];
        DataLoader dl;
        ModelConfig cfg;
        free(read_checkpoint(dense, &cfg));
        dataloader_init(&dl, shard, 4, 16, cfg.vocab_size);
        dataloader_next_batch(&dl);
        test_copy_upcycling_keeps_dense_function(dense, dl.inputs, 4, 16);
        dataloader_free(&dl);
        test_drop_upcycling_statistics(dense);
        test_granularity_shards_and_virtual_groups(dense);
        test_capacity_priority_rule();
        test_aux_loss_formulas();
        test_gradient_accumulation(dense, shard);
        test_weight_decay_rule(dense);
        test_shard_roundtrip(scratch_dir);
        test_optimizer_state_carry_over(dense, (scratch_dir + "/dense_state.bin").c_str());
        test_bf16_checkpoint_loads(dense, (scratch_dir + "/dense_bf16.bin").c_str());
    } else {
        fprintf(stderr, "usage: %s reference NAME STATE REF_MODEL -- [train options]\n       %s invariants DENSE SHARD SCRATCH_DIR\n", argv[0], argv[0]);
        return 2;
    }
    printf("%d passed, %d failed\n", passes, failures);
    return failures;
}
