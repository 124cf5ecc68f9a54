/* memhog: touch N MiB of fresh anonymous memory and verify it; used under a memory cgroup
 * limit (tests/hostile.rs).
 *
 * Pass 1 reads every page: a read fault reaches the manager without charging anything to
 * the cgroup, so the manager's UFFDIO_COPY is what meets the limit. (A write fault on a
 * registered missing page charges a page before the kernel hands the fault over: at the limit
 * it fails in the process's own fault, and the manager never hears of it.) Pass 2 fills every
 * page with a pattern, pass 3 verifies it and checksums it.
 *
 * usage: memhog MIB
 */
#include "umm_check.h"

int main(int argc, char **argv)
{
    umm_target_name = "memhog";
    if (argc != 2)
        fail("usage: memhog MIB");
    size_t len = strtoul(argv[1], NULL, 10) << 20;
    if (len == 0)
        fail("MIB must be positive");
    uint8_t *p = map_anon(len, PROT_READ | PROT_WRITE);
    um_check_at(p, "hog");
    check_zero(p, len / PAGE, "fresh memory");
    fill_pages(p, len / PAGE, 7, 0);
    uint64_t h = check_pages(p, len / PAGE, 7, 0, "hog");
    printf("OK memhog checksum=%016llx min_served=%zu registered=%d/%d%s\n",
           (unsigned long long)h, len / PAGE, um_registered, um_checked, um_missing_field());
    return 0;
}
