/*
 * kernel.c - the runner of native kernels (the ABI is in kernel.h).
 *
 * shardc_kernel_run() is the C side of a worker's loop for a native kernel:
 * Python claims a block of shard ids (shm_queue: a ring item; rpc_chunked: a
 * run of consecutive ids of a chunk) and hands the whole run to this
 * function, which cffi calls without the GIL.  Per shard it does what the
 * Python executor does (shardc/worker/executor.py), minus the interpreter:
 *
 *   call fn(a, sid, sid + 1)
 *   fn != 0                 -> stop: FAILED at sid (no done mark)
 *   guard fault counter moved -> stop: COW at sid (no done mark; Python
 *                              collects the events, restores the pages and
 *                              reports or fails the shard)
 *   else                    -> mark sid done, `current` = sid + 1
 *
 * Supervision needs no more than the status row: a SIGSEGV in fn kills the
 * worker with `current` naming the shard that ran, so the master charges
 * exactly that shard and requeues the rest of the block (the marks say
 * which ran).
 *
 * Time stamps.  The row's start time feeds the watchdog (per-shard
 * timeouts) and a clock read costs about as much as a trivial shard
 * (20-25 ns with the vDSO, far more on VMs without a stable TSC).  The
 * runner reads the clock after `stride` shards: stride doubles (up to 4096)
 * while the shards between two reads averaged under 250 ns, and drops back
 * to 1 as soon as they took longer, so a shard's visible start time is
 * never more than ~1-2 us of work early.  A shard that hangs is therefore
 * timed from within a few microseconds of its real start.
 */
#define _GNU_SOURCE
#include "kernel.h"
#include "guard.h"
#include "status.h"

#include <dlfcn.h>
#if defined(__linux__)
#include <link.h>
#endif
#include <errno.h>
#include <string.h>

#define STAMP_FAST_NS 250 /* shards shorter than this on average share a stamp */
#define STAMP_MAX_STRIDE 4096

static uint64_t guard_faults(void)
{
    shardc_guard_counters_t c;
    if (shardc_guard_counters(&c) < 0)
        return 0;
    return c.faults;
}

int shardc_kernel_run(shardc_kernel_fn fn, const shardc_kernel_args_t *a,
                      shardc_status_writer_t *w, int64_t b0, int64_t bn,
                      int64_t start, int64_t stop, int flags,
                      shardc_krun_t *res)
{
    int64_t sid, now, last, stride = 1, left = 1, since = 0;
    int guarded = (flags & SHARDC_KRUN_GUARDED) != 0;
    uint64_t faults = 0;
    int rc = SHARDC_KRUN_DONE;

    if (fn == NULL || a == NULL || w == NULL || res == NULL || start < b0 ||
        stop > b0 + bn || start >= stop)
        return -EINVAL;
    res->ran = 0;
    res->sid = -1;
    res->code = 0;
    now = shardc_status_block_begin(w, b0, bn);
    if (start != b0 && shardc_status_next_at(w, -1, 0, start, now) < 0)
        return -EINVAL;
    res->t0 = last = now;
    if (guarded)
        faults = guard_faults();
    for (sid = start; sid < stop; sid++) {
        int r = fn(a, sid, sid + 1);
        if (r != 0) {
            rc = SHARDC_KRUN_FAILED;
            res->code = r;
            break;
        }
        if (guarded) {
            uint64_t f = guard_faults();
            if (f != faults) {
                rc = SHARDC_KRUN_COW;
                break;
            }
        }
        res->ran++;
        if (sid + 1 == stop) {
            /* The last shard: its mark, IDLE and the count in one update. */
            res->t1 = shardc_status_block_end(w, sid, 1, res->ran);
            if (res->t1 < 0)
                return -EINVAL;
            return SHARDC_KRUN_DONE;
        }
        since++;
        if (--left == 0) {
            now = shardc_status_now_ns();
            if (now - last < STAMP_FAST_NS * since) {
                if (stride < STAMP_MAX_STRIDE)
                    stride *= 2;
            } else {
                stride = 1;
            }
            left = stride;
            since = 0;
            last = now;
            if (shardc_status_next_at(w, sid, 1, sid + 1, now) < 0)
                return -EINVAL;
        } else if (shardc_status_next_at(w, sid, 1, sid + 1, -1) < 0) {
            return -EINVAL;
        }
    }
    /* Stopped at sid (not marked): IDLE, the shards before it counted. */
    res->sid = sid;
    res->t1 = shardc_status_block_end(w, sid, 0, res->ran);
    if (res->t1 < 0)
        return -EINVAL;
    return rc;
}

int shardc_kernel_call(shardc_kernel_fn fn, const shardc_kernel_args_t *a,
                       int64_t start, int64_t stop)
{
    if (fn == NULL || a == NULL)
        return -EINVAL;
    return fn(a, start, stop);
}

static void copy_str(char *dst, uint64_t len, const char *src)
{
    if (len == 0)
        return;
    strncpy(dst, src != NULL ? src : "", (size_t)len - 1);
    dst[len - 1] = '\0';
}

int shardc_kernel_locate(void *fn, char *path, uint64_t pathlen, char *sym,
                         uint64_t symlen, uint64_t *offset)
{
    Dl_info info;
    if (fn == NULL || path == NULL || sym == NULL || offset == NULL)
        return -EINVAL;
    memset(&info, 0, sizeof(info));
    if (dladdr(fn, &info) == 0 || info.dli_fname == NULL || info.dli_fbase == NULL)
        return -ENOENT;
    copy_str(path, pathlen, info.dli_fname);
    /* A symbol is found again by name; anything else by its offset. */
    copy_str(sym, symlen, info.dli_saddr == fn ? info.dli_sname : "");
    *offset = (uint64_t)((uintptr_t)fn - (uintptr_t)info.dli_fbase);
    return 0;
}

void *shardc_kernel_resolve(const char *path, const char *sym, uint64_t offset,
                            char *err, uint64_t errlen)
{
    void *h, *p = NULL;
    dlerror(); /* clear a stale message */
    h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        copy_str(err, errlen, dlerror());
        return NULL;
    }
    /* The handle is kept open on purpose: the kernel's code must stay
     * mapped for as long as the worker may call it. */
    if (sym != NULL && sym[0] != '\0') {
        p = dlsym(h, sym);
        if (p == NULL)
            copy_str(err, errlen, dlerror());
        return p;
    }
#if defined(__linux__)
    {
        struct link_map *lm = NULL;
        if (dlinfo(h, RTLD_DI_LINKMAP, &lm) == 0 && lm != NULL)
            return (void *)(lm->l_addr + (uintptr_t)offset);
        copy_str(err, errlen, dlerror());
    }
#else
    (void)offset;
    copy_str(err, errlen, "a function that is not an exported symbol cannot be found again on this platform");
#endif
    return NULL;
}
