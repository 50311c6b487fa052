/*
 * wtrack.c - kernel-kept write tracking of a caller's pages (see wtrack.h
 * for what it proves and what it cannot see).
 *
 * The uapi constants are defined here when the build machine's headers are
 * older than the running kernel may be (they are part of the kernel ABI and
 * never change); an old kernel answers EINVAL/ENOTTY at open and the caller
 * falls back to comparing bytes.
 */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* pipe2 */
#endif
#include "wtrack.h"

#include <errno.h>
#include <stddef.h>

#if defined(__linux__)
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "sys.h"
#endif

#if defined(__linux__) && defined(SHARDC__HAVE_USERFAULTFD) && defined(UFFDIO_WRITEPROTECT)

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

/* PAGEMAP_SCAN (linux/fs.h, 6.7): the argument is twelve u64s, the output
 * an array of (start, end, categories) triples. */
struct shardc__pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
struct shardc__page_region {
    uint64_t start, end, categories;
};
#define SHARDC__PAGEMAP_SCAN _IOWR('f', 16, struct shardc__pm_scan_arg)
#define SHARDC__PM_SCAN_WP_MATCHING (1 << 0)
#define SHARDC__PM_SCAN_CHECK_WPASYNC (1 << 1)
#define SHARDC__PAGE_IS_WRITTEN (1 << 1)
#define SHARDC__PAGE_IS_FILE (1 << 2)
#define SHARDC__PAGE_IS_PRESENT (1 << 3)
#define SHARDC__PAGE_IS_PFNZERO (1 << 5)

#define TAKE_CHUNK 64 /* page regions asked for per ioctl */

int shardc_wt_arm(int uffd, uint64_t addr, uint64_t len)
{
    struct uffdio_register reg = {.range = {.start = addr, .len = len}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    /* Registered first, protected second: a write between the two is seen
     * (the page was protected after it, and is compared by the caller's
     * first take only if written again - so the caller arms BEFORE it
     * copies the bytes it will compare against). */
    struct uffdio_writeprotect wp = {.range = {.start = addr, .len = len}, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0) {
        int e = errno;
        struct uffdio_range r = {.start = addr, .len = len};
        (void)ioctl(uffd, UFFDIO_UNREGISTER, &r);
        return -e;
    }
    return 0;
}

int shardc_wt_disarm(int uffd, uint64_t addr, uint64_t len)
{
    struct uffdio_range r = {.start = addr, .len = len};
    return ioctl(uffd, UFFDIO_UNREGISTER, &r) < 0 ? -errno : 0;
}

long shardc_wt_take(int pagemap, uint64_t addr, uint64_t len, uint64_t *runs, long max)
{
    struct shardc__page_region vec[TAKE_CHUNK];
    uint64_t at = addr, end = addr + len;
    long n = 0;
    while (at < end) {
        /* Unsure = written, or not present (inverted), or the zero page, or
         * not anonymous; the same walk write-protects what it reports. */
        struct shardc__pm_scan_arg a = {
            .size = sizeof a,
            .flags = SHARDC__PM_SCAN_WP_MATCHING | SHARDC__PM_SCAN_CHECK_WPASYNC,
            .start = at,
            .end = end,
            .vec = (uint64_t)(uintptr_t)vec,
            .vec_len = TAKE_CHUNK,
            .category_inverted = SHARDC__PAGE_IS_PRESENT,
            .category_anyof_mask = SHARDC__PAGE_IS_WRITTEN | SHARDC__PAGE_IS_PRESENT |
                                   SHARDC__PAGE_IS_PFNZERO | SHARDC__PAGE_IS_FILE,
            .return_mask = SHARDC__PAGE_IS_WRITTEN | SHARDC__PAGE_IS_PRESENT |
                           SHARDC__PAGE_IS_PFNZERO | SHARDC__PAGE_IS_FILE,
        };
        long got = ioctl(pagemap, SHARDC__PAGEMAP_SCAN, &a);
        if (got < 0)
            return -errno;
        for (long i = 0; i < got; i++) {
            if (n > 0 && runs[2 * n - 1] == vec[i].start) { /* adjacent: other categories, one run */
                runs[2 * n - 1] = vec[i].end;
                continue;
            }
            if (n == max)
                return -E2BIG;
            runs[2 * n] = vec[i].start;
            runs[2 * n + 1] = vec[i].end;
            n++;
        }
        if (a.walk_end <= at) /* no progress: never loop forever on a kernel quirk */
            return -EIO;
        at = a.walk_end;
    }
    return n;
}

/* A scratch page: clean after arming, written by a store and by read()
 * from a pipe (a kernel write), each reported once. */
static int self_check(int uffd, int pagemap)
{
    long psz = sysconf(_SC_PAGESIZE);
    uint64_t runs[4];
    int rc = -EOPNOTSUPP, p[2] = {-1, -1};
    char *pg = mmap(NULL, (size_t)psz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (pg == MAP_FAILED)
        return -errno;
    uint64_t a = (uint64_t)(uintptr_t)pg, n = (uint64_t)psz;
    pg[0] = 1; /* present */
    int e = shardc_wt_arm(uffd, a, n);
    if (e < 0) {
        rc = (e == -EINVAL) ? -EOPNOTSUPP : e;
        goto out;
    }
    if (shardc_wt_take(pagemap, a, n, runs, 2) != 0)
        goto out;
    ((volatile char *)pg)[7] = 2;
    if (shardc_wt_take(pagemap, a, n, runs, 2) != 1 || runs[0] != a || shardc_wt_take(pagemap, a, n, runs, 2) != 0)
        goto out;
    if (pipe2(p, O_CLOEXEC) < 0 || write(p[1], "x", 1) != 1 || read(p[0], pg + 9, 1) != 1)
        goto out;
    if (shardc_wt_take(pagemap, a, n, runs, 2) != 1 || shardc_wt_take(pagemap, a, n, runs, 2) != 0)
        goto out;
    rc = 0;
out:
    if (p[0] >= 0)
        close(p[0]);
    if (p[1] >= 0)
        close(p[1]);
    munmap(pg, (size_t)psz); /* its registration goes with it */
    return rc;
}

int shardc_wt_open(int *uffd, int *pagemap)
{
    int fd = shardc__userfaultfd(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd == -EINVAL) /* a kernel before 5.11 has no user-mode-only flag */
        fd = shardc__userfaultfd(O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return fd;
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED};
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int e = errno;
        close(fd);
        return e == EINVAL ? -EOPNOTSUPP : -e;
    }
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    int rc = self_check(fd, pm);
    if (rc < 0) {
        close(fd);
        close(pm);
        return (rc == -ENOTTY || rc == -EINVAL) ? -EOPNOTSUPP : rc;
    }
    *uffd = fd;
    *pagemap = pm;
    return 0;
}

#else /* no userfaultfd: the caller compares bytes */

int shardc_wt_open(int *uffd, int *pagemap)
{
    (void)uffd;
    (void)pagemap;
    return -ENOSYS;
}

int shardc_wt_arm(int uffd, uint64_t addr, uint64_t len)
{
    (void)uffd;
    (void)addr;
    (void)len;
    return -ENOSYS;
}

int shardc_wt_disarm(int uffd, uint64_t addr, uint64_t len)
{
    (void)uffd;
    (void)addr;
    (void)len;
    return -ENOSYS;
}

long shardc_wt_take(int pagemap, uint64_t addr, uint64_t len, uint64_t *runs, long max)
{
    (void)pagemap;
    (void)addr;
    (void)len;
    (void)runs;
    (void)max;
    return -ENOSYS;
}

#endif
