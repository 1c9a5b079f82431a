"""Serving an image over NBD, judged by real clients (qemu-img, qemu-io, nbdinfo, nbdcopy)
and QEMU's tools as the oracle: what the export reads equals the chain, what clients
write equals a model made by applying the same commands to a copy with qemu-io, and
after a pull under the clients the image stands alone and checks clean."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import threading

import pytest

import blockpull
from blockpull.errors import ServeError
import nbdclient as C

MiB = 1 << 20
SIZE = 16 * MiB
CLIENT_TOOLS = ("nbdinfo", "nbdcopy")


@pytest.fixture
def nbdtools(qemu):
    """QEMU's tools plus libnbd's; missing ones fail under CI, skip elsewhere."""
    missing = [t for t in CLIENT_TOOLS if not shutil.which(t)]
    if missing:
        msg = f"{', '.join(missing)} required: apt-get install libnbd-bin"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return qemu


def make_chain(qemu, d, fmt="qcow2", cluster=65536):
    """base (qcow2: data, a zero cluster, holes) <- top (``fmt``: data of its own).
    Returns (top, ref): ``ref`` is a pristine copy of the top on the same base."""
    os.makedirs(d, exist_ok=True)
    base = qemu.create(os.path.join(d, "base.qcow2"), SIZE)
    qemu.io(base, "write -P 1 0 3M", "write -P 2 4M 1M", "write -z 5M 1M",
            "write -P 3 7M 2M", "write -P 4 12M 64k", "write -P 5 15M 1M")
    top = qemu.create(os.path.join(d, "top." + fmt), SIZE, fmt=fmt, backing="base.qcow2",
                      opts=[f"cluster_size={cluster}"])
    qemu.io(top, "write -P 6 512k 128k", "write -P 7 8M 100k", "write -z 2M 64k", fmt=fmt)
    ref = os.path.join(d, "ref." + fmt)
    shutil.copy(top, ref)
    return top, ref


def model(qemu, path, cmds, fmt="qcow2"):
    """Apply client commands to the local model, one at a time, zero writes as writes of
    zeros (the same content; QEMU's own QED driver mishandles concurrent allocating
    writes and zero writes over a backing file)."""
    plain = []
    for c in cmds:
        c = c.replace("aio_write", "write")
        if c == "aio_flush":
            c = "flush"
        plain.append(c.replace("write -z", "write -P 0"))
    qemu.io(path, *plain, fmt=fmt)


def qio(uri, *cmds):
    """qemu-io over the export (raw); raises on any failed command."""
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args + [uri], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "error" not in out.lower() and "fail" not in out.lower() \
        and "mismatch" not in out.lower(), out
    return out


def compare_export(qemu, uri, ref, fmt):
    r = qemu.img("compare", "-f", "raw", "-F", fmt, uri, ref, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_export_reads_the_chain(tmp_path, nbdtools, fmt):
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path), fmt)
    with blockpull.serve(top, backing_format="qcow2") as srv:
        assert srv.uri.startswith("nbd+unix:///?socket=")
        compare_export(qemu, srv.uri, ref, fmt)
        out = str(tmp_path / "copy.raw")
        r = subprocess.run(["nbdcopy", "--connections=4", "--requests=16", srv.uri, out],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert qemu.compare(out, ref, "raw", fmt)
        info = json.loads(subprocess.run(["nbdinfo", "--json", srv.uri], capture_output=True,
                                         text=True, check=True).stdout)
        ex = info["exports"][0]
        assert ex["export-size"] == SIZE
        assert ex["can_multi_conn"] and ex["can_flush"] and ex["can_fua"] and ex["can_zero"]
        assert not ex["is_read_only"]
        assert ex["block_size_minimum"] == 1 and ex["block_size_maximum"] == 32 * MiB
        assert sorted(ex["contexts"]) == ["base:allocation", "qemu:allocation-depth"]
    # copy on read kept what the clients read, nothing else changed
    qemu.assert_clean(top, fmt)
    assert qemu.compare(top, ref, fmt, fmt)
    assert qemu.info(top)["backing-filename"] == "base.qcow2"


def _runs(extents, key):
    out = []
    for e in extents:
        k = key(e)
        if out and out[-1][2] == k and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], k])
    return [tuple(x) for x in out]


def _nbd_runs(items):
    out = []
    for e in items:
        if out and out[-1][2] == e["type"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["offset"], e["length"], e["type"]])
    return [tuple(x) for x in out]


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_block_status_equals_qemu_img_map(tmp_path, nbdtools, fmt):
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path), fmt)
    want = qemu.map(ref)
    alloc = _runs(want, lambda e: (0 if e["data"] else 1) | (2 if e["zero"] else 0))
    depth = _runs(want, lambda e: e["depth"] + 1 if e["present"] else 0)
    with blockpull.serve(top, backing_format="qcow2", readonly=True) as srv:
        for ctx, expect in (("base:allocation", alloc), ("qemu:allocation-depth", depth)):
            r = subprocess.run(["nbdinfo", f"--map={ctx}", "--json", srv.uri],
                               capture_output=True, text=True, check=True)
            assert _nbd_runs(json.loads(r.stdout)) == expect, ctx


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_qemu_io_writes_land_as_on_a_local_copy(tmp_path, nbdtools, fmt):
    """Writes (unaligned, FUA, aio batches), write -z over inherited data, flush, and
    discard followed by a rewrite, through the export and on a local copy of the chain:
    the two end equal, and the served image checks clean."""
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path), fmt)
    batches = [
        ["write -P 17 100000 300000", "write -f -P 18 1M 4096", "read -P 18 1M 4096"],
        ["write -z 4M 256k", "write -z 4259840 1000", "read -P 0 4M 256k", "flush"],
        ["aio_write -P 19 6M 64k", "aio_write -P 20 6400k 100k", "aio_write -P 21 9M 1M",
         "aio_write -z 12M 64k", "aio_flush"],
        ["discard 14M 512k", "write -P 22 14M 512k", "read -P 22 14M 512k"],
        ["write -P 23 16646144 131072", "flush"],
    ]
    model_path = str(tmp_path / ("model." + fmt))
    shutil.copy(ref, model_path)
    with blockpull.serve(top, backing_format="qcow2") as srv:
        for b in batches:
            qio(srv.uri, *b)
            model(qemu, model_path, b, fmt)
        compare_export(qemu, srv.uri, model_path, fmt)
    qemu.assert_clean(top, fmt)
    assert qemu.compare(top, model_path, fmt, fmt)


def test_discard_never_shows_the_backing_differently(tmp_path, nbdtools):
    """TRIM over inherited data: each cluster reads as before or as zeros, never as an
    older layer (the base's data under a zero cluster of the top stays hidden)."""
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path))
    before = qemu.to_raw(ref, str(tmp_path / "before.raw"))
    with blockpull.serve(top, backing_format="qcow2") as srv:
        qio(srv.uri, "discard 0 16M", "flush")
        c = C.Client(srv.socket_path)
        c.connect()
        after = c.read(0, SIZE)
        c.close()
    cs = 65536
    for off in range(0, SIZE, cs):
        got = after[off:off + cs]
        assert got == before[off:off + cs] or got == bytes(cs), off
    assert after[2 * MiB:2 * MiB + cs] == bytes(cs)      # the top's zero cluster
    qemu.assert_clean(top)


