/* bench_seg.c - the costs under shared inputs and the cow guard (csrc/seg.c).
 *
 *   seg_create_map_populate     memfd create + ftruncate + map shared +
 *                               populate (write) of a fresh segment, GB/s: the
 *                               cost of materializing shared memory (zeroing
 *                               pages, building page tables); no data copy.
 *   seg_populate_only           the populate step alone, GB/s.
 *   mprotect_page               one mprotect() call on a single page (every
 *                               other page of a populated region to RO, then
 *                               back to RW), ns per call, including the VMA
 *                               split/merge each call causes; what per-page
 *                               guarding costs.
 *                               Does not include a TLB-shootdown across other
 *                               threads (this process is single-threaded).
 *   write_fault_shared          first write to each page of a fresh shared
 *                               memfd mapping, ns per page: page fault +
 *                               zeroing + mapping.
 *   write_fault_private_cow     first write to each page of a MAP_PRIVATE
 *                               mapping of a populated segment, ns per page:
 *                               the copy-on-write fault a stray write into a
 *                               borrowed input costs.
 */
#include "bench_common.h"
#include "seg.h"

#include <unistd.h>

static uint64_t pagesz;

static int make_seg(uint64_t size)
{
    int fd;
    if (shardc_seg_create(SHARDC_BACKING_MEMFD, "bench", size, 0, &fd) != 0)
        BENCH_DIE("seg_create");
    return fd;
}

static void bench_create_populate(uint64_t size, int reps)
{
    double best = 0, best_pop = 0;
    for (int r = 0; r < reps; r++) {
        void *p;
        int64_t t0 = bench_now(), t1;
        int fd = make_seg(size);
        if (shardc_seg_map(fd, 0, size, SHARDC_MAP_WRITE, &p) != 0)
            BENCH_DIE("map");
        t1 = bench_now();
        if (shardc_seg_populate(p, size, 1) != 0)
            BENCH_DIE("populate");
        {
            int64_t t2 = bench_now();
            double gbs = (double)size / (double)(t2 - t0);
            double gbs_pop = (double)size / (double)(t2 - t1);
            if (gbs > best)
                best = gbs;
            if (gbs_pop > best_pop)
                best_pop = gbs_pop;
        }
        shardc_seg_unmap(p, size);
        shardc_seg_close_fd(fd);
    }
    bench_report("seg_create_map_populate", best, "GB/s");
    bench_report("seg_populate_only", best_pop, "GB/s");
}

static void bench_mprotect(uint64_t npages)
{
    uint64_t size = npages * pagesz;
    int fd = make_seg(size);
    void *p;
    int64_t t0;
    if (shardc_seg_map(fd, 0, size, SHARDC_MAP_WRITE | SHARDC_MAP_POPULATE, &p) != 0)
        BENCH_DIE("map");
    /* Alternate so neighbouring pages never merge into one VMA and each call
     * really splits/merges (the realistic case for per-page guards). */
    t0 = bench_now();
    for (uint64_t i = 0; i < npages; i += 2)
        if (shardc_seg_protect((char *)p + i * pagesz, pagesz, 0) != 0)
            BENCH_DIE("mprotect (vm.max_map_count?)");
    for (uint64_t i = 0; i < npages; i += 2)
        if (shardc_seg_protect((char *)p + i * pagesz, pagesz, 1) != 0)
            BENCH_DIE("mprotect back");
    bench_report("mprotect_page", (double)(bench_now() - t0) / (double)npages, "ns");
    shardc_seg_unmap(p, size);
    shardc_seg_close_fd(fd);
}

static void bench_faults(uint64_t npages)
{
    uint64_t size = npages * pagesz;
    int fd = make_seg(size);
    void *p, *q;
    int64_t t0;
    if (shardc_seg_map(fd, 0, size, SHARDC_MAP_WRITE, &p) != 0)
        BENCH_DIE("map");
    t0 = bench_now();
    for (uint64_t i = 0; i < npages; i++)
        ((volatile char *)p)[i * pagesz] = 1;
    bench_report("write_fault_shared", (double)(bench_now() - t0) / (double)npages, "ns");
    if (shardc_seg_map(fd, 0, size, SHARDC_MAP_WRITE | SHARDC_MAP_PRIVATE, &q) != 0)
        BENCH_DIE("map private");
    t0 = bench_now();
    for (uint64_t i = 0; i < npages; i++)
        ((volatile char *)q)[i * pagesz] = 2;
    bench_report("write_fault_private_cow", (double)(bench_now() - t0) / (double)npages, "ns");
    shardc_seg_unmap(q, size);
    shardc_seg_unmap(p, size);
    shardc_seg_close_fd(fd);
}

int main(int argc, char **argv)
{
    bench_args(argc, argv);
    pagesz = shardc_page_size();
    bench_create_populate(bench_quick ? (256ULL << 20) : (1ULL << 30), bench_quick ? 2 : 4);
    /* Every other page protected: npages VMAs, kept well under the default
     * vm.max_map_count (65530). */
    bench_mprotect(bench_quick ? 10000 : 40000);
    bench_faults(bench_quick ? 32768 : 131072);
    return 0;
}
