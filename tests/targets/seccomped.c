/* seccomped: runs under a seccomp filter (one that allows every system call), prints
 * "READY pid=P" and sleeps; for umm attach's refusal test. */
#include "umm_check.h"

#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>

int main(void)
{
    umm_target_name = "seccomped";
    struct sock_filter allow[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
    struct sock_fprog prog = {.len = 1, .filter = allow};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
        fail("seccomp: %s", strerror(errno));
    printf("READY pid=%d\n", getpid());
    fflush(stdout);
    for (int i = 0; i < 60; i++)
        sleep(1);
    return 0;
}
