/* bench_fault: first-touch latency and whole-region touch times (figures 2 and 5).
 *
 *   bench_fault lat MODE NPAGES NTOUCH OUT
 *       Maps NPAGES pages of private anonymous memory and writes one byte to NTOUCH distinct
 *       pages of it in a random order, timing each write (clock_gettime around it): each is one
 *       page fault.
 *       Latencies (ns) go to OUT, one per line.
 *       MODE: plain   nothing else (natively: the kernel's anonymous first touch; under
 *                     `umm run` the agent registered the mapping and the manager serves it);
 *             handler the minimal in-process handler: the region is registered with a
 *                     userfaultfd of this process, and a handler thread blocks in poll(2),
 *                     reads one uffd_msg and answers with UFFDIO_COPY of one zero page.
 *             handler-proc  the same handler loop in a forked child process (the uffd is
 *                     inherited): the floor for any out-of-process manager, which pays a
 *                     switch between two address spaces per fault where a thread does not.
 *       RESULT n= registered=0|1 (the region's VmFlags has `um` after the run)
 *   bench_fault touch seq|rand BYTES
 *       Writes one byte to each page of BYTES of fresh anonymous memory, in address order or a
 *       random order; then reads them back. RESULT us= (the touch loop only)
 */
#include "bench.h"
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <sys/syscall.h>

static int uffd = -1;
static char zero_page[PAGE] __attribute__((aligned(4096)));

static void *handler(void *arg)
{
    (void)arg;
    struct pollfd pfd = { .fd = uffd, .events = POLLIN };
    for (;;) {
        if (poll(&pfd, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            fail("poll: %s", strerror(errno));
        }
        struct uffd_msg msg;
        ssize_t r = read(uffd, &msg, sizeof msg);
        if (r < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (r != sizeof msg)
            fail("read uffd: %s", r < 0 ? strerror(errno) : "short");
        if (msg.event != UFFD_EVENT_PAGEFAULT)
            continue;
        uint64_t page = msg.arg.pagefault.address & ~(PAGE - 1);
        struct uffdio_copy c = { .dst = page, .src = (uint64_t)zero_page, .len = PAGE, .mode = 0 };
        if (ioctl(uffd, UFFDIO_COPY, &c) != 0) {
            if (errno == EEXIST) {
                struct uffdio_range w = { .start = page, .len = PAGE };
                ioctl(uffd, UFFDIO_WAKE, &w);
            } else {
                fail("UFFDIO_COPY: %s", strerror(errno));
            }
        }
    }
    return NULL;
}

static pid_t handler_child = -1;

static void start_handler(char *region, uint64_t len, int in_child)
{
    zero_page[0] = 0; /* present before the clock starts */
    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        fail("userfaultfd: %s", strerror(errno));
    struct uffdio_api api = { .api = UFFD_API, .features = 0 };
    if (ioctl(uffd, UFFDIO_API, &api) != 0)
        fail("UFFDIO_API: %s", strerror(errno));
    struct uffdio_register reg = { .range = { .start = (uint64_t)region, .len = len },
                                   .mode = UFFDIO_REGISTER_MODE_MISSING };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0)
        fail("UFFDIO_REGISTER: %s", strerror(errno));
    if (in_child) {
        /* The child serves the parent's mm through the inherited fd, like a manager would. */
        handler_child = fork();
        if (handler_child < 0)
            fail("fork: %s", strerror(errno));
        if (handler_child == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            handler(NULL);
            _exit(0);
        }
        return;
    }
    pthread_t t;
    if (pthread_create(&t, NULL, handler, NULL) != 0)
        fail("pthread_create");
}

static int lat(const char *mode, uint64_t npages, uint64_t ntouch, const char *out)
{
    uint64_t len = npages * PAGE;
    char *region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED)
        fail("mmap: %s", strerror(errno));
    if (strcmp(mode, "handler") == 0)
        start_handler(region, len, 0);
    else if (strcmp(mode, "handler-proc") == 0)
        start_handler(region, len, 1);
    else if (strcmp(mode, "plain") != 0)
        fail("MODE must be plain, handler or handler-proc");
    rng_state = 0xFA17;
    uint32_t *perm = permutation(npages);
    if (ntouch > npages)
        ntouch = npages;
    uint32_t *l = malloc(ntouch * sizeof *l);
    if (!l)
        fail("malloc");
    for (uint64_t i = 0; i < ntouch; i++) {
        volatile char *p = region + (uint64_t)perm[i] * PAGE;
        uint64_t a = now_ns();
        *p = 1;
        l[i] = clamp32(now_ns() - a);
    }
    for (uint64_t i = 0; i < ntouch; i++)
        if (region[(uint64_t)perm[i] * PAGE] != 1)
            fail("page %lu lost its byte", (unsigned long)perm[i]);
    int reg = registered((uint64_t)region);
    if (handler_child > 0) {
        kill(handler_child, SIGKILL);
        waitpid(handler_child, NULL, 0);
    }
    write_latencies(out, l, ntouch);
    say("RESULT n=%lu registered=%d", (unsigned long)ntouch, reg);
    return 0;
}

static int touch(const char *order, uint64_t bytes)
{
    uint64_t npages = bytes / PAGE;
    char *region = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED)
        fail("mmap: %s", strerror(errno));
    uint32_t *perm = NULL;
    if (strcmp(order, "rand") == 0) {
        rng_state = 0x70C;
        perm = permutation(npages);
    } else if (strcmp(order, "seq") != 0) {
        fail("ORDER must be seq or rand");
    }
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < npages; i++)
        region[(perm ? perm[i] : i) * PAGE] = (char)(i | 1);
    uint64_t t1 = now_ns();
    for (uint64_t i = 0; i < npages; i++)
        if (region[(perm ? perm[i] : i) * PAGE] != (char)(i | 1))
            fail("page lost its byte");
    say("RESULT us=%lu pages=%lu registered=%d", (unsigned long)((t1 - t0) / 1000),
        (unsigned long)npages, registered((uint64_t)region));
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 6 && strcmp(argv[1], "lat") == 0)
        return lat(argv[2], parse_u64(argv[3], "NPAGES"), parse_u64(argv[4], "NTOUCH"), argv[5]);
    if (argc == 4 && strcmp(argv[1], "touch") == 0)
        return touch(argv[2], parse_u64(argv[3], "BYTES"));
    fail("usage: bench_fault lat plain|handler|handler-proc NPAGES NTOUCH OUT | touch seq|rand BYTES");
}
