/* richstate: the reference target and restorer of umm's lazy-restore tests (tests/restore.rs).
 *
 * Memory state (fixed addresses; contents a pure function of SEED and the address, so a restorer
 * verifies without the original process):
 *   A  0x300000000000   8 MiB  rw-  dense: every word = pattern(SEED, addr / 8)
 *   B  0x300010000000  64 MiB  rw-  sparse: a few hundred pseudo-random runs of 1..56 pages with
 *                                   data (many crossing 64 KiB chunks of the image's data file),
 *                                   holes (never touched) everywhere else
 *   C  0x300100000000   1 GiB  rw-  MAP_NORESERVE, C_TOUCHED scattered pages with data
 *   D  0x300200000000  64 KiB  r--  pointers: word i = the address of a data word in A, B or C
 *                                   (written, then made read-only)
 * Which pages have data is a function of SEED too (the same generator on both sides).
 *
 * usage:
 *   richstate build SEED
 *       Creates the state, prints "READY pid=P", one "REGION name=X start=0x.. len=0x.. prot=.."
 *       line per region and "RANGES --range S-E ..." (for umm snapshot), then waits on stdin: a
 *       line makes it check its own memory and print "OK richstate-build checksum=..."; EOF
 *       (e.g. stdin is /dev/null) makes it sleep until killed.
 *   richstate restore SEED IMG
 *       Maps the same regions empty (same protection), dlopens $UMM_AGENT and calls
 *       umm_restore_handoff($UMM_RESTORE_SOCKET, IMG, regions), prints "HANDED pid=P", then,
 *       while the manager fills the regions:
 *         - forks RICHSTATE_CHILDREN children (default 6); every third forks 2 grandchildren;
 *           each of them verifies its share of the pages (after a storm of its own: MADV_DONTNEED
 *           of some pages, which must then read zero; child 1 also mremaps part of B);
 *         - mremaps the last MiB of A to MOVE_TO and verifies it there;
 *         - MADV_DONTNEEDs pages still missing (some of them at their new address), which must
 *           read zero afterwards, never stale image data;
 *         - munmaps a MiB of B (and maps fresh memory there, which must read zero) and 256 MiB
 *           of C;
 *         - verifies every page of A, B, D, the data pages of C and a sample of C's holes in
 *           random order (holes zero, data pages their pattern; D's pointers are followed too),
 *           then MADV_DONTNEEDs some verified pages and checks they read zero.
 *       Prints "OK richstate checksum=.. pages=N zero_after_dontneed=K children=C
 *       grandchildren=G forks_under_uffd=F remaps_under_uffd=R removes_under_uffd=M
 *       unmaps_under_uffd=U" and exits 0, or "FAIL richstate[pid]: ..." and exits 1 on any
 *       mismatch ("zero page where data belonged" when a data page reads zero). pages= counts
 *       the data pages the parent itself verified (each had to be installed by the manager);
 *       *_under_uffd count the operations after which the region was still registered with a
 *       userfaultfd (VmFlags "um"), i.e. that must have raised a uffd event. The checksum is a
 *       function of SEED only (the same for every successful restore of the same image).
 *       Exit 3 with "HANDOFF FAILED: <reason>" if umm_restore_handoff fails; exit 2 on setup
 *       errors.
 *   richstate reap CMD ARGS...
 *       A subreaper: runs CMD, prints "CHILD pid=P", then reaps every descendant that exits
 *       (orphans included) printing "REAPED pid=P comm=NAME status=exit:N|signal:S", and
 *       exits 0 with "REAPER done" once none is left.
 *
 * Environment of `restore`:
 *   RICHSTATE_SLOW_US=N      sleep N microseconds before each page verified (all processes)
 *   RICHSTATE_LOOP=1         after the first pass, verify again and again until killed
 *   RICHSTATE_UNTIL=FILE     after the first pass, verify again until FILE exists, then finish
 *   RICHSTATE_CHILDREN=N     children to fork (0..16, default 6)
 *   RICHSTATE_WATCH=ADDR,... no storms, no children, nothing touched: watch the manager fill
 *                            every data page in the background (see watch()), then verify
 *   RICHSTATE_BOGUS=extra    also hand over a mapped region that is not in the image
 *   RICHSTATE_BOGUS=len      hand over A with a wrong length
 *   RICHSTATE_BOGUS=unmapped hand over D without mapping it
 *   RICHSTATE_TOUCH_BEFORE=1     write to a data page of A before the handoff, then wait (up
 *                                to 20 s) to be stopped; "SURVIVED" and FAIL if not
 *   RICHSTATE_TOUCH_BEFORE=fault the same, but first make faults next to that page (so a
 *                                fault-around window starts on it)
 *   RICHSTATE_TOUCH_BEFORE=late-fault  the same with a page of B's last run (the background
 *                                fill in address order comes there last)
 */
#include "umm_check.h"
#include <dlfcn.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#define MIB (1UL << 20)
#define A_START 0x300000000000UL
#define A_LEN (8 * MIB)
#define B_START 0x300010000000UL
#define B_LEN (64 * MIB)
#define C_START 0x300100000000UL
#define C_LEN (1024 * MIB)
#define D_START 0x300200000000UL
#define D_LEN (64 * 1024UL)
#define MOVE_TO 0x300300000000UL
#define BOGUS_START 0x300400000000UL
#define BOGUS_LEN MIB
#define CHILD_MOVE_TO 0x300500000000UL

