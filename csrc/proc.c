/*
 * proc.c - process helpers for the worker pool.
 *
 * shardc_proc_after_fork: run first thing in a forked worker.  Arms the
 * parent-death signal (Linux; with death_signal 0, or on other systems, the
 * Python side watches the parent instead) and then re-checks the parent:
 * if the master died between fork() and prctl(), the signal would never
 * come, so a mismatch is reported and the worker exits at once.
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
 * macOS has no /proc and no PSS.  Its own per-task accounting is the
 * "physical footprint": dirty private (anonymous) memory, compressed memory
 * included, without clean file or shared-segment pages, which is what the
 * supervisor means by a worker's own memory.  proc_pid_rusage() gives it (and
 * the resident size) for any process of the same user in one system call;
 * for the calling process task_info(TASK_VM_INFO) also gives the compressed
 * bytes (our "swap").  Both samplers return the same numbers there, marked
 * precise: the footprint is the kernel's count, not an estimate.  There is
 * no per-sharer division (pss = pss_anon = the footprint), so pages a worker
 * still shares copy-on-write with the master after fork are not halved as
 * Pss_Anon halves them on Linux.
 *
 * The worker's heap policy (malloc reuse) is in heap.c.
 */
#define _GNU_SOURCE
#include "proc.h"
#include "sys.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__linux__)
#include <sched.h>
#include <sys/prctl.h>
#elif defined(__APPLE__)
#include <libproc.h>
#include <mach/mach.h>
#include <sys/resource.h>
#endif

int shardc_proc_after_fork(int expected_parent, int death_signal)
{
#if defined(__linux__)
    if (death_signal > 0 && prctl(PR_SET_PDEATHSIG, death_signal) == -1)
        return -errno;
#else
    (void)death_signal;
#endif
    if (expected_parent > 0 && getppid() != (pid_t)expected_parent)
        return -ESRCH;
    return 0;
}

#if defined(__linux__)
/* The /proc readers below serve only the Linux samplers. */

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
#endif /* __linux__ */

#if defined(__APPLE__)
/* The platform's own accounting (see the file comment).  The calling process
 * is asked through its task port, which needs no privilege; any other one
 * through proc_pid_rusage, which works for processes of the same user (our
 * workers) and fails with ESRCH once the process is gone. */
static int shardc__mac_mem(int pid, shardc_mem_t *out)
{
    if (out == NULL)
        return -EINVAL;
    memset(out, 0, sizeof(*out));
    if (pid == (int)getpid()) {
        task_vm_info_data_t vi;
        mach_msg_type_number_t cnt = TASK_VM_INFO_COUNT;
        if (task_info(mach_task_self(), TASK_VM_INFO, (task_info_t)&vi, &cnt) != KERN_SUCCESS)
            return -EIO;
        out->rss = (uint64_t)vi.resident_size;
        out->anon = (uint64_t)vi.phys_footprint;
        out->swap = (uint64_t)vi.compressed;
    } else {
        struct rusage_info_v2 ri;
        if (pid <= 0)
            return -ESRCH;
        if (proc_pid_rusage(pid, RUSAGE_INFO_V2, (rusage_info_t *)&ri) != 0)
            return -errno;
        out->rss = ri.ri_resident_size;
        out->anon = ri.ri_phys_footprint;
    }
    out->uss = out->anon;
    out->pss = out->anon;
    out->pss_anon = out->anon;
    out->precise = 1;
    return 0;
}
#endif

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
#elif defined(__APPLE__)
    return shardc__mac_mem(pid, out);
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
#elif defined(__APPLE__)
    return shardc__mac_mem(pid, out); /* one system call: as cheap as statm */
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
