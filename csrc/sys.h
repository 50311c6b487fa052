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

#endif /* SHARDC_SYS_H */
