/* attachloop: N attach/detach cycles, one after the other. Each cycle posix_spawn()s PROG
 * (default /bin/true) with the agent preloaded, UMM_SOCKET set and UMM_REQUIRE=1: the agent
 * hands the process over in its constructor (or exits 1 if it cannot), the program exits, and
 * the manager must notice and free what it held. This driver itself runs without the agent.
 *
 * usage: attachloop N AGENT SOCKET [PROG]
 */
#include "umm_check.h"
#include <spawn.h>
#include <sys/wait.h>

extern char **environ;

int main(int argc, char **argv)
{
    umm_target_name = "attachloop";
    (void)map_anon; /* the header's helper, unused here */
    if (argc < 4)
        fail("usage: attachloop N AGENT SOCKET [PROG]");
    long n = strtol(argv[1], NULL, 0);
    const char *prog = argc > 4 ? argv[4] : "/bin/true";
    char preload[4096], socket[4096];
    snprintf(preload, sizeof preload, "LD_PRELOAD=%s", argv[2]);
    snprintf(socket, sizeof socket, "UMM_SOCKET=%s", argv[3]);
    char *envp[] = { preload, socket, "UMM_REQUIRE=1", "PATH=/usr/bin:/bin", NULL };
    char *args[] = { (char *)prog, NULL };
    for (long i = 0; i < n; i++) {
        pid_t pid;
        int e = posix_spawn(&pid, prog, NULL, NULL, args, envp);
        if (e != 0)
            fail("cycle %ld: posix_spawn %s: %s", i, prog, strerror(e));
        int st;
        pid_t r;
        do
            r = waitpid(pid, &st, 0);
        while (r < 0 && errno == EINTR);
        if (r != pid)
            fail("cycle %ld: waitpid: %s", i, strerror(errno));
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            fail("cycle %ld: %s status %#x (exit 1: not managed, UMM_REQUIRE=1)", i, prog, st);
    }
    printf("OK attachloop checksum=%016llx cycles=%ld\n", (unsigned long long)ck_add(0, (uint64_t)n), n);
    return 0;
}
