/*
 * kern_stats.c - column count / sum / mean / M2 of a 2-D block in one pass
 * over memory (see kern_stats.h for the algorithm and the partial layout).
 *
 * Two loop orders, picked from the strides (never from a flag the caller
 * could get wrong): when a row's elements are closer together than a
 * column's (C order, or a view of it) the rows are streamed in chunks and
 * every column is updated per row (the inner loop runs along a row, unit
 * stride for C-contiguous data, so the compiler vectorizes it); otherwise
 * (Fortran order) each column is streamed on its own.  One macro body per
 * loop order is instantiated for each input type, so the element load is a
 * plain typed load converted to double.
 */
#if defined(__GNUC__) && !defined(__clang__)
/* The per-row loops are independent per column: vectorizing them changes no
 * result (no reassociation within a column), and -O2 of older GCCs does not. */
#pragma GCC optimize("O3")
#endif

#include "kern_stats.h"

#include <errno.h>
#include <stdlib.h>

#define CHUNK_ELEMS 16384 /* elements per chunk: 128 KiB of doubles, stays in L2 for pass 2 */

/* Chan et al.: fold a chunk of nb rows (sum cs, mean cmu, M2 cm) into the
 * running moments of na rows. */
#define CHAN_FOLD(na, nb, cs, cmu, cm, sum, mean, m2)                          \
    do {                                                                       \
        double nn_ = (na) + (nb), fb_ = (nb) / nn_, wa_ = (na) * (nb) / nn_;   \
        double d_ = (cmu) - (mean);                                            \
        (mean) += d_ * fb_;                                                    \
        (m2) += (cm) + d_ * d_ * wa_;                                          \
        (sum) += (cs);                                                         \
    } while (0)

/* Rows streamed, all columns updated per row.  sum/mean/m2: ld-apart rows
 * of out; cs/cmu/cm: scratch of nc doubles each. */
#define ROWS_IMPL(NAME, T)                                                              \
    static void NAME(const char *base, int64_t s0, int64_t s1, int64_t nr, int64_t nc, \
                     double *sum, const double *K, double *mean, double *m2, double *cs,\
                     double *cmu, double *cm)                                          \
    {                                                                                  \
        int64_t r, i, j, R = CHUNK_ELEMS / (nc > 0 ? nc : 1);                          \
        double n = 0;                                                                  \
        int unit = s1 == (int64_t)sizeof(T);                                           \
        if (R < 1)                                                                     \
            R = 1;                                                                     \
        for (r = 0; r < nr; r += R) {                                                  \
            int64_t rr = nr - r < R ? nr - r : R;                                      \
            double inv = 1.0 / (double)rr;                                             \
            for (j = 0; j < nc; j++)                                                   \
                cs[j] = cm[j] = 0;                                                     \
            for (i = 0; i < rr; i++) {                                                 \
                const char *row = base + (r + i) * s0;                                 \
                if (unit) {                                                            \
                    const T *p = (const T *)row;                                       \
                    for (j = 0; j < nc; j++)                                           \
                        cs[j] += (double)p[j] - K[j];                                  \
                } else {                                                               \
                    for (j = 0; j < nc; j++)                                           \
                        cs[j] += (double)*(const T *)(row + j * s1) - K[j];            \
                }                                                                      \
            }                                                                          \
            for (j = 0; j < nc; j++)                                                   \
                cmu[j] = cs[j] * inv;                                                  \
            for (i = 0; i < rr; i++) {                                                 \
                const char *row = base + (r + i) * s0;                                 \
                if (unit) {                                                            \
                    const T *p = (const T *)row;                                       \
                    for (j = 0; j < nc; j++) {                                         \
                        double d = ((double)p[j] - K[j]) - cmu[j];                     \
                        cm[j] += d * d;                                                \
                    }                                                                  \
                } else {                                                               \
                    for (j = 0; j < nc; j++) {                                         \
                        double d = ((double)*(const T *)(row + j * s1) - K[j]) - cmu[j];\
                        cm[j] += d * d;                                                \
                    }                                                                  \
                }                                                                      \
            }                                                                          \
            for (j = 0; j < nc; j++)                                                   \
                CHAN_FOLD(n, (double)rr, cs[j], cmu[j], cm[j], sum[j], mean[j], m2[j]); \
            n += (double)rr;                                                           \
        }                                                                              \
    }

