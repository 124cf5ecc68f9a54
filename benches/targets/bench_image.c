/* bench_image: the source and the restorers of umm-bench's image figures (1, 3 and 4).
 *
 * The image is one dense region [ADDR, ADDR+LEN) whose every word is pattern(SEED, address).
 *
 *   bench_image build ADDR LEN SEED
 *       Maps and fills the region, prints "READY pid=P", then sleeps until killed (umm snapshot
 *       --kill takes it from there).
 *   bench_image fill ADDR LEN SEED IMG [PROGRESS_OUT]
 *       Restorer of figure 1: maps the region empty, hands it to the manager
 *       (umm_restore_handoff from $UMM_AGENT, socket $UMM_RESTORE_SOCKET) and touches nothing:
 *       it watches /proc/self/pagemap (which never faults) until every page is present, then
 *       waits for the region to be unregistered (the restore complete) and verifies every page.
 *       With PROGRESS_OUT it counts the present pages every 2 ms and writes "t_us pages" lines.
 *       RESULT handoff_us= fill_us= complete_us= pages=
 *   bench_image touch ADDR LEN SEED IMG NTOUCH LAT_OUT
 *       Restorer of figure 3: hands the region over, then reads pages in random order, each
 *       only if pagemap says it is still missing (so each timed read is a fault), timing each
 *       read, until NTOUCH faults were timed or the background fill has reached the end of the
 *       region. Latencies (ns) go to LAT_OUT. RESULT samples= skipped= fill_done= elapsed_us=
 *   bench_image pattern MODE PAT ADDR LEN SEED IMG DATAOFF
 *       Figure 4: restore the region with MODE, then touch it with PAT, verifying every word
 *       read. MODE: lazy (umm_restore_handoff), eager (read(2) IMG/pages.img into the region),
 *       mmap (MAP_PRIVATE of IMG/pages.img at ADDR). PAT: seq (every page in address order),
 *       rand (every page in a random order), hot (a random 5 % of the pages, 20 passes).
 *       RESULT first_us= done_us= touches=   (times from the start of the restore)
 */
#include "bench.h"
#include <dlfcn.h>

static uint64_t addr0, len0, npages, seed;

static void map_region(void)
{
    void *p = mmap((void *)addr0, len0, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p != (void *)addr0)
        fail("mmap region %#lx+%#lx: %s", (unsigned long)addr0, (unsigned long)len0,
             strerror(errno));
}

typedef int (*handoff_fn)(const char *, const char *, const uint64_t *, size_t, unsigned, char *,
                          size_t);

static handoff_fn load_handoff(void)
{
    const char *agent = getenv("UMM_AGENT");
    if (!agent || !getenv("UMM_RESTORE_SOCKET"))
        fail("UMM_AGENT and UMM_RESTORE_SOCKET must be set");
    void *lib = dlopen(agent, RTLD_NOW);
    if (!lib)
        fail("dlopen %s: %s", agent, dlerror());
    handoff_fn h = (handoff_fn)dlsym(lib, "umm_restore_handoff");
    if (!h)
        fail("dlsym umm_restore_handoff: %s", dlerror());
    return h;
}

static void handoff(handoff_fn h, const char *img)
{
    uint64_t regions[2] = { addr0, len0 };
    char err[1024] = "";
    if (h(getenv("UMM_RESTORE_SOCKET"), img, regions, 1, 20000, err, sizeof err) != 0)
        fail("handoff: %s", err);
}

static inline uint64_t read_page(uint64_t page)
{
    uint64_t a = addr0 + page * PAGE;
    uint64_t v = *(volatile uint64_t *)a;
    if (v != pattern(seed, a))
        fail("page %#lx reads %#lx, want %#lx", (unsigned long)a, (unsigned long)v,
             (unsigned long)pattern(seed, a));
    return v;
}

static void verify_all(void)
{
    for (uint64_t p = 0; p < npages; p++) {
        uint64_t a = addr0 + p * PAGE + ((p * 8) % PAGE);
        if (*(volatile uint64_t *)a != pattern(seed, a))
            fail("word %#lx differs from the image", (unsigned long)a);
    }
}

