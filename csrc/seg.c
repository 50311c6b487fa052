/*
 * seg.c - shared-memory segments.
 *
 * Three backings, chosen by the Python layer:
 *   memfd  Linux memfd_create(MFD_CLOEXEC | MFD_ALLOW_SEALING).  Nothing is
 *          named in /dev/shm, so a SIGKILLed master leaks nothing: the memory
 *          goes away with the last fd and mapping.  Supports sealing.
 *   shm    POSIX shm_open.  The macOS path; also works on Linux so the same
 *          code is exercised there.  Anonymous segments are unlinked right
 *          after creation; "persist" keeps the name for buffer_open().
 *   file   An (unlinked unless persist) file in a directory the caller picks:
 *          for machines whose /dev/shm is tiny (containers' 64 MiB default).
 *
 * Mappings: shared (what out buffers use, so children's writes reach the
 * parent) or private (what workers use for borrowed inputs, so a stray write
 * can only ever land in a private copy-on-write page).
 */
#define _GNU_SOURCE
#include "seg.h"
#include "sys.h"

#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__linux__)
#include <linux/memfd.h>
#endif

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

int shardc_seg_backing_supported(int backing)
{
    switch (backing) {
#if defined(SHARDC__HAVE_MEMFD) && defined(MFD_CLOEXEC)
    case SHARDC_BACKING_MEMFD:
        return 1;
#endif
    case SHARDC_BACKING_SHM:
    case SHARDC_BACKING_FILE:
        return 1;
    default:
        return 0;
    }
}

static int shardc__open_backing(int backing, const char *name, int flags,
                                int mode)
{
    if (backing == SHARDC_BACKING_SHM)
        return (int)SHARDC__RETRY(shm_open(name, flags, (mode_t)mode));
    if (backing == SHARDC_BACKING_FILE)
        return (int)SHARDC__RETRY(open(name, flags | O_CLOEXEC, (mode_t)mode));
    return -EINVAL;
}

int shardc_seg_create(int backing, const char *name, uint64_t size, int persist,
                      int *fd_out)
{
    int fd;

    if (fd_out == NULL || name == NULL)
        return -EINVAL;
    if ((uint64_t)(off_t)size != size)
        return -EFBIG;

    if (backing == SHARDC_BACKING_MEMFD) {
#if defined(SHARDC__HAVE_MEMFD) && defined(MFD_CLOEXEC)
        if (persist)
            return -EINVAL; /* a memfd has no name another process can open */
        fd = shardc__memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
#else
        return -ENOSYS;
#endif
    } else {
        /* O_EXCL: never attach to (and later truncate or unlink) somebody
         * else's segment that happens to have the same name. */
        fd = shardc__open_backing(backing, name, O_RDWR | O_CREAT | O_EXCL,
                                  0600);
    }
    if (fd < 0)
        return fd;

    if (backing != SHARDC_BACKING_MEMFD && !persist) {
        /* Unlink at once: from here on only fds and mappings keep the memory
         * alive, so no crash can leave a name behind. */
        int rc = shardc_seg_unlink(backing, name);
        if (rc < 0) {
            close(fd);
            return rc;
        }
    }

    if (size > 0) {
        long rc = SHARDC__RETRY(ftruncate(fd, (off_t)size));
        if (rc < 0) {
            if (backing != SHARDC_BACKING_MEMFD && persist)
                shardc_seg_unlink(backing, name);
            close(fd);
            return (int)rc;
        }
    }
    *fd_out = fd;
    return 0;
}

int shardc_seg_open(int backing, const char *name, int writable, int *fd_out,
                    uint64_t *size_out)
{
    int fd, rc;
    uint64_t size = 0;

    if (fd_out == NULL || name == NULL)
        return -EINVAL;
    fd = shardc__open_backing(backing, name, writable ? O_RDWR : O_RDONLY, 0);
    if (fd < 0)
        return fd;
    rc = shardc_seg_size(fd, &size);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    *fd_out = fd;
    if (size_out != NULL)
        *size_out = size;
    return 0;
}

int shardc_seg_unlink(int backing, const char *name)
{
    if (name == NULL)
        return -EINVAL;
    if (backing == SHARDC_BACKING_SHM)
        return (int)SHARDC__RETRY(shm_unlink(name));
    if (backing == SHARDC_BACKING_FILE)
        return (int)SHARDC__RETRY(unlink(name));
    return -EINVAL;
}

int shardc_seg_seal(int fd)
{
#if defined(__linux__) && defined(F_ADD_SEALS)
    long rc = SHARDC__RETRY(
        fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW));
    /* EINVAL: this fd does not support seals (shm or file backing). */
    return rc < 0 ? (rc == -EINVAL ? -ENOTSUP : (int)rc) : 0;
#else
    (void)fd;
    return -ENOTSUP;
#endif
}

int shardc_seg_is_sealed(int fd)
{
#if defined(__linux__) && defined(F_GET_SEALS)
    long rc = SHARDC__RETRY(fcntl(fd, F_GET_SEALS));
    if (rc < 0)
        return rc == -EINVAL ? 0 : (int)rc;
    return (rc & F_SEAL_WRITE) ? 1 : 0;
#else
    (void)fd;
    return 0;
#endif
}

int shardc_seg_size(int fd, uint64_t *size_out)
{
    struct stat st;
    long rc = SHARDC__RETRY(fstat(fd, &st));
    if (rc < 0)
        return (int)rc;
    if (size_out != NULL)
        *size_out = (uint64_t)st.st_size;
    return 0;
}

