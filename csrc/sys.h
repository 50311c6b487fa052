/*
 * sys.h - the only place in shardc's C core that issues raw syscall()s or
 * spells out EINTR retry loops.  Everything else calls these helpers, so the
 * platform differences (Linux futex, macOS ulock, a portable polling
 * fallback) live in one file.
 *
 * Error convention (as everywhere in csrc/): helpers return 0 or a count on
 * success and -errno on failure; callers never read the global errno.
 */
#ifndef SHARDC_SYS_H
#define SHARDC_SYS_H

#include <errno.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

/* Retry an expression that returns -1 + errno while it fails with EINTR, and
 * turn the final result into the 0/-errno convention. */
#define SHARDC__RETRY(expr)                                                   \
    ({                                                                        \
        long shardc__r;                                                       \
        do {                                                                  \
            shardc__r = (long)(expr);                                         \
        } while (shardc__r == -1 && errno == EINTR);                          \
        shardc__r == -1 ? -(long)errno : shardc__r;                           \
    })

/* Monotonic clock in nanoseconds; used for every deadline in the C core. */
static inline int64_t shardc__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The monotonic time timeout_ns (>= 0) from now, saturating instead of
 * overflowing: now + a huge timeout (INT64_MAX from a caller that means
 * "practically forever") is signed overflow, undefined behaviour that in
 * practice wraps to a deadline in the past.  Saturates at INT64_MAX - 1,
 * because callers use INT64_MAX as "no deadline computed yet". */
static inline int64_t shardc__deadline_ns(int64_t timeout_ns)
{
    int64_t now = shardc__now_ns();

    if (timeout_ns < 0)
        timeout_ns = 0;
    return timeout_ns > INT64_MAX - 1 - now ? INT64_MAX - 1 : now + timeout_ns;
}

/* ------------------------------------------------------------------------
 * Address wait/wake ("futex") on a 32-bit word in memory that may be mapped
 * MAP_SHARED into several processes.  Always the process-shared variant:
 * never FUTEX_PRIVATE_FLAG, which would key the wait queue on this process's
 * mm and miss wakes from other processes.
 *
 *   shardc__wait_u32(addr, expected, timeout_ns)
 *       Sleep while *addr == expected, at most timeout_ns (< 0: no limit).
 *       Returns 0 when woken, when *addr != expected already, or on a
 *       spurious wake (callers always re-check their condition);
 *       -ETIMEDOUT when the time ran out; -EINTR when a signal handler ran,
 *       so the caller can return to Python and let it run its handlers.
 *   shardc__wake_u32(addr, n)
 *       Wake up to n sleepers (INT32_MAX: all).  Returns 0.
 *
 * Three implementations: Linux futex(2); macOS os_sync_wait_on_address
 * (14.4+) or the older __ulock_wait; and, with -DSHARDC_PORTABLE_WAIT=1 or
 * on other systems, a polling fallback that re-reads the word with short
 * sleeps (1 us doubling to 1 ms) and whose wake is a no-op.
 *
 * The polling wait is also compiled into the futex and ulock builds and
 * chosen at run time when shardc__portable_wait is set (queue.c's
 * shardc_queue_set_portable_wait; SHARDC_PORTABLE=1 sets it): the wakes stay
 * real, so processes that disagree on the switch still never miss a wake
 * (a poller needs none, a sleeper gets one).
 * ------------------------------------------------------------------------ */
#include <limits.h>

/* Defined in queue.c; read relaxed (a plain switch, no data hangs on it). */
extern int shardc__portable_wait;

/* The polling wait (see above); the whole implementation in portable builds. */
static inline int shardc__poll_wait_u32(uint32_t *addr, uint32_t expected,
                                        int64_t timeout_ns)
{
    int64_t deadline = timeout_ns < 0 ? INT64_MAX : shardc__deadline_ns(timeout_ns);
    int64_t nap = 1000; /* 1 us, doubling to 1 ms */

    for (;;) {
        struct timespec ts;
        int64_t now;
        /* acquire: pairs with the waker's increment, so the caller's re-check
         * after we return sees what was published before it. */
        if (__atomic_load_n(addr, __ATOMIC_ACQUIRE) != expected)
            return 0;
        now = shardc__now_ns();
        if (now >= deadline)
            return -ETIMEDOUT;
        if (nap > deadline - now)
            nap = deadline - now;
        ts.tv_sec = 0;
        ts.tv_nsec = (long)nap;
        if (nanosleep(&ts, NULL) == -1 && errno == EINTR)
            return -EINTR;
        if (nap < 1000000)
            nap *= 2;
    }
}

#if !defined(SHARDC_PORTABLE_WAIT) || !SHARDC_PORTABLE_WAIT
#if defined(__linux__)
#define SHARDC__WAIT_FUTEX 1
#elif defined(__APPLE__)
#define SHARDC__WAIT_ULOCK 1
#endif
#endif

#if defined(__linux__)
#include <sys/syscall.h>
#if defined(SYS_memfd_create)
#define SHARDC__HAVE_MEMFD 1
/* memfd_create(2) through syscall(): glibc < 2.27 has no wrapper.  Returns
 * the fd or -errno (EINTR retried). */
static inline int shardc__memfd_create(const char *name, unsigned int flags)
{
    return (int)SHARDC__RETRY(syscall(SYS_memfd_create, name, flags));
}
#endif
#if defined(SYS_userfaultfd)
#define SHARDC__HAVE_USERFAULTFD 1
/* userfaultfd(2) through syscall(): glibc has no wrapper.  Returns the fd
 * or -errno (csrc/wtrack.c: write tracking). */
