/*
llm.c's GPT-2 tokenizer file, for decoding sampled tokens (doc/formats.md): a 1024-byte header
(magic 20240328, version 2, vocabulary size, end-of-text token), then each token's bytes as a
uint8 length and the bytes. A missing file only costs the decoding: samples print as ids.
*/
#pragma once

#include <cctype>
#include <string>
#include <vector>
#include "utils.h"

#define TOKENIZER_MAGIC 20240328

struct Tokenizer {
    bool loaded;
    int vocab_size;
    int eot_token;
    std::vector<std::string> pieces;
};

static inline void tokenizer_init(Tokenizer* tok, const char* path) {
    tok->loaded = false;
    tok->vocab_size = 0;
    tok->eot_token = 50256;
    if (!file_exists(path)) {
        warn("no tokenizer file %s: samples will print as token ids (dev/data/prepare.py writes it)", path);
        return;
    }
    int64_t size = file_size(path);
    if (size < 1024) { die("%s: truncated: %lld bytes, too small for the 1024-byte tokenizer header", path, (long long)size); }
    FILE* f = fopen_check(path, "rb");
    int header[256];
    fread_check(header, sizeof(int), 256, f, path);
    if (header[0] != TOKENIZER_MAGIC) { die("%s: bad magic %d, expected a tokenizer file (magic %d)", path, header[0], TOKENIZER_MAGIC); }
    if (header[1] != 2) { die("%s: tokenizer version %d, expected 2", path, header[1]); }
    if (header[2] < 1 || header[2] > (1 << 22)) { die("%s: vocabulary size %d is out of range", path, header[2]); }
    tok->vocab_size = header[2];
    tok->eot_token = header[3];
    tok->pieces.resize(tok->vocab_size);
    for (int i = 0; i < tok->vocab_size; i++) {
        unsigned char len;
        fread_check(&len, 1, 1, f, path);
        std::string piece(len, '\0');
        if (len > 0) { fread_check(&piece[0], 1, len, f, path); }
        tok->pieces[i] = piece;
    }
    fclose(f);
    tok->loaded = true;
}

// prints a token's text, or <id> for what cannot be shown (control bytes, unknown ids)
static inline void tokenizer_print(const Tokenizer* tok, int id) {
    if (!tok->loaded || id < 0 || id >= tok->vocab_size) {
        printf("<%d>", id);
        return;
    }
    const std::string& s = tok->pieces[id];
    if (s.size() == 1 && !isprint((unsigned char)s[0]) && !isspace((unsigned char)s[0])) {
        printf("<%d>", id);
        return;
    }
    fwrite(s.data(), 1, s.size(), stdout);
}
