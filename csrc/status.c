/*
 * status.c - per-worker status rows and the per-call done map, shared by the
 * master and its forked workers, with every cross-process access an atomic
 * whose ordering is written next to it.
 *
 * Layout (inside the caller's memory, 64-byte aligned):
 *
 *   header   magic, nrows                                    (one line)
 *   rows     nrows x row_t                           (four lines each)
 *     lines 0-2  worker-written: seq, copy[0], copy[1] (each { state,
 *                current, start_ns, block0, blockn, run_n }), done,
 *                sending, heap_kept, pid
 *     line 3     master-written: call, exit_req
 *
 * Snapshots: a latch (a seqlock with two copies).  The fields that must be
 * read together (state, current, start_ns, block0, blockn, run_n) exist twice;
 * copy[seq & 1] is the visible one.  The row's only writer (its worker)
 * writes a change into the other copy, then publishes it by bumping seq
 * (release).  A reader loads seq (acquire), copies copy[seq & 1], fences
 * (acquire) and re-loads seq: if it moved, the writer may have reused the
 * copy under it and the reader retries.  Unlike a plain seqlock the visible
 * copy is never half-written, so a reader never waits for the writer: a
 * worker SIGKILLed in the middle of an update leaves the previous, complete
 * state visible (for crash attribution), never a torn one and never an odd
 * sequence that readers would spin on.  What a snapshot guarantees: RUNNING
 * comes with the current shard's own start time, `current` with its own
 * block, and (by the release chain below) every done mark the worker stored
 * before that update.
 *
 * Done map: n bytes, one per shard of a call, written by workers (release:
 * the shard's effects, e.g. writes into out= buffers, come before its mark),
 * read by the master (acquire).  Each byte has one writer at a time (the
 * worker running that shard); a retried shard is re-run only after the
 * master decided the previous attempt was lost, i.e. after its worker died.
 *
 * Order of the steps inside one state change (what a worker SIGKILLed
 * between any two of them leaves behind): the done mark, then the snapshot,
 * then the done counter.  So "IDLE" or "current moved on" implies the
 * previous shard's mark is visible, and the counter never exceeds the marks.
 *
 * The remaining words have one writer each and are read one at a time:
 * release stores pair with acquire loads in the other process.  Counter
 * `done` is the only word both sides modify (worker adds, master takes and
 * zeroes), so both sides use read-modify-write atomics on it.
 */
#define _GNU_SOURCE
#include "status.h"

#include <errno.h>
#include <sched.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#if defined(__APPLE__)
#include <mach/mach_time.h>
#endif

#define SMAGIC 0x31415453434452ULL /* "RDCSTA1" */
#define CL 64

typedef struct {
    int64_t state, current, start_ns, block0, blockn;
    /* ids current .. current + run_n - 1 are covered by this state: 1 for
     * one shard; more in a speculative run (shardc_status_run_next), whose
     * ids are marked done only at its end. */
    int64_t run_n;
} snap_t;

typedef struct {
    /* lines 0-2: written by the worker only (but `done`, see below) */
    uint64_t seq; /* copy[seq & 1] is visible; bumped once per update */
    snap_t copy[2];
    int64_t done, sending, heap_kept, pid;
    /* line 3: written by the master only */
    _Alignas(CL) int64_t call;
    int64_t exit_req;
} row_t;

/* Process-local (never shared): what a worker's per-shard calls need. */
struct shardc_status_writer {
    row_t *row;
    uint8_t *done;
    uint64_t ndone;
};

typedef struct {
    uint64_t magic;
    uint32_t nrows, pad0;
    _Alignas(CL) row_t rows[];
} table_t;

_Static_assert(sizeof(row_t) == 4 * CL && offsetof(table_t, rows) == CL, "lines");

/* ------------------------------------------------------------- clock */

