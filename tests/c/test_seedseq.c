/* test_seedseq.c - shardc_seedseq_state against vectors from NumPy
 * (numpy.random.SeedSequence(e, spawn_key=(k,)).generate_state(n, np.uint64),
 * NumPy 2.4): small, multi-word and zero entropy, keys of one and two words;
 * bad arguments refused. */
#include "harness.h"
#include "seedseq.h"

#include <errno.h>
#include <stdint.h>

static void expect(const uint32_t *ent, size_t n_ent, uint64_t key, const uint64_t *want, size_t n)
{
    uint64_t got[8];
    size_t i;
    CHECK(n <= 8);
    CHECK(shardc_seedseq_state(ent, n_ent, key, got, n) == 0);
    for (i = 0; i < n; i++)
        CHECK(got[i] == want[i]);
}

static void test_numpy_vectors(void)
{
    static const uint32_t e0[] = {0}, e1[] = {12345}, e2[] = {0x63, 0, 0, 0x80000000u}, e3[] = {0, 1},
                          e4[] = {1};
    static const uint64_t w0[] = {0x784dfb2cdff7b411ull, 0xca65717f56cf8f57ull, 0x66ba395b9bb52223ull,
                                  0x6f9b32110fe1e0a9ull};
    static const uint64_t w1[] = {0xb7a1d650e2acf91eull, 0x736b661210184380ull, 0x70d31202e68cbd4eull,
                                  0xfdee62d76df720bfull};
    static const uint64_t w2[] = {0xa2d8c81e0c55de16ull, 0x5329ded94a9d1c23ull, 0xb4a3ff352159be5aull,
                                  0x91675f474685b84bull};
    static const uint64_t w3[] = {0xd644673d17a3075aull, 0x1659f2db253914e6ull, 0xf5bccec537b3700aull};
    static const uint64_t w4[] = {0x7503ef9461d5f260ull};

    expect(e0, 1, 0, w0, 4);
    expect(e1, 1, 7, w1, 4);
    expect(e2, 4, (1ull << 40) + 3, w2, 4); /* 2^127 + 99: four words; a two-word key */
    expect(e3, 2, 0xffffffffull, w3, 3);    /* 2^32; the largest one-word key */
    expect(e4, 1, 0, w4, 1);
}

static void test_bad_arguments(void)
{
    uint32_t e = 1;
    uint64_t out[4];
    CHECK(shardc_seedseq_state(NULL, 1, 0, out, 4) == -EINVAL);
    CHECK(shardc_seedseq_state(&e, 0, 0, out, 4) == -EINVAL);
    CHECK(shardc_seedseq_state(&e, 1, 0, NULL, 4) == -EINVAL);
}

int main(void)
{
    RUN(test_numpy_vectors);
    RUN(test_bad_arguments);
    return 0;
}