def test_pipelined_requests_answered_by_cookie(tmp_path, nbdtools):
    """Many requests in flight on one connection, replies matched by cookie."""
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path))
    raw = qemu.to_raw(ref, str(tmp_path / "ref.raw"))
    with blockpull.serve(top, backing_format="qcow2", copy_on_read=False) as srv:
        c = C.Client(srv.socket_path)
        c.connect()
        assert c.size == SIZE
        reqs = {}
        for i in range(48):
            off = (i * 337 * 1024) % (SIZE - 200000)
            n = 1 + (i * 7919) % 200000
            reqs[1000 + i] = (off, n)
            c.send(C.READ, 1000 + i, off, n)
        c.send(C.WRITE, 7, 3 * MiB, 4096, data=b"\x55" * 4096)
        for _ in range(len(reqs) + 1):
            cookie, err, body = c.reply()
            assert err == 0
            if cookie == 7:
                continue
            off, n = reqs.pop(cookie)
            assert C.assemble(body, off, n) == raw[off:off + n]
        assert not reqs
        assert c.read(3 * MiB, 4096) == b"\x55" * 4096
        # unstructured connection: simple replies
        c2 = C.Client(srv.socket_path)
        c2.connect(structured=False)
        assert c2.read(7 * MiB, 5000) == raw[7 * MiB:7 * MiB + 5000]
        c2.close()
        c.close()