int64_t shardc_status_now_ns(void)
{
#if defined(__APPLE__)
    /* CPython's time.monotonic_ns() on macOS: mach_absolute_time() scaled
     * by the timebase, split as in its _PyTime_MulDiv to avoid overflow. */
    static uint32_t numer, denom; /* the timebase, cached (fixed per boot) */
    uint64_t t = mach_absolute_time(), n, d;
    /* acquire: pairs with the release below, so numer is set when denom is. */
    d = __atomic_load_n(&denom, __ATOMIC_ACQUIRE);
    if (d == 0) {
        mach_timebase_info_data_t tb;
        mach_timebase_info(&tb);
        /* relaxed, then release: any thread may race here; all store the
         * same values. */
        __atomic_store_n(&numer, tb.numer, __ATOMIC_RELAXED);
        __atomic_store_n(&denom, tb.denom, __ATOMIC_RELEASE);
        d = tb.denom;
    }
    /* relaxed: ordered by the acquire load of denom above. */
    n = __atomic_load_n(&numer, __ATOMIC_RELAXED);
    return (int64_t)((t / d) * n + (t % d) * n / d);
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic_ns() on Linux */
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
#endif
}

/* ------------------------------------------------------------- table */

static table_t *table(void *mem)
{
    table_t *t = mem;
    /* relaxed: written by init before the memory is shared (fork orders it). */
    if (t == NULL || __atomic_load_n(&t->magic, __ATOMIC_RELAXED) != SMAGIC)
        return NULL;
    return t;
}

static row_t *slot_row(void *mem, uint32_t slot)
{
    table_t *t = table(mem);
    return (t != NULL && slot < t->nrows) ? &t->rows[slot] : NULL;
}

uint64_t shardc_status_bytes(uint32_t nrows)
{
    if (nrows < 1 || nrows > SHARDC_STATUS_MAX_ROWS)
        return 0;
    return sizeof(table_t) + (uint64_t)nrows * sizeof(row_t);
}

int shardc_status_init(void *mem, uint64_t memsize, uint32_t nrows)
{
    table_t *t = mem;
    uint64_t need = shardc_status_bytes(nrows);
    if (need == 0 || mem == NULL || ((uintptr_t)mem & (CL - 1)))
        return -EINVAL;
    if (memsize < need)
        return -ENOSPC;
    memset(mem, 0, (size_t)need);
    t->nrows = nrows;
    /* release: a process that sees the magic sees the zeroed rows. */
    __atomic_store_n(&t->magic, SMAGIC, __ATOMIC_RELEASE);
    return 0;
}

uint64_t shardc_status_writer_size(void)
{
    return sizeof(shardc_status_writer_t);
}

int shardc_status_writer_init(shardc_status_writer_t *w, void *mem, uint32_t slot)
{
    row_t *r = slot_row(mem, slot);
    if (w == NULL || r == NULL)
        return -EINVAL;
    w->row = r;
    w->done = NULL;
    w->ndone = 0;
    return 0;
}

int shardc_status_writer_set_done(shardc_status_writer_t *w, uint8_t *done, uint64_t n)
{
    if (w == NULL || (done == NULL && n > 0))
        return -EINVAL;
    w->done = done;
    w->ndone = n;
    return 0;
}

/* ------------------------------------------------------- worker side */

/* The visible copy, as the writer sees it (its own writes: relaxed). */
static snap_t *visible(row_t *r, uint64_t *seq)
{
    /* relaxed: only this process writes seq. */
    *seq = __atomic_load_n(&r->seq, __ATOMIC_RELAXED);
    return &r->copy[*seq & 1];
}

