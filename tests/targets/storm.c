/* storm: threads fault a registered region round after round, every page verified, until
 * killed or told to finish. Used to kill targets (or their manager) in the middle of faults.
 *
 * Each thread owns a slice of the region and a "keep" page. The keep page is filled once and
 * verified every round: data written while the manager served it must survive anything (the
 * manager's death included: fail-open). Round r of a thread: every page of its slice must read
 * zero (fresh, or zapped by the previous round), is filled with pattern(id, r) and verified,
 * then the slice is zapped with MADV_DONTNEED (a REMOVE event: missing again).
 * "RUNNING storm" is printed (flushed) once every thread finished its first round.
 *
 * usage: storm THREADS SLICE_PAGES GO-FILE|- [after=20]
 *   "-": run until killed. Else, once GO-FILE exists, each thread does `after` more rounds and
 *   the program prints its OK line.
 */
#include "umm_check.h"
#include <pthread.h>

#define MAX_THREADS 64

static size_t nthreads, slice_pages;
static long after;
static const char *go_file;
static uint8_t *region, *keep;
static long rounds_done[MAX_THREADS];
static int first_rounds;

static void *worker(void *arg)
{
    size_t id = (size_t)arg;
    uint8_t *slice = region + id * slice_pages * PAGE;
    uint8_t *mine = keep + id * PAGE;
    fill_pages(mine, 1, 9000 + id, 0);
    long left = -1; /* rounds to go once the go file exists */
    for (long r = 0; left != 0; r++) {
        check_pages(mine, 1, 9000 + id, 0, "keep page");
        check_zero(slice, slice_pages, "slice at the start of a round (fresh or zapped)");
        fill_pages(slice, slice_pages, id + 1, (uint64_t)r * slice_pages);
        check_pages(slice, slice_pages, id + 1, (uint64_t)r * slice_pages, "slice after fill");
        if (madvise(slice, slice_pages * PAGE, MADV_DONTNEED) != 0)
            fail("madvise: %s", strerror(errno));
        rounds_done[id] = r + 1;
        if (r == 0 && __atomic_add_fetch(&first_rounds, 1, __ATOMIC_ACQ_REL) == (int)nthreads) {
            static const char msg[] = "RUNNING storm\n";
            ssize_t w = write(1, msg, sizeof msg - 1);
            (void)w;
        }
        if (left > 0)
            left--;
        else if (left < 0 && go_file && access(go_file, F_OK) == 0)
            left = after;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    umm_target_name = "storm";
    if (argc < 4)
        fail("usage: storm THREADS SLICE_PAGES GO-FILE|- [after]");
    nthreads = strtoul(argv[1], NULL, 0);
    slice_pages = strtoul(argv[2], NULL, 0);
    go_file = strcmp(argv[3], "-") == 0 ? NULL : argv[3];
    after = argc > 4 ? strtol(argv[4], NULL, 0) : 20;
    if (nthreads < 1 || nthreads > MAX_THREADS || slice_pages < 1 || slice_pages > 65536 || after < 1)
        fail("usage: storm THREADS(1..%d) SLICE_PAGES(1..65536) GO-FILE|- [after>=1]", MAX_THREADS);
    region = map_anon(nthreads * slice_pages * PAGE, PROT_READ | PROT_WRITE);
    keep = map_anon(nthreads * PAGE, PROT_READ | PROT_WRITE);
    int before = vma_has_flag(region, "um");
    pthread_t t[MAX_THREADS];
    for (size_t i = 0; i < nthreads; i++)
        if (pthread_create(&t[i], NULL, worker, (void *)i) != 0)
            fail("pthread_create");
    for (size_t i = 0; i < nthreads; i++)
        pthread_join(t[i], NULL);
    uint64_t h = 0;
    long total = 0;
    for (size_t i = 0; i < nthreads; i++) {
        h = ck_add(h, check_pages(keep + i * PAGE, 1, 9000 + i, 0, "keep page at the end"));
        total += rounds_done[i];
    }
    /* every round of every thread touched its whole slice while it was missing */
    printf("OK storm checksum=%016llx threads=%zu rounds=%ld min_served=%ld before=%d after=%d\n",
           (unsigned long long)h, nthreads, total, total * (long)slice_pages, before,
           vma_has_flag(region, "um"));
    return 0;
}