__attribute__((noreturn)) static void build(void)
{
    map_region();
    for (uint64_t a = addr0; a < addr0 + len0; a += 8)
        *(uint64_t *)a = pattern(seed, a);
    say("READY pid=%d", (int)getpid());
    for (;;)
        pause();
}

static int fill(const char *img, const char *progress)
{
    handoff_fn h = load_handoff();
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0)
        fail("open pagemap: %s", strerror(errno));
    map_region();
    FILE *pf = NULL;
    if (progress && !(pf = fopen(progress, "w")))
        fail("create %s: %s", progress, strerror(errno));
    uint64_t t0 = now_ns();
    handoff(h, img);
    uint64_t t1 = now_ns();
    uint64_t last = addr0 + len0 - PAGE, t2 = 0;
    if (pf)
        fprintf(pf, "0 0\n");
    for (;;) {
        if (pf) {
            uint64_t n = count_present(pm, addr0, npages);
            uint64_t t = now_ns();
            fprintf(pf, "%lu %lu\n", (unsigned long)((t - t1) / 1000), (unsigned long)n);
            if (n == npages) {
                t2 = t;
                break;
            }
            usleep(2000);
        } else if (present(pm, last)) {
            t2 = now_ns();
            if (count_present(pm, addr0, npages) == npages)
                break;
            usleep(1000);
        } else {
            usleep(500);
        }
        if (now_ns() - t1 > 120ULL * 1000000000ULL)
            fail("the region is not filled after 120 s");
    }
    if (pf && fclose(pf) != 0)
        fail("write %s", progress);
    while (registered(addr0)) {
        usleep(500);
        if (now_ns() - t1 > 150ULL * 1000000000ULL)
            fail("the region is still registered 150 s after the handoff");
    }
    uint64_t t3 = now_ns();
    verify_all();
    say("RESULT handoff_us=%lu fill_us=%lu complete_us=%lu pages=%lu",
        (unsigned long)((t1 - t0) / 1000), (unsigned long)((t2 - t1) / 1000),
        (unsigned long)((t3 - t1) / 1000), (unsigned long)npages);
    return 0;
}

static int touch(const char *img, uint64_t ntouch, const char *out)
{
    handoff_fn h = load_handoff();
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0)
        fail("open pagemap: %s", strerror(errno));
    map_region();
    rng_state = seed ^ 0x70C4;
    uint32_t *perm = permutation(npages);
    uint8_t *mine = calloc(npages, 1);
    uint32_t *lat = malloc(ntouch * sizeof *lat);
    if (!mine || !lat)
        fail("malloc");
    uint64_t t0 = now_ns();
    handoff(h, img);
    uint64_t n = 0, skipped = 0, i = 0;
    int done = 0;
    for (; i < npages && n < ntouch; i++) {
        uint64_t p = perm[i];
        if ((i & 63) == 0) {
            /* the fill runs in address order: the last page we did not fault ourselves */
            uint64_t q = npages - 1;
            while (q > 0 && mine[q])
                q--;
            if (present(pm, addr0 + q * PAGE)) {
                done = 1;
                break;
            }
            if (now_ns() - t0 > 60ULL * 1000000000ULL)
                break;
        }
        if (present(pm, addr0 + p * PAGE)) {
            skipped++;
            continue;
        }
        mine[p] = 1;
        uint64_t a = now_ns();
        read_page(p);
        uint64_t d = now_ns() - a;
        if (d < 1000) { /* the fill got there between the check and the read: no fault */
            skipped++;
            continue;
        }
        lat[n++] = clamp32(d);
    }
    /* Every page visited (a loaded machine can let the toucher outrun a rate-bound fill): each
     * is present, from the fill or from our own fault, so the fill has nothing left to do. */
    if (i >= npages)
        done = 1;
    uint64_t t1 = now_ns();
    /* Stay until the manager has completed the restore (it unregisters the region): exiting
     * first would close the space as gone, and the report would have no completion time. */
    while (done && registered(addr0)) {
        usleep(500);
        if (now_ns() - t1 > 30ULL * 1000000000ULL)
            fail("every page is present but the region is still registered after 30 s");
    }
    write_latencies(out, lat, n);
    say("RESULT samples=%lu skipped=%lu fill_done=%d elapsed_us=%lu", (unsigned long)n,
        (unsigned long)skipped, done, (unsigned long)((t1 - t0) / 1000));
    return 0;
}

