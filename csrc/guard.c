/*
 * guard.c - page guards: enforce the copy-on-write policy on borrowed inputs.
 *
 * A borrowed input is mapped MAP_PRIVATE + PROT_READ from a sealed segment
 * and registered here as a region (shardc_guard_add).  Reads cost nothing: the
 * protection is set once, when the region is added, never per shard.  A store
 * into a region faults; the SIGSEGV/SIGBUS handler then
 *
 *   1. finds the region in a preallocated, fixed-size table (no malloc, no
 *      locks: the table is only changed from the main thread outside a fault,
 *      and the handler reads it through acquire loads of each slot's state);
 *   2. records the page (an index in the region's fixed page array) and the
 *      offset of the first faulting byte;
 *   3. mprotect()s that one page PROT_READ|PROT_WRITE and returns: the store
 *      is retried and the kernel gives it a private copy-on-write page, so
 *      shared memory is never written, whatever the policy;
 *   4. for a deny region, announces the violation: it calls the notifier given
 *      to shardc_guard_install() (Python passes one that calls
 *      PyErr_SetInterruptEx, so a Python handler raises as soon as the
 *      running C call returns), or raise()s the notify signal.
 *
 * After the shard, shardc_guard_restore() drops exactly the private pages
 * with MADV_DONTNEED (the next read refaults the shared page) and write-
 * protects them again.  Dropping only those pages matters: dropping a whole
 * 1 GiB region would make every later read refault.
 *
 * VMAs.  Each single-page mprotect can split a mapping in three, and Linux
 * caps mappings per process (vm.max_map_count, 65530 by default).  So a
 * region tracks at most `per_region` pages one by one, and all regions
 * together at most `total`; past that the region goes whole-writable (one
 * mprotect that merges its VMAs back into one) and, at collect/restore time,
 * its private pages are found in /proc/self/pagemap (a present page that is
 * not a file page, or a swapped one, is a private copy).  Without pagemap
 * (macOS, a locked-down /proc) restore drops the whole region and the page
 * count is a lower bound (info.exact = 0).
 *
 * Faults that are not ours go to the handler that was installed before us:
 * its sa_sigaction or sa_handler is called (faulthandler prints its traceback
 * and re-raises), and when that was SIG_DFL the default disposition is put
 * back and the fault re-executes (or, for a kill()ed signal, is re-raised), so
 * real crashes still kill the process with the right signal.  A fault is ours
 * only if it is a protection fault inside an active region and, where the
 * kernel says what the access was (x86-64's page-fault error code, arm64's
 * ESR), a write; a fault that repeats at the same
 * address without a restore in between is passed on rather than looped on.
 *
 * Snapshot regions (mode | SHARDC_GUARD_SNAPSHOT).  An input can also reach a
 * worker by inheritance: the master forks workers after a big array exists,
 * and each worker sees its pages copy-on-write.  That memory is private
 * anonymous memory, not a file mapping (it must be private: in a MAP_SHARED
 * range the stores would reach other processes until restore undid them),
 * and the mechanism above would destroy it: MADV_DONTNEED on anonymous memory does not refault anything, it zeroes
 * the pages (and prime_anon's MADV_DONTNEED of the first page would zero that
 * page at add time).  A snapshot region is therefore only write-protected at
 * add time, and gets a save area of `per_region` pages (an anonymous mapping,
 * faulted in lazily).  The handler copies a page's pristine bytes into the
 * next save slot *before* making the page writable, so no store can land
 * first; restore copies the saved bytes back and write-protects the pages
 * again (they stay private copies; their content is the inherited one).
 * Saving and recording must be one step across threads, so this path takes a
 * per-region spinlock (handlers in different threads may race on one page;
 * the loser finds the page recorded and just retries its store).  The lock
 * is held only around a memcpy from a readable page, a store to our own
 * mapping and an mprotect: nothing in it can raise a signal that we handle.
 * When a page cannot be saved (per-region or global limit reached, or the
 * single-page mprotect failed), the region goes whole-writable and is marked
 * lost: its data can no longer be brought back, restore returns
 * -ENOTRECOVERABLE, and the process must be retired (remove still succeeds).
 * Pagemap cannot count a snapshot region's written pages (every inherited
 * page looks private), so an overflowed one reports a lower bound.  remove
 * makes a snapshot range PROT_READ|PROT_WRITE again: it is the process's own
 * memory (e.g. a heap array) that the allocator may reuse once it is freed.
 *
 * macOS: faults arrive as SIGBUS and are handled the same way, but
 * MADV_DONTNEED there does not discard private copies and there is no
 * pagemap; pristine restore on macOS needs a MAP_FIXED remap of the segment
 * (not implemented: the project's CI and target are Linux).
 *
 * Threads.  Handlers may run in any thread; all handler-side state is
 * lock-free atomics, except a snapshot region's spinlock (above), which is
 * only ever taken inside the handler.  Add/remove/restore must not race
 * with a shard that is writing: the worker calls them between shards
 * (collect may, for the prompt deny error).  A user thread that outlives
 * its shard breaks that rule, so the handler at least cannot die of it:
 * each region counts the handlers inside it, remove() waits for them before
 * unmapping a save area, and a store that faulted in a snapshot range just
 * removed (writable again) is retried.  Both fault signals are in the
 * handler's sa_mask, so a SIGBUS cannot nest inside a SIGSEGV handler that
 * holds a spinlock.  The page size is read once, at install/add: the
 * handler never calls sysconf.
 */
#define _GNU_SOURCE
#include "guard.h"
#include "sys.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__linux__)
#include <ucontext.h> /* the fault's access kind: x86-64 REG_ERR, arm64 ESR record */
#elif defined(__APPLE__)
#include <sys/ucontext.h> /* uc_mcontext->__es: the exception state */
#endif

