/* Shared helpers of the umm benchmark programs (the .c files beside it; header only).
 *
 * Every program prints its results as one line of `key=value` pairs starting with "RESULT",
 * and exits 0; on any error it prints "FAIL <what>" and exits 1. Contents of memory images are
 * a pure function of (seed, address), so restorers check what they read without the original.
 * Compiled by umm-bench at run time with `cc -O2 -pthread`.
 */
#ifndef UMM_BENCH_H
#define UMM_BENCH_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define KIB 1024UL
#define MIB (1024UL * 1024UL)

__attribute__((format(printf, 1, 2), noreturn)) static void fail(const char *fmt, ...)
{
    char buf[1024];
    int n = snprintf(buf, sizeof buf, "FAIL [%d] ", (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t w = write(1, buf, (size_t)n);
    (void)w;
    _exit(1);
}

/* One line straight to fd 1 (no stdio buffers to duplicate across fork). */
__attribute__((format(printf, 1, 2))) static void say(const char *fmt, ...)
{
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t w = write(1, buf, (size_t)n);
    (void)w;
}

static inline uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

/* splitmix64 finalizer. */
static inline uint64_t mix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* The word an image holds at `addr` (8-aligned) for `seed`: never 0. */
static inline uint64_t pattern(uint64_t seed, uint64_t addr)
{
    return mix64(seed * 0x100000001B3ULL ^ mix64(addr / 8)) | 1;
}

static uint64_t rng_state = 1;
static inline uint64_t rnd(void)
{
    rng_state += 0x9E3779B97F4A7C15ULL;
    return mix64(rng_state);
}

/* A random permutation of 0..n-1 (Fisher-Yates, deterministic for a given rng_state). */
__attribute__((unused)) static uint32_t *permutation(uint64_t n)
{
    uint32_t *p = malloc(n * sizeof *p);
    if (!p)
        fail("malloc permutation");
    for (uint64_t i = 0; i < n; i++)
        p[i] = (uint32_t)i;
    for (uint64_t i = n - 1; i > 0; i--) {
        uint64_t j = rnd() % (i + 1);
        uint32_t t = p[i];
        p[i] = p[j];
        p[j] = t;
    }
    return p;
}

static uint64_t parse_u64(const char *s, const char *what)
{
    char *end;
    errno = 0;
    uint64_t v = strtoull(s, &end, 0);
    if (errno || *end || end == s)
        fail("bad %s: %s", what, s);
    return v;
}

/* Is the page at `addr` present (pagemap bit 63)? `fd` is /proc/self/pagemap. */
static inline int present(int fd, uint64_t addr)
{
    uint64_t e;
    if (pread(fd, &e, 8, (off_t)(addr / PAGE * 8)) != 8)
        fail("pread pagemap: %s", strerror(errno));
    return (int)(e >> 63);
}

/* How many of the `npages` pages from `addr` are present (one pagemap read per 64k pages). */
__attribute__((unused)) static uint64_t count_present(int fd, uint64_t addr, uint64_t npages)
{
    static uint64_t ent[65536];
    uint64_t n = 0;
    for (uint64_t i = 0; i < npages; i += 65536) {
        uint64_t k = npages - i < 65536 ? npages - i : 65536;
        if (pread(fd, ent, k * 8, (off_t)((addr / PAGE + i) * 8)) != (ssize_t)(k * 8))
            fail("pread pagemap: %s", strerror(errno));
        for (uint64_t j = 0; j < k; j++)
            n += ent[j] >> 63;
    }
    return n;
}

/* Is the VMA holding `addr` registered with a userfaultfd (`um` in VmFlags)? */
__attribute__((unused)) static int registered(uint64_t addr)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f)
        fail("open smaps: %s", strerror(errno));
    char line[512];
    int in = 0, um = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long s, e;
        if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            in = addr >= s && addr < e;
            continue;
        }
        if (in && strncmp(line, "VmFlags:", 8) == 0) {
            um = strstr(line, " um") != NULL;
            break;
        }
    }
    fclose(f);
    return um;
}

/* Write `n` latencies (nanoseconds) to `path`, one per line. */
__attribute__((unused)) static void write_latencies(const char *path, const uint32_t *lat, uint64_t n)
{
    FILE *f = fopen(path, "w");
    if (!f)
        fail("create %s: %s", path, strerror(errno));
    for (uint64_t i = 0; i < n; i++)
        fprintf(f, "%u\n", lat[i]);
    if (fclose(f) != 0)
        fail("write %s", path);
}

static inline uint32_t clamp32(uint64_t v)
{
    return v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
}

#endif
