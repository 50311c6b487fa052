/*
 * heap.h - the worker's heap policy: whether freed memory is kept by the
 * allocator for the next shard (heap reuse), what the allocator holds, and
 * giving free memory back.  glibc >= 2.33 only; -ENOSYS elsewhere.
 */
#ifndef SHARDC_HEAP_H
#define SHARDC_HEAP_H

#include <stdint.h>

/* --- cdef begin --- */
/* What the allocator holds (glibc >= 2.33, from mallinfo2 over all arenas). */
typedef struct {
    int64_t free;  /* free bytes in the arenas (resident or not: trimmed holes still count) */
    int64_t used;  /* bytes in use: allocations from the arenas and mmapped ones */
    int64_t arena; /* bytes the arenas took from the system (main heap + thread arenas) */
    uint64_t brk;  /* the program break: the main heap's end */
} shardc_heap_t;

/* Heap reuse in this process.  keep > 0: serve every allocation from the heap
 * instead of fresh mmaps, and keep up to `keep` freed bytes at its top, so a
 * kernel's big temporaries are faulted and zeroed once rather than in every
 * shard; keep == 0: glibc's defaults again (fixed thresholds) and the free
 * memory trimmed.  0 on success, -EINVAL if the allocator refuses mallopt
 * (e.g. ASan's), -ENOSYS without glibc >= 2.33. */
int shardc_heap_reuse(uint64_t keep);
/* The allocator's totals into *out; -EINVAL for NULL, -ENOSYS as above. */
int shardc_heap_stats(shardc_heap_t *out);
/* Give free heap memory back to the kernel (malloc_trim(0)); 0, or -ENOSYS
 * where unsupported.
 * Not the tops of thread arenas: glibc trims those only when freeing. */
int shardc_heap_trim(void);
/* --- cdef end --- */

#endif /* SHARDC_HEAP_H */
