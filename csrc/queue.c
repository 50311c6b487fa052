/*
 * queue.c - the task ring: a bounded MPMC ring of 64-bit items in shared
 * memory, with Vyukov per-cell sequence numbers, batch push/pop, spin-then-
 * futex waiting, close(), and repair of consumers that died mid-claim.
 *
 * Layout (all inside the caller's memory, every block 64-byte aligned):
 *
 *   header   line 0: magic, capacity, max_consumers, offsets (constant)
 *            line 1: enq   = enqueue position | CLOSED (bit 63)
 *            line 2: deq   = dequeue position (bits 0-47) | (claimer+1) << 48
 *            line 3: items_seq, space_seq, space_waiters  (futex words)
 *            line 4: counters: parks, wakes, repaired; spin_ns
 *            then:   sleepers[]: one bit per consumer parked on items_seq
 *   cells    capacity x { seq, item }
 *   records  max_consumers x { pid, state, intent_base, nclaimed,
 *                              heartbeat, items[SHARDC_QUEUE_MAX_CLAIM] }
 *
 * Cells (Vyukov): for position p, cell p & mask holds seq == p when free for
 * the producer of p, seq == p + 1 once the item is published, and
 * seq == p + capacity once the consumer of p released it (i.e. free for the
 * producer of p + capacity).  A producer claims a run of free cells by CAS on
 * enq, a consumer a run of published cells by CAS on deq; both check the
 * cells first, and the check stays true until the CAS moves past the cells
 * (positions only grow, so a CAS that succeeds proves nobody else did).
 *
 * Futex words (32-bit, shared, compared by value):
 *   items_seq      bumped (then FUTEX_WAKE) by a producer after publishing,
 *                  when a sleepers[] bit says a consumer is parked, and by
 *                  close().  Its value has no meaning beyond "changed".
 *   space_seq      bumped by a consumer (or repair) after releasing cells,
 *                  when space_waiters > 0, and by close().
 *   space_waiters  number of producers parked or about to park on space_seq.
 * A sleeper sets its bit (or counter), issues a full fence, reads the seq,
 * re-checks its condition and only then sleeps; a waker publishes, fences and
 * reads the bit/counter: one of the two always sees the other (Dekker), so
 * there is no lost wake-up, and no FUTEX_WAKE when nobody sleeps.  Consumers
 * use bits rather than a counter so that repair can clear a dead consumer's.
 * Waits spin first (spin_ns, 10 us by default) and no single sleep lasts more
 * than 200 ms, whatever the caller's timeout: a waker that died between its
 * publish and its wake delays a sleeper, it cannot strand it.
 *
 * Consumer records and crash repair.  A consumer's claim must be
 * recoverable if it is SIGKILLed at any instruction.  Pop therefore:
 *   1. reads the ready cells and copies their items into its record
 *      (items[nclaimed..]), before claiming anything;
 *   2. stores state = CLAIMING(pos, k) ("intent");
 *   3. CASes deq from (pos, prev) to (pos + k, self): the word names the
 *      winner, and a position/owner pair can only ever be written once;
 *   4. stores state = OWNED(pos, k), releases the k cells, bumps nclaimed,
 *      stores state = IDLE.
 * Before any consumer moves deq away from (q, X) it makes sure X's record
 * says OWNED if X's intent ends at q (it CASes CLAIMING -> OWNED).  So "X's
 * CAS succeeded" is always visible: either deq still reads (pos + k, X), or
 * X's state says OWNED.  Repair (master, after the process died) reads deq
 * then the state: CLAIMING with deq != (pos + k, X) proves the CAS failed
 * (nothing claimed, the copies are ignored); OWNED, or CLAIMING with deq ==
 * (pos + k, X), proves it succeeded: repair releases those of the k cells
 * that still read p + 1 (nobody else may touch them) and hands back
 * items[0 .. intent_base + k).  Repair never asks the OS whether the
 * consumer lives: the caller (the master, after waitpid) says which pid it
 * reaped, and repair only checks that the record is that pid's (a pid can be
 * reused by an unrelated process as soon as it is reaped).  No step holds anything others wait for
 * except the k claimed cells, which repair releases: a dead consumer never
 * leaves the ring locked.  A producer that dies between its CAS and its
 * publish does stall consumers at that position; in shardc the only
 * producer is the master, whose death ends the run anyway.
 *
 * Positions are 48-bit in deq (2.8e14 items: 9 years at 1M items/s).
 */
