/*
 * heap.c - the worker's heap policy (heap reuse).
 *
 * glibc serves allocations of 128 KiB or more (the threshold adapts, up to
 * 32 MiB) with a fresh mmap and unmaps them on free, so a NumPy kernel whose
 * temporaries are a block of data (var() of a 32 MiB block makes one) faults
 * and zeroes every page of them again in every shard: ~10% of the CPU of a
 * column-statistics pass here.  With M_MMAP_MAX = 0 they come from the heap
 * and a freed block is reused by the next shard.
 *
 * What stays kept is bounded in two places.  M_TRIM_THRESHOLD bounds the free
 * memory at the top of the main heap (glibc trims it on free).  Free holes
 * below the top are bounded by the caller (shardc/worker/heap.py), which
 * trims when its estimate of resident free memory exceeds its limit and at
 * the end of every call; mallinfo2 (glibc 2.33) is what makes that estimate
 * possible, so older glibc gets no reuse at all.  Thread arenas keep their
 * free tops with a high M_TRIM_THRESHOLD (malloc_trim does not release them):
 * the caller watches their size (arena minus the growth of the program break)
 * and turns reuse off for good once they grow.
 *
 * None of this is shared between processes: each worker sets its own policy
 * after fork, and the master never calls it.
 */
#define _GNU_SOURCE
#include "heap.h"

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <unistd.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
#define SHARDC_HEAP_REUSE 1 /* mallopt + mallinfo2: the caller can bound what is kept */
#else
#define SHARDC_HEAP_REUSE 0
#endif

int shardc_heap_reuse(uint64_t keep)
{
#if SHARDC_HEAP_REUSE
    int trim = keep > (uint64_t)INT_MAX ? INT_MAX : (int)keep;

    if (keep > 0) {
        /* mallopt returns 1 on success, 0 on error (it does not set errno). */
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

int shardc_heap_stats(shardc_heap_t *out)
{
#if SHARDC_HEAP_REUSE
    struct mallinfo2 mi;

    if (out == NULL)
        return -EINVAL;
    mi = mallinfo2();
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

int shardc_heap_trim(void)
{
#if SHARDC_HEAP_REUSE
    /* malloc_trim returns 1/0 (released or not), never an error: report
     * success in the csrc/ convention (0 or -errno, never a bare flag). */
    malloc_trim(0);
    return 0;
#else
    return -ENOSYS;
#endif
}
