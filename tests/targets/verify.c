/* verify: the smallest verifying target. Maps a fresh region, checks that it reads zero, fills
 * it, verifies it and checks that it is registered. Used after every chaos kill to show that
 * the manager still serves a fresh process.
 *
 * usage: verify [pages=256]
 */
#include "umm_check.h"

int main(int argc, char **argv)
{
    umm_target_name = "verify";
    size_t pages = argc > 1 ? strtoul(argv[1], NULL, 0) : 256;
    if (pages < 1 || pages > 65536)
        fail("usage: verify [pages 1..65536]");
    uint8_t *region = map_anon(pages * PAGE, PROT_READ | PROT_WRITE);
    check_zero(region, pages, "fresh region");
    fill_pages(region, pages, 42, 0);
    uint64_t h = check_pages(region, pages, 42, 0, "region after fill");
    um_check(region);
    printf("OK verify checksum=%016llx min_served=%zu registered=%d/%d%s\n", (unsigned long long)h,
           pages, um_registered, um_checked, um_missing_field());
    return 0;
}
