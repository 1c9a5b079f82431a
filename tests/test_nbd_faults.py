"""Bad input and faults: the spec's error replies, broken handshakes and requests that
end only their own connection, bounded memory, a hypothesis fuzz against a server in a
child process under an address-space limit, clients vanishing mid-request, and SIGKILL
of the server while clients write with FUA and flush."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest

import blockpull
import nbdclient as C
from relhelp import SOAK, child_env
from test_nbd import MiB, SIZE, make_chain, nbdtools  # noqa: F401 (a fixture)

HERE = os.path.dirname(os.path.abspath(__file__))
EPERM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP = 1, 22, 28, 75, 95


def ask(c, typ, off=0, n=0, flags=0, data=None, read_len=0):
    c.send(typ, 77, off, n, flags, data)
    cookie, err, body = c.reply(read_len)
    assert cookie == 77
    return err


@pytest.mark.parametrize("structured", [True, False])
def test_error_replies_follow_the_spec(tmp_path, nbdtools, structured):
    top, _ref = make_chain(nbdtools, str(tmp_path))
    with blockpull.serve(top, backing_format="qcow2") as srv:
        c = C.Client(srv.socket_path)
        c.connect(structured=structured)
        assert ask(c, C.READ, SIZE - 512, 1024) == EINVAL
        assert ask(c, C.WRITE, SIZE - 512, 1024, data=bytes(1024)) == ENOSPC
        assert ask(c, C.WRITE_ZEROES, SIZE, 512) == ENOSPC
        assert ask(c, C.TRIM, SIZE - 512, 1024) == EINVAL
        assert ask(c, C.CACHE, 2 ** 63, 512) == EINVAL
        assert ask(c, C.READ, 0, 32 * MiB + 1) == EOVERFLOW
        # an oversize write: its payload is read and dropped, the connection carries on
        assert ask(c, C.WRITE, 0, 32 * MiB + 4096, data=b"\xee" * (32 * MiB + 4096)) == EOVERFLOW
        assert ask(c, 42) == EINVAL                               # unknown command
        assert ask(c, C.WRITE, 0, 512, flags=C.REQ_ONE, data=bytes(512)) == EINVAL
        assert ask(c, C.FLUSH, 4096, 0) == EINVAL
        if structured:
            assert ask(c, C.READ, 0, 512, flags=1 << 7) == EINVAL  # unknown flag
        else:
            assert ask(c, C.BLOCK_STATUS, 0, 512) == EINVAL        # no context negotiated
            assert ask(c, C.READ, 0, 512, flags=C.DF) == EINVAL    # DF needs structured
        assert ask(c, C.WRITE, 0, 0, data=b"") == 0
        assert ask(c, C.READ, 0, 4096, read_len=4096) == 0
        assert c.read(7 * MiB, 4096) == b"\x03" * 4096
        assert c.read(0, 4096) != b"\xee" * 4096
        c.close()
    nbdtools.assert_clean(top)


def test_fast_zero_where_it_is_not_fast(tmp_path, nbdtools):
    top, ref = make_chain(nbdtools, str(tmp_path), "qed")
    with blockpull.serve(top, backing_format="qcow2") as srv:
        c = C.Client(srv.socket_path)
        c.connect()
        assert ask(c, C.WRITE_ZEROES, 0, MiB, flags=C.FAST_ZERO) == ENOTSUP
        assert c.read(0, 4096) == b"\x01" * 4096           # nothing changed
        c.close()
    top3, _ = make_chain(nbdtools, str(tmp_path / "v3"))
    with blockpull.serve(top3, backing_format="qcow2") as srv:
        c = C.Client(srv.socket_path)
        c.connect()
        assert ask(c, C.WRITE_ZEROES, 0, MiB, flags=C.FAST_ZERO) == 0
        assert ask(c, C.WRITE_ZEROES, MiB, MiB, flags=C.FAST_ZERO | C.NO_HOLE) == ENOTSUP
        assert ask(c, C.WRITE_ZEROES, MiB, 4096, flags=C.NO_HOLE) == 0
        assert c.read(0, MiB + 4096) == bytes(MiB + 4096)
        c.close()
    nbdtools.assert_clean(top3)


def _closed(c) -> bool:
    """True when the server has closed the connection (no reply, just the end)."""
    try:
        c.s.settimeout(10)
        return c.s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_broken_handshakes_end_only_their_connection(tmp_path, nbdtools):
    top, ref = make_chain(nbdtools, str(tmp_path))
    with blockpull.serve(top, backing_format="qcow2", export_name="vm") as srv:
        path = srv.socket_path
        idle = C.Client(path)           # a client that never finishes its handshake
        idle.greeting()

        c = C.Client(path)
        assert c.greeting() == 3        # FIXED_NEWSTYLE | NO_ZEROES
        assert c.option(C.OPT_LIST, b"x")[-1][0] == (1 << 31) + 3          # ERR_INVALID
        assert c.option(C.OPT_GO, b"\0\0")[-1][0] == (1 << 31) + 3
        go = struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0)
        assert c.option(C.OPT_GO, go)[-1][0] == (1 << 31) + 6             # ERR_UNKNOWN
        assert c.option(99)[-1][0] == (1 << 31) + 1                        # ERR_UNSUP
        assert c.option(C.OPT_STARTTLS)[-1][0] == (1 << 31) + 1            # no TLS here
        assert c.option(C.OPT_SET_META, b"\0" * 8)[-1][0] == (1 << 31) + 3  # not structured
        listed = c.option(C.OPT_LIST)
        assert listed[0] == (2, struct.pack(">I", 2) + b"vm") and listed[-1][0] == 1
        c.connect(name=b"vm", greet=False)   # and the same connection still gets in
        assert c.read(0, 100) == b"\x01" * 100
        c.close()

        bad = [
            lambda c: c.s.sendall(struct.pack(">I", 1 << 5)),                     # client flags
            lambda c: (c.greeting(), c.s.sendall(b"NOTMAGIC" + bytes(8))),         # option magic
            lambda c: (c.greeting(), c.s.sendall(struct.pack(">QII", C.IHAVEOPT, 3, 1 << 30))),
            lambda c: (c.greeting(), c.s.sendall(struct.pack(">QII", C.IHAVEOPT, 1, 4) + b"nope")),
        ]
        for i, act in enumerate(bad):
            c = C.Client(path)
            if i == 0:
                C.recvall(c.s, 18)
            act(c)
            assert _closed(c), i
            c.s.close()
        # a bad request magic ends that connection after what it had in flight
        c = C.Client(path)
        c.connect(name=b"vm")
        c.s.sendall(b"\xff" * 28)
        assert _closed(c)
        c.s.close()
        # the client that vanishes mid-write: nothing of it lands, nothing breaks
        c = C.Client(path)
        c.connect(name=b"vm")
        c.s.sendall(struct.pack(">IHHQQI", C.REQ_MAGIC, 0, C.WRITE, 1, 0, 65536) + b"\x99" * 1000)
        c.s.close()
        good = C.Client(path)
        good.connect(name=b"vm")
        assert good.read(0, 65536) == b"\x01" * 65536
        good.close()
        idle.s.close()
    nbdtools.assert_clean(top)
    assert nbdtools.compare(top, ref)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Child:
    def __init__(self, image, sock, as_limit=0, pull_bw=None):
        args = [sys.executable, os.path.join(HERE, "nbd_serve_child.py"), image, sock,
                str(as_limit)] + ([pull_bw] if pull_bw else [])
        env = child_env()
        env["MALLOC_ARENA_MAX"] = "2"
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        self.sock = self.p.stdout.readline().strip()
        assert self.sock == sock, self.p.stderr.read()

    def stop(self):
        self.p.stdin.close()
        out = self.p.stdout.read()
        err = self.p.stderr.read()
        self.p.wait(60)
        assert self.p.returncode == 0 and "closed" in out, err
        return err

    def kill(self):
        self.p.kill()
        self.p.wait(30)


def test_memory_stays_bounded_when_a_client_does_not_read(tmp_path, nbdtools):
    """A client floods 32 MiB reads and never reads a reply: the server stops reading
    its requests once the connection's budget is full, and memory stays bounded."""
    top, _ref = make_chain(nbdtools, str(tmp_path))
    child = Child(top, str(tmp_path / "s.sock"), as_limit=2 << 30)
    try:
        c = C.Client(child.sock)
        c.connect(structured=False)       # simple replies: every byte is real data
        c.s.setblocking(False)
        sent = 0
        req = struct.pack(">IHHQQI", C.REQ_MAGIC, 0, C.READ, 1, 0, 16 * MiB)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sent < 400:
            try:
                c.s.send(req)
                sent += 1
            except BlockingIOError:
                time.sleep(0.05)
        time.sleep(1)
        rss = _rss(child.p.pid)
        # 400 reads of 16 MiB would be 6.4 GiB; the budget holds 64 MiB (+ socket buffers)
        assert rss < 400 * MiB, rss
        c.s.close()
        other = C.Client(child.sock)
        other.connect()
        assert other.read(0, 512) == b"\x01" * 512
        other.close()
    finally:
        child.stop()
    nbdtools.assert_clean(top)


