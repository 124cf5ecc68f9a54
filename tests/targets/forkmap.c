/* forkmap: waits for a byte on a fifo (the gate: it is attached meanwhile), then forks a
 * child that maps new memory and checks, before touching it, whether that memory is already
 * registered with a userfaultfd (what `umm attach --strict` does at the mmap's return, in
 * forked children too). The child fills and verifies the memory; the parent verifies memory
 * of its own mapped after the fork, then reaps the child.
 *
 * usage: forkmap GATE
 * Ends with: OK forkmap checksum=<hex> child_registered=0|1 parent_registered=0|1
 */
#include "umm_check.h"
#include <sys/wait.h>

#define PAGES 4096UL /* 16 MiB */

/* Map, check the registration before any touch, fill, verify; returns the checksum. */
static uint64_t map_and_check(uint64_t seed, int *registered)
{
    void *p = map_anon(PAGES * PAGE, PROT_READ | PROT_WRITE);
    *registered = vma_has_flag(p, "um") == 1;
    fill_pages(p, PAGES, seed, 0);
    return check_pages(p, PAGES, seed, 0, "new mapping");
}

int main(int argc, char **argv)
{
    umm_target_name = "forkmap";
    if (argc < 2)
        fail("usage: forkmap GATE");
    char c;
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0 || read(fd, &c, 1) != 1)
        fail("gate %s: %s", argv[1], strerror(errno));
    close(fd);
    int pipefd[2];
    if (pipe(pipefd))
        fail("pipe: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0)
        fail("fork: %s", strerror(errno));
    if (pid == 0) {
        int reg;
        uint64_t sum = map_and_check(7, &reg);
        char line[64];
        int n = snprintf(line, sizeof line, "%016llx %d", (unsigned long long)sum, reg);
        if (write(pipefd[1], line, (size_t)n) != n)
            fail("write: %s", strerror(errno));
        _exit(0);
    }
    close(pipefd[1]);
    int preg;
    uint64_t sum = map_and_check(8, &preg);
    char line[64] = { 0 };
    if (read(pipefd[0], line, sizeof line - 1) <= 0)
        fail("the child reported nothing");
    unsigned long long csum;
    int creg;
    if (sscanf(line, "%llx %d", &csum, &creg) != 2)
        fail("child said %s", line);
    int st;
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        fail("child failed (status %#x)", st);
    printf("OK forkmap checksum=%016llx child_registered=%d parent_registered=%d\n",
           (unsigned long long)ck_add(sum, csum), creg, preg);
    return 0;
}