#if defined(__linux__)
#define SHARDC__HAS_PAGEMAP 1 /* /proc/self/pagemap: which pages are private copies */
#else
#define SHARDC__HAS_PAGEMAP 0
#endif
#define SHARDC__PAGE_CAP 1024    /* hard maximum of pages tracked one by one */
#define SHARDC__ALTSTACK (64 * 1024)
#define SHARDC__NO_OFFSET UINT64_MAX
#define SHARDC__PM_CHUNK 2048    /* pagemap entries read per pread */
#define SHARDC__MAX_REPEATS 1000 /* same-address faults before we give up */
#define SHARDC__DRAIN_NS 1000000000LL /* remove(): wait for handlers at most 1 s */

enum { SHARDC__FREE = 0, SHARDC__ACTIVE = 1 };

struct shardc__region {
    _Atomic int state;        /* FREE/ACTIVE; release on add, acquire in handler */
    int mode;                 /* DENY/AUDIT/ALLOW, without SHARDC_GUARD_SNAPSHOT */
    int snapshot;             /* restored from save[] instead of refaulted */
    uintptr_t start;          /* page aligned */
    uintptr_t end;            /* start + size rounded up to a page */
    _Atomic uint32_t ntracked;  /* slots reserved in pages[] (may exceed the cap);
                                 * snapshot: pages saved, written under `lock` */
    _Atomic uint32_t held;      /* single-page protections counted in g_tracked */
    _Atomic int overflow;       /* region made whole-writable */
    _Atomic int written;
    _Atomic int users;          /* handlers inside this region right now: remove()
                                 * waits for 0 before unmapping the save area */
    _Atomic uintptr_t gone_start, gone_end; /* a removed snapshot range, writable
                                 * again: a fault there that raced with remove
                                 * is retried instead of chained */
    _Atomic uint64_t first_off;
    _Atomic uint64_t faults;
    /* Snapshot regions only.  pages[i] was saved in save slot i, so pages[]
     * stays in slot order (restore never sorts it) and has no duplicates. */
    atomic_flag lock;           /* serializes save + record + mprotect */
    _Atomic int lost;           /* written pages that were never saved */
    uint32_t cap;               /* save slots (per_region at add time) */
    unsigned char *save;        /* cap pages, or NULL when cap is 0 */
    _Atomic uint32_t pages[SHARDC__PAGE_CAP]; /* page indices within the region */
};

static struct shardc__region g_regions[SHARDC_GUARD_MAX_REGIONS];
static _Atomic int g_nslots; /* highest slot ever used + 1: bounds the handler's scan */

static struct sigaction g_prev_segv, g_prev_bus;
static int g_installed;
static void (*g_notify)(int);
static int g_notify_signum;
static int g_notify_flags;

static _Atomic uint32_t g_per_region = 256;
static _Atomic uint32_t g_total = 8192;
static _Atomic uint32_t g_tracked;  /* single-page protections outstanding */
static _Atomic int g_notify_pending;
static _Atomic uint64_t g_faults, g_chained, g_overflows, g_notified;
static _Atomic uintptr_t g_last_addr; /* loop guard: last serviced address */
static _Atomic int g_last_repeats;
static _Atomic uint64_t g_leaked_saves; /* save areas left mapped (handler never left) */

/* The page size, set by shardc__init_ps() from install() and add() (never
 * from the handler: sysconf is not async-signal-safe, and a lazily written
 * plain static would be a data race with a handler in another thread that
 * got there first).  A region only becomes visible to the handler through
 * add()'s release store of its state, which orders this store before it. */
static _Atomic size_t g_ps;

static void shardc__init_ps(void)
{
    if (atomic_load_explicit(&g_ps, memory_order_relaxed) == 0)
        atomic_store_explicit(&g_ps, (size_t)sysconf(_SC_PAGESIZE), memory_order_relaxed);
}

static size_t shardc__ps(void)
{
    /* Relaxed: the value never changes once set, and every caller runs
     * after shardc__init_ps() (directly or via a region's acquire). */
    return atomic_load_explicit(&g_ps, memory_order_relaxed);
}

/* Region containing addr, or -1.  Runs in the handler: loads only. */
static int shardc__find(uintptr_t addr)
{
    int i, n = atomic_load_explicit(&g_nslots, memory_order_acquire);

    for (i = 0; i < n; i++) {
        struct shardc__region *r = &g_regions[i];
        /* Acquire: pairs with the release store in add(), so start/end/mode
         * written before the slot went ACTIVE are visible here. */
        if (atomic_load_explicit(&r->state, memory_order_acquire) != SHARDC__ACTIVE)
            continue;
        if (addr >= r->start && addr < r->end)
            return i;
    }
    return -1;
}

#if defined(__aarch64__)
/* An arm64 Exception Syndrome Register value: EC (bits 31:26) says what
 * trapped, and for a data abort ISS bit 6 (WnR) says write, not read. */
static int shardc__esr_is_write(uint64_t esr)
{
    unsigned ec = (unsigned)(esr >> 26) & 0x3f;

    if (ec == 0x24 || ec == 0x25) /* data abort, from EL0 / same EL */
        return (int)((esr >> 6) & 1);
    if (ec == 0x20 || ec == 0x21) /* instruction abort: a fetch */
        return 0;
    return -1; /* no syndrome we can read (e.g. zero) */
}
#endif

#if defined(__linux__) && defined(__aarch64__)
/* Linux puts the fault's ESR in an esr_context record among the extension
 * records of the signal frame (uc_mcontext.__reserved: {magic, size} headers,
 * a zero magic ends them), when it has one: qemu-user, for instance, writes
 * none.  The record layout is the kernel's ABI (asm/sigcontext.h), spelled
 * out here because that header clashes with glibc's signal.h. */