#define A_PAGES (A_LEN / PAGE)
#define B_PAGES (B_LEN / PAGE)
#define C_PAGES (C_LEN / PAGE)
#define D_PAGES (D_LEN / PAGE)

#define C_TOUCHED 16
#define C_HOLE_SAMPLE 128
#define MAX_RUNS 1024

/* Storms of the parent (offsets chosen to be fixed, sets from the seed). */
#define A_MOVED_OFF (7 * MIB) /* [A + 7 MiB, A + 8 MiB) moves to MOVE_TO */
#define A_MOVED_LEN MIB
#define B_FRESH_OFF (16 * MIB) /* [B + 16 MiB, +1 MiB) unmapped, then mapped fresh */
#define B_FRESH_LEN MIB
#define C_GONE_OFF (512 * MIB) /* [C + 512 MiB, +256 MiB) unmapped */
#define C_GONE_LEN (256 * MIB)
#define CHILD_B_MOVED_LEN (2 * MIB) /* child 1 moves [B, B + 2 MiB) */

#define TOUCH_PAGE 2 /* RICHSTATE_TOUCH_BEFORE=1|fault writes page 2 of A */

static uint64_t seed;

/* ---- output ---------------------------------------------------------------------------- */

/* One line straight to fd 1 (no stdio buffers to duplicate across fork). */
__attribute__((format(printf, 1, 2))) static void say(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t w = write(1, buf, (size_t)n);
    (void)w;
}

/* ---- the generator ---------------------------------------------------------------------- */

static uint64_t rng_state;

static uint64_t rnd(void)
{
    rng_state += 0x9E3779B97F4A7C15ULL;
    return mix64(rng_state);
}

struct run {
    uint64_t page, len; /* in pages, relative to B */
};
static struct run runs[MAX_RUNS];
static int nruns;
static uint8_t b_data[B_PAGES / 8];
static uint64_t c_touched[C_TOUCHED]; /* page indexes in C, distinct */
static uint8_t c_data[C_PAGES / 8];

static int bit(const uint8_t *bm, uint64_t i)
{
    return (bm[i / 8] >> (i % 8)) & 1;
}

static void set_bit(uint8_t *bm, uint64_t i)
{
    bm[i / 8] |= (uint8_t)(1 << (i % 8));
}

static void gen_layout(void)
{
    rng_state = seed * 0x2545F4914F6CDD1DULL + 1;
    uint64_t page = rnd() % 64;
    nruns = 0;
    for (;;) {
        uint64_t len = 1 + rnd() % 24;
        if (rnd() % 6 == 0)
            len = 17 + rnd() % 40; /* long runs: whole 64 KiB chunks of the data file */
        if (page + len > B_PAGES || nruns == MAX_RUNS)
            break;
        runs[nruns].page = page;
        runs[nruns].len = len;
        nruns++;
        for (uint64_t p = page; p < page + len; p++)
            set_bit(b_data, p);
        page += len + 1 + rnd() % 120;
    }
    for (int i = 0; i < C_TOUCHED; i++) {
        uint64_t p;
        do
            p = rnd() % C_PAGES;
        while (bit(c_data, p));
        c_touched[i] = p;
        set_bit(c_data, p);
    }
}

/* Word i of D: the address of a data word in A, B or C. */
static uint64_t dptr(uint64_t i)
{
    uint64_t h = mix64(seed * 0x100000001B3ULL ^ mix64(i + 0x51));
    uint64_t word = (h >> 40) % WORDS_PER_PAGE;
    switch (h % 3) {
    case 0:
        return A_START + ((h >> 8) % A_PAGES) * PAGE + word * 8;
    case 1: {
        struct run *r = &runs[(h >> 8) % (uint64_t)nruns];
        return B_START + (r->page + (h >> 20) % r->len) * PAGE + word * 8;
    }
    default:
        return C_START + c_touched[(h >> 8) % C_TOUCHED] * PAGE + word * 8;
    }
}

/* Does the original state have data in the page at `page` (an address)? */
static int is_data(uint64_t page)
{
    if (page >= A_START && page < A_START + A_LEN)
        return 1;
    if (page >= B_START && page < B_START + B_LEN)
        return bit(b_data, (page - B_START) / PAGE);
    if (page >= C_START && page < C_START + C_LEN)
        return bit(c_data, (page - C_START) / PAGE);
    if (page >= D_START && page < D_START + D_LEN)
        return 1;
    return 0;
}

/* The original contents of the word at `addr`. */
static uint64_t expected_word(uint64_t addr)
{
    if (!is_data(addr & ~(PAGE - 1)))
        return 0;
    if (addr >= D_START && addr < D_START + D_LEN)
        return dptr((addr - D_START) / 8);
    return pattern(seed, addr / 8);
}

/* ---- this process's view: what its storms did ------------------------------------------ */

struct move {
    uint64_t from, len, to;
};
static struct move moves[4];
static int nmoves;

struct span {
    uint64_t start, len;
};
static struct span fresh[4], gone[4];
static int nfresh, ngone;