#define _GNU_SOURCE
#include "queue.h"
#include "sys.h"

#include <stddef.h>
#include <string.h>
#include <sys/types.h>

#define QMAGIC 0x31474e4952434453ULL /* "SDCRING1" */
#define CLOSED_BIT (1ULL << 63)
#define POS_MASK ((1ULL << 48) - 1)
#define W_POS(w) ((w) & POS_MASK)
#define W_OWNER(w) ((uint32_t)((w) >> 48)) /* consumer + 1, 0 = none */
#define W_MAKE(pos, c) ((pos) | ((uint64_t)((c) + 1) << 48))
/* Record state word: kind (bits 62-63) | k (bits 48-57) | pos (bits 0-47). */
#define ST_KIND(s) ((uint32_t)((s) >> 62))
#define ST_K(s) ((uint32_t)(((s) >> 48) & 0x3ff))
#define ST_POS(s) ((s) & POS_MASK)
#define ST_MAKE(kind, pos, k)                                                 \
    (((uint64_t)(kind) << 62) | ((uint64_t)(k) << 48) | (pos))
#define DEFAULT_SPIN_NS 10000     /* 10 us: inside the 2-20 us design range */
#define MAX_SLEEP_NS 200000000LL  /* 200 ms per futex sleep, then re-check */
#define CL 64

typedef struct {
    uint64_t magic, total, cells_off, recs_off, rec_size;
    uint32_t capacity, max_consumers, nwords, pad0;
    /* Each group below on its own cache line: producers write enq,
     * consumers deq, wakers the futex words; nobody false-shares. */
    _Alignas(CL) uint64_t enq;
    _Alignas(CL) uint64_t deq;
    _Alignas(CL) uint32_t items_seq;
    uint32_t space_seq, space_waiters, pad1;
    _Alignas(CL) uint64_t parks;
    uint64_t wakes, repaired;
    int64_t spin_ns;
    _Alignas(CL) uint64_t sleepers[]; /* nwords */
} qhdr_t;

typedef struct {
    uint64_t seq;
    uint64_t item;
} qcell_t;

typedef struct {
    int32_t pid;
    uint32_t nclaimed;    /* items[0..nclaimed) are claimed, not done */
    uint32_t intent_base; /* nclaimed when the current intent was made */
    uint32_t pad0;
    uint64_t state;       /* ST_MAKE(kind, pos, k) */
    uint64_t heartbeat;
    _Alignas(CL) uint64_t items[SHARDC_QUEUE_MAX_CLAIM];
} qrec_t;

_Static_assert(offsetof(qhdr_t, enq) == 64 && offsetof(qhdr_t, deq) == 128 &&
                   offsetof(qhdr_t, sleepers) == 320,
               "header lines");

static uint64_t round_up(uint64_t x) { return (x + CL - 1) & ~(uint64_t)(CL - 1); }

static qcell_t *cells(qhdr_t *q) { return (qcell_t *)((char *)q + q->cells_off); }

static qrec_t *rec(qhdr_t *q, uint32_t c)
{
    return (qrec_t *)((char *)q + q->recs_off + (uint64_t)c * q->rec_size);
}

static qhdr_t *hdr(void *mem)
{
    qhdr_t *q = mem;
    /* relaxed: the header is written once by init before the memory is
     * shared (fork or fd passing orders it for the other processes). */
    if (q == NULL || __atomic_load_n(&q->magic, __ATOMIC_RELAXED) != QMAGIC)
        return NULL;
    return q;
}

uint64_t shardc_queue_bytes(uint32_t capacity, uint32_t max_consumers)
{
    uint64_t nwords = (max_consumers + 63) / 64;
    if (capacity < 2 || capacity > SHARDC_QUEUE_MAX_CAPACITY ||
        (capacity & (capacity - 1)) || max_consumers < 1 ||
        max_consumers > SHARDC_QUEUE_MAX_CONSUMERS)
        return 0;
    return round_up(sizeof(qhdr_t) + nwords * 8) +
           round_up((uint64_t)capacity * sizeof(qcell_t)) +
           (uint64_t)max_consumers * round_up(sizeof(qrec_t));
}