/* Publish `v` as the row's new state (the latch described at the top). */
static void publish(row_t *r, uint64_t seq, const snap_t *v)
{
    snap_t *c = &r->copy[(seq + 1) & 1];
    /* release fence: our previous seq bump (which made this copy hidden) is
     * ordered before the stores below, so a reader that sees any of them
     * sees seq moved and retries (pairs with the reader's acquire fence). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    /* relaxed (all six): published by the seq store below. */
    __atomic_store_n(&c->state, v->state, __ATOMIC_RELAXED);
    __atomic_store_n(&c->current, v->current, __ATOMIC_RELAXED);
    __atomic_store_n(&c->start_ns, v->start_ns, __ATOMIC_RELAXED);
    __atomic_store_n(&c->block0, v->block0, __ATOMIC_RELAXED);
    __atomic_store_n(&c->blockn, v->blockn, __ATOMIC_RELAXED);
    __atomic_store_n(&c->run_n, v->run_n, __ATOMIC_RELAXED);
    /* release: the master's acquire load of seq (shardc_status_read) sees
     * this copy complete, and every done mark stored before it. */
    __atomic_store_n(&r->seq, seq + 1, __ATOMIC_RELEASE);
}

static void load_copy(const snap_t *c, snap_t *v)
{
    /* relaxed (all six): validated by the caller's seq re-check, or our
     * own writes (the writer). */
    v->state = __atomic_load_n(&c->state, __ATOMIC_RELAXED);
    v->current = __atomic_load_n(&c->current, __ATOMIC_RELAXED);
    v->start_ns = __atomic_load_n(&c->start_ns, __ATOMIC_RELAXED);
    v->block0 = __atomic_load_n(&c->block0, __ATOMIC_RELAXED);
    v->blockn = __atomic_load_n(&c->blockn, __ATOMIC_RELAXED);
    v->run_n = __atomic_load_n(&c->run_n, __ATOMIC_RELAXED);
}

/* Store a done mark; -EINVAL if sid is outside the map. */
static int mark_done(shardc_status_writer_t *w, int64_t sid, int32_t mark)
{
    if (mark == 0 || w->done == NULL)
        return 0;
    if (sid < 0 || (uint64_t)sid >= w->ndone || mark < 0 || mark > 255)
        return -EINVAL;
    /* release: the shard's effects (out= writes) before its mark; pairs with
     * the master's acquire in shardc_status_done_get/_count. */
    __atomic_store_n(&w->done[sid], (uint8_t)mark, __ATOMIC_RELEASE);
    return 0;
}

int64_t shardc_status_begin(shardc_status_writer_t *w, int64_t sid)
{
    uint64_t seq;
    snap_t v;
    row_t *r = w->row;
    load_copy(visible(r, &seq), &v);
    v.current = sid;
    v.run_n = 1;
    v.start_ns = shardc_status_now_ns();
    v.state = SHARDC_STATUS_RUNNING;
    publish(r, seq, &v);
    return v.start_ns;
}

/* The end of a shard (and of a run): its done mark first, then the row goes
 * IDLE, so a master that sees IDLE also sees the mark.  0 or -EINVAL. */
static int end_idle(shardc_status_writer_t *w, int64_t sid, int32_t mark)
{
    uint64_t seq;
    snap_t v;
    row_t *r = w->row;
    if (mark_done(w, sid, mark) < 0)
        return -EINVAL;
    load_copy(visible(r, &seq), &v);
    v.state = SHARDC_STATUS_IDLE;
    publish(r, seq, &v);
    return 0;
}

int64_t shardc_status_end(shardc_status_writer_t *w, int64_t sid, int32_t mark)
{
    if (end_idle(w, sid, mark) < 0)
        return -EINVAL;
    return shardc_status_now_ns();
}

int64_t shardc_status_next(shardc_status_writer_t *w, int64_t sid, int32_t mark,
                           int64_t nxt)
{
    return shardc_status_next_at(w, sid, mark, nxt, shardc_status_now_ns());
}

int64_t shardc_status_next_at(shardc_status_writer_t *w, int64_t sid,
                              int32_t mark, int64_t nxt, int64_t now_ns)
{
    uint64_t seq;
    snap_t v;
    row_t *r = w->row;
    if (mark_done(w, sid, mark) < 0)
        return -EINVAL;
    load_copy(visible(r, &seq), &v);
    v.current = nxt;
    v.run_n = 1;
    if (now_ns >= 0)
        v.start_ns = now_ns;
    publish(r, seq, &v);
    return v.start_ns;
}

