/*
train_moe: the GPU engine. GPT-2 with Mixture-of-Experts MLPs upcycled from a dense llm.c
checkpoint, trained with hand-written kernels (the headers in kernels/) and cuBLASLt for the dense
matmuls. The same command line, outputs and checkpoints as the CPU twin train_moe_cpu, which
is its specification.

    make train_moe                  # PRECISION=BF16 (default) or PRECISION=FP32
    ./train_moe -m dense.bin -e 8 -k 2 -o out

Precision (kernels/common.cuh): activations and the working weights are floatX (bf16, or fp32
in the FP32 build); master weights, gradients and AdamW moments are fp32; the router (weights,
logits, softmax, top-k, auxiliary losses) is fp32 always and reads the fp32 master weights.

The file reads top to bottom: the model's buffers; the upload of a micro-batch; forward (one
block of kernel calls per layer), backward (the same calls in reverse), update; validation,
sampling and the routing report; the training loop. A step never waits for the GPU until its
end: the tokens per expert stay on the device, and the losses and the gradient norm are
summed on the device and read once.
*/
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/checkpoint.h"
#include "common/model_config.h"
#include "common/training.h"
#include "common/utils.h"

#include "kernels/common.cuh"
#include "kernels/adamw.cuh"
#include "kernels/attention.cuh"
#include "kernels/classifier.cuh"
#include "kernels/encoder.cuh"
#include "kernels/expert_mlp.cuh"
#include "kernels/gelu.cuh"
#include "kernels/global_norm.cuh"
#include "kernels/layernorm.cuh"
#include "kernels/matmul.cuh"
#include "kernels/permute.cuh"
#include "kernels/reduce.cuh"
#include "kernels/router.cuh"

// ----------------------------------------------------------------------------
// the model's buffers on the GPU

// Activations of one layer, kept from the forward for the backward (N = B*T tokens)
struct LayerActivations {
    floatX* ln1;             // (N, C)
    float* ln1_mean;         // (N)
    float* ln1_rstd;         // (N)
    floatX* qkv;             // (N, 3C)
    floatX* atty;            // (N, C) attention output before its projection
    float* att_lse;          // (B, NH, T) log-sum-exp of each query's scores
    floatX* residual2;       // (N, C) the residual after attention
    floatX* ln2;             // (N, C)
    float* ln2_mean;         // (N)
    float* ln2_rstd;         // (N)
    // dense MLP
    floatX* fch;             // (N, 4C)
    floatX* fch_gelu;        // (N, 4C); NULL with recompute (Model::recompute)
    // MoE
    DeviceRouting routing;
    floatX* expert_input;    // (rows, C) routed rows, expert-contiguous
    floatX* expert_fch;      // (rows, H)
    floatX* expert_fch_gelu; // (rows, H); NULL with recompute
    floatX* expert_output;   // (rows, C)
    floatX* residual3;       // (N, C) the layer's output
};

// One micro-batch on the device: inputs, targets and the encoder backward's token buckets, in
// two uploads (the tokens, then the buckets the host sorts while the GPU runs the forward). Two
// pinned staging buffers alternate, so filling one never races the copies of the other.
struct BatchBuffers {
    int N;
    int* device;             // inputs (N), targets (N), then the buckets' arrays (encoder_chunk_ints(N))
    int* staging[2];         // pinned host copies of the same layout
    cudaEvent_t uploaded[2];
    int next;                // the staging buffer the next upload fills
    int current, n;          // the staging buffer and tokens of the last upload
    int* inputs;             // pointers into `device`
    int* targets;
    EncoderChunks chunks;    // into `device`, with the counts of the last batch_upload_buckets
    bool chunks_ready;       // false until batch_upload_buckets (a forward needs only the tokens)
};

// device scalars summed over a step: index into Model::step_scalars
enum StepScalar { SCALAR_LOSS, SCALAR_AUX, SCALAR_Z, SCALAR_NORM2, SCALAR_VAL_LOSS, NUM_SCALARS };

struct Model {
    ModelConfig config;
    size_t param_sizes[NUM_PARAMETER_TENSORS];
    size_t num_params;
    float* master;                      // fp32 master weights
    floatX* working;                    // the floatX copy the kernels read (the master itself in FP32)
    float* grads;                       // fp32
    float* m;                           // AdamW moments, fp32
    float* v;
    ParameterTensors<floatX> params;    // into `working`
    ParameterTensors<float> master_t;   // into `master` (the router reads these)
    ParameterTensors<float> grads_t;
    float aux_alpha, z_beta;
    int B, T;                           // the largest batch the buffers hold
    int batch_B, batch_T;               // the shape of the last forward
    BatchBuffers batch;
    floatX* encoded;                    // (N, C)
    std::vector<LayerActivations> layers;
    floatX* lnf;                        // (N, C)
    float* lnf_mean;                    // (N)
    float* lnf_rstd;                    // (N)
    floatX* logits;                     // (N, Vp); with targets and a loss scale, dlogits in place
    float* losses;                      // (N)
    // scratch
    floatX* mlp_out;                    // (N, C) attention projection, then the MLP/MoE output
    floatX* dresidual;                  // (N, C)
    floatX* dbuf;                       // (N, C) d ln2, d atty, d ln1, d lnf
    floatX* dqkv;                       // (N, 3C)
    floatX* dhidden;                    // max(N*4C, rows*H): d fch_gelu; with recompute, the forward's fch_gelu
    floatX* dhidden2;                   // max(N*4C, rows*H): d fch; with recompute, the backward's fch_gelu first
    floatX* dexpert_output;             // (rows, C)
    floatX* dexpert_input;              // (rows, C)
    float* scratch;                     // the kernels' fp32 scratch (the largest they ask for)
    float* step_scalars;                // (NUM_SCALARS) on the device
    DeviceBuffers buffers;              // all of the above that live on the device
    bool collect_stats;                 // routing statistics (training batches only)
    // --recompute 1: no layer keeps its GELU output (N x 4C, or rows x H, floatX each): the forward
    // writes it to dhidden for the next matmul, the backward computes it again from fch (the same
    // bits) into dhidden2, where d fch replaces it once the fcproj weight gradient has read it
    bool recompute;
    int expert_gemm;                    // --expert-gemm: the expert GEMMs' version (kernels/expert_mlp.cuh), 0: the default
    cudaStream_t stream;
    Breakdown* breakdown;                        // --breakdown 1: where a step's time goes (else NULL)
    std::vector<cudaEvent_t> breakdown_events;   // one per mark of a step, made as needed, reused
};

