/*
 * test_status.c - the status table and done map (csrc/status.c): layout and
 * argument checks, the state changes and what a snapshot shows after each,
 * the done map's count against a byte loop, the clock, then concurrency:
 * threads acting as master and workers (the harness TSan runs: it sees every
 * access, so a missing atomic is a report), and a forked writer SIGKILLed at
 * random while the master reads.  The snapshot invariants checked under
 * concurrency:
 *   - RUNNING X comes with X's own start time: not older than the moment the
 *     worker decided to start X (floor[X]), not as new as X+1's (floor[X+1]);
 *   - current lies in the block [block0, block0 + blockn);
 *   - the shard before `current` in a block is marked done (marks precede);
 *   - done_total() <= count() (the counter follows the marks), count() never
 *     decreases, and the counts add up at the end.
 */
#define _GNU_SOURCE
#include "status.h"
#include "harness.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void *shared_alloc(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(p != MAP_FAILED);
    return p;
}

static void *new_table(uint32_t nrows, uint64_t *bytes)
{
    uint64_t n = shardc_status_bytes(nrows);
    void *mem;
    CHECK(n > 0);
    mem = shared_alloc((size_t)n);
    CHECK_RC(shardc_status_init(mem, n, nrows));
    if (bytes)
        *bytes = n;
    return mem;
}

static shardc_status_writer_t *new_writer(void *mem, uint32_t slot)
{
    shardc_status_writer_t *w = malloc((size_t)shardc_status_writer_size());
    CHECK(w != NULL);
    CHECK_RC(shardc_status_writer_init(w, mem, slot));
    return w;
}

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Sizes, alignment, bad slots and bad table memory are refused. */
static void test_init_and_args(void)
{
    uint64_t n = shardc_status_bytes(4);
    char *mem;
    shardc_status_writer_t *w = malloc((size_t)shardc_status_writer_size());
    shardc_status_snap_t s;

    CHECK(shardc_status_bytes(0) == 0);
    CHECK(shardc_status_bytes(SHARDC_STATUS_MAX_ROWS + 1) == 0);
    CHECK(n >= 4 * 64);
    mem = shared_alloc((size_t)n + 64);
    CHECK(shardc_status_init(mem + 8, n, 4) == -EINVAL); /* not 64-byte aligned */
    CHECK(shardc_status_init(mem, n - 1, 4) == -ENOSPC);
    CHECK(shardc_status_read(mem, 0, &s) == -EINVAL);   /* not initialized */
    CHECK(shardc_status_writer_init(w, mem, 0) == -EINVAL);
    CHECK_RC(shardc_status_init(mem, n, 4));
    CHECK(shardc_status_writer_init(w, mem, 4) == -EINVAL);
    CHECK(shardc_status_read(mem, 4, &s) == -EINVAL);
    CHECK(shardc_status_reset(mem, 9) == -EINVAL);
    CHECK(shardc_status_take_done(NULL, 0) == -EINVAL);
    CHECK_RC(shardc_status_writer_init(w, mem, 3));
    CHECK(shardc_status_writer_set_done(w, NULL, 5) == -EINVAL);
    CHECK_RC(shardc_status_read(mem, 3, &s));
    CHECK(s.state == SHARDC_STATUS_IDLE && s.current == 0 && s.start_ns == 0 && s.done == 0);
    free(w);
    munmap(mem, (size_t)n + 64);
}

