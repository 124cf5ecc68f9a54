/* forkmany: N forked children (default 1000) alive at once under one manager, each verifying
 * the memory it inherited and faulting fresh memory of its own.
 *
 * The parent fills T pages and zaps U more (missing) before forking. Child k verifies T, reads
 * U as zero (missing in the parent, so missing in the child: only a manager holding the
 * child's FORK uffd can fill it), writes its own pattern into U and verifies it, reports ready
 * on a pipe and waits until the parent closes the release pipe (so all N are alive at once),
 * then verifies T and U once more and exits. The parent reaps all, checks every exit status,
 * and checks that its own T is intact and U still reads zero (the children's writes are
 * private).
 *
 * usage: forkmany [children=1000]
 */
#include "umm_check.h"
#include <sys/wait.h>

#define T 16
#define U 8

int main(int argc, char **argv)
{
    umm_target_name = "forkmany";
    long n = argc > 1 ? strtol(argv[1], NULL, 0) : 1000;
    if (n < 1 || n > 4000)
        fail("children must be 1..4000");
    uint8_t *region = map_anon((T + U) * PAGE, PROT_READ | PROT_WRITE);
    fill_pages(region, T, 1, 0);
    if (madvise(region + T * PAGE, U * PAGE, MADV_DONTNEED) != 0)
        fail("madvise: %s", strerror(errno));
    um_check(region);
    int ready[2], release[2];
    if (pipe(ready) || pipe(release))
        fail("pipe: %s", strerror(errno));
    pid_t *pids = calloc((size_t)n, sizeof *pids);
    if (!pids)
        fail("calloc");
    for (long k = 0; k < n; k++) {
        pid_t p = fork();
        if (p < 0)
            fail("fork %ld of %ld: %s", k, n, strerror(errno));
        if (p == 0) {
            close(ready[0]);
            close(release[1]);
            check_pages(region, T, 1, 0, "child: inherited T");
            check_zero(region + T * PAGE, U, "child: U missing in the parent");
            fill_pages(region + T * PAGE, U, 100 + (uint64_t)k, 0);
            check_pages(region + T * PAGE, U, 100 + (uint64_t)k, 0, "child: own U");
            char c = 'r';
            if (write(ready[1], &c, 1) != 1)
                fail("child %ld: ready: %s", k, strerror(errno));
            char b;
            while (read(release[0], &b, 1) > 0) {
            }
            check_pages(region, T, 1, 0, "child after the release: inherited T");
            check_pages(region + T * PAGE, U, 100 + (uint64_t)k, 0, "child after the release: own U");
            _exit(0);
        }
        pids[k] = p;
    }
    close(ready[1]);
    close(release[0]);
    for (long k = 0; k < n; k++) {
        char c;
        ssize_t r;
        do
            r = read(ready[0], &c, 1);
        while (r < 0 && errno == EINTR);
        if (r != 1)
            fail("only %ld of %ld children got ready", k, n);
    }
    long alive = n; /* every child is blocked on the release pipe now */
    close(release[1]);
    for (long k = 0; k < n; k++) {
        int st;
        pid_t r;
        do
            r = waitpid(pids[k], &st, 0);
        while (r < 0 && errno == EINTR);
        if (r != pids[k])
            fail("waitpid %d: %s", (int)pids[k], strerror(errno));
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            fail("child %ld: status %#x", k, st);
    }
    uint64_t h = check_pages(region, T, 1, 0, "parent: T after the children");
    check_zero(region + T * PAGE, U, "parent: U after the children");
    h = ck_add(h, (uint64_t)n);
    printf("OK forkmany checksum=%016llx children=%ld alive_at_once=%ld child_min_served=%ld "
           "registered=%d/%d%s\n",
           (unsigned long long)h, n, alive, n * U, um_registered, um_checked, um_missing_field());
    return 0;
}
