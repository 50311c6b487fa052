/*
 * test_wtrack.c - the write tracker (csrc/wtrack.c) must report every page
 * whose bytes may have changed since it was armed or last taken: user
 * stores, kernel writes (read(), /proc/self/mem), MADV_DONTNEED, memory
 * replaced by a new mapping; and must not report clean pages, or pages a
 * fork child wrote (copy-on-write: the parent's bytes did not change).
 * Where the kernel cannot track (an old kernel, userfaultfd refused) the
 * test checks that shardc_wt_open says so and stops.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "wtrack.h"

#define NPAGES 64

static int uffd = -1, pm = -1;
static long psz;

static char *fresh(void)
{
    char *m = mmap(NULL, (size_t)(NPAGES * psz), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED);
    memset(m, 0x5a, (size_t)(NPAGES * psz));
    CHECK_RC(shardc_wt_arm(uffd, (uint64_t)(uintptr_t)m, (uint64_t)(NPAGES * psz)));
    return m;
}

static long take(char *m, uint64_t *runs, long max)
{
    return shardc_wt_take(pm, (uint64_t)(uintptr_t)m, (uint64_t)(NPAGES * psz), runs, max);
}

static uint64_t at(char *m, long page)
{
    return (uint64_t)(uintptr_t)(m + page * psz);
}

static void test_clean_then_stores(void)
{
    uint64_t r[8];
    char *m = fresh();
    CHECK(take(m, r, 4) == 0);
    m[3 * psz + 100] = 1;
    m[10 * psz] = 2;
    m[11 * psz + psz - 1] = 3;
    CHECK(take(m, r, 4) == 2);
    CHECK(r[0] == at(m, 3) && r[1] == at(m, 4));
    CHECK(r[2] == at(m, 10) && r[3] == at(m, 12));
    CHECK(take(m, r, 4) == 0); /* taken = protected again */
    m[NPAGES * psz - 1] = 9;   /* the last byte */
    CHECK(take(m, r, 4) == 1 && r[0] == at(m, NPAGES - 1) && r[1] == at(m, NPAGES));
    CHECK_RC(shardc_wt_disarm(uffd, at(m, 0), (uint64_t)(NPAGES * psz)));
    munmap(m, (size_t)(NPAGES * psz));
}

static void test_same_value_store_is_reported(void)
{
    uint64_t r[4];
    char *m = fresh();
    m[5 * psz] = 0x5a; /* the byte it held: still a write */
    CHECK(take(m, r, 2) == 1 && r[0] == at(m, 5));
    munmap(m, (size_t)(NPAGES * psz));
}

static void test_kernel_writes(void)
{
    uint64_t r[4];
    int p[2];
    char *m = fresh();
    CHECK(pipe(p) == 0);
    CHECK(write(p[1], "ab", 2) == 2);
    CHECK(read(p[0], m + 20 * psz + 7, 2) == 2);
    CHECK(take(m, r, 2) == 1 && r[0] == at(m, 20) && r[1] == at(m, 21));
    close(p[0]);
    close(p[1]);
    int fd = open("/proc/self/mem", O_RDWR);
    CHECK(fd >= 0);
    CHECK(pwrite(fd, "z", 1, (off_t)at(m, 30)) == 1);
    close(fd);
    CHECK(take(m, r, 2) == 1 && r[0] == at(m, 30));
    munmap(m, (size_t)(NPAGES * psz));
}

static void test_dontneed_and_zero_page(void)
{
    uint64_t r[4];
    char *m = fresh();
    CHECK(madvise(m + 40 * psz, (size_t)psz, MADV_DONTNEED) == 0);
    CHECK(take(m, r, 2) == 1 && r[0] == at(m, 40)); /* not present */
    CHECK(((volatile char *)m)[40 * psz] == 0);       /* reads back as the zero page */
    CHECK(take(m, r, 2) == 1 && r[0] == at(m, 40)); /* the zero page is never vouched for */
    munmap(m, (size_t)(NPAGES * psz));
}

static void test_fork_child_writes_are_not_ours(void)
{
    uint64_t r[4];
    char *m = fresh();
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        memset(m, 1, (size_t)(NPAGES * psz)); /* copy-on-write: the parent keeps its bytes */
        _exit(0);
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st));
    CHECK(take(m, r, 2) == 0);
    CHECK(m[0] == 0x5a);
    m[2 * psz] = 7; /* and the parent's own write after the fork is seen */
    CHECK(take(m, r, 2) == 1 && r[0] == at(m, 2));
    munmap(m, (size_t)(NPAGES * psz));
}

static void test_too_many_runs(void)
{
    uint64_t r[8];
    char *m = fresh();
    for (long i = 0; i < NPAGES; i += 2)
        m[i * psz] = 1;
    CHECK(take(m, r, 4) == -E2BIG);
    munmap(m, (size_t)(NPAGES * psz));
}

static void test_replaced_mapping(void)
{
    uint64_t r[4];
    char *m = fresh();
    /* New memory at the same address (unregistered, unprotected): never clean. */
    char *n = mmap(m, (size_t)(NPAGES * psz), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    CHECK(n == m);
    memset(n, 0x5a, (size_t)(NPAGES * psz));
    long got = take(m, r, 2);
    CHECK(got == -EPERM || got >= 1);
    munmap(m, (size_t)(NPAGES * psz));
}

static void test_shared_memory_is_not_vouched_for(void)
{
    uint64_t r[4];
    char *m = mmap(NULL, (size_t)(NPAGES * psz), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED);
    memset(m, 1, (size_t)(NPAGES * psz));
    int rc = shardc_wt_arm(uffd, at(m, 0), (uint64_t)(NPAGES * psz));
    if (rc == 0) /* if the kernel let it register, the pages still count as unsure */
        CHECK(take(m, r, 2) >= 1);
    munmap(m, (size_t)(NPAGES * psz));
}

int main(void)
{
    psz = sysconf(_SC_PAGESIZE);
    int rc = shardc_wt_open(&uffd, &pm);
    if (rc == -ENOSYS || rc == -EPERM || rc == -EOPNOTSUPP) {
        printf("ok 1 - skipped: no write tracking here (%s)\n", strerror(-rc));
        return 0;
    }
    CHECK_RC(rc);
    RUN(test_clean_then_stores);
    RUN(test_same_value_store_is_reported);
    RUN(test_kernel_writes);
    RUN(test_dontneed_and_zero_page);
    RUN(test_fork_child_writes_are_not_ours);
    RUN(test_too_many_runs);
    RUN(test_replaced_mapping);
    RUN(test_shared_memory_is_not_vouched_for);
    close(uffd);
    close(pm);
    return 0;
}
