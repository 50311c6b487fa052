/*
 * seedseq.h - the state NumPy's SeedSequence derives for one shard's
 * generator, without building the Python objects (~10 us a shard in NumPy,
 * for shard.rng).  shardc/shards.py checks it against NumPy at import and
 * feeds it to NumPy's PCG64, so shard.rng's streams are NumPy's own.
 */
#ifndef SHARDC_SEEDSEQ_H
#define SHARDC_SEEDSEQ_H

#include <stddef.h>
#include <stdint.h>

/* --- cdef begin --- */
/* What numpy.random.SeedSequence(entropy, spawn_key=(key,)).generate_state(
 * n_out, numpy.uint64) returns (default pool size 4), into out[0..n_out-1].
 * `entropy` is the int's little-endian 32-bit words, n_entropy >= 1 (the int
 * 0 is the one word 0).  0, or -EINVAL for NULL pointers or n_entropy 0. */
int shardc_seedseq_state(const uint32_t *entropy, size_t n_entropy, uint64_t key, uint64_t *out, size_t n_out);
/* --- cdef end --- */

#endif /* SHARDC_SEEDSEQ_H */