/* Pages zapped with MADV_DONTNEED (by original address): A, B and C. */
static uint8_t zap_a[A_PAGES / 8], zap_b[B_PAGES / 8], zap_c[C_PAGES / 8];

static int in_span(const struct span *s, int n, uint64_t a)
{
    for (int i = 0; i < n; i++)
        if (a >= s[i].start && a < s[i].start + s[i].len)
            return 1;
    return 0;
}

/* Where the byte that was at `addr` lives now. */
static uint64_t cur(uint64_t addr)
{
    for (int i = 0; i < nmoves; i++)
        if (addr >= moves[i].from && addr < moves[i].from + moves[i].len)
            return addr - moves[i].from + moves[i].to;
    return addr;
}

static int zapped(uint64_t page)
{
    if (page >= A_START && page < A_START + A_LEN)
        return bit(zap_a, (page - A_START) / PAGE);
    if (page >= B_START && page < B_START + B_LEN)
        return bit(zap_b, (page - B_START) / PAGE);
    if (page >= C_START && page < C_START + C_LEN)
        return bit(zap_c, (page - C_START) / PAGE);
    return 0;
}

static void mark_zapped(uint64_t page)
{
    if (page >= A_START && page < A_START + A_LEN)
        set_bit(zap_a, (page - A_START) / PAGE);
    else if (page >= B_START && page < B_START + B_LEN)
        set_bit(zap_b, (page - B_START) / PAGE);
    else if (page >= C_START && page < C_START + C_LEN)
        set_bit(zap_c, (page - C_START) / PAGE);
}

enum state { GONE, ZERO, DATA };

static const char *why_zero(uint64_t page)
{
    if (in_span(fresh, nfresh, page))
        return "fresh mapping after munmap";
    if (zapped(page))
        return "after MADV_DONTNEED";
    return "hole of the image";
}

static enum state state_of(uint64_t page)
{
    if (in_span(gone, ngone, page))
        return GONE;
    if (in_span(fresh, nfresh, page) || zapped(page))
        return ZERO;
    return is_data(page) ? DATA : ZERO;
}

/* Is the VMA holding the original address `addr` still registered with a userfaultfd? */
static int registered(uint64_t addr)
{
    return vma_has_flag((void *)cur(addr), "um") == 1;
}

/* ---- verification ----------------------------------------------------------------------- */

static long slow_us;
static uint64_t checksum;

static void check_word(uint64_t orig, uint64_t got, const char *what)
{
    uint64_t page = orig & ~(PAGE - 1);
    enum state st = state_of(page);
    if (st == GONE)
        return;
    uint64_t want = st == DATA ? expected_word(orig) : 0;
    if (got == want)
        return;
    if (want == 0)
        fail("%s: word at %#lx (originally %#lx) = %016lx, want 0 (%s): stale or foreign data",
             what, (unsigned long)cur(orig), (unsigned long)orig, (unsigned long)got,
             why_zero(page));
    if (got == 0)
        fail("%s: zero page where data belonged: word at %#lx (originally %#lx) = 0, want "
             "%016lx",
             what, (unsigned long)cur(orig), (unsigned long)orig, (unsigned long)want);
    fail("%s: wrong data: word at %#lx (originally %#lx) = %016lx, want %016lx", what,
         (unsigned long)cur(orig), (unsigned long)orig, (unsigned long)got,
         (unsigned long)want);
}

/* Verify the page originally at `page`; returns its state. D's pointers are followed. */
static enum state verify_page(uint64_t page, const char *what)
{
    enum state st = state_of(page);
    if (st == GONE)
        return st;
    if (slow_us > 0)
        usleep((useconds_t)slow_us);
    const volatile uint64_t *w = (const volatile uint64_t *)cur(page);
    for (uint64_t i = 0; i < WORDS_PER_PAGE; i++)
        check_word(page + i * 8, w[i], what);
    checksum += mix64(w[0] ^ w[WORDS_PER_PAGE - 1] ^ page);
    if (st == DATA && page >= D_START && page < D_START + D_LEN) {
        for (uint64_t i = 0; i < WORDS_PER_PAGE; i++) {
            uint64_t target = w[i];
            if (state_of(target & ~(PAGE - 1)) == GONE)
                continue;
            check_word(target, *(const volatile uint64_t *)cur(target), "pointer from D");
        }
    }
    return st;
}

/* Every page to verify, by original address: all of A, B and D, C's data pages and a sample of
 * its holes (reading all of a 1 GiB hole would only cost memory). */
static uint64_t *pages;
static size_t npages;

