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
 *   -EBUSY      register/repair: the record is in use / its process is alive
 *   -EINVAL     bad argument or not an initialized ring
 */
#ifndef SHARDC_QUEUE_H
#define SHARDC_QUEUE_H

#include <stdint.h>

/* --- cdef begin --- */
#define SHARDC_QUEUE_MAX_CLAIM 256
#define SHARDC_QUEUE_MAX_CONSUMERS 1024
#define SHARDC_QUEUE_MAX_CAPACITY 1073741824

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

uint64_t shardc_queue_bytes(uint32_t capacity, uint32_t max_consumers);
int shardc_queue_init(void *mem, uint64_t memsize, uint32_t capacity,
                      uint32_t max_consumers);
int shardc_queue_check(void *mem, uint64_t memsize);
int shardc_queue_push(void *mem, const uint64_t *items, uint32_t n,
                      int64_t timeout_ns);
int shardc_queue_pop(void *mem, uint32_t consumer, uint64_t *out, uint32_t max,
                     int64_t timeout_ns);
int shardc_queue_done(void *mem, uint32_t consumer);
int shardc_queue_heartbeat(void *mem, uint32_t consumer);
int shardc_queue_register(void *mem, uint32_t consumer, int32_t pid);
int shardc_queue_repair(void *mem, uint32_t consumer, uint64_t *out,
                        uint32_t max);
int shardc_queue_close(void *mem);
int shardc_queue_set_spin(void *mem, int64_t spin_ns);
int shardc_queue_stats(void *mem, shardc_queue_stats_t *out);
int shardc_queue_consumer(void *mem, uint32_t consumer,
                          shardc_queue_consumer_t *out);
/* --- cdef end --- */

#endif /* SHARDC_QUEUE_H */
