/* bench_wake.c - baselines for the ring's wake path.
 *
 *   futex_pingpong_p50/p99  two processes hand a token back and forth through
 *                           two shared 32-bit words with the sys.h futex
 *                           helpers, always sleeping (no spinning): one round
 *                           trip = two FUTEX_WAKEs + two sleeping processes
 *                           woken.  The floor for a parked hand-off; it does
 *                           not include any queue bookkeeping.
 *   pipe_pingpong_p50/p99   the same token through two pipes (write/read of
 *                           one byte): what a socket/pipe-based dispatcher
 *                           pays per round trip, without pickling.
 */
#include "bench_common.h"
#include "sys.h"

#include <sys/wait.h>
#include <unistd.h>

static void report_lat(const char *name, int64_t *lat, int n)
{
    char label[64];
    snprintf(label, sizeof(label), "%s_p50", name);
    bench_report(label, (double)bench_quantile(lat, (size_t)n, 0.50) / 1e3, "us");
    snprintf(label, sizeof(label), "%s_p99", name);
    bench_report(label, (double)bench_quantile(lat, (size_t)n, 0.99) / 1e3, "us");
}

/* Wait until *w != old (sleeping), return the new value. */
static uint32_t wait_change(uint32_t *w, uint32_t old)
{
    uint32_t v;
    /* acquire: pairs with the other side's release store of the token. */
    while ((v = __atomic_load_n(w, __ATOMIC_ACQUIRE)) == old)
        shardc__wait_u32(w, old, 5000000000LL);
    return v;
}

static void bench_futex(int rounds)
{
    uint32_t *w = bench_shared(4096); /* w[0]: to child, w[16]: to parent */
    int64_t *lat = malloc(sizeof(int64_t) * (size_t)rounds);
    pid_t pid = fork();
    int st;
    if (pid == 0) {
        uint32_t v = 0;
        for (int i = 0; i < rounds; i++) {
            v = wait_change(&w[0], v);
            /* release: publish the token before waking. */
            __atomic_store_n(&w[16], v, __ATOMIC_RELEASE);
            shardc__wake_u32(&w[16], 1);
        }
        _exit(0);
    }
    for (int i = 0; i < rounds; i++) {
        int64_t t0 = bench_now();
        /* release: publish the token before waking. */
        __atomic_store_n(&w[0], (uint32_t)i + 1, __ATOMIC_RELEASE);
        shardc__wake_u32(&w[0], 1);
        wait_change(&w[16], (uint32_t)i);
        lat[i] = bench_now() - t0;
    }
    waitpid(pid, &st, 0);
    report_lat("futex_pingpong", lat, rounds);
    free(lat);
}

static void bench_pipe(int rounds)
{
    int a[2], b[2], st;
    int64_t *lat = malloc(sizeof(int64_t) * (size_t)rounds);
    char c = 'x';
    pid_t pid;
    if (pipe(a) != 0 || pipe(b) != 0)
        BENCH_DIE("pipe");
    pid = fork();
    if (pid == 0) {
        for (int i = 0; i < rounds; i++)
            if (read(a[0], &c, 1) != 1 || write(b[1], &c, 1) != 1)
                _exit(1);
        _exit(0);
    }
    for (int i = 0; i < rounds; i++) {
        int64_t t0 = bench_now();
        if (write(a[1], &c, 1) != 1 || read(b[0], &c, 1) != 1)
            BENCH_DIE("pipe io");
        lat[i] = bench_now() - t0;
    }
    waitpid(pid, &st, 0);
    report_lat("pipe_pingpong", lat, rounds);
    free(lat);
}

int main(int argc, char **argv)
{
    int rounds;
    bench_args(argc, argv);
    rounds = bench_quick ? 5000 : 50000;
    bench_futex(rounds);
    bench_pipe(rounds);
    return 0;
}