static int run_pattern(const char *mode, const char *pat, const char *img, uint64_t dataoff)
{
    uint32_t *order;
    uint64_t norder;
    rng_state = seed ^ 0xBA5E;
    if (strcmp(pat, "seq") == 0) {
        norder = npages;
        order = malloc(norder * sizeof *order);
        if (!order)
            fail("malloc");
        for (uint64_t i = 0; i < norder; i++)
            order[i] = (uint32_t)i;
    } else if (strcmp(pat, "rand") == 0) {
        norder = npages;
        order = permutation(npages);
    } else if (strcmp(pat, "hot") == 0) {
        uint32_t *perm = permutation(npages);
        uint64_t hot = npages / 20 ? npages / 20 : 1;
        norder = hot * 20;
        order = malloc(norder * sizeof *order);
        if (!order)
            fail("malloc");
        for (uint64_t pass = 0; pass < 20; pass++)
            memcpy(order + pass * hot, perm, hot * sizeof *order);
        free(perm);
    } else {
        fail("unknown pattern %s", pat);
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/pages.img", img);
    handoff_fn h = NULL;
    if (strcmp(mode, "lazy") == 0)
        h = load_handoff();
    uint64_t t0 = now_ns();
    if (h) {
        map_region();
        handoff(h, img);
    } else if (strcmp(mode, "eager") == 0) {
        map_region();
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            fail("open %s: %s", path, strerror(errno));
        uint64_t done = 0;
        while (done < len0) {
            ssize_t r = pread(fd, (char *)addr0 + done, len0 - done, (off_t)(dataoff + done));
            if (r <= 0)
                fail("read %s: %s", path, r < 0 ? strerror(errno) : "short file");
            done += (uint64_t)r;
        }
        close(fd);
    } else if (strcmp(mode, "mmap") == 0) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            fail("open %s: %s", path, strerror(errno));
        void *p = mmap((void *)addr0, len0, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_FIXED_NOREPLACE, fd, (off_t)dataoff);
        if (p != (void *)addr0)
            fail("mmap %s: %s", path, strerror(errno));
        close(fd);
    } else {
        fail("unknown mode %s", mode);
    }
    uint64_t sum = read_page(order[0]);
    uint64_t t1 = now_ns();
    for (uint64_t i = 1; i < norder; i++)
        sum += read_page(order[i]);
    uint64_t t2 = now_ns();
    say("RESULT first_us=%lu done_us=%lu touches=%lu sum=%lx", (unsigned long)((t1 - t0) / 1000),
        (unsigned long)((t2 - t0) / 1000), (unsigned long)norder, (unsigned long)sum);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 5)
        fail("usage: bench_image build|fill|touch|pattern ...");
    const char *cmd = argv[1];
    int a = 2;
    const char *mode = NULL, *pat = NULL;
    if (strcmp(cmd, "pattern") == 0) {
        if (argc != 9)
            fail("usage: bench_image pattern MODE PAT ADDR LEN SEED IMG DATAOFF");
        mode = argv[2];
        pat = argv[3];
        a = 4;
    }
    addr0 = parse_u64(argv[a], "ADDR");
    len0 = parse_u64(argv[a + 1], "LEN");
    seed = parse_u64(argv[a + 2], "SEED");
    if (addr0 % PAGE || len0 % PAGE || len0 == 0)
        fail("ADDR and LEN must be page multiples");
    npages = len0 / PAGE;
    if (strcmp(cmd, "build") == 0)
        build();
    if (strcmp(cmd, "fill") == 0 && (argc == 6 || argc == 7))
        return fill(argv[5], argc == 7 ? argv[6] : NULL);
    if (strcmp(cmd, "touch") == 0 && argc == 8)
        return touch(argv[5], parse_u64(argv[6], "NTOUCH"), argv[7]);
    if (mode)
        return run_pattern(mode, pat, argv[7], parse_u64(argv[8], "DATAOFF"));
    fail("bad arguments for %s", cmd);
}
