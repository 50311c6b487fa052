/*
 * harness.h - a minimal test harness for shardc's C unit tests.
 *
 * Each tests/c/test_<prim>.c is its own program (so a crash or hang in one
 * cannot hide another's result); tests/test_c_units.py builds them with
 * tests/c/Makefile, plain and under ASan+UBSan, and runs each with a timeout.
 * A failed CHECK prints file:line and the expression and exits 1.
 */
#ifndef SHARDC_TEST_HARNESS_H
#define SHARDC_TEST_HARNESS_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int shardc_test_count;

#define CHECK(expr)                                                           \
    do {                                                                      \
        if (!(expr)) {                                                        \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__,  \
                    #expr);                                                   \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

/* CHECK_RC(call): the call must return >= 0; prints the errno text if not. */
#define CHECK_RC(call)                                                        \
    do {                                                                      \
        long shardc_rc_ = (long)(call);                                       \
        if (shardc_rc_ < 0) {                                                 \
            fprintf(stderr, "%s:%d: %s returned %ld (%s)\n", __FILE__,        \
                    __LINE__, #call, shardc_rc_, strerror((int)-shardc_rc_)); \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

#define RUN(test)                                                             \
    do {                                                                      \
        test();                                                               \
        printf("ok %d - %s\n", ++shardc_test_count, #test);                  \
        fflush(stdout);                                                       \
    } while (0)

#endif /* SHARDC_TEST_HARNESS_H */