/* Each column streamed on its own (rows adjacent: Fortran order). */
#define COLS_IMPL(NAME, T)                                                              \
    static void NAME(const char *base, int64_t s0, int64_t s1, int64_t nr, int64_t nc, \
                     double *sum, const double *K, double *mean, double *m2)           \
    {                                                                                  \
        int64_t r, i, j;                                                               \
        for (j = 0; j < nc; j++) {                                                     \
            const char *col = base + j * s1;                                           \
            double n = 0, S = 0, M = 0, Q = 0, k = K[j];                               \
            for (r = 0; r < nr; r += CHUNK_ELEMS) {                                    \
                int64_t rr = nr - r < CHUNK_ELEMS ? nr - r : CHUNK_ELEMS;              \
                double cs = 0, cm = 0, mu;                                             \
                if (s0 == (int64_t)sizeof(T)) {                                        \
                    const T *p = (const T *)col + r;                                   \
                    for (i = 0; i < rr; i++)                                           \
                        cs += (double)p[i] - k;                                        \
                    mu = cs / (double)rr;                                              \
                    for (i = 0; i < rr; i++) {                                         \
                        double d = ((double)p[i] - k) - mu;                            \
                        cm += d * d;                                                   \
                    }                                                                  \
                } else {                                                               \
                    for (i = 0; i < rr; i++)                                           \
                        cs += (double)*(const T *)(col + (r + i) * s0) - k;            \
                    mu = cs / (double)rr;                                              \
                    for (i = 0; i < rr; i++) {                                         \
                        double d = ((double)*(const T *)(col + (r + i) * s0) - k) - mu;\
                        cm += d * d;                                                   \
                    }                                                                  \
                }                                                                      \
                CHAN_FOLD(n, (double)rr, cs, mu, cm, S, M, Q);                         \
                n += (double)rr;                                                       \
            }                                                                          \
            sum[j] = S;                                                                \
            mean[j] = M;                                                               \
            m2[j] = Q;                                                                 \
        }                                                                              \
    }

#define BOTH(S, T) ROWS_IMPL(rows_##S, T) COLS_IMPL(cols_##S, T)
BOTH(f64, double)
BOTH(f32, float)
BOTH(i64, int64_t)
BOTH(i32, int32_t)
BOTH(i16, int16_t)
BOTH(i8, int8_t)
BOTH(u64, uint64_t)
BOTH(u32, uint32_t)
BOTH(u16, uint16_t)
BOTH(u8, uint8_t)

typedef void (*rows_fn)(const char *, int64_t, int64_t, int64_t, int64_t, double *,
                        const double *, double *, double *, double *, double *, double *);
typedef void (*cols_fn)(const char *, int64_t, int64_t, int64_t, int64_t, double *,
                        const double *, double *, double *);

static int pick(int32_t dtype, rows_fn *rf, cols_fn *cf)
{
    switch (dtype) {
#define CASE(CODE, S)     \
    case CODE:            \
        *rf = rows_##S;   \
        *cf = cols_##S;   \
        return 0;
        CASE(SHARDC_DT_F64, f64)
        CASE(SHARDC_DT_F32, f32)
        CASE(SHARDC_DT_I64, i64)
        CASE(SHARDC_DT_I32, i32)
        CASE(SHARDC_DT_I16, i16)
        CASE(SHARDC_DT_I8, i8)
        CASE(SHARDC_DT_U64, u64)
        CASE(SHARDC_DT_U32, u32)
        CASE(SHARDC_DT_U16, u16)
        CASE(SHARDC_DT_U8, u8)
        CASE(SHARDC_DT_BOOL, u8)
#undef CASE
    default:
        return -EINVAL;
    }
}

static int64_t iabs64(int64_t v)
{
    return v < 0 ? -v : v;
}