// the ints of the batch layout for up to N tokens (BatchBuffers::device)
static size_t batch_ints(int N) { return 2 * (size_t)N + encoder_chunk_ints(N); }

// the batch's device buffer, added to the model's list (batch_init once it is allocated)
static void batch_add_buffers(BatchBuffers* b, DeviceBuffers* d, int N) {
    b->N = N;
    buffers_add(d, &b->device, batch_ints(N));
}

static void batch_init(BatchBuffers* b) {
    int N = b->N;
    for (int i = 0; i < 2; i++) {
        cudaCheck(cudaMallocHost(&b->staging[i], batch_ints(N) * sizeof(int)));
        cudaCheck(cudaEventCreateWithFlags(&b->uploaded[i], cudaEventDisableTiming));
        cudaCheck(cudaEventRecord(b->uploaded[i]));
    }
    b->next = 0;
    b->current = 0;
    b->n = 0;
    b->chunks_ready = false;
    b->inputs = b->device;
    b->targets = b->device + N;
    b->chunks = encoder_chunks_at(b->device + 2 * N, N);
}

// Uploads the tokens (and targets, or zeros) of an n-token batch: all that a forward needs. Waits
// only for the copies issued two uploads ago from the same staging buffer, which the GPU finished
// long since.
static void batch_upload_tokens(BatchBuffers* b, const int* inputs, const int* targets, int n, cudaStream_t stream) {
    int slot = b->next;
    b->next ^= 1;
    cudaCheck(cudaEventSynchronize(b->uploaded[slot]));
    b->current = slot;
    b->n = n;
    b->chunks_ready = false;
    int* h = b->staging[slot];
    int N = b->N;
    memcpy(h, inputs, n * sizeof(int));
    if (targets) { memcpy(h + N, targets, n * sizeof(int)); } else { memset(h + N, 0, n * sizeof(int)); }
    cudaCheck(cudaMemcpyAsync(b->device, h, 2 * (size_t)N * sizeof(int), cudaMemcpyHostToDevice, stream));
    cudaCheck(cudaEventRecord(b->uploaded[slot], stream));
}

// The encoder backward's buckets of the last batch_upload_tokens, sorted on the host (a stable sort
// of B T positions: milliseconds at B=64, T=1024), cut into chunks and uploaded. The training loop
// calls it after launching the forward, so that the GPU computes while the host sorts; the
// backward needs it.
static void batch_upload_buckets(BatchBuffers* b, cudaStream_t stream) {
    int* h = b->staging[b->current];
    int N = b->N;
    EncoderChunks host = encoder_chunks_at(h + 2 * N, N);
    encoder_prepare_chunks(h, b->n, &host);
    b->chunks.num_chunks = host.num_chunks;
    b->chunks.num_split = host.num_split;
    b->chunks_ready = true;
    cudaCheck(cudaMemcpyAsync(b->device + 2 * N, h + 2 * N, (batch_ints(N) - 2 * (size_t)N) * sizeof(int), cudaMemcpyHostToDevice, stream));
    cudaCheck(cudaEventRecord(b->uploaded[b->current], stream));
}

// the host side (the device buffer is the model's)
static void batch_free(BatchBuffers* b) {
    for (int i = 0; i < 2; i++) {
        cudaCheck(cudaFreeHost(b->staging[i]));
        cudaCheck(cudaEventDestroy(b->uploaded[i]));
    }
}

