/* test_seg.c - segments: every backing creates, maps, shares across fork,
 * seals, protects, populates, and reports errors as -errno. */
#define _GNU_SOURCE
#include "harness.h"
#include "seg.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static char tmpname[128];

static const char *name_for(int backing)
{
    if (backing == SHARDC_BACKING_SHM)
        snprintf(tmpname, sizeof(tmpname), "/shardc-test-%d", (int)getpid());
    else if (backing == SHARDC_BACKING_FILE)
        snprintf(tmpname, sizeof(tmpname), "/tmp/shardc-test-%d", (int)getpid());
    else
        snprintf(tmpname, sizeof(tmpname), "shardc-test");
    return tmpname;
}

/* A child's writes through a shared mapping are visible to the parent. */
static void roundtrip(int backing)
{
    int fd;
    void *addr;
    uint64_t size = 3 * shardc_page_size() + 17, got = 0;
    pid_t pid;
    int status;

    if (!shardc_seg_backing_supported(backing))
        return;
    CHECK_RC(shardc_seg_create(backing, name_for(backing), size, 0, &fd));
    CHECK_RC(shardc_seg_size(fd, &got));
    CHECK(got == size);
    CHECK_RC(shardc_seg_map(fd, 0, size, SHARDC_MAP_WRITE, &addr));
    CHECK(((unsigned char *)addr)[size - 1] == 0); /* fresh pages are zero */
    pid = fork();
    if (pid == 0) {
        memset(addr, 0xAB, (size_t)size);
        _exit(0);
    }
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status));
    CHECK(((unsigned char *)addr)[0] == 0xAB);
    CHECK(((unsigned char *)addr)[size - 1] == 0xAB);
    CHECK_RC(shardc_seg_unmap(addr, size));
    CHECK_RC(shardc_seg_close_fd(fd));
}

static void test_memfd_roundtrip(void) { roundtrip(SHARDC_BACKING_MEMFD); }
static void test_shm_roundtrip(void) { roundtrip(SHARDC_BACKING_SHM); }
static void test_file_roundtrip(void) { roundtrip(SHARDC_BACKING_FILE); }

/* Anonymous shm/file segments leave no name behind; persistent ones do
 * until unlinked, and can be opened by name. */
static void test_persist_and_open(void)
{
    int fd, fd2;
    uint64_t size = 0;
    void *a, *b;
    const char *name = name_for(SHARDC_BACKING_SHM);

    CHECK_RC(shardc_seg_create(SHARDC_BACKING_SHM, name, 4096, 0, &fd));
    CHECK(shardc_seg_open(SHARDC_BACKING_SHM, name, 0, &fd2, &size) == -ENOENT);
    CHECK_RC(shardc_seg_close_fd(fd));

    CHECK_RC(shardc_seg_create(SHARDC_BACKING_SHM, name, 8192, 1, &fd));
    CHECK(shardc_seg_create(SHARDC_BACKING_SHM, name, 8192, 1, &fd2) == -EEXIST);
    CHECK_RC(shardc_seg_open(SHARDC_BACKING_SHM, name, 1, &fd2, &size));
    CHECK(size == 8192);
    CHECK_RC(shardc_seg_map(fd, 0, size, SHARDC_MAP_WRITE, &a));
    CHECK_RC(shardc_seg_map(fd2, 0, size, SHARDC_MAP_WRITE, &b));
    ((int *)a)[5] = 42;
    CHECK(((int *)b)[5] == 42);
    CHECK_RC(shardc_seg_unlink(SHARDC_BACKING_SHM, name));
    CHECK(shardc_seg_unlink(SHARDC_BACKING_SHM, name) == -ENOENT);
    shardc_seg_unmap(a, size);
    shardc_seg_unmap(b, size);
    close(fd);
    close(fd2);
    /* memfd has no name to persist */
    CHECK(shardc_seg_create(SHARDC_BACKING_MEMFD, "x", 10, 1, &fd) == -EINVAL ||
          !shardc_seg_backing_supported(SHARDC_BACKING_MEMFD));
}

/* A sealed memfd refuses shared writable maps but allows private ones, whose
 * writes never reach the segment. */
static void test_seal_and_private(void)
{
    int fd;
    void *w, *r, *p;
    uint64_t size = 2 * shardc_page_size();

    if (!shardc_seg_backing_supported(SHARDC_BACKING_MEMFD))
        return;
    CHECK_RC(shardc_seg_create(SHARDC_BACKING_MEMFD, "seal", size, 0, &fd));
    CHECK_RC(shardc_seg_map(fd, 0, size, SHARDC_MAP_WRITE, &w));
    memset(w, 7, (size_t)size);
    CHECK_RC(shardc_seg_unmap(w, size));
    CHECK(shardc_seg_is_sealed(fd) == 0);
    CHECK_RC(shardc_seg_seal(fd));
    CHECK(shardc_seg_is_sealed(fd) == 1);
    CHECK(shardc_seg_map(fd, 0, size, SHARDC_MAP_WRITE, &w) == -EPERM);
    CHECK_RC(shardc_seg_map(fd, 0, size, SHARDC_MAP_PRIVATE | SHARDC_MAP_WRITE, &p));
    CHECK_RC(shardc_seg_map(fd, 0, size, 0, &r));
    ((unsigned char *)p)[10] = 99;
    CHECK(((unsigned char *)r)[10] == 7);
    /* Dropping the private page brings back the segment's content. */
    CHECK_RC(shardc_seg_advise(p, size, SHARDC_ADV_DONTNEED));
    CHECK(((unsigned char *)p)[10] == 7);
    /* Seals are refused on backings without them. */
    {
        int fd2;
        CHECK_RC(shardc_seg_create(SHARDC_BACKING_FILE, name_for(SHARDC_BACKING_FILE), 4096, 0, &fd2));
        CHECK(shardc_seg_seal(fd2) == -ENOTSUP);
        close(fd2);
    }
    shardc_seg_unmap(p, size);
    shardc_seg_unmap(r, size);
    close(fd);
}

