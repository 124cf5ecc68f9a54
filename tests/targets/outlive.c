/* outlive: a target that outlives its manager. Phase 1 maps and half-fills a region (served by
 * the manager), reports whether it is registered and prints "PHASE1"; it then waits until the
 * file named by argv[1] exists (the test stops the manager in between), fills the rest, maps
 * and fills a second region, verifies everything and prints OK with the registration seen
 * before and after. Fail-open means: after the manager is gone, the program goes on, on
 * plain memory, with its data intact. */
#include "umm_check.h"

int main(int argc, char **argv)
{
    umm_target_name = "outlive";
    if (argc < 2)
        fail("usage: outlive GO-FILE");
    size_t len = 512 * PAGE;
    uint64_t *a = map_anon(len, PROT_READ | PROT_WRITE);
    for (size_t i = 0; i < len / 16; i++)
        a[i] = pattern(7, i);
    int before = vma_has_flag(a, "um");
    printf("PHASE1 registered=%d\n", before);
    fflush(stdout);
    for (int tries = 0; access(argv[1], F_OK) != 0; tries++) {
        if (tries > 6000)
            fail("%s never appeared", argv[1]);
        usleep(10000);
    }
    for (size_t i = len / 16; i < len / 8; i++)
        a[i] = pattern(7, i);
    uint64_t *b = map_anon(len, PROT_READ | PROT_WRITE);
    for (size_t i = 0; i < len / 8; i++)
        b[i] = pattern(8, i);
    uint64_t h = 0;
    for (size_t i = 0; i < len / 8; i++) {
        if (a[i] != pattern(7, i))
            fail("a[%zu] lost its value", i);
        if (b[i] != pattern(8, i))
            fail("b[%zu] lost its value", i);
        h = ck_add(ck_add(h, a[i]), b[i]);
    }
    int after = vma_has_flag(a, "um");
    printf("OK outlive checksum=%016llx before=%d after=%d\n", (unsigned long long)h, before,
           after);
    return 0;
}
