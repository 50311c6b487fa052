/* test_queue.c - the task ring: single-process semantics (FIFO, full/empty,
 * batches, timeouts, close/drain, claims and repair), then forked stress:
 * MPMC exactly-once, SIGKILLed consumers repaired and requeued with nothing
 * lost or delivered twice, and no lost wake-ups over many park/wake cycles. */
#define _GNU_SOURCE
#include "harness.h"
#include "queue.h"

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define SCALE 8 /* sanitizers are ~5-10x slower: do less work */
#else
#define SCALE 1
#endif

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Anonymous MAP_SHARED memory: shared with forked children like a segment. */
static void *shared(uint64_t size)
{
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(p != MAP_FAILED);
    return p;
}

static void *new_ring(uint32_t cap, uint32_t nc, uint64_t *size_out)
{
    uint64_t size = shardc_queue_bytes(cap, nc);
    void *q;
    CHECK(size > 0);
    q = shared(size);
    CHECK_RC(shardc_queue_init(q, size, cap, nc));
    if (size_out)
        *size_out = size;
    return q;
}

static void free_ring(void *q, uint32_t cap, uint32_t nc)
{
    munmap(q, (size_t)shardc_queue_bytes(cap, nc));
}

/* Bad sizes, unaligned or uninitialized memory are rejected with -errno. */
static void test_arguments(void)
{
    uint64_t size;
    void *q;
    uint64_t x = 1;
    CHECK(shardc_queue_bytes(3, 1) == 0);
    CHECK(shardc_queue_bytes(1, 1) == 0);
    CHECK(shardc_queue_bytes(8, 0) == 0);
    CHECK(shardc_queue_bytes(8, SHARDC_QUEUE_MAX_CONSUMERS + 1) == 0);
    size = shardc_queue_bytes(8, 2);
    q = shared(size);
    CHECK(shardc_queue_push(q, &x, 1, 0) == -EINVAL); /* not initialized */
    CHECK(shardc_queue_check(q, size) == -EINVAL);
    CHECK(shardc_queue_init(q, size - 1, 8, 2) == -ENOSPC);
    CHECK(shardc_queue_init((char *)q + 8, size, 8, 2) == -EINVAL);
    CHECK_RC(shardc_queue_init(q, size, 8, 2));
    CHECK_RC(shardc_queue_check(q, size));
    CHECK(shardc_queue_check(q, size - 1) == -ENOSPC);
    CHECK(shardc_queue_pop(q, 2, &x, 1, 0) == -EINVAL);
    CHECK(shardc_queue_pop(q, 0, &x, 0, 0) == -EINVAL);
    munmap(q, (size_t)size);
}

/* Items come out in push order, in batches of any size, across many laps;
 * a full ring refuses (partially) and an empty one times out. */
static void test_fifo_full_empty(void)
{
    uint64_t in[64], out[64];
    uint64_t next_in = 0, next_out = 0;
    void *q = new_ring(16, 1, NULL);
    shardc_queue_stats_t st;

    CHECK(shardc_queue_pop(q, 0, out, 4, 0) == -ETIMEDOUT);
    for (int i = 0; i < 16; i++)
        in[i] = next_in++;
    CHECK(shardc_queue_push(q, in, 16, 0) == 16);
    CHECK(shardc_queue_push(q, in, 1, 0) == -ETIMEDOUT); /* full */
    CHECK(shardc_queue_pop(q, 0, out, 5, 0) == 5);
    for (int i = 0; i < 5; i++)
        CHECK(out[i] == next_out++);
    CHECK_RC(shardc_queue_done(q, 0));
    for (int i = 0; i < 8; i++)
        in[i] = next_in++;
    CHECK(shardc_queue_push(q, in, 8, 0) == 5); /* partial: 5 free cells */
    next_in -= 3;
    /* Many laps with odd batch sizes: order is preserved across the wrap. */
    for (int round = 0; round < 2000; round++) {
        int want = 1 + round % 13, got;
        for (int i = 0; i < want; i++)
            in[i] = next_in + (uint64_t)i;
        got = shardc_queue_push(q, in, (uint32_t)want, 0);
        if (got > 0)
            next_in += (uint64_t)got;
        got = shardc_queue_pop(q, 0, out, (uint32_t)(1 + round % 7), 0);
        CHECK(got > 0);
        for (int i = 0; i < got; i++)
            CHECK(out[i] == next_out++);
        CHECK_RC(shardc_queue_done(q, 0));
    }
    while (next_out < next_in) {
        int got = shardc_queue_pop(q, 0, out, 64, 0);
        CHECK(got > 0);
        for (int i = 0; i < got; i++)
            CHECK(out[i] == next_out++);
        CHECK_RC(shardc_queue_done(q, 0));
    }
    CHECK(shardc_queue_pop(q, 0, out, 4, 0) == -ETIMEDOUT);
    CHECK_RC(shardc_queue_stats(q, &st));
    CHECK(st.pushed == next_in && st.popped == next_out && st.size == 0);
    CHECK(st.capacity == 16 && st.closed == 0);
    free_ring(q, 16, 1);
}

