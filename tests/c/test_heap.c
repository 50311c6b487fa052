/* test_heap.c - the worker heap policy (heap reuse: a freed big block is
 * reused without page faults; trimming and switching back to glibc's
 * defaults give the memory back). */
#define _GNU_SOURCE
#include "harness.h"
#include "heap.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif
#ifndef UNDER_ASAN
#define UNDER_ASAN 0
#endif

static long minor_faults(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_minflt;
}

/* Allocate `size` bytes, write every page, free; returns the minor faults it took. */
static long touch_block(size_t size)
{
    long f0 = minor_faults();
    volatile unsigned char *p = malloc(size);
    size_t i;

    CHECK(p != NULL);
    for (i = 0; i < size; i += 4096)
        p[i] = (unsigned char)i;
    free((void *)p);
    return minor_faults() - f0;
}

static int64_t heap_free_now(void)
{
    shardc_heap_t h;
    CHECK_RC(shardc_heap_stats(&h));
    CHECK(h.used > 0 && h.arena >= h.free && h.brk > 0);
    return h.free;
}

static void test_heap_reuse(void)
{
    const size_t block = 32u << 20; /* above glibc's largest mmap threshold */
    long cold, warm, after_trim, plain;
    int rc = shardc_heap_reuse(64u << 20);

    if (rc == -ENOSYS) {
        shardc_heap_t h;
        CHECK(shardc_heap_stats(&h) == -ENOSYS);
        printf("# heap reuse: not glibc >= 2.33, skipped\n");
        return;
    }
    CHECK(shardc_heap_stats(NULL) == -EINVAL);
    if (UNDER_ASAN) { /* ASan's allocator refuses mallopt (-EINVAL): only the calls */
        CHECK(rc == 0 || rc == -EINVAL);
        (void)touch_block(block);
        {
            shardc_heap_t h; /* ASan's mallinfo2 reports zeros */
            CHECK_RC(shardc_heap_stats(&h));
        }
        CHECK(shardc_heap_trim() == 0); /* 0 or -errno, never a 0/1 flag */
        (void)shardc_heap_reuse(0);
        return;
    }
    CHECK_RC(rc);
    cold = touch_block(block);
    CHECK(heap_free_now() >= (int64_t)block); /* kept */
    warm = touch_block(block);
    CHECK(shardc_heap_trim() == 0);
    after_trim = touch_block(block);
    printf("# heap reuse: faults for 32 MiB cold %ld, reused %ld, after trim %ld\n", cold, warm,
           after_trim);
    CHECK(warm * 20 < cold);       /* reused pages: no fault and no zeroing */
    CHECK(after_trim > 10 * warm); /* trim gave the pages back */

    /* Back to the defaults: a big block is a fresh mmap again, unmapped on free. */
    CHECK_RC(shardc_heap_reuse(0));
    plain = touch_block(block);
    CHECK(heap_free_now() < (int64_t)block);
    CHECK(plain > 10 * warm);
}

int main(void)
{
    RUN(test_heap_reuse);
    return 0;
}
