/*
 * test_kern.c - the native kernel runner (csrc/kernel.c) and the built-in
 * column statistics (csrc/kern_stats.c): moments against a long double
 * two-pass reference for C order, Fortran order, strided views, float32 and
 * integer inputs; NaN and inf propagation; 1-row and 1-column blocks; the
 * runner's done marks, counts, stop at a failing shard and its row state;
 * finding a function again by dladdr / dlopen.
 */
#define _GNU_SOURCE
#include "harness.h"
#include "kern_stats.h"
#include "kernel.h"
#include "status.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static uint64_t lcg = 88172645463325252ULL;
static double urand(void)
{
    lcg = lcg * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(lcg >> 11) / 9007199254740992.0;
}

static shardc_array_t arr2d(void *data, int32_t dtype, int32_t itemsize, int64_t nr, int64_t nc,
                            int64_t s0, int64_t s1)
{
    shardc_array_t a;
    memset(&a, 0, sizeof(a));
    a.data = data;
    a.ndim = 2;
    a.dtype = dtype;
    a.itemsize = itemsize;
    a.shape[0] = nr;
    a.shape[1] = nc;
    a.strides[0] = s0;
    a.strides[1] = s1;
    return a;
}

/* Reference moments of column j (long double, two passes). */
static void ref_moments(const double *x, int64_t nr, int64_t ld, int64_t j, long double *mean,
                        long double *m2)
{
    long double s = 0, q = 0;
    int64_t i;
    for (i = 0; i < nr; i++)
        s += x[i * ld + j];
    *mean = s / nr;
    for (i = 0; i < nr; i++) {
        long double d = x[i * ld + j] - *mean;
        q += d * d;
    }
    *m2 = q;
}

static void check_close(double got, long double want, double rel)
{
    double err = fabs((double)(got - want));
    double scale = fabs((double)want) > 1e-300 ? fabs((double)want) : 1.0;
    if (!(err <= rel * scale)) {
        fprintf(stderr, "got %.17g want %.17Lg (rel err %.3g > %.3g)\n", got, want, err / scale, rel);
        CHECK(0);
    }
}

/* out rows: count, sum, shift, mean - shift, M2 */
static void check_block(const double *x, int64_t nr, int64_t nc, const double *out, int64_t ld)
{
    int64_t j;
    for (j = 0; j < nc; j++) {
        long double mean, m2;
        ref_moments(x, nr, nc, j, &mean, &m2);
        CHECK(out[j] == (double)nr);
        check_close(out[ld + j] / nr, mean, 1e-14);
        check_close(out[2 * ld + j] + out[3 * ld + j], mean, 1e-14);
        check_close(out[4 * ld + j], m2, 1e-12);
    }
}

static void test_layouts_match_reference(void)
{
    const int64_t nr = 1000, nc = 37;
    double *x = malloc(sizeof(double) * nr * nc), *f = malloc(sizeof(double) * nr * nc);
    double out[5 * 37];
    int64_t i, j;
    CHECK(x != NULL && f != NULL);
    for (i = 0; i < nr; i++)
        for (j = 0; j < nc; j++) {
            x[i * nc + j] = urand() + 1e6 * (double)(j % 3); /* some columns shifted by 1e6, 2e6 */
            f[j * nr + i] = x[i * nc + j];
        }
    /* C order: row blocks loop */
    shardc_array_t a = arr2d(x, SHARDC_DT_F64, 8, nr, nc, nc * 8, 8);
    CHECK_RC(shardc_colstats_block(&a, 0, nr, 0, nc, out, nc));
    check_block(x, nr, nc, out, nc);
    /* Fortran order: column loop */
    shardc_array_t b = arr2d(f, SHARDC_DT_F64, 8, nr, nc, 8, nr * 8);
    CHECK_RC(shardc_colstats_block(&b, 0, nr, 0, nc, out, nc));
    check_block(x, nr, nc, out, nc);
    /* a sub-block of rows and columns (non-unit strides through the view) */
    {
        shardc_array_t v = arr2d(x, SHARDC_DT_F64, 8, nr / 2, nc, 2 * nc * 8, 8);
        double *y = malloc(sizeof(double) * (nr / 2) * nc);
        CHECK(y != NULL);
        for (i = 0; i < nr / 2; i++)
            memcpy(y + i * nc, x + 2 * i * nc, sizeof(double) * nc);
        CHECK_RC(shardc_colstats_block(&v, 0, nr / 2, 0, nc, out, nc));
        check_block(y, nr / 2, nc, out, nc);
        free(y);
    }
    free(x);
    free(f);
}

