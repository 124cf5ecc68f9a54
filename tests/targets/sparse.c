/* sparse: a target for `umm snapshot`. Maps, at fixed addresses (MAP_FIXED_NOREPLACE):
 *   BIG    64 GiB MAP_NORESERVE read-write, about 10 MiB written in scattered runs (the first
 *          pages, runs across 64 KiB, 2 MiB and 1 GiB boundaries, the last page, and
 *          pseudo-random runs of 1..80 pages);
 *   SMALL  1 MiB read-write, every page written;
 *   PROT   16 pages: pages 0-3 and 8 written, then pages 8-15 made PROT_NONE (so a populated
 *          PROT_NONE page; the VMA splits in two);
 *   RES    1 MiB PROT_NONE reservation, never touched;
 *   EMPTY  1 MiB read-write, never touched.
 * Every written word at address a holds pattern(SEED, a / 8), so anyone can regenerate it.
 * It prints one "RUN <addr> <bytes>" line per written run (hex; runs may overlap), then
 * "READY pid=<pid>", and waits until the file named by its last argument exists. Then it
 * checks that every written word still holds its value and that the page after each run, if
 * no run wrote it, reads as zero, and prints "OK sparse checksum=<hex> runs=<runs>".
 *
 * With "--threads N" it also starts N threads that count as fast as they can, each in a word
 * of page t of X (below BIG) and then of page t of Y (above everything): x[t] = ++n; y[t] = n.
 * Stopped between the two stores or not, an image taken while every thread is stopped has
 * x[t] - y[t] in {0, 1}. A further thread keeps creating and joining short-lived threads.
 * "THREADS <N> <X> <Y>" is printed before READY, once every counter is non-zero. */
#include "umm_check.h"
#include <pthread.h>

#define SEED 0x5eedULL
#define BIG 0x600000000000UL
#define BIG_LEN (64UL << 30)
#define SMALL 0x610000000000UL
#define SMALL_LEN (1UL << 20)
#define PROT 0x610000200000UL
#define PROT_PAGES 16UL
#define RES 0x610000400000UL
#define EMPTY 0x610000600000UL
#define X_ADDR 0x5f0000000000UL
#define Y_ADDR 0x620000000000UL
#define MAX_RUNS 256

struct run {
    uintptr_t addr;
    size_t len;
};
static struct run runs[MAX_RUNS];
static int nruns;

static void *map_fixed(uintptr_t addr, size_t len, int prot, int extra)
{
    void *p = mmap((void *)addr, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | extra,
                   -1, 0);
    if (p == MAP_FAILED)
        fail("mmap(%#lx, %zu) failed: %s", (unsigned long)addr, len, strerror(errno));
    if ((uintptr_t)p != addr)
        fail("mmap(%#lx) gave %p (kernel without MAP_FIXED_NOREPLACE?)", (unsigned long)addr, p);
    return p;
}

static void write_run(uintptr_t addr, size_t len)
{
    if (nruns == MAX_RUNS)
        fail("too many runs");
    runs[nruns++] = (struct run){addr, len};
    uint64_t *w = (uint64_t *)addr;
    for (size_t i = 0; i < len / 8; i++)
        w[i] = pattern(SEED, addr / 8 + i);
}

static int in_some_run(uintptr_t page)
{
    for (int i = 0; i < nruns; i++)
        if (page >= runs[i].addr && page < runs[i].addr + runs[i].len)
            return 1;
    return 0;
}

/* ---- threads mode ---- */
static volatile int stop;
static int nthreads;
static volatile uint64_t *xs, *ys;

static void *counter(void *arg)
{
    size_t t = (size_t)arg;
    volatile uint64_t *x = xs + t * WORDS_PER_PAGE, *y = ys + t * WORDS_PER_PAGE;
    uint64_t n = 0;
    while (!stop) {
        n++;
        *x = n;
        __asm__ __volatile__("" ::: "memory");
        *y = n;
        __asm__ __volatile__("" ::: "memory");
    }
    return NULL;
}

static void *nothing(void *arg)
{
    return arg;
}

static volatile uint64_t churned;

