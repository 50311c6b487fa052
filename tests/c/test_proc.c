/* test_proc.c - process helpers: memory samples of this process (the heap
 * policy's tests are in test_heap.c). */
#define _GNU_SOURCE
#include "harness.h"
#include "proc.h"

#include <errno.h>
#include <stdint.h>
#include <unistd.h>

static void test_mem_samples_of_self(void)
{
    shardc_mem_t fast, precise;

    CHECK_RC(shardc_proc_mem_fast(getpid(), &fast));
    CHECK(fast.rss > 0 && fast.precise == 0);
#if defined(__linux__)
    CHECK_RC(shardc_proc_mem(getpid(), &precise));
    CHECK(precise.precise == 1 && precise.rss > 0 && precise.uss <= precise.rss);
    CHECK(shardc_proc_mem(-5, &precise) < 0);
#else
    (void)precise;
#endif
}

int main(void)
{
    RUN(test_mem_samples_of_self);
    return 0;
}