int shardc_queue_init(void *mem, uint64_t memsize, uint32_t capacity,
                      uint32_t max_consumers)
{
    qhdr_t *q = mem;
    uint64_t need = shardc_queue_bytes(capacity, max_consumers);
    qcell_t *c;

    if (need == 0 || mem == NULL || ((uintptr_t)mem & (CL - 1)))
        return -EINVAL;
    if (memsize < need)
        return -ENOSPC;
    memset(mem, 0, (size_t)need);
    q->total = need;
    q->capacity = capacity;
    q->max_consumers = max_consumers;
    q->nwords = (max_consumers + 63) / 64;
    q->cells_off = round_up(sizeof(qhdr_t) + (uint64_t)q->nwords * 8);
    q->recs_off = q->cells_off + round_up((uint64_t)capacity * sizeof(qcell_t));
    q->rec_size = round_up(sizeof(qrec_t));
    q->spin_ns = DEFAULT_SPIN_NS;
    c = cells(q);
    for (uint64_t i = 0; i < capacity; i++)
        c[i].seq = i;
    /* release: a process that sees the magic sees the initialized ring. */
    __atomic_store_n(&q->magic, QMAGIC, __ATOMIC_RELEASE);
    return 0;
}

int shardc_queue_check(void *mem, uint64_t memsize)
{
    qhdr_t *q = hdr(mem);
    if (q == NULL)
        return -EINVAL;
    return q->total <= memsize ? 0 : -ENOSPC;
}

/* Spin-window bookkeeping shared by push and pop: returns 1 while the caller
 * should keep spinning, 0 once it should park. */
static int keep_spinning(qhdr_t *q, int64_t *spin_end, uint32_t *iter)
{
    if (*spin_end == 0) {
        /* relaxed: a tunable; any recent value will do. */
        int64_t s = __atomic_load_n(&q->spin_ns, __ATOMIC_RELAXED);
        if (s <= 0)
            return 0;
        *spin_end = shardc__deadline_ns(s);
    }
    shardc__cpu_relax();
    if ((++*iter & 31) == 0 && shardc__now_ns() >= *spin_end)
        return 0;
    return 1;
}

/* How long one futex sleep may last: the caller's remaining time, but never
 * more than MAX_SLEEP_NS, so that a wake lost to a process that died between
 * publishing and waking costs at most that much, never a hang. */
static int64_t sleep_for(int64_t deadline)
{
    int64_t left;
    if (deadline < 0)
        return MAX_SLEEP_NS;
    left = deadline - shardc__now_ns();
    if (left <= 0)
        return 0;
    return left < MAX_SLEEP_NS ? left : MAX_SLEEP_NS;
}

/* ---------------------------------------------------------------- push */

/* Claim and publish up to n free cells; returns the count, 0 if full, or
 * -EPIPE if closed. */
static int try_push(qhdr_t *q, const uint64_t *items, uint32_t n)
{
    qcell_t *cl = cells(q);
    uint64_t mask = q->capacity - 1;
    /* relaxed: only a starting guess; the CAS below validates it. */
    uint64_t e = __atomic_load_n(&q->enq, __ATOMIC_RELAXED);

    for (;;) {
        uint32_t j = 0;
        uint64_t seq = 0;
        if (e & CLOSED_BIT)
            return -EPIPE;
        while (j < n) {
            /* acquire: pairs with the consumer's release of the cell, so its
             * read of the old item happened before we overwrite it. */
            seq = __atomic_load_n(&cl[(e + j) & mask].seq, __ATOMIC_ACQUIRE);
            if (seq != e + j)
                break;
            j++;
        }
        if (j == 0) {
            if ((int64_t)(seq - e) < 0)
                return 0; /* the cell still holds the previous lap: full */
            /* relaxed: another producer moved on; re-read and retry. */
            e = __atomic_load_n(&q->enq, __ATOMIC_RELAXED);
            continue;
        }
        /* seq_cst CAS: claims [e, e+j) against other producers and orders
         * against close()'s fetch_or of CLOSED_BIT on the same word. */
        if (__atomic_compare_exchange_n(&q->enq, &e, e + j, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED)) {
            for (uint32_t i = 0; i < j; i++) {
                qcell_t *c = &cl[(e + i) & mask];
                /* relaxed: published by the release store just below. */
                __atomic_store_n(&c->item, items[i], __ATOMIC_RELAXED);
                /* release: a consumer that reads seq == p + 1 sees the item. */
                __atomic_store_n(&c->seq, e + i + 1, __ATOMIC_RELEASE);
            }
            return (int)j;
        }
    }
}

