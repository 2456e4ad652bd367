/*
What the kernel studies in dev/cuda share: the CPU twin's functions as the reference (namespace
cpu, the very code train_moe_cpu runs), random inputs, comparison with a tolerance that depends
on the precision, and timing with CUDA events (the median of many runs).

A study prints one line per check, "PASS name: detail" or "FAIL name: detail", then timings;
its exit status is the number of failures. dev/cuda/run_all.sh runs them all.
*/
#pragma once

// the CPU twin, as the reference: its standard and host headers first, so that the include
// inside the namespace only adds the twin's own functions
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <time.h>
#include "../../common/args.h"
#include "../../common/checkpoint.h"
#include "../../common/dataloader.h"
#include "../../common/logger.h"
#include "../../common/model_config.h"
#include "../../common/model_setup.h"
#include "../../common/rng.h"
#include "../../common/schedule.h"
#include "../../common/tokenizer.h"
#include "../../common/train_state.h"
#include "../../common/training.h"
#include "../../common/upcycle.h"
#include "../../common/utils.h"
#define TESTING
namespace cpu {
#include "../../train_moe_cpu.cpp"
}
#undef TESTING

#include "../../kernels/common.cuh"

static int dev_failures = 0;

// A study's command line, `STUDY [version] [--quick]`: returns the version to run (0: all of
// 1..versions) and sets quick (the small shapes only, no timing); prints the study's first line.
static inline int study_start(int argc, char** argv, const char* study, int versions, bool* quick) {
    int only = argc > 1 ? atoi(argv[1]) : 0;
    *quick = argc > 2 && strcmp(argv[2], "--quick") == 0;
    if (only < 0 || only > versions) { die("%s: version %d does not exist (1..%d, or 0 for all)", study, only, versions); }
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("%s study on %s, %s\n", study, prop.name, PRECISION_NAME);
    return only;
}

// n values from N(0, std^2), deterministic in seed
static inline std::vector<float> random_vector(size_t n, uint64_t seed, float std = 1.0f) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++) { v[i] = (float)(std * random_normal(seed, 77, i)); }
    return v;
}

// the values as floatX would hold them (bf16 rounds), so that the CPU reference sees the same inputs
static inline std::vector<float> round_to_floatX(const std::vector<float>& v) {
    std::vector<float> r(v.size());
    for (size_t i = 0; i < v.size(); i++) {
#if defined(ENABLE_FP32)
        r[i] = v[i];
#else
        r[i] = __bfloat162float(__float2bfloat16(v[i]));
#endif
    }
    return r;
}

template <typename T>
static inline T* to_device(const std::vector<float>& v) {
    std::vector<T> host(v.size());
    for (size_t i = 0; i < v.size(); i++) { host[i] = (T)v[i]; }
    T* d = cuda_malloc<T>(v.size());
    cudaCheck(cudaMemcpy(d, host.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

template <typename T>
static inline std::vector<float> to_host(const T* d, size_t n) {
    std::vector<T> host(n);
    cudaCheck(cudaMemcpy(host.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++) { v[i] = (float)host[i]; }
    return v;
}

// max |gpu - ref| / max |ref|, the error on the reference's scale
static inline bool check_close(const char* name, const std::vector<float>& gpu, const std::vector<float>& ref, double tol_fp32,
                               double tol_bf16) {
#if defined(ENABLE_FP32)
    double tol = tol_fp32;
#else
    double tol = tol_bf16;
#endif
    double max_diff = 0.0, max_ref = 0.0;
    size_t worst = 0;
    bool finite = true;
    for (size_t i = 0; i < ref.size(); i++) {
        finite &= std::isfinite(gpu[i]);
        double d = fabs((double)gpu[i] - ref[i]);
        if (d > max_diff) { max_diff = d; worst = i; }
        max_ref = std::max(max_ref, fabs((double)ref[i]));
    }
    double err = max_ref > 0 ? max_diff / max_ref : max_diff;
    bool ok = finite && gpu.size() == ref.size() && err <= tol;
    printf("%s %s: scaled error %.2e (tolerance %.0e, %s), worst at %zu: %g vs %g\n", ok ? "PASS" : "FAIL", name, err, tol,
           PRECISION_NAME, worst, ref.empty() ? 0.0 : gpu[worst], ref.empty() ? 0.0 : ref[worst]);
    if (!ok) { dev_failures++; }
    return ok;
}

static inline bool check_true(const char* name, bool ok, const char* detail) {
    printf("%s %s: %s\n", ok ? "PASS" : "FAIL", name, detail);
    if (!ok) { dev_failures++; }
    return ok;
}

// median time of `repeats` runs of f (after 3 warm-ups), in milliseconds, measured with events
template <typename F>
static inline float benchmark_ms(int repeats, F f) {
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    for (int i = 0; i < 3; i++) { f(); }
    std::vector<float> times(repeats);
    for (int i = 0; i < repeats; i++) {
        cudaCheck(cudaEventRecord(start));
        f();
        cudaCheck(cudaEventRecord(stop));
        cudaCheck(cudaEventSynchronize(stop));
        cudaCheck(cudaEventElapsedTime(&times[i], start, stop));
    }
    std::sort(times.begin(), times.end());
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    return times[repeats / 2];
}
