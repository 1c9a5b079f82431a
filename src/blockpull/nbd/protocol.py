"""The NBD wire format: constants, message layouts and the parsing of client messages.

Nothing here does I/O or touches an image; a connection (``blockpull.nbd.connection``)
reads and writes the bytes, ``blockpull.nbd.export`` carries the requests out. The source of
every constant is the NBD protocol specification (NetworkBlockDevice/nbd, doc/proto.md:
"Fixed newstyle negotiation", "Option types", "Request types", "Error values"). All
integers on the wire are big-endian.
"""
from __future__ import annotations

import errno as _errno
import struct
from typing import List, NamedTuple, Tuple

# ---- handshake ------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9          # option reply magic

FLAG_FIXED_NEWSTYLE = 1 << 0           # handshake flags (server)
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0         # client flags
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

# ---- transmission -----------------------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

#: the command flags each command accepts (FUA is valid on every command)
CMD_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# error values ("Error values"): the only ones a reply may carry
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# base:allocation flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

#: metadata contexts this server offers, name -> context id
CONTEXT_ALLOCATION = "base:allocation"
CONTEXT_DEPTH = "qemu:allocation-depth"
CONTEXTS = {CONTEXT_ALLOCATION: 1, CONTEXT_DEPTH: 2}

# ---- layouts ------------------------------------------------------------------------------

OPTION_HEADER = struct.Struct(">QII")          # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")          # magic, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")             # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")           # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")                # magic, flags, type, cookie, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

#: the longest string the protocol allows (export names, queries, messages)
MAX_STRING = 4096


class ProtocolError(Exception):
    """The peer broke the protocol in a way that ends the connection."""


class OptionInvalid(Exception):
    """An option's data is malformed: answer NBD_REP_ERR_INVALID and carry on."""


def greeting() -> bytes:
    """What the server sends first: NBDMAGIC, IHAVEOPT and its handshake flags."""
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """One fixed-newstyle option reply."""
    return OPTION_REPLY.pack(REPLY_MAGIC, option, reply, len(data)) + data


def export_name_reply(size: int, tflags: int, no_zeroes: bool) -> bytes:
    """The reply to NBD_OPT_EXPORT_NAME: size, transmission flags (and 124 zeroes)."""
    return struct.pack(">QH", size, tflags) + (b"" if no_zeroes else bytes(124))


def info_export(size: int, tflags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, tflags)


def info_name(name: bytes) -> bytes:
    return U16.pack(INFO_NAME) + name


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def server_entry(name: bytes) -> bytes:
    """An NBD_REP_SERVER payload: the export's name."""
    return U32.pack(len(name)) + name


def meta_context(ctx_id: int, name: str) -> bytes:
    return U32.pack(ctx_id) + name.encode()


def _string(data: bytes, pos: int, length: int) -> Tuple[bytes, int]:
    if length > MAX_STRING or pos + length > len(data):
        raise OptionInvalid("string longer than the option or than 4096 bytes")
    return data[pos:pos + length], pos + length


def parse_info_request(data: bytes) -> Tuple[bytes, List[int]]:
    """NBD_OPT_INFO / NBD_OPT_GO data -> (export name, information types requested)."""
    if len(data) < 6:
        raise OptionInvalid("option data shorter than 6 bytes")
    (nlen,) = U32.unpack_from(data, 0)
    if nlen > len(data) - 6:
        raise OptionInvalid("export name longer than the option")
    name, pos = _string(data, 4, nlen)
    (count,) = U16.unpack_from(data, pos)
    pos += 2
    if len(data) - pos != 2 * count:
        raise OptionInvalid("information request count does not match the option length")
    return name, [U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)]


