/*
 * legacy.h - a fingerprint of the legacy global random generators' states
 * (NumPy's MT19937 behind np.random, CPython's random._inst), so that a
 * worker can tell, after a shard ran, whether it drew from (or reseeded) one
 * of them.  shardc/worker/seeding.py builds lazy per-shard seeding on it.
 *
 * Nothing here is shared between processes: the watched states are the
 * calling process's own, read by the thread that runs shards (the one that
 * draws from them), so no ordering is involved.
 */
#ifndef SHARDC_LEGACY_H
#define SHARDC_LEGACY_H

#include <stdint.h>

/* --- cdef begin --- */
/* Watch up to two Mersenne Twister states, each 624 uint32 words (`key`) and
 * an int position (`pos`, the next word to use; 624: regenerate first).
 * An address of 0 leaves that state out.  Takes the fingerprint at once.
 * The caller guarantees the addresses stay valid while watched (it keeps the
 * owning objects alive) and has checked the layout. */
void shardc_legacy_watch(uintptr_t np_key, uintptr_t np_pos, uintptr_t py_key, uintptr_t py_pos);
/* Which watched states changed since the last call (or the watch): bit 0
 * the first (NumPy's), bit 1 the second; 0 if none.  The fingerprint is
 * taken again either way.  A draw moves `pos` (624 draws bring it back, but
 * regenerate every key word on the way); seeding and setting a state
 * rewrite the key. */
int shardc_legacy_changed(void);
/* --- cdef end --- */

#endif /* SHARDC_LEGACY_H */