static void build_page_list(void)
{
    size_t cap = A_PAGES + B_PAGES + D_PAGES + C_TOUCHED * 3 + C_HOLE_SAMPLE;
    pages = malloc(cap * sizeof *pages);
    if (!pages)
        fail("malloc page list");
    npages = 0;
    for (uint64_t i = 0; i < A_PAGES; i++)
        pages[npages++] = A_START + i * PAGE;
    for (uint64_t i = 0; i < B_PAGES; i++)
        pages[npages++] = B_START + i * PAGE;
    for (uint64_t i = 0; i < D_PAGES; i++)
        pages[npages++] = D_START + i * PAGE;
    uint8_t *listed = calloc(C_PAGES / 8, 1);
    if (!listed)
        fail("calloc");
    for (int i = 0; i < C_TOUCHED; i++)
        for (int d = -1; d <= 1; d++) {
            uint64_t p = c_touched[i] + (uint64_t)(int64_t)d;
            if (p < C_PAGES && !bit(listed, p)) {
                set_bit(listed, p);
                pages[npages++] = C_START + p * PAGE;
            }
        }
    uint64_t saved = rng_state;
    rng_state = seed ^ 0xC0FFEE;
    for (int i = 0; i < C_HOLE_SAMPLE; i++) {
        uint64_t p = rnd() % C_PAGES;
        if (!bit(listed, p)) {
            set_bit(listed, p);
            pages[npages++] = C_START + p * PAGE;
        }
    }
    rng_state = saved;
    free(listed);
}

/* Pages in a random order (a permutation from `salt`), those with index % nshare == share. */
static void order(uint64_t *out, size_t *n, uint64_t salt, int share, int nshare)
{
    uint64_t s = rng_state;
    rng_state = seed ^ mix64(salt);
    size_t k = 0;
    for (size_t i = 0; i < npages; i++)
        if ((int)(i % (size_t)nshare) == share)
            out[k++] = pages[i];
    for (size_t i = k; i > 1; i--) {
        size_t j = rnd() % i;
        uint64_t t = out[i - 1];
        out[i - 1] = out[j];
        out[j] = t;
    }
    rng_state = s;
    *n = k;
}

/* One pass over a share of the pages; returns the data pages verified. */
static uint64_t verify_pass(uint64_t salt, int share, int nshare, const char *what)
{
    static uint64_t *list;
    if (!list) {
        list = malloc(npages * sizeof *list);
        if (!list)
            fail("malloc");
    }
    size_t n;
    order(list, &n, salt, share, nshare);
    uint64_t data = 0;
    for (size_t i = 0; i < n; i++)
        data += verify_page(list[i], what) == DATA;
    return data;
}

/* ---- storms ----------------------------------------------------------------------------- */

/* MADV_DONTNEED `n` pages from original address `page` (split where a move split them). */
static int zap(uint64_t page, uint64_t n)
{
    int events = 0;
    uint64_t start = page;
    for (uint64_t p = page; p <= page + n * PAGE; p += PAGE) {
        int split = p == page + n * PAGE || (p > start && cur(p) != cur(p - PAGE) + PAGE);
        if (!split)
            continue;
        uint64_t len = p - start;
        if (madvise((void *)cur(start), len, MADV_DONTNEED) != 0)
            fail("madvise(%#lx, %lu, DONTNEED): %s", (unsigned long)cur(start),
                 (unsigned long)len, strerror(errno));
        events += registered(start);
        for (uint64_t q = start; q < p; q += PAGE)
            mark_zapped(q);
        start = p;
    }
    return events;
}

/* A pseudo-random data page of B (an address), avoiding the fresh MiB and the moved ranges. */
static uint64_t some_b_data_page(void)
{
    for (;;) {
        struct run *r = &runs[rnd() % (uint64_t)nruns];
        uint64_t p = B_START + (r->page + rnd() % r->len) * PAGE;
        if (p >= B_START + B_FRESH_OFF && p < B_START + B_FRESH_OFF + B_FRESH_LEN)
            continue;
        if (p < B_START + CHILD_B_MOVED_LEN)
            continue;
        return p;
    }
}

static const char *until_file;
static int loop_forever;

static int should_stop(void)
{
    if (loop_forever)
        return 0;
    if (!until_file)
        return 1;
    struct stat st;
    return stat(until_file, &st) == 0;
}

static int wait_status(pid_t pid)
{
    int st;
    pid_t r;
    do
        r = waitpid(pid, &st, 0);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        fail("waitpid(%d): %s", (int)pid, strerror(errno));
    return st;
}

static void check_exit(pid_t pid, int st, const char *who, int idx)
{
    if (WIFSIGNALED(st))
        fail("%s %d (pid %d) killed by signal %d", who, idx, (int)pid, WTERMSIG(st));
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        fail("%s %d (pid %d) exited with status %d", who, idx, (int)pid, WEXITSTATUS(st));
}

/* A forked verifier of share `share` of `nshare` (a child, or a grandchild when child_idx < 0):
 * a storm of its own first (MADV_DONTNEED of a few data pages, which it then checks read zero;
 * child 1 also moves the start of B), then its share in random order, until told to stop. */
__attribute__((noreturn)) static void verifier(int share, int nshare, int child_idx, pid_t *kids,
                                               int nk, int grand_first)
{
    char what[64];
    snprintf(what, sizeof what, "%s %d", child_idx < 0 ? "grandchild" : "child", share);
    rng_state = seed ^ mix64(0x1000 + (uint64_t)share);
    uint64_t zapped_pages[6];
    for (int i = 0; i < 6; i++) {
        uint64_t p = i < 2 ? A_START + (rnd() % (A_MOVED_OFF / PAGE)) * PAGE : some_b_data_page();
        zapped_pages[i] = p;
        zap(p, 1);
    }
    if (child_idx == 1) {
        if (mremap((void *)B_START, CHILD_B_MOVED_LEN, CHILD_B_MOVED_LEN,
                   MREMAP_MAYMOVE | MREMAP_FIXED, (void *)CHILD_MOVE_TO) == MAP_FAILED)
            fail("%s: mremap of B's start: %s", what, strerror(errno));
        moves[nmoves++] = (struct move){ B_START, CHILD_B_MOVED_LEN, CHILD_MOVE_TO };
    }
    for (uint64_t pass = 0;; pass++) {
        for (int i = 0; i < 6; i++)
            verify_page(zapped_pages[i], what);
        verify_pass(0x2000 + pass * 64 + (uint64_t)share, share, nshare, what);
        if (should_stop())
            break;
    }
    for (int i = 0; i < nk; i++)
        check_exit(kids[i], wait_status(kids[i]), "grandchild", grand_first + i);
    _exit(0);
}

