/* registered: memory the program maps itself through the public mmap/mremap symbols, and its
 * .bss, must be registered with a userfaultfd before the program first touches it.
 *
 * For each region the program asks the kernel (VmFlags `um` in /proc/self/smaps) whether the
 * VMA is registered for missing faults, BEFORE touching it, then fills every page and verifies.
 * Natively the answer is no for every region (registered=0/N): this is the negative control
 * that shows the check can tell. Under umm it must be yes for all (registered=N/N), and since a
 * registered missing page can only be filled by the manager, the manager's pages_served must be
 * at least min_served.
 *
 * Regions: plain mmap (16 MiB); a PROT_NONE reservation made read-write with mprotect (16 MiB);
 * a MAP_FIXED mapping placed inside a reservation (4 MiB); a mapping grown by mremap (4 -> 12
 * MiB, the tail checked after the grow); an 8 MiB .bss array.
 *
 * usage: registered
 */
#include "umm_check.h"

#define MIB (1UL << 20)
#define BSS_PAGES 2048

static uint64_t bss[BSS_PAGES * WORDS_PER_PAGE] __attribute__((aligned(4096)));
static char names[512];
static uint64_t h;
static long min_served;

static void region(const char *name, void *p, size_t pages, uint64_t seed)
{
    int before = um_registered;
    um_check_at(p, name);
    size_t n = strlen(names);
    snprintf(names + n, sizeof names - n, "%s%s:%d", n ? "," : "", name, um_registered - before);
    check_zero(p, 1, name);
    fill_pages(p, pages, seed, 0);
    h = ck_add(h, check_pages(p, pages, seed, 0, name));
    min_served += (long)pages;
}

int main(void)
{
    umm_target_name = "registered";
    size_t bytes = 0;

    uint8_t *plain = map_anon(16 * MIB, PROT_READ | PROT_WRITE);
    region("plain", plain, 16 * MIB / PAGE, 1);
    bytes += 16 * MIB;

    uint8_t *resv = map_anon(16 * MIB, PROT_NONE);
    if (mprotect(resv, 16 * MIB, PROT_READ | PROT_WRITE) != 0)
        fail("mprotect: %s", strerror(errno));
    region("reserved", resv, 16 * MIB / PAGE, 2);
    bytes += 16 * MIB;

    uint8_t *outer = map_anon(8 * MIB, PROT_NONE);
    uint8_t *fixed = mmap(outer + 2 * MIB, 4 * MIB, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (fixed != outer + 2 * MIB)
        fail("mmap MAP_FIXED: %s", strerror(errno));
    region("fixed", fixed, 4 * MIB / PAGE, 3);
    bytes += 4 * MIB;

    uint8_t *g = map_anon(4 * MIB, PROT_READ | PROT_WRITE);
    region("grow_head", g, 4 * MIB / PAGE, 4);
    uint8_t *g2 = mremap(g, 4 * MIB, 12 * MIB, MREMAP_MAYMOVE);
    if (g2 == MAP_FAILED)
        fail("mremap: %s", strerror(errno));
    h = ck_add(h, check_pages(g2, 4 * MIB / PAGE, 4, 0, "grown: head after mremap"));
    region("grow_tail", g2 + 4 * MIB, 8 * MIB / PAGE, 5);
    bytes += 12 * MIB;

    /* skip the first .bss page: it may share a file-backed page with .data */
    region("bss", bss + WORDS_PER_PAGE, BSS_PAGES - 1, 6);
    bytes += (BSS_PAGES - 1) * PAGE;

    printf("OK registered checksum=%016llx min_served=%ld bytes=%zu registered=%d/%d%s regions=%s\n",
           (unsigned long long)h, min_served, bytes, um_registered, um_checked, um_missing_field(), names);
    return 0;
}