// Lists every device buffer of a model of this config, for batches of up to B x T, in
// m->buffers: sizes only, nothing is allocated. Returns the bytes of the parameters, gradients
// and moments (the rest are activations and scratch).
static size_t model_add_buffers(Model* m, const ModelConfig* cfg, int B, int T, bool recompute) {
    m->config = *cfg;
    m->recompute = recompute;
    fill_parameter_sizes(m->param_sizes, cfg);
    size_t P = m->num_params = count_parameters(cfg);
    DeviceBuffers* d = &m->buffers;
    *d = DeviceBuffers();
    buffers_add(d, &m->master, P);
#if !defined(ENABLE_FP32)
    buffers_add(d, &m->working, P);
#endif
    buffers_add(d, &m->grads, P);
    buffers_add(d, &m->m, P);
    buffers_add(d, &m->v, P);
    size_t parameter_bytes = d->bytes;

    int N = B * T, C = cfg->channels, NH = cfg->num_heads, Vp = cfg->padded_vocab_size;
    int H = cfg->expert_hidden;
    size_t rows = cfg->num_experts > 1 ? (size_t)max_routing_rows(cfg, N) : 0;
    m->B = B;
    m->T = T;
    batch_add_buffers(&m->batch, d, N);
    buffers_add(d, &m->encoded, (size_t)N * C);
    m->layers.clear();
    m->layers.resize(cfg->num_layers);  // never resized again: the list holds pointers into it
    const DeviceRouting* first_moe = NULL;
    for (int l = 0; l < cfg->num_layers; l++) {
        LayerActivations& a = m->layers[l];
        memset(&a, 0, sizeof(a));
        buffers_add(d, &a.ln1, (size_t)N * C);
        buffers_add(d, &a.ln1_mean, N);
        buffers_add(d, &a.ln1_rstd, N);
        buffers_add(d, &a.qkv, (size_t)N * 3 * C);
        buffers_add(d, &a.atty, (size_t)N * C);
        buffers_add(d, &a.att_lse, (size_t)B * NH * T);
        buffers_add(d, &a.residual2, (size_t)N * C);
        buffers_add(d, &a.ln2, (size_t)N * C);
        buffers_add(d, &a.ln2_mean, N);
        buffers_add(d, &a.ln2_rstd, N);
        buffers_add(d, &a.residual3, (size_t)N * C);
        if (!cfg->is_moe_layer[l]) {
            buffers_add(d, &a.fch, (size_t)N * 4 * C);
            if (!recompute) { buffers_add(d, &a.fch_gelu, (size_t)N * 4 * C); }
            continue;
        }
        routing_add_buffers(&a.routing, d, cfg, N, first_moe);  // one backward set for all
        if (!first_moe) { first_moe = &a.routing; }
        buffers_add(d, &a.expert_input, rows * C);
        buffers_add(d, &a.expert_fch, rows * H);
        if (!recompute) { buffers_add(d, &a.expert_fch_gelu, rows * H); }
        buffers_add(d, &a.expert_output, rows * C);
    }
    buffers_add(d, &m->lnf, (size_t)N * C);
    buffers_add(d, &m->lnf_mean, N);
    buffers_add(d, &m->lnf_rstd, N);
    buffers_add(d, &m->logits, (size_t)N * Vp);
    buffers_add(d, &m->losses, N);
    size_t hidden = std::max((size_t)N * 4 * C, rows * H);
    buffers_add(d, &m->mlp_out, (size_t)N * C);
    buffers_add(d, &m->dresidual, (size_t)N * C);
    buffers_add(d, &m->dbuf, (size_t)N * C);
    buffers_add(d, &m->dqkv, (size_t)N * 3 * C);
    buffers_add(d, &m->dhidden, hidden);
    buffers_add(d, &m->dhidden2, hidden);
    buffers_add(d, &m->dexpert_output, rows * C);
    buffers_add(d, &m->dexpert_input, rows * C);
    // the largest scratch any kernel asks for; the widest matmul's bias sums are the classifier's or fc's
    size_t widest = std::max((size_t)4 * C, (size_t)Vp);
    size_t scratch = std::max({layernorm_backward_scratch_floats(N, C), matmul_backward_scratch_floats(N, (int)widest),
                               attention_backward_scratch_floats(B, T, NH), global_norm_scratch_floats(P),
                               encoder_backward_scratch_floats(N, C)});
    buffers_add(d, &m->scratch, scratch);
    buffers_add(d, &m->step_scalars, NUM_SCALARS);
    return parameter_bytes;
}

// the device bytes of a model of this config for batches of B x T
static size_t model_device_bytes(const ModelConfig* cfg, int B, int T, bool recompute) {
    Model probe;
    model_add_buffers(&probe, cfg, B, T, recompute);
    return probe.buffers.bytes;
}

// Takes the host parameters (fp32, the config's layout) to the GPU. B, T: the largest batch.
// Every device buffer is sized first: the run's total is printed, and a run that cannot fit
// stops with that figure, and the largest batch that would fit, before anything is allocated.
// recompute: see Model::recompute; expert_gemm: Model::expert_gemm, checked here (a version this
// build or GPU does not have stops the run before anything is allocated).
static void model_init(Model* m, const ModelConfig* cfg, const float* host_params, int B, int T, float aux_alpha, float z_beta,
                       bool recompute, int expert_gemm) {
    if (cfg->num_experts > 1 && expert_gemm != 0) {
        expert_mlp_pick_version(expert_gemm, cfg->channels, cfg->expert_hidden, {});
        printf("expert GEMMs: version %d (--expert-gemm %d)\n", expert_gemm, expert_gemm);
    }
    size_t parameter_bytes = model_add_buffers(m, cfg, B, T, recompute);
    m->expert_gemm = expert_gemm;
    size_t need = m->buffers.bytes, P = m->num_params;
    printf("GPU memory: %.2f GiB, of which %.2f GiB parameters, gradients and moments, %.2f GiB activations (B=%d, T=%d)\n",
           need / 1073741824.0, parameter_bytes / 1073741824.0, (need - parameter_bytes) / 1073741824.0, B, T);
    size_t free_bytes = 0, total_bytes = 0;
    cudaCheck(cudaMemGetInfo(&free_bytes, &total_bytes));
    if (need > free_bytes) {
        int fits = B - 1;
        while (fits > 0 && model_device_bytes(cfg, fits, T, recompute) > free_bytes) { fits--; }
        char advice[192];
        if (fits > 0) {
            snprintf(advice, sizeof(advice), "at -t %d the largest batch that fits is -b %d (-d keeps more tokens per step by accumulation)%s", T,
                     fits, recompute ? "" : "; --recompute 1 needs less");
        } else {
            snprintf(advice, sizeof(advice), "not even -b 1 fits at -t %d: a shorter sequence (-t) or fewer experts (-e) needs less%s", T,
                     recompute ? "" : ", as does --recompute 1");
        }
        die("out of GPU memory: this run needs %.2f GiB, %.2f of %.2f GiB free; %s", need / 1073741824.0, free_bytes / 1073741824.0,
            total_bytes / 1073741824.0, advice);
    }
    buffers_allocate(&m->buffers);
    m->aux_alpha = aux_alpha;
    m->z_beta = z_beta;

    cudaCheck(cudaMemcpy(m->master, host_params, P * sizeof(float), cudaMemcpyHostToDevice));
    cudaCheck(cudaStreamCreate(&m->stream));
#if defined(ENABLE_FP32)
    m->working = m->master;
#else
    copy_to_working(m->working, m->master, P, m->stream);
#endif
    cudaCheck(cudaMemset(m->m, 0, P * sizeof(float)));
    cudaCheck(cudaMemset(m->v, 0, P * sizeof(float)));
    point_parameters(&m->params, m->working, m->param_sizes);
    point_parameters(&m->master_t, m->master, m->param_sizes);
    point_parameters(&m->grads_t, m->grads, m->param_sizes);
    batch_init(&m->batch);
    for (int l = 0; l < cfg->num_layers; l++) {
        if (cfg->is_moe_layer[l]) { routing_ready(&m->layers[l].routing); }
    }
    cudaCheck(cudaMemset(m->step_scalars, 0, NUM_SCALARS * sizeof(float)));
    m->collect_stats = false;
    m->breakdown = NULL;
    cudaCheck(cudaDeviceSynchronize());
}