static int any_sleeper(qhdr_t *q)
{
    for (uint32_t i = 0; i < q->nwords; i++)
        /* relaxed: ordered by the caller's seq_cst fence (Dekker). */
        if (__atomic_load_n(&q->sleepers[i], __ATOMIC_RELAXED))
            return 1;
    return 0;
}

/* Wake up to n parked consumers, but only if a sleepers bit is set. */
static void wake_consumers(qhdr_t *q, uint32_t n)
{
    /* seq_cst fence: orders our cell publish before reading the sleepers
     * bits, against the consumer's bit set + fence + cell re-check. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!any_sleeper(q))
        return;
    /* release: a woken consumer's re-check sees the published cells. */
    __atomic_fetch_add(&q->items_seq, 1, __ATOMIC_RELEASE);
    /* relaxed: a statistic. */
    __atomic_fetch_add(&q->wakes, 1, __ATOMIC_RELAXED);
    shardc__wake_u32(&q->items_seq, n > INT32_MAX ? INT32_MAX : (int)n);
}

/* Wake parked producers if the counter says one sleeps. */
static void wake_producers(qhdr_t *q)
{
    /* seq_cst fence: orders our cell releases before reading space_waiters,
     * against the producer's increment + fence + fullness re-check. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    /* relaxed: ordered by the fence above. */
    if (__atomic_load_n(&q->space_waiters, __ATOMIC_RELAXED) == 0)
        return;
    /* release: a woken producer's re-check sees the released cells. */
    __atomic_fetch_add(&q->space_seq, 1, __ATOMIC_RELEASE);
    /* relaxed: a statistic. */
    __atomic_fetch_add(&q->wakes, 1, __ATOMIC_RELAXED);
    shardc__wake_u32(&q->space_seq, INT32_MAX);
}

static int ring_full(qhdr_t *q)
{
    /* acquire on both: a fresh view of the enqueue slot after our fence. */
    uint64_t e = __atomic_load_n(&q->enq, __ATOMIC_ACQUIRE);
    uint64_t seq = __atomic_load_n(&cells(q)[e & (q->capacity - 1)].seq,
                                   __ATOMIC_ACQUIRE);
    return !(e & CLOSED_BIT) && (int64_t)(seq - e) < 0;
}