/* Child `k`: forks `ngrand` grandchildren first (shares grand_first...), then verifies. */
__attribute__((noreturn)) static void child(int k, int nshare, int grand_first, int ngrand)
{
    pid_t kids[2];
    int nk = 0;
    for (int g = 0; g < ngrand && g < 2; g++) {
        pid_t p = fork();
        if (p < 0)
            fail("fork (grandchild): %s", strerror(errno));
        if (p == 0)
            verifier(grand_first + g, nshare, -1, NULL, 0, 0);
        kids[nk++] = p;
    }
    verifier(k, nshare, k, kids, nk, grand_first);
}

/* ---- modes ------------------------------------------------------------------------------ */

static void map_region(uint64_t start, uint64_t len, int prot, int flags)
{
    int how = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | flags;
    void *p = mmap((void *)start, len, prot, how, -1, 0);
    if (p == MAP_FAILED) {
        say("SETUP mmap(%#lx, %#lx) failed: %s", (unsigned long)start, (unsigned long)len,
            strerror(errno));
        exit(2);
    }
    if ((uint64_t)p != start) {
        say("SETUP mmap(%#lx) gave %p (kernel without MAP_FIXED_NOREPLACE?)",
            (unsigned long)start, p);
        exit(2);
    }
}

static void map_all(void)
{
    map_region(A_START, A_LEN, PROT_READ | PROT_WRITE, 0);
    map_region(B_START, B_LEN, PROT_READ | PROT_WRITE, 0);
    map_region(C_START, C_LEN, PROT_READ | PROT_WRITE, MAP_NORESERVE);
}

static const struct {
    const char *name;
    uint64_t start, len;
    const char *prot;
} regions[] = {
    { "A", A_START, A_LEN, "rw-" },
    { "B", B_START, B_LEN, "rw-" },
    { "C", C_START, C_LEN, "rw-" },
    { "D", D_START, D_LEN, "r--" },
};
#define NREGIONS (sizeof regions / sizeof regions[0])

static void write_pages(uint64_t start, uint64_t n)
{
    uint64_t *w = (uint64_t *)start;
    for (uint64_t i = 0; i < n * WORDS_PER_PAGE; i++)
        w[i] = expected_word(start + i * 8);
}

static int build(void)
{
    map_all();
    map_region(D_START, D_LEN, PROT_READ | PROT_WRITE, 0);
    write_pages(A_START, A_PAGES);
    for (int i = 0; i < nruns; i++)
        write_pages(B_START + runs[i].page * PAGE, runs[i].len);
    for (int i = 0; i < C_TOUCHED; i++)
        write_pages(C_START + c_touched[i] * PAGE, 1);
    write_pages(D_START, D_PAGES);
    if (mprotect((void *)D_START, D_LEN, PROT_READ) != 0)
        fail("mprotect D: %s", strerror(errno));
    uint64_t data = A_PAGES + D_PAGES + C_TOUCHED;
    for (int i = 0; i < nruns; i++)
        data += runs[i].len;
    say("READY pid=%d data_pages=%lu runs=%d", (int)getpid(), (unsigned long)data, nruns);
    char line[512];
    int n = 0;
    for (size_t i = 0; i < NREGIONS; i++) {
        say("REGION name=%s start=%#lx len=%#lx prot=%s", regions[i].name,
            (unsigned long)regions[i].start, (unsigned long)regions[i].len, regions[i].prot);
        n += snprintf(line + n, sizeof line - (size_t)n, " --range %#lx-%#lx",
                      (unsigned long)regions[i].start,
                      (unsigned long)(regions[i].start + regions[i].len));
    }
    say("RANGES%s", line);
    char c;
    ssize_t r;
    do
        r = read(0, &c, 1);
    while (r < 0 && errno == EINTR);
    if (r <= 0)
        for (;;)
            pause();
    build_page_list();
    uint64_t pages_ok = verify_pass(0, 0, 1, "build");
    say("OK richstate-build checksum=%016lx pages=%lu", (unsigned long)checksum,
        (unsigned long)pages_ok);
    return 0;
}

/* RICHSTATE_WATCH: touch nothing; poll /proc/self/pagemap (which never faults) until every data
 * page is present, i.e. filled by the manager's background work alone, noting in which poll
 * each one appeared; wait for the regions to be unregistered (the restore complete); then
 * verify every page (plain memory by then: no faults). Prints "WATCH page=0x.. poll=N" for each
 * address of the comma-separated list in the variable, and "WATCH first_poll=N polls=M". */