#define SHARDC__ESR_MAGIC 0x45535201u
static int shardc__linux_esr_is_write(void *ctx)
{
    const unsigned char *rec = ((ucontext_t *)ctx)->uc_mcontext.__reserved;
    size_t off = 0, cap = sizeof(((ucontext_t *)ctx)->uc_mcontext.__reserved);

    while (off + 8 <= cap) {
        uint32_t magic, size;
        uint64_t esr;
        memcpy(&magic, rec + off, 4);
        memcpy(&size, rec + off + 4, 4);
        if (magic == 0 || size < 8 || size > cap - off)
            break;
        if (magic == SHARDC__ESR_MAGIC && size >= 16) {
            memcpy(&esr, rec + off + 8, 8);
            return shardc__esr_is_write(esr);
        }
        off += size;
    }
    return -1;
}
#endif

/* Was the faulting access a write?  1 yes; 0 a read or an instruction fetch
 * (making the page writable cannot fix those); -1 the kernel left no record
 * of the access kind. */
static int shardc__fault_is_write(void *ctx)
{
#if defined(__linux__) && defined(__x86_64__) && defined(REG_ERR)
    /* Page-fault error code: bit 1 = write access, bit 4 = instruction fetch. */
    long err = (long)((ucontext_t *)ctx)->uc_mcontext.gregs[REG_ERR];
    return (err & 2) && !(err & 16);
#elif defined(__linux__) && defined(__aarch64__)
    return shardc__linux_esr_is_write(ctx);
#elif defined(__APPLE__) && defined(__aarch64__)
    return shardc__esr_is_write(((ucontext_t *)ctx)->uc_mcontext->__es.__esr);
#elif defined(__APPLE__) && defined(__x86_64__)
    /* The same page-fault error code as on Linux, for trap 14 (#PF). */
    if (((ucontext_t *)ctx)->uc_mcontext->__es.__trapno != 14)
        return -1;
    return (((ucontext_t *)ctx)->uc_mcontext->__es.__err & 2) &&
           !(((ucontext_t *)ctx)->uc_mcontext->__es.__err & 16);
#else
    (void)ctx;
    return -1;
#endif
}

/* Is this signal a protection fault we may service?  Linux reports a write
 * to a read-only page as SIGSEGV/SEGV_ACCERR; SIGBUS there means something
 * else (access past the end of the file) and is never ours.  macOS reports
 * these writes as SIGBUS, so both signals count there.  Where the access kind
 * is unknown, a protection fault in a guarded page is taken as a write: the
 * pages are readable, so a read cannot fault there. */
static int shardc__is_protection_fault(int sig, siginfo_t *info, void *ctx)
{
#if defined(__APPLE__)
    if (!((sig == SIGSEGV || sig == SIGBUS) && info->si_code > 0))
        return 0;
#else
    if (sig != SIGSEGV || info->si_code != SEGV_ACCERR)
        return 0;
#endif
    return shardc__fault_is_write(ctx) != 0;
}

/* Snapshot region: save the faulting page, then make it writable (see the
 * file comment).  Returns 1 when this call saved the page or gave up on the
 * region (a new event: mark written, notify), 0 when another thread had
 * already done so (just retry the store), -1 to chain. */
static int shardc__snap_service(struct shardc__region *r, uintptr_t page)
{
    size_t ps = shardc__ps();
    uint32_t idx = (uint32_t)((page - r->start) / ps), n, i;
    int rc = 1;

    /* Acquire: the previous holder's saved bytes and pages[]/ntracked
     * stores (made in another thread's handler) are visible to us. */
    while (atomic_flag_test_and_set_explicit(&r->lock, memory_order_acquire))
        sched_yield(); /* the holder is inside a memcpy + mprotect: brief */
    if (atomic_load_explicit(&r->overflow, memory_order_relaxed)) {
        rc = 0; /* whole-writable already: our store just retries */
        goto out;
    }
    n = atomic_load_explicit(&r->ntracked, memory_order_relaxed);
    for (i = 0; i < n; i++) {
        if (atomic_load_explicit(&r->pages[i], memory_order_relaxed) == idx) {
            rc = 0; /* saved and made writable by a racing thread */
            goto out;
        }
    }
    if (n < r->cap) {
        if (atomic_fetch_add_explicit(&g_tracked, 1, memory_order_relaxed) <
            atomic_load_explicit(&g_total, memory_order_relaxed)) {
            /* The page is still read-only, so these are its pristine bytes. */
            memcpy(r->save + (size_t)n * ps, (const void *)page, ps);
            if (mprotect((void *)page, ps, PROT_READ | PROT_WRITE) == 0) {
                atomic_fetch_add_explicit(&r->held, 1, memory_order_relaxed);
                atomic_store_explicit(&r->pages[n], idx, memory_order_relaxed);
                /* Release: collect() (any thread) acquires ntracked before
                 * reading pages[]. */
                atomic_store_explicit(&r->ntracked, n + 1, memory_order_release);
                goto out;
            }
            /* ENOMEM (vm.max_map_count): the whole-region fallback below. */
        }
        atomic_fetch_sub_explicit(&g_tracked, 1, memory_order_relaxed);
    }
    /* No room to save this page: its store (and every later one) will go
     * unsaved.  Make the region whole-writable and say the data is lost. */
    if (mprotect((void *)r->start, r->end - r->start, PROT_READ | PROT_WRITE) != 0) {
        rc = -1;
        goto out;
    }
    atomic_store(&r->lost, 1);
    if (!atomic_exchange(&r->overflow, 1))
        atomic_fetch_add_explicit(&g_overflows, 1, memory_order_relaxed);
out:
    /* Release, before unlocking: a thread that lost the race and retries
     * its store must find the region dirty when it collects. */
    if (rc == 1)
        atomic_store_explicit(&r->written, 1, memory_order_release);
    /* Release: publishes the save and the records to the next holder. */
    atomic_flag_clear_explicit(&r->lock, memory_order_release);
    return rc;
}

