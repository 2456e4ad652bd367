/*
Counter-based random numbers (doc/upcycling.md, "The random numbers").

A draw is a pure function of (seed, stream, counter): no state advances, so the same element
gets the same value whatever order, thread or machine computes it. The CPU twin, the GPU
engine and the PyTorch reference (numpy) implement the same three lines and build
bit-identical models from one seed.
*/
#pragma once

#include <cmath>
#include <cstdint>

// splitmix64's finaliser: a bijection on 64-bit words with full avalanche
static inline uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static inline uint64_t random_u64(uint64_t seed, uint64_t stream, uint64_t i) {
    return mix64(mix64(seed ^ mix64(stream)) ^ i);
}

// uniform in [0, 1) with 53 random bits
static inline double random_uniform(uint64_t seed, uint64_t stream, uint64_t i) {
    return (double)(random_u64(seed, stream, i) >> 11) * 0x1.0p-53;
}

// standard normal by Box-Muller from counters 2i and 2i+1, in double
static inline double random_normal(uint64_t seed, uint64_t stream, uint64_t i) {
    double u1 = 1.0 - (double)(random_u64(seed, stream, 2 * i) >> 11) * 0x1.0p-53;  // (0, 1]
    double u2 = (double)(random_u64(seed, stream, 2 * i + 1) >> 11) * 0x1.0p-53;    // [0, 1)
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

// what a stream of draws is for (doc/upcycling.md's table)
enum RandomPurpose {
    RNG_ROUTER = 1,        // router rows, one per virtual group
    RNG_UNIT_SET = 2,      // keys choosing the hidden units to re-draw or perturb
    RNG_DROP_VALUES = 3,   // Drop-Upcycling's re-initialised values
    RNG_NOISE_VALUES = 4,  // noise upcycling's perturbations
    RNG_SAMPLER = 5,       // text sampling during training
    RNG_SCRATCH = 6,       // GPT-2 initialisation of a whole parameter tensor
};

static inline uint64_t rng_stream(uint64_t purpose, uint64_t layer, uint64_t expert, uint64_t which) {
    return (purpose << 56) | (layer << 40) | (expert << 24) | which;
}