static void model_free(Model* m) {
    for (cudaEvent_t e : m->breakdown_events) { cudaCheck(cudaEventDestroy(e)); }
    buffers_free(&m->buffers);
    batch_free(&m->batch);
    cudaCheck(cudaStreamDestroy(m->stream));
}

// ----------------------------------------------------------------------------
// --breakdown 1 (common/breakdown.h): an event on the stream as each part of a training step
// begins, read once the step has ended (breakdown_read_step), so that nothing waits inside it

static void mark(Model* m, int slot) {
    Breakdown* b = m->breakdown;
    if (!b || !b->recording) { return; }
    size_t i = b->slots.size();
    if (i == m->breakdown_events.size()) {
        cudaEvent_t e;
        cudaCheck(cudaEventCreate(&e));
        m->breakdown_events.push_back(e);
    }
    cudaCheck(cudaEventRecord(m->breakdown_events[i], m->stream));
    b->slots.push_back(slot);
}
static void mark_forward(Model* m, StepPart part) { mark(m, breakdown_slot(part, false)); }
static void mark_backward(Model* m, StepPart part) { mark(m, breakdown_slot(part, true)); }

// once the stream has passed the step's last mark (BREAKDOWN_END, after its update): the intervals
static void breakdown_read_step(Model* m) {
    Breakdown* b = m->breakdown;
    if (!b || !b->recording) { return; }
    int count = (int)b->slots.size();
    cudaCheck(cudaEventSynchronize(m->breakdown_events[count - 1]));
    std::vector<double> ms(count);
    for (int i = 0; i + 1 < count; i++) {
        float elapsed;
        cudaCheck(cudaEventElapsedTime(&elapsed, m->breakdown_events[i], m->breakdown_events[i + 1]));
        ms[i] = elapsed;
    }
    breakdown_add_step(b, ms.data(), count);
}

// ----------------------------------------------------------------------------
// forward, backward, update

