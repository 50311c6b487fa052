/* test_queue_threads.c - the task ring with threads in the roles of the master
 * and the workers, small enough to run under ThreadSanitizer (which cannot
 * see across processes, so test_queue.c's forked stress tests tell it
 * nothing).  Producers and consumers are threads sharing one ring; every item
 * is delivered exactly once and in order per producer; parked consumers and
 * producers are woken by pushes, pops and close; huge timeouts and spin
 * budgets neither overflow (UBSan) nor turn into a deadline in the past.
 * Built in every variant; tests/c/Makefile lists it in TSAN_TESTS. */
#define _GNU_SOURCE
#include "harness.h"
#include "queue.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define ITEM(p, s) (((uint64_t)(p) << 40) | (uint64_t)(s))

static void *new_ring(uint32_t cap, uint32_t nc)
{
    uint64_t size = shardc_queue_bytes(cap, nc);
    void *q;

    CHECK(size > 0);
    q = aligned_alloc(64, (size_t)((size + 63) / 64 * 64));
    CHECK(q != NULL);
    CHECK_RC(shardc_queue_init(q, size, cap, nc));
    return q;
}

static void nap_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

enum { P = 2, C = 3, CAP = 64 };
static const uint64_t PER = 20000;

struct role {
    void *q;
    int index;
    _Atomic uint8_t *seen;
    _Atomic uint64_t *errors;
};

/* A producer thread: pushes PER items in batches of varying size. */
static void *producer(void *arg)
{
    struct role *r = arg;
    uint64_t buf[16], s = 0;
    uint32_t batch = 1 + (uint32_t)r->index * 7;

    while (s < PER) {
        uint32_t k = 0;
        int n;
        while (k < batch && s + k < PER) {
            buf[k] = ITEM(r->index, s + k);
            k++;
        }
        n = shardc_queue_push(r->q, buf, k, 10000000000LL);
        if (n <= 0) {
            atomic_fetch_add(r->errors, 1);
            return NULL;
        }
        s += (uint64_t)n;
    }
    return NULL;
}

/* A consumer thread: pops until the ring is closed and drained. */
static void *consumer(void *arg)
{
    struct role *r = arg;
    uint64_t out[32], last[P];
    uint32_t batch = 1 + (uint32_t)r->index * 10;
    int p;

    for (p = 0; p < P; p++)
        last[p] = UINT64_MAX;
    for (;;) {
        int n = shardc_queue_pop(r->q, (uint32_t)r->index, out, batch, 10000000000LL), i;
        if (n == -EPIPE)
            return NULL;
        if (n <= 0) {
            atomic_fetch_add(r->errors, 1);
            return NULL;
        }
        for (i = 0; i < n; i++) {
            uint64_t pi = out[i] >> 40, s = out[i] & ((1ULL << 40) - 1);
            if (pi >= P || s >= PER || (last[pi] != UINT64_MAX && s <= last[pi]))
                atomic_fetch_add(r->errors, 1);
            else
                atomic_fetch_add(&r->seen[pi * PER + s], 1);
            if (pi < P)
                last[pi] = s;
        }
        CHECK_RC(shardc_queue_done(r->q, (uint32_t)r->index));
    }
}

/* P producer and C consumer threads on a small ring (so both sides park):
 * every item is claimed exactly once, in order per producer. */
static void test_threads_exactly_once(void)
{
    void *q = new_ring(CAP, C);
    _Atomic uint8_t *seen = calloc((size_t)(P * PER), 1);
    _Atomic uint64_t errors = 0;
    struct role roles[P + C];
    pthread_t th[P + C];
    shardc_queue_stats_t st;
    int i;

    CHECK(seen != NULL);
    for (i = 0; i < P + C; i++) {
        roles[i].q = q;
        roles[i].index = i < C ? i : i - C;
        roles[i].seen = seen;
        roles[i].errors = &errors;
        CHECK(pthread_create(&th[i], NULL, i < C ? consumer : producer, &roles[i]) == 0);
    }
    for (i = C; i < P + C; i++)
        CHECK(pthread_join(th[i], NULL) == 0);
    CHECK_RC(shardc_queue_close(q));
    for (i = 0; i < C; i++)
        CHECK(pthread_join(th[i], NULL) == 0);
    CHECK(atomic_load(&errors) == 0);
    for (uint64_t k = 0; k < (uint64_t)P * PER; k++)
        CHECK(seen[k] == 1);
    CHECK_RC(shardc_queue_stats(q, &st));
    CHECK(st.pushed == (uint64_t)P * PER && st.popped == st.pushed && st.size == 0);
    free((void *)seen);
    free(q);
}

