# cython: language_level=3
"""qcow2 compressed clusters: zlib (raw deflate, compression type 0) and zstd (type 1)
framing and decoding (QEMU's docs/interop/qcow2.rst, "Compressed Clusters Descriptor"
and the ``compression_type`` header field). Output is bounded by the cluster size
whatever the input claims. zlib clusters are inflated by ISA-L (the ``isal`` package),
about twice as fast as zlib, and zstd clusters by ``zstandard``; both release the GIL, so
each reader thread of a pull inflates on its own core. Clusters are decoded into the
caller's buffer: no Python object is kept per cluster."""
from libc.stdint cimport int64_t
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize


from blockpull.errors import ImageFormatError

_isal_zlib = None     # imported with the first zlib cluster
_zstandard = None     # imported with the first zstd cluster: most images have none


def _isal_module():
    """isal.isal_zlib (a dependency), imported on first use to keep start-up short."""
    global _isal_zlib
    if _isal_zlib is None:
        from isal import isal_zlib
        _isal_zlib = isal_zlib
    return _isal_zlib


def _zstd_module():
    """The zstandard module (a dependency), imported on first use to keep start-up short."""
    global _zstandard
    if _zstandard is None:
        import zstandard
        _zstandard = zstandard
    return _zstandard


def zstd_frame_len(const unsigned char[::1] b, Py_ssize_t pos):
    """Length in bytes of the zstd frame (or skippable frame) at ``b[pos:]``, from its
    header and block headers alone (RFC 8878); -1 when it is malformed or truncated."""
    cdef Py_ssize_t n = b.shape[0], p = pos
    cdef unsigned int magic, bh, bsize
    cdef int fhd, fcs_flag, single, did_flag, btype
    if n - p < 8:
        return -1
    magic = b[p] | (b[p + 1] << 8) | (b[p + 2] << 16) | (<unsigned int>b[p + 3] << 24)
    if (magic & 0xFFFFFFF0) == 0x184D2A50:
        bsize = b[p + 4] | (b[p + 5] << 8) | (b[p + 6] << 16) | (<unsigned int>b[p + 7] << 24)
        if bsize > n - p - 8:
            return -1
        return 8 + bsize
    if magic != 0xFD2FB528:
        return -1
    fhd = b[p + 4]
    if fhd & 0x08:
        return -1
    fcs_flag = fhd >> 6
    single = (fhd >> 5) & 1
    did_flag = fhd & 3
    p += 5
    if not single:
        p += 1
    p += (0, 1, 2, 4)[did_flag]
    p += ((1 if single else 0), 2, 4, 8)[fcs_flag]
    while True:
        if n - p < 3:
            return -1
        bh = b[p] | (b[p + 1] << 8) | (b[p + 2] << 16)
        p += 3
        btype = (bh >> 1) & 3
        bsize = bh >> 3
        if btype == 3:
            return -1
        if btype == 1:
            bsize = 1
        if bsize > n - p:
            return -1
        p += bsize
        if bh & 1:
            break
    if fhd & 0x04:
        p += 4
        if p > n:
            return -1
    return p - pos


