/* bench_ring.c - the task ring (csrc/queue.c).
 *
 *   ring_pushpop_1thread        push 1 + pop 1 + done, one thread, ns per pair.
 *                               Measures the uncontended fast path (CASes,
 *                               cell stores, record bookkeeping, fences); not
 *                               cross-core cache traffic.
 *   ring_pushpop_batch64_item   the same with batches of 64, ns per item.
 *   ring_stream_1p1c            1 producer process -> 1 consumer process,
 *                               batches of 64, items/s.  Measures throughput
 *                               with cache lines bouncing between two cores;
 *                               not what a consumer does with the items.
 *   ring_rtt_spin_p50/p99       master -> worker -> master round trip of one
 *                               item over two rings, both sides spinning: the
 *                               hand-off latency between running processes.
 *   ring_rtt_parked_p50/p99     the same with the worker parked on the futex
 *                               (spin 0 on the master->worker ring): includes
 *                               a futex wake and a context switch in; the
 *                               master still spins for the reply.
 */
#include "bench_common.h"

#include <stdlib.h>
#include "queue.h"

#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void *new_ring(uint32_t cap, uint32_t nc)
{
    uint64_t size = shardc_queue_bytes(cap, nc);
    void *q = bench_shared((size_t)size);
    if (shardc_queue_init(q, size, cap, nc) != 0)
        BENCH_DIE("init");
    return q;
}

static void bench_single_thread(void)
{
    void *q = new_ring(1024, 1);
    uint64_t x = 1, out[64], in[64];
    long n = bench_quick ? 2000000 : 10000000;
    int64_t t0;

    t0 = bench_now();
    for (long i = 0; i < n; i++) {
        x = (uint64_t)i;
        if (shardc_queue_push(q, &x, 1, 0) != 1 || shardc_queue_pop(q, 0, out, 1, 0) != 1)
            BENCH_DIE("push/pop");
        shardc_queue_done(q, 0);
    }
    bench_report("ring_pushpop_1thread", (double)(bench_now() - t0) / (double)n, "ns");

    for (int i = 0; i < 64; i++)
        in[i] = (uint64_t)i;
    t0 = bench_now();
    for (long i = 0; i < n / 64; i++) {
        if (shardc_queue_push(q, in, 64, 0) != 64 || shardc_queue_pop(q, 0, out, 64, 0) != 64)
            BENCH_DIE("batch push/pop");
        shardc_queue_done(q, 0);
    }
    bench_report("ring_pushpop_batch64_item", (double)(bench_now() - t0) / (double)(n / 64 * 64),
                 "ns");
}

static void bench_stream(void)
{
    void *q = new_ring(4096, 1);
    uint64_t n = bench_quick ? 20000000ULL : 100000000ULL;
    int64_t t0;
    pid_t pid;
    int st;

    pid = fork();
    if (pid == 0) {
        uint64_t out[64], sum = 0, got = 0;
        while (got < n) {
            int r = shardc_queue_pop(q, 0, out, 64, 5000000000LL);
            if (r <= 0)
                _exit(1);
            for (int i = 0; i < r; i++)
                sum += out[i];
            got += (uint64_t)r;
            shardc_queue_done(q, 0);
        }
        _exit(sum == n * (n - 1) / 2 ? 0 : 2);
    }
    t0 = bench_now();
    {
        uint64_t buf[64];
        for (uint64_t i = 0; i < n; i += 64) {
            uint32_t k = 0;
            while (k < 64 && i + k < n) {
                buf[k] = i + k;
                k++;
            }
            for (uint32_t done = 0; done < k;) {
                int r = shardc_queue_push(q, buf + done, k - done, 5000000000LL);
                if (r <= 0)
                    BENCH_DIE("stream push");
                done += (uint32_t)r;
            }
        }
    }
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        BENCH_DIE("stream consumer failed");
    bench_report("ring_stream_1p1c", (double)n / ((double)(bench_now() - t0) / 1e9), "items/s");
}

/* The worker side of the round-trip benchmarks: pop each item from a and
 * push it back on b, n times, then exit (never returns). */
static void echo_child(void *a, void *b, long n)
{
    uint64_t x;
    for (long i = 0; i < n; i++) {
        if (shardc_queue_pop(a, 0, &x, 1, 10000000000LL) != 1)
            _exit(1);
        shardc_queue_done(a, 0);
        if (shardc_queue_push(b, &x, 1, 10000000000LL) != 1)
            _exit(2);
    }
    _exit(0);
}