def test_fua_and_flushed_writes_survive_sigkill(tmp_path, nbdtools):
    """SIGKILL of the server while a pull runs and a client writes: the image is clean or
    only leaky, and every write acknowledged with FUA or before an acknowledged flush is
    there."""
    qemu = nbdtools
    top, _ref = make_chain(qemu, str(tmp_path))
    child = Child(top, str(tmp_path / "s.sock"), pull_bw="4M")
    durable = {}
    try:
        c = C.Client(child.sock)
        c.connect()
        for i in range(40):
            off = i * 256 * 1024
            data = bytes([i + 1]) * 8192
            fua = i % 3 == 0
            assert ask(c, C.WRITE, off, 8192, flags=C.FUA if fua else 0, data=data) == 0
            if fua:
                durable[off] = data
            if i % 10 == 9:
                pending = {k * 256 * 1024: bytes([k + 1]) * 8192
                           for k in range(i - 9, i + 1)}
                assert ask(c, C.FLUSH) == 0
                durable.update(pending)
        # unflushed writes in flight when the kill comes
        for i in range(40, 48):
            c.send(C.WRITE, 100 + i, i * 256 * 1024, 8192,
                   data=bytes([i + 1]) * 8192)
    finally:
        child.kill()
    assert qemu.check(top) in (0, 3)
    assert len(durable) == 40
    with blockpull.open(top, readonly=True) as img:
        for off, data in durable.items():
            assert img.read(off, 8192) == data, off


