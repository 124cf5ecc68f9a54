/* readinto: the kernel writes into memory the program never touched (copy_to_user faults).
 *
 * The program writes a deterministic file (in $TMPDIR or /tmp, unlinked at once), then:
 *  1. read(2)s the whole file into a fresh, never-touched mmap;
 *  2. pread(2)s into the middle of another never-touched mmap, at an unaligned address and
 *     offset; the bytes around it must stay zero;
 *  3. reads /proc/self/exe into a touched buffer and into a never-touched mmap; they must match;
 *  4. fstat(2)s into a never-touched page;
 *  5. read(2)s from a pipe into a never-touched mmap;
 *  6. forks once: the child preads into a range the parent mapped before the fork and never
 *     touched, and into a range the child maps itself; then the parent preads into the same
 *     inherited range and must see file data, not the child's.
 * Under umm every one of these first touches is a missing fault raised inside the kernel that
 * only the manager can resolve (min_served counts those pages; a manager's fault-around may fill
 * a page before the kernel touches it, but it still fills it, once, in that address space).
 *
 * usage: readinto
 */
#include "umm_check.h"
#include <sys/stat.h>
#include <sys/wait.h>

#define FILE_LEN (6UL * 1024 * 1024 + 1234)

static uint8_t file_byte(size_t i)
{
    return (uint8_t)(mix64(i / 8 + 77) >> (8 * (i % 8)));
}

static size_t pages_spanned(const void *p, size_t len)
{
    uintptr_t a = (uintptr_t)p;
    return (a + len - 1) / PAGE - a / PAGE + 1;
}

static uint64_t verify(const uint8_t *p, size_t len, size_t off, const char *what)
{
    uint64_t h = 0;
    for (size_t i = 0; i < len; i++) {
        if (p[i] != file_byte(off + i))
            fail("%s: byte %zu = %02x, want %02x", what, i, p[i], file_byte(off + i));
        if ((i & 4095) == 0)
            h = ck_add(h, p[i] | (uint64_t)i << 8);
    }
    return h;
}

static void zero_bytes(const uint8_t *p, size_t len, const char *what)
{
    for (size_t i = 0; i < len; i++)
        if (p[i] != 0)
            fail("%s: byte %zu = %02x, want 0", what, i, p[i]);
}

static void pread_full(int fd, void *buf, size_t len, off_t off, const char *what)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, (uint8_t *)buf + done, len - done, off + (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fail("%s: pread at %zu returned %zd: %s", what, done, n, n < 0 ? strerror(errno) : "EOF");
        done += (size_t)n;
    }
}

static void read_full(int fd, void *buf, size_t len, const char *what)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = read(fd, (uint8_t *)buf + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fail("%s: read at %zu returned %zd: %s", what, done, n, n < 0 ? strerror(errno) : "EOF");
        done += (size_t)n;
    }
}

static int make_file(void)
{
    const char *dir = getenv("TMPDIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/readinto.XXXXXX", dir && *dir ? dir : "/tmp");
    int fd = mkstemp(path);
    if (fd < 0)
        fail("mkstemp %s: %s", path, strerror(errno));
    unlink(path);
    uint8_t buf[65536];
    for (size_t off = 0; off < FILE_LEN; off += sizeof buf) {
        size_t n = FILE_LEN - off < sizeof buf ? FILE_LEN - off : sizeof buf;
        for (size_t i = 0; i < n; i++)
            buf[i] = file_byte(off + i);
        if (write(fd, buf, n) != (ssize_t)n)
            fail("write: %s", strerror(errno));
    }
    return fd;
}

struct child_result {
    long min_served;
    int checked, registered;
    uint64_t h;
    char missing[256];
};

