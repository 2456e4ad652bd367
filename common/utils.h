/*
Checked system calls and small helpers shared by every program of the engine.

Every call that can fail is wrapped once here and reports what it was doing, with the file
and line of the caller: `fopen_check`, `fread_check`, `fwrite_check`, `malloc_check`, ...
An error is one line on stderr starting with "error: " and exit status 1; nothing in the
engine aborts with a signal on bad input. No CUDA in this file: both engines include it.
*/
#pragma once

#include <cerrno>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <sys/stat.h>
#include <unistd.h>

// ----------------------------------------------------------------------------
// errors

[[noreturn]] static inline void die(const char* fmt, ...) {
    fflush(stdout);
    fprintf(stderr, "error: ");
    va_list args;
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fprintf(stderr, "\n");
    exit(1);
}

static inline void warn(const char* fmt, ...) {
    fflush(stdout);
    fprintf(stderr, "warning: ");
    va_list args;
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fprintf(stderr, "\n");
}

// ----------------------------------------------------------------------------
// checked file I/O

static inline FILE* fopen_check_(const char* path, const char* mode, const char* file, int line) {
    FILE* f = fopen(path, mode);
    if (f == NULL) {
        die("cannot open %s (mode %s): %s [%s:%d]", path, mode, strerror(errno), file, line);
    }
    return f;
}
#define fopen_check(path, mode) fopen_check_(path, mode, __FILE__, __LINE__)

static inline void fread_check_(void* dst, size_t size, size_t count, FILE* f, const char* what,
                                const char* file, int line) {
    size_t got = fread(dst, size, count, f);
    if (got != count) {
        die("%s: expected to read %zu items of %zu bytes, got %zu (%s) [%s:%d]", what, count,
            size, got, feof(f) ? "end of file" : "read error", file, line);
    }
}
#define fread_check(dst, size, count, f, what) fread_check_(dst, size, count, f, what, __FILE__, __LINE__)

static inline void fwrite_check_(const void* src, size_t size, size_t count, FILE* f,
                                 const char* what, const char* file, int line) {
    size_t put = fwrite(src, size, count, f);
    if (put != count) {
        die("%s: wrote %zu of %zu items: %s [%s:%d]", what, put, count, strerror(errno), file, line);
    }
}
#define fwrite_check(src, size, count, f, what) fwrite_check_(src, size, count, f, what, __FILE__, __LINE__)

static inline void fclose_check_(FILE* f, const char* what, const char* file, int line) {
    if (fclose(f) != 0) { die("%s: close failed: %s [%s:%d]", what, strerror(errno), file, line); }
}
#define fclose_check(f, what) fclose_check_(f, what, __FILE__, __LINE__)

static inline void* malloc_check_(size_t size, const char* file, int line) {
    void* p = malloc(size > 0 ? size : 1);
    if (p == NULL) { die("out of memory allocating %zu bytes [%s:%d]", size, file, line); }
    return p;
}
#define malloc_check(size) malloc_check_(size, __FILE__, __LINE__)

static inline void* calloc_check_(size_t count, size_t size, const char* file, int line) {
    void* p = calloc(count > 0 ? count : 1, size > 0 ? size : 1);
    if (p == NULL) { die("out of memory allocating %zu x %zu bytes [%s:%d]", count, size, file, line); }
    return p;
}
#define calloc_check(count, size) calloc_check_(count, size, __FILE__, __LINE__)

static inline bool file_exists(const char* path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

// size of a regular file in bytes, or -1 when it does not exist
static inline int64_t file_size(const char* path) {
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) { return -1; }
    return (int64_t)st.st_size;
}

static inline void make_dir(const char* path) {
    struct stat st;
    if (stat(path, &st) == 0) {
        if (!S_ISDIR(st.st_mode)) { die("%s exists and is not a directory", path); }
        return;
    }
    if (mkdir(path, 0755) != 0 && errno != EEXIST) {
        die("cannot create directory %s: %s", path, strerror(errno));
    }
}

// Atomic file writing: everything goes to "path.tmp", which replaces "path" only once it is
// complete and flushed to disk. A crash leaves the old file or the new one, never half.
struct AtomicFile {
    FILE* f;
    std::string path;
    std::string tmp_path;
};

static inline AtomicFile atomic_open(const char* path) {
    AtomicFile af;
    af.path = path;
    af.tmp_path = std::string(path) + ".tmp";
    af.f = fopen_check(af.tmp_path.c_str(), "wb");
    return af;
}

static inline void atomic_commit(AtomicFile& af) {
    if (fflush(af.f) != 0 || fsync(fileno(af.f)) != 0) {
        die("%s: flush failed: %s", af.tmp_path.c_str(), strerror(errno));
    }
    fclose_check(af.f, af.tmp_path.c_str());
    if (rename(af.tmp_path.c_str(), af.path.c_str()) != 0) {
        die("cannot rename %s to %s: %s", af.tmp_path.c_str(), af.path.c_str(), strerror(errno));
    }
    af.f = NULL;
}

// ----------------------------------------------------------------------------
// checksums and number formats

// 64-bit FNV-1a, continued from `hash` (start with FNV_OFFSET)
static const uint64_t FNV_OFFSET = 0xcbf29ce484222325ULL;
static inline uint64_t fnv1a(uint64_t hash, const void* data, size_t bytes) {
    const unsigned char* p = (const unsigned char*)data;
    for (size_t i = 0; i < bytes; i++) {
        hash ^= p[i];
        hash *= 0x100000001b3ULL;
    }
    return hash;
}

// header slots hold 32-bit words; wider values are split low word first
static inline void put_u64(int* header, int slot, uint64_t value) {
    header[slot] = (int)(uint32_t)(value & 0xffffffffu);
    header[slot + 1] = (int)(uint32_t)(value >> 32);
}
static inline uint64_t get_u64(const int* header, int slot) {
    return (uint64_t)(uint32_t)header[slot] | ((uint64_t)(uint32_t)header[slot + 1] << 32);
}
static inline int float_bits(float x) { int i; memcpy(&i, &x, 4); return i; }
static inline float bits_float(int i) { float x; memcpy(&x, &i, 4); return x; }

// bf16 is the upper half of an fp32
static inline float bf16_to_float(uint16_t b) { return bits_float((int)((uint32_t)b << 16)); }

// ceil(a / b) for positive integers
static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
