/* samepage: many threads fault the same pages at the same instant, round after round.
 *
 * Round r: all workers (default 32) start together and walk the same P pages (half ascending,
 * half descending); in each page a worker atomically bumps the page's counter (word 0) and
 * writes its own slot (word 8+id), which must read zero first (fresh page). The main thread then
 * checks every counter == nthreads, every slot, and that the fetch_add results were a
 * permutation of 0..n-1 per page (sum check), then MADV_DONTNEED's the region so the next round
 * faults every page again (REMOVE events; stale data would show up as a non-zero slot).
 * Meanwhile:
 *  - a churn thread keeps creating and joining short-lived threads: some on stacks this program
 *    mmapped itself (registered), which touch 64 KiB of stack and a shared page, and whose stack
 *    is MADV_DONTNEED'ed after join; some on glibc's own stacks;
 *  - a signal thread sends SIGUSR1 to the workers with pthread_kill, over and over; the handler
 *    (SA_RESTART) bumps a counter in a page of its own region and a global counter, which must
 *    agree at the end.
 *
 * usage: samepage [nthreads=32] [rounds=100] [pages=64]
 * rounds=0: run until killed, print "RUNNING samepage" (flushed) after the first round.
 */
#include "umm_check.h"
#include <pthread.h>
#include <sched.h>
#include <signal.h>

#define MAX_THREADS 64
#define CHURN_STACK (256 * 1024)
#define CHURN_STACKS 4

static size_t nthreads, npages;
static long rounds;
static uint8_t *region, *sigpage, *churnpage, *stacks;
static pthread_barrier_t bar;
static volatile int stop_side;
static uint64_t fa_sum[MAX_THREADS];
static long sig_handled, sig_sent, churned, churn_removes;

static void on_usr1(int sig)
{
    (void)sig;
    long n = __atomic_fetch_add(&sig_handled, 1, __ATOMIC_RELAXED);
    uint64_t *w = (uint64_t *)(sigpage + (size_t)(n % 4) * PAGE);
    __atomic_fetch_add(w, 1, __ATOMIC_RELAXED);
}

static void *worker(void *arg)
{
    size_t id = (size_t)arg;
    for (long r = 0; rounds == 0 || r < rounds; r++) {
        pthread_barrier_wait(&bar); /* start of round */
        for (size_t k = 0; k < npages; k++) {
            size_t p = id % 2 ? npages - 1 - k : k;
            uint64_t *w = (uint64_t *)(region + p * PAGE);
            uint64_t v = __atomic_fetch_add(&w[0], 1, __ATOMIC_RELAXED);
            fa_sum[id] += v;
            volatile uint64_t *slot = &w[8 + id];
            if (*slot != 0)
                fail("round %ld: thread %zu: slot in page %zu holds %016llx before its write (stale)",
                     r, id, p, (unsigned long long)*slot);
            *slot = pattern((uint64_t)r, id * 4096 + p);
        }
        pthread_barrier_wait(&bar); /* end of work */
        pthread_barrier_wait(&bar); /* main has checked and zapped */
    }
    return NULL;
}

static void *churn_child(void *arg)
{
    size_t k = (size_t)arg;
    volatile uint8_t deep[64 * 1024];
    for (size_t i = 0; i < sizeof deep; i += 512)
        deep[i] = (uint8_t)(i + k);
    unsigned sum = 0;
    for (size_t i = 0; i < sizeof deep; i += 512)
        sum += deep[i];
    __atomic_fetch_add((uint64_t *)(churnpage + (k % 4) * PAGE), 1, __ATOMIC_RELAXED);
    return (void *)(uintptr_t)sum;
}

static unsigned churn_expect(size_t k)
{
    unsigned sum = 0;
    for (size_t i = 0; i < 64 * 1024; i += 512)
        sum += (uint8_t)(i + k);
    return sum;
}

static void *churn(void *arg)
{
    (void)arg;
    size_t k = 0;
    while (!__atomic_load_n(&stop_side, __ATOMIC_ACQUIRE)) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        uint8_t *stack = NULL;
        if (k % 2 == 0) {
            stack = stacks + (k / 2 % CHURN_STACKS) * CHURN_STACK;
            pthread_attr_setstack(&attr, stack, CHURN_STACK);
        }
        if (pthread_create(&t, &attr, churn_child, (void *)k) != 0)
            fail("churn: pthread_create");
        pthread_attr_destroy(&attr);
        void *ret;
        pthread_join(t, &ret);
        if ((unsigned)(uintptr_t)ret != churn_expect(k))
            fail("churn thread %zu computed %u on its stack, want %u", k, (unsigned)(uintptr_t)ret,
                 churn_expect(k));
        if (stack) {
            if (madvise(stack, CHURN_STACK, MADV_DONTNEED) != 0)
                fail("churn: madvise: %s", strerror(errno));
            churn_removes++;
        }
        k++;
    }
    churned = (long)k;
    return NULL;
}

static pthread_t workers[MAX_THREADS];