struct waiter {
    void *q;
    _Atomic int result;
    _Atomic int started;
};

static void *pop_forever(void *arg)
{
    struct waiter *w = arg;
    uint64_t item;

    atomic_store(&w->started, 1);
    atomic_store(&w->result, shardc_queue_pop(w->q, 0, &item, 1, INT64_MAX));
    return NULL;
}

static void *push_forever(void *arg)
{
    struct waiter *w = arg;
    uint64_t item = 7;

    atomic_store(&w->started, 1);
    atomic_store(&w->result, shardc_queue_push(w->q, &item, 1, INT64_MAX));
    return NULL;
}

/* A timeout of INT64_MAX ns ("forever") and a spin budget of INT64_MAX: the
 * deadline saturates instead of overflowing (UBSan aborts on the overflow;
 * without UBSan it wrapped to a deadline in the past), so the waiter really
 * waits and is released by the other side. */
static void test_huge_timeouts(void)
{
    void *q = new_ring(2, 1);
    struct waiter w = {.q = q};
    uint64_t items[2] = {1, 2}, out[2];
    pthread_t th;
    int pass;

    for (pass = 0; pass < 2; pass++) {
        /* pass 1: spin instead of parking, for "forever". */
        CHECK_RC(shardc_queue_set_spin(q, pass ? INT64_MAX : 10000));
        atomic_store(&w.result, -1000);
        atomic_store(&w.started, 0);
        CHECK(pthread_create(&th, NULL, pop_forever, &w) == 0);
        while (!atomic_load(&w.started))
            nap_ms(1);
        nap_ms(20);
        CHECK(atomic_load(&w.result) == -1000); /* still waiting */
        CHECK(shardc_queue_push(q, items, 1, 0) == 1);
        CHECK(pthread_join(th, NULL) == 0);
        CHECK(atomic_load(&w.result) == 1);
        CHECK_RC(shardc_queue_done(q, 0));

        /* A full ring: the producer waits "forever" until a pop. */
        CHECK(shardc_queue_push(q, items, 2, 0) == 2);
        atomic_store(&w.result, -1000);
        atomic_store(&w.started, 0);
        CHECK(pthread_create(&th, NULL, push_forever, &w) == 0);
        while (!atomic_load(&w.started))
            nap_ms(1);
        nap_ms(20);
        CHECK(atomic_load(&w.result) == -1000);
        CHECK(shardc_queue_pop(q, 0, out, 2, 0) == 2);
        CHECK_RC(shardc_queue_done(q, 0));
        CHECK(pthread_join(th, NULL) == 0);
        CHECK(atomic_load(&w.result) == 1);
        CHECK(shardc_queue_pop(q, 0, out, 2, 0) == 1 && out[0] == 7);
        CHECK_RC(shardc_queue_done(q, 0));
    }
    /* close() releases a "forever" waiter with -EPIPE. */
    CHECK_RC(shardc_queue_set_spin(q, 10000));
    atomic_store(&w.result, -1000);
    atomic_store(&w.started, 0);
    CHECK(pthread_create(&th, NULL, pop_forever, &w) == 0);
    while (!atomic_load(&w.started))
        nap_ms(1);
    nap_ms(10);
    CHECK_RC(shardc_queue_close(q));
    CHECK(pthread_join(th, NULL) == 0);
    CHECK(atomic_load(&w.result) == -EPIPE);
    free(q);
}

int main(void)
{
    alarm(100);
    RUN(test_huge_timeouts);
    RUN(test_threads_exactly_once);
    return 0;
}