def test_cache_pulls_the_range(tmp_path, nbdtools):
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path))
    with blockpull.serve(top, backing_format="qcow2", copy_on_read=False) as srv:
        c = C.Client(srv.socket_path)
        c.connect(contexts=("qemu:allocation-depth",))
        c.send(C.BLOCK_STATUS, 1, 7 * MiB, MiB)
        _ck, err, body = c.reply()
        assert err == 0 and body["status"]["qemu:allocation-depth"][0][1] == 2
        c.send(C.CACHE, 2, 7 * MiB, MiB)
        assert c.reply()[1] == 0
        c.send(C.BLOCK_STATUS, 3, 7 * MiB, MiB)
        _ck, err, body = c.reply()
        assert body["status"]["qemu:allocation-depth"] == [(MiB, 1)]
        c.close()
    qemu.assert_clean(top)
    assert qemu.compare(top, ref)
    m = [e for e in qemu.map(top) if e["start"] <= 7 * MiB < e["start"] + e["length"]][0]
    assert m["depth"] == 0 and m["data"]


# ---- pulling while served ---------------------------------------------------------------------


def _random_batches(seed, count, size=SIZE):
    """qemu-io command batches of aio writes and zero writes; the requests of a batch
    never overlap (their order is the client's to choose), batches end with a flush."""
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        b = []
        taken = []
        while len(b) < 6:
            off = rng.randrange(0, size - 300000)
            n = rng.randrange(1, 300000)
            if any(off < e and s < off + n for s, e in taken):
                continue
            taken.append((off, off + n))
            op = rng.random()
            if op < 0.7:
                b.append(f"aio_write -P {rng.randrange(1, 255)} {off} {n}")
            else:
                b.append(f"aio_write -z {off} {n}")
        b.append("aio_flush")
        out.append(b)
    return out


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_pull_while_clients_write(tmp_path, nbdtools, fmt):
    """A pull (bandwidth-limited, so clients overlap it) while qemu-io writes through the
    export: at the end the image stands alone, checks clean, and equals the model."""
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path), fmt)
    model_path = str(tmp_path / ("model." + fmt))
    shutil.copy(ref, model_path)
    batches = _random_batches(7 if fmt == "qcow2" else 8, 10)
    with blockpull.serve(top, backing_format="qcow2", pull=True, bandwidth="1M") as srv:
        job = srv.job
        for b in batches:
            qio(srv.uri, *b)
            model(qemu, model_path, b, fmt)
        assert not job.done(), "the pull ended before the clients: raise the data or lower the rate"
        job.set_speed(0)
        job.result(timeout=120)
        # the template is released while the export goes on: QEMU may write to it
        qemu.img("snapshot", "-c", "released", str(tmp_path / "base.qcow2"))
        # the backing link dropped under the clients: they still read the same disk
        compare_export(qemu, srv.uri, model_path, fmt)
        qio(srv.uri, "write -P 99 5M 4096")
        model(qemu, model_path, ["write -P 99 5M 4096"], fmt)
    assert "backing-filename" not in qemu.info(top)
    qemu.assert_clean(top, fmt)
    assert qemu.compare(top, model_path, fmt, fmt)


