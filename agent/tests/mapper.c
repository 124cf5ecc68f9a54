/* Target program for the agent's integration tests (compiled by the tests with `cc`).
 *
 *   mapper                 print "done"
 *   mapper map LEN         map memory the agent must register (printing "map ADDR LEN" for
 *                          each) and some it must not, grow one with mremap, shrink it in place
 *   mapper fork LEN        a forked child maps 2*LEN (must not be registered), then the parent
 *                          maps LEN
 *   mapper threads N       N threads each map (i+1)*64 KiB at the same time
 *   mapper fds             list this process's fds ("fd N -> TARGET")
 *   mapper exec-fds        unset UMM_SOCKET and exec `mapper fds`
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define RW (PROT_READ | PROT_WRITE)
#define ANON (MAP_PRIVATE | MAP_ANONYMOUS)

static void *map(size_t len, int prot, int flags)
{
	void *p = mmap(NULL, len, prot, flags, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	return p;
}

static void touch(unsigned char *p, size_t len)
{
	for (size_t i = 0; i < len; i += 4096)
		p[i] = (unsigned char)(i >> 12);
}

static void *thread_main(void *arg)
{
	size_t len = (size_t)arg;
	unsigned char *p = map(len, RW, ANON);
	touch(p, len);
	printf("map %p %zu\n", (void *)p, len);
	return NULL;
}

static void list_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *e;
	char path[PATH_MAX], target[PATH_MAX];
	if (!d) {
		perror("opendir");
		exit(2);
	}
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
		ssize_t n = readlink(path, target, sizeof target - 1);
		if (n < 0)
			continue;
		target[n] = 0;
		printf("fd %s -> %s\n", e->d_name, target);
	}
	closedir(d);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";

	if (!strcmp(mode, "map") && argc > 2) {
		size_t len = strtoul(argv[2], NULL, 0);
		unsigned char *p = map(len, RW, ANON);
		touch(p, len);
		printf("map %p %zu\n", (void *)p, len);
		void *reserve = map(len, PROT_NONE, ANON | MAP_NORESERVE);
		printf("map %p %zu\n", reserve, len);
		/* Not for the manager: shared, read-only, file-backed. */
		map(8192, RW, MAP_SHARED | MAP_ANONYMOUS);
		map(8192, PROT_READ, ANON);
		int fd = open(argv[0], O_RDONLY | O_CLOEXEC);
		if (fd < 0 || mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, fd, 0) == MAP_FAILED) {
			perror("file mmap");
			return 2;
		}
		close(fd);
		unsigned char *q = mremap(p, len, 2 * len, MREMAP_MAYMOVE);
		if (q == MAP_FAILED) {
			perror("mremap");
			return 2;
		}
		touch(q, 2 * len);
		printf("map %p %zu\n", (void *)q, 2 * len);
		/* Shrinking in place adds nothing. */
		if (mremap(q, 2 * len, len, 0) != q) {
			perror("mremap shrink");
			return 2;
		}
	} else if (!strcmp(mode, "fork") && argc > 2) {
		size_t len = strtoul(argv[2], NULL, 0);
		fflush(stdout);
		pid_t pid = fork();
		if (pid < 0) {
			perror("fork");
			return 2;
		}
		if (pid == 0) {
			touch(map(2 * len, RW, ANON), 2 * len);
			_exit(0);
		}
		int status;
		if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status)) {
			fprintf(stderr, "child failed\n");
			return 2;
		}
		unsigned char *p = map(len, RW, ANON);
		touch(p, len);
		printf("map %p %zu\n", (void *)p, len);
	} else if (!strcmp(mode, "threads") && argc > 2) {
		int n = atoi(argv[2]);
		pthread_t t[64];
		if (n < 1 || n > 64)
			return 2;
		for (int i = 0; i < n; i++)
			if (pthread_create(&t[i], NULL, thread_main, (void *)((size_t)(i + 1) << 16)))
				return 2;
		for (int i = 0; i < n; i++)
			pthread_join(t[i], NULL);
	} else if (!strcmp(mode, "fds")) {
		list_fds();
	} else if (!strcmp(mode, "exec-fds")) {
		unsetenv("UMM_SOCKET");
		fflush(stdout);
		execl(argv[0], argv[0], "fds", (char *)NULL);
		perror("execl");
		return 2;
	} else if (*mode) {
		fprintf(stderr, "mapper: bad arguments\n");
		return 2;
	}
	printf("done\n");
	return 0;
}