/* The shift of column j: its first element when finite, else 0 (an inf or
 * NaN shift would turn every difference into NaN and lose NumPy's inf). */
static double shift_of(const shardc_array_t *x, const char *p)
{
    double v;
    switch (x->dtype) {
    case SHARDC_DT_F64:
        v = *(const double *)p;
        break;
    case SHARDC_DT_F32:
        v = (double)*(const float *)p;
        break;
    default:
        return 0; /* integers: exact in double up to 2**53, no shift needed for accuracy */
    }
    return (v - v == 0) ? v : 0; /* v - v is NaN for inf and NaN */
}

int shardc_colstats_block(const shardc_array_t *x, int64_t r0, int64_t r1,
                          int64_t c0, int64_t c1, double *out, int64_t ld)
{
    rows_fn rf;
    cols_fn cf;
    int64_t nr = r1 - r0, nc = c1 - c0, j, s0, s1;
    const char *base;
    double *K = out + 2 * ld, *sum = out + ld;

    if (x == NULL || out == NULL || x->ndim != 2 || pick(x->dtype, &rf, &cf) < 0 || r0 < 0 ||
        c0 < 0 || nr < 0 || nc < 0 || r1 > x->shape[0] || c1 > x->shape[1] || ld < nc)
        return -EINVAL;
    s0 = x->strides[0];
    s1 = x->strides[1];
    base = (const char *)x->data + r0 * s0 + c0 * s1;
    for (j = 0; j < nc; j++) {
        out[j] = (double)nr;
        sum[j] = out[3 * ld + j] = out[4 * ld + j] = 0;
        K[j] = nr > 0 ? shift_of(x, base + j * s1) : 0;
    }
    if (nr == 0 || nc == 0)
        return 0;
    if (nc == 1 || (nr > 1 && iabs64(s0) < iabs64(s1))) {
        cf(base, s0, s1, nr, nc, sum, K, out + 3 * ld, out + 4 * ld);
    } else {
        double *scratch = malloc(3 * (size_t)nc * sizeof(double));
        if (scratch == NULL)
            return -ENOMEM;
        rf(base, s0, s1, nr, nc, sum, K, out + 3 * ld, out + 4 * ld, scratch, scratch + nc,
           scratch + 2 * nc);
        free(scratch);
    }
    /* The sums were of x - K: add the shift back once (one rounding). */
    for (j = 0; j < nc; j++)
        if (K[j] != 0)
            sum[j] += (double)nr * K[j];
    return 0;
}

int shardc_kern_colstats(const shardc_kernel_args_t *a, int64_t start, int64_t stop)
{
    const shardc_array_t *x, *p;
    int64_t k, nrows, ncols, block;
    double *P;

    if (a == NULL || a->narrays < 2)
        return -EINVAL;
    x = &a->arrays[0];
    p = &a->arrays[1];
    if (x->ndim != 2 || p->ndim != 3 || p->dtype != SHARDC_DT_F64 || !p->writable)
        return -EINVAL;
    nrows = x->shape[0];
    ncols = x->shape[1];
    block = a->block;
    if (block < 1 || p->shape[1] != SHARDC_COLSTATS_ROWS || p->shape[2] != ncols ||
        p->strides[2] != 8 || p->strides[1] != 8 * ncols ||
        p->strides[0] != 8 * SHARDC_COLSTATS_ROWS * ncols)
        return -EINVAL;
    P = p->data;
    for (k = start; k < stop; k++) {
        int rc;
        if (a->iparams[0] == SHARDC_COLSTATS_ROW_BLOCKS) {
            int64_t r0 = k * block, r1 = r0 + block > nrows ? nrows : r0 + block;
            if (k >= p->shape[0])
                return -EINVAL;
            rc = shardc_colstats_block(x, r0, r1, 0, ncols, P + k * SHARDC_COLSTATS_ROWS * ncols, ncols);
        } else {
            int64_t c0 = k * block, c1 = c0 + block > ncols ? ncols : c0 + block;
            rc = shardc_colstats_block(x, 0, nrows, c0, c1, P + c0, ncols);
        }
        if (rc < 0)
            return rc;
    }
    return 0;
}
