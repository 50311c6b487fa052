/*
 * proc.h - process-level helpers for forked workers and their supervisor:
 * after-fork setup (parent-death signal), memory sampling (RSS/PSS/USS from
 * /proc/PID/smaps_rollup), CPU affinity and the worker's heap policy.
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
    int precise;    /* 1 when pss/uss came from smaps_rollup, 0 when estimated from rss */
} shardc_mem_t;

int shardc_proc_after_fork(int expected_parent, int death_signal);
int shardc_proc_mem(int pid, shardc_mem_t *out);
int shardc_proc_mem_fast(int pid, shardc_mem_t *out);
int shardc_proc_set_affinity(int pid, const int *cpus, int ncpus);
/* What the allocator holds (glibc >= 2.33, from mallinfo2 over all arenas). */
typedef struct {
    int64_t free;  /* free bytes in the arenas (resident or not: trimmed holes still count) */
    int64_t used;  /* bytes in use: allocations from the arenas and mmapped ones */
    int64_t arena; /* bytes the arenas took from the system (main heap + thread arenas) */
    uint64_t brk;  /* the program break: the main heap's end */
} shardc_heap_t;

/* Heap reuse in this process (glibc >= 2.33; -ENOSYS elsewhere).  keep > 0:
 * serve every allocation from the heap instead of fresh mmaps, and keep up
 * to `keep` freed bytes at its top, so a kernel's big temporaries are faulted
 * and zeroed once rather than in every shard; keep == 0: glibc's defaults
 * again (fixed thresholds) and the free memory trimmed. */
int shardc_proc_heap_reuse(uint64_t keep);
int shardc_proc_heap_stats(shardc_heap_t *out);
/* Give free heap memory back to the kernel (malloc_trim(0)); 1 if any was.
 * Not the tops of thread arenas: glibc trims those only when freeing. */
int shardc_proc_heap_trim(void);
/* --- cdef end --- */

#endif /* SHARDC_PROC_H */
