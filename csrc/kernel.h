/*
 * kernel.h - the native kernel ABI: how shardc calls a compiled shard
 * function, and the runner that calls it for a run of shards without the
 * Python interpreter (csrc/kernel.c).
 *
 * A native kernel is a plain C function
 *
 *     int fn(const shardc_kernel_args_t *a, int64_t start, int64_t stop);
 *
 * that runs shards start .. stop-1 of the call (shardc calls it with one
 * shard at a time, stop == start + 1, so that a crash is charged to exactly
 * one shard; a kernel must still accept any range).  It returns 0 on
 * success; any other value fails the shard `start` (the value is reported
 * in the shard's KernelError) and the runner goes on with the next shard.
 * It must be thread-compatible (no global state that two calls of one call
 * share) and must not call into Python: it runs without the GIL.
 *
 * What it gets: a->arrays[0 .. narrays-1], the call's borrowed inputs and
 * out= buffers in the order of the kernel's `signature` (or borrow= then
 * out=, each in the caller's order): data pointer, ndim, shape, strides in
 * bytes (any sign, any layout: views are passed as they are, never
 * copied), a dtype code and whether it may be written (borrowed inputs are
 * read-only: a store into one is a copy-on-write event, see guard.h).  The
 * shard geometry says which items shard k covers: for "contiguous" shards
 * items [k*block, min((k+1)*block, n)); for "strided" k, k+nshards, ...;
 * for "tiles" (kernels.tiles2d) rows and columns of the tile grid.
 *
 * The struct is versioned (abi): a kernel may check a->abi ==
 * SHARDC_KERNEL_ABI.  The layout only grows at the end.
 */
#ifndef SHARDC_KERNEL_H
#define SHARDC_KERNEL_H

#include <stdint.h>

/* The worker's status row writer (status.h), opaque here: this header stands
 * alone for kernels compiled outside shardc (shardc.native.kernel_header()). */
#ifndef SHARDC_STATUS_H
typedef struct shardc_status_writer shardc_status_writer_t;
#endif

/* --- cdef begin --- */
#define SHARDC_KERNEL_ABI 1
#define SHARDC_KERNEL_MAX_DIMS 8

/* dtype codes (shardc_array_t.dtype); kind and itemsize are filled too. */
#define SHARDC_DT_OTHER 0
#define SHARDC_DT_F64 1
#define SHARDC_DT_F32 2
#define SHARDC_DT_I64 3
#define SHARDC_DT_I32 4
#define SHARDC_DT_I16 5
#define SHARDC_DT_I8 6
#define SHARDC_DT_U64 7
#define SHARDC_DT_U32 8
#define SHARDC_DT_U16 9
#define SHARDC_DT_U8 10
#define SHARDC_DT_BOOL 11

/* Shard geometry (shardc_kernel_args_t.strategy). */
#define SHARDC_SHARDS_CONTIGUOUS 0
#define SHARDC_SHARDS_STRIDED 1
#define SHARDC_SHARDS_TILES 2

/* shardc_kernel_run() flags and result codes. */
#define SHARDC_KRUN_GUARDED 1    /* page guards are on: stop after a shard that wrote a borrowed input */
#define SHARDC_KRUN_DONE 0       /* every shard ran */
#define SHARDC_KRUN_FAILED 1     /* the kernel returned non-zero for result.sid */
#define SHARDC_KRUN_COW 2        /* result.sid wrote a borrowed input (a guard fault) */

typedef struct {
    void *data;       /* element [0, ..., 0] */
    int32_t ndim;
    int32_t dtype;    /* SHARDC_DT_* */
    int32_t itemsize; /* bytes per element */
    int32_t writable; /* 0 for borrowed inputs */
    char kind;        /* NumPy's dtype.kind: 'f', 'i', 'u', 'b', 'c', ... */
    char pad[7];
    int64_t shape[SHARDC_KERNEL_MAX_DIMS];
    int64_t strides[SHARDC_KERNEL_MAX_DIMS]; /* bytes */
} shardc_array_t;

typedef struct {
    uint32_t abi;            /* SHARDC_KERNEL_ABI */
    uint32_t narrays;
    shardc_array_t *arrays;
    int64_t nshards;         /* shards of the call */
    int32_t strategy;        /* SHARDC_SHARDS_* */
    int32_t pad;
    int64_t n;               /* items covered (contiguous / strided) */
    int64_t block;           /* items per shard (contiguous) */
    int64_t tiles[4];        /* tiles: n_x, n_y, block_x, block_y */
    int64_t iparams[8];      /* kernel-specific integer parameters (built-ins) */
    void *user;              /* reserved (NULL) */
} shardc_kernel_args_t;

typedef int (*shardc_kernel_fn)(const shardc_kernel_args_t *a, int64_t start,
                                int64_t stop);

/* What shardc_kernel_run() did. */
typedef struct {
    int64_t ran;     /* shards run to completion and marked done */
    int64_t sid;     /* the shard the run stopped at (FAILED / COW), else -1 */
    int64_t code;    /* FAILED: the kernel's return value */
    int64_t t0, t1;  /* monotonic ns: start of the first shard, end of the last */
} shardc_krun_t;

/* Run shards start .. stop-1 through fn, one call each, recording each in
 * the worker's status row w: the row shows the block b0 .. b0+bn-1 (the
 * ring item the shards belong to; start .. stop-1 lies inside it), the
 * running shard, each shard's done mark (1) as it finishes, and a start
 * time stamped at least every ~2 us of work (shards shorter than that
 * share a stamp: see kernel.c).  Stops at the first shard that fails or
 * (flags & SHARDC_KRUN_GUARDED) wrote a borrowed input; that shard is not
 * marked.  The row is left IDLE with the shards run added to its done
 * count.  Returns a SHARDC_KRUN_* code (details in *res), or -EINVAL. */
int shardc_kernel_run(shardc_kernel_fn fn, const shardc_kernel_args_t *a,
                      shardc_status_writer_t *w, int64_t b0, int64_t bn,
                      int64_t start, int64_t stop, int flags,
                      shardc_krun_t *res);

/* Run shard range start .. stop-1 once, outside any status row (the
 * function behind a native kernel called from Python). */
int shardc_kernel_call(shardc_kernel_fn fn, const shardc_kernel_args_t *a,
                       int64_t start, int64_t stop);

/* Where a function pointer comes from, for opening it again in a worker
 * that was forked before it was loaded (dladdr): the shared object's path,
 * the symbol's name when the pointer is exactly an exported symbol (else
 * ""), and its offset from the object's load address (a static function,
 * such as the wrapper cffi's ffi.addressof() returns).  -ENOENT if no
 * loaded object holds it. */
int shardc_kernel_locate(void *fn, char *path, uint64_t pathlen, char *sym,
                         uint64_t symlen, uint64_t *offset);
/* The function in the shared object at `path` (loaded now if it is not):
 * symbol `sym`, or when sym is "" the load address plus `offset`.  NULL,
 * with a message in err, if it cannot be found. */
void *shardc_kernel_resolve(const char *path, const char *sym, uint64_t offset,
                            char *err, uint64_t errlen);
/* --- cdef end --- */

#endif /* SHARDC_KERNEL_H */
