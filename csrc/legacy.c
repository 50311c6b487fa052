/*
 * legacy.c - the fingerprint of the legacy generators' states (legacy.h).
 *
 * The fingerprint is the position and four key words of each state: word 0
 * and 1 (the first a regeneration writes), 396 (the middle of the twist) and
 * 623 (the last).  A regeneration rewrites all 624 words, so a draw that left
 * the position where it was (a multiple of 624 draws) still changes the
 * fingerprint unless four independent 32-bit words all came out equal
 * (probability 2^-128).
 */
#include "legacy.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MT_N 624
#define FP_WORDS 5

static const uint32_t *watched_key[2];
static const int *watched_pos[2];
static uint32_t fingerprint[2][FP_WORDS];

static void take(uint32_t out[2][FP_WORDS])
{
    static const int words[FP_WORDS - 1] = {0, 1, 396, MT_N - 1};
    int s, i;

    for (s = 0; s < 2; s++) {
        if (watched_key[s] == NULL) {
            memset(out[s], 0, sizeof(out[s]));
            continue;
        }
        out[s][0] = (uint32_t)*watched_pos[s];
        for (i = 0; i < FP_WORDS - 1; i++)
            out[s][i + 1] = watched_key[s][words[i]];
    }
}

void shardc_legacy_watch(uintptr_t np_key, uintptr_t np_pos, uintptr_t py_key, uintptr_t py_pos)
{
    int np_ok = np_key != 0 && np_pos != 0, py_ok = py_key != 0 && py_pos != 0;

    watched_key[0] = np_ok ? (const uint32_t *)np_key : NULL;
    watched_pos[0] = np_ok ? (const int *)np_pos : NULL;
    watched_key[1] = py_ok ? (const uint32_t *)py_key : NULL;
    watched_pos[1] = py_ok ? (const int *)py_pos : NULL;
    take(fingerprint);
}

int shardc_legacy_changed(void)
{
    uint32_t now[2][FP_WORDS];
    int s, changed = 0;

    take(now);
    for (s = 0; s < 2; s++)
        if (memcmp(now[s], fingerprint[s], sizeof(now[s])) != 0) {
            memcpy(fingerprint[s], now[s], sizeof(now[s]));
            changed |= 1 << s;
        }
    return changed;
}