static void watch(const char *spec)
{
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fail("open /proc/self/pagemap: %s", strerror(errno));
    uint32_t *seen = malloc(npages * sizeof *seen);
    uint64_t *ent = malloc(B_PAGES * sizeof *ent);
    if (!seen || !ent)
        fail("malloc");
    size_t missing = 0;
    for (size_t i = 0; i < npages; i++) {
        seen[i] = is_data(pages[i]) ? UINT32_MAX : 0;
        missing += seen[i] != 0;
    }
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint32_t poll = 0, first_poll = 0;
    while (missing > 0) {
        poll++;
        /* pages[] lists A, B and D in order, then C's pages one by one */
        static const struct {
            uint64_t start, n;
        } spans[] = { { A_START, A_PAGES }, { B_START, B_PAGES }, { D_START, D_PAGES } };
        size_t idx = 0;
        for (size_t s = 0; s < 3; s++) {
            size_t want = spans[s].n * sizeof *ent;
            if (pread(fd, ent, want, (off_t)(spans[s].start / PAGE * 8)) != (ssize_t)want)
                fail("pread pagemap: %s", strerror(errno));
            for (uint64_t k = 0; k < spans[s].n; k++, idx++)
                if (seen[idx] == UINT32_MAX && (ent[k] >> 63)) {
                    seen[idx] = poll;
                    missing--;
                }
        }
        for (; idx < npages; idx++) {
            if (seen[idx] != UINT32_MAX)
                continue;
            if (pread(fd, ent, 8, (off_t)(pages[idx] / PAGE * 8)) != 8)
                fail("pread pagemap: %s", strerror(errno));
            if (ent[0] >> 63) {
                seen[idx] = poll;
                missing--;
            }
        }
        if (!first_poll) {
            for (size_t i = 0; i < npages; i++)
                if (seen[i] == poll) {
                    first_poll = poll;
                    break;
                }
        }
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (missing > 0 && t.tv_sec - t0.tv_sec > 60)
            fail("watch: %zu data pages still not filled after 60 s", missing);
        if (missing > 0)
            usleep(200);
    }
    close(fd);
    /* complete: the manager unregisters the regions */
    for (int i = 0; registered(A_START) || registered(B_START) || registered(C_START) ||
                    registered(D_START);
         i++) {
        if (i > 30000)
            fail("watch: every page is filled but the regions are still registered after 30 s");
        usleep(1000);
    }
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", spec);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        uint64_t a = strtoull(tok, NULL, 0) & ~(PAGE - 1);
        size_t i = 0;
        while (i < npages && pages[i] != a)
            i++;
        if (i == npages || !is_data(a))
            say("WATCH page=%#lx poll=none", (unsigned long)a);
        else
            say("WATCH page=%#lx poll=%u", (unsigned long)a, seen[i]);
    }
    say("WATCH first_poll=%u polls=%u", first_poll, poll);
    free(seen);
    free(ent);
}

typedef int (*handoff_fn)(const char *, const char *, const uint64_t *, size_t, unsigned, char *,
                          size_t);

static long env_long(const char *name, long dflt, long lo, long hi)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return dflt;
    char *end;
    long x = strtol(v, &end, 10);
    if (*end || x < lo || x > hi) {
        say("SETUP bad %s=%s", name, v);
        exit(2);
    }
    return x;
}

