/*
 * proc.h - process-level helpers for forked workers and their supervisor:
 * after-fork setup (parent-death signal), memory sampling (RSS/PSS/USS from
 * /proc/PID/smaps_rollup on Linux, the physical footprint from
 * proc_pid_rusage/task_info on macOS; -ENOSYS elsewhere) and CPU affinity.  The worker's heap policy
 * is in heap.h.
 */
#ifndef SHARDC_PROC_H
#define SHARDC_PROC_H

#include <stdint.h>

/* --- cdef begin --- */
typedef struct {
    uint64_t rss;   /* resident set size, bytes */
    uint64_t pss;   /* proportional set size (shared pages divided), bytes */
    uint64_t uss;   /* private (clean + dirty) bytes: what this process alone holds */
    uint64_t swap;  /* swapped-out bytes */
    uint64_t anon;  /* anonymous resident bytes (heap, stacks, private copies); no shared-memory
                       segment pages: the part that is really the process's own */
    uint64_t pss_anon; /* anonymous bytes divided among sharers (e.g. pages inherited over fork) */
    int precise;    /* 1 when the kernel counted them (smaps_rollup; macOS's physical
                       footprint), 0 when estimated from rss (statm) */
} shardc_mem_t;

int shardc_proc_after_fork(int expected_parent, int death_signal);
int shardc_proc_mem(int pid, shardc_mem_t *out);
int shardc_proc_mem_fast(int pid, shardc_mem_t *out);
int shardc_proc_set_affinity(int pid, const int *cpus, int ncpus);
/* --- cdef end --- */

#endif /* SHARDC_PROC_H */