/* Each state change, and what the master's snapshot shows after it. */
static void test_state_changes(void)
{
    void *mem = new_table(2, NULL);
    shardc_status_writer_t *w = new_writer(mem, 1);
    uint8_t done[16] = {0};
    shardc_status_snap_t s;
    int64_t t0, t1, before;

    CHECK_RC(shardc_status_writer_set_done(w, done, 16));
    CHECK_RC(shardc_status_set_pid(w, 4242));
    CHECK(shardc_status_pid(mem, 1) == 4242 && shardc_status_pid(mem, 0) == 0);

    before = mono_ns();
    t0 = shardc_status_begin(w, 3);
    CHECK(t0 >= before && t0 <= mono_ns()); /* the clock of time.monotonic_ns() */
    CHECK_RC(shardc_status_read(mem, 1, &s));
    CHECK(s.state == SHARDC_STATUS_RUNNING && s.current == 3 && s.start_ns == t0);
    t1 = shardc_status_end(w, 3, 2);
    CHECK(t1 >= t0);
    CHECK(shardc_status_done_get(done, 16, 3) == 2);
    CHECK_RC(shardc_status_read(mem, 1, &s));
    CHECK(s.state == SHARDC_STATUS_IDLE && s.current == 3 && s.done == 0);

    /* A block 4..7: begin, next, next, end with a failed last shard. */
    t0 = shardc_status_block_begin(w, 4, 3);
    CHECK_RC(shardc_status_read(mem, 1, &s));
    CHECK(s.state == SHARDC_STATUS_RUNNING && s.current == 4 && s.start_ns == t0 &&
          s.block0 == 4 && s.blockn == 3);
    t1 = shardc_status_next(w, 4, 1, 5);
    CHECK(t1 >= t0);
    CHECK_RC(shardc_status_read(mem, 1, &s));
    CHECK(s.state == SHARDC_STATUS_RUNNING && s.current == 5 && s.start_ns == t1 &&
          s.block0 == 4 && s.blockn == 3);
    CHECK(shardc_status_next(w, 5, 1, 6) >= t1);
    CHECK(shardc_status_block_end(w, 6, 0, 2) > 0);
    CHECK_RC(shardc_status_read(mem, 1, &s));
    CHECK(s.state == SHARDC_STATUS_IDLE && s.current == 6 && s.done == 2);
    CHECK(done[4] == 1 && done[5] == 1 && done[6] == 0);
    CHECK(shardc_status_done_count(done, 16) == 3);
    CHECK(shardc_status_done_total(mem) == 2);

    /* A shard id outside the map is refused before anything changes. */
    CHECK(shardc_status_begin(w, 9) > 0);
    CHECK(shardc_status_end(w, 16, 1) == -EINVAL);
    CHECK(shardc_status_end(w, -1, 1) == -EINVAL);
    CHECK(shardc_status_next(w, 99, 1, 10) == -EINVAL);
    CHECK(shardc_status_block_end(w, 16, 1, 1) == -EINVAL);
    CHECK(shardc_status_end(w, 9, 256) == -EINVAL);
    CHECK_RC(shardc_status_read(mem, 1, &s));
    CHECK(s.state == SHARDC_STATUS_RUNNING && s.current == 9 && s.done == 2);
    CHECK(shardc_status_end(w, 99, 0) > 0); /* no mark: no check */
    CHECK(shardc_status_done_mark(done, 16, 16, 1) == -EINVAL);
    CHECK(shardc_status_done_get(done, 16, 16) == -EINVAL);
    CHECK_RC(shardc_status_done_mark(done, 16, 15, 1));
    CHECK(shardc_status_done_get(done, 16, 15) == 1);
    /* Without a done map, marks are ignored. */
    CHECK_RC(shardc_status_writer_set_done(w, NULL, 0));
    CHECK(shardc_status_begin(w, 100) > 0 && shardc_status_end(w, 100, 1) > 0);

    /* The single words. */
    CHECK_RC(shardc_status_set_sending(w, 8));
    CHECK_RC(shardc_status_set_heap_kept(w, 1 << 20));
    CHECK(shardc_status_exit_requested(w) == 0);
    CHECK_RC(shardc_status_request_exit(mem, 1));
    CHECK(shardc_status_exit_requested(w) == 1);
    CHECK_RC(shardc_status_set_call(mem, 1, 77));
    CHECK_RC(shardc_status_set_call(mem, 0, 78));
    CHECK_RC(shardc_status_set_idle(w));
    CHECK_RC(shardc_status_read(mem, 1, &s));
    CHECK(s.state == SHARDC_STATUS_IDLE && s.sending == 8 && s.heap_kept == (1 << 20) &&
          s.exit_req == 1 && s.call == 77 && s.pid == 4242);
    CHECK(shardc_status_heap_kept(mem, 1) == (1 << 20));
    CHECK_RC(shardc_status_clear_calls(mem));
    CHECK_RC(shardc_status_read(mem, 0, &s));
    CHECK(s.call == 0);
    CHECK(shardc_status_take_done(mem, 1) == 2);
    CHECK(shardc_status_take_done(mem, 1) == 0);
    CHECK_RC(shardc_status_reset(mem, 1));
    CHECK_RC(shardc_status_read(mem, 1, &s));
    CHECK(s.state == 0 && s.current == 0 && s.start_ns == 0 && s.call == 0 && s.pid == 0 &&
          s.exit_req == 0 && s.sending == 0 && s.heap_kept == 0 && s.block0 == 0);
    /* The writer still works after a reset (the sequence restarts at 0). */
    t0 = shardc_status_begin(w, 1);
    CHECK_RC(shardc_status_read(mem, 1, &s));
    CHECK(s.state == SHARDC_STATUS_RUNNING && s.current == 1 && s.start_ns == t0);
    free(w);
}