// Forward over the uploaded batch (B, T). With targets and dloss != 0 (training), the
// classifier also leaves dlogits = dloss * (softmax - onehot) in `logits` for the backward.
// with_targets = false (sampling) stops at the logits.
static void model_forward(Model* m, int B, int T, bool with_targets, float dloss) {
    const ModelConfig* cfg = &m->config;
    if (B * T > m->B * m->T || T > m->T) { die("model_forward: batch %dx%d exceeds the %dx%d the model was built for", B, T, m->B, m->T); }
    m->batch_B = B;
    m->batch_T = T;
    int N = B * T, C = cfg->channels, NH = cfg->num_heads, V = cfg->vocab_size, Vp = cfg->padded_vocab_size;
    int E = cfg->num_experts, H = cfg->expert_hidden;
    const ParameterTensors<floatX>& p = m->params;
    cudaStream_t s = m->stream;

    mark_forward(m, PART_ENCODER);
    encoder_forward(m->encoded, m->batch.inputs, p.wte, p.wpe, B, T, C, s);
    mark_forward(m, PART_LAYERNORM);
    layernorm_forward(m->layers[0].ln1, m->layers[0].ln1_mean, m->layers[0].ln1_rstd, m->encoded, p.ln1w, p.ln1b, N, C, s);
    for (int l = 0; l < cfg->num_layers; l++) {
        LayerActivations& a = m->layers[l];
        const floatX* residual = l == 0 ? m->encoded : m->layers[l - 1].residual3;
        size_t lc = (size_t)l * C;
        // attention
        mark_forward(m, PART_ATTENTION);
        matmul_forward(a.qkv, a.ln1, p.qkvw + lc * 3 * C, p.qkvb + lc * 3, N, C, 3 * C, s);
        attention_forward(a.atty, a.att_lse, a.qkv, B, T, C, NH, s);
        matmul_forward(m->mlp_out, a.atty, p.attprojw + lc * C, p.attprojb + lc, N, C, C, s);
        mark_forward(m, PART_LAYERNORM);
        residual_layernorm_forward(a.residual2, a.ln2, a.ln2_mean, a.ln2_rstd, residual, m->mlp_out, p.ln2w + lc, p.ln2b + lc, N, C, s);
        // MLP, dense or MoE
        int ds = cfg->dense_slot[l];
        if (ds >= 0) {
            mark_forward(m, PART_MLP);
            size_t dc = (size_t)ds * C;
            floatX* fch_gelu = m->recompute ? m->dhidden : a.fch_gelu;
            matmul_forward(a.fch, a.ln2, p.fcw + dc * 4 * C, p.fcb + dc * 4, N, C, 4 * C, s);
            gelu_forward(fch_gelu, a.fch, (size_t)N * 4 * C, s);
            matmul_forward(m->mlp_out, fch_gelu, p.fcprojw + dc * 4 * C, p.fcprojb + dc, N, 4 * C, C, s);
        } else {
            size_t ex = (size_t)cfg->moe_slot[l] * E;
            DeviceRouting* r = &a.routing;
            mark_forward(m, PART_ROUTER);
            router_forward(r, a.ln2, m->master_t.routerw + ex * C, cfg, N, C, s);
            mark_forward(m, PART_PERMUTE);
            permute_tokens(a.expert_input, a.ln2, r, C, s);
            mark_forward(m, PART_EXPERTS);
            expert_mlp_forward(a.expert_output, a.expert_fch, m->recompute ? m->dhidden : a.expert_fch_gelu, a.expert_input,
                               r->expert_offsets, r->max_rows,
                               p.expert_fcw + ex * H * C, p.expert_fcb + ex * H, p.expert_fcprojw + ex * C * H, p.expert_fcprojb + ex * C,
                               E, C, H, s, m->expert_gemm);
            mark_forward(m, PART_UNPERMUTE);
            unpermute_tokens(m->mlp_out, a.expert_output, r, N, C, s);
            if (m->collect_stats) {
                mark_forward(m, PART_ROUTER);
                routing_stats_accumulate(r, s);
            }
        }
        // the residual, fused with the next layer norm (the next layer's ln1, or lnf)
        bool last = l == cfg->num_layers - 1;
        LayerActivations* next = last ? NULL : &m->layers[l + 1];
        mark_forward(m, PART_LAYERNORM);
        residual_layernorm_forward(a.residual3, last ? m->lnf : next->ln1, last ? m->lnf_mean : next->ln1_mean,
                                   last ? m->lnf_rstd : next->ln1_rstd, a.residual2, m->mlp_out,
                                   last ? p.lnfw : p.ln1w + lc + C, last ? p.lnfb : p.ln1b + lc + C, N, C, s);
    }
    mark_forward(m, PART_CLASSIFIER);
    matmul_forward(m->logits, m->lnf, p.wte, NULL, N, C, Vp, s);
    if (with_targets) { classifier_forward_backward(m->logits, m->losses, m->batch.targets, dloss, N, V, Vp, s); }
}

// Adds this micro-batch's mean cross-entropy and auxiliary losses, times scale, into the step's
// device sums (the aux and z losses summed over MoE layers, before their coefficients).
static void accumulate_losses(Model* m, float scale) {
    int N = m->batch_B * m->batch_T;
    mark_forward(m, PART_CLASSIFIER);
    accumulate_sum(m->step_scalars + SCALAR_LOSS, m->losses, N, scale / N, m->stream);
    for (int l = 0; l < m->config.num_layers; l++) {
        if (m->config.moe_slot[l] < 0) { continue; }
        accumulate_sum(m->step_scalars + SCALAR_AUX, m->layers[l].routing.balance_loss, 1, scale, m->stream);
        accumulate_sum(m->step_scalars + SCALAR_Z, m->layers[l].routing.z_loss, 1, scale, m->stream);
    }
}

static void model_zero_grad(Model* m) { cudaCheck(cudaMemsetAsync(m->grads, 0, m->num_params * sizeof(float), m->stream)); }

