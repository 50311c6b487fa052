/*
 * proc.c - process helpers for the worker pool.
 *
 * shardc_proc_after_fork: run first thing in a forked worker.  Arms the
 * parent-death signal (Linux) and then re-checks the parent: if the master
 * died between fork() and prctl(), the signal would never come, so a
 * mismatch is reported and the worker exits at once.
 *
 * shardc_proc_mem: samples another process's memory.  RSS counts every
 * resident page, including pages of borrowed inputs shared with the master
 * and every other worker, so supervision that looked at RSS would "see"
 * growth whenever a worker merely reads its input.  /proc/PID/smaps_rollup
 * gives Pss (shared pages divided among sharers) and Private_* (USS), which
 * grow only with what the worker itself allocates.  This is read in C, with
 * no allocation, because the supervisor samples every worker often.
 *
 * The supervisor's measure of a worker's own memory is its anonymous memory
 * (Pss_Anon): USS would count clean pages of a borrowed segment that only
 * this worker happens to map (Private_Clean) as if they were its own.
 *
 * smaps_rollup walks every mapping of the target under its mmap lock: about
 * 0.3 ms for a Python worker on these VMs.  shardc_proc_mem_fast reads
 * /proc/PID/statm instead (a few microseconds): RSS, and RSS minus resident
 * shared pages as an (over-)estimate of private memory.  The supervisor uses
 * the fast one on every shard boundary and the precise one when the fast
 * numbers moved or enough time passed.
 *
 * shardc_proc_heap_*: the worker's heap policy.  glibc serves allocations of
 * 128 KiB or more (the threshold adapts, up to 32 MiB) with a fresh mmap and
 * unmaps them on free, so a NumPy kernel whose temporaries are a block of
 * data (var() of a 32 MiB block makes one) faults and zeroes every page of
 * them again in every shard: ~10% of the CPU of a column-statistics pass
 * here.  With M_MMAP_MAX = 0 they come from the heap and a freed block is
 * reused by the next shard.  M_TRIM_THRESHOLD bounds what stays at the top of
 * the heap; free holes below the top are bounded by the caller, which trims
 * when its estimate of resident free memory exceeds its limit and at the end
 * of every call.  mallinfo2 (glibc 2.33) is what makes that bound possible,
 * so older glibc gets no reuse at all.  Thread arenas keep their free tops
 * with a high M_TRIM_THRESHOLD (malloc_trim does not release them): the
 * caller watches their size and turns reuse off for good once they grow.
 */
#define _GNU_SOURCE
#include "proc.h"
#include "sys.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#if defined(__linux__)
#include <sched.h>
#include <sys/prctl.h>
#endif

int shardc_proc_after_fork(int expected_parent, int death_signal)
{
#if defined(__linux__)
    if (prctl(PR_SET_PDEATHSIG, death_signal) == -1)
        return -errno;
#else
    (void)death_signal;
#endif
    if (expected_parent > 0 && getppid() != (pid_t)expected_parent)
        return -ESRCH;
    return 0;
}

/* Parse "Key:   1234 kB" lines; returns bytes or -1 if the key is absent. */
static int64_t shardc__field_kb(const char *buf, const char *key)
{
    size_t klen = strlen(key);
    const char *p = buf;

    while ((p = strstr(p, key)) != NULL) {
        if ((p == buf || p[-1] == '\n') && p[klen] == ':') {
            return (int64_t)strtoull(p + klen + 1, NULL, 10) * 1024;
        }
        p += klen;
    }
    return -1;
}

static int shardc__read_file(const char *path, char *buf, size_t cap)
{
    int fd = (int)SHARDC__RETRY(open(path, O_RDONLY | O_CLOEXEC));
    size_t used = 0;

    if (fd < 0)
        return fd;
    while (used + 1 < cap) {
        long n = SHARDC__RETRY(read(fd, buf + used, cap - 1 - used));
        if (n < 0) {
            close(fd);
            return (int)n;
        }
        if (n == 0)
            break;
        used += (size_t)n;
    }
    buf[used] = '\0';
    close(fd);
    return (int)used;
}

