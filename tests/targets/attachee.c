/* attachee: runs on while umm attaches to it and detaches again, any number of times, and
 * checks that its memory and signals never go wrong meanwhile.
 *
 * usage: attachee STATE [reader]
 *
 * STATE is a file this program creates and maps shared (never served by umm: it is not private
 * anonymous memory). Words: [0] SIGUSR1 signals received, [1] rounds done, [2] the address of
 * the churned region, [3] stop flag (set by the test), [4] 1 once the main thread is about to
 * block in read (reader mode).
 *
 * The 16 MiB region is mapped before anything else (so before any attach). Each round takes one
 * 256 KiB slice: verifies what the last round that used it wrote, MADV_DONTNEEDs it, checks it
 * reads zero, fills it with a new pattern and verifies that; then verifies one other slice.
 * Any mismatch: FAIL and exit 1.
 *
 * Plain mode: the main thread churns until the stop flag is set.
 * reader mode: two worker threads churn (halves of the region) while the main thread blocks in
 * read(2) of stdin for 16 bytes; then it sets the stop flag itself, joins them, and prints the
 * bytes (input=...).
 *
 * Ends with: OK attachee checksum=<hex> rounds=R usr1=N [input=...]
 */
#include "umm_check.h"
#include <pthread.h>
#include <signal.h>

#define REGION (16UL << 20)
#define SLICE_PAGES 64UL
#define SLICE (SLICE_PAGES * PAGE)

static volatile uint64_t *state;
static char *region;

static void on_usr1(int sig)
{
    (void)sig;
    __atomic_fetch_add(&state[0], 1, __ATOMIC_SEQ_CST);
}

struct churn {
    char *base;
    size_t slices;
    uint64_t *seeds; /* per slice: the seed it holds, 0 = never written */
    uint64_t rounds;
    uint64_t check;
    int id;
};

static void churn_round(struct churn *c)
{
    size_t s = c->rounds % c->slices;
    char *p = c->base + s * SLICE;
    char what[64];
    snprintf(what, sizeof what, "thread %d slice %zu", c->id, s);
    if (c->seeds[s])
        c->check = ck_add(c->check, check_pages(p, SLICE_PAGES, c->seeds[s], s, what));
    if (madvise(p, SLICE, MADV_DONTNEED) != 0)
        fail("madvise: %s", strerror(errno));
    check_zero(p, SLICE_PAGES, what);
    uint64_t seed = (c->rounds << 8) + (uint64_t)c->id + 1;
    fill_pages(p, SLICE_PAGES, seed, s);
    c->seeds[s] = seed;
    check_pages(p, SLICE_PAGES, seed, s, what);
    size_t o = (s * 7 + 3) % c->slices;
    if (c->seeds[o])
        check_pages(c->base + o * SLICE, SLICE_PAGES, c->seeds[o], o, what);
    c->rounds++;
    __atomic_fetch_add(&state[1], 1, __ATOMIC_SEQ_CST);
    usleep(300); /* a sleeping, restartable system call for the attach to interrupt */
}

static void *churn_thread(void *arg)
{
    struct churn *c = arg;
    while (!__atomic_load_n(&state[3], __ATOMIC_SEQ_CST))
        churn_round(c);
    return NULL;
}

int main(int argc, char **argv)
{
    umm_target_name = "attachee";
    if (argc < 2)
        fail("usage: attachee STATE [reader]");
    region = map_anon(REGION, PROT_READ | PROT_WRITE);
    int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate(fd, PAGE) != 0)
        fail("state file %s: %s", argv[1], strerror(errno));
    state = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (state == MAP_FAILED)
        fail("mmap state: %s", strerror(errno));
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    state[2] = (uint64_t)(uintptr_t)region;
    size_t slices = REGION / SLICE;
    uint64_t *seeds = calloc(slices, sizeof *seeds);
    if (!seeds)
        fail("calloc");
    int reader = argc > 2 && strcmp(argv[2], "reader") == 0;
    char input[17] = { 0 };
    uint64_t check = 0, rounds = 0;
    if (!reader) {
        struct churn c = { region, slices, seeds, 0, 0, 0 };
        churn_thread(&c);
        check = c.check;
        rounds = c.rounds;
    } else {
        struct churn c[2] = {
            { region, slices / 2, seeds, 0, 0, 1 },
            { region + REGION / 2, slices / 2, seeds + slices / 2, 0, 0, 2 },
        };
        pthread_t t[2];
        for (int i = 0; i < 2; i++)
            if (pthread_create(&t[i], NULL, churn_thread, &c[i]) != 0)
                fail("pthread_create");
        state[4] = 1;
        size_t got = 0;
        while (got < 16) {
            ssize_t n = read(0, input + got, 16 - got);
            if (n == 0)
                fail("stdin closed after %zu bytes", got);
            if (n < 0)
                fail("read: %s (after %zu bytes)", strerror(errno), got);
            got += (size_t)n;
        }
        __atomic_store_n(&state[3], 1, __ATOMIC_SEQ_CST);
        for (int i = 0; i < 2; i++) {
            pthread_join(t[i], NULL);
            check = ck_add(check, c[i].check);
            rounds += c[i].rounds;
        }
    }
    printf("OK attachee checksum=%016llx rounds=%llu usr1=%llu%s%s\n", (unsigned long long)check,
           (unsigned long long)rounds, (unsigned long long)state[0], reader ? " input=" : "",
           reader ? input : "");
    return 0;
}
