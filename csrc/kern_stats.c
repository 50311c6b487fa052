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
/* The per-row loops are independent per column: vectorizing them changes no
 * result (no reassociation within a column), and -O2 of older GCCs does not.
 * No fused multiply-adds: the merges must give the bits of their NumPy twin
 * (shardc.moments), and results must not depend on the CPU. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("O3", "fp-contract=off")
#endif

#include "kern_stats.h"

/* x86-64: an AVX2 copy of the loops too, picked at load time (ifunc); four
 * doubles per instruction instead of two.  No result changes: the loops
 * never reassociate within a column. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    !defined(__SANITIZE_THREAD__) /* ifunc resolvers run before the TSan runtime is up */
#define SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SIMD_CLONES
#endif

#include <errno.h>
#include <stdlib.h>

#define ROW_CHUNK 128    /* rows per chunk (row blocks): one merge per column per chunk */
#define COL_CHUNK 4096   /* elements per chunk (column blocks) */
#define LANES 8          /* independent accumulators along a column */

/* The shift of a chunk's column: its first value when finite, else 0 (an
 * inf or NaN shift would turn every difference into NaN and lose NumPy's
 * inf); v - v is NaN exactly for inf and NaN. */
#define FINITE_OR_0(v) (((v) - (v) == 0) ? (v) : 0.0)

/* Fold a chunk of nb rows - shift kc, shifted sum s1, shifted sum of
 * squares s2 - into the running moments (na rows, shift k, mean - k: mean,
 * m2, sum).  The chunk's M2 is s2 - s1^2/nb (the "shifted data" formula:
 * with the shift a value of the chunk, its cancellation costs a factor
 * 1 + (mean - kc)^2 / var, not the 1 + mean^2 / var of raw sums); then
 * Chan et al.'s update with the chunk mean moved to the running shift. */
#define FOLD(na, nb, kc, s1, s2, k, mean, m2, sum)                           \
    do {                                                                     \
        double mc_ = (s1) / (nb), m2c_ = (s2) - (s1) * mc_;                  \
        double nn_ = (na) + (nb), fb_ = (nb) / nn_, wa_ = (na) * fb_;        \
        double d_ = (((kc) - (k)) + mc_) - (mean);                           \
        if (m2c_ < 0) /* rounding of an all-equal chunk; NaN stays NaN */    \
            m2c_ = 0;                                                        \
        (mean) += d_ * fb_;                                                  \
        (m2) += m2c_ + d_ * d_ * wa_;                                        \
        (sum) += (s1) + (nb) * (kc);                                         \
    } while (0)

/* Rows streamed, every column updated per row (the inner loop runs along a
 * row: unit stride for C order, vectorized across columns).  sum, mean,
 * m2: rows of out; K: the block's shifts; kc, s1, s2: scratch of nc. */
#define ROWS_IMPL(NAME, T)                                                              \
    SIMD_CLONES static void NAME(const char *base, int64_t s0, int64_t s1, int64_t nr, int64_t nc, \
                     double *sum, const double *K, double *mean, double *m2,           \
                     double *restrict kc, double *restrict a1, double *restrict a2)    \
    {                                                                                  \
        int64_t r, i, j;                                                               \
        double n = 0;                                                                  \
        int unit = s1 == (int64_t)sizeof(T);                                           \
        for (r = 0; r < nr; r += ROW_CHUNK) {                                          \
            int64_t rr = nr - r < ROW_CHUNK ? nr - r : ROW_CHUNK;                      \
            const char *row0 = base + r * s0;                                          \
            for (j = 0; j < nc; j++) {                                                 \
                double v = (double)*(const T *)(row0 + j * s1);                        \
                kc[j] = FINITE_OR_0(v);                                                \
                a1[j] = a2[j] = 0;                                                     \
            }                                                                          \
            i = 0;                                                                     \
            if (unit) /* four rows per sweep: a quarter of the accumulator traffic */ \
                for (; i + 4 <= rr; i += 4) {                                          \
                    const T *p0 = (const T *)(row0 + i * s0);                          \
                    const T *p1 = (const T *)(row0 + (i + 1) * s0);                    \
                    const T *p2 = (const T *)(row0 + (i + 2) * s0);                    \
                    const T *p3 = (const T *)(row0 + (i + 3) * s0);                    \
                    for (j = 0; j < nc; j++) {                                         \
                        double k_ = kc[j];                                             \
                        double y0 = (double)p0[j] - k_, y1 = (double)p1[j] - k_;       \
                        double y2 = (double)p2[j] - k_, y3 = (double)p3[j] - k_;       \
                        a1[j] += (y0 + y1) + (y2 + y3);                                \
                        a2[j] += (y0 * y0 + y1 * y1) + (y2 * y2 + y3 * y3);            \
                    }                                                                  \
                }                                                                      \
            for (; i < rr; i++) {                                                      \
                const char *row = row0 + i * s0;                                       \
                if (unit) {                                                            \
                    const T *p = (const T *)row;                                       \
                    for (j = 0; j < nc; j++) {                                         \
                        double y = (double)p[j] - kc[j];                               \
                        a1[j] += y;                                                    \
                        a2[j] += y * y;                                                \
                    }                                                                  \
                } else {                                                               \
                    for (j = 0; j < nc; j++) {                                         \
                        double y = (double)*(const T *)(row + j * s1) - kc[j];         \
                        a1[j] += y;                                                    \
                        a2[j] += y * y;                                                \
                    }                                                                  \
                }                                                                      \
            }                                                                          \
            for (j = 0; j < nc; j++)                                                   \
                FOLD(n, (double)rr, kc[j], a1[j], a2[j], K[j], mean[j], m2[j], sum[j]); \
            n += (double)rr;                                                           \
        }                                                                              \
    }

