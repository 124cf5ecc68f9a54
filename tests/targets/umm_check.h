/* Shared helpers of the umm test targets (header only; each target is one .c file).
 *
 * Every target prints exactly one line on success:
 *     OK <name> checksum=<hex> [key=value ...]
 * and exits 0, or prints "FAIL <name>: <what mismatched>" and exits 1.
 *
 * Common keys:
 *   min_served=N    pages that were missing in their address space when the program (or the
 *                   kernel on its behalf) first touched them, inside regions the program mapped
 *                   itself. If umm registered those regions, each of these pages had to be
 *                   installed by the manager (UFFDIO_COPY / ZEROPAGE), so the manager's
 *                   `pages_served` must be at least N. Without umm nobody counts them.
 *   registered=K/N  of N checks, K found the region's VMA registered with a userfaultfd for
 *                   missing faults (`um` in VmFlags of /proc/self/smaps, the kernel's own view).
 *                   Natively K is 0; under umm K must equal N.
 */
#ifndef UMM_CHECK_H
#define UMM_CHECK_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS_PER_PAGE (PAGE / sizeof(uint64_t))

static const char *umm_target_name = "target";

/* Print a failure line straight to fd 1 (safe in threads and forked children) and exit 1. */
__attribute__((format(printf, 1, 2), noreturn)) static void fail(const char *fmt, ...)
{
    char buf[1024];
    int n = snprintf(buf, sizeof buf, "FAIL %s[%d]: ", umm_target_name, (int)getpid());
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

/* splitmix64 finalizer: a cheap, well-mixed deterministic function. */
static inline uint64_t mix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* The value a program stores at word `idx` under `seed`; never 0, so it can't pass for zero-fill. */
static inline uint64_t pattern(uint64_t seed, uint64_t idx)
{
    return mix64(seed * 0x100000001B3ULL ^ mix64(idx)) | 1;
}

static inline uint64_t ck_add(uint64_t h, uint64_t v)
{
    return mix64(h ^ v) + 0x632BE59BD9B4E019ULL;
}

static void *map_anon(size_t len, int prot)
{
    void *p = mmap(NULL, len, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        fail("mmap(%zu) failed: %s", len, strerror(errno));
    return p;
}

__attribute__((unused)) static void unmap(void *p, size_t len)
{
    if (munmap(p, len) != 0)
        fail("munmap(%p, %zu) failed: %s", p, len, strerror(errno));
}

/* Fill `pages` pages at `p` with pattern(seed, page_index_base + i). */
__attribute__((unused)) static void fill_pages(void *p, size_t pages, uint64_t seed, uint64_t base)
{
    uint64_t *w = p;
    for (size_t i = 0; i < pages * WORDS_PER_PAGE; i++)
        w[i] = pattern(seed, base * WORDS_PER_PAGE + i);
}

/* Verify a fill_pages() pattern; returns a checksum of the range. */
__attribute__((unused)) static uint64_t check_pages(const void *p, size_t pages, uint64_t seed, uint64_t base, const char *what)
{
    const uint64_t *w = p;
    uint64_t h = 0;
    for (size_t i = 0; i < pages * WORDS_PER_PAGE; i++) {
        uint64_t want = pattern(seed, base * WORDS_PER_PAGE + i);
        if (w[i] != want)
            fail("%s: word %zu (page %zu) = %016llx, want %016llx", what, i, i / WORDS_PER_PAGE,
                 (unsigned long long)w[i], (unsigned long long)want);
        if ((i & 63) == 0)
            h = ck_add(h, w[i]);
    }
    return h;
}

/* Verify that `pages` pages read as zero (a read of a missing page faults it in). */
__attribute__((unused)) static void check_zero(const void *p, size_t pages, const char *what)
{
    const uint64_t *w = p;
    for (size_t i = 0; i < pages * WORDS_PER_PAGE; i++)
        if (w[i] != 0)
            fail("%s: word %zu (page %zu) = %016llx, want 0 (stale or foreign data)", what, i,
                 i / WORDS_PER_PAGE, (unsigned long long)w[i]);
}

/* Read a whole (proc) file into a malloc'd, NUL-terminated buffer. */
static char *read_file(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail("open %s: %s", path, strerror(errno));
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    if (!buf)
        fail("malloc");
    for (;;) {
        if (cap - len < 4096) {
            cap *= 2;
            buf = realloc(buf, cap);
            if (!buf)
                fail("realloc");
        }
        ssize_t n = read(fd, buf + len, cap - len - 1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail("read %s: %s", path, strerror(errno));
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = 0;
    return buf;
}

/* 1 if the VMA containing addr has `flag` in its VmFlags, 0 if not, -1 if no VMA contains it. */
static int vma_has_flag(const void *addr, const char *flag)
{
    char *smaps = read_file("/proc/self/smaps");
    uintptr_t a = (uintptr_t)addr;
    int in_vma = 0, found = -1;
    size_t flen = strlen(flag);
    for (char *line = smaps; line && *line;) {
        char *next = strchr(line, '\n');
        if (next)
            *next++ = 0;
        unsigned long start, end;
        char dash;
        if (sscanf(line, "%lx%c%lx ", &start, &dash, &end) == 3 && dash == '-') {
            in_vma = a >= start && a < end;
        } else if (in_vma && strncmp(line, "VmFlags:", 8) == 0) {
            found = 0;
            for (char *t = strtok(line + 8, " \t"); t; t = strtok(NULL, " \t"))
                if (strlen(t) == flen && memcmp(t, flag, flen) == 0)
                    found = 1;
            break;
        }
        line = next;
    }
    free(smaps);
    return found;
}

static int um_checked, um_registered;
static char um_missing[512]; /* labels of the checks that found no registration */

/* Record whether the region at addr is registered for missing faults (use um_check()). */
__attribute__((unused)) static void um_check_at(const void *addr, const char *label)
{
    int r = vma_has_flag(addr, "um");
    if (r < 0)
        fail("um_check: no VMA contains %p (%s)", addr, label);
    um_checked++;
    um_registered += r;
    if (!r) {
        size_t n = strlen(um_missing);
        snprintf(um_missing + n, sizeof um_missing - n, "%s%s", n ? "," : "", label);
    }
}
#define um_check(addr) um_check_at((addr), #addr)

/* "" when every check found a registration, else " unregistered=<labels>" (no spaces inside). */
__attribute__((unused)) static const char *um_missing_field(void)
{
    static char buf[sizeof um_missing + 16];
    if (!um_missing[0])
        return "";
    snprintf(buf, sizeof buf, " unregistered=%s", um_missing);
    for (char *c = buf + 1; *c; c++)
        if (*c == ' ')
            *c = '_';
    return buf;
}

#endif