/* Make the faulting page (or, past the limits, the whole region) writable
 * and record it.  Returns 0 when the store can be retried, -1 to chain. */
static int shardc__service(struct shardc__region *r, uintptr_t addr)
{
    size_t ps = shardc__ps();
    uintptr_t page = addr & ~(uintptr_t)(ps - 1);
    uint64_t none = SHARDC__NO_OFFSET;
    uint32_t n;

    /* First fault wins: the offset the error message reports. */
    atomic_compare_exchange_strong(&r->first_off, &none, (uint64_t)(addr - r->start));
    atomic_fetch_add_explicit(&r->faults, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&g_faults, 1, memory_order_relaxed);

    if (r->snapshot) {
        int rc = shardc__snap_service(r, page);
        if (rc <= 0)
            return rc;
        goto done;
    }
    if (!atomic_load_explicit(&r->overflow, memory_order_relaxed)) {
        n = atomic_fetch_add_explicit(&r->ntracked, 1, memory_order_relaxed);
        if (n < SHARDC__PAGE_CAP)
            atomic_store_explicit(&r->pages[n], (uint32_t)((page - r->start) / ps),
                                  memory_order_relaxed);
        if (n < atomic_load_explicit(&g_per_region, memory_order_relaxed) &&
            atomic_fetch_add_explicit(&g_tracked, 1, memory_order_relaxed) <
                atomic_load_explicit(&g_total, memory_order_relaxed)) {
            atomic_fetch_add_explicit(&r->held, 1, memory_order_relaxed);
            if (mprotect((void *)page, ps, PROT_READ | PROT_WRITE) == 0)
                goto done;
            /* ENOMEM here is usually vm.max_map_count: fall through to the
             * whole-region mprotect, which merges VMAs instead of splitting. */
        } else if (n < atomic_load_explicit(&g_per_region, memory_order_relaxed)) {
            atomic_fetch_sub_explicit(&g_tracked, 1, memory_order_relaxed);
        }
    }
    if (mprotect((void *)r->start, r->end - r->start, PROT_READ | PROT_WRITE) != 0)
        return -1;
    if (!atomic_exchange(&r->overflow, 1))
        atomic_fetch_add_explicit(&g_overflows, 1, memory_order_relaxed);
done:
    /* Release: collect() acquires `written` before reading pages[]. */
    atomic_store_explicit(&r->written, 1, memory_order_release);
    if (r->mode == SHARDC_GUARD_DENY) {
        atomic_store(&g_notify_pending, 1);
        atomic_fetch_add_explicit(&g_notified, 1, memory_order_relaxed);
        if (g_notify != NULL)
            g_notify(g_notify_signum);
        else if (g_notify_flags & SHARDC_GUARD_NOTIFY_RAISE)
            raise(g_notify_signum);
    }
    return 0;
}

/* Hand a signal that is not ours to whoever had it before us. */
static void shardc__chain(int sig, siginfo_t *info, void *ctx)
{
    struct sigaction *prev = sig == SIGBUS ? &g_prev_bus : &g_prev_segv;
    struct sigaction dfl;

    atomic_fetch_add_explicit(&g_chained, 1, memory_order_relaxed);
    if ((prev->sa_flags & SA_SIGINFO) && prev->sa_sigaction != NULL) {
        prev->sa_sigaction(sig, info, ctx);
        return;
    }
    if (!(prev->sa_flags & SA_SIGINFO) && prev->sa_handler != SIG_DFL &&
        prev->sa_handler != SIG_IGN) {
        prev->sa_handler(sig);
        return;
    }
    /* SIG_DFL (SIG_IGN cannot stop a synchronous fault either): put the
     * default back; the faulting instruction re-executes and the kernel kills
     * the process with this signal.  A signal sent by kill() does not
     * re-occur by itself, so send it again (delivered when we return). */
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    if (info->si_code <= 0)
        raise(sig);
}

/* Enter region id for addr: count this handler in the region's users, then
 * re-check that the slot is still that region.  Seq_cst on both sides (our
 * increment then load of state; remove's store of FREE then load of users)
 * is the Dekker pair: either we see FREE and leave, or remove sees us and
 * waits, so the save area and the range stay valid while we use them. */
static struct shardc__region *shardc__enter(int id, uintptr_t addr)
{
    struct shardc__region *r = &g_regions[id];

    atomic_fetch_add(&r->users, 1);
    if (atomic_load(&r->state) == SHARDC__ACTIVE && addr >= r->start && addr < r->end)
        return r;
    /* Release: nothing of the region was touched; pairs with remove's load. */
    atomic_fetch_sub_explicit(&r->users, 1, memory_order_release);
    return NULL;
}

/* Was addr in a snapshot region that remove() has made writable again?  A
 * store that faulted just before the removal then only needs a retry; the
 * default action would kill a process whose user thread outlived its shard
 * (and chaining to SIG_DFL would uninstall us for good).  Loads only. */
static int shardc__in_freed_snapshot(uintptr_t addr)
{
    int i, n = atomic_load_explicit(&g_nslots, memory_order_acquire);

    for (i = 0; i < n; i++) {
        struct shardc__region *r = &g_regions[i];
        /* Acquire: pairs with remove()'s store of FREE, made after it
         * published gone_start/gone_end. */
        if (atomic_load_explicit(&r->state, memory_order_acquire) == SHARDC__FREE &&
            addr >= atomic_load_explicit(&r->gone_start, memory_order_relaxed) &&
            addr < atomic_load_explicit(&r->gone_end, memory_order_relaxed))
            return 1;
    }
    return 0;
}

