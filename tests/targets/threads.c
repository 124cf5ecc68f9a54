/* threads: N pthreads (default 16) fault one big mmap at once.
 *
 * Each thread owns a disjoint slice of the region: it reads every page of it first (must be
 * zero: fresh memory), then fills it with its own pattern. Interleaved with that, every thread
 * bumps a shared counter in each of the first SHARED pages and writes its own word there (all
 * threads fault the same shared pages). Each thread also fills its part of a .bss array.
 * After join the main thread verifies every word and the counters.
 *
 * usage: threads [nthreads=16] [region_mib=96]
 */
#include "umm_check.h"
#include <pthread.h>

#define SHARED 16
#define BUMPS 64 /* shared-page rounds per thread */
#define MAX_THREADS 64
#define BSS_PAGES 2048 /* 8 MiB */

static uint64_t bss[BSS_PAGES * WORDS_PER_PAGE] __attribute__((aligned(4096)));
static uint8_t *region;
static size_t nthreads, slice_pages, bss_slice;
static pthread_barrier_t start;

static void bump_shared(size_t id, uint64_t round)
{
    for (size_t p = 0; p < SHARED; p++) {
        uint64_t *w = (uint64_t *)(region + p * PAGE);
        __atomic_fetch_add(&w[0], 1, __ATOMIC_RELAXED);
        __atomic_store_n(&w[1 + id], pattern(1000 + id, p * 64 + round), __ATOMIC_RELAXED);
    }
}

static void *worker(void *arg)
{
    size_t id = (size_t)arg;
    pthread_barrier_wait(&start);
    uint8_t *slice = region + (SHARED + id * slice_pages) * PAGE;
    size_t every = slice_pages / BUMPS;
    uint64_t round = 0;
    for (size_t p = 0; p < slice_pages; p++) {
        volatile uint64_t *w = (uint64_t *)(slice + p * PAGE);
        if (w[0] != 0 || w[WORDS_PER_PAGE - 1] != 0)
            fail("thread %zu: page %zu of its slice is not zero before its first write", id, p);
        fill_pages((void *)w, 1, id + 1, p);
        if (p % every == every - 1 && round < BUMPS)
            bump_shared(id, round++);
    }
    while (round < BUMPS)
        bump_shared(id, round++);
    uint64_t *b = bss + id * bss_slice * WORDS_PER_PAGE;
    check_zero(b, bss_slice, "bss slice before write");
    fill_pages(b, bss_slice, 5000 + id, 0);
    return NULL;
}

int main(int argc, char **argv)
{
    umm_target_name = "threads";
    nthreads = argc > 1 ? strtoul(argv[1], NULL, 0) : 16;
    size_t mib = argc > 2 ? strtoul(argv[2], NULL, 0) : 96;
    if (nthreads < 1 || nthreads > MAX_THREADS || mib < 8 || mib > 256)
        fail("usage: threads [nthreads 1..%d] [region_mib 8..256]", MAX_THREADS);
    size_t pages = mib * 256;
    slice_pages = (pages - SHARED) / nthreads;
    if (slice_pages < BUMPS)
        fail("region too small for %zu threads", nthreads);
    bss_slice = BSS_PAGES / nthreads;
    region = map_anon(pages * PAGE, PROT_READ | PROT_WRITE);

    pthread_t t[MAX_THREADS];
    pthread_barrier_init(&start, NULL, (unsigned)nthreads);
    for (size_t i = 0; i < nthreads; i++)
        if (pthread_create(&t[i], NULL, worker, (void *)i) != 0)
            fail("pthread_create");
    for (size_t i = 0; i < nthreads; i++)
        pthread_join(t[i], NULL);

    uint64_t h = 0;
    for (size_t p = 0; p < SHARED; p++) {
        uint64_t *w = (uint64_t *)(region + p * PAGE);
        if (w[0] != nthreads * BUMPS)
            fail("shared page %zu: counter %llu, want %zu (lost increments)", p,
                 (unsigned long long)w[0], nthreads * BUMPS);
        for (size_t id = 0; id < nthreads; id++)
            if (w[1 + id] != pattern(1000 + id, p * 64 + BUMPS - 1))
                fail("shared page %zu: word of thread %zu is %016llx", p, id,
                     (unsigned long long)w[1 + id]);
        for (size_t i = 1 + nthreads; i < WORDS_PER_PAGE; i++)
            if (w[i] != 0)
                fail("shared page %zu: word %zu not zero", p, i);
        h = ck_add(h, w[0]);
    }
    for (size_t id = 0; id < nthreads; id++) {
        h = ck_add(h, check_pages(region + (SHARED + id * slice_pages) * PAGE, slice_pages, id + 1, 0,
                                  "thread slice after join"));
        h = ck_add(h, check_pages(bss + id * bss_slice * WORDS_PER_PAGE, bss_slice, 5000 + id, 0,
                                  "bss slice after join"));
    }
    size_t tail = pages - SHARED - nthreads * slice_pages;
    um_check(region);
    um_check_at(bss + BSS_PAGES / 2 * WORDS_PER_PAGE, "bss");
    /* every touched page of the region, plus the .bss pages except its first (which may share a
     * file-backed page with .data) */
    size_t min_served = SHARED + nthreads * slice_pages + nthreads * bss_slice - 1;
    printf("OK threads checksum=%016llx threads=%zu region_pages=%zu untouched_tail=%zu min_served=%zu "
           "registered=%d/%d%s\n",
           (unsigned long long)h, nthreads, pages, tail, min_served, um_registered, um_checked, um_missing_field());
    return 0;
}
