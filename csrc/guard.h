/*
 * guard.h - page guards: the copy-on-write policy for borrowed inputs.
 *
 * A worker maps each borrowed input MAP_PRIVATE + PROT_READ and registers it
 * here as a region.  A SIGSEGV/SIGBUS handler turns the first store into each
 * page into a recorded event: the page is made writable (so the store lands in
 * a private copy-on-write page, never in shared memory) and, for deny regions,
 * a notifier tells Python to raise.  After the shard, restore() drops exactly
 * the private pages and write-protects them again.  See guard.c for the
 * mechanism, its limits and why it is built this way.
 *
 * A snapshot region (mode | SHARDC_GUARD_SNAPSHOT) is memory inherited over
 * fork() (anonymous, so there is no file to refault from): the handler saves
 * each page before making it writable, and restore() copies it back.
 *
 * Every function returns 0 (or a count) on success and -errno on failure.
 */
#ifndef SHARDC_GUARD_H
#define SHARDC_GUARD_H

#include <stdint.h>

/* --- cdef begin --- */
#define SHARDC_GUARD_DENY 0
#define SHARDC_GUARD_AUDIT 1
#define SHARDC_GUARD_ALLOW 2
/* Flag OR'ed into shardc_guard_add()'s mode (mode & 15 is the policy): the
 * range is memory inherited over fork(), restored from saved copies. */
#define SHARDC_GUARD_SNAPSHOT 16
/* Flag: the MAP_PRIVATE mapping was guarded before and is still the same
 * mapping, so it already has its anon_vma (see shardc__prime_anon): only
 * write-protect it.  Priming walks every page table entry twice (two
 * mprotects): ~10 ms per GiB of 4 KiB pages, on every call otherwise. */
#define SHARDC_GUARD_PRIMED 32

#define SHARDC_GUARD_MAX_REGIONS 256

/* shardc_guard_install() flags: how a deny fault is announced. */
#define SHARDC_GUARD_NOTIFY_CALL 0
#define SHARDC_GUARD_NOTIFY_RAISE 1

/* What one region saw since its last restore (shardc_guard_collect). */
typedef struct {
    uint64_t pages;        /* distinct pages written (now private copies) */
    uint64_t first_offset; /* byte offset of the first write fault in the region */
    uint64_t faults;       /* write faults handled in this region since restore */
    int written;           /* 1 when anything was written since restore */
    int overflow;          /* 1 when the region went whole-writable (too many pages) */
    int exact;             /* 1 when pages is exact, 0 when it is a lower bound */
    int mode;              /* SHARDC_GUARD_DENY / _AUDIT / _ALLOW (without the flag) */
    int snapshot;          /* 1 for a SHARDC_GUARD_SNAPSHOT region */
    int lost;              /* 1 when written pages could not be saved: restore cannot bring the data back */
} shardc_guard_info_t;

/* Process-wide counters since install (shardc_guard_counters). */
typedef struct {
    uint64_t faults;     /* write faults serviced inside a region */
    uint64_t chained;    /* signals passed on to the previous handler */
    uint64_t overflows;  /* regions switched to whole-writable */
    uint64_t notified;   /* deny notifications sent */
    uint64_t tracked;    /* single-page protections outstanding right now */
    uint64_t leaked_saves; /* snapshot save areas remove() left mapped: a handler never left */
} shardc_guard_counters_t;

int shardc_guard_install(void (*notify)(int), int signum, int flags);
int shardc_guard_uninstall(void);
int shardc_guard_set_limits(int per_region, int total);
int shardc_guard_add(void *addr, uint64_t size, int mode, int *id_out);
int shardc_guard_remove(int id);
int shardc_guard_collect(int id, shardc_guard_info_t *out);
int shardc_guard_restore(int id);
int shardc_guard_dirty(int *ids_out, int max);
int shardc_guard_lookup(const void *addr, uint64_t len, int *ids_out, int max);
int shardc_guard_take_notify(void);
int shardc_guard_counters(shardc_guard_counters_t *out);

/* Defined in the cffi preamble (csrc/ffi_build.py), not in guard.c: it calls
 * PyErr_SetInterruptEx(signum).  Python passes its address to
 * shardc_guard_install(); C programs never reference it. */
void shardc_guard_python_notify(int signum);
/* --- cdef end --- */

#endif /* SHARDC_GUARD_H */