def test_two_clients_write_while_pulling(tmp_path, nbdtools):
    """Two qemu-io processes at once (each on its own half) while the pull runs."""
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path))
    model_path = str(tmp_path / "model.qcow2")
    shutil.copy(ref, model_path)
    half = SIZE // 2
    lanes = [_random_batches(s, 6, half) for s in (1, 2)]
    # lane 2 writes the upper half
    lanes[1] = [[_shift(c, half) for c in b] for b in lanes[1]]
    errors = []
    with blockpull.serve(top, backing_format="qcow2", pull=True, bandwidth="1M") as srv:
        def run(batches):
            try:
                for b in batches:
                    qio(srv.uri, *b)
            except BaseException as exc:  # reported below
                errors.append(exc)
        ts = [threading.Thread(target=run, args=(lane,)) for lane in lanes]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors
        srv.job.set_speed(0)
        srv.job.result(timeout=120)
    for lane in lanes:
        for b in lane:
            model(qemu, model_path, b)
    assert "backing-filename" not in qemu.info(top)
    qemu.assert_clean(top)
    assert qemu.compare(top, model_path)


def _shift(cmd, by):
    parts = cmd.split()
    if parts[0] != "aio_write":
        return cmd
    parts[-2] = str(int(parts[-2]) + by)
    return " ".join(parts)


def test_close_aborts_a_running_pull_cleanly(tmp_path, nbdtools):
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path))
    srv = blockpull.serve(top, backing_format="qcow2", pull=True, bandwidth="1M")
    job = srv.job
    qio(srv.uri, "write -P 40 1M 64k")
    srv.close()
    assert srv.closed and job.status == "cancelled"
    with pytest.raises(blockpull.PullCancelled):
        job.result(0)
    qemu.assert_clean(top)
    assert qemu.info(top)["backing-filename"] == "base.qcow2"
    model_path = str(tmp_path / "model.qcow2")
    shutil.copy(ref, model_path)
    model(qemu, model_path, ["write -P 40 1M 64k"])
    assert qemu.compare(top, model_path)
    blockpull.pull(top)          # a later pull finishes the job
    assert "backing-filename" not in qemu.info(top)
    assert qemu.compare(top, model_path)
    qemu.assert_clean(top)


# ---- the server's own face -----------------------------------------------------------------------


def test_socket_is_private_and_locks_the_image(tmp_path, nbdtools):
    qemu = nbdtools
    top, _ref = make_chain(qemu, str(tmp_path))
    sock = str(tmp_path / "s.sock")
    with blockpull.serve(top, backing_format="qcow2", socket=sock, export_name="disk 1") as srv:
        assert srv.uri == f"nbd+unix:///disk%201?socket={sock}"
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        r = qemu.img("info", top, check=False)
        assert r.returncode != 0 and "lock" in (r.stdout + r.stderr).lower()
        with pytest.raises(ServeError):
            blockpull.serve(str(tmp_path / "ref.qcow2"), socket=sock)
        out = subprocess.run(["nbdinfo", "--list", "--json", srv.uri], capture_output=True,
                             text=True, check=True).stdout
        assert [e["export-name"] for e in json.loads(out)["exports"]] == ["disk 1"]
    assert not os.path.exists(sock)
    with blockpull.serve(top, backing_format="qcow2") as srv:
        d = os.path.dirname(srv.socket_path)
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert not os.path.exists(d)


