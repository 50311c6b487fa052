/*
 * protocol.pml - SPIN model of shardc's shared-memory hand-offs between the
 * master and its workers (shm_queue dispatch): the task ring's claims and
 * repair (csrc/queue.c), the status rows (csrc/status.c) and the done map,
 * with workers SIGKILLed at any step.  The snapshot protocol of a row (its
 * two-copy seqlock) has its own, finer model: seqlock.pml.
 *
 * Checked (tests/test_spin.py runs `spin -a`, gcc pan.c, ./pan):
 *   - no shard lost: at the end every shard is completed or failed and
 *     the ring is empty;
 *   - no shard completed twice: a shard is never started again once its
 *     done mark is set, and never marked twice;
 *   - no shard queued twice, and a live worker's record is never repaired;
 *   - the finished-shard counters never exceed the done marks;
 *   - no deadlock (pan's invalid end states).
 * -DBROKEN_REPAIR (wrong on purpose: the claims of a dead worker are not
 * requeued) must fail; tests/test_spin.py checks that it does.
 *
 * What the model abstracts: SPIN interleaves steps under sequential
 * consistency.  The acquire/release pairs in the C code are what make the
 * hardware keep the program order this model assumes (see the comments next
 * to each atomic); a pop is one atomic claim (queue.c makes a claim
 * recoverable at every instruction, tested by tests/c/test_queue.c's
 * step-and-kill test); a row update is one atomic step as a snapshot sees it
 * (seqlock.pml).  Every shard succeeds when it runs; a failure would only
 * leave its done byte at 0, as a death does.  Deaths: a killer process
 * SIGKILLs up to MAXD workers, each at any step (`unless`); the master reaps
 * the dead worker, reads its row, repairs its ring record (requeues the
 * claimed shards that are not marked done, charges the running one: retried
 * until MAXA attempts, then failed), resets the row and forks a successor.
 */

#define N     3     /* shards */
#define W     2     /* worker slots */
#define MAXD  3     /* SIGKILLs */
#define MAXA  2     /* attempts per shard before it fails */
#define NONE  255
#define FINAL(s)  (done[s] || failed[s])
#define ALLFINAL  (FINAL(0) && FINAL(1) && FINAL(2))   /* for N == 3 */

#define IDLE    0
#define RUNNING 1

/* A status row as a snapshot shows it: one atomic update per state change
 * (the two-copy seqlock of csrc/status.c makes it so even if the worker
 * dies in the middle of one: checked separately by seqlock.pml). */
typedef Row {
    byte st;
    byte cur;      /* current shard; its start time is its own (seqlock.pml) */
    byte count     /* finished-shard counter (block_end adds) */
};

Row row[W];
chan ring = [N] of { byte };   /* the task ring's queued shards */
byte claimed[W];               /* ring record: bit s = shard s claimed */
bool alive[W];
bool killreq[W];
bool done[N];                  /* the done map */
byte attempts[N];
bool failed[N];
bool inq[N];                   /* queued in the ring */
byte taken;                    /* counters taken by the master (take_done) */
bool closed;
byte deaths;

/* ---------------------------------------------------------------- worker */

/* One state change (begin / next / end): one atomic update of the row. */
inline publish(w, S, C) {
    atomic { row[w].st = S; row[w].cur = C }
}

inline mark(s) {
    assert(!done[s]);          /* never marked twice */
    done[s] = true
}

/* One worker slot: each pass of the outer loop is one process forked into
 * the slot (the master sets alive[w] to fork it). */