// Backward of the last forward (which ran with targets and dloss = loss_scale / N), adding into
// the gradients. loss_scale is 1/(gradient-accumulation steps), as in the CPU twin.
static void model_backward(Model* m, float loss_scale) {
    const ModelConfig* cfg = &m->config;
    int B = m->batch_B, T = m->batch_T;
    int N = B * T, C = cfg->channels, NH = cfg->num_heads, Vp = cfg->padded_vocab_size;
    int E = cfg->num_experts, H = cfg->expert_hidden;
    const ParameterTensors<floatX>& p = m->params;
    ParameterTensors<float>& g = m->grads_t;
    cudaStream_t s = m->stream;

    // logits hold dlogits (the forward's classifier wrote them)
    mark_backward(m, PART_CLASSIFIER);
    matmul_backward(m->dbuf, g.wte, NULL, m->scratch, m->logits, m->lnf, p.wte, N, C, Vp, s);
    cudaCheck(cudaMemsetAsync(m->dresidual, 0, (size_t)N * C * sizeof(floatX), s));
    const floatX* last = m->layers[cfg->num_layers - 1].residual3;
    mark_backward(m, PART_LAYERNORM);
    layernorm_backward(m->dresidual, g.lnfw, g.lnfb, m->scratch, m->dbuf, last, p.lnfw, m->lnf_mean, m->lnf_rstd, N, C, s);

    for (int l = cfg->num_layers - 1; l >= 0; l--) {
        LayerActivations& a = m->layers[l];
        const floatX* residual = l == 0 ? m->encoded : m->layers[l - 1].residual3;
        size_t lc = (size_t)l * C;
        // dresidual holds d(residual3) = d(MLP output) = d(residual2)
        floatX* dln2 = m->dbuf;
        int ds = cfg->dense_slot[l];
        if (ds >= 0) {
            mark_backward(m, PART_MLP);
            size_t dc = (size_t)ds * C;
            const floatX* fch_gelu = a.fch_gelu;
            if (m->recompute) {
                gelu_forward(m->dhidden2, a.fch, (size_t)N * 4 * C, s);
                fch_gelu = m->dhidden2;  // overwritten by d fch below, after the weight gradient has read it
            }
            matmul_backward(m->dhidden, g.fcprojw + dc * 4 * C, g.fcprojb + dc, m->scratch, m->dresidual, fch_gelu,
                            p.fcprojw + dc * 4 * C, N, 4 * C, C, s);
            gelu_backward(m->dhidden2, a.fch, m->dhidden, (size_t)N * 4 * C, s);
            matmul_backward(dln2, g.fcw + dc * 4 * C, g.fcb + dc * 4, m->scratch, m->dhidden2, a.ln2, p.fcw + dc * 4 * C, N, C, 4 * C, s);
        } else {
            size_t ex = (size_t)cfg->moe_slot[l] * E;
            DeviceRouting* r = &a.routing;
            mark_backward(m, PART_UNPERMUTE);
            unpermute_tokens_backward(m->dexpert_output, r, m->dresidual, a.expert_output, C, s);
            mark_backward(m, PART_EXPERTS);
            const floatX* fch_gelu = a.expert_fch_gelu;
            if (m->recompute) {
                expert_gelu_recompute(m->dhidden2, a.expert_fch, r->expert_offsets, r->max_rows, E, H, s);
                fch_gelu = m->dhidden2;  // likewise overwritten by d fch
            }
            expert_mlp_backward(m->dexpert_input, g.expert_fcw + ex * H * C, g.expert_fcb + ex * H, g.expert_fcprojw + ex * C * H,
                                g.expert_fcprojb + ex * C, m->dhidden2, m->dhidden, m->dexpert_output, a.expert_input, a.expert_fch,
                                fch_gelu, r->expert_offsets, r->max_rows, p.expert_fcw + ex * H * C, p.expert_fcprojw + ex * C * H,
                                E, C, H, s, m->expert_gemm);
            mark_backward(m, PART_PERMUTE);
            permute_tokens_backward(dln2, m->dexpert_input, r, N, C, s);
            mark_backward(m, PART_ROUTER);
            router_backward(dln2, g.routerw + ex * C, r, a.ln2, m->master_t.routerw + ex * C, cfg, m->aux_alpha * loss_scale,
                            m->z_beta * loss_scale, N, C, s);
        }
        mark_backward(m, PART_LAYERNORM);
        layernorm_backward(m->dresidual, g.ln2w + lc, g.ln2b + lc, m->scratch, dln2, a.residual2, p.ln2w + lc, a.ln2_mean, a.ln2_rstd, N, C, s);
        // dresidual now holds d(residual2) = d(residual) + d(attention projection)
        mark_backward(m, PART_ATTENTION);
        floatX* datty = m->dbuf;
        matmul_backward(datty, g.attprojw + lc * C, g.attprojb + lc, m->scratch, m->dresidual, a.atty, p.attprojw + lc * C, N, C, C, s);
        attention_backward(m->dqkv, m->scratch, datty, a.qkv, a.atty, a.att_lse, B, T, C, NH, s);
        floatX* dln1 = m->dbuf;
        matmul_backward(dln1, g.qkvw + lc * 3 * C, g.qkvb + lc * 3, m->scratch, m->dqkv, a.ln1, p.qkvw + lc * 3 * C, N, C, 3 * C, s);
        mark_backward(m, PART_LAYERNORM);
        layernorm_backward(m->dresidual, g.ln1w + lc, g.ln1b + lc, m->scratch, dln1, residual, p.ln1w + lc, a.ln1_mean, a.ln1_rstd, N, C, s);
    }
    if (!m->batch.chunks_ready) { die("model_backward: the batch's encoder buckets were not uploaded (batch_upload_buckets)"); }
    mark_backward(m, PART_ENCODER);
    encoder_backward(g.wte, g.wpe, m->scratch, m->dresidual, m->batch.chunks, B, T, C, s);
}

// The global gradient norm (into the step's scalars, for the clipping inside AdamW) and AdamW
// step t on every tensor, weight decay on the 2-D ones. Nothing waits for the GPU.
static void model_update(Model* m, float lr, const OptimizerSettings* o, int t) {
    float* norm2 = m->step_scalars + SCALAR_NORM2;
    mark_backward(m, PART_OPTIMIZER);
    global_norm_squared(norm2, m->grads, m->num_params, m->scratch, m->stream);
    size_t offset = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t n = m->param_sizes[i];
        if (n > 0) {
            floatX* working = (void*)m->working == (void*)m->master ? NULL : m->working + offset;
            float decay = parameter_is_decayed(i) ? o->weight_decay : 0.0f;
            adamw_update(m->master + offset, working, m->grads + offset, m->m + offset, m->v + offset, n, lr, o->beta1, o->beta2, o->eps,
                         decay, t, o->grad_clip, norm2, m->stream);
        }
        offset += n;
    }
}

