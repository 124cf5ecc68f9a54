/* criu_restorer: what `criu restore --lazy-pages` does on its side, for umm lazy-pages tests.
 *
 *   criu_restorer SOCKET [--hold] [--early-fill] TASK...
 *   TASK = PID:PPID:SEED:MAIN_START:MAIN_LEN:SCRATCH_START:SCRATCH_LEN:VMAS
 *   VMAS = START-END/START-END/...      (the task's lazy VMAs; numbers in C syntax)
 *
 * The first TASK is the root (PPID 0). Like CRIU, the tasks get the images' pids: the
 * restorer connects to SOCKET, makes a new pid namespace and creates each task with clone3
 * and set_tid (a child task from its parent task, before either maps anything). Each task
 * maps its lazy VMAs at their addresses (MAP_FIXED_NOREPLACE; a VMA that is not free is
 * skipped, reported as "SKIPPED ..."), opens a userfaultfd, does UFFDIO_API with
 * EVENT_FORK/REMAP/REMOVE/UNMAP, sends its pid (an int) and then the uffd by SCM_RIGHTS on one
 * dummy byte, and only then, as CRIU 4.2's restorer does (criu/pie/restorer.c: vma_remap, then
 * enable_uffd), registers the VMAs (MISSING), after a pause that lets a daemon that fills too
 * early find nothing registered; then it closes its uffd. Once every task registered, the
 * restorer sends the u32 0x52535446 (RSTF) and closes the connection.
 *
 * Then each task, with its pages still missing: forks a grandchild that verifies the first
 * 8 MiB of the main area, checks that every word of the scratch area is its pattern or zero
 * (memtest's scratch), drops the scratch area's second half (MADV_DONTNEED: it must read zero
 * after, never the image's data), refills and checks it, verifies the main area twice, and
 * prints "OK criu_task pid=P main_bad=0 scratch_bad=0 zero_bad=0 grandchild=0 ...".
 * --hold: after the handoff the tasks print "HANDED pid=P" and sleep (fail-stop tests).
 * --early-fill: after registering, each task waits (up to 30 s) until the daemon's background
 * fill made a page of its lazy VMAs resident (mincore, which faults nothing) before it counts
 * as restored, so RSTF comes only after that: a daemon that holds its fill until RSTF fails.
 * Exit status 0 only if every task exited 0.
 */
#include "umm_check.h"

#include <linux/sched.h>
#include <linux/userfaultfd.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>

#ifndef __NR_clone3
#define __NR_clone3 435
#endif
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define MAX_TASKS 8
#define MAX_VMAS 32
#define RSTF 0x52535446u

struct task {
    int pid, ppid;
    uint64_t seed, main_start, main_len, scratch_start, scratch_len;
    int nvmas;
    uint64_t vma[MAX_VMAS][2];
};

static struct task tasks[MAX_TASKS];
static int ntasks, hold, early_fill, sk, lock_pipe[2], done_pipe[2];

static inline uint64_t pat(uint64_t i, uint64_t seed)
{
    uint64_t z = i + seed * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void say(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf)
        n = sizeof buf;
    if (write(1, buf, n) < 0) {
        /* nothing to do */
    }
}

static uint64_t num(char **s)
{
    char *end;
    uint64_t v = strtoull(*s, &end, 0);
    if (end == *s)
        fail("bad number at '%s'", *s);
    *s = end;
    return v;
}

static void expect(char **s, char c)
{
    if (**s != c)
        fail("expected '%c' at '%s'", c, *s);
    (*s)++;
}

static void parse_task(char *s, struct task *t)
{
    t->pid = num(&s), expect(&s, ':');
    t->ppid = num(&s), expect(&s, ':');
    t->seed = num(&s), expect(&s, ':');
    t->main_start = num(&s), expect(&s, ':');
    t->main_len = num(&s), expect(&s, ':');
    t->scratch_start = num(&s), expect(&s, ':');
    t->scratch_len = num(&s), expect(&s, ':');
    while (*s && t->nvmas < MAX_VMAS) {
        t->vma[t->nvmas][0] = num(&s), expect(&s, '-');
        t->vma[t->nvmas][1] = num(&s);
        t->nvmas++;
        if (*s == '/')
            s++;
    }
}

/* A new process with pid `pid` in the current pid namespace (CRIU's way: set_tid). */
static pid_t clone_with_pid(int pid)
{
    pid_t tid = pid;
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.exit_signal = SIGCHLD;
    args.set_tid = (uint64_t)(uintptr_t)&tid;
    args.set_tid_size = 1;
    long r = syscall(__NR_clone3, &args, sizeof args);
    if (r < 0)
        fail("clone3 with set_tid %d: %s", pid, strerror(errno));
    return (pid_t)r;
}