cdef class Decompressor:
    """Decodes the compressed clusters of one image (``path`` names it in errors). Not
    shared between threads: each driver (and so each reader thread) has its own."""

    def __init__(self, int64_t cluster_size, int compression_type, path):
        self.cluster_size = cluster_size
        self.compression_type = compression_type
        self.path = path

    cpdef bytes decompress(self, bytes comp, int64_t c):
        """The ``cluster_size`` bytes virtual cluster ``c`` holds, from its compressed
        bytes ``comp``. Raises ImageFormatError when they are corrupt or decode to any
        other length."""
        out = PyBytes_FromStringAndSize(NULL, self.cluster_size)
        self.decode(<const unsigned char*>PyBytes_AS_STRING(comp), len(comp),
                    <unsigned char*>PyBytes_AS_STRING(out), c)
        return out

    cdef int decode(self, const unsigned char* comp, size_t clen, unsigned char* out,
                    int64_t c) except -1:
        """Decode the ``clen`` compressed bytes at ``comp`` of virtual cluster ``c`` into
        the ``cluster_size`` bytes at ``out``. Raises ImageFormatError when they are
        corrupt or decode to any other length."""
        cdef int64_t cs = self.cluster_size
        cdef bytes plain
        if self.compression_type == 0:
            return self._inflate(comp, clen, out, c)
        try:
            plain = self._zstd(PyBytes_FromStringAndSize(<const char*>comp, clen))
        except _zstd_module().ZstdError as exc:
            raise ImageFormatError("%s: zstd compressed cluster is corrupt (%s)"
                                   % (self.path, exc))
        if len(plain) != cs:
            raise ImageFormatError("%s: compressed cluster %d decompresses to %d bytes, not %d"
                                   % (self.path, c, len(plain), cs))
        memcpy(out, PyBytes_AS_STRING(plain), cs)
        return 0

    cdef int _inflate(self, const unsigned char* comp, size_t clen, unsigned char* out,
                      int64_t c) except -1:
        """Raw deflate (RFC 1951), as QEMU writes it with a 4 KiB window; decoded with a
        32 KiB window so that any valid deflate stream reads as zlib reads it. The cluster
        is complete once ``cluster_size`` bytes are out: the input is known only to
        512-byte precision, so what follows is padding."""
        cdef int64_t cs = self.cluster_size
        cdef bytes plain
        isal_zlib = _isal_module()
        try:
            plain = isal_zlib.decompressobj(-15).decompress(
                PyBytes_FromStringAndSize(<const char*>comp, clen), cs)
        except isal_zlib.error as exc:
            raise ImageFormatError("%s: compressed cluster %d is corrupt (%s)"
                                   % (self.path, c, exc))
        if len(plain) != cs:
            raise ImageFormatError("%s: compressed cluster %d decompresses to %d bytes, not %d"
                                   % (self.path, c, len(plain), cs))
        memcpy(out, PyBytes_AS_STRING(plain), cs)
        return 0

    cdef bytes _zstd(self, bytes comp):
        """Decode zstd data the way QEMU does (block/qcow2-threads.c): one or more frames,
        decoded in turn until exactly one cluster is out; bytes after the frame that
        completes the cluster are padding and ignored; a frame that would run past the
        cluster end is corruption."""
        cdef int64_t cs = self.cluster_size
        cdef Py_ssize_t pos = 0, flen
        path = self.path
        if self.zstd_dctx is None:
            self.zstd_dctx = _zstd_module().ZstdDecompressor()
        # the common case, one frame that completes the cluster, decoded in one call
        # (no stream, no copies); anything else takes the frame-by-frame walk below,
        # which also words the errors
        flen = zstd_frame_len(comp, 0)
        if flen > 0:
            try:
                plain = self.zstd_dctx.decompress(comp[:flen] if flen < len(comp) else comp,
                                                  max_output_size=cs)
            except _zstd_module().ZstdError:
                plain = None
            if plain is not None and len(plain) == cs:
                return plain
        out = bytearray()
        while len(out) < cs:
            if pos >= len(comp):
                raise ImageFormatError("%s: zstd compressed cluster ends after %d of %d bytes"
                                       % (path, len(out), cs))
            flen = zstd_frame_len(comp, pos)
            if flen <= 0:
                raise ImageFormatError("%s: zstd compressed cluster: malformed frame at byte %d"
                                       % (path, pos))
            reader = self.zstd_dctx.stream_reader(comp[pos:pos + flen], read_across_frames=False)
            chunk = reader.read(cs - len(out))
            if reader.read(1):
                raise ImageFormatError("%s: zstd compressed cluster decompresses to more than "
                                       "%d bytes" % (path, cs))
            out += chunk
            pos += flen
        return bytes(out)