/* count() agrees with a byte loop for every length and misalignment. */
static void test_count(void)
{
    enum { N = 5000 };
    uint8_t *buf = malloc(N + 16);
    uint64_t seed = 12345;
    CHECK(buf != NULL);
    for (int i = 0; i < N + 16; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        buf[i] = (seed >> 60) < 5 ? 0 : (uint8_t)(seed >> 56);
    }
    buf[7] = 0x80; /* high bit only */
    buf[9] = 0x01;
    for (int off = 0; off < 9; off++)
        for (int n = 0; n < N; n += (n < 70 ? 1 : 97)) {
            int64_t want = 0;
            for (int i = 0; i < n; i++)
                want += buf[off + i] != 0;
            CHECK(shardc_status_done_count(buf + off, (uint64_t)n) == want);
        }
    memset(buf, 0xff, N);
    CHECK(shardc_status_done_count(buf, N) == N); /* every lane at its maximum */
    CHECK(shardc_status_done_count(NULL, 0) == 0);
    CHECK(shardc_status_done_count(NULL, 1) == -EINVAL);
    free(buf);
}

/* ------------------------------------------------ concurrent harness */

enum { T_WORKERS = 3, T_SHARDS = 20000, T_BLOCK = 7 };

/* The "work" of one shard: a busy wait, so that readers overlap with it. */
static int64_t work_ns;

static void work(void)
{
    int64_t end = shardc_status_now_ns() + work_ns;
    while (work_ns > 0 && shardc_status_now_ns() < end)
        ;
}

typedef struct {
    void *mem;
    uint8_t *done;     /* T_WORKERS * T_SHARDS bytes */
    int64_t *floor_ns; /* per shard: a time before its begin, after the previous one's */
    int64_t ok_total;  /* shards the workers marked */
    int stop;
} shared_t;

/* Worker `slot` runs its shards [slot*T_SHARDS, (slot+1)*T_SHARDS): blocks of
 * T_BLOCK through block_begin/next/block_end, with every 5th block as single
 * begin/end calls and every 11th shard failing (no mark). */
static void run_worker(shared_t *sh, uint32_t slot)
{
    shardc_status_writer_t *w = new_writer(sh->mem, slot);
    int64_t base = (int64_t)slot * T_SHARDS, last = 0, ok_total = 0;
    CHECK_RC(shardc_status_writer_set_done(w, sh->done, (uint64_t)T_WORKERS * T_SHARDS));

#define FLOOR(x)                                                              \
    do {                                                                      \
        int64_t f_;                                                           \
        while ((f_ = shardc_status_now_ns()) <= last)                         \
            ;                                                                 \
        /* relaxed: published by the begin/next that follows (release). */   \
        __atomic_store_n(&sh->floor_ns[(x)], f_, __ATOMIC_RELAXED);           \
    } while (0)

    for (int64_t b = 0; b < T_SHARDS; b += T_BLOCK) {
        int64_t start = base + b, stop = base + (b + T_BLOCK < T_SHARDS ? b + T_BLOCK : T_SHARDS);
        int64_t ok = 0;
        if ((b / T_BLOCK) % 5 == 4) {
            for (int64_t x = start; x < stop; x++) {
                int mark = (x % 11) ? 1 : 0;
                FLOOR(x);
                last = shardc_status_begin(w, x);
                CHECK(last > 0);
                work();
                CHECK(shardc_status_end(w, x, mark) > 0);
                ok_total += mark;
            }
            continue;
        }
        FLOOR(start);
        last = shardc_status_block_begin(w, start, stop - start);
        CHECK(last > 0);
        for (int64_t x = start; x < stop; x++) {
            int mark = (x % 11) ? 1 : 0;
            work();
            ok += mark;
            if (x + 1 < stop) {
                FLOOR(x + 1);
                last = shardc_status_next(w, x, mark, x + 1);
                CHECK(last > 0);
            } else {
                CHECK(shardc_status_block_end(w, x, mark, ok) > 0);
            }
        }
        ok_total += ok;
        /* Single-shard ends count nothing: only blocks feed the counter. */
    }
    __atomic_fetch_add(&sh->ok_total, ok_total, __ATOMIC_RELAXED);
    free(w);
#undef FLOOR
}

