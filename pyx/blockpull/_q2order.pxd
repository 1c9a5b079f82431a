# cython: language_level=3
"""The qcow2 driver's state and its write ordering (_q2order.pyx); Qcow2 (_qcow2.pyx)
adds the write path on top."""
from libc.stdint cimport int64_t, uint64_t
from blockpull._driver cimport Driver
from blockpull._tablecache cimport Table, TableCache
from blockpull._q2map cimport ClusterMap
from blockpull._q2refcount cimport Refcounts
from blockpull._q2snap cimport Snapshots


cdef class Qcow2Ordering(Driver):
    cdef readonly int version
    cdef readonly int refcount_order
    cdef readonly int64_t l1_offset
    cdef readonly int64_t l1_size
    cdef readonly uint64_t incompatible
    cdef readonly uint64_t compatible
    cdef readonly uint64_t autoclear
    cdef readonly int header_length
    cdef readonly int nb_snapshots
    cdef readonly int64_t snapshots_offset
    cdef readonly int compression_type
    cdef readonly list extensions
    cdef readonly int64_t backing_offset
    cdef readonly int backing_size
    cdef int l2_bits
    cdef int64_t l2_entries
    cdef readonly bint extended_l2   # 128-bit L2 entries with subcluster bitmaps
    cdef Table l1
    cdef ClusterMap cmap          # L1/L2 lookup (holds l1 and l2_cache)
    cdef TableCache l2_cache      # L2 tables by host offset
    cdef Refcounts rc             # refcount table and blocks, allocation
    cdef int64_t l2_cache_bytes
    cdef set l1_dirty             # dirty L1 indexes
    cdef bint rt_unsynced         # reftable or header written, not yet synced
    cdef readonly int64_t syncs
    cdef list free_waiting        # reference dropped in memory, not yet written
    cdef list free_after_sync     # reference drop written, durable after the next sync
    cdef bint autoclear_done
    cdef readonly object bitmaps  # Bitmaps kept up to date (writable, autoclear bit 0), or None
    cdef readonly bint metadata_only
    cdef readonly int crypt_method
    cdef readonly tuple crypto_header  # (offset, length) of the LUKS header area, or None
    cdef public object lock
    cdef readonly object header   # the parsed header (blockpull._q2header.Header)
    cdef Snapshots snaps          # internal snapshots' L1 tables, shared L2 counts
    # since the last good fdatasync (see _sync_failed):
    cdef list fresh               # (cluster, host, old entry or None for a link) with new data
    cdef list wrote_l2            # L2 tables written
    cdef set wrote_l1             # active L1 indexes written
    cdef set wrote_rt             # refcount table indexes written
    cdef bint wrote_rt_header     # the header switched to a grown refcount table
    cdef bint rt_header_redo      # that switch must be written again
    cdef bint guest_dirty         # guest data written
    cdef readonly int64_t sync_failures
    cdef object guest_lost        # the failed sync's OSError, once guest data was lost

    cdef _drop_ref(self, int64_t host_cluster, int64_t n)
    cdef _autoclear(self)
    cdef object _held_by(self, uint64_t e)
    cdef list view_tables(self, int64_t l1i)
    cdef _sync(self)
    cdef _synced(self)
    cdef _sync_failed(self, exc)
    cdef _unlink_fresh(self, int64_t c, int64_t host, object old)
    cdef int _write_counts(self) except -1
    cdef int _write_reftable(self) except -1
    cdef int _write_references(self) except -1
    cdef _flush_and_sync(self)
