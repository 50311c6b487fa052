/*
 * status.h - the run state shared between the master and its forked workers:
 * a status table (one row per worker slot: which shard runs since when, the
 * block it belongs to, shards finished, exit request, pid, ...) and a call's
 * done map (one byte per shard).  Both live in caller-provided shared memory
 * (a memfd segment mapped MAP_SHARED into every process); their layout and
 * memory ordering are private to status.c (see the comment at its top), and
 * every read or write from Python goes through these functions.
 *
 * Roles: a row has one writer, the worker forked into its slot (the master
 * only writes the master fields: call, exit request, reset, take_done); the
 * master reads rows with shardc_status_read(), which returns a consistent
 * snapshot even while the worker updates it, or after it died mid-update.
 *
 * Timestamps are on the clock of Python's time.monotonic_ns() (Linux:
 * CLOCK_MONOTONIC; macOS: mach_absolute_time() scaled to ns, as CPython does).
 *
 * Returns: 0 (or a count, or a time in ns, always >= 0) on success, -errno on
 * failure (-EINVAL: bad argument, not an initialized table, shard id outside
 * the done map; -ENOSPC: memsize too small).
 */
#ifndef SHARDC_STATUS_H
#define SHARDC_STATUS_H

#include <stdint.h>

/* --- cdef begin --- */
#define SHARDC_STATUS_IDLE 0
#define SHARDC_STATUS_RUNNING 1
#define SHARDC_STATUS_MAX_ROWS 65536

/* One consistent read of a row (shardc_status_read). */
typedef struct {
    int64_t state;     /* SHARDC_STATUS_IDLE / _RUNNING */
    int64_t current;   /* shard running (meaningful while RUNNING) */
    int64_t start_ns;  /* when `current` started */
    int64_t done;      /* shards finished since the last take_done */
    int64_t call;      /* call id the worker runs (master-set), 0 between calls */
    int64_t block0;    /* first id of the block it runs */
    int64_t blockn;    /* ids in that block */
    int64_t exit_req;  /* 1: leave after the current block */
    int64_t pid;
    int64_t sending;   /* 1 + id of the shard whose value is being sent, 0 if none */
    int64_t heap_kept; /* freed heap bytes the worker keeps for reuse */
    int64_t run_n;     /* ids from `current` this state covers: 1, or a speculative run's length */
} shardc_status_snap_t;

/* A worker's writer of its row: process-local memory (not shared) holding
 * the row's address and the current call's done map, so that each per-shard
 * call passes only what changes.  Opaque: allocate shardc_status_writer_size()
 * bytes (8-byte aligned) and fill them with shardc_status_writer_init(). */
typedef struct shardc_status_writer shardc_status_writer_t;

/* Bytes needed for a table of nrows rows; 0 if nrows is not in
 * [1, SHARDC_STATUS_MAX_ROWS]. */
uint64_t shardc_status_bytes(uint32_t nrows);
/* Lay out a zeroed table in mem (64-byte aligned, memsize >= bytes). */
int shardc_status_init(void *mem, uint64_t memsize, uint32_t nrows);
uint64_t shardc_status_writer_size(void);
/* Point w at row `slot` of the table at mem (-EINVAL: no table / no row). */
int shardc_status_writer_init(shardc_status_writer_t *w, void *mem, uint32_t slot);
/* The done map the marks below go to: n bytes (NULL, 0: none). */
int shardc_status_writer_set_done(shardc_status_writer_t *w, uint8_t *done,
                                  uint64_t n);

/* --- worker side: one call per state change (each returns the time it
 * stamped, or now, in ns; -EINVAL for a shard id outside the done map, in
 * which case nothing changed).  `mark` is the shard's done byte (1 or 2; 0:
 * failed, no mark).  w must have been initialized: the per-shard calls do
 * not check it. */