FUZZ_EXAMPLES = 600 if SOAK else 80


def test_fuzz_handshakes_and_requests(tmp_path, nbdtools):
    """Valid, truncated and malformed byte streams (hypothesis) against a server in a
    child process under an address-space limit: it never crashes or hangs, memory stays
    bounded, a second client still works and the image checks clean."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings, strategies as st

    top, ref = make_chain(nbdtools, str(tmp_path))
    child = Child(top, str(tmp_path / "s.sock"), as_limit=2 << 30)

    u32 = st.integers(0, 2 ** 32 - 1)
    option = st.builds(
        lambda opt, data, lie: struct.pack(">QII", C.IHAVEOPT, opt,
                                           len(data) if lie is None else lie) + data,
        st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 99]) | u32,
        st.binary(max_size=64) | st.builds(
            lambda n, q: struct.pack(">I", len(n)) + n + struct.pack(">I", len(q)) +
            b"".join(struct.pack(">I", len(x)) + x for x in q),
            st.sampled_from([b"", b"x"]),
            st.lists(st.sampled_from([b"base:allocation", b"base:", b"qemu:", b"x:y", b""]),
                     max_size=3)),
        st.none() | st.integers(0, 2 ** 32 - 1))
    request = st.builds(
        lambda flags, typ, off, n, pay: struct.pack(">IHHQQI", C.REQ_MAGIC, flags, typ, 5,
                                                    off, n) + pay,
        st.integers(0, 0xFFFF), st.integers(0, 9) | st.integers(0, 0xFFFF),
        st.integers(0, SIZE + 4096) | st.integers(0, 2 ** 64 - 1),
        st.integers(0, 70000) | u32, st.binary(max_size=512))
    go_only = struct.pack(">QII", C.IHAVEOPT, 7, 6) + struct.pack(">IH", 0, 0)
    structured = struct.pack(">QII", C.IHAVEOPT, 8, 0)
    ctxs = [b"base:allocation", b"qemu:allocation-depth"]
    q = struct.pack(">II", 0, 2) + b"".join(struct.pack(">I", len(x)) + x for x in ctxs)
    set_meta = struct.pack(">QII", C.IHAVEOPT, 10, len(q)) + q
    # simple replies, structured replies, structured with both metadata contexts
    go = st.sampled_from([go_only, structured + go_only, structured + set_meta + go_only])
    stream = st.one_of(
        st.binary(max_size=200),
        st.builds(lambda f, opts: struct.pack(">I", f) + b"".join(opts),
                  st.integers(0, 3) | u32, st.lists(option, max_size=4)),
        st.builds(lambda g, reqs, cut: (struct.pack(">I", 3) + g + b"".join(reqs))[:cut],
                  go, st.lists(request, max_size=6), st.integers(0, 4000)),
    )

    def talk(data: bytes) -> None:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        s.connect(child.sock)
        try:
            s.recv(18)
            s.sendall(data)
            s.settimeout(0.05)
            while s.recv(65536):
                pass
        except (socket.timeout, ConnectionError, BrokenPipeError):
            pass
        finally:
            s.close()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not SOAK,
              suppress_health_check=list(HealthCheck), database=None)
    @given(stream)
    def fuzz(data):
        talk(data)
        assert child.p.poll() is None, child.p.stderr.read()

    try:
        fuzz()
        assert _rss(child.p.pid) < 600 * MiB
        good = C.Client(child.sock)
        good.connect()
        assert good.read(7 * MiB, 4096) == b"\x03" * 4096
        good.close()
    finally:
        err = child.stop()
    assert "Traceback" not in err, err[-3000:]
    assert nbdtools.check(top) == 0


def test_io_errors_fail_only_their_request(tmp_path, nbdtools):
    """EIO reading the backing chain and ENOSPC writing the top reach the client as the
    protocol's EIO and ENOSPC for that request; the connection and the image stay fine."""
    import errno as _errno
    from blockpull.faults import FaultInjector, attach, detach
    EIO = 5
    top, ref = make_chain(nbdtools, str(tmp_path))
    with blockpull.serve(top, backing_format="qcow2", copy_on_read=False) as srv:
        c = C.Client(srv.socket_path)
        c.connect()
        inj = attach(srv.image, FaultInjector())
        inj.fail("read", role="backing", errno=_errno.EIO, times=None)
        assert ask(c, C.READ, 7 * MiB, 4096) == EIO              # inherited: fails
        assert c.read(512 * 1024, 4096) == b"\x06" * 4096         # the top's own: fine
        inj.rules.clear()
        inj.fail("write", role="top", errno=_errno.ENOSPC, times=None)
        assert ask(c, C.WRITE, 12 * MiB, 65536, data=b"\x42" * 65536) == ENOSPC
        detach(srv.image)
        assert c.read(7 * MiB, 4096) == b"\x03" * 4096
        assert ask(c, C.WRITE, 12 * MiB, 65536, data=b"\x42" * 65536) == 0
        assert c.read(12 * MiB, 65536) == b"\x42" * 65536
        c.close()
    assert nbdtools.check(top) in (0, 3)      # a failed allocation may leak, never corrupt


