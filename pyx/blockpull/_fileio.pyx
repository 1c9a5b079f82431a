# cython: language_level=3
"""One open file: positional and vectored I/O with the GIL released.

Every system call runs inside ``with nogil``; its errno is captured there and raised
afterwards as the matching ``OSError`` subclass (``FileNotFoundError``, ``PermissionError``,
...). A test-only fault injector can be attached to a ``File`` (``faults``); when none is
attached the cost is one pointer comparison per call.
"""
from libc.errno cimport errno, EACCES, EAGAIN, EINTR, EINVAL, ENOSPC, ENXIO
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memset, strerror
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdlib cimport malloc, free
import os

cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void* buf, size_t n, int64_t off)
    ssize_t pwrite(int fd, const void* buf, size_t n, int64_t off)
    int fdatasync(int fd)
    int fsync(int fd)
    int close(int fd)
    int ftruncate(int fd, int64_t length)
    int64_t lseek(int fd, int64_t off, int whence)
    int SEEK_END
    int SEEK_DATA
    int SEEK_HOLE

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len
    ssize_t pwritev(int fd, const iovec* iov, int cnt, int64_t off)
    ssize_t preadv(int fd, const iovec* iov, int cnt, int64_t off)

cdef extern from "<fcntl.h>" nogil:
    int open "open"(const char* path, int flags, int mode)
    int fallocate(int fd, int mode, int64_t off, int64_t length)
    int fcntl(int fd, int cmd, ...)
    int O_RDONLY
    int O_RDWR
    int O_CLOEXEC
    int O_CREAT
    int O_EXCL
    int O_DIRECT
    int F_OFD_SETLK
    int F_OFD_GETLK
    int F_RDLCK
    int F_WRLCK
    int F_UNLCK
    int FALLOC_FL_KEEP_SIZE
    int FALLOC_FL_PUNCH_HOLE
    int FALLOC_FL_ZERO_RANGE
    struct flock:
        short l_type
        short l_whence
        int64_t l_start
        int64_t l_len
        int l_pid

cdef extern from "<sys/stat.h>" nogil:
    struct stat:
        uint64_t st_dev
        uint64_t st_ino
        unsigned int st_mode
        uint64_t st_rdev
        int64_t st_size
    int fstat(int fd, stat* st)
    bint S_ISBLK(unsigned int mode)

cdef enum:
    # vectors per pwritev call (Linux's IOV_MAX)
    IOV_MAX_BATCH = 1024
    # O_DIRECT needs buffers, lengths and offsets aligned to the logical block size; 4 KiB
    # covers every common device, smaller clusters take the buffered path.
    DIRECT_ALIGN = 4096

FALLOC_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
FALLOC_ZERO_RANGE = FALLOC_FL_ZERO_RANGE


cdef inline Py_ssize_t iov_advance(iovec* iov, Py_ssize_t start, Py_ssize_t nv,
                                   ssize_t r) noexcept nogil:
    """After ``r`` bytes were written from ``iov[start:nv]``: skip the vectors written
    whole, trim a partial one; returns the first vector with bytes left (nv: none)."""
    while r > 0 and start < nv:
        if <size_t>r >= iov[start].iov_len:
            r -= iov[start].iov_len
            start += 1
        else:
            iov[start].iov_base = <char*>iov[start].iov_base + r
            iov[start].iov_len -= r
            r = 0
    while start < nv and iov[start].iov_len == 0:
        start += 1
    return start


cdef raise_errno(int err, object path, str what):
    raise OSError(err, "%s: %s" % (what, strerror(err).decode("utf-8", "replace")), str(path))