proctype worker(byte w) {
    byte s, s2;
end:
    do
    :: alive[w] ->
        {
            do
            :: atomic { ring?s -> inq[s] = false; claimed[w] = claimed[w] | (1 << s) };
               s2 = NONE;
               if
               :: atomic { nempty(ring) -> ring?s2; inq[s2] = false;
                           claimed[w] = claimed[w] | (1 << s2) }
               :: skip
               fi;
               /* block_begin(s): current, start, RUNNING in one update */
               assert(!done[s]);   /* never run again once marked done */
               publish(w, RUNNING, s);
               /* ... the shard runs: its effects (out= writes) ... */
               if
               :: s2 != NONE ->
                  /* next(s, s2): mark s, then s2 starts */
                  mark(s);
                  assert(!done[s2]);
                  publish(w, RUNNING, s2);
                  /* block_end(s2) */
                  mark(s2);
                  publish(w, IDLE, s2);
                  row[w].count = row[w].count + 2
               :: else ->
                  /* block_end(s) */
                  mark(s);
                  publish(w, IDLE, s);
                  row[w].count = row[w].count + 1
               fi;
               claimed[w] = 0      /* ring done(): the claims are finished */
            :: atomic { closed && empty(ring) -> break }
            od
        } unless { killreq[w] };
        /* dead (or exited): the master reaps it */
        atomic { alive[w] = false; s = 0; s2 = 0 }
    od
}

/* ---------------------------------------------------------------- killer */

active proctype killer() {
    do
    :: atomic { deaths < MAXD && alive[0] && !killreq[0] -> killreq[0] = true; deaths++ }
    :: atomic { deaths < MAXD && alive[1] && !killreq[1] -> killreq[1] = true; deaths++ }
    :: break
    od
}

/* ---------------------------------------------------------------- master */

/* A snapshot read (shardc_status_read). */
inline snapshot(w) {
    atomic { rst = row[w].st; rcur = row[w].cur }
}

inline requeue(s) {
    assert(!inq[s] && !done[s] && !failed[s]);
    inq[s] = true;
    ring!s
}

active proctype master() {
    byte w, s, rst, rcur, charged, n;
    assert(N == 3);   /* ALLFINAL spells out three shards */

    /* Push every shard, fork the workers. */
    for (s : 0 .. N - 1) { inq[s] = true; ring!s }
    for (w : 0 .. W - 1) { alive[w] = true; run worker(w) }
    w = 0; s = 0;

    do
    /* A worker died: reap, read its row, repair its record, restart. */
    :: atomic { ((!alive[0] && killreq[0]) || (!alive[1] && killreq[1])) ->
       if
       :: !alive[0] && killreq[0] -> w = 0
       :: !alive[1] && killreq[1] -> w = 1
       fi };
       /* The worker is dead: nothing else writes its row or record, and
        * the requeues are one push each in the real master; so the whole
        * hand-off is one step here. */
       atomic {
       snapshot(w);
       /* repair (after the reap: the record of a live worker never) */
       assert(!alive[w]);
       charged = NONE;
       if
       :: rst == RUNNING && (claimed[w] & (1 << rcur)) && !done[rcur] -> charged = rcur
       :: else -> skip
       fi;
#ifndef BROKEN_REPAIR
       for (s : 0 .. N - 1) {
           if
           :: (claimed[w] & (1 << s)) && s != charged && !done[s] -> requeue(s)
           :: else -> skip
           fi
       }
#endif
       if
       :: charged != NONE ->
          attempts[charged]++;
          if
          :: attempts[charged] < MAXA -> requeue(charged)
          :: else -> failed[charged] = true
          fi
       :: else -> skip
       fi;
       claimed[w] = 0;
       taken = taken + row[w].count;            /* take_done */
       /* reset the row */
       row[w].st = IDLE; row[w].cur = 0; row[w].count = 0;
       killreq[w] = false;
       alive[w] = true;   /* fork a successor into the slot */
       s = 0; rst = 0; rcur = 0; charged = 0; w = 0
       }
    /* Every shard completed or failed: close the ring.  (A lost shard
     * never becomes final: the master and the workers then wait forever,
     * which pan reports as an invalid end state.) */
    :: atomic { !closed && ALLFINAL -> closed = true }
    :: closed -> break
    od;

    /* Wait for the workers to leave (or die: all work is final by now). */
    (!alive[0] && !alive[1]);

    /* No shard lost, none completed twice (asserted on the way), the ring
     * empty and every record clean; the counters never exceed the marks. */
    n = 0;
    for (s : 0 .. N - 1) {
        assert(done[s] || failed[s]);
        assert(!(done[s] && failed[s]));
        if :: done[s] -> n++ :: else -> skip fi
    }
    assert(empty(ring));
    assert(taken + row[0].count + row[1].count <= n)
}