int64_t shardc_status_run_next(shardc_status_writer_t *w, int64_t first,
                               int64_t count, int32_t mark, int64_t nxt,
                               int64_t nxt_count)
{
    uint64_t seq;
    snap_t v;
    row_t *r = w->row;
    if (count < 0 || nxt_count < 0 || mark < 0 || mark > 255)
        return -EINVAL;
    if (count > 0 && mark != 0) {
        if (w->done == NULL || first < 0 || (uint64_t)first > w->ndone ||
            (uint64_t)count > w->ndone - (uint64_t)first)
            return -EINVAL;
        /* release fence: the run's effects (out= writes) are ordered before
         * every mark stored below; a master whose acquire load (done_get /
         * done_count) reads one of them sees those effects (fence-to-load
         * synchronization; the marks themselves can then be relaxed). */
        __atomic_thread_fence(__ATOMIC_RELEASE);
        for (int64_t i = 0; i < count; i++)
            /* relaxed: ordered by the fence above (and published before the
             * new state by publish()'s release fence and seq store). */
            __atomic_store_n(&w->done[first + i], (uint8_t)mark, __ATOMIC_RELAXED);
    }
    load_copy(visible(r, &seq), &v);
    v.start_ns = shardc_status_now_ns();
    if (nxt_count > 0) {
        v.current = nxt;
        v.run_n = nxt_count;
        v.state = SHARDC_STATUS_RUNNING;
    } else {
        v.state = SHARDC_STATUS_IDLE;
    }
    publish(r, seq, &v);
    return v.start_ns;
}

int64_t shardc_status_block_begin(shardc_status_writer_t *w, int64_t start,
                                  int64_t count)
{
    uint64_t seq;
    snap_t v;
    row_t *r = w->row;
    (void)visible(r, &seq);
    v.block0 = start;
    v.blockn = count;
    v.current = start;
    v.run_n = 1;
    v.start_ns = shardc_status_now_ns();
    v.state = SHARDC_STATUS_RUNNING;
    publish(r, seq, &v);
    return v.start_ns;
}

int64_t shardc_status_block_end(shardc_status_writer_t *w, int64_t sid,
                                int32_t mark, int64_t ok)
{
    if (end_idle(w, sid, mark) < 0)
        return -EINVAL;
    if (ok)
        /* release RMW: the marks counted are visible to a master whose
         * acquire (take_done / done_total) reads the sum; an RMW because
         * the master zeroes the word with an exchange. */
        __atomic_fetch_add(&w->row->done, ok, __ATOMIC_RELEASE);
    return shardc_status_now_ns();
}

int shardc_status_set_idle(shardc_status_writer_t *w)
{
    uint64_t seq;
    snap_t v;
    row_t *r = w->row;
    load_copy(visible(r, &seq), &v);
    if (v.state != SHARDC_STATUS_IDLE) {
        v.state = SHARDC_STATUS_IDLE;
        publish(r, seq, &v);
    }
    return 0;
}

int shardc_status_set_sending(shardc_status_writer_t *w, int64_t value)
{
    row_t *r = w->row;
    /* release: pairs with the master's acquire in shardc_status_read. */
    __atomic_store_n(&r->sending, value, __ATOMIC_RELEASE);
    return 0;
}

int shardc_status_set_heap_kept(shardc_status_writer_t *w, int64_t nbytes)
{
    row_t *r = w->row;
    /* release: pairs with the master's acquire in shardc_status_heap_kept. */
    __atomic_store_n(&r->heap_kept, nbytes, __ATOMIC_RELEASE);
    return 0;
}

int shardc_status_set_pid(shardc_status_writer_t *w, int64_t pid)
{
    row_t *r = w->row;
    /* release: pairs with the master's acquire in shardc_status_pid. */
    __atomic_store_n(&r->pid, pid, __ATOMIC_RELEASE);
    return 0;
}

