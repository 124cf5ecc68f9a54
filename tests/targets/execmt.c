/* execmt: exec from a multi-threaded process.
 *
 * Phase 1: 8 threads fault a registered region round after round (every page of a thread's
 * slice reads zero, is filled and verified, then zapped with MADV_DONTNEED). Once every thread
 * finished 3 rounds, thread 0 (not the main thread) prints "PHASE1 min_served=N" and execve()s
 * this program with "phase2": the kernel kills the other threads, which may be blocked in a
 * fault at that moment. Phase 2 (the new image, same pid): a fresh region read as zero,
 * filled, verified and checked to be registered (the agent handed the new image over too),
 * then the OK line.
 *
 * usage: execmt
 */
#include "umm_check.h"
#include <pthread.h>

#define THREADS 8
#define SLICE 64
#define ROUNDS_BEFORE_EXEC 3
#define PHASE2_PAGES 512

static uint8_t *region;
static int ready;
static char *self;

static void *worker(void *arg)
{
    size_t id = (size_t)arg;
    uint8_t *slice = region + id * SLICE * PAGE;
    for (long r = 0;; r++) {
        check_zero(slice, SLICE, "phase 1: slice at the start of a round");
        fill_pages(slice, SLICE, id + 1, (uint64_t)r);
        check_pages(slice, SLICE, id + 1, (uint64_t)r, "phase 1: slice after fill");
        if (madvise(slice, SLICE * PAGE, MADV_DONTNEED) != 0)
            fail("madvise: %s", strerror(errno));
        if (r + 1 == ROUNDS_BEFORE_EXEC)
            __atomic_add_fetch(&ready, 1, __ATOMIC_ACQ_REL);
        if (id == 0 && __atomic_load_n(&ready, __ATOMIC_ACQUIRE) == THREADS) {
            printf("PHASE1 min_served=%d\n", THREADS * SLICE * ROUNDS_BEFORE_EXEC);
            fflush(stdout);
            char *args[] = { self, "phase2", NULL };
            extern char **environ;
            execve(self, args, environ);
            fail("execve %s: %s", self, strerror(errno));
        }
    }
    return NULL;
}

static int phase2(void)
{
    uint8_t *fresh = map_anon(PHASE2_PAGES * PAGE, PROT_READ | PROT_WRITE);
    check_zero(fresh, PHASE2_PAGES, "phase 2: fresh region");
    fill_pages(fresh, PHASE2_PAGES, 77, 0);
    uint64_t h = check_pages(fresh, PHASE2_PAGES, 77, 0, "phase 2: region after fill");
    um_check(fresh);
    printf("OK execmt checksum=%016llx min_served=%d registered=%d/%d%s\n", (unsigned long long)h,
           PHASE2_PAGES, um_registered, um_checked, um_missing_field());
    return 0;
}

int main(int argc, char **argv)
{
    umm_target_name = "execmt";
    if (argc > 1 && strcmp(argv[1], "phase2") == 0)
        return phase2();
    self = realpath("/proc/self/exe", NULL);
    if (!self)
        fail("realpath /proc/self/exe: %s", strerror(errno));
    region = map_anon(THREADS * SLICE * PAGE, PROT_READ | PROT_WRITE);
    pthread_t t[THREADS];
    for (size_t i = 0; i < THREADS; i++)
        if (pthread_create(&t[i], NULL, worker, (void *)i) != 0)
            fail("pthread_create");
    for (size_t i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    fail("phase 1 ended without an exec");
}