/* One snapshot of `slot` against the invariants in the file comment. */
static void check_snapshot(shared_t *sh, uint32_t slot)
{
    shardc_status_snap_t s;
    int64_t base = (int64_t)slot * T_SHARDS, x;
    CHECK_RC(shardc_status_read(sh->mem, slot, &s));
    if (s.start_ns == 0)
        return; /* nothing started yet */
    x = s.current;
    CHECK(x >= base && x < base + T_SHARDS);
    if (s.state == SHARDC_STATUS_RUNNING) {
        /* acquire-ordered by the snapshot: floor[x] was stored before x's begin. */
        int64_t lo = __atomic_load_n(&sh->floor_ns[x], __ATOMIC_RELAXED);
        int64_t hi = x + 1 < base + T_SHARDS
                         ? __atomic_load_n(&sh->floor_ns[x + 1], __ATOMIC_RELAXED) : 0;
        CHECK(lo != 0 && s.start_ns >= lo); /* not an older shard's start */
        CHECK(hi == 0 || s.start_ns < hi);  /* not a newer shard's start */
    }
    if (s.blockn > 0 && s.current >= s.block0 && s.current < s.block0 + s.blockn &&
        s.current > s.block0 && ((s.current - 1) % 11) != 0)
        /* Inside a block (next() moved on): the previous shard's mark is seen. */
        CHECK(shardc_status_done_get(sh->done, (uint64_t)T_WORKERS * T_SHARDS,
                                     s.current - 1) == 1);
}

static void *worker_thread(void *arg)
{
    shared_t *sh = ((void **)arg)[0];
    uint32_t slot = (uint32_t)(uintptr_t)((void **)arg)[1];
    run_worker(sh, slot);
    return NULL;
}

/* Master thread: snapshots, counts and takes while the workers run. */
static void test_threads(void)
{
    static shared_t sh;
    pthread_t th[T_WORKERS];
    void *args[T_WORKERS][2];
    int64_t last_count = 0, taken = 0, reads = 0;
    uint64_t n = (uint64_t)T_WORKERS * T_SHARDS;
    int running = T_WORKERS, joined[T_WORKERS] = {0};

    sh.mem = new_table(T_WORKERS, NULL);
    sh.done = calloc(n, 1);
    sh.floor_ns = calloc(n, sizeof(int64_t));
    sh.ok_total = 0;
    work_ns = 200;
    CHECK(sh.done && sh.floor_ns);
    for (int i = 0; i < T_WORKERS; i++) {
        args[i][0] = &sh;
        args[i][1] = (void *)(uintptr_t)i;
        CHECK(pthread_create(&th[i], NULL, worker_thread, args[i]) == 0);
    }
    while (running) {
        for (uint32_t s = 0; s < T_WORKERS; s++) {
            int64_t total = shardc_status_done_total(sh.mem), count;
            check_snapshot(&sh, s);
            reads++;
            count = shardc_status_done_count(sh.done, n);
            CHECK(total >= 0 && total <= count); /* the counter follows the marks */
            CHECK(count >= last_count);
            last_count = count;
            if (reads % 97 == 0)
                taken += shardc_status_take_done(sh.mem, s); /* never loses an increment */
        }
        running = 0;
        for (int i = 0; i < T_WORKERS; i++) {
            if (!joined[i])
                joined[i] = pthread_tryjoin_np(th[i], NULL) == 0;
            running += !joined[i];
        }
    }
    for (uint32_t s = 0; s < T_WORKERS; s++)
        check_snapshot(&sh, s);
    {
        /* Every marked shard is counted once: blocks' ok through the rows'
         * counters (taken + left), single shards only in the map. */
        int64_t blocks_ok = taken + shardc_status_done_total(sh.mem);
        int64_t marks = shardc_status_done_count(sh.done, n);
        CHECK(marks == __atomic_load_n(&sh.ok_total, __ATOMIC_RELAXED));
        CHECK(blocks_ok > 0 && blocks_ok < marks);
    }
    printf("# %ld snapshots checked while %d threads wrote\n", (long)reads, T_WORKERS);
    free(sh.done);
    free(sh.floor_ns);
}

/* A forked writer is SIGKILLed at random moments: every snapshot taken
 * while it runs and after it died holds the invariants (a writer killed in
 * the middle of an update leaves the previous state visible). */