/* Each column streamed on its own (rows adjacent: Fortran order), with
 * LANES accumulators so the additions do not wait on each other. */
#define COLS_IMPL(NAME, T)                                                              \
    static void NAME(const char *base, int64_t s0, int64_t s1, int64_t nr, int64_t nc, \
                     double *sum, const double *K, double *mean, double *m2)           \
    {                                                                                  \
        int64_t r, i, j, l;                                                            \
        for (j = 0; j < nc; j++) {                                                     \
            const char *col = base + j * s1;                                           \
            double n = 0, S = 0, M = 0, Q = 0, k = K[j];                               \
            for (r = 0; r < nr; r += COL_CHUNK) {                                      \
                int64_t rr = nr - r < COL_CHUNK ? nr - r : COL_CHUNK;                  \
                double v0 = (double)*(const T *)(col + r * s0), kc = FINITE_OR_0(v0);  \
                double a1[LANES] = {0}, a2[LANES] = {0}, t1 = 0, t2 = 0;               \
                for (i = 0; i + LANES <= rr; i += LANES)                               \
                    for (l = 0; l < LANES; l++) {                                      \
                        double y = (double)*(const T *)(col + (r + i + l) * s0) - kc;  \
                        a1[l] += y;                                                    \
                        a2[l] += y * y;                                                \
                    }                                                                  \
                for (; i < rr; i++) {                                                  \
                    double y = (double)*(const T *)(col + (r + i) * s0) - kc;          \
                    a1[0] += y;                                                        \
                    a2[0] += y * y;                                                    \
                }                                                                      \
                for (l = 0; l < LANES; l++) {                                          \
                    t1 += a1[l];                                                       \
                    t2 += a2[l];                                                       \
                }                                                                      \
                FOLD(n, (double)rr, kc, t1, t2, k, M, Q, S);                           \
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
    case SHARDC_DT_F64: v = *(const double *)p; break;
    case SHARDC_DT_F32: v = (double)*(const float *)p; break;
    case SHARDC_DT_I64: v = (double)*(const int64_t *)p; break;
    case SHARDC_DT_I32: v = (double)*(const int32_t *)p; break;
    case SHARDC_DT_I16: v = (double)*(const int16_t *)p; break;
    case SHARDC_DT_I8: v = (double)*(const int8_t *)p; break;
    case SHARDC_DT_U64: v = (double)*(const uint64_t *)p; break;
    case SHARDC_DT_U32: v = (double)*(const uint32_t *)p; break;
    case SHARDC_DT_U16: v = (double)*(const uint16_t *)p; break;
    default: v = (double)*(const uint8_t *)p; break;
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

/* One Chan merge of partial b into partial a (both COLSTATS_ROWS x nc,
 * rows nc apart), written to o (which may be a).  The same operations in
 * the same order as shardc.moments.merge (NumPy), so both give the same
 * bits: the tree below and a reduction combining with merge() agree. */
static void merge2(const double *a, const double *b, double *o, int64_t nc)
{
    int64_t j;
    for (j = 0; j < nc; j++) {
        double na = a[j], nb = b[j], n = na + nb;
        double shift = na == 0 ? b[2 * nc + j] : a[2 * nc + j];
        double ma = na == 0 ? 0.0 : a[3 * nc + j];
        double mb = (b[2 * nc + j] - shift) + b[3 * nc + j];
        double delta = mb - ma;
        double fb = nb / (n == 0 ? 1.0 : n);
        double mean = nb == 0 ? ma : ma + delta * fb;
        double cross = (na == 0 || nb == 0) ? 0.0 : delta * delta * (na * fb);
        double m2 = a[4 * nc + j] + b[4 * nc + j] + cross;
        double sum = a[nc + j] + b[nc + j];
        o[j] = n;
        o[nc + j] = sum;
        o[2 * nc + j] = shift;
        o[3 * nc + j] = mean;
        o[4 * nc + j] = m2;
    }
}

int shardc_moments_tree(double *P, int64_t k, int64_t nc)
{
    int64_t s, i, part = SHARDC_COLSTATS_ROWS * nc;
    if (P == NULL || k < 1 || nc < 0)
        return -EINVAL;
    /* Pairs (0,1), (2,3), ... then pairs of those; an odd last one is
     * carried up: the tree of shardc.moments.merge_tree. */
    for (s = 1; s < k; s *= 2)
        for (i = 0; i + s < k; i += 2 * s)
            merge2(P + i * part, P + (i + s) * part, P + i * part, nc);
    return 0;
}