def test_close_does_not_wait_for_a_client_that_never_reads(tmp_path, nbdtools, monkeypatch):
    import threading
    from blockpull.nbd import server as server_mod
    monkeypatch.setattr(server_mod, "CLOSE_GRACE", 1.0)
    top, _ref = make_chain(nbdtools, str(tmp_path))
    srv = blockpull.serve(top, backing_format="qcow2")
    c = C.Client(srv.socket_path)
    c.connect(structured=False)
    c.s.setblocking(False)
    req = struct.pack(">IHHQQI", C.REQ_MAGIC, 0, C.READ, 1, 0, 8 * MiB)
    for _ in range(64):
        try:
            c.s.send(req)
        except BlockingIOError:
            break
    time.sleep(0.5)
    t = threading.Thread(target=srv.close)     # the default grace, here 1 s
    t.start()
    t.join(60)
    assert not t.is_alive(), "close() waits for a client that never reads its replies"
    assert srv.closed
    c.s.close()
    nbdtools.assert_clean(top)


def test_clients_vanishing_with_requests_in_flight(tmp_path, nbdtools):
    """Clients that send a burst of requests and hang up at once: each connection ends
    (nothing waits for replies nobody will read), the server keeps serving."""
    top, ref = make_chain(nbdtools, str(tmp_path))
    with blockpull.serve(top, backing_format="qcow2") as srv:
        for i in range(6):
            c = C.Client(srv.socket_path)
            c.connect(structured=bool(i % 2))
            burst = b"".join(
                struct.pack(">IHHQQI", C.REQ_MAGIC, 0, C.READ, k, k * 65536 % (8 * MiB), 65536)
                for k in range(400))
            c.s.sendall(burst)
            c.s.recv(1)          # the first reply is on its way: the rest meet a closed socket
            c.s.close()
        for _ in range(400):                 # each connection notices and ends
            if srv.connections == 0:
                break
            time.sleep(0.05)
        assert srv.connections == 0
        good = C.Client(srv.socket_path)
        good.connect()
        assert good.read(7 * MiB, 4096) == b"\x03" * 4096
        good.close()
    nbdtools.assert_clean(top)