int shardc_status_exit_requested(shardc_status_writer_t *w)
{
    row_t *r = w->row;
    /* acquire: pairs with the master's release in request_exit. */
    return __atomic_load_n(&r->exit_req, __ATOMIC_ACQUIRE) != 0;
}

/* ------------------------------------------------------- master side */

int shardc_status_read(void *mem, uint32_t slot, shardc_status_snap_t *out)
{
    row_t *r = slot_row(mem, slot);
    snap_t v;
    uint64_t s1, s2;
    unsigned tries = 0;
    if (r == NULL || out == NULL)
        return -EINVAL;
    for (;;) {
        /* acquire: pairs with the writer's release store of seq in
         * publish(): the copy it names is complete for us. */
        s1 = __atomic_load_n(&r->seq, __ATOMIC_ACQUIRE);
        load_copy(&r->copy[s1 & 1], &v);
        /* acquire fence: orders the copy loads before the re-check; pairs
         * with the writer's release fence before it reuses a copy. */
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        /* relaxed: ordered by the fence above. */
        s2 = __atomic_load_n(&r->seq, __ATOMIC_RELAXED);
        if (s1 == s2)
            break;
        /* The writer completed an update during our read (it cannot stall
         * us: it never leaves the visible copy half-written).  Let it run
         * if it shares our core. */
        if (++tries % 64 == 0)
            sched_yield();
    }
    out->state = v.state;
    out->current = v.current;
    out->start_ns = v.start_ns;
    out->block0 = v.block0;
    out->blockn = v.blockn;
    out->run_n = v.run_n;
    /* acquire (all): each pairs with its single writer's release store. */
    out->done = __atomic_load_n(&r->done, __ATOMIC_ACQUIRE);
    out->sending = __atomic_load_n(&r->sending, __ATOMIC_ACQUIRE);
    out->heap_kept = __atomic_load_n(&r->heap_kept, __ATOMIC_ACQUIRE);
    out->pid = __atomic_load_n(&r->pid, __ATOMIC_ACQUIRE);
    /* relaxed (both): written by the master itself (this process). */
    out->call = __atomic_load_n(&r->call, __ATOMIC_RELAXED);
    out->exit_req = __atomic_load_n(&r->exit_req, __ATOMIC_RELAXED);
    return 0;
}

int shardc_status_reset(void *mem, uint32_t slot)
{
    row_t *r = slot_row(mem, slot);
    uint64_t *w;
    if (r == NULL)
        return -EINVAL;
    /* relaxed (every word): the slot has no worker; the fork of the next
     * one orders these stores before anything it does. */
    w = (uint64_t *)(void *)r;
    for (size_t i = 0; i < sizeof(row_t) / 8; i++)
        __atomic_store_n(&w[i], 0, __ATOMIC_RELAXED);
    return 0;
}

int shardc_status_set_call(void *mem, uint32_t slot, int64_t call)
{
    row_t *r = slot_row(mem, slot);
    if (r == NULL)
        return -EINVAL;
    /* release: pairs with an acquire read by any process (today only the
     * master reads it back; the worker learns its call from a message). */
    __atomic_store_n(&r->call, call, __ATOMIC_RELEASE);
    return 0;
}

int shardc_status_clear_calls(void *mem)
{
    table_t *t = table(mem);
    if (t == NULL)
        return -EINVAL;
    for (uint32_t i = 0; i < t->nrows; i++)
        /* release: as in set_call. */
        __atomic_store_n(&t->rows[i].call, 0, __ATOMIC_RELEASE);
    return 0;
}

int shardc_status_request_exit(void *mem, uint32_t slot)
{
    row_t *r = slot_row(mem, slot);
    if (r == NULL)
        return -EINVAL;
    /* release: pairs with the worker's acquire in exit_requested. */
    __atomic_store_n(&r->exit_req, 1, __ATOMIC_RELEASE);
    return 0;
}