static void test_float32_and_int(void)
{
    const int64_t nr = 513, nc = 5;
    float xf[513 * 5];
    int32_t xi[513 * 5];
    double xd[513 * 5], out[25];
    int64_t i;
    for (i = 0; i < nr * nc; i++) {
        xf[i] = (float)(urand() + 1000.0);
        xi[i] = (int32_t)(urand() * 1e8);
    }
    for (i = 0; i < nr * nc; i++)
        xd[i] = (double)xf[i];
    shardc_array_t a = arr2d(xf, SHARDC_DT_F32, 4, nr, nc, nc * 4, 4);
    CHECK_RC(shardc_colstats_block(&a, 0, nr, 0, nc, out, nc));
    check_block(xd, nr, nc, out, nc);
    for (i = 0; i < nr * nc; i++)
        xd[i] = (double)xi[i];
    shardc_array_t b = arr2d(xi, SHARDC_DT_I32, 4, nr, nc, nc * 4, 4);
    CHECK_RC(shardc_colstats_block(&b, 0, nr, 0, nc, out, nc));
    check_block(xd, nr, nc, out, nc);
}

static void test_nan_inf_and_tiny_shapes(void)
{
    /* 4 rows x 4 columns: col 0 has a NaN, col 1 a +inf (not first), col 2 starts with -inf, col 3 finite */
    double x[16] = {NAN, 1, -INFINITY, 1, 2, INFINITY, 5, 2, 3, 2, 6, 3, 4, 3, 7, 4};
    double out[20];
    shardc_array_t a = arr2d(x, SHARDC_DT_F64, 8, 4, 4, 32, 8);
    CHECK_RC(shardc_colstats_block(&a, 0, 4, 0, 4, out, 4));
    CHECK(isnan(out[4 + 0]) && isnan(out[16 + 0]));         /* NaN: sum and M2 */
    CHECK(isinf(out[4 + 1]) && out[4 + 1] > 0 && isnan(out[16 + 1])); /* +inf: sum inf, M2 NaN */
    CHECK(isinf(out[4 + 2]) && out[4 + 2] < 0 && isnan(out[16 + 2]));
    CHECK(out[8 + 2] == 0); /* a non-finite first value is no shift */
    CHECK(out[4 + 3] == 10 && fabs(out[16 + 3] - 5.0) < 1e-15);
    /* one row: M2 0; one column */
    CHECK_RC(shardc_colstats_block(&a, 1, 2, 3, 4, out, 1));
    CHECK(out[0] == 1 && out[1] == 2 && out[4] == 0);
    CHECK_RC(shardc_colstats_block(&a, 0, 0, 0, 4, out, 4)); /* no rows */
    CHECK(out[0] == 0 && out[4] == 0 && out[16] == 0);
    /* bad arguments */
    CHECK(shardc_colstats_block(&a, 0, 5, 0, 4, out, 4) == -EINVAL);
    CHECK(shardc_colstats_block(&a, 0, 4, 0, 4, out, 3) == -EINVAL);
    a.dtype = SHARDC_DT_OTHER;
    CHECK(shardc_colstats_block(&a, 0, 4, 0, 4, out, 4) == -EINVAL);
}

static int fail_at_5(const shardc_kernel_args_t *a, int64_t start, int64_t stop)
{
    int64_t *out = (int64_t *)a->arrays[0].data;
    for (int64_t i = start; i < stop; i++) {
        if (i == 5)
            return 9;
        out[i] = i + 1;
    }
    return 0;
}

static void test_runner_marks_counts_and_stops(void)
{
    uint64_t n = shardc_status_bytes(2);
    void *mem = aligned_alloc(64, (n + 63) / 64 * 64);
    shardc_status_writer_t *w = malloc((size_t)shardc_status_writer_size());
    uint8_t done[3000];
    int64_t out[3000];
    shardc_array_t arr;
    shardc_kernel_args_t args;
    shardc_krun_t res;
    shardc_status_snap_t snap;
    int64_t i;

    CHECK(mem != NULL && w != NULL);
    CHECK_RC(shardc_status_init(mem, n, 2));
    CHECK_RC(shardc_status_writer_init(w, mem, 1));
    memset(done, 0, sizeof(done));
    memset(out, 0, sizeof(out));
    CHECK_RC(shardc_status_writer_set_done(w, done, sizeof(done)));
    memset(&arr, 0, sizeof(arr));
    arr.data = out;
    arr.ndim = 1;
    arr.shape[0] = 3000;
    arr.strides[0] = 8;
    memset(&args, 0, sizeof(args));
    args.abi = SHARDC_KERNEL_ABI;
    args.narrays = 1;
    args.arrays = &arr;
    args.nshards = 3000;

    /* block 0..9 stops at the failing shard 5: marks 0..4, counted, row idle */
    CHECK(shardc_kernel_run(fail_at_5, &args, w, 0, 10, 0, 10, 0, &res) == SHARDC_KRUN_FAILED);
    CHECK(res.ran == 5 && res.sid == 5 && res.code == 9 && res.t1 >= res.t0);
    for (i = 0; i < 10; i++)
        CHECK(done[i] == (i < 5 ? 1 : 0));
    CHECK_RC(shardc_status_read(mem, 1, &snap));
    CHECK(snap.state == SHARDC_STATUS_IDLE && snap.done == 5 && snap.block0 == 0 && snap.blockn == 10);
    /* resume after it, inside the same block */
    CHECK(shardc_kernel_run(fail_at_5, &args, w, 0, 10, 6, 10, 0, &res) == SHARDC_KRUN_DONE);
    CHECK(res.ran == 4 && res.sid == -1);
    CHECK(done[5] == 0 && done[6] == 1 && done[9] == 1 && out[9] == 10);
    CHECK_RC(shardc_status_read(mem, 1, &snap));
    CHECK(snap.state == SHARDC_STATUS_IDLE && snap.done == 9 && snap.current == 9);
    /* a long block: every shard marked (exercises the time-stamp stride) */
    CHECK(shardc_kernel_run(fail_at_5, &args, w, 10, 2990, 10, 3000, 0, &res) == SHARDC_KRUN_DONE);
    CHECK(res.ran == 2990 && shardc_status_done_count(done, 3000) == 2999);
    /* bad ranges */
    CHECK(shardc_kernel_run(fail_at_5, &args, w, 10, 5, 9, 12, 0, &res) == -EINVAL);
    CHECK(shardc_kernel_run(fail_at_5, &args, w, 10, 5, 12, 12, 0, &res) == -EINVAL);
    CHECK(shardc_kernel_call(fail_at_5, &args, 5, 6) == 9);
    free(w);
    free(mem);
}

