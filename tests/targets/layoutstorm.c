/* layoutstorm: every kind of layout change a manager must follow, with data verification.
 *
 * Each round:
 *  A. mremap move onto a reservation (MREMAP_MAYMOVE|MREMAP_FIXED): data moves, untouched
 *     pages read zero at the new place, the old place is gone.
 *  B. grow in place (mremap without MAYMOVE into a hole made by munmap): old data stays, the
 *     new tail reads zero.
 *  C. grow by moving (the page after the range is mapped): data moves, tail reads zero, the
 *     page left behind keeps its data.
 *  D. MREMAP_DONTUNMAP: the new range holds the data, the old range reads zero.
 *  E. MADV_DONTNEED on pages that were served by a read and on pages that were written: they
 *     must read zero afterwards, never stale; MADV_FREE: each page is either old or zero.
 *  F. munmap of chunks of a region while 4 threads keep faulting (and MADV_DONTNEED-ing)
 *     their own chunks of the same region.
 *  G. mprotect splits a range (PROT_READ in the middle); reads and writes around it; then
 *     back to read-write.
 *
 * usage: layoutstorm [rounds=8]
 * Extra keys: remaps= removes= unmaps= count the calls this program made on ranges it mapped
 * itself that raise UFFD_EVENT_REMAP / REMOVE / UNMAP on a registered range.
 */
#include "umm_check.h"
#include <pthread.h>
#include <sched.h>

#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif

#define N 64 /* pages per range */
#define RW (PROT_READ | PROT_WRITE)

static uint64_t h;
static long min_served, remaps, removes, unmaps;
static long round_no; /* which stage samples its registration this round: round_no % 4 */

static int is_mapped(void *p)
{
    return msync(p, PAGE, MS_ASYNC) == 0 || errno != ENOMEM;
}

static void *xmremap(void *old, size_t oldlen, size_t newlen, int flags, void *newaddr, const char *what)
{
    void *r = mremap(old, oldlen, newlen, flags, newaddr);
    if (r == MAP_FAILED)
        fail("%s: mremap: %s", what, strerror(errno));
    return r;
}

static void xmadvise(void *p, size_t len, int advice, const char *what)
{
    if (madvise(p, len, advice) != 0)
        fail("%s: madvise: %s", what, strerror(errno));
    removes++;
}

static void stage_a(uint64_t s)
{
    uint8_t *a = map_anon(N * PAGE, RW);
    fill_pages(a, N / 2, s, 0);
    min_served += N / 2;
    uint8_t *b = map_anon(N * PAGE, PROT_NONE); /* reservation, destination */
    uint8_t *c = xmremap(a, N * PAGE, N * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, b, "A move");
    remaps++;
    if (c != b)
        fail("A: mremap FIXED returned %p, want %p", (void *)c, (void *)b);
    if (is_mapped(a))
        fail("A: old range still mapped after the move");
    h = ck_add(h, check_pages(c, N / 2, s, 0, "A: moved data"));
    check_zero(c + N / 2 * PAGE, N / 2, "A: untouched half after move");
    fill_pages(c + N / 2 * PAGE, N / 2, s + 1, 0);
    h = ck_add(h, check_pages(c + N / 2 * PAGE, N / 2, s + 1, 0, "A: written after move"));
    if (round_no % 4 == 0)
        um_check_at(c, "A:moved");
    unmap(c, N * PAGE);
    unmaps++;
}

static void stage_b(uint64_t s)
{
    uint8_t *a = map_anon(2 * N * PAGE, RW);
    unmap(a + N * PAGE, N * PAGE);
    unmaps++;
    fill_pages(a, N, s, 0);
    min_served += N;
    uint8_t *r = xmremap(a, N * PAGE, 2 * N * PAGE, 0, NULL, "B grow in place");
    if (r != a)
        fail("B: grow in place moved the range");
    h = ck_add(h, check_pages(a, N, s, 0, "B: data after growing"));
    check_zero(a + N * PAGE, N, "B: grown tail");
    fill_pages(a + N * PAGE, N, s + 1, 0);
    h = ck_add(h, check_pages(a + N * PAGE, N, s + 1, 0, "B: tail written"));
    h = ck_add(h, check_pages(a, N, s, 0, "B: head after tail written"));
    unmap(a, 2 * N * PAGE);
    unmaps++;
}

