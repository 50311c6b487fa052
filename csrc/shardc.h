/*
 * shardc.h - the public C API of shardc: one header that pulls in every
 * primitive.  csrc/ffi_build.py reads the "cdef" section of each header
 * included here, in this order, so this list *is* the export list.
 */
#ifndef SHARDC_H
#define SHARDC_H

#include "seg.h"
#include "proc.h"
#include "heap.h"
#include "queue.h"
#include "guard.h"
#include "status.h"
#include "kernel.h"
#include "kern_stats.h"
#include "legacy.h"
#include "seedseq.h"
#include "wtrack.h"

#endif /* SHARDC_H */