int shardc_seg_close_fd(int fd)
{
    /* close() must not be retried on EINTR (the fd is gone either way on
     * Linux); report other errors. */
    if (close(fd) == -1 && errno != EINTR)
        return -errno;
    return 0;
}

int shardc_seg_map(int fd, uint64_t offset, uint64_t size, int flags,
                   void **addr_out)
{
    int prot = PROT_READ;
    int mflags;
    void *addr;

    if (addr_out == NULL)
        return -EINVAL;
    if (size == 0) {
        /* mmap rejects zero-length maps; give callers a valid, unique,
         * inaccessible address instead so empty arrays still work. */
        addr = mmap(NULL, shardc_page_size(), PROT_NONE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (addr == MAP_FAILED)
            return -errno;
        *addr_out = addr;
        return 0;
    }
    if (offset % shardc_page_size() != 0)
        return -EINVAL;
    if (flags & SHARDC_MAP_WRITE)
        prot |= PROT_WRITE;
    mflags = (flags & SHARDC_MAP_PRIVATE) ? MAP_PRIVATE : MAP_SHARED;
#ifdef MAP_POPULATE
    if (flags & SHARDC_MAP_POPULATE)
        mflags |= MAP_POPULATE;
#endif
    addr = mmap(NULL, (size_t)size, prot, mflags, fd, (off_t)offset);
    if (addr == MAP_FAILED)
        return -errno;
    *addr_out = addr;
    return 0;
}

int shardc_seg_unmap(void *addr, uint64_t size)
{
    if (addr == NULL)
        return -EINVAL;
    if (size == 0)
        size = shardc_page_size(); /* the placeholder page of an empty map */
    if (munmap(addr, (size_t)size) == -1)
        return -errno;
    return 0;
}

int shardc_seg_protect(void *addr, uint64_t size, int writable)
{
    if (size == 0)
        return 0;
    if (mprotect(addr, (size_t)size, PROT_READ | (writable ? PROT_WRITE : 0)) ==
        -1)
        return -errno;
    return 0;
}

/* Replace the range with a fresh PROT_NONE anonymous mapping: the kernel frees
 * whatever pages were there (private copies, pages inherited over fork), and
 * unlike MADV_DONTNEED on anonymous memory (which would make stale pointers
 * read zeros) a stray access later is a fault, not wrong data. */
int shardc_seg_discard(void *addr, uint64_t size)
{
    void *got;

    if (size == 0)
        return 0;
    if (addr == NULL || (uintptr_t)addr % shardc_page_size() != 0 ||
        size % shardc_page_size() != 0)
        return -EINVAL;
    got = mmap(addr, (size_t)size, PROT_NONE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (got == MAP_FAILED)
        return -errno;
    return 0;
}

int shardc_seg_advise(void *addr, uint64_t size, int advice)
{
    int adv;

    if (size == 0)
        return 0;
    switch (advice) {
    case SHARDC_ADV_NORMAL:     adv = MADV_NORMAL; break;
    case SHARDC_ADV_SEQUENTIAL: adv = MADV_SEQUENTIAL; break;
    case SHARDC_ADV_RANDOM:     adv = MADV_RANDOM; break;
    case SHARDC_ADV_WILLNEED:   adv = MADV_WILLNEED; break;
    case SHARDC_ADV_DONTNEED:   adv = MADV_DONTNEED; break;
#ifdef MADV_HUGEPAGE
    case SHARDC_ADV_HUGEPAGE:   adv = MADV_HUGEPAGE; break;
#endif
    default:
        return -EINVAL;
    }
    if (madvise(addr, (size_t)size, adv) == -1)
        return -errno;
    return 0;
}

int shardc_seg_populate(void *addr, uint64_t size, int write)
{
    volatile unsigned char *p = (volatile unsigned char *)addr;
    uint64_t page = shardc_page_size();
    uint64_t off;

    if (size == 0)
        return 0;
#if defined(__linux__)
    /* Linux 5.14+: fault every page in one call, without touching data. */
    if (madvise(addr, (size_t)size,
                write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ) == 0)
        return 0;
    if (errno != EINVAL)
        return -errno;
#endif
    /* Older kernels and macOS: touch one byte per page.  A write fault
     * stores the byte it read, so contents never change. */
    for (off = 0; off < size; off += page) {
        unsigned char v = p[off];
        if (write)
            p[off] = v;
    }
    return 0;
}

int shardc_seg_fill(void *addr, uint64_t size, const void *pattern,
                    uint64_t patlen)
{
    unsigned char *dst = (unsigned char *)addr;
    uint64_t done;

    if (patlen == 0 || (size % patlen) != 0)
        return -EINVAL;
    if (size == 0)
        return 0;
    memcpy(dst, pattern, (size_t)patlen);
    /* Doubling copies: log2(size/patlen) memcpy calls, each from the part
     * already filled, so any element size fills at memcpy speed. */
    for (done = patlen; done < size;) {
        uint64_t n = done <= size - done ? done : size - done;
        memcpy(dst + done, dst, (size_t)n);
        done += n;
    }
    return 0;
}

int shardc_mem_equal(const void *a, const void *b, uint64_t n)
{
    return memcmp(a, b, (size_t)n) == 0 ? 1 : 0;
}

uint64_t shardc_page_size(void)
{
    static uint64_t cached;
    if (cached == 0)
        cached = (uint64_t)sysconf(_SC_PAGESIZE);
    return cached;
}
