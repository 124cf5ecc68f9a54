/* bench_ceiling: the hardware ceiling of figure 1 — a minimal in-process fill: one thread, no
 * layout tracking, no protocol, UFFDIO_COPY of an mmap'd image file into a registered region in
 * fixed chunks, in address order.
 *
 *   bench_ceiling PAGES_IMG DATAOFF ADDR LEN SEED CHUNK MODE [PROGRESS_OUT]
 *       MODE: file (the image file mapped PROT_READ, MAP_SHARED, as umm maps it: the copy's
 *       source pages are faulted in from the page cache during the copy) or populate (the same
 *       with MAP_POPULATE: the source's page tables are filled before the clock starts).
 *       Copies [DATAOFF, DATAOFF+LEN) of the file into a region at ADDR registered with a
 *       userfaultfd (UFFDIO_REGISTER_MODE_MISSING), CHUNK bytes per UFFDIO_COPY, verifies every
 *       page, and prints RESULT fill_us= bytes= copies=.
 *       With PROGRESS_OUT, writes "t_us pages" lines (about 200 of them).
 */
#include "bench.h"
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>

int main(int argc, char **argv)
{
    if (argc != 8 && argc != 9)
        fail("usage: bench_ceiling PAGES_IMG DATAOFF ADDR LEN SEED CHUNK file|populate [PROGRESS]");
    const char *path = argv[1];
    uint64_t dataoff = parse_u64(argv[2], "DATAOFF");
    uint64_t addr = parse_u64(argv[3], "ADDR");
    uint64_t len = parse_u64(argv[4], "LEN");
    uint64_t seed = parse_u64(argv[5], "SEED");
    uint64_t chunk = parse_u64(argv[6], "CHUNK");
    int populate = strcmp(argv[7], "populate") == 0;
    if (!populate && strcmp(argv[7], "file") != 0)
        fail("MODE must be file or populate");
    if (chunk == 0 || chunk % PAGE || len % PAGE || addr % PAGE || dataoff % PAGE)
        fail("sizes must be page multiples");

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail("open %s: %s", path, strerror(errno));
    const char *src = mmap(NULL, len, PROT_READ, MAP_SHARED | (populate ? MAP_POPULATE : 0), fd,
                           (off_t)dataoff);
    if (src == MAP_FAILED)
        fail("mmap %s: %s", path, strerror(errno));

    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        fail("userfaultfd: %s", strerror(errno));
    struct uffdio_api api = { .api = UFFD_API, .features = 0 };
    if (ioctl(uffd, UFFDIO_API, &api) != 0)
        fail("UFFDIO_API: %s", strerror(errno));
    char *dst = mmap((void *)addr, len, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (dst != (char *)addr)
        fail("mmap region: %s", strerror(errno));
    struct uffdio_register reg = { .range = { .start = addr, .len = len },
                                   .mode = UFFDIO_REGISTER_MODE_MISSING };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0)
        fail("UFFDIO_REGISTER: %s", strerror(errno));

    FILE *pf = NULL;
    uint64_t step = len / 200 > chunk ? len / 200 : chunk, next_mark = 0;
    uint64_t *marks_t = NULL, *marks_b = NULL, nmarks = 0;
    if (argc == 9) {
        if (!(pf = fopen(argv[8], "w")))
            fail("create %s: %s", argv[8], strerror(errno));
        marks_t = malloc((len / step + 4) * sizeof *marks_t);
        marks_b = malloc((len / step + 4) * sizeof *marks_b);
        if (!marks_t || !marks_b)
            fail("malloc");
    }
    uint64_t copies = 0;
    uint64_t t0 = now_ns();
    for (uint64_t off = 0; off < len;) {
        uint64_t n = len - off < chunk ? len - off : chunk;
        struct uffdio_copy c = { .dst = addr + off, .src = (uint64_t)(src + off), .len = n,
                                 .mode = 0 };
        if (ioctl(uffd, UFFDIO_COPY, &c) != 0 && c.copy <= 0)
            fail("UFFDIO_COPY at %#lx: %s (copy=%lld)", (unsigned long)(addr + off),
                 strerror(errno), (long long)c.copy);
        off += (uint64_t)c.copy;
        copies++;
        if (pf && off >= next_mark) {
            marks_t[nmarks] = now_ns() - t0;
            marks_b[nmarks++] = off;
            next_mark = off + step;
        }
    }
    uint64_t t1 = now_ns();
    for (uint64_t p = 0; p < len; p += PAGE) {
        uint64_t a = addr + p + ((p / PAGE * 8) % PAGE);
        if (*(volatile uint64_t *)a != pattern(seed, a))
            fail("word %#lx differs from the image", (unsigned long)a);
    }
    if (pf) {
        fprintf(pf, "0 0\n");
        for (uint64_t i = 0; i < nmarks; i++)
            fprintf(pf, "%lu %lu\n", (unsigned long)(marks_t[i] / 1000),
                    (unsigned long)(marks_b[i] / PAGE));
        if (fclose(pf) != 0)
            fail("write progress");
    }
    say("RESULT fill_us=%lu bytes=%lu copies=%lu", (unsigned long)((t1 - t0) / 1000),
        (unsigned long)len, (unsigned long)copies);
    return 0;
}