int main(void)
{
    umm_target_name = "readinto";
    long min_served = 0;
    uint64_t h = 0;
    int fd = make_file();

    /* 1. read(2) the whole file into a never-touched range */
    uint8_t *r1 = map_anon(8UL << 20, PROT_READ | PROT_WRITE);
    if (lseek(fd, 0, SEEK_SET) != 0)
        fail("lseek");
    read_full(fd, r1, FILE_LEN, "read into untouched");
    h = ck_add(h, verify(r1, FILE_LEN, 0, "read into untouched"));
    min_served += (long)pages_spanned(r1, FILE_LEN);
    zero_bytes(r1 + FILE_LEN, PAGE - FILE_LEN % PAGE, "rest of the last page read into");
    um_check(r1);

    /* 2. pread into the middle of a never-touched range, unaligned */
    uint8_t *r2 = map_anon(4UL << 20, PROT_READ | PROT_WRITE);
    uint8_t *dst = r2 + 3 * PAGE + 123;
    size_t len2 = (1UL << 20) + 77;
    off_t off2 = 5 * PAGE + 11;
    pread_full(fd, dst, len2, off2, "pread into middle");
    h = ck_add(h, verify(dst, len2, (size_t)off2, "pread into middle"));
    min_served += (long)pages_spanned(dst, len2);
    zero_bytes(r2 + 3 * PAGE, 123, "bytes before the pread");
    uint8_t *end = dst + len2;
    zero_bytes(end, PAGE - (uintptr_t)end % PAGE, "bytes after the pread");
    um_check(r2);

    /* 3. /proc/self/exe into a touched buffer and into a never-touched range */
    int exe = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (exe < 0 || fstat(exe, &st) != 0 || st.st_size <= 0)
        fail("open/fstat /proc/self/exe: %s", strerror(errno));
    size_t exe_len = (size_t)st.st_size;
    uint8_t *touched = malloc(exe_len);
    if (!touched)
        fail("malloc");
    memset(touched, 0xAA, exe_len);
    pread_full(exe, touched, exe_len, 0, "exe into touched buffer");
    uint8_t *r3 = map_anon((exe_len + PAGE - 1) / PAGE * PAGE, PROT_READ | PROT_WRITE);
    pread_full(exe, r3, exe_len, 0, "exe into untouched");
    if (memcmp(touched, r3, exe_len) != 0)
        fail("/proc/self/exe read into untouched memory differs from the touched copy");
    for (size_t i = 0; i < exe_len; i += 64)
        h = ck_add(h, touched[i]);
    min_served += (long)pages_spanned(r3, exe_len);
    free(touched);
    close(exe);

    /* 4. fstat into a never-touched page */
    uint8_t *r4 = map_anon(PAGE, PROT_READ | PROT_WRITE);
    if (fstat(fd, (struct stat *)r4) != 0)
        fail("fstat into untouched: %s", strerror(errno));
    if (((struct stat *)r4)->st_size != (off_t)FILE_LEN)
        fail("fstat into untouched: size %lld", (long long)((struct stat *)r4)->st_size);
    min_served += 1;

    /* 5. a pipe into a never-touched range */
    int pp[2];
    if (pipe(pp) != 0)
        fail("pipe");
    uint8_t buf[32768];
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = file_byte(i + 999);
    if (write(pp[1], buf, sizeof buf) != (ssize_t)sizeof buf)
        fail("pipe write");
    uint8_t *r5 = map_anon(sizeof buf, PROT_READ | PROT_WRITE);
    read_full(pp[0], r5, sizeof buf, "pipe into untouched");
    h = ck_add(h, verify(r5, sizeof buf, 999, "pipe into untouched"));
    min_served += (long)(sizeof buf / PAGE);
    close(pp[0]);
    close(pp[1]);

    /* 6. fork: the child reads into inherited and own never-touched ranges */
    uint8_t *r6 = map_anon(4UL << 20, PROT_READ | PROT_WRITE);
    /* r6 may share a VMA with the ranges above, so a manager's fault-around may already have
     * filled some of it: zap it, so it is surely missing in the parent when it forks */
    if (madvise(r6, 4UL << 20, MADV_DONTNEED) != 0)
        fail("madvise: %s", strerror(errno));
    if (pipe(pp) != 0)
        fail("pipe");
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        fail("fork: %s", strerror(errno));
    if (pid == 0) {
        struct child_result cr;
        memset(&cr, 0, sizeof cr);
        um_checked = um_registered = 0; /* the parent reports its own checks */
        um_missing[0] = 0;
        pread_full(fd, r6, 2UL << 20, 7 * PAGE, "child: pread into inherited untouched");
        cr.h = ck_add(cr.h, verify(r6, 2UL << 20, 7 * PAGE, "child: pread into inherited untouched"));
        cr.min_served += (2L << 20) / (long)PAGE;
        uint8_t *r7 = map_anon(2UL << 20, PROT_READ | PROT_WRITE);
        lseek(fd, 0, SEEK_SET);
        read_full(fd, r7 + 100, (1UL << 20), "child: read into own untouched");
        cr.h = ck_add(cr.h, verify(r7 + 100, 1UL << 20, 0, "child: read into own untouched"));
        cr.min_served += (long)pages_spanned(r7 + 100, 1UL << 20);
        um_check(r6);
        um_check(r7);
        cr.checked = um_checked;
        cr.registered = um_registered;
        snprintf(cr.missing, sizeof cr.missing, "%s", um_missing);
        if (write(pp[1], &cr, sizeof cr) != (ssize_t)sizeof cr)
            fail("child: result write");
        _exit(0);
    }
    close(pp[1]);
    struct child_result cr;
    read_full(pp[0], &cr, sizeof cr, "child result");
    close(pp[0]);
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            fail("waitpid: %s", strerror(errno));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail("child failed (status %#x)", status);
    pread_full(fd, r6, 1UL << 20, 0, "parent: pread into inherited range after the child");
    h = ck_add(h, verify(r6, 1UL << 20, 0, "parent: pread into inherited range after the child"));
    zero_bytes(r6 + (1UL << 20), 2 * PAGE, "parent: inherited range past its read (child wrote there)");
    min_served += (1L << 20) / (long)PAGE + 2 + cr.min_served;
    h = ck_add(h, cr.h);
    um_check(r6);
    if (cr.missing[0]) {
        size_t n = strlen(um_missing);
        snprintf(um_missing + n, sizeof um_missing - n, "%schild:%s", n ? "," : "", cr.missing);
    }
    printf("OK readinto checksum=%016llx min_served=%ld registered=%d/%d%s\n", (unsigned long long)h,
           min_served, um_registered + cr.registered, um_checked + cr.checked, um_missing_field());
    return 0;
}
