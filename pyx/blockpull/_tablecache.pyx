# cython: language_level=3
"""Metadata tables and their write-back cache.

A ``Table`` is one table (an L2 table, a refcount block, an L1 or refcount table) held in
its on-disk byte order, so that it is written back without conversion; ``get``/``put``
load and store 64-bit big-endian entries (QEMU's docs/interop/qcow2.rst: every qcow2
field is big-endian).

A ``TableCache`` keeps tables by key in least-recently-used order. It never writes:
``drop_clean`` forgets the least recently used tables that are neither dirty nor new
while the cache holds more than ``capacity`` tables, so a lookup (a read, a map, a check)
never writes or syncs. Dirty tables stay until their owner writes them back in its
declared order (qcow2: ``Qcow2.flush_metadata``); ``excess`` tells the owner's write path
when to run that flush point to come back under the budget.
"""
from libc.stdlib cimport calloc, free
from cpython.bytes cimport PyBytes_FromStringAndSize

from collections import OrderedDict


cdef class CachedTable:
    """What a ``TableCache`` holds: one table of ``nbytes`` bytes at host ``offset`` in a
    buffer of its own, ``new`` while no durable reference names it; a format's table
    class says, by ``is_dirty``, whether it has changes not yet written (qcow2: ``Table``
    below; QED: ``blockpull._qed_format.Table``, little-endian)."""

    def __cinit__(self, int64_t offset, Py_ssize_t nbytes):
        self.buf = <unsigned char*>calloc(nbytes if nbytes > 0 else 1, 1)
        if self.buf == NULL:
            raise MemoryError()
        self.offset = offset
        self.nbytes = nbytes

    def __dealloc__(self):
        free(self.buf)

    cdef bint is_dirty(self) noexcept:
        return False


cdef class Table(CachedTable):
    """One cluster-sized (or L1-sized) qcow2 table of ``nbytes`` bytes at host ``offset``,
    big-endian entries, ``dirty`` once changed in memory."""

    cdef bint is_dirty(self) noexcept:
        return self.dirty

    cdef bytes tobytes(self):
        return PyBytes_FromStringAndSize(<char*>self.buf, self.nbytes)

    cdef int write_entries(self, File f, object idxs) except -1:
        """Write to ``f`` the 512-byte sectors that hold the entries ``idxs`` (8-byte
        entries): an L1 or refcount table entry changes with one sector write."""
        cdef int64_t sect
        for sect in sorted({(i * 8) & ~511 for i in idxs}):
            f.write_full(self.buf + sect, min(512, self.nbytes - sect), self.offset + sect)
        return 0


cdef class TableCache:
    """Tables by key, least recently used first; ``capacity`` is a count of tables."""

    def __init__(self, Py_ssize_t capacity):
        self.tables = OrderedDict()
        self.capacity = capacity

    def __len__(self):
        return len(self.tables)

    def __contains__(self, key):
        return key in self.tables

    cdef CachedTable get(self, object key):
        """The table under ``key`` (now the most recently used), or None."""
        cdef CachedTable t = self.tables.get(key)
        if t is not None:
            self.tables.move_to_end(key)
        return t

    cdef int put(self, object key, CachedTable t) except -1:
        """Keep ``t`` under ``key``; then drop clean tables if over capacity."""
        self.tables[key] = t
        self.tables.move_to_end(key)
        if len(self.tables) > self.capacity:
            self.drop_clean()
        return 0

    cdef int drop_clean(self) except -1:
        """Forget least recently used tables that are neither dirty nor new until the
        cache is within capacity (or only such tables are left). The most recently used
        table stays: its caller holds it and may be about to change it. Writes nothing."""
        cdef Py_ssize_t over = len(self.tables) - self.capacity
        cdef CachedTable t
        cdef list keys
        if over <= 0:
            return 0
        keys = list(self.tables.keys())
        for k in keys[:len(keys) - 1]:
            t = self.tables[k]
            if not (t.is_dirty() or t.new):
                del self.tables[k]
                over -= 1
                if over == 0:
                    break
        return 0

    cdef Py_ssize_t excess(self) noexcept:
        """How many tables more than ``capacity`` are held (dirty or new ones)."""
        return max(0, len(self.tables) - self.capacity)

    def keep(self, key, CachedTable t):
        """Put ``t`` back under ``key`` without dropping anything (a rewrite after a
        failed sync must find every table it marked dirty)."""
        self.tables[key] = t

    def lookup(self, key):
        """The table under ``key`` or None, without changing the use order."""
        return self.tables.get(key)

    def values(self):
        """The tables, least recently used first (a list: safe to change the cache)."""
        return list(self.tables.values())

    def items(self):
        """(key, table) pairs, least recently used first (a list)."""
        return list(self.tables.items())
