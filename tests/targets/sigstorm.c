/* sigstorm: signals delivered to threads that fault through a registered region.
 *
 * W worker threads (default 16) each own a slice of a registered region and a pipe. A round of
 * a worker: every page of its slice reads zero, is filled and verified (user-mode faults), then
 * the worker read(2)s an 8-byte token from its pipe straight into a zapped page of its slice
 * (a fault taken by the kernel inside read, and a blocking syscall signals interrupt), checks
 * the token, and zaps the slice (MADV_DONTNEED).
 * A signaller thread feeds the tokens and, all along, queues real-time signals at the workers
 * with pthread_sigqueue (SIGNALS_PER_ROUND per round of each worker): SIGRTMIN (handler
 * installed with SA_RESTART) and SIGRTMIN+1 (without: the blocked read fails with EINTR and is
 * retried). Real-time signals are queued, never merged, so every signal sent is accounted for:
 * each handler bumps its thread's counter in a registered page (a fault inside the handler) and
 * a global counter; at the end, per thread, handled == sent, and the page counters agree with
 * the global one.
 *
 * usage: sigstorm [workers=16] [rounds=200] [slice_pages=16]
 */
#include "umm_check.h"
#include <pthread.h>
#include <signal.h>
#include <sched.h>

#define MAX_WORKERS 64
#define MAX_OUTSTANDING 2 /* tokens written but not yet read, per worker */
#define SIGNALS_PER_ROUND 6

static size_t nworkers, slice_pages;
static long rounds;
static uint8_t *region, *counters; /* counters: one page per worker */
static int pipes[MAX_WORKERS][2];
static pthread_t workers[MAX_WORKERS];
static long sent[MAX_WORKERS], tokens_read[MAX_WORKERS], eintr[MAX_WORKERS];
static int done[MAX_WORKERS], all_sent, started;
static long handled_total;
static __thread long my_id = -1;

static void on_signal(int sig, siginfo_t *si, void *ctx)
{
    (void)ctx;
    if (my_id < 0)
        return; /* not a worker: counted as unhandled by the check */
    uint64_t *w = (uint64_t *)(counters + (size_t)my_id * PAGE);
    /* atomic: the other signal's handler may interrupt this one on the same thread */
    __atomic_fetch_add(&w[sig == SIGRTMIN ? 0 : 1], 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&w[2], (uint64_t)si->si_value.sival_int, __ATOMIC_RELAXED);
    __atomic_fetch_add(&handled_total, 1, __ATOMIC_RELAXED);
}

static uint64_t token(size_t id, long k)
{
    return pattern(7000 + id, (uint64_t)k);
}

static void *worker(void *arg)
{
    size_t id = (size_t)arg;
    my_id = (long)id;
    __atomic_add_fetch(&started, 1, __ATOMIC_RELEASE);
    uint8_t *slice = region + id * slice_pages * PAGE;
    for (long r = 0; r < rounds; r++) {
        check_zero(slice, slice_pages, "slice at the start of a round");
        fill_pages(slice, slice_pages, id + 1, (uint64_t)r * slice_pages);
        check_pages(slice, slice_pages, id + 1, (uint64_t)r * slice_pages, "slice after fill");
        if (madvise(slice, slice_pages * PAGE, MADV_DONTNEED) != 0)
            fail("madvise: %s", strerror(errno));
        uint64_t *dst = (uint64_t *)(slice + (size_t)(r % (long)slice_pages) * PAGE);
        ssize_t got;
        for (;;) {
            got = read(pipes[id][0], dst, sizeof *dst);
            if (got < 0 && errno == EINTR) {
                eintr[id]++;
                continue;
            }
            break;
        }
        if (got != (ssize_t)sizeof *dst)
            fail("worker %zu: read of token %ld returned %zd (%s)", id, r, got,
                 got < 0 ? strerror(errno) : "short");
        if (*dst != token(id, r))
            fail("worker %zu: token %ld reads %016llx, want %016llx", id, r,
                 (unsigned long long)*dst, (unsigned long long)token(id, r));
        __atomic_store_n(&tokens_read[id], r + 1, __ATOMIC_RELEASE);
        if (madvise(slice, slice_pages * PAGE, MADV_DONTNEED) != 0)
            fail("madvise: %s", strerror(errno));
    }
    __atomic_store_n(&done[id], 1, __ATOMIC_RELEASE);
    /* Every signal queued at this thread is delivered on a return to user mode. */
    while (!__atomic_load_n(&all_sent, __ATOMIC_ACQUIRE))
        sched_yield();
    uint64_t *w = (uint64_t *)(counters + id * PAGE);
    for (long spins = 0; (long)(__atomic_load_n(&w[0], __ATOMIC_RELAXED) + __atomic_load_n(&w[1], __ATOMIC_RELAXED)) < sent[id];
         spins++) {
        if (spins > 100000000L)
            fail("worker %zu: %ld signals sent, %llu handled", id, sent[id],
                 (unsigned long long)(w[0] + w[1]));
        sched_yield();
    }
    return NULL;
}

