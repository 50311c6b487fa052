/*
 * queue.h - the task ring: a bounded multi-producer multi-consumer ring of
 * 64-bit items that lives entirely inside caller-provided memory (a memfd
 * segment mapped MAP_SHARED into the master and every forked worker).
 *
 * The ring is addressed by the base pointer of its memory in each process;
 * its layout is private to queue.c (see the comment at the top there) and
 * Python only ever calls these functions.  Every function returns 0 or a
 * count on success and -errno on failure:
 *   -ETIMEDOUT  the wait ran out (nothing was pushed / claimed)
 *   -EPIPE      push: the ring is closed; pop: closed and drained
 *   -EINTR      a signal handler ran while parked (nothing claimed): retry
 *   -ENOBUFS    pop: the consumer's claim record is full, call done() first
 *   -EBUSY      register: the record holds claims; repair: the record is
 *               registered to another process than the one reaped
 *   -EINVAL     bad argument or not an initialized ring
 */
#ifndef SHARDC_QUEUE_H
#define SHARDC_QUEUE_H

#include <stdint.h>

/* --- cdef begin --- */
#define SHARDC_QUEUE_MAX_CLAIM 256
#define SHARDC_QUEUE_MAX_CONSUMERS 1024
#define SHARDC_QUEUE_MAX_CAPACITY 1073741824

/* shardc_queue_repair(reaped_pid): the caller vouches that whichever
 * process registered the record is gone (reaped). */
#define SHARDC_QUEUE_ANY_PID -1

/* Consumer record states reported by shardc_queue_consumer(). */
#define SHARDC_QUEUE_IDLE 0
#define SHARDC_QUEUE_CLAIMING 1
#define SHARDC_QUEUE_OWNED 2

typedef struct {
    uint64_t capacity;      /* number of cells (a power of two) */
    uint64_t max_consumers; /* number of consumer records */
    uint64_t pushed;        /* items ever pushed (enqueue position) */
    uint64_t popped;        /* items ever claimed (dequeue position) */
    uint64_t size;          /* pushed - popped: items waiting in the ring */
    uint64_t closed;        /* 1 once shardc_queue_close() ran */
    uint64_t parks;         /* futex sleeps (consumers and producers) */
    uint64_t wakes;         /* futex wake calls issued */
    uint64_t repaired;      /* items handed back by shardc_queue_repair() */
    int64_t spin_ns;        /* spin budget before parking */
} shardc_queue_stats_t;

typedef struct {
    int32_t pid;        /* registered process, 0 if none */
    uint32_t state;     /* SHARDC_QUEUE_IDLE / _CLAIMING / _OWNED */
    uint32_t claimed;   /* items popped and not yet done() */
    uint32_t sleeping;  /* 1 while parked on the futex */
    uint64_t heartbeat; /* bumped by every pop/done/heartbeat call */
} shardc_queue_consumer_t;

/* Bytes needed for a ring; 0 if capacity is not a power of two in
 * [2, MAX_CAPACITY] or max_consumers is not in [1, MAX_CONSUMERS]. */
uint64_t shardc_queue_bytes(uint32_t capacity, uint32_t max_consumers);
/* Lay out a ring in mem (64-byte aligned, memsize >= shardc_queue_bytes()). */
int shardc_queue_init(void *mem, uint64_t memsize, uint32_t capacity,
                      uint32_t max_consumers);
/* 0 if mem holds an initialized ring that fits in memsize (for attach). */
int shardc_queue_check(void *mem, uint64_t memsize);
/* Push n items, waiting for space up to timeout_ns (< 0: no limit, 0: only
 * what fits).  Returns the count pushed (fewer than n only if the time ran
 * out or the ring was closed part-way), or -ETIMEDOUT / -EPIPE / -EINTR when
 * nothing was pushed. */
int shardc_queue_push(void *mem, const uint64_t *items, uint32_t n,
                      int64_t timeout_ns);
/* Claim 1..max items (all that are ready, in ring order) as `consumer`,
 * waiting up to timeout_ns for the first.  They stay claimed in the
 * consumer's record until shardc_queue_done().  Returns the count, or
 * -ETIMEDOUT, -EPIPE (closed and drained), -EINTR, -ENOBUFS (the record
 * already holds SHARDC_QUEUE_MAX_CLAIM items). */
int shardc_queue_pop(void *mem, uint32_t consumer, uint64_t *out, uint32_t max,
                     int64_t timeout_ns);
/* The consumer finished everything it popped: drop its claims. */
int shardc_queue_done(void *mem, uint32_t consumer);
/* Bump the consumer's heartbeat (only its owner process calls this). */
int shardc_queue_heartbeat(void *mem, uint32_t consumer);
/* Record the process using `consumer` (pid 0: unknown).  -EBUSY while the
 * record holds claims: a slot whose process died must be repaired first. */
int shardc_queue_register(void *mem, uint32_t consumer, int32_t pid);
/* After the consumer's process died and the caller reaped it (waitpid
 * returned reaped_pid): release whatever it still held in the ring and copy
 * its claimed, unfinished items to out (for requeueing).  Liveness is the
 * caller's word, never probed: once reaped, the pid may already belong to
 * an unrelated process.  reaped_pid is the pid the caller reaped, or
 * SHARDC_QUEUE_ANY_PID for "whoever registered it is gone".  Returns the
 * count; -EBUSY if the record is registered to another pid than reaped_pid
 * (a successor took it over) or to the calling process itself; -ENOBUFS if
 * max is too small (nothing changed).  Idempotent (a repaired record is
 * unregistered: pid 0). */
int shardc_queue_repair(void *mem, uint32_t consumer, int32_t reaped_pid,
                        uint64_t *out, uint32_t max);
/* Close: wake every waiter; pushes then fail with -EPIPE, pops drain what is
 * left and then return -EPIPE.  Idempotent. */
int shardc_queue_close(void *mem);
/* Park with the polling wait instead of futex/ulock in this process (and
 * its children forked later); wakes are still sent.  Returns the previous
 * setting.  SHARDC_PORTABLE=1 turns it on. */
int shardc_queue_set_portable_wait(int on);
/* How long waits spin before parking, for every process (default 10 us). */
int shardc_queue_set_spin(void *mem, int64_t spin_ns);
int shardc_queue_stats(void *mem, shardc_queue_stats_t *out);
int shardc_queue_consumer(void *mem, uint32_t consumer,
                          shardc_queue_consumer_t *out);
/* --- cdef end --- */

#endif /* SHARDC_QUEUE_H */
