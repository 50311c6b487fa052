/* test_legacy.c - the legacy generators' fingerprint: a draw (one, or a
 * whole multiple of 624 that brings the position back), a reseed and a
 * changed position are seen, each state in its own bit; reads without a
 * change are not; a state left out (address 0) is ignored. */
#include "harness.h"
#include "legacy.h"

#include <stdint.h>

#define N 624
#define M 397

typedef struct {
    uint32_t key[N];
    int pos;
} mt_t;

static void mt_seed(mt_t *mt, uint32_t s)
{
    int i;
    mt->key[0] = s;
    for (i = 1; i < N; i++)
        mt->key[i] = 1812433253u * (mt->key[i - 1] ^ (mt->key[i - 1] >> 30)) + (uint32_t)i;
    mt->pos = N;
}

static uint32_t mt_next(mt_t *mt)
{
    uint32_t y;
    int k;
    if (mt->pos >= N) {
        for (k = 0; k < N; k++) {
            y = (mt->key[k] & 0x80000000u) | (mt->key[(k + 1) % N] & 0x7fffffffu);
            mt->key[k] = mt->key[(k + M) % N] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
        }
        mt->pos = 0;
    }
    y = mt->key[mt->pos++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

static mt_t a, b;

static void test_draws_are_seen(void)
{
    int i;
    uint32_t sink = 0;

    mt_seed(&a, 1);
    mt_seed(&b, 2);
    shardc_legacy_watch((uintptr_t)a.key, (uintptr_t)&a.pos, (uintptr_t)b.key, (uintptr_t)&b.pos);
    CHECK(shardc_legacy_changed() == 0);
    CHECK(shardc_legacy_changed() == 0);

    sink += mt_next(&a); /* one draw from the first */
    CHECK(shardc_legacy_changed() == 1);
    CHECK(shardc_legacy_changed() == 0); /* the fingerprint was taken again */

    sink += mt_next(&b); /* one from the second */
    CHECK(shardc_legacy_changed() == 2);
    sink += mt_next(&a) + mt_next(&b); /* both */
    CHECK(shardc_legacy_changed() == 3);

    for (i = 0; i < N; i++) /* 624 draws: the position comes back, the key does not */
        sink += mt_next(&a);
    CHECK(a.pos == 2);
    CHECK(shardc_legacy_changed() == 1);
    for (i = 0; i < 3 * N; i++)
        sink += mt_next(&b);
    CHECK(shardc_legacy_changed() == 2);
    (void)sink;
}

static void test_seeding_is_seen(void)
{
    mt_seed(&a, 7);
    shardc_legacy_watch((uintptr_t)a.key, (uintptr_t)&a.pos, 0, 0);
    mt_seed(&a, 7); /* the same seed: the same state, nothing to see */
    CHECK(shardc_legacy_changed() == 0);
    mt_seed(&a, 8);
    CHECK(shardc_legacy_changed() == 1);
    a.pos = 5; /* a state set with only the position different */
    CHECK(shardc_legacy_changed() == 1);
}

static void test_left_out(void)
{
    mt_seed(&a, 3);
    mt_seed(&b, 4);
    shardc_legacy_watch(0, 0, (uintptr_t)b.key, (uintptr_t)&b.pos);
    (void)mt_next(&a); /* not watched */
    CHECK(shardc_legacy_changed() == 0);
    (void)mt_next(&b);
    CHECK(shardc_legacy_changed() == 2);
    shardc_legacy_watch(0, 0, 0, 0); /* nothing watched: never a change */
    (void)mt_next(&b);
    CHECK(shardc_legacy_changed() == 0);
}

int main(void)
{
    RUN(test_draws_are_seen);
    RUN(test_seeding_is_seen);
    RUN(test_left_out);
    return 0;
}
