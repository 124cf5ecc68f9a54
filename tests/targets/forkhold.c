/* forkhold: a parent keeps N forked children alive at once (each verifies inherited memory
 * and maps, writes and verifies memory of its own), then releases them all and checks their
 * exit statuses. Under a manager with few file descriptors, the FORK events run it out of fds
 * (each child's uffd is installed in the manager's fd table): the parent must never stay
 * blocked in fork(). */
#include "umm_check.h"
#include <sys/wait.h>

int main(int argc, char **argv)
{
    umm_target_name = "forkhold";
    int n = argc > 1 ? atoi(argv[1]) : 64;
    if (n < 1 || n > 1024)
        fail("children must be 1..1024");
    size_t len = 64 * PAGE;
    uint64_t *mem = map_anon(len, PROT_READ | PROT_WRITE);
    for (size_t i = 0; i < len / 8; i++)
        mem[i] = pattern(1, i);
    int ready[2], release[2];
    if (pipe(ready) || pipe(release))
        fail("pipe: %s", strerror(errno));
    pid_t *pids = calloc((size_t)n, sizeof *pids);
    for (int k = 0; k < n; k++) {
        pid_t p = fork();
        if (p < 0)
            fail("fork %d: %s", k, strerror(errno));
        if (p == 0) {
            close(ready[0]);
            close(release[1]);
            for (size_t i = 0; i < len / 8; i++)
                if (mem[i] != pattern(1, i))
                    fail("child %d: inherited word %zu differs", k, i);
            uint64_t *own = map_anon(16 * PAGE, PROT_READ | PROT_WRITE);
            for (size_t i = 0; i < 16 * WORDS_PER_PAGE; i++)
                own[i] = pattern(100 + (uint64_t)k, i);
            for (size_t i = 0; i < 16 * WORDS_PER_PAGE; i++)
                if (own[i] != pattern(100 + (uint64_t)k, i))
                    fail("child %d: own word %zu differs", k, i);
            char c = 'r';
            if (write(ready[1], &c, 1) != 1)
                fail("child %d: ready: %s", k, strerror(errno));
            char b;
            while (read(release[0], &b, 1) > 0) {
            }
            _exit(0);
        }
        pids[k] = p;
    }
    close(ready[1]);
    close(release[0]);
    for (int k = 0; k < n; k++) {
        char c;
        if (read(ready[0], &c, 1) != 1)
            fail("only %d of %d children got ready", k, n);
    }
    close(release[1]);
    for (int k = 0; k < n; k++) {
        int st;
        if (waitpid(pids[k], &st, 0) != pids[k])
            fail("waitpid %d: %s", (int)pids[k], strerror(errno));
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            fail("child %d: status %#x", k, st);
    }
    uint64_t h = 0;
    for (size_t i = 0; i < len / 8; i++) {
        if (mem[i] != pattern(1, i))
            fail("parent word %zu changed", i);
        h = ck_add(h, mem[i]);
    }
    printf("OK forkhold checksum=%016llx children=%d\n", (unsigned long long)h, n);
    return 0;
}
