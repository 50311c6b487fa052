/*
 * seqlock.pml - SPIN model of a status row's snapshot protocol (the
 * two-copy seqlock of csrc/status.c): a worker publishes state changes
 * field by field into the hidden copy and then bumps seq; the master reads
 * seq, the copy seq names, and seq again, retrying if it moved.  The worker
 * may be SIGKILLed at any step.
 *
 * Checked: every snapshot the reader accepts is one the writer published
 * whole: RUNNING comes with the current shard's own start time (modelled by
 * `tag`, the id of the shard whose begin stamped it), and snapshots never go
 * back in time; the reader always finishes, also when the writer died in
 * the middle of an update (no invalid end state).
 *
 * Variants (spin -D...), both wrong on purpose: -DNOSEQ writes one copy in
 * place with no sequence (what plain Python stores did); -DSAMECOPY writes
 * the visible copy instead of the hidden one.  tests/test_spin.py checks
 * that pan finds a torn snapshot in each, so the model is known to be able
 * to fail.
 *
 * As in protocol.pml, steps interleave under sequential consistency; the
 * release/acquire pairs in status.c are what keep these steps in order on
 * weakly ordered hardware.
 */

#define IDLE    0
#define RUNNING 1

byte seq;
byte st[2];
byte cur[2];
byte tag[2];
bool killed;

/* publish(): the hidden copy field by field (state, current, start time,
 * in status.c's order), then the sequence bump that makes it visible. */
inline publish(S, C) {
#ifdef NOSEQ
    st[0] = S; cur[0] = C; tag[0] = C;
#elif defined(SAMECOPY)
    nx = seq % 2;
    st[nx] = S; cur[nx] = C; tag[nx] = C;
    seq++
#else
    nx = 1 - (seq % 2);
    st[nx] = S; cur[nx] = C; tag[nx] = C;
    seq++
#endif
}

active proctype writer() {
    byte nx;
    {
        publish(RUNNING, 1);   /* begin(1) */
        publish(RUNNING, 2);   /* next(1, 2) */
        publish(IDLE, 2);      /* block_end(2) */
        publish(RUNNING, 3);   /* begin(3) */
        publish(IDLE, 3)       /* end(3) */
    } unless { killed }
}

active proctype killer() {
    if
    :: killed = true   /* SIGKILL at whatever step the writer is */
    :: skip
    fi
}

active proctype reader() {
    byte s1, rst, rcur, rtag, i, last;
    for (i : 1 .. 3) {
        do
        :: s1 = seq;
#ifdef NOSEQ
           rst = st[0]; rcur = cur[0]; rtag = tag[0];
           break
#else
           rst = st[s1 % 2]; rcur = cur[s1 % 2]; rtag = tag[s1 % 2];
           if
           :: seq == s1 -> break
           :: else -> skip
           fi
#endif
        od;
        assert(rst != RUNNING || rtag == rcur);   /* its own start time */
        assert(rcur >= last);                      /* never back in time */
        last = rcur
    }
}