def test_tcp_loopback_and_refusals(tmp_path, nbdtools):
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path))
    with blockpull.serve(top, backing_format="qcow2", port=0) as srv:
        assert srv.uri == f"nbd://127.0.0.1:{srv.port}/"
        compare_export(qemu, srv.uri, ref, "qcow2")
    with pytest.raises(ServeError, match="TLS"):
        blockpull.serve(top, backing_format="qcow2", host="0.0.0.0", port=0)
    with pytest.raises(ServeError):
        blockpull.serve(top, backing_format="qcow2", socket=str(tmp_path / "x"), port=0)
    with pytest.raises(ServeError, match="107"):
        blockpull.serve(top, backing_format="qcow2", socket=str(tmp_path / ("s" * 120)))
    with pytest.raises(ServeError, match="cannot listen"):
        blockpull.serve(top, backing_format="qcow2", socket=str(tmp_path / "no" / "s.sock"))
    with blockpull.serve(top, backing_format="qcow2", port=0) as srv:
        with pytest.raises(ServeError, match="cannot listen"):     # the port is taken
            blockpull.serve(str(tmp_path / "ref.qcow2"), backing_format="qcow2",
                            port=srv.port)
    # nothing was left open: the image opens again
    blockpull.open(top).close()


def test_readonly_export(tmp_path, nbdtools):
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path))
    with blockpull.serve(top, backing_format="qcow2", readonly=True) as srv:
        c = C.Client(srv.socket_path)
        c.connect()
        assert c.tflags & 2                               # READ_ONLY
        assert not c.tflags & (1 << 6)                    # no WRITE_ZEROES offered
        for typ in (C.WRITE, C.WRITE_ZEROES, C.TRIM):
            c.send(typ, 5, 0, 512, data=bytes(512) if typ == C.WRITE else None)
            assert c.reply()[1] == 1                      # EPERM
        c.close()
        with pytest.raises(ServeError, match="read-only"):
            srv.pull()
        compare_export(qemu, srv.uri, ref, "qcow2")
    assert qemu.compare(top, ref)