static void send_handoff(int pid, int uffd)
{
    char c;
    if (read(lock_pipe[0], &c, 1) != 1)
        fail("lock pipe: %s", strerror(errno));
    if (send(sk, &pid, sizeof pid, 0) != sizeof pid)
        fail("sending pid %d: %s", pid, strerror(errno));
    char dummy = '*';
    struct iovec iov = {.iov_base = &dummy, .iov_len = 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = sizeof u.buf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &uffd, sizeof(int));
    if (sendmsg(sk, &msg, 0) != 1)
        fail("sending the uffd of pid %d: %s", pid, strerror(errno));
    if (write(lock_pipe[1], "x", 1) != 1)
        fail("lock pipe: %s", strerror(errno));
}

#define MAX_VMA_PAGES_PROBED 8192

/* --early-fill: wait until the daemon's fill made some page of a lazy VMA resident. mincore
 * reads page tables only, so it never faults a missing page in. */
static void wait_for_fill(const struct task *t, const int *mapped)
{
    static unsigned char vec[MAX_VMA_PAGES_PROBED];
    for (int tries = 0; tries < 3000; tries++) {
        for (int i = 0; i < t->nvmas; i++) {
            if (!mapped[i])
                continue;
            uint64_t len = t->vma[i][1] - t->vma[i][0];
            if (len > (uint64_t)MAX_VMA_PAGES_PROBED * PAGE)
                len = (uint64_t)MAX_VMA_PAGES_PROBED * PAGE;
            if (mincore((void *)t->vma[i][0], len, vec))
                fail("mincore %#lx: %s", t->vma[i][0], strerror(errno));
            for (uint64_t p = 0; p < len / PAGE; p++)
                if (vec[p] & 1) {
                    say("EARLY_FILL pid=%d vma=%#lx tries=%d\n", t->pid, t->vma[i][0], tries);
                    return;
                }
        }
        usleep(10000);
    }
    fail("pid %d: no lazy page became resident before RSTF (does the daemon hold its fill "
         "until RSTF?)", t->pid);
}

static int map_and_hand_over(struct task *t)
{
    int mapped[MAX_VMAS] = {0};
    for (int i = 0; i < t->nvmas; i++) {
        uint64_t s = t->vma[i][0], e = t->vma[i][1];
        void *p = mmap((void *)s, e - s, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (p == MAP_FAILED || (uint64_t)p != s) {
            say("SKIPPED pid=%d start=%#lx end=%#lx (%s)\n", t->pid, s, e,
                p == MAP_FAILED ? strerror(errno) : "placed elsewhere");
            if (p != MAP_FAILED)
                munmap(p, e - s);
            continue;
        }
        mapped[i] = 1;
        say("MAPPED pid=%d start=%#lx end=%#lx\n", t->pid, s, e);
    }
    int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        fail("userfaultfd: %s", strerror(errno));
    struct uffdio_api api = {.api = UFFD_API,
                             .features = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP |
                                         UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP};
    if (ioctl(uffd, UFFDIO_API, &api))
        fail("UFFDIO_API: %s", strerror(errno));
    send_handoff(getpid(), uffd);
    /* The daemon has the uffd and nothing is registered yet (CRIU's restorer is still moving
     * the VMAs into place): a fill now must not count these pages as done. */
    usleep(200 * 1000);
    for (int i = 0; i < t->nvmas; i++) {
        if (!mapped[i])
            continue;
        struct uffdio_register reg = {
            .range = {.start = t->vma[i][0], .len = t->vma[i][1] - t->vma[i][0]},
            .mode = UFFDIO_REGISTER_MODE_MISSING};
        if (ioctl(uffd, UFFDIO_REGISTER, &reg))
            fail("UFFDIO_REGISTER %#lx-%#lx: %s", t->vma[i][0], t->vma[i][1], strerror(errno));
    }
    if (early_fill)
        wait_for_fill(t, mapped);
    /* As CRIU's restored tasks: the daemon holds the only copy from now on. */
    close(uffd);
    close(sk);
    if (write(done_pipe[1], "x", 1) != 1)
        fail("done pipe: %s", strerror(errno));
    return 0;
}

static int wait_unregistered(void);

static int verify_task(struct task *t)
{
    const uint64_t *m = (const uint64_t *)t->main_start;
    uint64_t *sc = (uint64_t *)t->scratch_start;
    size_t mn = t->main_len / 8, sn = t->scratch_len / 8;
    size_t gn = mn < (8UL << 20) / 8 ? mn : (8UL << 20) / 8;

    /* Fork first, with pages still missing: the child must get them too. */
    pid_t g = fork();
    if (g < 0)
        fail("fork: %s", strerror(errno));
    if (g == 0) {
        long bad = 0;
        for (size_t i = 0; i < gn; i++)
            bad += m[i] != pat(i, t->seed);
        _exit(bad ? 1 : 0);
    }
    long scratch_bad = 0, zero_bad = 0, main_bad = 0;
    for (size_t i = 0; i < sn; i++)
        scratch_bad += sc[i] != 0 && sc[i] != pat(i, t->seed + 100);
    /* Drop the second half: it must read zero, never the image's contents. */
    size_t half = sn / 2;
    if (madvise(sc + half, (sn - half) * 8, MADV_DONTNEED))
        fail("madvise: %s", strerror(errno));
    for (size_t i = half; i < sn; i++)
        zero_bad += sc[i] != 0;
    for (size_t i = half; i < sn; i++)
        sc[i] = pat(i, t->seed + 100);
    for (size_t i = half; i < sn; i++)
        scratch_bad += sc[i] != pat(i, t->seed + 100);
    uint64_t sum = 0;
    for (int pass = 0; pass < 2; pass++)
        for (size_t i = 0; i < mn; i++) {
            main_bad += m[i] != pat(i, t->seed);
            sum += m[i];
        }
    int st = 0;
    if (waitpid(g, &st, 0) != g)
        fail("waitpid grandchild: %s", strerror(errno));
    int gc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    int unregistered = wait_unregistered();
    say("OK criu_task pid=%d main_bad=%ld scratch_bad=%ld zero_bad=%ld grandchild=%d "
        "unregistered=%d main_pages=%zu checksum=%016lx\n",
        t->pid, main_bad, scratch_bad, zero_bad, gc, unregistered, mn * 8 / PAGE, sum);
    return main_bad || scratch_bad || zero_bad || gc || !unregistered;
}

/* Whether any VMA of this process is still registered with a userfaultfd ("um" in smaps). */
static int still_registered(void)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f)
        fail("/proc/self/smaps: %s", strerror(errno));
    char line[1024];
    int found = 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmFlags:", 8) && strstr(line, " um"))
            found = 1;
    fclose(f);
    return found;
}