/* A timed wait lasts about its timeout, on both the empty and full sides. */
static void test_timeouts(void)
{
    uint64_t x[2] = {1, 2};
    void *q = new_ring(2, 1, NULL);
    int64_t t0 = now_ns();
    CHECK(shardc_queue_pop(q, 0, x, 1, 30000000) == -ETIMEDOUT);
    CHECK(now_ns() - t0 >= 30000000);
    CHECK(now_ns() - t0 < 1000000000);
    CHECK(shardc_queue_push(q, x, 2, 0) == 2);
    t0 = now_ns();
    CHECK(shardc_queue_push(q, x, 1, 30000000) == -ETIMEDOUT);
    CHECK(now_ns() - t0 >= 30000000);
    CHECK(now_ns() - t0 < 1000000000);
    free_ring(q, 2, 1);
}

/* After close, pushes fail with -EPIPE, pops drain what is left and then
 * report -EPIPE; close is idempotent. */
static void test_close_drain(void)
{
    uint64_t in[3] = {7, 8, 9}, out[8];
    void *q = new_ring(8, 1, NULL);
    shardc_queue_stats_t st;
    CHECK(shardc_queue_push(q, in, 3, 0) == 3);
    CHECK_RC(shardc_queue_close(q));
    CHECK_RC(shardc_queue_close(q));
    CHECK(shardc_queue_push(q, in, 1, -1) == -EPIPE);
    CHECK(shardc_queue_pop(q, 0, out, 2, -1) == 2);
    CHECK(out[0] == 7 && out[1] == 8);
    CHECK(shardc_queue_pop(q, 0, out, 8, -1) == 1);
    CHECK(out[0] == 9);
    CHECK(shardc_queue_pop(q, 0, out, 8, -1) == -EPIPE);
    CHECK_RC(shardc_queue_stats(q, &st));
    CHECK(st.closed == 1 && st.size == 0);
    free_ring(q, 8, 1);
}

/* close() wakes a producer parked on a full ring and a consumer parked on
 * an empty one, even with no timeout. */