static void shardc__on_fault(int sig, siginfo_t *info, void *ctx)
{
    int saved_errno = errno, rc = -1, ours = 0;
    uintptr_t addr = (uintptr_t)info->si_addr;
    struct shardc__region *r = NULL;
    int id = -1;

    if (shardc__is_protection_fault(sig, info, ctx)) {
        id = shardc__find(addr);
        if (id >= 0 && (r = shardc__enter(id, addr)) == NULL)
            id = -1;
        ours = id >= 0 || shardc__in_freed_snapshot(addr);
    }
    if (ours) {
        /* A store that keeps faulting at the same address although we made
         * its page writable is not something we can fix: pass it on.  The
         * bound is generous because threads racing on one page legitimately
         * fault there a few times in a row (the state is process-wide: TLS
         * is not async-signal-safe in a dlopen()ed module). */
        if (atomic_exchange(&g_last_addr, addr) == addr) {
            if (atomic_fetch_add(&g_last_repeats, 1) >= SHARDC__MAX_REPEATS)
                ours = 0;
        } else {
            atomic_store(&g_last_repeats, 0);
        }
    }
    if (ours)
        rc = id >= 0 ? shardc__service(r, addr) : 0; /* else: just retry the store */
    if (r != NULL) /* Release: our last use of the region's memory is done. */
        atomic_fetch_sub_explicit(&r->users, 1, memory_order_release);
    if (rc != 0)
        shardc__chain(sig, info, ctx);
    errno = saved_errno;
}

/* Give the process an alternate signal stack if the calling thread has none
 * (so a fault caused by stack exhaustion still reaches a handler). */
static int shardc__ensure_altstack(void)
{
    stack_t ss;
    void *mem;

    if (sigaltstack(NULL, &ss) == -1)
        return -errno;
    if (!(ss.ss_flags & SS_DISABLE))
        return 0;
    mem = mmap(NULL, SHARDC__ALTSTACK, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return -errno;
    ss.ss_sp = mem;
    ss.ss_size = SHARDC__ALTSTACK;
    ss.ss_flags = 0;
    if (sigaltstack(&ss, NULL) == -1) {
        int err = errno;
        munmap(mem, SHARDC__ALTSTACK);
        return -err;
    }
    return 0;
}

static int shardc__install_one(int sig, struct sigaction *prev)
{
    struct sigaction sa, cur;

    if (sigaction(sig, NULL, &cur) == -1)
        return -errno;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == shardc__on_fault)
        return 0; /* already ours (e.g. inherited over fork): keep its prev */
    /* Save the previous action before ours can run and need it. */
    *prev = cur;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = shardc__on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    /* Block both fault signals while either handler runs: a SIGBUS must not
     * nest inside a SIGSEGV handler that holds a snapshot region's spinlock
     * (it would spin on it forever).  A synchronous fault inside the handler
     * then kills the process (the kernel forces a blocked one), and a kill()ed
     * one waits until we return. */
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGSEGV);
    sigaddset(&sa.sa_mask, SIGBUS);
    if (sigaction(sig, &sa, NULL) == -1)
        return -errno;
    return 0;
}

int shardc_guard_install(void (*notify)(int), int signum, int flags)
{
    int rc;

    if (signum < 0 || signum >= NSIG || signum == SIGSEGV || signum == SIGBUS)
        return -EINVAL;
    if ((flags & SHARDC_GUARD_NOTIFY_RAISE) && notify != NULL)
        return -EINVAL;
    shardc__init_ps();
    g_notify = notify;
    g_notify_signum = signum;
    g_notify_flags = flags;
    rc = shardc__ensure_altstack();
    if (rc < 0)
        return rc;
    rc = shardc__install_one(SIGSEGV, &g_prev_segv);
    if (rc == 0)
        rc = shardc__install_one(SIGBUS, &g_prev_bus);
    if (rc == 0)
        g_installed = 1;
    return rc;
}

int shardc_guard_uninstall(void)
{
    struct sigaction cur;
    int i, sigs[2] = {SIGSEGV, SIGBUS};
    struct sigaction *prevs[2] = {&g_prev_segv, &g_prev_bus};

    if (!g_installed)
        return 0;
    for (i = 0; i < 2; i++) {
        if (sigaction(sigs[i], NULL, &cur) == -1)
            return -errno;
        /* Only undo our own installation, never somebody's later one. */
        if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == shardc__on_fault &&
            sigaction(sigs[i], prevs[i], NULL) == -1)
            return -errno;
    }
    g_installed = 0;
    g_notify = NULL;
    return 0;
}

int shardc_guard_set_limits(int per_region, int total)
{
    if (per_region < 0 || per_region > SHARDC__PAGE_CAP || total < 0)
        return -EINVAL;
    atomic_store(&g_per_region, (uint32_t)per_region);
    atomic_store(&g_total, (uint32_t)total);
    return 0;
}

/* Attach one anon_vma to the whole mapping before it is ever split, and leave
 * it PROT_READ.  Without this, the first copy-on-write fault in each split-off
 * single page creates that piece's own anon_vma, and VMAs with different
 * anon_vmas never merge again: every restored page would stay a separate VMA
 * for the life of the mapping, and shards writing different pages would
 * creep towards vm.max_map_count.  With a shared anon_vma, re-protecting a
 * page merges it back into its neighbours.  Cost: one copy-on-write fault
 * and three syscalls, once per input.  The mapping must be MAP_PRIVATE
 * (the byte written back would otherwise go to the shared file). */
static int shardc__prime_anon(uintptr_t start, size_t len)
{
    volatile unsigned char *b = (volatile unsigned char *)start;

    if (mprotect((void *)start, len, PROT_READ | PROT_WRITE) == -1)
        return -errno;
    *b = *b; /* the copy-on-write fault that creates the anon_vma */
    if (madvise((void *)start, shardc__ps(), MADV_DONTNEED) == -1 ||
        mprotect((void *)start, len, PROT_READ) == -1)
        return -errno;
    return 0;
}