def parse_meta_request(data: bytes) -> Tuple[bytes, List[bytes]]:
    """NBD_OPT_LIST/SET_META_CONTEXT data -> (export name, queries)."""
    if len(data) < 8:
        raise OptionInvalid("option data shorter than 8 bytes")
    (nlen,) = U32.unpack_from(data, 0)
    name, pos = _string(data, 4, nlen)
    if pos + 4 > len(data):
        raise OptionInvalid("query count missing")
    (count,) = U32.unpack_from(data, pos)
    pos += 4
    if count > (len(data) - pos) // 4:
        raise OptionInvalid("more queries than the option holds")
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise OptionInvalid("query length missing")
        (qlen,) = U32.unpack_from(data, pos)
        q, pos = _string(data, pos + 4, qlen)
        queries.append(q)
    if pos != len(data):
        raise OptionInvalid("trailing bytes after the queries")
    return name, queries


def match_contexts(queries: List[bytes], listing: bool) -> List[str]:
    """The contexts the queries name. For a listing, no query means every context and a
    bare namespace ("base:", "qemu:") every context in it; selection takes full names only
    and ignores what it does not know (spec, "The base: metadata namespace")."""
    if listing and not queries:
        return list(CONTEXTS)
    out: List[str] = []
    for raw in queries:
        try:
            q = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise OptionInvalid("query is not UTF-8")
        if ":" not in q:
            raise OptionInvalid(f"query {q!r} has no namespace")
        for name in CONTEXTS:
            hit = q == name or (listing and q.endswith(":") and name.startswith(q))
            if hit and name not in out:
                out.append(name)
    return out


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, flags: int, rtype: int, length: int) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length)


def chunk_none(cookie: int) -> bytes:
    return chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)


def chunk_error(cookie: int, error: int, message: str = "", done: bool = True) -> bytes:
    msg = message.encode("utf-8", "replace")[:MAX_STRING]
    payload = U32.pack(error) + U16.pack(len(msg)) + msg
    return chunk_header(cookie, REPLY_FLAG_DONE if done else 0, REPLY_TYPE_ERROR,
                        len(payload)) + payload


def chunk_hole(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return chunk_header(cookie, REPLY_FLAG_DONE if done else 0, REPLY_TYPE_OFFSET_HOLE,
                        12) + struct.pack(">QI", offset, length)


def chunk_data_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk carrying ``length`` bytes of data (which follow)."""
    return chunk_header(cookie, REPLY_FLAG_DONE if done else 0, REPLY_TYPE_OFFSET_DATA,
                        8 + length) + U64.pack(offset)


def chunk_block_status(cookie: int, ctx_id: int, extents: List[Tuple[int, int]],
                       done: bool) -> bytes:
    """A BLOCK_STATUS chunk: ``extents`` are (length, flags) pairs from the offset asked."""
    body = U32.pack(ctx_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return chunk_header(cookie, REPLY_FLAG_DONE if done else 0, REPLY_TYPE_BLOCK_STATUS,
                        len(body)) + body


def nbd_errno(exc: BaseException) -> int:
    """The NBD error value for an exception raised while carrying out a request:
    no space (ENOSPC, EDQUOT, EFBIG) -> ENOSPC, refused writes -> EPERM, a bad range ->
    EINVAL, every other failure -> EIO (spec, "Error values")."""
    if isinstance(exc, PermissionError):
        return EPERM
    if isinstance(exc, OSError):
        e = exc.errno
        if e in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG):
            return ENOSPC
        if e in (_errno.EPERM, _errno.EACCES, _errno.EROFS):
            return EPERM
        return EIO
    if isinstance(exc, ValueError):
        return EINVAL
    return EIO


class Request(NamedTuple):
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def parse_request(header: bytes) -> Request:
    """The 28-byte request header -> Request; a bad magic ends the connection."""
    magic, flags, rtype, cookie, offset, length = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, rtype, cookie, offset, length)


def parse_request_from(buf) -> Request:
    """``parse_request`` of the first 28 bytes of a buffer, without copying them."""
    magic, flags, rtype, cookie, offset, length = REQUEST.unpack_from(buf, 0)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, rtype, cookie, offset, length)
