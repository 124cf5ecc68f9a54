/* bench_scale: the programs of figure 6 (scale), run natively and under `umm run`.
 *
 *   bench_scale forks N
 *       Maps 64 MiB, touches its first MiB, then forks N children that all stay alive at once:
 *       each writes 4 pages of its own (faults in its own address space) and reports ready on a
 *       pipe, then waits for the parent's release (EOF on a second pipe).
 *       RESULT fork_us= ready_us= total_us=   (fork loop; until all N ready; until all reaped)
 *   bench_scale vmas N
 *       Maps N one-page private anonymous mappings one page apart (N VMAs that cannot merge),
 *       then writes each page once.
 *       RESULT mmap_us= touch_us= total_us= registered=FIRST/LAST (VmFlags um of the first
 *       and last mapping)
 *   bench_scale sparse GIB N
 *       Maps GIB GiB MAP_NORESERVE, touches one page per GiB, then forks N children alive at
 *       once, each writing 16 random pages of the sparse region; waits as for `forks`.
 *       RESULT fork_us= ready_us= total_us=
 */
#include "bench.h"
#include <sys/wait.h>

static int ready_pipe[2], release_pipe[2];

static void child_wait(void)
{
    close(ready_pipe[0]);
    close(release_pipe[1]);
    char c = 1;
    if (write(ready_pipe[1], &c, 1) != 1)
        _exit(2);
    while (read(release_pipe[0], &c, 1) > 0)
        ;
    _exit(0);
}

static int forks_common(uint64_t n, char *region, uint64_t len, uint64_t pages_each)
{
    if (pipe(ready_pipe) || pipe(release_pipe))
        fail("pipe: %s", strerror(errno));
    pid_t *kids = malloc(n * sizeof *kids);
    if (!kids)
        fail("malloc");
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) {
        pid_t p = fork();
        if (p < 0)
            fail("fork %lu: %s", (unsigned long)i, strerror(errno));
        if (p == 0) {
            rng_state = 0xC41D + i;
            for (uint64_t k = 0; k < pages_each; k++)
                region[(rnd() % (len / PAGE)) * PAGE] = (char)(k + 1);
            child_wait();
        }
        kids[i] = p;
    }
    uint64_t t1 = now_ns();
    close(ready_pipe[1]);
    close(release_pipe[0]);
    char buf[256];
    uint64_t got = 0;
    while (got < n) {
        ssize_t r = read(ready_pipe[0], buf, sizeof buf);
        if (r <= 0)
            fail("only %lu of %lu children became ready", (unsigned long)got, (unsigned long)n);
        got += (uint64_t)r;
    }
    uint64_t t2 = now_ns();
    close(release_pipe[1]);
    int bad = 0;
    for (uint64_t i = 0; i < n; i++) {
        int st;
        if (waitpid(kids[i], &st, 0) != kids[i] || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
            bad++;
    }
    uint64_t t3 = now_ns();
    if (bad)
        fail("%d children failed", bad);
    say("RESULT fork_us=%lu ready_us=%lu total_us=%lu", (unsigned long)((t1 - t0) / 1000),
        (unsigned long)((t2 - t0) / 1000), (unsigned long)((t3 - t0) / 1000));
    return 0;
}

static int forks(uint64_t n)
{
    uint64_t len = 64 * MIB;
    char *region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED)
        fail("mmap: %s", strerror(errno));
    for (uint64_t i = 0; i < MIB; i += PAGE)
        region[i] = 1;
    return forks_common(n, region, len, 4);
}

static int sparse(uint64_t gib, uint64_t n)
{
    uint64_t len = gib << 30;
    char *region = mmap(NULL, len, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region == MAP_FAILED)
        fail("mmap %lu GiB: %s", (unsigned long)gib, strerror(errno));
    for (uint64_t g = 0; g < gib; g++)
        region[g << 30] = 1;
    return forks_common(n, region, len, 16);
}

static int vmas(uint64_t n)
{
    uint64_t base = 0x180000000000UL;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) {
        void *want = (void *)(base + i * 2 * PAGE);
        void *p = mmap(want, PAGE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (p != want)
            fail("mmap %lu of %lu: %s", (unsigned long)i, (unsigned long)n, strerror(errno));
    }
    uint64_t t1 = now_ns();
    for (uint64_t i = 0; i < n; i++)
        *(volatile char *)(base + i * 2 * PAGE) = 1;
    uint64_t t2 = now_ns();
    int r1 = registered(base), r2 = registered(base + (n - 1) * 2 * PAGE);
    say("RESULT mmap_us=%lu touch_us=%lu total_us=%lu registered=%d/%d",
        (unsigned long)((t1 - t0) / 1000), (unsigned long)((t2 - t1) / 1000),
        (unsigned long)((t2 - t0) / 1000), r1, r2);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "forks") == 0)
        return forks(parse_u64(argv[2], "N"));
    if (argc == 3 && strcmp(argv[1], "vmas") == 0)
        return vmas(parse_u64(argv[2], "N"));
    if (argc == 4 && strcmp(argv[1], "sparse") == 0)
        return sparse(parse_u64(argv[2], "GIB"), parse_u64(argv[3], "N"));
    fail("usage: bench_scale forks N | vmas N | sparse GIB N");
}
