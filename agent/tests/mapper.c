/* Target program for the agent's integration tests (compiled by the tests with `cc`).
 *
 *   mapper                 print "done"
 *   mapper map LEN         map memory the agent must register (printing "map ADDR LEN" for
 *                          each) and some it must not, grow one with mremap, shrink it in place
 *   mapper fork LEN [LEVELS]
 *                          a chain of LEVELS (default 1) forked descendants: each maps and
 *                          touches (depth+1)*LEN ("map-in PID ADDR LEN"), forks the next one,
 *                          waits for it and maps (depth+1)*LEN again; then the top process
 *                          maps LEN ("map ADDR LEN")
 *   mapper fork-fds LEN    a child maps LEN, then its child maps LEN and lists its fds
 *   mapper fork-locked LEN a thread maps LEN (its Register is slow to be answered); meanwhile the
 *                          main thread forks a child that maps 2*LEN
 *   mapper vfork LEN       a vfork child maps LEN before _exit; the parent maps LEN; a forked
 *                          child maps 2*LEN, has a vfork child map 3*LEN, maps 2*LEN again
 *   mapper closefds FILE [child]
 *                          (in a forked child that mapped once already, with "child") close
 *                          every fd >= 3, open FILE 8 times, map 1 MiB ("map"/"map-in"), then
 *                          read FILE through each fd ("read I TEXT")
 *   mapper threads N       N threads each map (i+1)*64 KiB at the same time
 *   mapper fds             list this process's fds ("fd N -> TARGET")
 *   mapper exec-fds        unset UMM_SOCKET and exec `mapper fds`
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
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

static void wait_ok(pid_t pid)
{
	int status;
	if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status)) {
		fprintf(stderr, "child %d failed\n", (int)pid);
		fflush(stdout);
		_exit(2);
	}
}

static pid_t fork_or_die(void)
{
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0) {
		perror("fork");
		_exit(2);
	}
	return pid;
}

/* A forked descendant's mapping, printed with its pid. */
static void map_in(size_t len)
{
	unsigned char *p = map(len, RW, ANON);
	touch(p, len);
	printf("map-in %d %p %zu\n", (int)getpid(), (void *)p, len);
	fflush(stdout);
}

/* The process at `depth` forks the next one, which maps, recurses, maps again and exits. */
static void fork_chain(size_t len, int depth, int levels)
{
	if (depth >= levels)
		return;
	pid_t pid = fork_or_die();
	if (pid == 0) {
		size_t mine = (size_t)(depth + 2) * len;
		map_in(mine);
		fork_chain(len, depth + 1, levels);
		map_in(mine);
		_exit(0);
	}
	wait_ok(pid);
}

/* A vfork child maps memory before it exits, as a posix_spawn child could before exec. */
static void vfork_and_map(size_t len)
{
	pid_t pid = vfork();
	if (pid < 0) {
		perror("vfork");
		_exit(2);
	}
	if (pid == 0) {
		void *p = mmap(NULL, len, RW, ANON, -1, 0);
		_exit(p == MAP_FAILED ? 2 : 0);
	}
	wait_ok(pid);
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
		fork_chain(len, 0, argc > 3 ? atoi(argv[3]) : 1);
		unsigned char *p = map(len, RW, ANON);
		touch(p, len);
		printf("map %p %zu\n", (void *)p, len);
	} else if (!strcmp(mode, "fork-fds") && argc > 2) {
		size_t len = strtoul(argv[2], NULL, 0);
		pid_t pid = fork_or_die();
		if (pid == 0) {
			map_in(len);
			pid_t grandchild = fork_or_die();
			if (grandchild == 0) {
				map_in(len);
				list_fds();
				fflush(stdout);
				_exit(0);
			}
			wait_ok(grandchild);
			_exit(0);
		}
		wait_ok(pid);
	} else if (!strcmp(mode, "fork-locked") && argc > 2) {
		size_t len = strtoul(argv[2], NULL, 0);
		pthread_t t;
		if (pthread_create(&t, NULL, thread_main, (void *)len))
			return 2;
		usleep(300 * 1000); /* the thread is waiting for its Register's Ack now */
		pid_t pid = fork_or_die();
		if (pid == 0) {
			map_in(2 * len);
			_exit(0);
		}
		wait_ok(pid);
		pthread_join(t, NULL);
	} else if (!strcmp(mode, "vfork") && argc > 2) {
		size_t len = strtoul(argv[2], NULL, 0);
		vfork_and_map(len);
		unsigned char *p = map(len, RW, ANON);
		touch(p, len);
		printf("map %p %zu\n", (void *)p, len);
		pid_t pid = fork_or_die();
		if (pid == 0) {
			map_in(2 * len);
			vfork_and_map(3 * len);
			map_in(2 * len);
			_exit(0);
		}
		wait_ok(pid);
	} else if (!strcmp(mode, "closefds") && argc > 2) {
		int in_child = argc > 3 && !strcmp(argv[3], "child");
		pid_t pid = 0;
		if (in_child) {
			pid = fork_or_die();
			if (pid > 0)
				wait_ok(pid);
			else
				map_in(65536); /* the child's channel is open now */
		}
		if (pid == 0) {
			/* Close what the agent holds (and anything else), then reuse the numbers. */
			for (int fd = 3; fd < 1024; fd++)
				close(fd);
			int fds[8];
			for (int i = 0; i < 8; i++) {
				fds[i] = open(argv[2], O_RDONLY);
				if (fds[i] < 0) {
					perror("open");
					_exit(2);
				}
			}
			if (in_child) {
				map_in(1 << 20);
			} else {
				unsigned char *p = map(1 << 20, RW, ANON);
				touch(p, 1 << 20);
				printf("map %p %d\n", (void *)p, 1 << 20);
			}
			for (int i = 0; i < 8; i++) {
				char buf[256];
				ssize_t n = read(fds[i], buf, sizeof buf - 1);
				if (n < 0) {
					printf("read %d failed: %s\n", i, strerror(errno));
					continue;
				}
				buf[n] = 0;
				buf[strcspn(buf, "\n")] = 0;
				printf("read %d %s\n", i, buf);
			}
			if (in_child) {
				fflush(stdout);
				_exit(0);
			}
		}
		if (in_child) {
			/* The parent's own Register requests still work. */
			unsigned char *p = map(1 << 20, RW, ANON);
			touch(p, 1 << 20);
			printf("map %p %d\n", (void *)p, 1 << 20);
		}
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
