/* forkloop: a parent forks children over and over (at most MAXCONC alive) until killed or N
 * were reaped. Used to kill a target tree (or its manager) in the middle of a fork storm.
 *
 * The parent fills T pages before the first fork and leaves U pages missing. Each child
 * verifies T (inherited), reads U as zero (missing in the parent, so served in the child's own
 * address space), writes its own pattern into U and verifies it; every 4th child forks a
 * grandchild that verifies the child's data. "RUNNING forkloop" is printed (flushed) once the
 * first child was reaped.
 *
 * usage: forkloop [children=0 (until killed)] [maxconc=8]
 */
#include "umm_check.h"
#include <sys/wait.h>

#define T 32
#define U 32

static uint8_t *region;

static void reap(pid_t pid)
{
    int st;
    pid_t r;
    do
        r = waitpid(pid, &st, 0);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        fail("waitpid: %s", strerror(errno));
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        fail("child %d: status %#x", (int)r, st);
}

static void child(long c)
{
    check_pages(region, T, 1, 0, "child: inherited T");
    check_zero(region + T * PAGE, U, "child: U missing in the parent");
    fill_pages(region + T * PAGE, U, 100 + (uint64_t)c, 0);
    check_pages(region + T * PAGE, U, 100 + (uint64_t)c, 0, "child: own U");
    if (c % 4 == 0) {
        pid_t g = fork();
        if (g < 0)
            fail("child fork: %s", strerror(errno));
        if (g == 0) {
            check_pages(region + T * PAGE, U, 100 + (uint64_t)c, 0, "grandchild: child's U");
            _exit(0);
        }
        reap(g);
    }
    _exit(0);
}

int main(int argc, char **argv)
{
    umm_target_name = "forkloop";
    long n = argc > 1 ? strtol(argv[1], NULL, 0) : 0;
    long maxconc = argc > 2 ? strtol(argv[2], NULL, 0) : 8;
    if (n < 0 || maxconc < 1 || maxconc > 256)
        fail("usage: forkloop [children>=0] [maxconc 1..256]");
    region = map_anon((T + U) * PAGE, PROT_READ | PROT_WRITE);
    fill_pages(region, T, 1, 0);
    if (madvise(region + T * PAGE, U * PAGE, MADV_DONTNEED) != 0)
        fail("madvise: %s", strerror(errno));
    long forked = 0, reaped = 0, alive = 0;
    while (n == 0 || reaped < n) {
        while (alive < maxconc && (n == 0 || forked < n)) {
            pid_t p = fork();
            if (p < 0)
                fail("fork: %s", strerror(errno));
            if (p == 0)
                child(forked);
            forked++;
            alive++;
        }
        reap(-1);
        alive--;
        if (++reaped == 1) {
            static const char msg[] = "RUNNING forkloop\n";
            ssize_t w = write(1, msg, sizeof msg - 1);
            (void)w;
        }
    }
    uint64_t h = check_pages(region, T, 1, 0, "parent: T after the children");
    check_zero(region + T * PAGE, U, "parent: U after the children");
    printf("OK forkloop checksum=%016llx children=%ld\n", (unsigned long long)h, reaped);
    return 0;
}