static void stage_c(uint64_t s)
{
    uint8_t *a = map_anon((N + 1) * PAGE, RW);
    fill_pages(a, N + 1, s, 0);
    min_served += N + 1;
    uint8_t *r = xmremap(a, N * PAGE, 2 * N * PAGE, MREMAP_MAYMOVE, NULL, "C grow by moving");
    remaps++;
    if (r == a)
        fail("C: range grew in place although the next page is mapped");
    h = ck_add(h, check_pages(r, N, s, 0, "C: moved data"));
    check_zero(r + N * PAGE, N, "C: grown tail");
    fill_pages(r + N * PAGE, N, s + 2, 0);
    h = ck_add(h, check_pages(r + N * PAGE, N, s + 2, 0, "C: tail written"));
    h = ck_add(h, check_pages(a + N * PAGE, 1, s, N, "C: page left behind"));
    if (round_no % 4 == 1)
        um_check_at(r + N * PAGE, "C:grown-tail");
    unmap(r, 2 * N * PAGE);
    unmap(a + N * PAGE, PAGE);
    unmaps += 2;
}

static void stage_d(uint64_t s)
{
    uint8_t *a = map_anon(N * PAGE, RW);
    fill_pages(a, N, s, 0);
    min_served += N;
    uint8_t *r = xmremap(a, N * PAGE, N * PAGE, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, NULL, "D dontunmap");
    /* no remaps++: MREMAP_DONTUNMAP raises no event on this kernel (DESIGN.md) */
    if (r == a)
        fail("D: DONTUNMAP did not move");
    h = ck_add(h, check_pages(r, N, s, 0, "D: data at the new place"));
    check_zero(a, N, "D: old range after MREMAP_DONTUNMAP");
    fill_pages(a, N, s + 3, 0);
    h = ck_add(h, check_pages(a, N, s + 3, 0, "D: old range rewritten"));
    h = ck_add(h, check_pages(r, N, s, 0, "D: new range after old was rewritten"));
    unmap(r, N * PAGE);
    unmap(a, N * PAGE);
    unmaps++; /* r is a plain moved range; a's registration after DONTUNMAP is not assumed */
}

static void stage_e(uint64_t s)
{
    uint8_t *a = map_anon(N * PAGE, RW);
    check_zero(a, N / 4, "E: first quarter, read-faulted");
    fill_pages(a + N / 4 * PAGE, N - N / 4, s, N / 4);
    min_served += N;
    /* every other 4-page chunk, in both the read-only-served and the written part */
    for (size_t c = 0; c < N / 4; c += 2)
        xmadvise(a + c * 4 * PAGE, 4 * PAGE, MADV_DONTNEED, "E dontneed chunk");
    for (size_t c = 0; c < N / 4; c++) {
        uint8_t *p = a + c * 4 * PAGE;
        if (c % 2 == 0) {
            check_zero(p, 4, "E: page after MADV_DONTNEED (must never be stale)");
            min_served += 4;
        } else if (c * 4 >= N / 4) {
            h = ck_add(h, check_pages(p, 4, s, c * 4, "E: page next to a MADV_DONTNEED chunk"));
        } else {
            check_zero(p, 4, "E: read-served page next to a MADV_DONTNEED chunk");
        }
    }
    fill_pages(a, N, s + 4, 0);
    h = ck_add(h, check_pages(a, N, s + 4, 0, "E: rewritten"));
    /* MADV_FREE: the kernel may or may not drop the pages; either way never a mix or garbage */
    if (madvise(a, N / 2 * PAGE, MADV_FREE) == 0) {
        removes++;
        for (size_t p = 0; p < N / 2; p++) {
            const uint64_t *w = (const uint64_t *)(a + p * PAGE);
            if (w[0] == 0)
                check_zero(w, 1, "E: MADV_FREE page that reads zero at its start");
            else
                check_pages(w, 1, s + 4, p, "E: MADV_FREE page that kept its data");
        }
    }
    if (round_no % 4 == 2)
        um_check_at(a, "E:dontneed");
    xmadvise(a, N * PAGE, MADV_DONTNEED, "E dontneed all");
    check_zero(a, N, "E: whole range after MADV_DONTNEED");
    min_served += N;
    unmap(a, N * PAGE);
    unmaps++;
}

/* F: workers fault their even chunks while the main thread unmaps the odd ones */
#define F_CHUNKS 8
#define F_ITERS 6
struct fworker {
    uint8_t *chunk;
    uint64_t seed;
    uint64_t h;
    pthread_barrier_t *bar;
};

static void *f_worker(void *arg)
{
    struct fworker *w = arg;
    pthread_barrier_wait(w->bar);
    for (int i = 0; i < F_ITERS; i++) {
        check_zero(w->chunk, N, "F: own chunk before write (fresh or after MADV_DONTNEED)");
        fill_pages(w->chunk, N, w->seed + (uint64_t)i, 0);
        w->h = ck_add(w->h, check_pages(w->chunk, N, w->seed + (uint64_t)i, 0, "F: own chunk"));
        if (i + 1 < F_ITERS && madvise(w->chunk, N * PAGE, MADV_DONTNEED) != 0)
            fail("F: madvise: %s", strerror(errno));
        sched_yield();
    }
    return NULL;
}