int shardc_guard_add(void *addr, uint64_t size, int mode, int *id_out)
{
    size_t ps;
    uintptr_t start = (uintptr_t)addr, end;
    int i, slot = -1, n, rc, snapshot = (mode & SHARDC_GUARD_SNAPSHOT) != 0;
    int primed = (mode & SHARDC_GUARD_PRIMED) != 0;
    uint32_t cap = 0;
    unsigned char *save = NULL;

    shardc__init_ps();
    ps = shardc__ps();
    mode &= ~(SHARDC_GUARD_SNAPSHOT | SHARDC_GUARD_PRIMED);
    if (id_out == NULL || size == 0 || start % ps != 0 || mode < SHARDC_GUARD_DENY || (snapshot && primed) ||
        mode > SHARDC_GUARD_ALLOW || size > UINT32_MAX * (uint64_t)ps)
        return -EINVAL;
    end = start + (uintptr_t)((size + ps - 1) / ps * ps);
    n = atomic_load(&g_nslots);
    for (i = 0; i < SHARDC_GUARD_MAX_REGIONS; i++) {
        struct shardc__region *r = &g_regions[i];
        if (atomic_load(&r->state) == SHARDC__ACTIVE) {
            if (start < r->end && r->start < end)
                return -EEXIST;
        } else if (slot < 0) {
            slot = i;
        }
    }
    if (slot < 0)
        return -ENOSPC;
    if (snapshot) {
        /* No prime_anon: its MADV_DONTNEED would zero an anonymous page.
         * The save area is faulted in only as pages get saved. */
        cap = atomic_load(&g_per_region);
        if (cap > 0) {
            void *m = mmap(NULL, (size_t)cap * ps, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED)
                return -errno;
            save = m;
        }
        rc = mprotect((void *)start, end - start, PROT_READ) == -1 ? -errno : 0;
        if (rc < 0 && save != NULL)
            munmap(save, (size_t)cap * ps);
    } else if (primed) {
        /* A no-op when the range is still PROT_READ from the last restore. */
        rc = mprotect((void *)start, end - start, PROT_READ) == -1 ? -errno : 0;
    } else {
        rc = shardc__prime_anon(start, end - start);
    }
    if (rc < 0)
        return rc;
    {
        struct shardc__region *r = &g_regions[slot];
        r->mode = mode;
        r->snapshot = snapshot;
        r->cap = cap;
        r->save = save;
        atomic_flag_clear(&r->lock);
        atomic_store(&r->lost, 0);
        r->start = start;
        r->end = end;
        atomic_store(&r->ntracked, 0);
        atomic_store(&r->held, 0);
        atomic_store(&r->overflow, 0);
        atomic_store(&r->written, 0);
        atomic_store(&r->first_off, SHARDC__NO_OFFSET);
        atomic_store(&r->faults, 0);
        atomic_store(&r->gone_start, 0);
        atomic_store(&r->gone_end, 0);
        /* Release: publishes the fields above to the fault handler. */
        atomic_store_explicit(&r->state, SHARDC__ACTIVE, memory_order_release);
    }
    if (slot >= n)
        atomic_store_explicit(&g_nslots, slot + 1, memory_order_release);
    *id_out = slot;
    return 0;
}

static struct shardc__region *shardc__region(int id)
{
    if (id < 0 || id >= SHARDC_GUARD_MAX_REGIONS ||
        atomic_load(&g_regions[id].state) != SHARDC__ACTIVE)
        return NULL;
    return &g_regions[id];
}

static int shardc__cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Copy pages[] into out (plain memory), sorted and deduplicated, and return
 * the number of distinct pages.  pages[] itself is _Atomic: sorting it in
 * place through a plain pointer (what this once did) is undefined behaviour,
 * and a handler in another thread may still append to it.  Duplicates come
 * from threads that faulted on the same page at once. */
static uint32_t shardc__sorted_pages(struct shardc__region *r, uint32_t *out)
{
    /* Acquire: pairs with the handlers' updates of ntracked/pages[]. */
    uint32_t n = atomic_load_explicit(&r->ntracked, memory_order_acquire), i, k = 0;

    if (n > SHARDC__PAGE_CAP)
        n = SHARDC__PAGE_CAP;
    if (n == 0)
        return 0;
    for (i = 0; i < n; i++)
        out[i] = atomic_load_explicit(&r->pages[i], memory_order_relaxed);
    qsort(out, n, sizeof(uint32_t), shardc__cmp_u32);
    for (i = 1; i < n; i++)
        if (out[i] != out[k])
            out[++k] = out[i];
    return k + 1;
}

/* Distinct pages tracked so far, without touching pages[]: collect() may run
 * while the shard is still going (the prompt deny error), and sorting the
 * array in place could race with a fault in another thread appending to it. */
static uint32_t shardc__count_unique(struct shardc__region *r)
{
    uint32_t tmp[SHARDC__PAGE_CAP];

    return shardc__sorted_pages(r, tmp);
}

/* MADV_DONTNEED pages [from, to) of a region: their private copies go away
 * and the next access maps the segment's page again. */
static int shardc__drop(struct shardc__region *r, uint64_t from, uint64_t to)
{
    size_t ps = shardc__ps();
    return madvise((void *)(r->start + from * ps), (size_t)(to - from) * ps, MADV_DONTNEED);
}

/* Count a region's private (copy-on-write) pages from /proc/self/pagemap and,
 * if drop, MADV_DONTNEED each run of them.  Returns the count or -errno. */
