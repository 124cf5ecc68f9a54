/* mtalloc: 16 threads each allocate and touch memory the ways a C program gets it, for
 * coverage (the share of anonymous memory in VMAs registered with a uffd).
 *
 * Every thread, in ROUNDS rounds (all threads step through the rounds together, with a short
 * pause between rounds so that coverage samples see the process grow):
 *   - small blocks (1..32 KiB) from malloc: glibc's per-thread arenas, mapped by glibc
 *     internally (a 64 MiB PROT_NONE reservation grown with mprotect);
 *   - one large block (512 KiB) from malloc: a chunk glibc mmaps itself;
 *   - one buffer grown with realloc (to 2 MiB at the end): mremap inside glibc;
 *   - a deep stack frame (256 KiB) on its own thread stack (mapped by glibc's pthread_create).
 * The main thread meanwhile grows the brk heap (malloc of 64 KiB blocks, below the mmap
 * threshold). Every byte written derives from (thread, block, index); after the last round
 * every thread verifies its data and the main thread checks all of it again.
 * Prints "OK mtalloc checksum=<hex> threads=N bytes=B".
 *
 * usage: mtalloc [threads=16]
 */
#include "umm_check.h"
#include <pthread.h>

#define ROUNDS 8
#define SMALL_PER_ROUND 48 /* blocks of 1..32 KiB: ~0.8 MiB a round */
#define LARGE (512UL << 10)
#define REALLOC_STEP (256UL << 10)
#define STACK_BYTES (256UL << 10)
#define BRK_BLOCK (64UL << 10)
#define BRK_PER_ROUND 32 /* 2 MiB a round */
#define MAX_THREADS 64

struct block {
    uint64_t *p;
    size_t words;
    uint64_t seed;
};

struct worker {
    size_t id;
    struct block blocks[ROUNDS * (SMALL_PER_ROUND + 1)];
    size_t nblocks;
    uint64_t *grown;
    size_t grown_words;
    uint64_t stack_sum;
    uint64_t sum;
    uint64_t bytes;
};

static struct worker workers[MAX_THREADS];
static size_t nthreads;
static pthread_barrier_t round_start, round_end;

static void fill_words(uint64_t *p, size_t words, uint64_t seed, size_t from)
{
    for (size_t i = from; i < words; i++)
        p[i] = pattern(seed, i);
}

static uint64_t check_words(const uint64_t *p, size_t words, uint64_t seed, uint64_t h)
{
    for (size_t i = 0; i < words; i++) {
        if (p[i] != pattern(seed, i))
            fail("seed %llu word %zu is %016llx, want %016llx", (unsigned long long)seed, i,
                 (unsigned long long)p[i], (unsigned long long)pattern(seed, i));
        h = ck_add(h, p[i]);
    }
    return h;
}

static struct block new_block(size_t bytes, uint64_t seed)
{
    struct block b = {malloc(bytes), bytes / 8, seed};
    if (!b.p)
        fail("malloc(%zu) failed", bytes);
    fill_words(b.p, b.words, seed, 0);
    return b;
}

/* A deep frame on this thread's own stack, filled and summed. */
static __attribute__((noinline)) uint64_t use_stack(uint64_t seed)
{
    volatile uint64_t frame[STACK_BYTES / 8];
    for (size_t i = 0; i < STACK_BYTES / 8; i++)
        frame[i] = pattern(seed, i);
    uint64_t h = 0;
    for (size_t i = 0; i < STACK_BYTES / 8; i++) {
        if (frame[i] != pattern(seed, i))
            fail("stack word %zu differs", i);
        h = ck_add(h, frame[i]);
    }
    return h;
}

static void *worker(void *arg)
{
    struct worker *w = arg;
    uint64_t base = (w->id + 1) << 32;
    for (size_t r = 0; r < ROUNDS; r++) {
        pthread_barrier_wait(&round_start);
        for (size_t k = 0; k < SMALL_PER_ROUND; k++) {
            uint64_t seed = base + w->nblocks;
            size_t bytes = 1024 * (1 + mix64(seed) % 32);
            w->blocks[w->nblocks++] = new_block(bytes, seed);
        }
        w->blocks[w->nblocks] = new_block(LARGE, base + w->nblocks);
        w->nblocks++;
        size_t words = (r + 1) * REALLOC_STEP / 8;
        uint64_t *g = realloc(w->grown, words * 8);
        if (!g)
            fail("realloc to %zu bytes failed", words * 8);
        fill_words(g, words, base + 0xffff, w->grown_words);
        w->grown = g;
        w->grown_words = words;
        w->stack_sum = ck_add(w->stack_sum, use_stack(base + r));
        pthread_barrier_wait(&round_end);
    }
    uint64_t h = w->stack_sum;
    for (size_t b = 0; b < w->nblocks; b++) {
        h = check_words(w->blocks[b].p, w->blocks[b].words, w->blocks[b].seed, h);
        w->bytes += w->blocks[b].words * 8;
    }
    h = check_words(w->grown, w->grown_words, base + 0xffff, h);
    w->bytes += w->grown_words * 8;
    w->sum = h;
    return NULL;
}

int main(int argc, char **argv)
{
    umm_target_name = "mtalloc";
    nthreads = argc > 1 ? strtoul(argv[1], NULL, 10) : 16;
    if (nthreads < 1 || nthreads > MAX_THREADS)
        fail("threads must be 1..%d", MAX_THREADS);
    pthread_barrier_init(&round_start, NULL, (unsigned)nthreads + 1);
    pthread_barrier_init(&round_end, NULL, (unsigned)nthreads + 1);
    pthread_t tids[MAX_THREADS];
    for (size_t t = 0; t < nthreads; t++) {
        workers[t].id = t;
        int e = pthread_create(&tids[t], NULL, worker, &workers[t]);
        if (e)
            fail("pthread_create: %s", strerror(e));
    }
    struct block brk_blocks[ROUNDS * BRK_PER_ROUND];
    size_t nbrk = 0;
    for (size_t r = 0; r < ROUNDS; r++) {
        pthread_barrier_wait(&round_start);
        for (size_t k = 0; k < BRK_PER_ROUND; k++, nbrk++)
            brk_blocks[nbrk] = new_block(BRK_BLOCK, 0xb000 + nbrk);
        pthread_barrier_wait(&round_end);
        usleep(40 * 1000);
    }
    uint64_t h = 0, bytes = 0;
    for (size_t t = 0; t < nthreads; t++) {
        int e = pthread_join(tids[t], NULL);
        if (e)
            fail("pthread_join: %s", strerror(e));
        h = ck_add(h, workers[t].sum);
        bytes += workers[t].bytes;
    }
    for (size_t b = 0; b < nbrk; b++) {
        h = check_words(brk_blocks[b].p, brk_blocks[b].words, brk_blocks[b].seed, h);
        bytes += brk_blocks[b].words * 8;
    }
    printf("OK mtalloc checksum=%016llx threads=%zu bytes=%llu\n", (unsigned long long)h,
           nthreads, (unsigned long long)bytes);
    return 0;
}