int64_t shardc_status_take_done(void *mem, uint32_t slot)
{
    row_t *r = slot_row(mem, slot);
    if (r == NULL)
        return -EINVAL;
    /* acq_rel exchange: pairs with the worker's release fetch_add; an RMW so
     * that an increment racing with us is either taken or kept, never lost. */
    return __atomic_exchange_n(&r->done, 0, __ATOMIC_ACQ_REL);
}

int64_t shardc_status_done_total(void *mem)
{
    table_t *t = table(mem);
    int64_t sum = 0;
    if (t == NULL)
        return -EINVAL;
    for (uint32_t i = 0; i < t->nrows; i++)
        /* acquire: pairs with each worker's release fetch_add. */
        sum += __atomic_load_n(&t->rows[i].done, __ATOMIC_ACQUIRE);
    return sum;
}

int64_t shardc_status_pid(void *mem, uint32_t slot)
{
    row_t *r = slot_row(mem, slot);
    if (r == NULL)
        return -EINVAL;
    /* acquire: pairs with the worker's release in set_pid. */
    return __atomic_load_n(&r->pid, __ATOMIC_ACQUIRE);
}

int64_t shardc_status_heap_kept(void *mem, uint32_t slot)
{
    row_t *r = slot_row(mem, slot);
    if (r == NULL)
        return -EINVAL;
    /* acquire: pairs with the worker's release in set_heap_kept. */
    return __atomic_load_n(&r->heap_kept, __ATOMIC_ACQUIRE);
}

/* ---------------------------------------------------------- done map */

int shardc_status_done_mark(uint8_t *done, uint64_t n, int64_t sid, int32_t mark)
{
    if (done == NULL || sid < 0 || (uint64_t)sid >= n || mark < 0 || mark > 255)
        return -EINVAL;
    /* release: the shard's effects before its mark (pairs with get/count). */
    __atomic_store_n(&done[sid], (uint8_t)mark, __ATOMIC_RELEASE);
    return 0;
}

int shardc_status_done_get(const uint8_t *done, uint64_t n, int64_t sid)
{
    if (done == NULL || sid < 0 || (uint64_t)sid >= n)
        return -EINVAL;
    /* acquire: pairs with the worker's release store of the mark. */
    return __atomic_load_n(&done[sid], __ATOMIC_ACQUIRE);
}

/* Word-at-a-time view of the map (8 marks per load). */
typedef uint64_t __attribute__((may_alias)) word_t;

#define LOW7 0x7f7f7f7f7f7f7f7fULL
#define ONES 0x0101010101010101ULL

int64_t shardc_status_done_count(const uint8_t *done, uint64_t n)
{
    uint64_t i = 0, total = 0;
    if (done == NULL)
        return n ? -EINVAL : 0;
    /* relaxed (every load here): the acquire fence at the end orders them
     * before the caller's later reads, pairing with each mark's release. */
    for (; i < n && ((uintptr_t)(done + i) & 7); i++)
        total += __atomic_load_n(&done[i], __ATOMIC_RELAXED) != 0;
    while (n - i >= 8) {
        const word_t *w = (const word_t *)(const void *)(done + i);
        uint64_t nw = (n - i) / 8, acc = 0, a;
        if (nw > 255)
            nw = 255; /* byte lanes of acc count to at most 255 */
        for (uint64_t j = 0; j < nw; j++) {
            uint64_t x = __atomic_load_n(&w[j], __ATOMIC_RELAXED);
            /* High bit of each byte lane set iff that byte is non-zero. */
            acc += ((((x & LOW7) + LOW7) | x) >> 7) & ONES;
        }
        /* Sum the eight byte lanes: pairs into 16-bit lanes, then all. */
        a = (acc & 0x00ff00ff00ff00ffULL) + ((acc >> 8) & 0x00ff00ff00ff00ffULL);
        total += (a * 0x0001000100010001ULL) >> 48;
        i += nw * 8;
    }
    for (; i < n; i++)
        total += __atomic_load_n(&done[i], __ATOMIC_RELAXED) != 0;
    /* acquire fence: see the top of this function. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return (int64_t)total;
}
