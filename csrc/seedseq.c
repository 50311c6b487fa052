/*
 * seedseq.c - NumPy's SeedSequence for a spawn key of one integer
 * (seedseq.h).
 *
 * The algorithm is Melissa O'Neill's seed_seq replacement as NumPy
 * implements it: the entropy words (run entropy padded to the pool size,
 * then the spawn key's words) are hashed into a pool of four 32-bit words
 * with one multiplicative hash whose constant advances at every use, the
 * pool words are mixed with each other and with the entropy words beyond the
 * pool, and the output words are the pool words, cycled, through a second
 * such hash.  64-bit outputs are two 32-bit words, low first.
 */
#include "seedseq.h"

#include <errno.h>

#define POOL 4
#define INIT_A 0x43b0d7e5u
#define MULT_A 0x931e8875u
#define INIT_B 0x8b51f9ddu
#define MULT_B 0x58f38dedu
#define MIX_MULT_L 0xca01f9ddu
#define MIX_MULT_R 0x4973f715u
#define XSHIFT 16

static uint32_t hashmix(uint32_t value, uint32_t *hash_const)
{
    value ^= *hash_const;
    *hash_const *= MULT_A;
    value *= *hash_const;
    return value ^ (value >> XSHIFT);
}

static uint32_t mix(uint32_t x, uint32_t y)
{
    uint32_t r = MIX_MULT_L * x - MIX_MULT_R * y;
    return r ^ (r >> XSHIFT);
}

/* The i-th word of the assembled entropy: run words padded with zeros to the
 * pool size, then the key's words (0 is one word; up to 2^32-1 one word). */
static uint32_t entropy_word(const uint32_t *run, size_t n_run, const uint32_t *key, size_t i)
{
    size_t padded = n_run < POOL ? POOL : n_run;
    if (i < padded)
        return i < n_run ? run[i] : 0u;
    return key[i - padded];
}

int shardc_seedseq_state(const uint32_t *entropy, size_t n_entropy, uint64_t key, uint64_t *out, size_t n_out)
{
    uint32_t kw[2], pool[POOL], hash_a = INIT_A, hash_b = INIT_B;
    size_t n_key, total, i, s, d;

    if (entropy == NULL || out == NULL || n_entropy == 0)
        return -EINVAL;
    kw[0] = (uint32_t)key;
    kw[1] = (uint32_t)(key >> 32);
    n_key = kw[1] ? 2 : 1;
    total = (n_entropy < POOL ? POOL : n_entropy) + n_key;

    for (i = 0; i < POOL; i++)
        pool[i] = hashmix(i < total ? entropy_word(entropy, n_entropy, kw, i) : 0u, &hash_a);
    for (s = 0; s < POOL; s++)
        for (d = 0; d < POOL; d++)
            if (s != d)
                pool[d] = mix(pool[d], hashmix(pool[s], &hash_a));
    for (s = POOL; s < total; s++) {
        uint32_t w = entropy_word(entropy, n_entropy, kw, s);
        for (d = 0; d < POOL; d++)
            pool[d] = mix(pool[d], hashmix(w, &hash_a));
    }
    for (i = 0; i < n_out; i++) {
        uint32_t half[2];
        int h;
        for (h = 0; h < 2; h++) {
            uint32_t v = pool[(2 * i + (size_t)h) % POOL] ^ hash_b;
            hash_b *= MULT_B;
            v *= hash_b;
            half[h] = v ^ (v >> XSHIFT);
        }
        out[i] = (uint64_t)half[0] | ((uint64_t)half[1] << 32);
    }
    return 0;
}