static int restore(const char *img)
{
    slow_us = env_long("RICHSTATE_SLOW_US", 0, 0, 1000000);
    loop_forever = env_long("RICHSTATE_LOOP", 0, 0, 1) == 1;
    until_file = getenv("RICHSTATE_UNTIL");
    if (until_file && !*until_file)
        until_file = NULL;
    int nchildren = (int)env_long("RICHSTATE_CHILDREN", 6, 0, 16);
    const char *bogus = getenv("RICHSTATE_BOGUS");
    const char *touch = getenv("RICHSTATE_TOUCH_BEFORE");
    const char *agent = getenv("UMM_AGENT");
    const char *sock = getenv("UMM_RESTORE_SOCKET");
    if (!agent || !sock) {
        say("SETUP UMM_AGENT and UMM_RESTORE_SOCKET must be set");
        return 2;
    }
    if (getenv("UMM_SOCKET")) {
        say("SETUP UMM_SOCKET is set: the agent would try a track-mode handoff");
        return 2;
    }

    map_all();
    int map_d = !(bogus && strcmp(bogus, "unmapped") == 0);
    if (map_d)
        map_region(D_START, D_LEN, PROT_READ, 0);
    uint64_t hand[2 * (NREGIONS + 1)];
    size_t nhand = 0;
    for (size_t i = 0; i < NREGIONS; i++) {
        hand[2 * nhand] = regions[i].start;
        hand[2 * nhand + 1] = regions[i].len;
        nhand++;
    }
    if (bogus && strcmp(bogus, "extra") == 0) {
        map_region(BOGUS_START, BOGUS_LEN, PROT_READ | PROT_WRITE, 0);
        hand[2 * nhand] = BOGUS_START;
        hand[2 * nhand + 1] = BOGUS_LEN;
        nhand++;
    } else if (bogus && strcmp(bogus, "len") == 0) {
        hand[1] = A_LEN - MIB;
    } else if (bogus && strcmp(bogus, "unmapped") != 0) {
        say("SETUP bad RICHSTATE_BOGUS=%s", bogus);
        return 2;
    }
    uint64_t touched = 0;
    if (touch) {
        touched = A_START + TOUCH_PAGE * PAGE;
        if (strcmp(touch, "late-fault") == 0) {
            /* An even page of the last run of B with two pages after it: the background fill
             * (in address order) comes there last. */
            for (int i = nruns - 1; i >= 0 && touched < B_START; i--) {
                uint64_t p = (runs[i].page + 1) & ~1UL;
                if (p + 3 <= runs[i].page + runs[i].len)
                    touched = B_START + p * PAGE;
            }
        } else if (strcmp(touch, "1") != 0 && strcmp(touch, "fault") != 0) {
            say("SETUP bad RICHSTATE_TOUCH_BEFORE=%s", touch);
            return 2;
        }
        *(volatile uint64_t *)touched = 0x70C4ED;
    }

    void *lib = dlopen(agent, RTLD_NOW);
    if (!lib) {
        say("SETUP dlopen %s: %s", agent, dlerror());
        return 2;
    }
    handoff_fn handoff = (handoff_fn)dlsym(lib, "umm_restore_handoff");
    if (!handoff) {
        say("SETUP dlsym umm_restore_handoff: %s", dlerror());
        return 2;
    }
    char err[1024] = "";
    if (handoff(sock, img, hand, nhand, 10000, err, sizeof err) != 0) {
        say("HANDOFF FAILED: %s", err);
        return 3;
    }
    say("HANDED pid=%d", (int)getpid());

    if (touch) {
        if (strcmp(touch, "1") != 0) {
            /* A fault two pages on (served alone), then one on the next page, whose
             * fault-around window starts on the touched page. */
            (void)*(volatile uint64_t *)(touched + 2 * PAGE);
            (void)*(volatile uint64_t *)(touched + PAGE);
        }
        for (int i = 0; i < 200; i++)
            usleep(100000);
        say("SURVIVED");
        check_word(touched, *(volatile uint64_t *)touched, "page touched before the handoff");
        fail("page touched before the handoff: nobody stopped the restore");
    }

    build_page_list();
    const char *watch_spec = getenv("RICHSTATE_WATCH");
    if (watch_spec) {
        watch(watch_spec);
        uint64_t data_pages = verify_pass(1, 0, 1, "parent");
        say("OK richstate checksum=%016lx pages=%lu zero_after_dontneed=0 children=0 "
            "grandchildren=0 forks_under_uffd=0 remaps_under_uffd=0 removes_under_uffd=0 "
            "unmaps_under_uffd=0",
            (unsigned long)checksum, (unsigned long)data_pages);
        return 0;
    }
    /* Forks first, while everything is still missing: children inherit every obligation. */
    int ngrand_total = 0;
    for (int k = 0; k < nchildren; k++)
        ngrand_total += k % 3 == 0 ? 2 : 0;
    int nshare = nchildren + ngrand_total;
    pid_t kids[16];
    int forks_under_uffd = 0, grand_next = nchildren;
    for (int k = 0; k < nchildren; k++) {
        int ng = k % 3 == 0 ? 2 : 0;
        pid_t p = fork();
        if (p < 0)
            fail("fork: %s", strerror(errno));
        if (p == 0)
            child(k, nshare, grand_next, ng);
        grand_next += ng;
        kids[k] = p;
        forks_under_uffd += registered(A_START);
    }

    /* mremap the last MiB of A, still missing, to MOVE_TO. */
    if (mremap((void *)(A_START + A_MOVED_OFF), A_MOVED_LEN, A_MOVED_LEN,
               MREMAP_MAYMOVE | MREMAP_FIXED, (void *)MOVE_TO) == MAP_FAILED)
        fail("mremap: %s", strerror(errno));
    moves[nmoves++] = (struct move){ A_START + A_MOVED_OFF, A_MOVED_LEN, MOVE_TO };
    int remaps_under_uffd = registered(A_START + A_MOVED_OFF);

    /* MADV_DONTNEED of pages not touched yet: A (some in the moved MiB), B's data and holes,
     * C's data pages. */
    rng_state = seed ^ 0xD0D0;
    int removes_under_uffd = 0;
    for (int i = 0; i < 8; i++) {
        uint64_t off = (i < 3 ? A_MOVED_OFF / PAGE + rnd() % (A_MOVED_LEN / PAGE - 4)
                              : rnd() % (A_MOVED_OFF / PAGE - 4));
        removes_under_uffd += zap(A_START + off * PAGE, 1 + rnd() % 4);
    }
    /* One range across the move's start: split in two at their current addresses. */
    removes_under_uffd += zap(A_START + A_MOVED_OFF - 2 * PAGE, 4);
    for (int i = 0; i < 14; i++) {
        uint64_t p = some_b_data_page();
        uint64_t n = 1 + rnd() % 3;
        if (p + n * PAGE > B_START + B_LEN)
            n = 1;
        removes_under_uffd += zap(p, n);
    }
    removes_under_uffd += zap(B_START + 40 * MIB, 16); /* data and holes */
    for (int i = 0; i < 3; i++)
        removes_under_uffd += zap(C_START + c_touched[i] * PAGE, 1);

    /* munmap: a MiB of B, then fresh memory there; a quarter of C. */
    int unmaps_under_uffd = 0;
    if (munmap((void *)(B_START + B_FRESH_OFF), B_FRESH_LEN) != 0)
        fail("munmap B: %s", strerror(errno));
    unmaps_under_uffd += registered(B_START + B_FRESH_OFF + B_FRESH_LEN);
    map_region(B_START + B_FRESH_OFF, B_FRESH_LEN, PROT_READ | PROT_WRITE, 0);
    fresh[nfresh++] = (struct span){ B_START + B_FRESH_OFF, B_FRESH_LEN };
    if (munmap((void *)(C_START + C_GONE_OFF), C_GONE_LEN) != 0)
        fail("munmap C: %s", strerror(errno));
    unmaps_under_uffd += registered(C_START + C_GONE_OFF + C_GONE_LEN);
    gone[ngone++] = (struct span){ C_START + C_GONE_OFF, C_GONE_LEN };

    /* Every page, in random order. */
    uint64_t data_pages = verify_pass(1, 0, 1, "parent");
    uint64_t sum1 = checksum;
    /* zero_after_dontneed: pages with data in the image that read zero after MADV_DONTNEED. */
    uint64_t zero_after = 0;
    for (size_t i = 0; i < npages; i++)
        if (zapped(pages[i]) && is_data(pages[i]) && state_of(pages[i]) == ZERO &&
            !in_span(fresh, nfresh, pages[i]))
            zero_after++;

    /* MADV_DONTNEED of verified pages: zero at once, never the image's data again. */
    rng_state = seed ^ 0xDEAD;
    for (int i = 0; i < 16; i++) {
        uint64_t p = i < 6 ? A_START + (rnd() % A_PAGES) * PAGE : some_b_data_page();
        if (zapped(p) || state_of(p) != DATA)
            continue;
        removes_under_uffd += zap(p, 1);
        verify_page(p, "parent after MADV_DONTNEED");
        zero_after++;
    }

    for (uint64_t pass = 2; !should_stop(); pass++)
        verify_pass(pass, 0, 1, "parent (again)");

    for (int k = 0; k < nchildren; k++)
        check_exit(kids[k], wait_status(kids[k]), "child", k);
    say("OK richstate checksum=%016lx pages=%lu zero_after_dontneed=%lu children=%d "
        "grandchildren=%d forks_under_uffd=%d remaps_under_uffd=%d removes_under_uffd=%d "
        "unmaps_under_uffd=%d",
        (unsigned long)sum1, (unsigned long)data_pages, (unsigned long)zero_after, nchildren,
        ngrand_total, forks_under_uffd, remaps_under_uffd, removes_under_uffd,
        unmaps_under_uffd);
    return 0;
}