static void test_fork_kill(void)
{
    uint64_t n = (uint64_t)T_WORKERS * T_SHARDS;
    shared_t *sh = shared_alloc(sizeof(shared_t));
    sh->mem = new_table(T_WORKERS, NULL);
    sh->done = shared_alloc(n);
    sh->floor_ns = shared_alloc(n * sizeof(int64_t));
    work_ns = 2000; /* 20000 shards: ~40 ms, more than the longest wait below */
    for (int round = 0; round < 20; round++) {
        pid_t pid;
        int st;
        memset(sh->done, 0, n);
        memset(sh->floor_ns, 0, n * sizeof(int64_t));
        CHECK_RC(shardc_status_reset(sh->mem, 0));
        pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            run_worker(sh, 0);
            _exit(0);
        }
        {
            /* Read for 0.5-20 ms, then kill: mostly in the middle of a block. */
            int64_t until = shardc_status_now_ns() + 500000 + round * 1000000LL;
            while (shardc_status_now_ns() < until)
                check_snapshot(sh, 0);
        }
        kill(pid, SIGKILL);
        CHECK(waitpid(pid, &st, 0) == pid);
        check_snapshot(sh, 0); /* the dead writer's last state */
    }
    munmap(sh->done, n);
    munmap(sh->floor_ns, n * sizeof(int64_t));
}

/* Speculative runs: one call marks a range and publishes the next run;
 * the row covers run_n ids; per-shard calls reset run_n to 1; bad ranges
 * change nothing. */
static void test_runs(void)
{
    void *mem = new_table(1, NULL);
    shardc_status_writer_t *w = new_writer(mem, 0);
    uint8_t done[16] = {0};
    shardc_status_snap_t s;
    int64_t t0, t1;

    CHECK_RC(shardc_status_writer_set_done(w, done, 16));
    t0 = shardc_status_run_next(w, 0, 0, 0, 2, 5); /* begin: ids 2..6, nothing marked */
    CHECK(t0 > 0);
    CHECK_RC(shardc_status_read(mem, 0, &s));
    CHECK(s.state == SHARDC_STATUS_RUNNING && s.current == 2 && s.run_n == 5 && s.start_ns == t0);
    CHECK(shardc_status_done_count(done, 16) == 0);
    t1 = shardc_status_run_next(w, 2, 4, 2, 6, 3); /* 2..5 done (mark 2), then 6..8 */
    CHECK(t1 >= t0);
    CHECK_RC(shardc_status_read(mem, 0, &s));
    CHECK(s.state == SHARDC_STATUS_RUNNING && s.current == 6 && s.run_n == 3 && s.start_ns == t1);
    CHECK(done[1] == 0 && done[2] == 2 && done[5] == 2 && done[6] == 0);
    /* out of the map: refused, nothing changed */
    CHECK(shardc_status_run_next(w, 14, 3, 1, 0, 0) == -EINVAL);
    CHECK(shardc_status_run_next(w, -1, 1, 1, 0, 0) == -EINVAL);
    CHECK(shardc_status_run_next(w, 6, 1, 256, 0, 0) == -EINVAL);
    CHECK_RC(shardc_status_read(mem, 0, &s));
    CHECK(s.state == SHARDC_STATUS_RUNNING && s.current == 6 && done[14] == 0 && done[15] == 0);
    /* the end: 6..8 marked 1, IDLE */
    CHECK(shardc_status_run_next(w, 6, 3, 1, 0, 0) >= t1);
    CHECK_RC(shardc_status_read(mem, 0, &s));
    CHECK(s.state == SHARDC_STATUS_IDLE && done[6] == 1 && done[8] == 1 && done[9] == 0);
    CHECK(shardc_status_done_count(done, 16) == 7);
    /* a shard boundary after a run covers one id again */
    CHECK(shardc_status_run_next(w, 0, 0, 0, 10, 4) > 0);
    CHECK(shardc_status_next(w, 10, 1, 11) > 0);
    CHECK_RC(shardc_status_read(mem, 0, &s));
    CHECK(s.current == 11 && s.run_n == 1 && done[10] == 1);
    CHECK(shardc_status_begin(w, 12) > 0);
    CHECK_RC(shardc_status_read(mem, 0, &s));
    CHECK(s.current == 12 && s.run_n == 1);
    free(w);
}

int main(void)
{
    RUN(test_init_and_args);
    RUN(test_state_changes);
    RUN(test_count);
    RUN(test_runs);
    RUN(test_threads);
    RUN(test_fork_kill);
    return 0;
}