int shardc_proc_mem(int pid, shardc_mem_t *out)
{
#if defined(__linux__)
    char path[64];
    char buf[4096];
    int64_t rss, pss, pc, pd, swap, anon, pss_anon;
    int rc;

    if (out == NULL)
        return -EINVAL;
    memset(out, 0, sizeof(*out));
    snprintf(path, sizeof(path), "/proc/%d/smaps_rollup", pid);
    rc = shardc__read_file(path, buf, sizeof(buf));
    if (rc >= 0) {
        rss = shardc__field_kb(buf, "Rss");
        pss = shardc__field_kb(buf, "Pss");
        pc = shardc__field_kb(buf, "Private_Clean");
        pd = shardc__field_kb(buf, "Private_Dirty");
        swap = shardc__field_kb(buf, "Swap");
        anon = shardc__field_kb(buf, "Anonymous");
        pss_anon = shardc__field_kb(buf, "Pss_Anon"); /* Linux 5.13+ */
        if (rss >= 0 && pss >= 0 && pc >= 0 && pd >= 0) {
            out->rss = (uint64_t)rss;
            out->pss = (uint64_t)pss;
            out->uss = (uint64_t)(pc + pd);
            out->swap = swap > 0 ? (uint64_t)swap : 0;
            out->anon = anon > 0 ? (uint64_t)anon : 0;
            out->pss_anon = pss_anon >= 0 ? (uint64_t)pss_anon : out->anon;
            out->precise = 1;
            return 0;
        }
    } else if (rc == -ENOENT || rc == -ESRCH) {
        /* No such process; a kernel without smaps_rollup has /proc/PID. */
        snprintf(path, sizeof(path), "/proc/%d", pid);
        if (access(path, F_OK) != 0)
            return -ESRCH;
    }
    /* Fallback: statm. */
    return shardc_proc_mem_fast(pid, out);
#else
    (void)pid;
    (void)out;
    return -ENOSYS;
#endif
}

int shardc_proc_mem_fast(int pid, shardc_mem_t *out)
{
#if defined(__linux__)
    char path[64];
    char buf[256];
    unsigned long long size_p = 0, res_p = 0, shared_p = 0;
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    int rc;

    if (out == NULL)
        return -EINVAL;
    memset(out, 0, sizeof(*out));
    snprintf(path, sizeof(path), "/proc/%d/statm", pid);
    rc = shardc__read_file(path, buf, sizeof(buf));
    if (rc < 0)
        return rc == -ENOENT ? -ESRCH : rc;
    if (sscanf(buf, "%llu %llu %llu", &size_p, &res_p, &shared_p) != 3)
        return -EIO;
    /* statm's "shared" is RssFile + RssShmem, so the rest is RssAnon. */
    out->rss = res_p * page;
    out->anon = (res_p > shared_p ? res_p - shared_p : 0) * page;
    out->uss = out->anon;
    out->pss = out->anon;
    out->pss_anon = out->anon;
    out->precise = 0;
    return 0;
#else
    (void)pid;
    (void)out;
    return -ENOSYS;
#endif
}

int shardc_proc_set_affinity(int pid, const int *cpus, int ncpus)
{
#if defined(__linux__)
    cpu_set_t set;
    int i;

    CPU_ZERO(&set);
    for (i = 0; i < ncpus; i++) {
        if (cpus[i] < 0 || cpus[i] >= CPU_SETSIZE)
            return -EINVAL;
        CPU_SET(cpus[i], &set);
    }
    if (sched_setaffinity((pid_t)pid, sizeof(set), &set) == -1)
        return -errno;
    return 0;
#else
    (void)pid;
    (void)cpus;
    (void)ncpus;
    return -ENOTSUP;
#endif
}

#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
#define SHARDC_HEAP_REUSE 1 /* mallopt + mallinfo2: the caller can bound what is kept */
#else
#define SHARDC_HEAP_REUSE 0
#endif

int shardc_proc_heap_reuse(uint64_t keep)
{
#if SHARDC_HEAP_REUSE
    int trim = keep > (uint64_t)INT_MAX ? INT_MAX : (int)keep;

    if (keep > 0) {
        if (!mallopt(M_TRIM_THRESHOLD, trim) || !mallopt(M_MMAP_MAX, 0))
            return -EINVAL;
        return 0;
    }
    /* glibc's documented defaults (the adaptive mmap threshold stays off once
     * a threshold has been set: a fixed 128 KiB). */
    if (!mallopt(M_MMAP_MAX, 65536) || !mallopt(M_MMAP_THRESHOLD, 128 * 1024) ||
        !mallopt(M_TRIM_THRESHOLD, 128 * 1024))
        return -EINVAL;
    malloc_trim(0);
    return 0;
#else
    (void)keep;
    return -ENOSYS;
#endif
}

int shardc_proc_heap_stats(shardc_heap_t *out)
{
#if SHARDC_HEAP_REUSE
    struct mallinfo2 mi = mallinfo2();

    if (out == NULL)
        return -EINVAL;
    out->free = (int64_t)mi.fordblks;
    out->used = (int64_t)(mi.uordblks + mi.hblkhd); /* hblkhd: chunks glibc mmapped */
    out->arena = (int64_t)mi.arena;
    out->brk = (uint64_t)(uintptr_t)sbrk(0);
    return 0;
#else
    (void)out;
    return -ENOSYS;
#endif
}

int shardc_proc_heap_trim(void)
{
#if SHARDC_HEAP_REUSE
    return malloc_trim(0);
#else
    return -ENOSYS;
#endif
}
