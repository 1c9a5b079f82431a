"""A small NBD client for tests that need to send exact bytes: pipelined requests,
bad requests, broken handshakes. Real clients (qemu-img, qemu-io, nbdinfo, nbdcopy) do
the rest. Layouts per the NBD protocol specification (doc/proto.md)."""
from __future__ import annotations

import socket
import struct
from typing import Dict, List, Optional, Tuple

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE = 0x67446698
STRUCT = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 8, 9, 10
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = 0, 1, 2, 3, 4, 5, 6, 7
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16


def recvall(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        d = s.recv(n - len(buf))
        if not d:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += d
    return bytes(buf)


class Client:
    def __init__(self, path: str, timeout: float = 20.0) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.structured = False
        self.size = 0
        self.tflags = 0
        self.contexts: Dict[int, str] = {}

    def greeting(self, cflags: int = 3) -> int:
        magic, opt, hflags = struct.unpack(">QQH", recvall(self.s, 18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        self.s.sendall(struct.pack(">I", cflags))
        return hflags

    def option(self, opt: int, data: bytes = b"") -> List[Tuple[int, bytes]]:
        """Send an option; returns every (reply type, data) until the final one."""
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        out = []
        while True:
            magic, o, rtype, length = struct.unpack(">QIII", recvall(self.s, 20))
            assert magic == REPLY_MAGIC and o == opt, (hex(magic), o, opt)
            out.append((rtype, recvall(self.s, length)))
            if rtype != 2 and rtype != 3 and rtype != 4:   # SERVER, INFO, META_CONTEXT
                return out

    def connect(self, name: bytes = b"", structured: bool = True,
                contexts: Tuple[str, ...] = ("base:allocation",), greet: bool = True) -> None:
        if greet:
            self.greeting()
        if structured:
            assert self.option(OPT_STRUCTURED_REPLY)[-1][0] == 1
            self.structured = True
            if contexts:
                q = b"".join(struct.pack(">I", len(c)) + c.encode() for c in contexts)
                data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts)) + q
                for rtype, d in self.option(OPT_SET_META, data):
                    if rtype == 4:
                        self.contexts[struct.unpack(">I", d[:4])[0]] = d[4:].decode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 3)
        replies = self.option(OPT_GO, data)
        assert replies[-1][0] == 1, replies
        for rtype, d in replies:
            if rtype == 3 and struct.unpack(">H", d[:2])[0] == 0:
                _t, self.size, self.tflags = struct.unpack(">HQH", d)

    def send(self, typ: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
             data: Optional[bytes] = None) -> None:
        self.s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, typ, cookie, offset, length)
                       + (data or b""))

    def reply(self, read_len: int = 0) -> Tuple[int, int, dict]:
        """One whole reply: (cookie, error, {"data": {offset: bytes}, "holes": [...],
        "status": {ctx: [(len, flags)]}}). ``read_len``: payload of a simple read reply."""
        magic = struct.unpack(">I", recvall(self.s, 4))[0]
        if magic == SIMPLE:
            err, cookie = struct.unpack(">IQ", recvall(self.s, 12))
            body = {"data": {}}
            if not err and read_len:
                body["data"][None] = recvall(self.s, read_len)
            return cookie, err, body
        assert magic == STRUCT, hex(magic)
        body: dict = {"data": {}, "holes": [], "status": {}}
        error = 0
        first = True
        while True:
            if not first:
                assert struct.unpack(">I", recvall(self.s, 4))[0] == STRUCT
            first = False
            flags, rtype, cookie, length = struct.unpack(">HHQI", recvall(self.s, 16))
            payload = recvall(self.s, length)
            if rtype == 1:
                body["data"][struct.unpack(">Q", payload[:8])[0]] = payload[8:]
            elif rtype == 2:
                body["holes"].append(struct.unpack(">QI", payload))
            elif rtype == 5:
                cid = struct.unpack(">I", payload[:4])[0]
                ext = [struct.unpack(">II", payload[i:i + 8]) for i in range(4, len(payload), 8)]
                body["status"][self.contexts.get(cid, cid)] = ext
            elif rtype & 0x8000:
                error = struct.unpack(">I", payload[:4])[0]
                mlen = struct.unpack(">H", payload[4:6])[0]
                body["message"] = payload[6:6 + mlen].decode()
            if flags & 1:
                return cookie, error, body

    def read(self, offset: int, length: int, cookie: int = 1, flags: int = 0) -> bytes:
        self.send(READ, cookie, offset, length, flags)
        c, err, body = self.reply(length)
        assert c == cookie and err == 0, (c, err, body)
        return assemble(body, offset, length)

    def close(self) -> None:
        try:
            self.send(DISC, 0)
        except OSError:
            pass
        self.s.close()


def assemble(body: dict, offset: int, length: int) -> bytes:
    """The bytes a read reply describes (data chunks and holes), checked to cover it all."""
    if None in body["data"]:
        return body["data"][None]
    buf = bytearray(length)
    covered = 0
    for off, d in body["data"].items():
        buf[off - offset:off - offset + len(d)] = d
        covered += len(d)
    for off, n in body.get("holes", []):
        covered += n
    assert covered == length, (covered, length)
    return bytes(buf)