/* `sid` starts now: current, start time and RUNNING, as one update. */
int64_t shardc_status_begin(shardc_status_writer_t *w, int64_t sid);
/* `sid` finished: its done mark, then IDLE. */
int64_t shardc_status_end(shardc_status_writer_t *w, int64_t sid, int32_t mark);
/* Inside a block (stays RUNNING): mark `sid`, then `nxt` starts now. */
int64_t shardc_status_next(shardc_status_writer_t *w, int64_t sid, int32_t mark,
                           int64_t nxt);
/* As shardc_status_next, with the caller's time stamp: now_ns >= 0 is the
 * start time of `nxt`, now_ns < 0 keeps the row's start time (the native
 * kernel runner, csrc/kernel.c, stamps a run of very short shards once). */
int64_t shardc_status_next_at(shardc_status_writer_t *w, int64_t sid,
                              int32_t mark, int64_t nxt, int64_t now_ns);
/* A speculative run (short shards, one status write per run, not per
 * shard): mark ids first .. first+count-1 done with `mark` (one release
 * fence, then the bytes; count 0 or mark 0: none), then publish, stamped
 * now, "ids nxt .. nxt+nxt_count-1 running" (nxt_count >= 1; run_n =
 * nxt_count) or, for nxt_count 0, IDLE.  A worker that dies inside a run
 * leaves it RUNNING with run_n > 1 and none of its ids marked: the master
 * cannot tell which one crashed and reruns them one shard at a time.
 * Returns now (ns), or -EINVAL (bad range: nothing changed). */
int64_t shardc_status_run_next(shardc_status_writer_t *w, int64_t first,
                               int64_t count, int32_t mark, int64_t nxt,
                               int64_t nxt_count);
/* A block of `count` ids from `start` begins: its first shard runs now. */
int64_t shardc_status_block_begin(shardc_status_writer_t *w, int64_t start,
                                  int64_t count);
/* The block ends after `sid` (mark it), IDLE, and `ok` more shards done. */
int64_t shardc_status_block_end(shardc_status_writer_t *w, int64_t sid,
                                int32_t mark, int64_t ok);
int shardc_status_set_idle(shardc_status_writer_t *w);
int shardc_status_set_sending(shardc_status_writer_t *w, int64_t value);
int shardc_status_set_heap_kept(shardc_status_writer_t *w, int64_t nbytes);
int shardc_status_set_pid(shardc_status_writer_t *w, int64_t pid);
/* 1 if the master asked this worker to leave, else 0. */
int shardc_status_exit_requested(shardc_status_writer_t *w);

/* --- master side (mem = the table, slot = the row) */

/* A consistent snapshot of the row (see status.c for what that means). */
int shardc_status_read(void *mem, uint32_t slot, shardc_status_snap_t *out);
/* Zero the row (before a worker is forked into the slot). */
int shardc_status_reset(void *mem, uint32_t slot);
int shardc_status_set_call(void *mem, uint32_t slot, int64_t call);
/* Every row's call id back to 0. */
int shardc_status_clear_calls(void *mem);
int shardc_status_request_exit(void *mem, uint32_t slot);
/* The row's finished-shard count, atomically zeroed. */
int64_t shardc_status_take_done(void *mem, uint32_t slot);
/* Sum of every row's finished-shard count. */
int64_t shardc_status_done_total(void *mem);
int64_t shardc_status_pid(void *mem, uint32_t slot);
int64_t shardc_status_heap_kept(void *mem, uint32_t slot);

/* --- the done map: n bytes, one per shard (0 = not done) */

/* Store `mark` for `sid` (release: the shard's effects come first). */
int shardc_status_done_mark(uint8_t *done, uint64_t n, int64_t sid, int32_t mark);
/* The mark of `sid` (acquire), 0..255. */
int shardc_status_done_get(const uint8_t *done, uint64_t n, int64_t sid);
/* Number of non-zero bytes in done[0..n). */
int64_t shardc_status_done_count(const uint8_t *done, uint64_t n);
/* Monotonic time in ns, on the clock of Python's time.monotonic_ns(). */
int64_t shardc_status_now_ns(void);
/* --- cdef end --- */

#endif /* SHARDC_STATUS_H */
