/* bench_common.h - helpers shared by the C benchmarks: clock, shared memory,
 * percentiles, and the one output format (name<TAB>value<TAB>unit). */
#ifndef SHARDC_BENCH_COMMON_H
#define SHARDC_BENCH_COMMON_H

#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static int bench_quick;

static inline int64_t bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void *bench_shared(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return p;
}

static inline void bench_report(const char *name, double value, const char *unit)
{
    printf("%s\t%.3f\t%s\n", name, value, unit);
    fflush(stdout);
}

static int bench_cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Sorts v in place; returns the q-quantile (0..1). */
static inline int64_t bench_quantile(int64_t *v, size_t n, double q)
{
    qsort(v, n, sizeof(*v), bench_cmp_i64);
    return v[(size_t)(q * (double)(n - 1))];
}

static inline void bench_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--quick") == 0)
            bench_quick = 1;
}

#define BENCH_DIE(msg)                                                        \
    do {                                                                      \
        fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, msg);              \
        exit(1);                                                              \
    } while (0)

#endif