static int park_producer(qhdr_t *q, int64_t deadline)
{
    uint32_t seq;
    int r = 0;
    /* seq_cst: announce ourselves before re-checking (Dekker with
     * wake_producers); the fence orders the re-check after it. */
    __atomic_fetch_add(&q->space_waiters, 1, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    /* acquire: read the seq before the re-check, so a bump after it is seen
     * by the futex's own comparison. */
    seq = __atomic_load_n(&q->space_seq, __ATOMIC_ACQUIRE);
    if (ring_full(q)) {
        /* relaxed: a statistic. */
        __atomic_fetch_add(&q->parks, 1, __ATOMIC_RELAXED);
        r = shardc__wait_u32(&q->space_seq, seq, sleep_for(deadline));
    }
    /* release: our wait is over; wakers may skip us from now on. */
    __atomic_fetch_sub(&q->space_waiters, 1, __ATOMIC_RELEASE);
    return r;
}

int shardc_queue_push(void *mem, const uint64_t *items, uint32_t n,
                      int64_t timeout_ns)
{
    qhdr_t *q = hdr(mem);
    int64_t deadline, spin_end = 0;
    uint32_t done = 0, iter = 0;

    if (q == NULL || (items == NULL && n > 0) || n > INT32_MAX)
        return -EINVAL;
    deadline = timeout_ns < 0 ? -1 : INT64_MAX; /* set on the first miss */
    while (done < n) {
        int r = try_push(q, items + done, n - done);
        if (r < 0)
            return done ? (int)done : r;
        if (r > 0) {
            done += (uint32_t)r;
            wake_consumers(q, (uint32_t)r);
            spin_end = 0;
            continue;
        }
        if (deadline == INT64_MAX)
            deadline = shardc__deadline_ns(timeout_ns);
        if (deadline >= 0 && shardc__now_ns() >= deadline)
            return done ? (int)done : -ETIMEDOUT;
        if (keep_spinning(q, &spin_end, &iter))
            continue;
        r = park_producer(q, deadline);
        if (r == -EINTR)
            return done ? (int)done : -EINTR;
    }
    return (int)done;
}

/* ----------------------------------------------------------------- pop */

/* Before moving deq away from (q_end, X): if X's intent ends at q_end, X's
 * CAS succeeded; make its record say so (see the top of this file). */
static void mark_owned(qhdr_t *q, uint32_t x, uint64_t q_end)
{
    qrec_t *r = rec(q, x);
    /* acquire: pairs with X's release store of its intent. */
    uint64_t s = __atomic_load_n(&r->state, __ATOMIC_ACQUIRE);
    if (ST_KIND(s) == SHARDC_QUEUE_CLAIMING && ST_POS(s) + ST_K(s) == q_end)
        /* seq_cst CAS: must be visible before our deq CAS (the repair reads
         * deq, then this state); fails harmlessly if X moved on. */
        __atomic_compare_exchange_n(&r->state, &s,
                                    ST_MAKE(SHARDC_QUEUE_OWNED, ST_POS(s), ST_K(s)),
                                    0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
}

/* Claim up to max published cells into consumer c's record and out[];
 * returns the count or 0 if nothing is published at the dequeue position. */
static int try_pop(qhdr_t *q, uint32_t c, uint64_t *out, uint32_t max)
{
    qcell_t *cl = cells(q);
    qrec_t *r = rec(q, c);
    uint64_t mask = q->capacity - 1, cap = q->capacity;
    uint32_t base = r->nclaimed; /* only we write it */
    int tried = 0;
    /* acquire: see the cells as released by the previous claimer. */
    uint64_t w = __atomic_load_n(&q->deq, __ATOMIC_ACQUIRE);

    for (;;) {
        uint64_t pos = W_POS(w), seq = 0;
        uint32_t j = 0, owner = W_OWNER(w);
        while (j < max) {
            qcell_t *cell = &cl[(pos + j) & mask];
            /* acquire: pairs with the producer's publish of the item. */
            seq = __atomic_load_n(&cell->seq, __ATOMIC_ACQUIRE);
            if (seq != pos + j + 1)
                break;
            /* Copy before claiming: valid if our CAS succeeds, since the cell
             * cannot be released and refilled before deq moves past it.
             * relaxed: only the producer's seq release orders it. */
            r->items[base + j] = __atomic_load_n(&cell->item, __ATOMIC_RELAXED);
            j++;
        }
        if (j == 0) {
            if ((int64_t)(seq - (pos + 1)) < 0) {
                if (tried) /* release: drop a stale, failed intent */
                    __atomic_store_n(&r->state, 0, __ATOMIC_RELEASE);
                return 0; /* not published yet: empty */
            }
            /* acquire: we were behind; take the new word. */
            w = __atomic_load_n(&q->deq, __ATOMIC_ACQUIRE);
            continue;
        }
        if (owner != 0 && owner - 1 != c)
            mark_owned(q, owner - 1, pos);
        r->intent_base = base;
        tried = 1;
        /* release: the item copies and intent_base are in memory before the
         * intent is (for mark_owned and repair readers). */
        __atomic_store_n(&r->state, ST_MAKE(SHARDC_QUEUE_CLAIMING, pos, j),
                         __ATOMIC_RELEASE);
        /* seq_cst CAS: the claim itself; orders the intent before it. */
        if (__atomic_compare_exchange_n(&q->deq, &w, W_MAKE(pos + j, c), 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)) {
            /* release: repair must see OWNED if it no longer sees our deq. */
            __atomic_store_n(&r->state, ST_MAKE(SHARDC_QUEUE_OWNED, pos, j),
                             __ATOMIC_RELEASE);
            for (uint32_t i = 0; i < j; i++)
                /* release: our item reads happen before the producer of the
                 * next lap overwrites the cell. */
                __atomic_store_n(&cl[(pos + i) & mask].seq, pos + i + cap,
                                 __ATOMIC_RELEASE);
            memcpy(out, &r->items[base], (size_t)j * 8);
            /* release: nclaimed covers the items before the state says the
             * claim is committed (repair uses intent_base + k while OWNED). */
            __atomic_store_n(&r->nclaimed, base + j, __ATOMIC_RELEASE);
            __atomic_store_n(&r->state, ST_MAKE(SHARDC_QUEUE_IDLE, 0, 0),
                             __ATOMIC_RELEASE);
            wake_producers(q);
            return (int)j;
        }
        /* The failed CAS reloaded w (acquire): retry from the new position. */
    }
}

/* Closed and every claimed enqueue position already dequeued. */
static int drained(qhdr_t *q)
{
    /* acquire on both: see close() and the latest claims. */
    uint64_t e = __atomic_load_n(&q->enq, __ATOMIC_ACQUIRE);
    uint64_t w = __atomic_load_n(&q->deq, __ATOMIC_ACQUIRE);
    return (e & CLOSED_BIT) && W_POS(w) == (e & ~CLOSED_BIT);
}

static int can_pop(qhdr_t *q)
{
    /* acquire: a fresh dequeue position after the parker's fence. */
    uint64_t w = __atomic_load_n(&q->deq, __ATOMIC_ACQUIRE);
    uint64_t pos = W_POS(w);
    /* acquire: published cell. */
    uint64_t seq = __atomic_load_n(&cells(q)[pos & (q->capacity - 1)].seq,
                                   __ATOMIC_ACQUIRE);
    /* relaxed: CLOSED is re-read with a fence before us in the parker. */
    return seq == pos + 1 || (__atomic_load_n(&q->enq, __ATOMIC_RELAXED) & CLOSED_BIT);
}

static int park_consumer(qhdr_t *q, uint32_t c, int64_t deadline)
{
    uint64_t bit = 1ULL << (c % 64), *word = &q->sleepers[c / 64];
    uint32_t seq;
    int r = 0;
    /* seq_cst: set our bit before the re-check (Dekker with
     * wake_consumers/close); the fence orders the loads below after it. */
    __atomic_fetch_or(word, bit, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    /* acquire: read seq before re-checking so a later bump fails the wait. */
    seq = __atomic_load_n(&q->items_seq, __ATOMIC_ACQUIRE);
    if (!can_pop(q)) {
        /* relaxed: a statistic. */
        __atomic_fetch_add(&q->parks, 1, __ATOMIC_RELAXED);
        r = shardc__wait_u32(&q->items_seq, seq, sleep_for(deadline));
    }
    /* release: done sleeping; producers may skip the wake from now on. */
    __atomic_fetch_and(word, ~bit, __ATOMIC_RELEASE);
    return r;
}

/* Only the record's owner bumps its heartbeat, so no locked RMW is needed;
 * relaxed (both): the master only samples it for liveness. */
static void bump_heartbeat(qrec_t *r)
{
    __atomic_store_n(&r->heartbeat, __atomic_load_n(&r->heartbeat, __ATOMIC_RELAXED) + 1,
                     __ATOMIC_RELAXED);
}

static int check_consumer(qhdr_t *q, uint32_t c)
{
    return q != NULL && c < q->max_consumers;
}

int shardc_queue_pop(void *mem, uint32_t consumer, uint64_t *out, uint32_t max,
                     int64_t timeout_ns)
{
    qhdr_t *q = hdr(mem);
    qrec_t *r;
    int64_t deadline, spin_end = 0;
    uint32_t iter = 0, room;

    if (!check_consumer(q, consumer) || out == NULL || max == 0)
        return -EINVAL;
    r = rec(q, consumer);
    bump_heartbeat(r);
    room = SHARDC_QUEUE_MAX_CLAIM - r->nclaimed;
    if (room == 0)
        return -ENOBUFS;
    if (max > room)
        max = room;
    deadline = timeout_ns < 0 ? -1 : INT64_MAX; /* set on the first miss */
    for (;;) {
        int n = try_pop(q, consumer, out, max), w;
        if (n > 0)
            return n;
        if (drained(q))
            return -EPIPE;
        if (deadline == INT64_MAX)
            deadline = shardc__deadline_ns(timeout_ns);
        if (deadline >= 0 && shardc__now_ns() >= deadline)
            return -ETIMEDOUT;
        if (keep_spinning(q, &spin_end, &iter))
            continue;
        w = park_consumer(q, consumer, deadline);
        if (w == -EINTR)
            return -EINTR;
    }
}

int shardc_queue_done(void *mem, uint32_t consumer)
{
    qhdr_t *q = hdr(mem);
    qrec_t *r;
    if (!check_consumer(q, consumer))
        return -EINVAL;
    r = rec(q, consumer);
    /* release: the work on the items (e.g. writes to output buffers) is in
     * memory before the master can see them as no longer claimed. */
    __atomic_store_n(&r->nclaimed, 0, __ATOMIC_RELEASE);
    bump_heartbeat(r);
    return 0;
}

int shardc_queue_heartbeat(void *mem, uint32_t consumer)
{
    qhdr_t *q = hdr(mem);
    if (!check_consumer(q, consumer))
        return -EINVAL;
    bump_heartbeat(rec(q, consumer));
    return 0;
}

/* ---------------------------------------------------- records, repair */

int shardc_queue_register(void *mem, uint32_t consumer, int32_t pid)
{
    qhdr_t *q = hdr(mem);
    qrec_t *r;
    if (!check_consumer(q, consumer) || pid < 0)
        return -EINVAL;
    r = rec(q, consumer);
    /* acquire: the previous owner's (or repair's) last writes. */
    if (__atomic_load_n(&r->nclaimed, __ATOMIC_ACQUIRE) != 0 ||
        ST_KIND(__atomic_load_n(&r->state, __ATOMIC_ACQUIRE)) != SHARDC_QUEUE_IDLE)
        return -EBUSY; /* holds claims: repair it first */
    /* relaxed: the new owner is forked/started after this call. */
    __atomic_store_n(&r->pid, pid, __ATOMIC_RELAXED);
    __atomic_store_n(&r->heartbeat, 0, __ATOMIC_RELAXED);
    return 0;
}

/* May the caller, who reaped reaped_pid, repair a record registered to
 * pid?  Only the caller's word counts: no kill(pid, 0), which after the
 * reap may find an unrelated process that reuses the pid. */
static int repair_allowed(int32_t pid, int32_t reaped_pid)
{
    if (pid == 0)
        return 1; /* never registered, or repaired already */
    if (pid == (int32_t)getpid())
        return 0; /* the caller itself: certainly alive */
    return reaped_pid == SHARDC_QUEUE_ANY_PID || reaped_pid == pid;
}

int shardc_queue_repair(void *mem, uint32_t consumer, int32_t reaped_pid,
                        uint64_t *out, uint32_t max)
{
    qhdr_t *q = hdr(mem);
    qrec_t *r;
    uint64_t w, s, pos, cap;
    uint32_t k, kind, total;
    int owned = 0;

    if (!check_consumer(q, consumer) || (out == NULL && max > 0) ||
        reaped_pid < SHARDC_QUEUE_ANY_PID)
        return -EINVAL;
    r = rec(q, consumer);
    /* relaxed: register() stored it in a process the caller has reaped (the
     * reap orders that process's writes before us) or in the caller. */
    if (!repair_allowed(__atomic_load_n(&r->pid, __ATOMIC_RELAXED), reaped_pid))
        return -EBUSY; /* registered to a process the caller did not reap */
    /* acquire, and deq strictly before state: a successor marks OWNED before
     * moving deq, so seeing deq moved implies seeing the mark. */
    w = __atomic_load_n(&q->deq, __ATOMIC_ACQUIRE);
    s = __atomic_load_n(&r->state, __ATOMIC_ACQUIRE);
    kind = ST_KIND(s);
    pos = ST_POS(s);
    k = ST_K(s);
    if (kind == SHARDC_QUEUE_OWNED)
        owned = 1;
    else if (kind == SHARDC_QUEUE_CLAIMING && w == W_MAKE(pos + k, consumer))
        owned = 1; /* the CAS happened and nobody moved past it yet */
    total = owned ? r->intent_base + k : r->nclaimed;
    if (total > max)
        return -ENOBUFS;
    if (owned) {
        qcell_t *cl = cells(q);
        cap = q->capacity;
        for (uint32_t i = 0; i < k; i++) {
            uint64_t expect = pos + i + 1;
            /* seq_cst CAS: release the cell if the dead consumer had not;
             * its value proves nobody else touched it. */
            __atomic_compare_exchange_n(&cl[(pos + i) & (cap - 1)].seq, &expect,
                                        pos + i + cap, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED);
        }
    }
    memcpy(out, r->items, (size_t)total * 8);
    /* release (all three): the record is clean before anyone registers it. */
    __atomic_store_n(&r->nclaimed, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&r->state, ST_MAKE(SHARDC_QUEUE_IDLE, 0, 0), __ATOMIC_RELEASE);
    __atomic_store_n(&r->pid, 0, __ATOMIC_RELEASE);
    /* release: a dead sleeper must not keep wakers issuing FUTEX_WAKE. */
    __atomic_fetch_and(&q->sleepers[consumer / 64], ~(1ULL << (consumer % 64)),
                       __ATOMIC_RELEASE);
    /* relaxed: a statistic. */
    __atomic_fetch_add(&q->repaired, total, __ATOMIC_RELAXED);
    /* Always: the dead consumer may have released its cells but died before
     * its own wake_producers(), leaving a producer asleep. */
    wake_producers(q);
    return (int)total;
}

int shardc_queue_close(void *mem)
{
    qhdr_t *q = hdr(mem);
    if (q == NULL)
        return -EINVAL;
    /* seq_cst: after this no push CAS can succeed (same word), and sleepers
     * that set their bit before our bump see CLOSED in their re-check. */
    __atomic_fetch_or(&q->enq, CLOSED_BIT, __ATOMIC_SEQ_CST);
    /* release (both): bump the futex words so every sleeper's compare fails. */
    __atomic_fetch_add(&q->items_seq, 1, __ATOMIC_RELEASE);
    __atomic_fetch_add(&q->space_seq, 1, __ATOMIC_RELEASE);
    shardc__wake_u32(&q->items_seq, INT32_MAX);
    shardc__wake_u32(&q->space_seq, INT32_MAX);
    return 0;
}

/* sys.h's run-time switch to the polling wait (this process only; a forked
 * child starts with its parent's value). */
int shardc__portable_wait = 0;

int shardc_queue_set_portable_wait(int on)
{
    /* relaxed: a switch read at the start of each sleep; see sys.h. */
    return __atomic_exchange_n(&shardc__portable_wait, on != 0, __ATOMIC_RELAXED);
}

int shardc_queue_set_spin(void *mem, int64_t spin_ns)
{
    qhdr_t *q = hdr(mem);
    if (q == NULL)
        return -EINVAL;
    /* relaxed: a tunable read at the start of each wait. */
    __atomic_store_n(&q->spin_ns, spin_ns < 0 ? 0 : spin_ns, __ATOMIC_RELAXED);
    return 0;
}

int shardc_queue_stats(void *mem, shardc_queue_stats_t *out)
{
    qhdr_t *q = hdr(mem);
    uint64_t e, d;
    if (q == NULL || out == NULL)
        return -EINVAL;
    /* relaxed (all): a snapshot for diagnostics, not a consistent cut. */
    d = W_POS(__atomic_load_n(&q->deq, __ATOMIC_RELAXED));
    e = __atomic_load_n(&q->enq, __ATOMIC_RELAXED);
    out->capacity = q->capacity;
    out->max_consumers = q->max_consumers;
    out->pushed = e & ~CLOSED_BIT;
    out->popped = d;
    out->size = out->pushed > d ? out->pushed - d : 0;
    out->closed = (e & CLOSED_BIT) ? 1 : 0;
    out->parks = __atomic_load_n(&q->parks, __ATOMIC_RELAXED);
    out->wakes = __atomic_load_n(&q->wakes, __ATOMIC_RELAXED);
    out->repaired = __atomic_load_n(&q->repaired, __ATOMIC_RELAXED);
    out->spin_ns = __atomic_load_n(&q->spin_ns, __ATOMIC_RELAXED);
    return 0;
}

int shardc_queue_consumer(void *mem, uint32_t consumer,
                          shardc_queue_consumer_t *out)
{
    qhdr_t *q = hdr(mem);
    qrec_t *r;
    if (!check_consumer(q, consumer) || out == NULL)
        return -EINVAL;
    r = rec(q, consumer);
    /* relaxed (all): a diagnostic snapshot of another process's record. */
    out->pid = __atomic_load_n(&r->pid, __ATOMIC_RELAXED);
    out->state = ST_KIND(__atomic_load_n(&r->state, __ATOMIC_RELAXED));
    out->claimed = __atomic_load_n(&r->nclaimed, __ATOMIC_RELAXED);
    out->sleeping = (__atomic_load_n(&q->sleepers[consumer / 64], __ATOMIC_RELAXED) >>
                     (consumer % 64)) & 1;
    out->heartbeat = __atomic_load_n(&r->heartbeat, __ATOMIC_RELAXED);
    return 0;
}