/* protect() makes a read-only view really read-only: a write faults. */
static void test_protect_faults(void)
{
    int fd, status;
    void *a;
    uint64_t size = shardc_page_size();
    pid_t pid;

    CHECK_RC(shardc_seg_create(SHARDC_BACKING_SHM, name_for(SHARDC_BACKING_SHM), size, 0, &fd));
    CHECK_RC(shardc_seg_map(fd, 0, size, SHARDC_MAP_WRITE, &a));
    CHECK_RC(shardc_seg_protect(a, size, 0));
    pid = fork();
    if (pid == 0) {
        signal(SIGSEGV, SIG_DFL);
        signal(SIGBUS, SIG_DFL);
        ((volatile char *)a)[0] = 1;
        _exit(0);
    }
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFSIGNALED(status) &&
          (WTERMSIG(status) == SIGSEGV || WTERMSIG(status) == SIGBUS));
    CHECK_RC(shardc_seg_protect(a, size, 1));
    ((volatile char *)a)[0] = 1;
    shardc_seg_unmap(a, size);
    close(fd);
}

/* populate, fill, equality, zero-size maps, bad arguments. */
static void test_populate_fill_misc(void)
{
    int fd;
    void *a, *z;
    uint64_t size = 64 * shardc_page_size();
    double pat = 1.5;

    CHECK_RC(shardc_seg_create(SHARDC_BACKING_SHM, name_for(SHARDC_BACKING_SHM), size, 0, &fd));
    CHECK_RC(shardc_seg_map(fd, 0, size, SHARDC_MAP_WRITE | SHARDC_MAP_POPULATE, &a));
    CHECK_RC(shardc_seg_populate(a, size, 1));
    CHECK_RC(shardc_seg_populate(a, size, 0));
    CHECK_RC(shardc_seg_fill(a, size, &pat, sizeof(pat)));
    CHECK(((double *)a)[size / sizeof(double) - 1] == 1.5);
    CHECK(shardc_seg_fill(a, size - 1, &pat, sizeof(pat)) == -EINVAL);
    CHECK(shardc_mem_equal(a, (char *)a + 8, size - 8) == 1);
    ((char *)a)[102] = 1; /* byte 6 of a 1.5 double is 0xF8 */
    CHECK(shardc_mem_equal(a, (char *)a + 8, size - 8) == 0);
    CHECK(shardc_seg_advise(a, size, 999) == -EINVAL);
    CHECK_RC(shardc_seg_advise(a, size, SHARDC_ADV_SEQUENTIAL));
    CHECK_RC(shardc_seg_map(fd, 0, 0, 0, &z));
    CHECK(z != NULL);
    CHECK_RC(shardc_seg_unmap(z, 0));
    CHECK(shardc_seg_map(fd, 1, 10, 0, &z) == -EINVAL); /* unaligned offset */
    CHECK(shardc_seg_map(-1, 0, 10, 0, &z) == -EBADF);
    shardc_seg_unmap(a, size);
    close(fd);
    CHECK(shardc_seg_create(SHARDC_BACKING_FILE, "/nonexistent-dir/x", 10, 0, &fd) == -ENOENT);
}

/* discard() frees a private range and leaves it inaccessible; the parent's
 * copy of memory a child discards is untouched. */
static void test_discard(void)
{
    uint64_t ps = shardc_page_size(), size = 8 * ps;
    unsigned char *a = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    pid_t pid;
    int status;

    CHECK(a != MAP_FAILED);
    memset(a, 0x5A, (size_t)size);
    pid = fork();
    if (pid == 0) {
        if (shardc_seg_discard(a + ps, 6 * ps) != 0 || a[0] != 0x5A || a[7 * ps] != 0x5A)
            _exit(3);
        signal(SIGSEGV, SIG_DFL);
        (void)((volatile unsigned char *)a)[2 * ps]; /* must fault */
        _exit(4);
    }
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV);
    CHECK(a[2 * ps] == 0x5A && a[size - 1] == 0x5A);
    CHECK(shardc_seg_discard(a + 1, ps) == -EINVAL);
    CHECK(shardc_seg_discard(a, ps + 1) == -EINVAL);
    CHECK_RC(shardc_seg_discard(a, 0));
    munmap(a, (size_t)size);
}

int main(void)
{
    RUN(test_memfd_roundtrip);
    RUN(test_shm_roundtrip);
    RUN(test_file_roundtrip);
    RUN(test_persist_and_open);
    RUN(test_seal_and_private);
    RUN(test_protect_faults);
    RUN(test_populate_fill_misc);
    RUN(test_discard);
    return 0;
}