def test_async_face(tmp_path, nbdtools):
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path))

    async def main():
        async with blockpull.serve(top, backing_format="qcow2") as srv:
            proc = await asyncio.create_subprocess_exec(
                "qemu-img", "compare", "-f", "raw", "-F", "qcow2", srv.uri, ref)
            assert await proc.wait() == 0
            asyncio.get_running_loop().call_later(0.05, srv.close)
            await asyncio.wait_for(srv.wait_closed(), 30)
            assert srv.closed
    asyncio.run(main())


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_pull_racing_many_small_writes_leaks_nothing(tmp_path, nbdtools, fmt):
    """Two clients' 4 KiB writes spread over the disk race an unlimited pull cluster by
    cluster: afterwards `qemu-img check` is clean (not leaky) and the data is right."""
    import random
    qemu = nbdtools
    size = 32 * MiB
    base = qemu.create(str(tmp_path / "base.qcow2"), size)
    qemu.io(base, f"write -P 1 0 {size}")
    for rnd in range(2):
        d = tmp_path / f"r{rnd}"
        d.mkdir()
        top = qemu.create(str(d / f"top.{fmt}"), size, fmt=fmt, backing="../base.qcow2")
        rng = random.Random(rnd)
        lanes = [[f"aio_write -P {9 + k} {off} 4096"
                  for off in rng.sample(range(k * size // 2, (k + 1) * size // 2, 4096), 150)]
                 + ["aio_flush"] for k in range(2)]
        with blockpull.serve(top, backing_format="qcow2", copy_on_read=False, pull=True,
                             bandwidth="64M") as srv:
            errors = []

            def client(lane):
                try:
                    qio(srv.uri, *lane)
                except BaseException as exc:  # reported below
                    errors.append(exc)
            ts = [threading.Thread(target=client, args=(lane,)) for lane in lanes]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert not errors, errors
            srv.job.set_speed(0)
            srv.job.result(timeout=120)
        model_path = str(d / "model.qcow2")
        qemu.create(model_path, size, backing="../base.qcow2")
        for lane in lanes:
            model(qemu, model_path, lane)
        assert qemu.compare(top, model_path, fmt, "qcow2")
        qemu.assert_clean(top, fmt)


def test_meta_context_negotiation(tmp_path, nbdtools):
    """LIST_META_CONTEXT: no query lists all, a bare namespace lists what is in it;
    SET_META_CONTEXT selects full names only, and what it replaced is gone."""
    import struct
    top, _ref = make_chain(nbdtools, str(tmp_path))

    def meta(queries):
        q = b"".join(struct.pack(">I", len(x)) + x for x in queries)
        return struct.pack(">I", 0) + struct.pack(">I", len(queries)) + q

    def names(replies):
        assert replies[-1][0] == 1, replies
        return sorted(d[4:].decode() for t, d in replies if t == 4)

    with blockpull.serve(top, backing_format="qcow2", readonly=True) as srv:
        c = C.Client(srv.socket_path)
        c.greeting()
        assert c.option(C.OPT_STRUCTURED_REPLY)[-1][0] == 1
        assert names(c.option(C.OPT_LIST_META, meta([]))) == \
            ["base:allocation", "qemu:allocation-depth"]
        assert names(c.option(C.OPT_LIST_META, meta([b"base:"]))) == ["base:allocation"]
        assert names(c.option(C.OPT_LIST_META, meta([b"qemu:"]))) == ["qemu:allocation-depth"]
        assert names(c.option(C.OPT_LIST_META, meta([b"x-other:thing"]))) == []
        assert c.option(C.OPT_LIST_META, meta([b"nocolon"]))[-1][0] == (1 << 31) + 3
        assert names(c.option(C.OPT_SET_META, meta([b"base:allocation"]))) == ["base:allocation"]
        assert names(c.option(C.OPT_SET_META, meta([b"base:"]))) == []   # replaced: none
        c.connect(greet=False, structured=False)
        c.structured = True
        c.send(C.BLOCK_STATUS, 3, 0, 4096)
        assert c.reply()[1] == 22                                          # EINVAL
        c.close()


def test_block_status_after_the_pull_sees_one_layer(tmp_path, nbdtools):
    top, ref = make_chain(nbdtools, str(tmp_path))
    with blockpull.serve(top, backing_format="qcow2", pull=True) as srv:
        srv.job.result(timeout=120)
        r = subprocess.run(["nbdinfo", "--map=qemu:allocation-depth", "--json", srv.uri],
                           capture_output=True, text=True, check=True)
        depths = {e["type"] for e in json.loads(r.stdout)}
        assert depths <= {0, 1} and 1 in depths
        compare_export(nbdtools, srv.uri, ref, "qcow2")


def test_nbdcopy_writes_over_many_connections_while_pulling(tmp_path, nbdtools):
    """nbdcopy writes a whole disk into the export over 4 connections with many requests
    in flight (zeros as zero requests), while a pull runs: the image then equals the
    source, stands alone and checks clean."""
    qemu = nbdtools
    top, _ref = make_chain(qemu, str(tmp_path))
    src = bytearray(SIZE)
    for off in range(0, SIZE, 3 * MiB):
        src[off:off + MiB + 4096] = os.urandom(MiB + 4096)[:len(src[off:off + MiB + 4096])]
    src_path = str(tmp_path / "src.raw")
    with open(src_path, "wb") as f:
        f.write(src)
    with blockpull.serve(top, backing_format="qcow2", pull=True, bandwidth="4M") as srv:
        r = subprocess.run(["nbdcopy", "--connections=4", "--requests=32", "--flush",
                            src_path, srv.uri], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        srv.job.set_speed(0)
        srv.job.result(timeout=120)
        compare_export(qemu, srv.uri, src_path, "raw")
    assert "backing-filename" not in qemu.info(top)
    qemu.assert_clean(top)
    assert qemu.compare(top, src_path, "qcow2", "raw")