/* Round trips: the master pushes i on a, the worker pops it and pushes it on
 * b, the master pops it from b. */
static void bench_rtt(const char *name, int worker_parks)
{
    void *a = new_ring(2, 1), *b = new_ring(2, 1);
    int rounds = bench_quick ? 2000 : 20000;
    int64_t *lat = malloc(sizeof(int64_t) * (size_t)rounds);
    char label[64];
    pid_t pid;
    int st;

    shardc_queue_set_spin(a, worker_parks ? 0 : 2000000000LL);
    shardc_queue_set_spin(b, 2000000000LL);
    pid = fork();
    if (pid == 0)
        echo_child(a, b, rounds + 10);
    for (int i = 0; i < rounds + 10; i++) {
        uint64_t x = (uint64_t)i;
        int64_t t0;
        if (worker_parks) {
            /* Give the worker time to finish spinning (0 here) and sleep. */
            struct timespec ts = {0, 200000};
            nanosleep(&ts, NULL);
        }
        t0 = bench_now();
        if (shardc_queue_push(a, &x, 1, 10000000000LL) != 1 ||
            shardc_queue_pop(b, 0, &x, 1, 10000000000LL) != 1)
            BENCH_DIE("rtt");
        if (i >= 10)
            lat[i - 10] = bench_now() - t0;
        shardc_queue_done(b, 0);
    }
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        BENCH_DIE("rtt worker failed");
    snprintf(label, sizeof(label), "%s_p50", name);
    bench_report(label, (double)bench_quantile(lat, (size_t)rounds, 0.50) / 1e3, "us");
    snprintf(label, sizeof(label), "%s_p99", name);
    bench_report(label, (double)bench_quantile(lat, (size_t)rounds, 0.99) / 1e3, "us");
    free(lat);
}

/* Park/wake cycles: master and worker hand one item back and forth through
 * two rings with spinning turned off, so every hand-off parks the receiver on
 * the futex and needs a FUTEX_WAKE.  Every sleep in the ring is capped at
 * 200 ms, so a lost wake-up cannot hang but shows as a round trip of about
 * that long: round trips over 100 ms are counted as stalls (expected: 0).
 * Cycles: SHARDC_BENCH_WAKE_CYCLES, else 10^7 full (a few minutes), 10^5
 * with --quick.  Does not measure latency percentiles (bench_rtt does). */
static void bench_park_wake_cycles(void)
{
    void *a = new_ring(2, 1), *b = new_ring(2, 1);
    const char *env = getenv("SHARDC_BENCH_WAKE_CYCLES");
    long n = env ? atol(env) : (bench_quick ? 100000L : 10000000L);
    long stalls = 0;
    int64_t t_start, worst = 0;
    pid_t pid;
    int st;

    shardc_queue_set_spin(a, 0);
    shardc_queue_set_spin(b, 0);
    pid = fork();
    if (pid == 0)
        echo_child(a, b, n);
    t_start = bench_now();
    for (long i = 0; i < n; i++) {
        uint64_t x = (uint64_t)i;
        int64_t t0 = bench_now(), dt;
        if (shardc_queue_push(a, &x, 1, 10000000000LL) != 1 ||
            shardc_queue_pop(b, 0, &x, 1, 10000000000LL) != 1 || x != (uint64_t)i)
            BENCH_DIE("park/wake cycle");
        shardc_queue_done(b, 0);
        dt = bench_now() - t0;
        if (dt > 100000000LL)
            stalls++;
        if (dt > worst)
            worst = dt;
    }
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        BENCH_DIE("park/wake worker failed");
    bench_report("ring_park_wake_cycles", (double)n, "cycles");
    bench_report("ring_park_wake_stalls", (double)stalls, "count");
    bench_report("ring_park_wake_worst", (double)worst / 1e3, "us");
    bench_report("ring_park_wake_mean", (double)(bench_now() - t_start) / (double)n / 1e3, "us");
}

int main(int argc, char **argv)
{
    bench_args(argc, argv);
    bench_single_thread();
    bench_stream();
    bench_rtt("ring_rtt_spin", 0);
    bench_rtt("ring_rtt_parked", 1);
    bench_park_wake_cycles();
    return 0;
}