static void *churn(void *arg)
{
    (void)arg;
    while (!stop) {
        pthread_t t;
        if (pthread_create(&t, NULL, nothing, NULL) != 0)
            fail("pthread_create (churn)");
        pthread_join(t, NULL);
        churned++;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    umm_target_name = "sparse";
    (void)map_anon;
    int argi = 1;
    if (argc > 2 && strcmp(argv[1], "--threads") == 0) {
        nthreads = atoi(argv[2]);
        if (nthreads < 1 || nthreads > 64)
            fail("bad --threads %s", argv[2]);
        argi = 3;
    }
    if (argi != argc - 1)
        fail("usage: sparse [--threads N] GO-FILE");
    const char *go = argv[argi];

    map_fixed(BIG, BIG_LEN, PROT_READ | PROT_WRITE, MAP_NORESERVE);
    map_fixed(SMALL, SMALL_LEN, PROT_READ | PROT_WRITE, 0);
    map_fixed(PROT, PROT_PAGES * PAGE, PROT_READ | PROT_WRITE, 0);
    map_fixed(RES, 1UL << 20, PROT_NONE, 0);
    map_fixed(EMPTY, 1UL << 20, PROT_READ | PROT_WRITE, 0);

    /* BIG: fixed runs first. */
    write_run(BIG, 3 * PAGE);                      /* the first pages */
    write_run(BIG + 15 * PAGE, 3 * PAGE);          /* across 64 KiB */
    write_run(BIG + 511 * PAGE, 3 * PAGE);         /* across 2 MiB */
    write_run(BIG + (1UL << 30) - PAGE, 2 * PAGE); /* across 1 GiB */
    write_run(BIG + BIG_LEN - PAGE, PAGE);         /* the last page */
    /* Pseudo-random runs, about 10 MiB in all. */
    size_t total = 0;
    for (uint64_t i = 0; total < (10UL << 20) - 40 * PAGE; i++) {
        uint64_t r = mix64(SEED + i);
        size_t pages = 1 + r % 80;
        uint64_t page = mix64(r) % (BIG_LEN / PAGE - pages);
        write_run(BIG + page * PAGE, pages * PAGE);
        total += pages * PAGE;
    }
    write_run(SMALL, SMALL_LEN);
    write_run(PROT, 4 * PAGE);
    write_run(PROT + 8 * PAGE, PAGE);
    if (mprotect((void *)(PROT + 8 * PAGE), 8 * PAGE, PROT_NONE) != 0)
        fail("mprotect: %s", strerror(errno));

    for (int i = 0; i < nruns; i++)
        printf("RUN %#lx %#zx\n", (unsigned long)runs[i].addr, runs[i].len);

    pthread_t *tids = NULL, churner;
    if (nthreads) {
        xs = map_fixed(X_ADDR, (size_t)nthreads * PAGE, PROT_READ | PROT_WRITE, 0);
        ys = map_fixed(Y_ADDR, (size_t)nthreads * PAGE, PROT_READ | PROT_WRITE, 0);
        tids = calloc((size_t)nthreads, sizeof *tids);
        if (!tids)
            fail("calloc");
        for (int t = 0; t < nthreads; t++)
            if (pthread_create(&tids[t], NULL, counter, (void *)(size_t)t) != 0)
                fail("pthread_create");
        if (pthread_create(&churner, NULL, churn, NULL) != 0)
            fail("pthread_create (churner)");
        for (int t = 0; t < nthreads; t++)
            for (int tries = 0; xs[t * WORDS_PER_PAGE] == 0 || !churned; tries++) {
                if (tries > 60000)
                    fail("thread %d never started counting", t);
                usleep(1000);
            }
        printf("THREADS %d %#lx %#lx\n", nthreads, X_ADDR, Y_ADDR);
    }
    printf("READY pid=%d\n", (int)getpid());
    fflush(stdout);

    for (int tries = 0; access(go, F_OK) != 0; tries++) {
        if (tries > 12000)
            fail("%s never appeared", go);
        usleep(10000);
    }

    if (nthreads) {
        stop = 1;
        for (int t = 0; t < nthreads; t++)
            pthread_join(tids[t], NULL);
        pthread_join(churner, NULL);
        for (int t = 0; t < nthreads; t++)
            if (xs[t * WORDS_PER_PAGE] != ys[t * WORDS_PER_PAGE])
                fail("thread %d: x %llu != y %llu after the join", t,
                     (unsigned long long)xs[t * WORDS_PER_PAGE],
                     (unsigned long long)ys[t * WORDS_PER_PAGE]);
    }

    if (mprotect((void *)(PROT + 8 * PAGE), 8 * PAGE, PROT_READ) != 0)
        fail("mprotect back: %s", strerror(errno));
    uint64_t h = 0;
    for (int i = 0; i < nruns; i++) {
        const uint64_t *w = (const uint64_t *)runs[i].addr;
        for (size_t j = 0; j < runs[i].len / 8; j++) {
            uint64_t want = pattern(SEED, runs[i].addr / 8 + j);
            if (w[j] != want)
                fail("run %d at %#lx: word %zu = %016llx, want %016llx", i,
                     (unsigned long)runs[i].addr, j, (unsigned long long)w[j],
                     (unsigned long long)want);
            if ((j & 63) == 0)
                h = ck_add(h, w[j]);
        }
        /* the page after the run, if no run wrote it, is still zero */
        uintptr_t next = runs[i].addr + runs[i].len;
        int inside = (next >= BIG && next < BIG + BIG_LEN) ||
                     (next >= SMALL && next < SMALL + SMALL_LEN) ||
                     (next >= PROT && next < PROT + PROT_PAGES * PAGE);
        if (inside && !in_some_run(next))
            check_zero((const void *)next, 1, "page after a run");
    }
    printf("OK sparse checksum=%016llx runs=%d\n", (unsigned long long)h, nruns);
    return 0;
}