static void *signaller(void *arg)
{
    (void)arg;
    size_t i = 0;
    while (!__atomic_load_n(&stop_side, __ATOMIC_ACQUIRE)) {
        if (pthread_kill(workers[i % nthreads], SIGUSR1) == 0)
            sig_sent++;
        i++;
        if (i % nthreads == 0) {
            struct timespec ts = { 0, 200 * 1000 };
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    umm_target_name = "samepage";
    nthreads = argc > 1 ? strtoul(argv[1], NULL, 0) : 32;
    rounds = argc > 2 ? strtol(argv[2], NULL, 0) : 100;
    npages = argc > 3 ? strtoul(argv[3], NULL, 0) : 64;
    if (nthreads < 2 || nthreads > MAX_THREADS || rounds < 0 || npages < 1 || npages > 65536)
        fail("usage: samepage [nthreads 2..%d] [rounds >= 0] [pages 1..65536]", MAX_THREADS);
    region = map_anon(npages * PAGE, PROT_READ | PROT_WRITE);
    sigpage = map_anon(4 * PAGE, PROT_READ | PROT_WRITE);
    churnpage = map_anon(4 * PAGE, PROT_READ | PROT_WRITE);
    stacks = map_anon(CHURN_STACKS * CHURN_STACK, PROT_READ | PROT_WRITE);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) != 0)
        fail("sigaction");

    pthread_barrier_init(&bar, NULL, (unsigned)nthreads + 1);
    for (size_t i = 0; i < nthreads; i++)
        if (pthread_create(&workers[i], NULL, worker, (void *)i) != 0)
            fail("pthread_create");
    pthread_t tc, ts;
    if (pthread_create(&tc, NULL, churn, NULL) != 0 || pthread_create(&ts, NULL, signaller, NULL) != 0)
        fail("pthread_create");

    uint64_t h = 0;
    long removes = 0;
    for (long r = 0; rounds == 0 || r < rounds; r++) {
        pthread_barrier_wait(&bar); /* start */
        pthread_barrier_wait(&bar); /* workers done */
        for (size_t p = 0; p < npages; p++) {
            uint64_t *w = (uint64_t *)(region + p * PAGE);
            if (w[0] != nthreads)
                fail("round %ld: page %zu counter %llu, want %zu (lost or doubled increments)", r, p,
                     (unsigned long long)w[0], nthreads);
            for (size_t id = 0; id < nthreads; id++)
                if (w[8 + id] != pattern((uint64_t)r, id * 4096 + p))
                    fail("round %ld: page %zu slot of thread %zu = %016llx", r, p, id,
                         (unsigned long long)w[8 + id]);
            h = ck_add(h, w[8 + p % nthreads]);
        }
        uint64_t total = 0;
        for (size_t id = 0; id < nthreads; id++)
            total += fa_sum[id];
        uint64_t want = (uint64_t)(r + 1) * npages * (nthreads * (nthreads - 1) / 2);
        if (total != want)
            fail("round %ld: sum of fetch_add results %llu, want %llu", r, (unsigned long long)total,
                 (unsigned long long)want);
        if (rounds == 0 && r == 0) {
            printf("RUNNING samepage\n");
            fflush(stdout);
        }
        if (madvise(region, npages * PAGE, MADV_DONTNEED) != 0)
            fail("madvise: %s", strerror(errno));
        removes++;
        pthread_barrier_wait(&bar); /* zapped: next round may start */
    }
    /* stop the signaller before any worker is joined (pthread_kill needs an unjoined thread) */
    __atomic_store_n(&stop_side, 1, __ATOMIC_RELEASE);
    pthread_join(ts, NULL);
    pthread_join(tc, NULL);
    for (size_t i = 0; i < nthreads; i++)
        pthread_join(workers[i], NULL);

    uint64_t sig_in_pages = 0, churn_in_page = 0;
    for (int i = 0; i < 4; i++) {
        sig_in_pages += *(uint64_t *)(sigpage + (size_t)i * PAGE);
        churn_in_page += *(uint64_t *)(churnpage + (size_t)i * PAGE);
    }
    if (sig_in_pages != (uint64_t)sig_handled)
        fail("signal handler ran %ld times but its page counters sum to %llu", sig_handled,
             (unsigned long long)sig_in_pages);
    if (sig_sent > 0 && sig_handled == 0)
        fail("%ld signals sent, none handled", sig_sent);
    if (churn_in_page != (uint64_t)churned)
        fail("%ld churn threads ran but the churn page counts %llu", churned,
             (unsigned long long)churn_in_page);
    um_check(region);
    um_check(sigpage);
    um_check(stacks);
    printf("OK samepage checksum=%016llx threads=%zu rounds=%ld pages=%zu min_served=%ld removes=%ld "
           "churned=%ld signals_sent=%ld signals_handled=%ld registered=%d/%d%s\n",
           (unsigned long long)h, nthreads, rounds, npages, rounds * (long)npages, removes + churn_removes,
           churned, sig_sent, sig_handled, um_registered, um_checked, um_missing_field());
    return 0;
}