static void test_close_wakes_sleepers(void)
{
    void *q = new_ring(2, 2, NULL);
    uint64_t x[2] = {1, 2};
    pid_t pid;
    int st;
    CHECK_RC(shardc_queue_set_spin(q, 0));
    CHECK(shardc_queue_push(q, x, 2, 0) == 2);
    pid = fork();
    if (pid == 0) {
        alarm(10);
        _exit(shardc_queue_push(q, x, 1, -1) == -EPIPE ? 0 : 3);
    }
    usleep(50000); /* let it park (the test is correct either way) */
    CHECK_RC(shardc_queue_close(q));
    CHECK(waitpid(pid, &st, 0) == pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    free_ring(q, 2, 2);

    q = new_ring(2, 2, NULL);
    CHECK_RC(shardc_queue_set_spin(q, 0));
    pid = fork();
    if (pid == 0) {
        uint64_t out[1];
        alarm(10);
        _exit(shardc_queue_pop(q, 1, out, 1, -1) == -EPIPE ? 0 : 3);
    }
    usleep(50000);
    CHECK_RC(shardc_queue_close(q));
    CHECK(waitpid(pid, &st, 0) == pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    free_ring(q, 2, 2);
}

/* Pops without done() accumulate claims up to SHARDC_QUEUE_MAX_CLAIM; done()
 * clears them; register refuses a record that holds claims; repair refuses a
 * record registered to the caller or to another pid than the one it reaped,
 * and hands the claims of a reaped one back. */
static void test_claims_and_repair(void)
{
    enum { CAP = 1024 };
    static uint64_t in[CAP], out[CAP];
    void *q = new_ring(CAP, 3, NULL);
    shardc_queue_consumer_t ci;
    pid_t pid;
    int st, got = 0;

    for (int i = 0; i < CAP; i++)
        in[i] = (uint64_t)i;
    CHECK(shardc_queue_push(q, in, CAP, 0) == CAP);
    CHECK_RC(shardc_queue_register(q, 0, 0));
    while (got < SHARDC_QUEUE_MAX_CLAIM) {
        int r = shardc_queue_pop(q, 0, out + got, 100, 0);
        CHECK(r > 0);
        got += r;
    }
    CHECK(got == SHARDC_QUEUE_MAX_CLAIM); /* clipped to the record's room */
    CHECK(shardc_queue_pop(q, 0, out, 1, 0) == -ENOBUFS);
    CHECK_RC(shardc_queue_consumer(q, 0, &ci));
    CHECK(ci.claimed == SHARDC_QUEUE_MAX_CLAIM && ci.state == SHARDC_QUEUE_IDLE);
    CHECK(shardc_queue_register(q, 0, 0) == -EBUSY);
    CHECK(shardc_queue_repair(q, 0, SHARDC_QUEUE_ANY_PID, out, 10) == -ENOBUFS);
    CHECK(shardc_queue_repair(q, 0, -2, out, CAP) == -EINVAL);
    CHECK(shardc_queue_repair(q, 0, SHARDC_QUEUE_ANY_PID, out, CAP) == SHARDC_QUEUE_MAX_CLAIM);
    for (int i = 0; i < SHARDC_QUEUE_MAX_CLAIM; i++)
        CHECK(out[i] == (uint64_t)i);
    CHECK(shardc_queue_repair(q, 0, SHARDC_QUEUE_ANY_PID, out, CAP) == 0); /* idempotent */

    /* done() clears claims: nothing to repair. */
    CHECK(shardc_queue_pop(q, 1, out, 10, 0) == 10);
    CHECK(out[0] == SHARDC_QUEUE_MAX_CLAIM);
    CHECK_RC(shardc_queue_done(q, 1));
    CHECK(shardc_queue_repair(q, 1, SHARDC_QUEUE_ANY_PID, out, CAP) == 0);

    /* A record registered to the caller itself (certainly alive) is refused. */
    CHECK_RC(shardc_queue_register(q, 1, getpid()));
    CHECK(shardc_queue_repair(q, 1, SHARDC_QUEUE_ANY_PID, out, CAP) == -EBUSY);
    CHECK(shardc_queue_repair(q, 1, getpid(), out, CAP) == -EBUSY);
    CHECK_RC(shardc_queue_register(q, 1, 0));

    /* A record registered to a live process other than the one the caller
     * reaped is refused; once that process is reaped it is repaired. */
    pid = fork();
    if (pid == 0) {
        uint64_t o[5];
        if (shardc_queue_register(q, 2, getpid()) != 0 ||
            shardc_queue_pop(q, 2, o, 5, 0) != 5)
            _exit(1);
        pause();
        _exit(0);
    }
    while (shardc_queue_consumer(q, 2, &ci) == 0 && ci.claimed != 5)
        usleep(1000);
    CHECK(shardc_queue_repair(q, 2, pid + 1, out, CAP) == -EBUSY);
    CHECK_RC(shardc_queue_consumer(q, 2, &ci));
    CHECK(ci.pid == pid && ci.claimed == 5); /* untouched */
    kill(pid, SIGKILL);
    CHECK(waitpid(pid, &st, 0) == pid);
    CHECK(shardc_queue_repair(q, 2, pid, out, CAP) == 5);
    CHECK(out[0] == SHARDC_QUEUE_MAX_CLAIM + 10);
    CHECK_RC(shardc_queue_consumer(q, 2, &ci));
    CHECK(ci.pid == 0 && ci.claimed == 0);
    free_ring(q, CAP, 3);
}

/* The pid of a reaped consumer is reused by a live, unrelated process
 * before the master repairs: repair takes the caller's word (it reaped that
 * pid) and does not probe the pid, so it still repairs.  The reuse is
 * simulated by a dead consumer that had registered a live process's pid. */
static void test_repair_reused_pid(void)
{
    enum { CAP = 16 };
    uint64_t in[4] = {7, 8, 9, 10}, out[CAP];
    void *q = new_ring(CAP, 2, NULL);
    shardc_queue_consumer_t ci;
    pid_t live = fork(), dead;
    int st;

    if (live == 0) {
        pause(); /* the "unrelated process" now holding the pid */
        _exit(0);
    }
    CHECK(shardc_queue_push(q, in, 4, 0) == 4);
    dead = fork();
    if (dead == 0) {
        uint64_t o[3];
        /* Registers the live process's pid, as if it were its own reused one. */
        _exit(shardc_queue_register(q, 1, live) == 0 && shardc_queue_pop(q, 1, o, 3, 0) == 3
                  ? 0 : 1);
    }
    CHECK(waitpid(dead, &st, 0) == dead);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CHECK(kill(live, 0) == 0); /* the registered pid is alive... */
    CHECK(shardc_queue_repair(q, 1, live, out, CAP) == 3); /* ...and repair proceeds */
    CHECK(out[0] == 7 && out[1] == 8 && out[2] == 9);
    CHECK_RC(shardc_queue_consumer(q, 1, &ci));
    CHECK(ci.pid == 0 && ci.claimed == 0);
    kill(live, SIGKILL);
    CHECK(waitpid(live, &st, 0) == live);
    free_ring(q, CAP, 2);
}

/* ------------------------------------------------------------ stress */

#define ITEM(prod, seq) (((uint64_t)(prod) << 40) | (uint64_t)(seq))

/* P producers and C consumers move every item exactly once; each consumer
 * sees each producer's items in increasing order (per-producer FIFO). */
static void test_mpmc_exactly_once(void)
{
    enum { P = 3, C = 3, CAP = 1024 };
    const uint64_t per = 1000000 / SCALE;
    void *q = new_ring(CAP, C, NULL);
    uint8_t *seen = shared((uint64_t)P * per);
    uint64_t *errors = shared(4096);
    pid_t pids[P + C];
    int st;

    for (int c = 0; c < C; c++) {
        pids[c] = fork();
        if (pids[c] == 0) {
            uint64_t out[64], last[P];
            uint32_t batch = 1 + (uint32_t)c * 20;
            alarm(60);
            for (int p = 0; p < P; p++)
                last[p] = UINT64_MAX;
            for (;;) {
                int n = shardc_queue_pop(q, (uint32_t)c, out, batch, 5000000000LL);
                if (n == -EPIPE)
                    _exit(0);
                if (n <= 0)
                    _exit(2);
                for (int i = 0; i < n; i++) {
                    uint64_t p = out[i] >> 40, s = out[i] & ((1ULL << 40) - 1);
                    if (p >= P || s >= per || (last[p] != UINT64_MAX && s <= last[p]))
                        __atomic_fetch_add(errors, 1, __ATOMIC_RELAXED);
                    else
                        __atomic_fetch_add(&seen[p * per + s], 1, __ATOMIC_RELAXED);
                    if (p < P)
                        last[p] = s;
                }
                shardc_queue_done(q, (uint32_t)c);
            }
        }
    }
    for (int p = 0; p < P; p++) {
        pids[C + p] = fork();
        if (pids[C + p] == 0) {
            uint64_t buf[32];
            uint32_t batch = 1 + (uint32_t)p * 15;
            alarm(60);
            for (uint64_t s = 0; s < per;) {
                uint32_t k = 0;
                while (k < batch && s + k < per) {
                    buf[k] = ITEM(p, s + k);
                    k++;
                }
                int r = shardc_queue_push(q, buf, k, 5000000000LL);
                if (r <= 0)
                    _exit(3);
                s += (uint64_t)r;
            }
            _exit(0);
        }
    }
    for (int p = 0; p < P; p++) {
        CHECK(waitpid(pids[C + p], &st, 0) == pids[C + p]);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    CHECK_RC(shardc_queue_close(q));
    for (int c = 0; c < C; c++) {
        CHECK(waitpid(pids[c], &st, 0) == pids[c]);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    CHECK(*errors == 0);
    for (uint64_t i = 0; i < (uint64_t)P * per; i++)
        CHECK(seen[i] == 1);
    munmap(seen, (size_t)(P * per));
    munmap(errors, 4096);
    free_ring(q, CAP, C);
}

/* Item states for the kill test: the output protocol is claim (exchange from
 * QUEUED, which must succeed: anything else is a double delivery), then
 * DONE (the "output"), then done().  The master requeues what repair returns
 * unless it is already DONE. */
#define S_QUEUED 0
#define S_DONE 1
#define S_CLAIMED(c) (2 + (c))

static void kill_consumer_main(void *q, uint32_t c, uint8_t *state, uint64_t *errors)
{
    uint64_t out[SHARDC_QUEUE_MAX_CLAIM];
    uint32_t batch = 1 + (uint32_t)(getpid() % 40);
    alarm(60);
    if (shardc_queue_register(q, c, getpid()) != 0)
        _exit(5);
    for (;;) {
        int n = shardc_queue_pop(q, c, out, batch, 5000000000LL);
        if (n == -EPIPE)
            _exit(0);
        if (n <= 0)
            _exit(2);
        for (int i = 0; i < n; i++) {
            uint8_t prev = __atomic_exchange_n(&state[out[i]], (uint8_t)S_CLAIMED(c),
                                               __ATOMIC_SEQ_CST);
            if (prev != S_QUEUED)
                __atomic_fetch_add(errors, 1, __ATOMIC_SEQ_CST);
            for (volatile int spin = 0; spin < 300; spin++)
                ; /* "work": keeps claims held long enough to be killed */
        }
        for (int i = 0; i < n; i++)
            __atomic_store_n(&state[out[i]], (uint8_t)S_DONE, __ATOMIC_SEQ_CST);
        shardc_queue_done(q, c);
    }
}

/* Consumers SIGKILLed at random moments are repaired by the master, which
 * requeues their unfinished items: every item ends DONE exactly once, none
 * is claimed twice, and the ring never gets stuck. */
static void test_kill_repair_requeue(void)
{
    enum { C = 3, CAP = 256 };
    const uint32_t N = 400000 / SCALE, MAX_KILLS = 300 / SCALE + 20;
    void *q = new_ring(CAP, C, NULL);
    uint8_t *state = shared(N);
    uint64_t *errors = shared(4096);
    /* Room for every id plus each kill's repaired claims: requeues can pass
     * a thousand (under qemu-user with the polling wait they did). */
    uint64_t *pending = malloc(sizeof(uint64_t) * (N + (uint64_t)MAX_KILLS * SHARDC_QUEUE_MAX_CLAIM));
    uint64_t npending = 0, head = 0, kills = 0, requeued = 0;
    uint64_t rep[SHARDC_QUEUE_MAX_CLAIM];
    pid_t pids[C];
    int st;
    unsigned rnd = 12345;

    CHECK(pending != NULL);
    for (uint32_t i = 0; i < N; i++)
        pending[npending++] = i;
    for (uint32_t c = 0; c < C; c++) {
        pids[c] = fork();
        if (pids[c] == 0)
            kill_consumer_main(q, c, state, errors);
    }
    for (;;) {
        shardc_queue_stats_t s;
        int idle = 1;
        if (head < npending) {
            uint32_t k = (uint32_t)(npending - head < 64 ? npending - head : 64);
            int r = shardc_queue_push(q, &pending[head], k, 1000000);
            CHECK(r > 0 || r == -ETIMEDOUT);
            if (r > 0)
                head += (uint64_t)r;
        }
        rnd = rnd * 1103515245u + 12345u;
        if ((rnd >> 16) % 16 == 0 && kills < MAX_KILLS) {
            uint32_t c = (rnd >> 8) % C;
            int n;
            usleep((rnd >> 4) % 200);
            kill(pids[c], SIGKILL);
            CHECK(waitpid(pids[c], &st, 0) == pids[c]);
            n = shardc_queue_repair(q, c, pids[c], rep, SHARDC_QUEUE_MAX_CLAIM);
            CHECK(n >= 0);
            for (int i = 0; i < n; i++) {
                uint8_t cur = __atomic_load_n(&state[rep[i]], __ATOMIC_SEQ_CST);
                CHECK(cur == S_QUEUED || cur == S_DONE || cur == S_CLAIMED(c));
                if (cur == S_DONE)
                    continue; /* output written, done() not reached */
                __atomic_store_n(&state[rep[i]], S_QUEUED, __ATOMIC_SEQ_CST);
                pending[npending++] = rep[i];
                requeued++;
            }
            kills++;
            pids[c] = fork();
            if (pids[c] == 0)
                kill_consumer_main(q, c, state, errors);
        }
        if (head < npending)
            continue;
        /* Everything pushed: finished once the ring is empty and no record
         * holds claims (claims exist from pop's return until done()). */
        CHECK_RC(shardc_queue_stats(q, &s));
        for (uint32_t c = 0; c < C; c++) {
            shardc_queue_consumer_t ci;
            CHECK_RC(shardc_queue_consumer(q, c, &ci));
            if (ci.claimed != 0 || ci.state != SHARDC_QUEUE_IDLE)
                idle = 0;
        }
        if (s.size == 0 && idle)
            break;
        usleep(100);
    }
    CHECK_RC(shardc_queue_close(q));
    for (uint32_t c = 0; c < C; c++) {
        CHECK(waitpid(pids[c], &st, 0) == pids[c]);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    CHECK(*errors == 0);
    for (uint32_t i = 0; i < N; i++)
        CHECK(state[i] == S_DONE);
    CHECK(kills > 0);
    printf("# %llu kills, %llu items requeued\n", (unsigned long long)kills,
           (unsigned long long)requeued);
    free(pending);
    munmap(state, N);
    munmap(errors, 4096);
    free_ring(q, CAP, C);
}

static void spin_ns(int64_t ns)
{
    int64_t end = now_ns() + ns;
    while (now_ns() < end)
        ;
}

/* Many short kill cycles aimed at the claim window: a producer process keeps
 * the ring full of fresh ids while a consumer hammers pop/done and is
 * SIGKILLed after a random few microseconds, over and over.  Repair must
 * never leave a cell unreleased (the producer would stall and the drain time
 * out) and every id must be taken exactly once overall. */
static void test_kill_in_claim_window(void)
{
    enum { CAP = 64, LIMIT = 1 << 23 };
    const int rounds = 800 / SCALE;
    void *q = new_ring(CAP, 2, NULL);
    uint64_t rep[SHARDC_QUEUE_MAX_CLAIM], buf[CAP];
    int npend = 0;
    uint8_t *taken = shared(LIMIT);
    uint64_t *ctl = shared(4096); /* [0] = stop flag, [1] = ids pushed */
    unsigned rnd = 777;
    pid_t prod;
    int st;

    prod = fork();
    if (prod == 0) {
        uint64_t next = 0, b[8];
        alarm(60);
        while (!__atomic_load_n(&ctl[0], __ATOMIC_ACQUIRE) && next + 8 < LIMIT) {
            int r;
            for (int i = 0; i < 8; i++)
                b[i] = next + (uint64_t)i;
            r = shardc_queue_push(q, b, 8, 10000000);
            if (r == -ETIMEDOUT) {
                __atomic_fetch_add(&ctl[2], 1, __ATOMIC_RELAXED);
                continue;
            }
            if (r <= 0)
                _exit(1);
            next += (uint64_t)r;
            /* release: the master reads the count after we exit anyway. */
            __atomic_store_n(&ctl[1], next, __ATOMIC_RELEASE);
        }
        _exit(0);
    }
    for (int round = 0; round < rounds; round++) {
        pid_t pid;
        int n;
        pid = fork();
        if (pid == 0) {
            uint64_t o[8];
            int first = 0;
            alarm(10);
            if (shardc_queue_register(q, 1, getpid()) != 0)
                _exit(5);
            /* release: tell the master we run, so its kill timer starts. */
            __atomic_store_n(&ctl[4], (uint64_t)getpid(), __ATOMIC_RELEASE);
            for (;;) {
                int r = shardc_queue_pop(q, 1, o, 1 + (uint32_t)(getpid() % 8), -1);
                if (r < 0)
                    _exit(1);
                for (int i = 0; i < r; i++)
                    __atomic_fetch_add(&taken[o[i]], 1, __ATOMIC_RELAXED);
                shardc_queue_done(q, 1);
                if (!first++)
                    __atomic_fetch_add(&ctl[3], 1, __ATOMIC_RELAXED);
            }
        }
        /* Requeue the last victim's items now that a consumer runs. */
        if (npend > 0)
            CHECK(shardc_queue_push(q, rep, (uint32_t)npend, 1000000000) == npend);
        npend = 0;
        /* acquire: wait for the child to run (a fresh fork can take a
         * while to be scheduled), then kill it a random time later. */
        while (__atomic_load_n(&ctl[4], __ATOMIC_ACQUIRE) != (uint64_t)pid)
            CHECK(waitpid(pid, &st, WNOHANG) == 0);
        rnd = rnd * 1103515245u + 12345u;
        spin_ns((rnd >> 8) % 50000);
        kill(pid, SIGKILL);
        CHECK(waitpid(pid, &st, 0) == pid);
        CHECK(WIFSIGNALED(st));
        n = shardc_queue_repair(q, 1, pid, rep, SHARDC_QUEUE_MAX_CLAIM);
        CHECK(n >= 0);
        /* The dead consumer may or may not have counted these: un-count
         * them and requeue; they are counted when popped again. */
        for (int i = 0; i < n; i++)
            __atomic_store_n(&taken[rep[i]], 0, __ATOMIC_RELAXED);
        npend = n;
    }
    __atomic_store_n(&ctl[0], 1, __ATOMIC_RELEASE);
    CHECK(waitpid(prod, &st, 0) == prod);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    /* Drain in the master: every id must now be taken exactly once. */
    for (;;) {
        int r = shardc_queue_pop(q, 0, buf, CAP, 0);
        if (r == -ETIMEDOUT)
            break;
        CHECK(r > 0);
        for (int i = 0; i < r; i++)
            taken[buf[i]]++;
        CHECK_RC(shardc_queue_done(q, 0));
    }
    /* No cell was left unreleased: the whole ring is free again. */
    for (int i = 0; i < CAP; i++)
        buf[i] = LIMIT + (uint64_t)i;
    CHECK(shardc_queue_push(q, buf, CAP, 0) == CAP);
    CHECK(shardc_queue_pop(q, 0, buf, CAP, 0) == CAP);
    CHECK(buf[0] == LIMIT && buf[CAP - 1] == LIMIT + CAP - 1);
    CHECK_RC(shardc_queue_done(q, 0));
    if (npend > 0)
        CHECK(shardc_queue_push(q, rep, (uint32_t)npend, 0) == npend);
    CHECK_RC(shardc_queue_close(q));
    for (;;) {
        int r = shardc_queue_pop(q, 0, buf, CAP, 1000000000);
        if (r == -EPIPE)
            break;
        CHECK(r > 0);
        for (int i = 0; i < r; i++)
            taken[buf[i]]++;
        CHECK_RC(shardc_queue_done(q, 0));
    }
    for (uint64_t i = 0; i < ctl[1]; i++)
        CHECK(taken[i] == 1);
    printf("# %d kills (%llu after popping) over %llu ids (%llu producer timeouts)\n",
           rounds, (unsigned long long)ctl[3], (unsigned long long)ctl[1],
           (unsigned long long)ctl[2]);
    munmap(taken, LIMIT);
    munmap(ctl, 4096);
    free_ring(q, CAP, 2);
}

/* Run a traced child that pops (as consumer 1) on ring q, single-stepping it
 * `steps` instructions past its first stop.  If `interleave`, the master then
 * pops one item as consumer 0 while the child is frozen there (so a pending
 * claim CAS of the child fails, or the master is the "successor" that must
 * mark the child's claim owned).  Then SIGKILL the child.  Returns 1 once the
 * child got through its whole pop in fewer steps (the sweep is complete). */
static int step_and_kill(void *q, long steps, int interleave, uint64_t *got,
                         int *ngot)
{
    pid_t pid;
    int st, finished = 0;
    *ngot = 0;
    pid = fork();
    if (pid == 0) {
        uint64_t out[3];
        if (ptrace(PTRACE_TRACEME, 0, NULL, NULL) != 0)
            _exit(9);
        raise(SIGSTOP);
        (void)shardc_queue_pop(q, 1, out, 3, 0);
        raise(SIGSTOP); /* marker: the pop returned */
        _exit(0);
    }
    CHECK(waitpid(pid, &st, 0) == pid);
    if (WIFEXITED(st) && WEXITSTATUS(st) == 9)
        return -1; /* ptrace not permitted here */
    CHECK(WIFSTOPPED(st));
    for (long i = 0; i < steps; i++) {
        CHECK(ptrace(PTRACE_SINGLESTEP, pid, NULL, NULL) == 0);
        CHECK(waitpid(pid, &st, 0) == pid);
        CHECK(WIFSTOPPED(st));
        if (WSTOPSIG(st) != SIGTRAP) {
            finished = 1;
            break;
        }
    }
    if (interleave) {
        int r = shardc_queue_pop(q, 0, got, 1, 0);
        CHECK(r == 1 || r == -ETIMEDOUT);
        *ngot = r == 1 ? 1 : 0;
        CHECK_RC(shardc_queue_done(q, 0));
    }
    kill(pid, SIGKILL);
    CHECK(waitpid(pid, &st, 0) == pid);
    return finished;
}

/* SIGKILL at every single instruction of a pop (ptrace single-stepping),
 * with and without another consumer claiming in between: after repair,
 * the ring is never stuck and every item is either repaired or still in the
 * ring or taken by the master, exactly once. */
static void test_kill_at_every_instruction(void)
{
    enum { CAP = 8 };
    void *q = new_ring(CAP, 2, NULL);
    /* Every instruction in the plain build; the sanitizer and polling builds
     * run the same pop code, so a sample of the points is enough there. */
#if defined(SHARDC_PORTABLE_WAIT)
    long stride = 5, n = 0;
#else
    long stride = SCALE == 1 ? 1 : 7, n = 0;
#endif
    for (int interleave = 0; interleave < 2; interleave++) {
        for (long steps = 0;; steps += stride) {
            uint64_t in[CAP], count[CAP] = {0}, rep[SHARDC_QUEUE_MAX_CLAIM], out[CAP];
            uint64_t got[1];
            int ngot, fin, r;
            CHECK_RC(shardc_queue_init(q, shardc_queue_bytes(CAP, 2), CAP, 2));
            for (int i = 0; i < CAP; i++)
                in[i] = (uint64_t)i;
            CHECK(shardc_queue_push(q, in, 5, 0) == 5);
            fin = step_and_kill(q, steps, interleave, got, &ngot);
            if (fin < 0) {
                printf("# ptrace not permitted: skipped\n");
                free_ring(q, CAP, 2);
                return;
            }
            for (int i = 0; i < ngot; i++)
                count[got[i]]++;
            r = shardc_queue_repair(q, 1, SHARDC_QUEUE_ANY_PID, rep, SHARDC_QUEUE_MAX_CLAIM);
            CHECK(r >= 0);
            for (int i = 0; i < r; i++)
                count[rep[i]]++;
            /* Not stuck: 3 more fit (8 cells), then everything drains. */
            CHECK(shardc_queue_push(q, in + 5, 3, 0) == 3);
            while ((r = shardc_queue_pop(q, 0, out, CAP, 0)) > 0) {
                for (int i = 0; i < r; i++)
                    count[out[i]]++;
                CHECK_RC(shardc_queue_done(q, 0));
            }
            CHECK(r == -ETIMEDOUT);
            /* Whatever the dead child had not finished claiming is here. */
            for (int i = 0; i < CAP; i++)
                if (count[i] != 1) {
                    fprintf(stderr, "steps %ld interleave %d: item %d seen %llu times\n",
                            steps, interleave, i, (unsigned long long)count[i]);
                    CHECK(0);
                }
            n++;
            if (fin)
                break;
        }
    }
    printf("# %ld kill points\n", n);
    free_ring(q, CAP, 2);
}

/* Ping-pong with spinning disabled, so every hand-off parks and wakes: a
 * lost wake-up would show as a 5 s timeout. */
static void test_no_lost_wakeups(void)
{
#if defined(SHARDC_PORTABLE_WAIT)
    const int rounds = 4000; /* each polled hand-off sleeps ~60 us */
#else
    const int rounds = 20000 / SCALE;
#endif
    void *a = new_ring(2, 1, NULL), *b = new_ring(2, 1, NULL);
    shardc_queue_stats_t st;
    pid_t pid;
    int status;
    CHECK_RC(shardc_queue_set_spin(a, 0));
    CHECK_RC(shardc_queue_set_spin(b, 0));
    pid = fork();
    if (pid == 0) {
        uint64_t x;
        alarm(60);
        for (int i = 0; i < rounds; i++) {
            if (shardc_queue_pop(a, 0, &x, 1, 5000000000LL) != 1 || x != (uint64_t)i)
                _exit(1);
            shardc_queue_done(a, 0);
            if (shardc_queue_push(b, &x, 1, 5000000000LL) != 1)
                _exit(2);
        }
        _exit(0);
    }
    for (int i = 0; i < rounds; i++) {
        uint64_t x = (uint64_t)i;
        CHECK(shardc_queue_push(a, &x, 1, 5000000000LL) == 1);
        CHECK(shardc_queue_pop(b, 0, &x, 1, 5000000000LL) == 1);
        CHECK(x == (uint64_t)i);
        CHECK_RC(shardc_queue_done(b, 0));
    }
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK_RC(shardc_queue_stats(b, &st));
    CHECK(st.parks > 0);
#if !defined(SHARDC_PORTABLE_WAIT)
    CHECK(st.wakes > 0);
#endif
    free_ring(a, 2, 1);
    free_ring(b, 2, 1);
}

int main(void)
{
    alarm(150);
    RUN(test_arguments);
    RUN(test_fifo_full_empty);
    RUN(test_timeouts);
    RUN(test_close_drain);
    RUN(test_close_wakes_sleepers);
    RUN(test_claims_and_repair);
    RUN(test_repair_reused_pid);
    RUN(test_mpmc_exactly_once);
    RUN(test_kill_repair_requeue);
    RUN(test_kill_in_claim_window);
    RUN(test_kill_at_every_instruction);
    RUN(test_no_lost_wakeups);
    return 0;
}