static void stage_f(uint64_t s)
{
    uint8_t *a = map_anon(F_CHUNKS * N * PAGE, RW);
    /* pre-touch half of every odd chunk so the unmaps hit served pages too */
    for (size_t c = 1; c < F_CHUNKS; c += 2)
        fill_pages(a + c * N * PAGE, N / 2, s, c * N);
    min_served += F_CHUNKS / 2 * N / 2;
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, F_CHUNKS / 2 + 1);
    struct fworker w[F_CHUNKS / 2];
    pthread_t t[F_CHUNKS / 2];
    for (size_t i = 0; i < F_CHUNKS / 2; i++) {
        w[i] = (struct fworker){ a + 2 * i * N * PAGE, s * 100 + i * 10, 0, &bar };
        if (pthread_create(&t[i], NULL, f_worker, &w[i]) != 0)
            fail("pthread_create");
    }
    pthread_barrier_wait(&bar);
    for (size_t c = 1; c < F_CHUNKS; c += 2) {
        h = ck_add(h, check_pages(a + c * N * PAGE, N / 2, s, c * N, "F: odd chunk before unmap"));
        unmap(a + c * N * PAGE, N * PAGE);
        unmaps++;
        sched_yield();
    }
    for (size_t i = 0; i < F_CHUNKS / 2; i++) {
        pthread_join(t[i], NULL);
        h = ck_add(h, w[i].h);
        h = ck_add(h, check_pages(w[i].chunk, N, w[i].seed + F_ITERS - 1, 0, "F: chunk after join"));
    }
    removes += F_CHUNKS / 2 * (F_ITERS - 1);
    min_served += F_CHUNKS / 2 * F_ITERS * N;
    pthread_barrier_destroy(&bar);
    if (round_no % 4 == 3)
        um_check_at(a, "F:munmap-while-faulting");
    for (size_t c = 0; c < F_CHUNKS; c += 2) {
        unmap(a + c * N * PAGE, N * PAGE);
        unmaps++;
    }
}

static void stage_g(uint64_t s)
{
    const size_t m = N / 2;
    uint8_t *a = map_anon(3 * m * PAGE, RW);
    fill_pages(a, m / 2, s, 0);
    if (mprotect(a + m * PAGE, m * PAGE, PROT_READ) != 0)
        fail("G: mprotect: %s", strerror(errno));
    h = ck_add(h, check_pages(a, m / 2, s, 0, "G: written before split"));
    check_zero(a + m / 2 * PAGE, 3 * m - m / 2, "G: rest after split (incl. read-only middle)");
    min_served += 3 * m;
    fill_pages(a + m / 2 * PAGE, m - m / 2, s, m / 2);
    fill_pages(a + 2 * m * PAGE, m, s + 5, 0);
    h = ck_add(h, check_pages(a, m, s, 0, "G: first third"));
    check_zero(a + m * PAGE, m, "G: read-only middle after writes around it");
    h = ck_add(h, check_pages(a + 2 * m * PAGE, m, s + 5, 0, "G: last third"));
    if (mprotect(a + m * PAGE, m * PAGE, RW) != 0)
        fail("G: mprotect back: %s", strerror(errno));
    fill_pages(a + m * PAGE, m, s + 6, 0);
    h = ck_add(h, check_pages(a, m, s, 0, "G: first third at end"));
    h = ck_add(h, check_pages(a + m * PAGE, m, s + 6, 0, "G: middle at end"));
    h = ck_add(h, check_pages(a + 2 * m * PAGE, m, s + 5, 0, "G: last third at end"));
    unmap(a, 3 * m * PAGE);
    unmaps++;
}

int main(int argc, char **argv)
{
    umm_target_name = "layoutstorm";
    long rounds = argc > 1 ? strtol(argv[1], NULL, 0) : 8;
    if (rounds < 1 || rounds > 10000)
        fail("usage: layoutstorm [rounds 1..10000]");
    for (long r = 0; r < rounds; r++) {
        uint64_t s = (uint64_t)r * 1000 + 7;
        round_no = r;
        stage_a(s);
        stage_b(s + 10);
        stage_c(s + 20);
        stage_d(s + 30);
        stage_e(s + 40);
        stage_f(s + 50);
        stage_g(s + 60);
    }
    printf("OK layoutstorm checksum=%016llx rounds=%ld min_served=%ld remaps=%ld removes=%ld unmaps=%ld "
           "registered=%d/%d%s\n",
           (unsigned long long)h, rounds, min_served, remaps, removes, unmaps, um_registered, um_checked, um_missing_field());
    return 0;
}