cdef class File:
    """An open file with positional, vectored I/O that releases the GIL.

    ``role`` names the file's place in a chain ("top", "backing") for fault injection
    and error messages. ``faults`` (tests only, see blockpull.faults) may hold an object with
    ``check(op, role, offset, length) -> errno-or-0``, consulted before every read, write
    and sync (op "read", "write", "sync"; resizes and fallocate count as "write"), and
    ``record(op, path, offset, data)``, called with op "write" (the bytes that reached the
    file) after each write, "sync" (data None) before each fdatasync ("syncfail" instead
    when ``check`` fails it), "truncate" (offset
    = new size) and "zero" (data = length) after a resize or a hole punch.

    The file may be a block device (an LVM volume, a loop device; ``is_device``): its
    size then comes from the kernel (lseek to the end), never from st_size, which is 0
    for a device. A device cannot grow and is never truncated or fallocated:
    ``truncate`` and ``fallocate`` do nothing inside it and raise ``OSError(ENOSPC)``
    past its end.
    """

    def __cinit__(self):
        self.fd = -1
        self.dfd = -1

    def __init__(self, path, bint writable=False, str role="top", bint create=False):
        cdef bytes bpath = os.fsencode(path)
        cdef const char* cpath = bpath
        cdef int flags = (O_RDWR if writable else O_RDONLY) | O_CLOEXEC
        cdef int fd
        cdef int err = 0
        cdef stat st
        if create:
            flags |= O_CREAT | O_EXCL
        with nogil:
            fd = open(cpath, flags, 0o644)
            if fd < 0:
                err = errno
        if fd < 0:
            raise_errno(err, path, "open")
        self.fd = fd
        self.path = os.fspath(path)
        self.writable = writable
        self.role = role
        self.faults = None
        with nogil:
            if fstat(fd, &st) < 0:
                err = errno
        if err:
            self.close()
            raise_errno(err, path, "fstat")
        self.is_device = S_ISBLK(st.st_mode)

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        if self.dfd >= 0:
            close(self.dfd)
            self.dfd = -1

    def close(self):
        """Close the file (idempotent)."""
        cdef int fd = self.fd
        cdef int dfd = self.dfd
        self.fd = -1
        self.dfd = -1
        with nogil:
            if fd >= 0:
                close(fd)
            if dfd >= 0:
                close(dfd)

    def enable_direct(self):
        """Open a second descriptor with O_DIRECT for bulk data writes (``writev_data``).

        Bulk copies then go from the caller's buffer to the device without a copy into the
        page cache and without leaving gigabytes of dirty pages for the final fdatasync.
        Metadata keeps using the buffered descriptor; fdatasync covers both. Returns False
        (and changes nothing) where the file system refuses O_DIRECT."""
        cdef bytes bpath
        cdef const char* cpath
        cdef int fd
        self._check_open()
        if not self.writable:
            return False
        if self.dfd >= 0:
            return True
        if self.direct_refused:
            return False
        bpath = os.fsencode(self.path)
        cpath = bpath
        with nogil:
            fd = open(cpath, O_RDWR | O_CLOEXEC | O_DIRECT, 0)
        if fd < 0:
            self.direct_refused = True
            return False
        self.dfd = fd
        return True

    @property
    def direct(self):
        """True while bulk data writes bypass the page cache."""
        return self.dfd >= 0

    @property
    def closed(self):
        return self.fd < 0

    cdef int _check_open(self) except -1:
        if self.fd < 0:
            raise ValueError("I/O on closed file %r" % (self.path,))
        return 0

    cdef int _fault(self, str op, int64_t off, int64_t n) except -1:
        """Ask the attached injector whether this operation fails (tests only)."""
        cdef int err = self.faults.check(op, self.role, off, n)
        if err:
            raise_errno(err, self.path, op)
        return 0

    cdef int _record(self, str op, int64_t off, object data) except -1:
        """Tell the attached injector what reached the file (tests only): a write once
        the system call returned, a sync before it starts (what it will cover)."""
        self.faults.record(op, self.path, off, data)
        return 0

    cdef int read_full(self, unsigned char* buf, size_t n, int64_t off) except -1:
        """Read n bytes at off; bytes past the end of file read as zeros."""
        cdef ssize_t r
        cdef size_t done = 0
        cdef int err = 0
        self._check_open()
        if self.faults is not None:
            self._fault("read", off, n)
        with nogil:
            while done < n:
                r = pread(self.fd, buf + done, n - done, off + <int64_t>done)
                if r < 0:
                    if errno == EINTR:
                        continue
                    err = errno
                    break
                if r == 0:
                    memset(buf + done, 0, n - done)
                    done = n
                    break
                done += r
        if err:
            raise_errno(err, self.path, "read")
        return 0

    cdef int write_full(self, const unsigned char* buf, size_t n, int64_t off) except -1:
        cdef ssize_t r
        cdef size_t done = 0
        cdef int err = 0
        cdef bint observed = self.faults is not None   # the one check when unused
        self._check_open()
        if observed:
            self._fault("write", off, n)
        with nogil:
            while done < n:
                r = pwrite(self.fd, buf + done, n - done, off + <int64_t>done)
                if r < 0:
                    if errno == EINTR:
                        continue
                    err = errno
                    break
                done += r
        if observed and done:
            # what reached the file, even when a later part of the write failed
            self._record("write", off, (<const char*>buf)[:done])
        if err:
            raise_errno(err, self.path, "write")
        return 0

    cdef int writev_full(self, object views, int64_t off) except -1:
        """Write a list of buffers back to back at off with as few pwritev calls as possible."""
        return self._writev(views, off, False)

    cdef int writev_data(self, object views, int64_t off) except -1:
        """Like writev_full, for bulk data that nothing reads back soon: through the O_DIRECT
        descriptor when ``enable_direct`` succeeded and every buffer, length and the offset
        are aligned; through the page cache otherwise (and for good after an EINVAL)."""
        return self._writev(views, off, self.dfd >= 0)

    cdef int _writev(self, object views, int64_t off, bint direct) except -1:
        cdef Py_ssize_t nv = len(views)
        cdef int fd
        cdef bint refused = False
        cdef Py_ssize_t i, j, start
        cdef iovec* iov
        cdef Py_buffer* bufs
        cdef ssize_t r
        cdef int cnt, err = 0
        cdef int64_t pos
        cdef bint observed = self.faults is not None   # the one check when unused
        if nv == 0:
            return 0
        self._check_open()
        if observed:
            self._fault_views(views, off)
        bufs = <Py_buffer*>malloc(nv * sizeof(Py_buffer))
        iov = <iovec*>malloc(nv * sizeof(iovec))
        if bufs == NULL or iov == NULL:
            free(bufs); free(iov)
            raise MemoryError()
        j = 0
        try:
            for i in range(nv):
                PyObject_GetBuffer(views[i], &bufs[i], PyBUF_SIMPLE)
                j = i + 1
                iov[i].iov_base = bufs[i].buf
                iov[i].iov_len = bufs[i].len
                if direct and ((<size_t>bufs[i].buf) % DIRECT_ALIGN or bufs[i].len % DIRECT_ALIGN):
                    direct = False
            if off % DIRECT_ALIGN:
                direct = False
            fd = self.dfd if direct else self.fd
            start = 0
            pos = off
            with nogil:
                while start < nv:
                    cnt = <int>(nv - start) if nv - start < IOV_MAX_BATCH else IOV_MAX_BATCH
                    r = pwritev(fd, &iov[start], cnt, pos)
                    if r < 0:
                        if errno == EINTR:
                            continue
                        if errno == EINVAL and fd != self.fd:
                            # the device wants a larger alignment: page cache from here on
                            fd = self.fd
                            refused = True
                            continue
                        err = errno
                        break
                    if fd != self.fd and (pos + r) % DIRECT_ALIGN:
                        fd = self.fd  # a short direct write left us unaligned
                    pos += r
                    start = iov_advance(iov, start, nv, r)
        finally:
            for i in range(j):
                PyBuffer_Release(&bufs[i])
            free(bufs)
            free(iov)
        if refused and self.dfd >= 0:
            fd = self.dfd
            self.dfd = -1
            self.direct_refused = True
            close(fd)
        if observed:
            self._record_views(views, off, <size_t>(pos - off))
        if err:
            # what reached the file before the error, for a caller that keeps it (a
            # pull keeps the whole clusters a full disk let through)
            exc = OSError(err, "write: %s" % strerror(err).decode("utf-8", "replace"),
                          str(self.path))
            exc.bytes_written = pos - off
            raise exc
        return 0

    cdef int _fault_views(self, object views, int64_t off) except -1:
        """Ask the injector about each buffer of a vectored write (tests only)."""
        for v in views:
            self._fault("write", off, len(v))
            off += len(v)
        return 0

    cdef int _record_views(self, object views, int64_t off, size_t done) except -1:
        """Record what of a vectored write reached the file: the first ``done`` bytes,
        buffer by buffer (tests only)."""
        cdef size_t skip
        for v in views:
            if done == 0:
                break
            skip = min(<size_t>len(v), done)
            self._record("write", off, bytes(memoryview(v).cast("B")[:skip]))
            off += skip
            done -= skip
        return 0

    # ---- Python-visible API -------------------------------------------------------

    def pread(self, int64_t offset, Py_ssize_t length):
        """Return ``length`` bytes at ``offset`` (zeros past the end of file)."""
        if length < 0 or offset < 0:
            raise ValueError("negative offset or length")
        out = PyBytes_FromStringAndSize(NULL, length)
        self.read_full(<unsigned char*>PyBytes_AS_STRING(out), length, offset)
        return out

    def preadinto(self, buf, int64_t offset):
        """Fill the writable buffer ``buf`` from ``offset``; returns its length. No copy."""
        cdef Py_buffer pb
        PyObject_GetBuffer(buf, &pb, PyBUF_WRITABLE)
        try:
            self.read_full(<unsigned char*>pb.buf, pb.len, offset)
            return pb.len
        finally:
            PyBuffer_Release(&pb)

    def pwrite(self, data, int64_t offset):
        """Write all of ``data`` at ``offset``."""
        cdef Py_buffer pb
        PyObject_GetBuffer(data, &pb, PyBUF_SIMPLE)
        try:
            self.write_full(<const unsigned char*>pb.buf, pb.len, offset)
            return pb.len
        finally:
            PyBuffer_Release(&pb)

    def pwritev(self, views, int64_t offset):
        """Write the buffers in ``views`` back to back at ``offset`` (vectored)."""
        self.writev_full(list(views), offset)

    def pwritev_data(self, views, int64_t offset):
        """``pwritev`` for bulk data: bypasses the page cache where ``enable_direct`` allows."""
        self.writev_data(list(views), offset)

    def fdatasync(self):
        """Make written data (and the metadata needed to read it) durable."""
        cdef int r, err = 0
        self._check_open()
        if self.faults is not None:
            try:
                self._fault("sync", 0, 0)
            except OSError:
                self._record("syncfail", 0, None)   # a failed sync, for the power-loss model
                raise
            self._record("sync", 0, None)
        with nogil:
            r = fdatasync(self.fd)
            if r < 0:
                err = errno
        if err:
            raise_errno(err, self.path, "fdatasync")

    def fallocate(self, int64_t offset, int64_t length, int mode=0):
        """Reserve (mode 0), punch (FALLOC_PUNCH_HOLE) or zero (FALLOC_ZERO_RANGE) a range.

        On a block device nothing is done (its space is all there, and what it reads is
        left as it is); a reservation past its end raises ``OSError(ENOSPC)``."""
        cdef int r, err = 0
        self._check_open()
        if self.faults is not None:
            self._fault("write", offset, length)
        if self.is_device:
            if not mode & FALLOC_FL_KEEP_SIZE:
                self._device_fits(offset + length, "fallocate")
            return
        with nogil:
            r = fallocate(self.fd, mode, offset, length)
            if r < 0:
                err = errno
        if err:
            raise_errno(err, self.path, "fallocate")
        if self.faults is not None and mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            self._record("zero", offset, length)

    def size(self):
        """Current size of the file in bytes; for a block device, the device's size as
        the kernel reports it (lseek to SEEK_END), since st_size is 0 there."""
        cdef stat st
        cdef int r, err = 0
        cdef int64_t end
        self._check_open()
        if self.is_device:
            with nogil:
                end = lseek(self.fd, 0, SEEK_END)
                if end < 0:
                    err = errno
            if err:
                raise_errno(err, self.path, "lseek")
            return end
        with nogil:
            r = fstat(self.fd, &st)
            if r < 0:
                err = errno
        if err:
            raise_errno(err, self.path, "fstat")
        return st.st_size

    def advise_sequential(self):
        """Tell the kernel this descriptor will be read from start to end
        (``posix_fadvise(POSIX_FADV_SEQUENTIAL)``): it reads ahead twice as far, which
        keeps more requests in flight where each one waits (a backing on a network or
        FUSE file system, a cold disk). The hint belongs to this descriptor alone, and
        changes no data. Returns False where the file system refuses it."""
        self._check_open()
        try:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            return False
        return True

    def identity(self):
        """(st_dev, st_ino) of the open file: two opens of one file compare equal. For a
        block device (-1, st_rdev): every device node of one device compares equal."""
        cdef stat st
        self._check_open()
        if fstat(self.fd, &st) < 0:
            raise_errno(errno, self.path, "fstat")
        if S_ISBLK(st.st_mode):
            return (-1, st.st_rdev)
        return (st.st_dev, st.st_ino)

    cdef int _device_fits(self, int64_t end, str what) except -1:
        """A device cannot grow: ENOSPC when ``end`` lies past it."""
        cdef int64_t size = self.size()
        if end > size:
            raise_errno(ENOSPC, self.path, "%s to %d bytes on a %d-byte block device"
                        % (what, end, size))
        return 0

    def truncate(self, int64_t length):
        """Set the file's size. A block device is never truncated: a length inside it
        changes nothing, one past its end raises ``OSError(ENOSPC)``."""
        cdef int r, err = 0
        self._check_open()
        if self.faults is not None:
            self._fault("write", length, 0)
        if self.is_device:
            self._device_fits(length, "grow")
            return
        with nogil:
            r = ftruncate(self.fd, length)
            if r < 0:
                err = errno
        if err:
            raise_errno(err, self.path, "truncate")
        if self.faults is not None:
            self._record("truncate", length, None)

    def next_data(self, int64_t offset):
        """(data_start, hole_start) at or after offset via SEEK_DATA/SEEK_HOLE, or None
        when there is no data after offset. Used to map sparse raw files."""
        cdef int64_t d, h
        cdef int err = 0
        self._check_open()
        with nogil:
            d = lseek(self.fd, offset, SEEK_DATA)
            if d < 0:
                err = errno
            else:
                h = lseek(self.fd, d, SEEK_HOLE)
                if h < 0:
                    err = errno
        if err:
            if err == ENXIO:  # no data past offset
                return None
            if err == EINVAL:  # file system without SEEK_DATA: all data
                return (offset, self.size())
            raise_errno(err, self.path, "lseek")
        return (d, h)

    # ---- OFD byte-range locks, as QEMU uses them ----------------------------------

    def lock(self, int64_t start, int exclusive):
        """Take an OFD lock on byte ``start`` (shared, or exclusive). False if held elsewhere."""
        cdef flock fl
        cdef int r, err = 0
        self._check_open()
        fl.l_type = F_WRLCK if exclusive else F_RDLCK
        fl.l_whence = 0
        fl.l_start = start
        fl.l_len = 1
        fl.l_pid = 0
        r = fcntl(self.fd, F_OFD_SETLK, &fl)
        if r < 0:
            err = errno
            if err == EAGAIN or err == EACCES:  # held by another open file description
                return False
            raise_errno(err, self.path, "lock")
        return True

    def unlock(self, int64_t start):
        """Drop this file's OFD lock on byte ``start``."""
        cdef flock fl
        self._check_open()
        fl.l_type = F_UNLCK
        fl.l_whence = 0
        fl.l_start = start
        fl.l_len = 1
        fl.l_pid = 0
        fcntl(self.fd, F_OFD_SETLK, &fl)

    def lock_conflicts(self, int64_t start, int exclusive):
        """True if another open file description holds a lock on byte ``start`` that
        conflicts with a shared (or exclusive) lock taken by this one."""
        cdef flock fl
        self._check_open()
        fl.l_type = F_WRLCK if exclusive else F_RDLCK
        fl.l_whence = 0
        fl.l_start = start
        fl.l_len = 1
        fl.l_pid = 0
        if fcntl(self.fd, F_OFD_GETLK, &fl) < 0:
            raise_errno(errno, self.path, "lock test")
        return fl.l_type != F_UNLCK

    def __repr__(self):
        return "<blockpull File %r %s fd=%d>" % (self.path, "rw" if self.writable else "ro", self.fd)