/* Wait for the daemon to complete this task's restore (it then unregisters every range, so
 * the task never exits with pages unserved); bounded, so a broken daemon gives a failure. */
static int wait_unregistered(void)
{
    for (int i = 0; i < 6000; i++) {
        if (!still_registered())
            return 1;
        usleep(10000);
    }
    return 0;
}

/* Wait for every child; 0 only if each exited 0. */
static int reap_all(const char *who)
{
    int rc = 0, st;
    pid_t p;
    while ((p = wait(&st)) > 0) {
        if (WIFEXITED(st))
            say("EXIT %s child=%d status=%d\n", who, p, WEXITSTATUS(st));
        else
            say("EXIT %s child=%d signal=%d\n", who, p, WTERMSIG(st));
        if (!WIFEXITED(st) || WEXITSTATUS(st))
            rc = 1;
    }
    return rc;
}

__attribute__((noreturn)) static void run_task(int idx)
{
    struct task *t = &tasks[idx];
    umm_target_name = "criu_task";
    if (getpid() != t->pid)
        fail("got pid %d, wanted %d", getpid(), t->pid);
    /* Children first: they must not inherit this task's mappings. */
    for (int i = 0; i < ntasks; i++)
        if (tasks[i].ppid == t->pid && clone_with_pid(tasks[i].pid) == 0)
            run_task(i);
    map_and_hand_over(t);
    if (hold) {
        say("HANDED pid=%d\n", t->pid);
        for (int i = 0; i < 120; i++)
            sleep(1);
        _exit(3);
    }
    int rc = verify_task(t);
    rc |= reap_all("task");
    exit(rc);
}

int main(int argc, char **argv)
{
    umm_target_name = "criu_restorer";
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 3)
        fail("usage: criu_restorer SOCKET [--hold] TASK...");
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--hold"))
            hold = 1;
        else if (!strcmp(argv[i], "--early-fill"))
            early_fill = 1;
        else if (ntasks < MAX_TASKS)
            parse_task(argv[i], &tasks[ntasks++]);
    }
    if (!ntasks || tasks[0].ppid != 0)
        fail("the first task must be the root (PPID 0)");
    sk = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", argv[1]);
    if (connect(sk, (struct sockaddr *)&sa, sizeof sa))
        fail("connect %s: %s", argv[1], strerror(errno));
    if (pipe(lock_pipe) || pipe(done_pipe) || write(lock_pipe[1], "x", 1) != 1)
        fail("pipe: %s", strerror(errno));
    if (unshare(CLONE_NEWPID))
        fail("unshare(CLONE_NEWPID): %s", strerror(errno));
    pid_t init = fork();
    if (init < 0)
        fail("fork: %s", strerror(errno));
    if (init == 0) {
        /* pid 1 of the new namespace: creates the root task, then reaps. */
        umm_target_name = "criu_init";
        if (clone_with_pid(tasks[0].pid) == 0)
            run_task(0);
        close(sk);
        exit(reap_all("init"));
    }
    /* Only the tasks (and init) write here: if they all die first, the read sees EOF. */
    close(done_pipe[1]);
    for (int i = 0; i < ntasks; i++) {
        char c;
        if (read(done_pipe[0], &c, 1) != 1)
            fail("a task died before its handoff and registration");
    }
    uint32_t fin = RSTF;
    if (send(sk, &fin, sizeof fin, 0) != sizeof fin)
        fail("sending RSTF: %s", strerror(errno));
    close(sk);
    int st = 0;
    if (waitpid(init, &st, 0) != init)
        fail("waitpid: %s", strerror(errno));
    return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}