static void *signaller(void *arg)
{
    (void)arg;
    long written[MAX_WORKERS] = { 0 };
    /* a signal that came before a worker knew its id would not be counted */
    while (__atomic_load_n(&started, __ATOMIC_ACQUIRE) < (int)nworkers)
        sched_yield();
    for (long i = 0;; i++) {
        size_t busy = 0;
        for (size_t id = 0; id < nworkers; id++) {
            if (__atomic_load_n(&done[id], __ATOMIC_ACQUIRE))
                continue;
            busy++;
            long got = __atomic_load_n(&tokens_read[id], __ATOMIC_ACQUIRE);
            /* a bounded number of signals per round, so the storm paces with the rounds */
            if (sent[id] < (got + 1) * SIGNALS_PER_ROUND) {
                int sig = (i + (long)id) % 2 ? SIGRTMIN + 1 : SIGRTMIN;
                union sigval v = { .sival_int = 1 };
                int e = pthread_sigqueue(workers[id], sig, v);
                if (e == 0)
                    sent[id]++;
                else if (e != EAGAIN) /* EAGAIN: the queue limit, nothing was queued */
                    fail("pthread_sigqueue: %s", strerror(e));
            }
            if (written[id] < rounds && written[id] - got < MAX_OUTSTANDING) {
                uint64_t t = token(id, written[id]);
                if (write(pipes[id][1], &t, sizeof t) != (ssize_t)sizeof t)
                    fail("token write: %s", strerror(errno));
                written[id]++;
            }
        }
        if (busy == 0)
            break;
        if (i % 4 == 3)
            sched_yield();
    }
    __atomic_store_n(&all_sent, 1, __ATOMIC_RELEASE);
    return NULL;
}

int main(int argc, char **argv)
{
    umm_target_name = "sigstorm";
    nworkers = argc > 1 ? strtoul(argv[1], NULL, 0) : 16;
    rounds = argc > 2 ? strtol(argv[2], NULL, 0) : 200;
    slice_pages = argc > 3 ? strtoul(argv[3], NULL, 0) : 16;
    if (nworkers < 1 || nworkers > MAX_WORKERS || rounds < 1 || slice_pages < 1 || slice_pages > 4096)
        fail("usage: sigstorm [workers 1..%d] [rounds>=1] [slice_pages 1..4096]", MAX_WORKERS);
    region = map_anon(nworkers * slice_pages * PAGE, PROT_READ | PROT_WRITE);
    counters = map_anon(nworkers * PAGE, PROT_READ | PROT_WRITE);
    for (size_t i = 0; i < nworkers; i++)
        if (pipe(pipes[i]) != 0)
            fail("pipe: %s", strerror(errno));
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    if (sigaction(SIGRTMIN, &sa, NULL) != 0)
        fail("sigaction: %s", strerror(errno));
    sa.sa_flags = SA_SIGINFO;
    if (sigaction(SIGRTMIN + 1, &sa, NULL) != 0)
        fail("sigaction: %s", strerror(errno));
    for (size_t i = 0; i < nworkers; i++)
        if (pthread_create(&workers[i], NULL, worker, (void *)i) != 0)
            fail("pthread_create");
    pthread_t ts;
    if (pthread_create(&ts, NULL, signaller, NULL) != 0)
        fail("pthread_create");
    pthread_join(ts, NULL);
    for (size_t i = 0; i < nworkers; i++)
        pthread_join(workers[i], NULL);

    uint64_t h = 0;
    long total_sent = 0, restart = 0, norestart = 0, interrupted = 0;
    for (size_t id = 0; id < nworkers; id++) {
        uint64_t *w = (uint64_t *)(counters + id * PAGE);
        if ((long)(w[0] + w[1]) != sent[id] || (long)w[2] != sent[id])
            fail("worker %zu: %ld signals sent, handler counted %llu+%llu (values %llu)", id, sent[id],
                 (unsigned long long)w[0], (unsigned long long)w[1], (unsigned long long)w[2]);
        total_sent += sent[id];
        restart += (long)w[0];
        norestart += (long)w[1];
        interrupted += eintr[id];
        h = ck_add(h, token(id, rounds - 1));
    }
    if (handled_total != total_sent)
        fail("%ld signals sent, %ld handled in all", total_sent, handled_total);
    um_check(region);
    um_check(counters);
    printf("OK sigstorm checksum=%016llx workers=%zu rounds=%ld signals=%ld sa_restart=%ld "
           "no_restart=%ld eintr=%ld min_served=%ld registered=%d/%d%s\n",
           (unsigned long long)h, nworkers, rounds, total_sent, restart, norestart, interrupted,
           (long)nworkers * rounds * (long)slice_pages, um_registered, um_checked, um_missing_field());
    return 0;
}
