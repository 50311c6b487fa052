/*
 * seg.h - shared-memory segments: create (memfd / POSIX shm / unlinked file),
 * seal, map shared or private, protect, populate, advise, unmap.
 *
 * A segment is just a file descriptor plus mappings of it; Python keeps the
 * bookkeeping (name, backing, owner).  Every function returns 0 (or a count)
 * on success and -errno on failure.
 */
#ifndef SHARDC_SEG_H
#define SHARDC_SEG_H

#include <stddef.h>
#include <stdint.h>

/* --- cdef begin --- */
#define SHARDC_BACKING_MEMFD 1
#define SHARDC_BACKING_SHM 2
#define SHARDC_BACKING_FILE 3

#define SHARDC_MAP_WRITE 1
#define SHARDC_MAP_PRIVATE 2
#define SHARDC_MAP_POPULATE 4

#define SHARDC_ADV_NORMAL 0
#define SHARDC_ADV_SEQUENTIAL 1
#define SHARDC_ADV_RANDOM 2
#define SHARDC_ADV_WILLNEED 3
#define SHARDC_ADV_DONTNEED 4
#define SHARDC_ADV_HUGEPAGE 5

int shardc_seg_backing_supported(int backing);
int shardc_seg_create(int backing, const char *name, uint64_t size, int persist,
                      int *fd_out);
int shardc_seg_open(int backing, const char *name, int writable, int *fd_out,
                    uint64_t *size_out);
int shardc_seg_unlink(int backing, const char *name);
int shardc_seg_seal(int fd);
int shardc_seg_is_sealed(int fd);
int shardc_seg_size(int fd, uint64_t *size_out);
int shardc_seg_close_fd(int fd);
int shardc_seg_map(int fd, uint64_t offset, uint64_t size, int flags,
                   void **addr_out);
int shardc_seg_unmap(void *addr, uint64_t size);
int shardc_seg_protect(void *addr, uint64_t size, int writable);
/* Give back the pages of [addr, addr+size) (page aligned) and leave the range
 * reserved but inaccessible (PROT_NONE): any later access faults instead of
 * silently reading zeros. */
int shardc_seg_discard(void *addr, uint64_t size);
int shardc_seg_advise(void *addr, uint64_t size, int advice);
int shardc_seg_populate(void *addr, uint64_t size, int write);
int shardc_seg_fill(void *addr, uint64_t size, const void *pattern,
                    uint64_t patlen);
int shardc_mem_equal(const void *a, const void *b, uint64_t n);
uint64_t shardc_page_size(void);
/* --- cdef end --- */

#endif /* SHARDC_SEG_H */
