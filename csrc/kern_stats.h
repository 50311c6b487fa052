/*
 * kern_stats.h - built-in single-pass column statistics, as native kernels
 * (the ABI of kernel.h) and as a plain function over one block.
 *
 * A block's partial is five rows of ncols doubles: count, sum, shift K
 * (the column's first value in the block, 0 if not finite), mean - K, and
 * M2 (the sum of squared deviations from the block's mean).  Keeping the
 * mean relative to a shift close to the data keeps the merge exact where
 * it matters: with columns around 1e6 a mean is only known to ulp(1e6) =
 * 1.2e-10, and the Chan update squares the difference of two block means
 * (~1e-2), which lost 1e-10 of relative accuracy in M2 before the shift.  Partials merge
 * with Chan et al.'s pairwise update (shardc/colstats.py does it on the
 * master, in a fixed tree over block ids); the column mean reported is
 * sum / count (NumPy's mean), the variance M2 / (count - ddof).  All
 * accumulation is in double, whatever the input type; NaN and inf propagate
 * as in NumPy (a NaN anywhere makes mean and variance NaN; an inf makes the
 * mean inf and the variance NaN).
 *
 * Inside a block the rows are taken in chunks (128 rows of a row block, 4096
 * elements of a column): each chunk is summed shifted by its own first
 * value (sum and sum of squares of x - k, one pass, vectorized across
 * columns), its M2 taken from those, and the chunk folded into the block's
 * running moments with Chan's update: one pass over memory, and the
 * cancellation of the shifted sums is bounded by how far a chunk's first
 * value lies from the chunk's mean (in standard deviations), not by how far
 * the data lies from 0.
 */
#ifndef SHARDC_KERN_STATS_H
#define SHARDC_KERN_STATS_H

#include <stdint.h>

#include "kernel.h"

/* --- cdef begin --- */
/* iparams[0] of shardc_kern_colstats: what a shard covers. */
#define SHARDC_COLSTATS_ROW_BLOCKS 0 /* shard k: rows of block k, every column; P[k] */
#define SHARDC_COLSTATS_COL_BLOCKS 1 /* shard k: columns of block k, every row; P[0][:, cols] */
#define SHARDC_COLSTATS_ROWS 5       /* rows of a partial: count, sum, shift, mean - shift, M2 */

/* The kernel: arrays[0] = X (2-D, any numeric dtype, any strides),
 * arrays[1] = P (float64, C-contiguous, shape (nparts, 5, ncols)); shard
 * geometry "contiguous" over rows (ROW_BLOCKS) or columns (COL_BLOCKS).
 * Returns 0, or -EINVAL (bad arrays), -ENOMEM. */
int shardc_kern_colstats(const shardc_kernel_args_t *a, int64_t start, int64_t stop);

/* Moments of rows r0..r1-1, columns c0..c1-1 of x into out: five rows of
 * (c1 - c0) doubles, `ld` doubles apart (count, sum, shift, mean - shift, M2). */
int shardc_colstats_block(const shardc_array_t *x, int64_t r0, int64_t r1,
                          int64_t c0, int64_t c1, double *out, int64_t ld);
/* Merge partials P[0..k-1] (each COLSTATS_ROWS x nc doubles, contiguous)
 * in place in the fixed pairwise tree of shardc.moments.merge_tree; the
 * result is P[0].  Same bits as the NumPy version. */
int shardc_moments_tree(double *P, int64_t k, int64_t nc);
/* --- cdef end --- */

#endif /* SHARDC_KERN_STATS_H */