// Reads the step's sums (the one synchronisation of a step) and clears them for the next.
static void read_step_scalars(Model* m, float out[NUM_SCALARS]) {
    cudaCheck(cudaMemcpyAsync(out, m->step_scalars, NUM_SCALARS * sizeof(float), cudaMemcpyDeviceToHost, m->stream));
    cudaCheck(cudaStreamSynchronize(m->stream));
    cudaCheck(cudaMemsetAsync(m->step_scalars, 0, NUM_SCALARS * sizeof(float), m->stream));
}

// the master weights and moments on the host, for checkpoints
static void model_download(Model* m, float* params, float* mm, float* vv) {
    cudaCheck(cudaStreamSynchronize(m->stream));
    cudaCheck(cudaMemcpy(params, m->master, m->num_params * sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(mm, m->m, m->num_params * sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(vv, m->v, m->num_params * sizeof(float), cudaMemcpyDeviceToHost));
}

static void model_upload_moments(Model* m, const float* mm, const float* vv) {
    cudaCheck(cudaMemcpy(m->m, mm, m->num_params * sizeof(float), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(m->v, vv, m->num_params * sizeof(float), cudaMemcpyHostToDevice));
}

// ----------------------------------------------------------------------------
// validation, sampling, routing report

static float validation_loss(Model* m, DataLoader* val, int max_batches) {
    dataloader_reset(val);
    int n = (int)std::min((int64_t)max_batches, val->num_batches);
    bool collect = m->collect_stats;
    m->collect_stats = false;
    float* val_sum = m->step_scalars + SCALAR_VAL_LOSS;
    cudaCheck(cudaMemsetAsync(val_sum, 0, sizeof(float), m->stream));
    for (int i = 0; i < n; i++) {
        dataloader_next_batch(val);
        batch_upload_tokens(&m->batch, val->inputs, val->targets, val->B * val->T, m->stream);  // no backward: no buckets
        model_forward(m, val->B, val->T, true, 0.0f);
        accumulate_sum(val_sum, m->losses, val->B * val->T, 1.0f / (val->B * val->T * n), m->stream);
    }
    float result;
    cudaCheck(cudaMemcpyAsync(&result, val_sum, sizeof(float), cudaMemcpyDeviceToHost, m->stream));
    cudaCheck(cudaStreamSynchronize(m->stream));
    m->collect_stats = collect;
    return result;
}

// Samples gen_tokens tokens after <|endoftext|> (the same sampler as the CPU twin).
static void sample_text(Model* m, TrainingRun* run) {
    int V = m->config.vocab_size, Vp = m->config.padded_vocab_size;
    int T = std::min(std::min(run->args.gen_tokens + 1, m->T), m->config.max_seq_len);
    std::vector<int> tokens(T, 0);
    std::vector<floatX> row(Vp);
    std::vector<float> logits(Vp);
    tokens[0] = run->tokenizer.eot_token < V ? run->tokenizer.eot_token : 0;
    bool collect = m->collect_stats;
    m->collect_stats = false;
    printf("generating:\n---\n");
    for (int t = 1; t < T; t++) {
        batch_upload_tokens(&m->batch, tokens.data(), NULL, t, m->stream);
        model_forward(m, 1, t, false, 0.0f);
        cudaCheck(cudaMemcpyAsync(row.data(), m->logits + (size_t)(t - 1) * Vp, Vp * sizeof(floatX), cudaMemcpyDeviceToHost, m->stream));
        cudaCheck(cudaStreamSynchronize(m->stream));
        for (int v = 0; v < Vp; v++) { logits[v] = (float)row[v]; }
        tokens[t] = sample_token(logits.data(), V, run->args.seed, &run->sampler_counter);
        tokenizer_print(&run->tokenizer, tokens[t]);
        fflush(stdout);
    }
    printf("\n---\n");
    m->collect_stats = collect;
}

// The routing sums since the last report, as the resume state holds them (train_state.h): E + 4
// doubles per MoE layer in layer order, the layout of DeviceRouting::stats
static std::vector<double> routing_window_get(const Model* m) {
    const ModelConfig* cfg = &m->config;
    std::vector<double> w(routing_window_doubles(cfg->num_moe_layers, cfg->num_experts));
    double* p = w.data();
    for (int l = 0; l < cfg->num_layers; l++) {
        if (cfg->moe_slot[l] < 0) { continue; }
        routing_stats_copy_out(&m->layers[l].routing, p);
        p += cfg->num_experts + 4;
    }
    return w;
}

static void routing_window_set(Model* m, const std::vector<double>& w) {
    const ModelConfig* cfg = &m->config;
    if (w.size() != routing_window_doubles(cfg->num_moe_layers, cfg->num_experts)) { die("routing_window_set: %zu values", w.size()); }
    const double* p = w.data();
    for (int l = 0; l < cfg->num_layers; l++) {
        if (cfg->moe_slot[l] < 0) { continue; }
        routing_stats_copy_in(&m->layers[l].routing, p);
        p += cfg->num_experts + 4;
    }
}

static void report_routing(Model* m, TrainingRun* run, int step) {
    const ModelConfig* cfg = &m->config;
    std::vector<double> assignments(cfg->num_experts);
    for (int l = 0; l < cfg->num_layers; l++) {
        if (cfg->moe_slot[l] < 0) { continue; }
        double total, dropped, entropy_sum, tokens;
        routing_stats_read(&m->layers[l].routing, assignments.data(), &total, &dropped, &entropy_sum, &tokens);
        run_report_layer(run, step, l, assignments.data(), total, dropped, entropy_sum, tokens);
    }
}

// The GPU's dense peak for this precision, for the MFU figure; 0 (no MFU printed) for a GPU not
// listed. NVIDIA's datasheet figures: bf16 tensor cores with fp32 sums, without sparsity; fp32
// on the CUDA cores (the FP32 build never uses TF32). The first entry whose name the GPU's name
// contains wins, so the more specific names come first ("H100 PCIe" before "H100", "L40S"
// and "L40" before "L4"). GH200 matches "H200" (the same H100 chip).
static double peak_flops(const cudaDeviceProp* prop) {
    struct Peak {
        const char* name;
        double bf16, fp32;
    };
    static const Peak peaks[] = {
        {"H100 PCIe", 756e12, 51e12}, {"H100 NVL", 835e12, 60e12}, {"H100", 989e12, 67e12}, {"H200", 989e12, 67e12},
        {"A100", 312e12, 19.5e12},    {"L40S", 362e12, 91.6e12},   {"L40", 181e12, 90.5e12}, {"L4", 121e12, 30.3e12},
    };
    bool fp32 = strcmp(PRECISION_NAME, "FP32") == 0;
    for (const Peak& p : peaks) {
        if (strstr(prop->name, p.name) != NULL) { return fp32 ? p.fp32 : p.bf16; }
    }
    return 0.0;
}

// The GPU the run uses (device 0). A machine without one, or with one too old for the bf16
// tensor-core kernels, gets one clear line and exit 1, before anything is read or written.
static cudaDeviceProp gpu_properties() {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        die("no CUDA GPU found (%s): train_moe_cpu trains the same model on the CPU",
            err != cudaSuccess ? cudaGetErrorString(err) : "no device");
    }
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    if (prop.major < 8) { die("%s has compute capability %d.%d: train_moe needs 8.0 or newer (Ampere, Hopper)", prop.name, prop.major, prop.minor); }
    return prop;
}

// ----------------------------------------------------------------------------
// the training loop

#ifndef TESTING
int main(int argc, char** argv) {
    TrainingRun run;
    parse_args(argc, argv, &run.args);
    cudaDeviceProp prop = gpu_properties();
    run_init(&run);
    printf("GPU engine, %s, on %s (sm_%d%d)\n", PRECISION_NAME, prop.name, prop.major, prop.minor);
    matmul_setup();
    Model model;
    model_init(&model, &run.config, run.params, run.B, run.T, (float)run.args.aux_loss, (float)run.args.z_loss, run.args.recompute != 0, run.args.expert_gemm);
    size_t P = model.num_params;
    std::vector<float> host_m(P, 0.0f), host_v(P, 0.0f);
    run_start(&run, host_m.data(), host_v.data(), P);
    model_upload_moments(&model, host_m.data(), host_v.data());
    routing_window_set(&model, run.routing_window);
    double peak = peak_flops(&prop);

    model.collect_stats = true;
    model.breakdown = run.breakdown.on ? &run.breakdown : NULL;
    run_catch_stop_signals();  // from here on, Ctrl-C or SIGTERM stops at the next step, with a checkpoint
    for (int step = run.start_step; step <= run.max_steps; step++) {
        if (run_checkpoint_due(&run, step)) {
            model_download(&model, run.params, host_m.data(), host_v.data());
            run_save_checkpoint(&run, step, run.params, host_m.data(), host_v.data(), P, routing_window_get(&model));
        }
        if (run_stop_due(&run, step)) { break; }
        if (run_validation_due(&run, step)) {
            float val = validation_loss(&model, &run.val, run.args.val_steps);
            printf("step %d | val loss %.6f\n", step, val);
            logger_val(&run.logger, step, val);
        }
        if (run_sample_due(&run, step)) { sample_text(&model, &run); }
        if (step == run.max_steps) { break; }

        double t0 = seconds_now();
        breakdown_begin_step(&run.breakdown);
        mark_backward(&model, PART_OPTIMIZER);
        model_zero_grad(&model);
        float scale = 1.0f / run.grad_accum;
        for (int micro = 0; micro < run.grad_accum; micro++) {
            dataloader_next_batch(&run.train);
            batch_upload_tokens(&model.batch, run.train.inputs, run.train.targets, run.B * run.T, model.stream);
            model_forward(&model, run.B, run.T, true, scale / (run.B * run.T));
            batch_upload_buckets(&model.batch, model.stream);  // sorted while the GPU runs the forward
            accumulate_losses(&model, scale);
            model_backward(&model, scale);
        }
        float lr = learning_rate_at(&run.schedule, step);
        model_update(&model, lr, &run.optimizer, run.adam_step_offset + step + 1);
        mark(&model, BREAKDOWN_END);
        float sums[NUM_SCALARS];
        read_step_scalars(&model, sums);
        breakdown_read_step(&model);
        run_print_step(&run, step + 1, sums[SCALAR_LOSS], sums[SCALAR_AUX], sums[SCALAR_Z], sqrtf(sums[SCALAR_NORM2]), lr,
                       seconds_now() - t0, peak);
        if (step == run.start_step) {
            size_t free_bytes, total_bytes;
            cudaCheck(cudaMemGetInfo(&free_bytes, &total_bytes));
            printf("peak memory %.2f GiB of %.2f GiB\n", (total_bytes - free_bytes) / 1073741824.0, total_bytes / 1073741824.0);
        }
        if (run_routing_report_due(&run, step + 1)) {
            run_routing_report_header(&run, step + 1);
            report_routing(&model, &run, step + 1);
        }
    }
    breakdown_print(&run.breakdown);
    run_free(&run);
    model_free(&model);
    matmul_teardown();
    free(run.params);
    return run_exit_status();
}
#endif
