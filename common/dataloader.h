/*
llm.c token shards (doc/formats.md): a 1024-byte header (magic 20240520, version 1, token
count n), then n uint16 tokens. A pattern (glob) names one or more shards, read in sorted
order. Each batch is a window of B*T+1 tokens: inputs are its first B*T, targets its last
B*T; the next window starts B*T further on. At the end of the last shard the loader starts
again at the first (a new epoch). Its position (shard, offset) is part of the resume state.
*/
#pragma once

#include <glob.h>
#include <string>
#include <vector>
#include "utils.h"

#define SHARD_MAGIC 20240520
#define SHARD_VERSION 1

// Reads and checks a shard's header; returns its token count.
static inline int64_t shard_token_count(const char* path) {
    int64_t size = file_size(path);
    if (size < 0) { die("%s: no such file", path); }
    if (size < 1024) { die("%s: truncated: %lld bytes, too small for the 1024-byte shard header", path, (long long)size); }
    int header[256];
    FILE* f = fopen_check(path, "rb");
    fread_check(header, sizeof(int), 256, f, path);
    fclose(f);
    if (header[0] != SHARD_MAGIC) { die("%s: bad magic %d, expected a token shard (magic %d)", path, header[0], SHARD_MAGIC); }
    if (header[1] != SHARD_VERSION) { die("%s: shard version %d, expected %d", path, header[1], SHARD_VERSION); }
    int64_t n = (uint32_t)header[2];
    if (size != 1024 + 2 * n) {
        die("%s: header says %lld tokens (%lld bytes) but the file holds %lld bytes", path, (long long)n,
            (long long)(1024 + 2 * n), (long long)size);
    }
    return n;
}

static inline void write_shard(const char* path, const uint16_t* tokens, int64_t n) {
    int header[256] = {0};
    header[0] = SHARD_MAGIC;
    header[1] = SHARD_VERSION;
    header[2] = (int)n;
    AtomicFile af = atomic_open(path);
    fwrite_check(header, sizeof(int), 256, af.f, path);
    fwrite_check(tokens, sizeof(uint16_t), (size_t)n, af.f, path);
    atomic_commit(af);
}

static inline bool glob_matches_nothing(const char* pattern) {
    glob_t g;
    int rc = glob(pattern, 0, NULL, &g);
    bool none = rc != 0 || g.gl_pathc == 0;
    if (rc == 0) { globfree(&g); }
    return none;
}

struct DataLoader {
    int B, T;
    int vocab_size;                   // every token must be below it
    std::vector<std::string> files;   // the shards, sorted
    std::vector<int64_t> shard_tokens;
    int64_t num_batches;              // windows in one pass over all shards
    int shard_index;                  // where the next window starts
    int64_t position;                 // in tokens, within the shard
    FILE* file;                       // the open shard
    uint16_t* window;                 // (B*T+1)
    int* inputs;                      // (B*T)
    int* targets;                     // (B*T)
};

static inline void dataloader_open_shard(DataLoader* dl, int index) {
    if (dl->file) { fclose(dl->file); }
    dl->shard_index = index;
    dl->file = fopen_check(dl->files[index].c_str(), "rb");
}

static inline void dataloader_init(DataLoader* dl, const char* pattern, int B, int T, int vocab_size) {
    dl->B = B;
    dl->T = T;
    dl->vocab_size = vocab_size;
    dl->file = NULL;
    glob_t g;
    int rc = glob(pattern, 0, NULL, &g);
    if (rc != 0 || g.gl_pathc == 0) {
        if (rc == 0) { globfree(&g); }
        die("no data file matches %s (prepare data with dev/data/prepare.py, or see -i / -j in -h)", pattern);
    }
    for (size_t i = 0; i < g.gl_pathc; i++) { dl->files.push_back(g.gl_pathv[i]); }
    globfree(&g);
    int64_t window = (int64_t)B * T + 1;
    dl->num_batches = 0;
    for (const std::string& path : dl->files) {
        int64_t n = shard_token_count(path.c_str());
        if (n < window) {
            die("%s: holds %lld tokens, fewer than one batch window of B*T+1 = %lld tokens (B=%d, T=%d)",
                path.c_str(), (long long)n, (long long)window, B, T);
        }
        dl->shard_tokens.push_back(n);
        dl->num_batches += (n - 1) / ((int64_t)B * T);
    }
    dl->window = (uint16_t*)malloc_check(window * sizeof(uint16_t));
    dl->inputs = (int*)malloc_check((size_t)B * T * sizeof(int));
    dl->targets = (int*)malloc_check((size_t)B * T * sizeof(int));
    dl->position = 0;
    dataloader_open_shard(dl, 0);
}

// continue from a saved position (resume)
static inline void dataloader_seek(DataLoader* dl, int shard_index, int64_t position) {
    if (shard_index < 0 || shard_index >= (int)dl->files.size() || position < 0 ||
        position > dl->shard_tokens[shard_index]) {
        die("resume state points at shard %d position %lld, but the data has %zu shards", shard_index,
            (long long)position, dl->files.size());
    }
    dataloader_open_shard(dl, shard_index);
    dl->position = position;
}

static inline void dataloader_reset(DataLoader* dl) { dataloader_seek(dl, 0, 0); }

static inline void dataloader_next_batch(DataLoader* dl) {
    int64_t BT = (int64_t)dl->B * dl->T;
    if (dl->position + BT + 1 > dl->shard_tokens[dl->shard_index]) {
        dataloader_open_shard(dl, (dl->shard_index + 1) % (int)dl->files.size());
        dl->position = 0;
    }
    const char* path = dl->files[dl->shard_index].c_str();
    if (fseek(dl->file, 1024 + dl->position * 2, SEEK_SET) != 0) { die("%s: seek failed", path); }
    fread_check(dl->window, sizeof(uint16_t), (size_t)BT + 1, dl->file, path);
    for (int64_t i = 0; i <= BT; i++) {
        if (dl->window[i] >= dl->vocab_size) {
            die("%s: token %d at position %lld is not below the model's vocabulary size V=%d", path,
                dl->window[i], (long long)(dl->position + i), dl->vocab_size);
        }
    }
    for (int64_t i = 0; i < BT; i++) {
        dl->inputs[i] = dl->window[i];
        dl->targets[i] = dl->window[i + 1];
    }
    dl->position += BT;
}

static inline void dataloader_free(DataLoader* dl) {
    if (dl->file) { fclose(dl->file); }
    free(dl->window);
    free(dl->inputs);
    free(dl->targets);
}
