# cython: language_level=3
"""qcow2 internal snapshots: their L1 tables and the L2 tables they share
(_q2snap.pyx)."""
from libc.stdint cimport int64_t, uint64_t
from blockpull._fileio cimport File
from blockpull._q2map cimport ClusterMap


cdef class Snapshots:
    cdef ClusterMap cmap
    cdef list l1s                 # each snapshot's L1 table (Table)
    cdef list dirty               # per snapshot: L1 indexes changed in memory
    cdef dict l2_refs             # L2 table offset -> L1 entries (all views) naming it
    cdef dict wrote               # snapshot index -> L1 indexes written since the last sync

    cdef bint lacks(self, int64_t c) except -1
    cdef int64_t views_lacking(self, int64_t c) except -1
    cdef int views_fit(self, int64_t c, bint active, uint64_t rc_max, path) except -1
    cdef list missing_tables(self, int64_t l1i)
    cdef int attach(self, Py_ssize_t si, int64_t l1i, int64_t off) except -1
    cdef int64_t put_entry(self, int64_t c, uint64_t entry, set done) except -1
    cdef int write_dirty(self, File f) except -1
    cdef int rewrite_after_failed_sync(self) except -1