static void test_colstats_kernel_entry(void)
{
    const int64_t nr = 10, nc = 3;
    double x[30], P[4 * 5 * 3];
    shardc_array_t arrs[2];
    shardc_kernel_args_t args;
    int64_t i;
    for (i = 0; i < nr * nc; i++)
        x[i] = (double)i;
    arrs[0] = arr2d(x, SHARDC_DT_F64, 8, nr, nc, nc * 8, 8);
    memset(&arrs[1], 0, sizeof(arrs[1]));
    arrs[1].data = P;
    arrs[1].ndim = 3;
    arrs[1].dtype = SHARDC_DT_F64;
    arrs[1].writable = 1;
    arrs[1].shape[0] = 4;
    arrs[1].shape[1] = SHARDC_COLSTATS_ROWS;
    arrs[1].shape[2] = nc;
    arrs[1].strides[0] = 8 * SHARDC_COLSTATS_ROWS * nc;
    arrs[1].strides[1] = 8 * nc;
    arrs[1].strides[2] = 8;
    memset(&args, 0, sizeof(args));
    args.narrays = 2;
    args.arrays = arrs;
    args.block = 3; /* 4 row blocks: 3, 3, 3, 1 rows */
    args.iparams[0] = SHARDC_COLSTATS_ROW_BLOCKS;
    CHECK(shardc_kern_colstats(&args, 0, 4) == 0);
    CHECK(P[3 * 15 + 0] == 1 && P[3 * 15 + 3 + 0] == 27); /* block 3: row 9, column 0 */
    CHECK(P[0] == 3 && P[3 + 1] == 1 + 4 + 7);              /* block 0 sum of column 1 */
    args.iparams[0] = SHARDC_COLSTATS_COL_BLOCKS;
    args.block = 2; /* column blocks: 2 shards over 3 columns, into P[0] */
    CHECK(shardc_kern_colstats(&args, 0, 2) == 0);
    CHECK(P[0] == 10 && P[3 + 2] == 2 + 5 + 8 + 11 + 14 + 17 + 20 + 23 + 26 + 29);
    arrs[1].strides[2] = 16; /* not C-contiguous partials */
    CHECK(shardc_kern_colstats(&args, 0, 1) == -EINVAL);
}

static void test_locate_and_resolve(void)
{
    char path[4096], sym[256], err[256];
    uint64_t off = 0;
    void *p;
    CHECK_RC(shardc_kernel_locate((void *)&div, path, sizeof(path), sym, sizeof(sym), &off));
    CHECK(strstr(path, "libc") != NULL && strcmp(sym, "div") == 0);
    p = shardc_kernel_resolve(path, "div", 0, err, sizeof(err));
    CHECK(p == (void *)&div);
    p = shardc_kernel_resolve(path, "", off, err, sizeof(err));
    CHECK(p == (void *)&div);
    CHECK(shardc_kernel_resolve(path, "no_such_symbol_here", 0, err, sizeof(err)) == NULL);
    CHECK(strlen(err) > 0);
    CHECK(shardc_kernel_resolve("/nonexistent/lib.so", "x", 0, err, sizeof(err)) == NULL);
}

int main(void)
{
    RUN(test_layouts_match_reference);
    RUN(test_float32_and_int);
    RUN(test_nan_inf_and_tiny_shapes);
    RUN(test_runner_marks_counts_and_stops);
    RUN(test_colstats_kernel_entry);
    RUN(test_locate_and_resolve);
    return 0;
}