static int64_t shardc__scan_private(struct shardc__region *r, int drop)
{
    size_t ps = shardc__ps();
    uint64_t npages = (r->end - r->start) / ps, i, j, run = UINT64_MAX;
    uint64_t buf[SHARDC__PM_CHUNK];
    int64_t count = 0;
    int fd;

    /* No pagemap elsewhere (macOS): not even an open() attempt; the caller
     * drops the whole region instead. */
    if (!SHARDC__HAS_PAGEMAP)
        return -ENOSYS;
    fd = (int)SHARDC__RETRY(open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
    if (fd < 0)
        return fd;
    for (i = 0; i < npages; i += SHARDC__PM_CHUNK) {
        uint64_t k = npages - i < SHARDC__PM_CHUNK ? npages - i : SHARDC__PM_CHUNK;
        off_t at = (off_t)((r->start / ps + i) * sizeof(uint64_t));
        long got = SHARDC__RETRY(pread(fd, buf, k * sizeof(uint64_t), at));
        if (got != (long)(k * sizeof(uint64_t))) {
            close(fd);
            return got < 0 ? got : -EIO;
        }
        for (j = 0; j < k; j++) {
            /* Bit 63 present, 62 swapped, 61 file-page-or-shared-anon: a
             * present non-file page, or a swapped one, is our private copy. */
            int priv = ((buf[j] >> 63) & 1 && !((buf[j] >> 61) & 1)) || ((buf[j] >> 62) & 1);
            if (priv) {
                count++;
                if (run == UINT64_MAX)
                    run = i + j;
            } else if (run != UINT64_MAX) {
                if (drop && shardc__drop(r, run, i + j) < 0) {
                    int err = errno;
                    close(fd);
                    return -err;
                }
                run = UINT64_MAX;
            }
        }
    }
    if (run != UINT64_MAX && drop && shardc__drop(r, run, npages) < 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    close(fd);
    return count;
}

int shardc_guard_collect(int id, shardc_guard_info_t *out)
{
    struct shardc__region *r = shardc__region(id);

    if (r == NULL || out == NULL)
        return -EINVAL;
    memset(out, 0, sizeof(*out));
    out->mode = r->mode;
    out->snapshot = r->snapshot;
    out->exact = 1;
    /* Acquire: pairs with the handler's release of `written`. */
    if (!atomic_load_explicit(&r->written, memory_order_acquire))
        return 0;
    out->written = 1;
    out->first_offset = atomic_load(&r->first_off);
    out->faults = atomic_load(&r->faults);
    out->overflow = atomic_load(&r->overflow);
    if (r->snapshot) {
        /* Saved pages are distinct by construction.  Past an overflow the
         * rest is unknown: pagemap sees every inherited page as private. */
        out->lost = atomic_load(&r->lost);
        out->pages = atomic_load_explicit(&r->ntracked, memory_order_acquire);
        out->exact = !out->overflow;
    } else if (out->overflow) {
        int64_t n = shardc__scan_private(r, 0);
        if (n >= 0) {
            out->pages = (uint64_t)n;
        } else {
            out->pages = atomic_load(&r->ntracked);
            out->exact = 0;
        }
    } else {
        out->pages = shardc__count_unique(r);
    }
    return 0;
}

/* Copy a snapshot region's saved pages back and write-protect them again.
 * Lost data cannot be restored: the region keeps its state (collect still
 * says lost) and the caller retires the process. */
static int shardc__snap_restore(struct shardc__region *r)
{
    size_t ps = shardc__ps();
    uint32_t tmp[SHARDC__PAGE_CAP];
    uint32_t n = atomic_load(&r->ntracked), i = 0, j;

    if (atomic_load(&r->lost))
        return -ENOTRECOVERABLE;
    /* Every saved page is writable until the mprotect pass below. */
    for (i = 0; i < n; i++) {
        tmp[i] = atomic_load_explicit(&r->pages[i], memory_order_relaxed);
        memcpy((void *)(r->start + (uintptr_t)tmp[i] * ps), r->save + (size_t)i * ps, ps);
    }
    /* pages[] is in save-slot order; sort a copy to coalesce the mprotects
     * into one per run of adjacent pages. */
    qsort(tmp, n, sizeof(uint32_t), shardc__cmp_u32);
    i = 0;
    while (i < n) {
        for (j = i + 1; j < n && tmp[j] == tmp[j - 1] + 1; j++)
            ;
        if (mprotect((void *)(r->start + (uintptr_t)tmp[i] * ps), (size_t)(j - i) * ps,
                     PROT_READ) == -1)
            return -errno;
        i = j;
    }
    return 0;
}

/* Take a snapshot region's lock from outside the handler.  restore() holds
 * it from the first re-protection until ntracked is 0 again: a thread that
 * outlived its shard and stores into a page restore has just made read-only
 * then waits inside one fault, and afterwards saves the restored page anew.
 * Without the lock it found the page still listed as saved, retried, and
 * faulted again for as long as restore ran; a preempted restore turned that
 * into the handler's repeat bound and a crash. */
static void shardc__snap_lock(struct shardc__region *r)
{
    /* Acquire: pairs with the handler's release of the lock. */
    while (atomic_flag_test_and_set_explicit(&r->lock, memory_order_acquire))
        sched_yield();
}

static int shardc__reset(struct shardc__region *r);

#ifdef SHARDC_TEST_HOOKS
/* tests/c only: called inside restore's locked window, so a test can hold
 * the window open as a preempted restore would. */
void (*shardc_guard_test_restore_pause)(void);
#endif

int shardc_guard_restore(int id)
{
    struct shardc__region *r = shardc__region(id);
    size_t ps = shardc__ps();

    if (r == NULL)
        return -EINVAL;
    if (!atomic_load_explicit(&r->written, memory_order_acquire))
        return 0;
    if (r->snapshot) {
        int rc;
        shardc__snap_lock(r);
        rc = shardc__snap_restore(r);
#ifdef SHARDC_TEST_HOOKS
        if (shardc_guard_test_restore_pause != NULL)
            shardc_guard_test_restore_pause();
#endif
        if (rc == 0)
            rc = shardc__reset(r);
        /* Release: the reset records reach the next handler to lock. */
        atomic_flag_clear_explicit(&r->lock, memory_order_release);
        return rc;
    } else if (atomic_load(&r->overflow)) {
        size_t len = r->end - r->start;
        if (mprotect((void *)r->start, len, PROT_READ) == -1)
            return -errno;
        if (shardc__scan_private(r, 1) < 0 &&
            madvise((void *)r->start, len, MADV_DONTNEED) == -1)
            return -errno;
    } else {
        uint32_t pages[SHARDC__PAGE_CAP];
        uint32_t n = shardc__sorted_pages(r, pages), i = 0, j;
        /* Coalesce adjacent pages: one madvise + one mprotect per run. */
        while (i < n) {
            void *at = (void *)(r->start + (uintptr_t)pages[i] * ps);
            size_t len;
            for (j = i + 1; j < n && pages[j] == pages[j - 1] + 1; j++)
                ;
            len = (size_t)(j - i) * ps;
            if (mprotect(at, len, PROT_READ) == -1 || madvise(at, len, MADV_DONTNEED) == -1)
                return -errno;
            i = j;
        }
    }
    return shardc__reset(r);
}

/* A restored region's records back to "nothing written". */
static int shardc__reset(struct shardc__region *r)
{
    atomic_fetch_sub(&g_tracked, atomic_exchange(&r->held, 0));
    atomic_store(&r->ntracked, 0);
    atomic_store(&r->overflow, 0);
    atomic_store(&r->first_off, SHARDC__NO_OFFSET);
    atomic_store(&r->faults, 0);
    atomic_store(&g_last_addr, 0);
    atomic_store_explicit(&r->written, 0, memory_order_release);
    return 0;
}

int shardc_guard_remove(int id)
{
    struct shardc__region *r = shardc__region(id);
    int rc;

    if (r == NULL)
        return -EINVAL;
    if (r->snapshot && atomic_load(&r->lost)) {
        /* Nothing to restore; the process is being retired.  Release the
         * protections this region still counts, as restore would. */
        atomic_fetch_sub(&g_tracked, atomic_exchange(&r->held, 0));
    } else {
        rc = shardc_guard_restore(id);
        if (rc < 0)
            return rc;
    }
    /* A snapshot range is the process's own memory: give it back writable
     * (a freed heap array's pages are reused by the allocator). */
    if (r->snapshot) {
        if (mprotect((void *)r->start, r->end - r->start, PROT_READ | PROT_WRITE) == -1)
            return -errno;
        atomic_store_explicit(&r->gone_start, r->start, memory_order_relaxed);
        atomic_store_explicit(&r->gone_end, r->end, memory_order_relaxed);
    }
    /* Seq_cst: the Dekker pair with shardc__enter().  From here on no new
     * handler uses the region; the page array stays (it is static), so one
     * still scanning the table reads stale but valid memory. */
    atomic_store(&r->state, SHARDC__FREE);
    /* A thread that outlived its shard may still be inside the handler for
     * this region: about to copy into the save area, or to mprotect a page
     * of the range the caller unmaps next.  Wait for such handlers (they run
     * a memcpy and an mprotect); should one never leave, keep the save area
     * mapped (a leak of cap pages, counted) rather than crash in it. */
    {
        int64_t deadline = shardc__now_ns() + SHARDC__DRAIN_NS;
        while (atomic_load(&r->users) != 0 && shardc__now_ns() < deadline)
            sched_yield();
    }
    /* A store that raced with restore may have saved a page (and counted a
     * protection) again before the range became writable: release it too. */
    if (atomic_load(&r->users) == 0)
        atomic_fetch_sub(&g_tracked, atomic_exchange(&r->held, 0));
    if (r->save != NULL) {
        if (atomic_load(&r->users) == 0)
            munmap(r->save, (size_t)r->cap * shardc__ps());
        else
            atomic_fetch_add(&g_leaked_saves, 1);
        r->save = NULL;
    }
    return 0;
}

int shardc_guard_dirty(int *ids_out, int max)
{
    int i, k = 0, n = atomic_load(&g_nslots);

    if (ids_out == NULL && max > 0)
        return -EINVAL;
    for (i = 0; i < n; i++) {
        struct shardc__region *r = &g_regions[i];
        if (atomic_load(&r->state) == SHARDC__ACTIVE && atomic_load(&r->written)) {
            if (k < max)
                ids_out[k] = i;
            k++;
        }
    }
    return k;
}

int shardc_guard_lookup(const void *addr, uint64_t len, int *ids_out, int max)
{
    uintptr_t lo = (uintptr_t)addr, hi = lo + (uintptr_t)(len ? len : 1);
    int i, k = 0, n = atomic_load(&g_nslots);

    if (ids_out == NULL && max > 0)
        return -EINVAL;
    for (i = 0; i < n; i++) {
        struct shardc__region *r = &g_regions[i];
        if (atomic_load(&r->state) == SHARDC__ACTIVE && lo < r->end && r->start < hi) {
            if (k < max)
                ids_out[k] = i;
            k++;
        }
    }
    return k;
}

int shardc_guard_take_notify(void)
{
    return atomic_exchange(&g_notify_pending, 0);
}

int shardc_guard_counters(shardc_guard_counters_t *out)
{
    if (out == NULL)
        return -EINVAL;
    out->faults = atomic_load(&g_faults);
    out->chained = atomic_load(&g_chained);
    out->overflows = atomic_load(&g_overflows);
    out->notified = atomic_load(&g_notified);
    out->tracked = atomic_load(&g_tracked);
    out->leaked_saves = atomic_load(&g_leaked_saves);
    return 0;
}
