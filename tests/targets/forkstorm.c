/* forkstorm: a parent forks many children (some of which fork grandchildren) over one region.
 *
 * Region layout (pages):  [0, T) touched by the parent before any fork
 *                         [T, T+U) never touched by the parent; every child reads it
 *                         [T+U, T+U+D) touched by nobody but grandchildren (and the parent at
 *                         the very end)
 * Child c: [0,T) must hold the parent's data (inherited), [T,T+U) must read zero (missing in
 * the parent, so missing in the child: served in the child's own address space); then it
 * writes its own pattern into both and verifies it. Every 8th child forks 2 grandchildren that
 * check the child's data, read D as zero, write their own pattern everywhere and verify it.
 * The parent keeps at most `maxconc` children alive, checks every exit status, and at the end
 * checks that its own memory is untouched by the children's writes (COW) and that U and D
 * still read zero in its own address space.
 * min_served counts the pages that are surely missing in an address space when it touches them:
 * U in every child, D in every grandchild, U and D in the parent at the end (U and D are zapped
 * with MADV_DONTNEED before anything forks, so a manager's fault-around in the parent or child
 * cannot have filled them in advance).
 *
 * usage: forkstorm [children=128] [maxconc=32]
 */
#include "umm_check.h"
#include <sys/wait.h>

#define T 256
#define U 256
#define D 64
#define GRAND_EVERY 8
#define GRAND_PER 2

static uint8_t *region;

static int wait_one(pid_t pid, const char *who, long idx)
{
    int st;
    pid_t r;
    do
        r = waitpid(pid, &st, 0);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        fail("waitpid(%s): %s", who, strerror(errno));
    if (WIFSIGNALED(st))
        fail("%s %ld (pid %d) killed by signal %d", who, idx, (int)r, WTERMSIG(st));
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        fail("%s %ld (pid %d) exited with status %d", who, idx, (int)r, WEXITSTATUS(st));
    return 0;
}

static void grandchild(long c, int g)
{
    check_pages(region, T, 100 + c, 0, "grandchild: child's data in T");
    check_pages(region + T * PAGE, U, 100 + c, T, "grandchild: child's data in U");
    check_zero(region + (T + U) * PAGE, D, "grandchild: never-touched D");
    uint64_t seed = 100000 + c * GRAND_PER + g;
    fill_pages(region, T + U + D, seed, 0);
    check_pages(region, T + U + D, seed, 0, "grandchild: own pattern");
    _exit(0);
}

static void child(long c)
{
    check_pages(region, T, 1, 0, "child: parent's data in T");
    check_zero(region + T * PAGE, U, "child: parent's never-touched U");
    fill_pages(region, T + U, 100 + c, 0);
    check_pages(region, T + U, 100 + c, 0, "child: own pattern");
    if (c % GRAND_EVERY == 0) {
        /* the child's faults on U may have been answered with pages of D too (fault-around):
         * zap D so it is missing in the child when it forks */
        if (madvise(region + (T + U) * PAGE, D * PAGE, MADV_DONTNEED) != 0)
            fail("child %ld: madvise: %s", c, strerror(errno));
        pid_t g[GRAND_PER];
        for (int i = 0; i < GRAND_PER; i++) {
            g[i] = fork();
            if (g[i] < 0)
                fail("child %ld: fork: %s", c, strerror(errno));
            if (g[i] == 0)
                grandchild(c, i);
        }
        for (int i = 0; i < GRAND_PER; i++)
            wait_one(g[i], "grandchild", i);
        /* the grandchildren's writes must not show through in the child */
        check_pages(region, T + U, 100 + c, 0, "child after grandchildren");
    }
    _exit(0);
}

int main(int argc, char **argv)
{
    umm_target_name = "forkstorm";
    long n = argc > 1 ? strtol(argv[1], NULL, 0) : 128;
    long maxconc = argc > 2 ? strtol(argv[2], NULL, 0) : 32;
    if (n < 1 || n > 4096 || maxconc < 1 || maxconc > 256)
        fail("usage: forkstorm [children 1..4096] [maxconc 1..256]");
    setvbuf(stdout, NULL, _IONBF, 0);
    region = map_anon((T + U + D) * PAGE, PROT_READ | PROT_WRITE);
    fill_pages(region, T, 1, 0);
    /* A manager may answer the faults on T with more pages (fault-around), filling U and D in
     * the parent, and the children would inherit them. Zap U and D so they are surely missing
     * in the parent when it forks; it does not touch the region again until all are done. */
    if (madvise(region + T * PAGE, (U + D) * PAGE, MADV_DONTNEED) != 0)
        fail("madvise: %s", strerror(errno));

    long alive = 0, reaped = 0, grandchildren = 0;
    for (long c = 0; c < n; c++) {
        while (alive >= maxconc) {
            wait_one(-1, "child", -1);
            alive--;
            reaped++;
        }
        pid_t pid = fork();
        if (pid < 0)
            fail("fork of child %ld: %s", c, strerror(errno));
        if (pid == 0)
            child(c);
        alive++;
        if (c % GRAND_EVERY == 0)
            grandchildren += GRAND_PER;
    }
    while (alive > 0) {
        wait_one(-1, "child", -1);
        alive--;
        reaped++;
    }
    if (reaped != n)
        fail("reaped %ld children, forked %ld", reaped, n);
    int st;
    if (waitpid(-1, &st, WNOHANG) != -1 || errno != ECHILD)
        fail("a child is left after all were reaped");

    uint64_t h = check_pages(region, T, 1, 0, "parent: own data after children wrote theirs (COW)");
    check_zero(region + T * PAGE, U + D, "parent: never-touched U and D after children");
    h = ck_add(h, (uint64_t)n);
    h = ck_add(h, (uint64_t)grandchildren);
    um_check(region);
    long min_served = n * U + grandchildren * D + U + D;
    printf("OK forkstorm checksum=%016llx children=%ld grandchildren=%ld min_served=%ld "
           "registered=%d/%d%s uid=%d\n",
           (unsigned long long)h, n, grandchildren, min_served, um_registered, um_checked, um_missing_field(), (int)getuid());
    return 0;
}
