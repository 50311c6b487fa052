/*
 * wtrack.h - which pages of a caller's memory were written since we last
 * looked, kept by the kernel (Linux >= 6.7: userfaultfd asynchronous
 * write-protect + the PAGEMAP_SCAN ioctl of /proc/self/pagemap).
 *
 * shardc keeps a sealed copy of a borrowed array between calls and must
 * prove, before reusing it, that the array still holds the same bytes.  A
 * memcmp proves it by reading both (0.1-0.2 s per GiB); this proves it for
 * every page the kernel still shows as unwritten, so only the pages it
 * cannot vouch for are compared.
 *
 * How: one userfaultfd per process, opened with UFFD_FEATURE_WP_ASYNC (a
 * write to a write-protected page is resolved by the kernel itself: it
 * clears the page's uffd-wp bit and lets the write proceed - no signal, no
 * handler thread, and writes by the kernel on our behalf (read(), recv(),
 * /proc/self/mem, process_vm_writev) take the same fault) and
 * UFFD_FEATURE_WP_UNPOPULATED (pages not yet present are protected too).
 * A tracked range is registered in write-protect mode and every page is
 * write-protected; a later shardc_wt_take() asks PAGEMAP_SCAN for the pages
 * that are NOT provably unchanged and write-protects them again in the
 * same atomic walk.
 *
 * A page counts as unchanged only if all of these hold: it is present (a
 * page zapped by MADV_DONTNEED / MADV_FREE, swapped or never touched is
 * "unsure"), it is not the shared zero page (a zapped page read back), it
 * is anonymous (PAGE_IS_FILE covers file and MAP_SHARED pages, which another
 * mapping could write without touching our page tables), and its uffd-wp
 * bit is still set (the kernel clears it on any write through our page
 * tables, and it is absent in memory mapped or moved there since: mmap
 * MAP_FIXED, mremap).  PM_SCAN_CHECK_WPASYNC makes the scan fail if any
 * part of the range lost its registration.  Not seen: writes through a pin
 * taken before the range was armed (RDMA, io_uring fixed buffers, an
 * O_DIRECT read in flight): the caller must not have I/O in flight into a
 * borrowed array, as for any change during a call.
 */
#ifndef SHARDC_WTRACK_H
#define SHARDC_WTRACK_H

#include <stdint.h>

/* --- cdef begin --- */
/* Open the process's tracker: *uffd (a userfaultfd with asynchronous
 * write-protect) and *pagemap (/proc/self/pagemap), both close-on-exec, and
 * check on a scratch page that a user write and a kernel write (read() from
 * a pipe) are both reported and a clean page is not.  Returns 0, or
 * -ENOSYS (not Linux, or no userfaultfd), -EPERM (userfaultfd not allowed:
 * vm.unprivileged_userfaultfd, seccomp), -EOPNOTSUPP (the kernel lacks
 * WP_ASYNC or PAGEMAP_SCAN, or the self-check failed), -errno. */
int shardc_wt_open(int *uffd, int *pagemap);

/* Start tracking [addr, addr + len) (page-aligned): register it in
 * write-protect mode, then write-protect every page.  -EBUSY: another
 * userfaultfd has it; -EINVAL: not memory it can track (a regular file). */
int shardc_wt_arm(int uffd, uint64_t addr, uint64_t len);

/* Stop tracking [addr, addr + len) (page-aligned).  0, or -errno (-ENOMEM:
 * nothing mapped there any more). */
int shardc_wt_disarm(int uffd, uint64_t addr, uint64_t len);

/* The pages of [addr, addr + len) (page-aligned) not proven unchanged since
 * the last arm or take (see the header comment), as `max` at most
 * (start, end) address pairs in runs[0 .. 2*max-1]; the same walk
 * write-protects them again.  Returns the number of runs, -E2BIG if there
 * are more than `max` (the walk stopped part way: the caller must arm the
 * range again and treat all of it as unsure), -EPERM if part of the range
 * is no longer registered, or -errno. */
long shardc_wt_take(int pagemap, uint64_t addr, uint64_t len, uint64_t *runs, long max);
/* --- cdef end --- */

#endif /* SHARDC_WTRACK_H */