static inline int shardc__userfaultfd(int flags)
{
    return (int)SHARDC__RETRY(syscall(SYS_userfaultfd, flags));
}
#endif
#endif

#if defined(SHARDC__WAIT_FUTEX)
#include <linux/futex.h>
#elif defined(SHARDC__WAIT_ULOCK)
#if defined(__has_include)
#if __has_include(<os/os_sync_wait_on_address.h>)
#include <os/os_sync_wait_on_address.h>
#define SHARDC__HAVE_OS_SYNC 1
#endif
#endif
/* Private but stable since macOS 10.12; the fallback below 14.4. */
extern int __ulock_wait(uint32_t operation, void *addr, uint64_t value,
                        uint32_t timeout_us);
extern int __ulock_wake(uint32_t operation, void *addr, uint64_t wake_value);
#define SHARDC__UL_COMPARE_AND_WAIT_SHARED 3
#define SHARDC__ULF_WAKE_ALL 0x00000100
#define SHARDC__ULF_NO_ERRNO 0x01000000
#endif

/* A hint to the CPU that we are in a spin loop (saves power, yields the
 * core's resources to a hyperthread sibling). */
static inline void shardc__cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

#if defined(SHARDC__WAIT_FUTEX)

static inline int shardc__wait_u32(uint32_t *addr, uint32_t expected,
                                   int64_t timeout_ns)
{
    struct timespec ts, *tsp = NULL;
    long r;

    if (__atomic_load_n(&shardc__portable_wait, __ATOMIC_RELAXED))
        return shardc__poll_wait_u32(addr, expected, timeout_ns);
    if (timeout_ns >= 0) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000LL);
        ts.tv_nsec = (long)(timeout_ns % 1000000000LL);
        tsp = &ts;
    }
    /* FUTEX_WAIT (shared): the kernel re-checks *addr == expected under its
     * hash-bucket lock, so a wake between our check and the sleep is seen. */
    r = syscall(SYS_futex, addr, FUTEX_WAIT, expected, tsp, NULL, 0);
    if (r == -1 && (errno == ETIMEDOUT || errno == EINTR))
        return -errno;
    return 0; /* woken or EAGAIN (value changed): caller re-checks */
}

static inline int shardc__wake_u32(uint32_t *addr, int n)
{
    syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
    return 0;
}

#elif defined(SHARDC__WAIT_ULOCK)

static inline int shardc__wait_u32(uint32_t *addr, uint32_t expected,
                                   int64_t timeout_ns)
{
    int r;

    if (__atomic_load_n(&shardc__portable_wait, __ATOMIC_RELAXED))
        return shardc__poll_wait_u32(addr, expected, timeout_ns);
#if defined(SHARDC__HAVE_OS_SYNC)
    if (__builtin_available(macOS 14.4, *)) {
        if (timeout_ns < 0)
            r = os_sync_wait_on_address(addr, expected, 4,
                                        OS_SYNC_WAIT_ON_ADDRESS_SHARED);
        else
            r = os_sync_wait_on_address_with_timeout(
                addr, expected, 4, OS_SYNC_WAIT_ON_ADDRESS_SHARED,
                OS_CLOCK_MACH_ABSOLUTE_TIME, (uint64_t)(timeout_ns ? timeout_ns : 1));
        if (r < 0 && (errno == ETIMEDOUT || errno == EINTR))
            return -errno;
        return 0;
    }
#endif
    {
        /* __ulock_wait takes microseconds and treats 0 as "forever". */
        uint32_t us = 0;
        if (timeout_ns >= 0) {
            int64_t t = (timeout_ns + 999) / 1000;
            us = (uint32_t)(t < 1 ? 1 : (t > (int64_t)UINT32_MAX ? UINT32_MAX : t));
        }
        r = __ulock_wait(SHARDC__UL_COMPARE_AND_WAIT_SHARED | SHARDC__ULF_NO_ERRNO,
                         addr, expected, us);
        return (r == -ETIMEDOUT || r == -EINTR) ? r : 0;
    }
}

static inline int shardc__wake_u32(uint32_t *addr, int n)
{
#if defined(SHARDC__HAVE_OS_SYNC)
    if (__builtin_available(macOS 14.4, *)) {
        if (n == 1)
            os_sync_wake_by_address_any(addr, 4, OS_SYNC_WAKE_BY_ADDRESS_SHARED);
        else
            os_sync_wake_by_address_all(addr, 4, OS_SYNC_WAKE_BY_ADDRESS_SHARED);
        return 0;
    }
#endif
    __ulock_wake(SHARDC__UL_COMPARE_AND_WAIT_SHARED | SHARDC__ULF_NO_ERRNO |
                     (n == 1 ? 0 : SHARDC__ULF_WAKE_ALL),
                 addr, 0);
    return 0;
}

#else /* portable polling fallback */

static inline int shardc__wait_u32(uint32_t *addr, uint32_t expected,
                                   int64_t timeout_ns)
{
    return shardc__poll_wait_u32(addr, expected, timeout_ns);
}

static inline int shardc__wake_u32(uint32_t *addr, int n)
{
    (void)addr;
    (void)n;
    return 0; /* sleepers poll the word */
}

#endif

#endif /* SHARDC_SYS_H */