static int reap(char **argv)
{
    if (prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) {
        say("SETUP PR_SET_CHILD_SUBREAPER: %s", strerror(errno));
        return 2;
    }
    pid_t child = fork();
    if (child < 0) {
        say("SETUP fork: %s", strerror(errno));
        return 2;
    }
    if (child == 0) {
        execvp(argv[0], argv);
        say("SETUP exec %s: %s", argv[0], strerror(errno));
        _exit(127);
    }
    say("CHILD pid=%d", (int)child);
    for (;;) {
        siginfo_t si;
        memset(&si, 0, sizeof si);
        if (waitid(P_ALL, 0, &si, WEXITED | WNOWAIT) != 0) {
            if (errno == EINTR)
                continue;
            break; /* ECHILD: nobody left */
        }
        pid_t pid = si.si_pid;
        char path[64], comm[64] = "?";
        snprintf(path, sizeof path, "/proc/%d/comm", (int)pid);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            ssize_t n = read(fd, comm, sizeof comm - 1);
            comm[n > 0 ? n : 0] = 0;
            char *nl = strchr(comm, '\n');
            if (nl)
                *nl = 0;
            close(fd);
        }
        int st;
        if (waitpid(pid, &st, 0) != pid)
            continue;
        if (WIFSIGNALED(st))
            say("REAPED pid=%d comm=%s status=signal:%d", (int)pid, comm, WTERMSIG(st));
        else
            say("REAPED pid=%d comm=%s status=exit:%d", (int)pid, comm, WEXITSTATUS(st));
    }
    say("REAPER done");
    return 0;
}

int main(int argc, char **argv)
{
    umm_target_name = "richstate";
    (void)map_anon;
    if (argc >= 3 && strcmp(argv[1], "reap") == 0)
        return reap(argv + 2);
    if (argc < 3) {
        say("usage: richstate build SEED | restore SEED IMG | reap CMD...");
        return 2;
    }
    char *end;
    seed = strtoull(argv[2], &end, 0);
    if (*end) {
        say("SETUP bad seed %s", argv[2]);
        return 2;
    }
    gen_layout();
    if (strcmp(argv[1], "build") == 0 && argc == 3)
        return build();
    if (strcmp(argv[1], "restore") == 0 && argc == 4)
        return restore(argv[3]);
    say("usage: richstate build SEED | restore SEED IMG | reap CMD...");
    return 2;
}
