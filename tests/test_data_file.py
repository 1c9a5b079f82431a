"""qcow2 images with an external data file (incompatible bit 2; QEMU's
docs/interop/qcow2.rst, "Header" and "Header extensions", type 0x44415441).

Every image is made by qemu-img/qemu-io; what blockpull reads, writes, pulls and checks is
judged by qemu-img compare, check, info and map. QEMU opens a relative data file name
from its working directory, so its commands run in the images' directory here (blockpull
takes the name from the image's directory: both agree there).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import blockpull
from blockpull.errors import DataFileNotAllowedError, ImageFormatError

from relhelp import child_env
from test_blockdev import loopdev  # noqa: F401 (a fixture)

MiB = 1 << 20
CS = 65536
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_child.py")

# qemu-img and qemu-io judge every case (missing: a skip locally, a failure under CI)
pytestmark = pytest.mark.usefixtures("qemu")


def q(tool, *args, cwd, check=True):
    """Run qemu-img or qemu-io in ``cwd`` (where relative data file names resolve)."""
    r = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True)
    if check:
        assert r.returncode == 0, (tool, args, r.stdout, r.stderr)
    return r


def qio(path, *cmds, cwd, fmt="qcow2"):
    args = ["-f", fmt]
    for c in cmds:
        args += ["-c", c]
    r = q("qemu-io", *args, str(path), cwd=cwd)
    assert "error" not in r.stdout.lower() and "fail" not in r.stdout.lower(), r.stdout


def to_raw(path, cwd):
    out = os.path.join(str(cwd), os.path.basename(str(path)) + ".raw")
    q("qemu-img", "convert", "-O", "raw", str(path), out, cwd=cwd)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return bytearray(data)


def same(path, want: bytes, cwd) -> bool:
    """qemu-img compare of ``path`` against the raw bytes ``want``."""
    raw = os.path.join(str(cwd), "want.cmp.raw")
    with open(raw, "wb") as f:
        f.write(want)
    r = q("qemu-img", "compare", "-q", str(path), "-F", "raw", raw, cwd=cwd, check=False)
    os.unlink(raw)
    return r.returncode == 0


def clean(path, cwd):
    r = q("qemu-img", "check", str(path), cwd=cwd, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout, r.stdout


def info(path, cwd):
    return json.loads(q("qemu-img", "info", "--output=json", str(path), cwd=cwd).stdout)


def qmap(path, cwd):
    return json.loads(q("qemu-img", "map", "--output=json", str(path), cwd=cwd).stdout)


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "blockpull", *args], capture_output=True,
                          text=True, cwd=cwd, env=child_env())


def same_map(path, cwd):
    """``blockpull map`` prints what ``qemu-img map`` prints."""
    r = cli("map", "--output", "json", os.path.basename(str(path)), cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == qmap(path, cwd)


def data_offsets_are_guest_offsets(path, cwd):
    for e in qmap(path, cwd):
        if e["data"] and e["depth"] == 0:
            assert e["offset"] == e["start"], e


@pytest.fixture(params=["", ",extended_l2=on"], ids=["l2", "extl2"])
def backed(tmp_path, qemu, request):
    """base.qcow2 (8 MiB, data here and there) under t.qcow2, whose data file is the
    relative name t.data; t.qcow2 holds some data and a zero cluster of its own (with
    extended L2 entries too: then 1 KiB at 0 is part of one subcluster)."""
    d = tmp_path
    q("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "8M", cwd=d)
    qio("base.qcow2", "write -P 1 0 3M", "write -P 2 5M 1M", "write -P 3 7M 100k", cwd=d)
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=t.data" + request.param,
      "-b", "base.qcow2", "-F", "qcow2", "t.qcow2", "8M", cwd=d)
    qio("t.qcow2", "write -P 7 1M 200k", "write -z 5M 64k", "write -P 8 0 1k", cwd=d)
    return d


def test_read_write_pull_with_a_relative_data_file(backed):
    d = backed
    top = str(d / "t.qcow2")
    want = to_raw(top, d)
    same_map(top, d)
    r = cli("info", "--output", "json", "t.qcow2", cwd=d)
    assert json.loads(r.stdout)["chain"][0]["data_file"] == str(d / "t.data")
    assert json.loads(r.stdout)["chain"][1]["data_file"] is None
    with blockpull.open(top) as img:
        assert img.layers[0].data_file.path == str(d / "t.data")
        assert bytes(img.read(0, img.size)) == bytes(want)
        # writes into the top's data clusters, unallocated clusters (copy-on-write of the
        # backing's data), the zero cluster, and the last cluster
        for off, n, byte in ((1 * MiB + 100, 5000, 0x41), (3 * CS + 7, 3 * CS, 0x42),
                             (5 * MiB - 10, 200, 0x43), (8 * MiB - 300, 300, 0x44),
                             (0, 10, 0x45)):
            img.write(off, bytes([byte]) * n)
            want[off:off + n] = bytes([byte]) * n
        img.flush()
        assert bytes(img.read(0, img.size)) == bytes(want)
    clean(top, d)
    assert same(top, want, d)
    data_offsets_are_guest_offsets(top, d)
    # the image file itself holds metadata only: no cluster was allocated for data
    assert os.path.getsize(top) <= 6 * CS
    with blockpull.open(top) as img:
        assert img.pull().result(timeout=60).status == "completed"
    i = info(top, d)
    assert "backing-filename" not in i
    assert i["format-specific"]["data"]["data-file"] == "t.data"
    assert same(top, want, d)
    clean(top, d)
    data_offsets_are_guest_offsets(top, d)
    assert all(e["depth"] == 0 for e in qmap(top, d) if e["data"])
    same_map(top, d)
    # what blockpull's own check says agrees
    r = cli("check", "t.qcow2", cwd=d)
    assert r.returncode == 0, r.stdout + r.stderr


def test_copy_on_read_into_the_data_file(backed):
    d = backed
    top = str(d / "t.qcow2")
    want = to_raw(top, d)
    with blockpull.open(top, copy_on_read=True) as img:
        assert bytes(img.read(2 * MiB, 1 * MiB)) == bytes(want[2 * MiB:3 * MiB])
    clean(top, d)
    assert same(top, want, d)
    data_offsets_are_guest_offsets(top, d)
    m = qmap(top, d)
    assert any(e["depth"] == 0 and e["start"] <= 2 * MiB < e["start"] + e["length"]
               and e["data"] for e in m), m


def test_guest_writes_into_copies_in_flight_win(backed, monkeypatch):
    # a pulled copy lands in the data file at the guest offset, where a guest write lands
    # too: a guest write to a cluster whose copy is being written must wait for its link
    # (then write in place), never be overwritten by the copy
    import queue
    import threading
    import time
    from blockpull import _stream
    d = backed
    top = str(d / "t.qcow2")
    want = to_raw(top, d)
    targets: "queue.Queue[int]" = queue.Queue()
    calls = []
    real = _stream.write_at_guest

    def slow_write(f, ch, cs):
        # one-cluster chunks in virtual order: the top lacks clusters 1..15 first
        if len(calls) < 5:
            calls.append(1)
            targets.put(len(calls) * CS)
            time.sleep(0.05)    # the guest writes into this very cluster meanwhile
        return real(f, ch, cs)
    monkeypatch.setattr(_stream, "write_at_guest", slow_write)
    written = []
    with blockpull.open(top) as img:
        def guest():
            for i in range(5):
                off = targets.get(timeout=30) + 7
                img.write(off, bytes([0xA0 + i]) * 100)
                written.append((off, bytes([0xA0 + i]) * 100))

        t = threading.Thread(target=guest)
        t.start()
        job = img.pull(chunk=CS, read_depth=1)
        t.join()
        assert job.result(timeout=60).status == "completed"
        assert len(written) == 5 and len(calls) == 5
        for off, data in written:
            want[off:off + len(data)] = data
        assert bytes(img.read(0, img.size)) == bytes(want)
    clean(top, d)
    assert same(top, want, d)
    assert "backing-filename" not in info(top, d)


def test_raw_data_file_stays_a_raw_image(tmp_path):
    d = tmp_path
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=r.data,data_file_raw=on",
      "r.qcow2", "4M", cwd=d)
    qio("r.qcow2", "write -P 5 0 2M", cwd=d)
    top = str(d / "r.qcow2")
    want = to_raw(top, d)
    with blockpull.open(top) as img:
        assert img.layers[0].data_file_raw
        img.write(100, b"\x06" * 70000)
        want[100:70100] = b"\x06" * 70000
        img.write_zeroes(CS, 3 * CS)
        want[CS:4 * CS] = bytes(3 * CS)
        img.write(3 * MiB + 5, b"\x09" * 10)
        want[3 * MiB + 5:3 * MiB + 15] = b"\x09" * 10
    clean(top, d)
    assert same(top, want, d)
    assert info(top, d)["format-specific"]["data"]["data-file-raw"] is True
    # the data file alone reads as the guest's disk
    r = q("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", "r.qcow2", "r.data",
          cwd=d, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_extended_l2_with_a_data_file_reads(tmp_path):
    d = tmp_path
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=x.data,extended_l2=on",
      "x.qcow2", "4M", cwd=d)
    qio("x.qcow2", "write -P 2 0 64k", "write -P 3 68k 8k", "write -z 128k 64k",
        "write -P 4 1M 300k", cwd=d)
    top = str(d / "x.qcow2")
    want = to_raw(top, d)
    with blockpull.open(top, readonly=True) as img:
        assert bytes(img.read(0, img.size)) == bytes(want)
        assert bytes(img.read(70 * 1024, 10000)) == bytes(want[70 * 1024:70 * 1024 + 10000])
    same_map(top, d)
    r = cli("check", "x.qcow2", cwd=d)
    assert r.returncode == 0, r.stdout + r.stderr
    # writable too: the data lands in the data file at the guest offset, per subcluster
    with blockpull.open(top) as img:
        img.write(70 * 1024 + 5, b"\x09" * 3000)
        want[70 * 1024 + 5:70 * 1024 + 3005] = b"\x09" * 3000
    clean(top, d)
    assert same(top, want, d)
    data_offsets_are_guest_offsets(top, d)
    same_map(top, d)


def test_absolute_data_file_name_elsewhere(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "data").mkdir()
    data = tmp_path / "data" / "t.data"
    q("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=tmp_path / "img")
    qio("base.qcow2", "write -P 1 0 4M", cwd=tmp_path / "img")
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data}", "-b",
      "base.qcow2", "-F", "qcow2", "t.qcow2", "4M", cwd=tmp_path / "img")
    top = str(tmp_path / "img" / "t.qcow2")
    want = to_raw(top, tmp_path)
    with blockpull.open(top) as img:
        assert img.layers[0].data_file.path == str(data)
        img.write(CS - 1, b"\x02\x03")
        want[CS - 1:CS + 1] = b"\x02\x03"
        assert img.pull().result(timeout=60).status == "completed"
    clean(top, tmp_path)
    assert same(top, want, tmp_path)
    assert os.path.getsize(data) == 4 * MiB


def test_the_data_file_is_locked_with_the_image(backed):
    d = backed
    # a writer of the data file is refused while the image is open for writing (a raw
    # reader is not: QEMU's raw driver shares writes with readers)
    with blockpull.open(str(d / "t.qcow2")):
        r = q("qemu-io", "-f", "raw", "-c", "read 0 512", "t.data", cwd=d, check=False)
        assert r.returncode != 0 and "lock" in (r.stdout + r.stderr).lower(), r
    q("qemu-io", "-f", "raw", "-c", "read 0 512", "t.data", cwd=d)


@pytest.fixture
def data_file_backing(tmp_path):
    """top.qcow2 (plain) over mid.qcow2, whose data file is mid.data."""
    d = tmp_path
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=mid.data", "mid.qcow2",
      "4M", cwd=d)
    qio("mid.qcow2", "write -P 4 0 1M", "write -P 5 3M 64k", cwd=d)
    q("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
      "top.qcow2", "4M", cwd=d)
    qio("top.qcow2", "write -P 6 512k 64k", cwd=d)
    return d


def test_a_backings_data_file_is_refused_unless_allowed(data_file_backing):
    d = data_file_backing
    top = str(d / "top.qcow2")
    want = to_raw(top, d)
    with pytest.raises(DataFileNotAllowedError, match="allow_data_file=True"):
        blockpull.open(top)
    with pytest.raises(DataFileNotAllowedError):
        blockpull.pull(top)
    assert issubclass(DataFileNotAllowedError, ImageFormatError)
    for cmd in ("info", "map", "pull"):
        r = cli(cmd, "top.qcow2", cwd=d)
        assert r.returncode != 0, (cmd, r.stdout, r.stderr)
        assert "--allow-data-file" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert info(top, d)["backing-filename"] == "mid.qcow2"     # nothing changed
    r = cli("map", "--allow-data-file", "--output", "json", "top.qcow2", cwd=d)
    assert r.returncode == 0, r.stderr
    assert [(e["start"], e["length"], e["data"]) for e in json.loads(r.stdout)] == \
        [(e["start"], e["length"], e["data"]) for e in qmap(top, d)]
    assert cli("info", "--allow-data-file", "top.qcow2", cwd=d).returncode == 0
    with blockpull.open(top, allow_data_file=True) as img:
        assert bytes(img.read(0, img.size)) == bytes(want)
    assert blockpull.pull(top, allow_data_file=True).status == "completed"
    assert "backing-filename" not in info(top, d)
    assert same(top, want, d)
    clean(top, d)


def test_cli_pull_allows_a_backings_data_file(data_file_backing):
    d = data_file_backing
    top = str(d / "top.qcow2")
    want = to_raw(top, d)
    r = cli("pull", "--allow-data-file", "--no-progress", "top.qcow2", cwd=d)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backing-filename" not in info(top, d)
    assert same(top, want, d)
    clean(top, d)


def _l2_entry_offset(path, cluster):
    """Where the L2 entry of ``cluster`` is (the first L2 table; 128-bit entries with
    extended L2, incompatible bit 4)."""
    with open(path, "rb") as f:
        f.seek(72)
        if int.from_bytes(f.read(8), "big") & 16:
            cluster *= 2
        f.seek(40)
        l1_off = int.from_bytes(f.read(8), "big")
        f.seek(l1_off)
        l2 = int.from_bytes(f.read(8), "big") & 0x00FFFFFFFFFFFE00
    return l2 + 8 * cluster


def test_an_entry_away_from_its_guest_offset_is_corrupt(backed):
    d = backed
    top = str(d / "t.qcow2")
    at = _l2_entry_offset(top, 16)          # 1 MiB: data of the top's own
    with open(top, "r+b") as f:
        f.seek(at)
        e = int.from_bytes(f.read(8), "big")
        assert e & 0x00FFFFFFFFFFFE00 == 16 * CS
        f.seek(at)
        f.write(((1 << 63) | (40 * CS)).to_bytes(8, "big"))
    r = cli("check", "t.qcow2", cwd=d)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "guest offset" in r.stdout, r.stdout
    with blockpull.open(top, readonly=True) as img:
        with pytest.raises(ImageFormatError, match="guest offset"):
            img.read(1 * MiB, 512)


@pytest.mark.parametrize("role, kill_at", [("top", 3), ("top", 8), ("top", 14),
                                           ("data", 2), ("data", 9)])
def test_sigkill_mid_pull(tmp_path, role, kill_at):
    _sigkill_mid_pull(tmp_path, role, kill_at, "", ["write -P 7 64k 64k"])


@pytest.mark.parametrize("role, kill_at", [("top", 3), ("top", 8), ("data", 2), ("data", 9)])
def test_sigkill_mid_pull_extended_l2(tmp_path, role, kill_at):
    # the top holds some subclusters of the clusters the pull fills: the copies are
    # written around them, and a kill at any write leaves them as they were
    _sigkill_mid_pull(tmp_path, role, kill_at, ",extended_l2=on",
                      ["write -P 7 64k 64k", "write -P 8 3000 100", "write -z 200k 6k",
                       "write -P 9 2M 2k", "write -P 10 2100k 1k"])


def _sigkill_mid_pull(d, role, kill_at, opts, top_cmds):
    data = d / "t.data"
    q("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
    qio("base.qcow2", "write -P 1 0 1M", "write -P 2 2M 2M", cwd=d)
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data}{opts}", "-b",
      "base.qcow2", "-F", "qcow2", "t.qcow2", "4M", cwd=d)
    qio("t.qcow2", *top_cmds, cwd=d)
    top = str(d / "t.qcow2")
    want = to_raw(top, d)
    p = subprocess.run([sys.executable, CHILD, top, "-", str(kill_at), "0", str(CS),
                        str(3 * CS), role], capture_output=True, text=True,
                       env=child_env(), timeout=120)
    assert p.returncode == -9, (p.returncode, p.stdout, p.stderr)
    r = q("qemu-img", "check", top, cwd=d, check=False)
    assert r.returncode in (0, 3), r.stdout + r.stderr
    assert cli("check", top, cwd=d).returncode == r.returncode    # the same verdict
    assert same(top, want, d)
    data_offsets_are_guest_offsets(top, d)
    assert info(top, d)["backing-filename"] == "base.qcow2"     # killed mid-pull
    assert blockpull.pull(top).status == "completed"
    assert "backing-filename" not in info(top, d)
    assert same(top, want, d)
    r = q("qemu-img", "check", top, cwd=d, check=False)
    assert r.returncode in (0, 3), r.stdout + r.stderr


def _rename_data_file(path, old: str, new: str):
    """Put ``new`` (as long as ``old``) where the header's data file name is."""
    assert len(old) == len(new)
    with open(path, "r+b") as f:
        head = f.read(CS)
        at = head.index(old.encode())
        f.seek(at)
        f.write(new.encode())


@pytest.mark.parametrize("name, says", [
    ("nbd:/x/a.data", "not a plain local path"),
    ("missing.data0", "does not exist"),
    ("t.qcow2\0data", "NUL"),
    ("adirectory00", "is a directory"),
    ("/dev/null", "special file"),
    ("base.qcow2000", "same chain"),
])
def test_a_bad_data_file_is_refused_with_its_reason(tmp_path, name, says):
    d = tmp_path
    (d / "adirectory00").mkdir()
    q("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=d)
    os.link(d / "base.qcow2", d / "base.qcow2000")      # the backing under another name
    old = "x" * (len(name) - 5) + ".data"
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={old}", "-b", "base.qcow2",
      "-F", "qcow2", "t.qcow2", "1M", cwd=d)
    _rename_data_file(d / "t.qcow2", old, name)
    with pytest.raises(ImageFormatError, match=says):
        blockpull.open(str(d / "t.qcow2"))
    r = cli("info", "t.qcow2", cwd=d)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, (r.returncode, r.stderr)


def test_data_file_on_a_block_device(tmp_path, loopdev):
    d = tmp_path
    dev = loopdev(4 * MiB)
    q("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
    qio("base.qcow2", "write -P 1 0 4M", cwd=d)
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={dev}", "-b", "base.qcow2",
      "-F", "qcow2", "t.qcow2", "4M", cwd=d)
    qio("t.qcow2", "write -P 7 64k 64k", cwd=d)
    top = str(d / "t.qcow2")
    want = to_raw(top, d)
    with blockpull.open(top) as img:
        assert img.layers[0].data_file.is_device
        img.write(3 * MiB + 1, b"\x05" * 3)
        want[3 * MiB + 1:3 * MiB + 4] = b"\x05" * 3
        assert img.pull().result(timeout=60).status == "completed"
    clean(top, d)
    assert same(top, want, d)
    assert "backing-filename" not in info(top, d)


def test_pull_keeping_a_base_keeps_the_data_file_link(tmp_path):
    # the header is rewritten for the new (shorter) backing name: the data file
    # extension stays, and only what the middle image held is copied
    d = tmp_path
    mid = "a-much-longer-middle-name.qcow2"
    q("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
    qio("base.qcow2", "write -P 1 0 4M", cwd=d)
    q("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid, cwd=d)
    qio(mid, "write -P 2 1M 1M", cwd=d)
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=t.data", "-b", mid,
      "-F", "qcow2", "t.qcow2", cwd=d)
    qio("t.qcow2", "write -z 0 64k", cwd=d)
    top = str(d / "t.qcow2")
    want = to_raw(top, d)
    with blockpull.open(top) as img:
        job = img.pull(base=str(d / "base.qcow2"))
        assert job.result(timeout=60).status == "completed"
    i = info(top, d)
    assert i["backing-filename"] == "base.qcow2"
    assert i["format-specific"]["data"]["data-file"] == "t.data"
    clean(top, d)
    assert same(top, want, d)
    same_map(top, d)
    assert [(e["start"], e["length"]) for e in qmap(top, d)
            if e["depth"] == 0 and e["data"]] == [(1 * MiB, 1 * MiB)]
    # the human map names the file the data lies in, as qemu-img map's table does
    r = cli("map", "t.qcow2", cwd=d)
    assert f"0x100000        0x100000        0x100000        {d / 't.data'}" in r.stdout, \
        r.stdout


def test_served_over_nbd_written_and_pulled(backed):
    # a guest over NBD writes (unaligned, zeros, discard) while the served image is
    # pulled; a local raw copy given the same writes is what the image must read
    d = backed
    top = str(d / "t.qcow2")
    model = d / "model.raw"
    model.write_bytes(bytes(to_raw(top, d)))
    cmds = ["write -P 17 100000 300000", "write -z 4M 256k", "discard 6M 128k",
            "write -P 19 6M 128k", "write -P 18 7M 5000", "flush"]
    with blockpull.serve(top, copy_on_read=True) as srv:
        job = srv.pull(bandwidth=4 * MiB)
        qio(srv.uri, *cmds, cwd=d, fmt="raw")
        # what a discarded range reads is unspecified until it is written again
        qio(str(model), *[c for c in cmds if not c.startswith("discard")], cwd=d, fmt="raw")
        job.set_speed(0)
        assert job.result(timeout=60).status == "completed"
    clean(top, d)
    assert same(top, model.read_bytes(), d)
    assert "backing-filename" not in info(top, d)
    data_offsets_are_guest_offsets(top, d)


def test_serve_refuses_a_backings_data_file_unless_allowed(data_file_backing):
    d = data_file_backing
    top = str(d / "top.qcow2")
    with pytest.raises(DataFileNotAllowedError):
        blockpull.serve(top)
    with blockpull.serve(top, allow_data_file=True, readonly=True) as srv:
        r = q("qemu-img", "compare", "-f", "raw", srv.uri, "top.qcow2", cwd=d, check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def test_a_failed_sync_of_the_data_file_during_a_pull(backed):
    # the data file's fdatasync fails: what was copied since the last good sync is
    # unlinked (its data may be lost) and copied again after the resume
    import errno
    import threading
    import time
    from blockpull import faults
    d = backed
    top = str(d / "t.qcow2")
    want = to_raw(top, d)
    with blockpull.open(top) as img:
        inj = faults.attach(img, faults.FaultInjector(record_writes=False))
        rule = inj.fail("sync", "data", errno.EIO, nth=2, match=lambda *_: threading
                        .current_thread().name.startswith("blockpull-pull"))
        job = img.pull(on_error="stop", chunk=CS, batch=4 * CS)
        t0 = time.monotonic()
        while job.status != "paused":
            assert not job.done(), job.error
            assert time.monotonic() - t0 < 60
            time.sleep(0.005)
        assert rule.fired == 1 and img.layers[0].sync_failures == 1
        job.resume()
        assert job.result(timeout=60).status == "completed"
        faults.detach(img)
        assert bytes(img.read(0, img.size)) == bytes(want)
    clean(top, d)
    assert same(top, want, d)
    assert "backing-filename" not in info(top, d)


def test_a_failed_sync_of_the_data_file_loses_the_guest_write_loudly(backed):
    # an allocating guest write, then a flush whose data file sync fails: the write
    # counts as not written (unlinked, no count touched), and every flush says so
    import errno
    from blockpull import faults
    d = backed
    top = str(d / "t.qcow2")
    want = to_raw(top, d)
    img = blockpull.open(top)
    inj = faults.attach(img, faults.FaultInjector(record_writes=False))
    img.write(3 * CS + 10, b"\x33" * 1000)
    inj.fail("sync", "data", errno.EIO)
    with pytest.raises(OSError):
        img.flush()
    with pytest.raises(OSError):
        img.flush()
    with pytest.raises(OSError):
        img.close()
    clean(top, d)
    assert same(top, want, d)


def test_a_full_data_file_device_says_so(tmp_path, loopdev):
    # a data file on a device smaller than the disk: the pull stops at its end with
    # ENOSPC, keeps what it copied, and says the device must grow
    d = tmp_path
    dev = loopdev(4 * MiB)
    q("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
    qio("base.qcow2", "write -P 1 0 4M", cwd=d)
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={dev}", "-b", "base.qcow2",
      "-F", "qcow2", "t.qcow2", "4M", cwd=d)
    # the volume shrinks under the image (qemu-img would not make it on a small one)
    os.truncate(d / "loop0.img", 1 * MiB)
    subprocess.run(["losetup", "-c", dev], check=True)
    top = str(d / "t.qcow2")
    want = to_raw(top, d)
    with blockpull.open(top) as img:
        with pytest.raises(blockpull.PullError, match="block device") as ei:
            img.pull(chunk=4 * CS).result(timeout=60)
    assert ei.value.errno == 28     # ENOSPC
    clean(top, d)
    assert same(top, want, d)
    assert info(top, d)["backing-filename"] == "base.qcow2"
    assert any(e["depth"] == 0 and e["data"] for e in qmap(top, d))     # kept


def test_zero_clusters_over_data_map_and_check_as_qemu_does(tmp_path):
    # a zero cluster that keeps its offset is allocated, except at offset 0: there the
    # entry cannot say "cluster 0's data" and "zero" at once (QEMU's reading)
    d = tmp_path
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=t.data", "t.qcow2", "4M",
      cwd=d)
    qio("t.qcow2", "write -P 1 0 1M", "write -z 64k 64k", "write -z 0 64k", "write -z 3M 64k",
        cwd=d)
    top = str(d / "t.qcow2")
    same_map(top, d)
    ours = cli("check", "t.qcow2", cwd=d)
    theirs = q("qemu-img", "check", "t.qcow2", cwd=d)
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert ours.stdout.splitlines()[-2:] == theirs.stdout.splitlines()[-2:], \
        (ours.stdout, theirs.stdout)
    want = to_raw(top, d)
    with blockpull.open(top) as img:
        assert bytes(img.read(0, img.size)) == bytes(want)
        img.write(10, b"\x02" * 10)         # the zero cluster 0 gets data again
        want[10:20] = b"\x02" * 10
    clean(top, d)
    assert same(top, want, d)
    same_map(top, d)


# ---- extended L2 entries (subclusters) with an external data file ----------------------

def _ext_pair(d, cs, size, backing):
    """x.qcow2 and ref.qcow2 (data files x.data, ref.data): extended L2 entries, clusters
    of ``cs`` bytes, over base.qcow2 when ``backing``, given the same qemu-io writes."""
    sc = cs // 32
    if backing:
        q("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", str(size), cwd=d)
        qio("base.qcow2", "write -P 1 0 3M", f"write -P 2 {size - 3 * MiB} 1M",
            f"write -P 3 {size - 100 * 1024} 100k", cwd=d)
    for name in ("x", "ref"):
        opts = f"data_file={name}.data,extended_l2=on,cluster_size={cs}"
        back = ["-b", "base.qcow2", "-F", "qcow2"] if backing else []
        q("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, *back, f"{name}.qcow2",
          str(size), cwd=d)
        qio(f"{name}.qcow2", f"write -P 7 {sc + 100} 300", f"write -z {2 * cs} {cs // 2}",
            "write -P 8 1M 200k", f"write -P 9 {5 * cs + 3 * sc} {sc}", cwd=d)


def _ext_writes(cs, size):
    """Guest writes (offset, length, byte) and zero writes (offset, length): unaligned,
    across subclusters and clusters, into data, zeros, the chain and the last cluster."""
    sc = cs // 32
    writes = [(100, 5000, 0x41), (3 * cs + 7, 3 * cs, 0x42), (5 * sc + 3, 2 * sc, 0x43),
              (size - 300, 300, 0x44), (0, 10, 0x45), (2 * cs + sc, sc, 0x46),
              (5 * cs + 2 * sc - 9, 3 * sc, 0x47), (10 * cs, 2 * cs, 0x48)]
    # (partly covered subclusters hold data: QEMU makes one that reads zeros already a
    # zero subcluster, blockpull writes zero data there, and the maps would differ)
    zeros = [(4 * cs, 2 * cs), (3 * cs + sc + 5, 3 * sc), (1 * MiB + 1000, 3000),
             (10 * cs + sc, 4 * sc)]
    return writes, zeros


@pytest.mark.parametrize("cs", [32768, 65536, 2 * MiB])
@pytest.mark.parametrize("backing", [True, False])
def test_extended_l2_data_file_writes_and_pulls(tmp_path, cs, backing):
    # blockpull's writes land as qemu-io's do: same bytes, same map (subclusters
    # allocated per write, zero subclusters), the data at guest offsets in the data file
    d = tmp_path
    size = max(8 * MiB, 16 * cs)
    _ext_pair(d, cs, size, backing)
    top = str(d / "x.qcow2")
    writes, zeros = _ext_writes(cs, size)
    with blockpull.open(top) as img:
        for off, n, byte in writes:
            img.write(off, bytes([byte]) * n)
        for off, n in zeros:
            img.write_zeroes(off, n)
    qio("ref.qcow2", *[f"write -P {b} {o} {n}" for o, n, b in writes],
        *[f"write -z {o} {n}" for o, n in zeros], cwd=d)
    clean(top, d)
    r = q("qemu-img", "compare", "x.qcow2", "ref.qcow2", cwd=d, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert qmap(top, d) == qmap(d / "ref.qcow2", d)
    same_map(top, d)
    data_offsets_are_guest_offsets(top, d)
    # no cluster of the image file holds data
    assert os.path.getsize(top) == os.path.getsize(d / "ref.qcow2") <= 6 * cs
    assert cli("check", "x.qcow2", cwd=d).returncode == 0
    if not backing:
        return
    want = to_raw(top, d)
    with blockpull.open(top) as img:
        assert img.pull().result(timeout=60).status == "completed"
    assert "backing-filename" not in info(top, d)
    clean(top, d)
    assert same(top, want, d)
    same_map(top, d)
    data_offsets_are_guest_offsets(top, d)
    assert all(e["depth"] == 0 for e in qmap(top, d) if e["data"])
    assert os.path.getsize(top) <= 6 * cs
    assert cli("check", "x.qcow2", cwd=d).returncode == 0


def test_extended_l2_data_file_copy_on_read(tmp_path):
    # copy-on-read fills only the subclusters the top lacks: its own data (300 bytes in
    # subcluster 1) and zero subclusters stay as they are
    d = tmp_path
    cs = 65536
    _ext_pair(d, cs, 8 * MiB, True)
    top = str(d / "x.qcow2")
    want = to_raw(top, d)
    with blockpull.open(top, copy_on_read=True) as img:
        assert bytes(img.read(0, 6 * cs)) == bytes(want[:6 * cs])
        assert bytes(img.read(1 * MiB - 5, 300 * 1024)) == \
            bytes(want[1 * MiB - 5:1 * MiB - 5 + 300 * 1024])
    clean(top, d)
    assert same(top, want, d)
    same_map(top, d)
    data_offsets_are_guest_offsets(top, d)
    m = qmap(top, d)
    assert [e for e in m if e["start"] < 6 * cs and e["depth"] != 0] == [], m
    assert any(e["zero"] and e["depth"] == 0 and e["start"] == 2 * cs for e in m), m


def test_extended_l2_data_file_pull_keeping_a_base(tmp_path):
    # only what the middle image holds is copied, and only into the subclusters the
    # top lacks; all-zero middle data over the base becomes zero subclusters
    d = tmp_path
    cs = 65536
    q("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
    qio("base.qcow2", "write -P 1 0 4M", cwd=d)
    q("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
      "mid.qcow2", cwd=d)
    qio("mid.qcow2", "write -P 2 0 256k", "write -z 1M 64k", "write -P 3 2M 5000", cwd=d)
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=t.data,extended_l2=on",
      "-b", "mid.qcow2", "-F", "qcow2", "t.qcow2", cwd=d)
    qio("t.qcow2", "write -P 7 3000 100", "write -z 70k 4k", "write -P 8 2M 2k", cwd=d)
    top = str(d / "t.qcow2")
    want = to_raw(top, d)
    with blockpull.open(top) as img:
        assert img.pull(base=str(d / "base.qcow2")).result(timeout=60).status == "completed"
    assert info(top, d)["backing-filename"] == "base.qcow2"
    clean(top, d)
    assert same(top, want, d)
    same_map(top, d)
    data_offsets_are_guest_offsets(top, d)
    m = [(e["start"], e["length"], e["data"]) for e in qmap(top, d) if e["depth"] == 0]
    assert m == [(0, 70 * 1024, True), (70 * 1024, 4096, False),      # the top's zeros
                 (74 * 1024, 182 * 1024, True), (1 * MiB, cs, False), (2 * MiB, cs, True)], m


def test_extended_l2_raw_data_file_stays_a_raw_image(tmp_path):
    d = tmp_path
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o",
      "data_file=r.data,data_file_raw=on,extended_l2=on", "r.qcow2", "4M", cwd=d)
    qio("r.qcow2", "write -P 5 0 2M", "write -P 6 3M 3000", cwd=d)
    top = str(d / "r.qcow2")
    want = to_raw(top, d)
    with blockpull.open(top) as img:
        img.write(100, b"\x06" * 70000)
        want[100:70100] = b"\x06" * 70000
        img.write_zeroes(CS + 5, 3 * CS)
        want[CS + 5:4 * CS + 5] = bytes(3 * CS)
        img.write(3 * MiB + 5, b"\x09" * 10)
        want[3 * MiB + 5:3 * MiB + 15] = b"\x09" * 10
        img.write(4 * MiB - 7, b"\x0a" * 7)
        want[4 * MiB - 7:] = b"\x0a" * 7
    clean(top, d)
    assert same(top, want, d)
    same_map(top, d)
    assert info(top, d)["format-specific"]["data"]["data-file-raw"] is True
    r = q("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", "r.qcow2", "r.data",
          cwd=d, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("cmds", [["write -P 1 4k 1k"], ["write -P 1 4k 1k", "write -z 0 2k"],
                                  []])
def test_extended_l2_data_file_map_names_offset_0(tmp_path, cmds):
    # cluster 0's entry names guest offset 0: qemu-img map prints "offset": 0 for its
    # unallocated and zero subclusters too (a raw data file names every cluster)
    d = tmp_path
    opts = "data_file=x.data,extended_l2=on" + ("" if cmds else ",data_file_raw=on")
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "x.qcow2", "1M", cwd=d)
    if cmds:
        qio("x.qcow2", *cmds, cwd=d)
    top = str(d / "x.qcow2")
    assert qmap(top, d)[0]["offset"] == 0
    same_map(top, d)


def test_extended_l2_data_file_failed_syncs(tmp_path):
    # a failed fdatasync of the data file: the pull's subclusters copied since the last
    # good sync are unallocated again and copied after the resume; a guest write's new
    # subclusters are unallocated too, and every flush says the write was lost
    import errno
    import threading
    import time
    from blockpull import faults
    d = tmp_path
    cs = 65536
    _ext_pair(d, cs, 8 * MiB, True)
    top = str(d / "x.qcow2")
    want = to_raw(top, d)
    with blockpull.open(top) as img:
        inj = faults.attach(img, faults.FaultInjector(record_writes=False))
        rule = inj.fail("sync", "data", errno.EIO, nth=2, match=lambda *_: threading
                        .current_thread().name.startswith("blockpull-pull"))
        job = img.pull(on_error="stop", chunk=cs, batch=4 * cs)
        t0 = time.monotonic()
        while job.status != "paused":
            assert not job.done(), job.error
            assert time.monotonic() - t0 < 60
            time.sleep(0.005)
        assert rule.fired == 1 and img.layers[0].sync_failures == 1
        job.resume()
        assert job.result(timeout=60).status == "completed"
        faults.detach(img)
        assert bytes(img.read(0, img.size)) == bytes(want)
    clean(top, d)
    assert same(top, want, d)
    assert "backing-filename" not in info(top, d)
    same_map(top, d)
    # the guest's allocating write into a cluster holding some subclusters of its own
    img = blockpull.open(top)
    img.write_zeroes(40 * cs, cs)
    img.flush()
    inj = faults.attach(img, faults.FaultInjector(record_writes=False))
    img.write(40 * cs + 2048 + 10, b"\x33" * 5000)
    inj.fail("sync", "data", errno.EIO)
    with pytest.raises(OSError):
        img.flush()
    with pytest.raises(OSError):
        img.close()
    want[40 * cs:41 * cs] = bytes(cs)
    clean(top, d)
    assert same(top, want, d)
    same_map(top, d)


def test_extended_l2_entry_away_from_its_guest_offset_is_not_written(tmp_path):
    # a corrupt entry is refused by writes, pulls and copy-on-read as by reads: never
    # silently pointed back at the guest offset
    d = tmp_path
    q("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
    qio("base.qcow2", "write -P 1 0 4M", cwd=d)
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=t.data,extended_l2=on",
      "-b", "base.qcow2", "-F", "qcow2", "t.qcow2", cwd=d)
    qio("t.qcow2", "write -P 7 1M 4k", cwd=d)
    top = str(d / "t.qcow2")
    at = _l2_entry_offset(top, 16)
    with open(top, "r+b") as f:
        f.seek(at)
        assert int.from_bytes(f.read(8), "big") & 0x00FFFFFFFFFFFE00 == 16 * CS
        f.seek(at)
        f.write(((1 << 63) | (40 * CS)).to_bytes(8, "big"))
    before = (d / "t.qcow2").read_bytes(), (d / "t.data").read_bytes()
    with blockpull.open(top) as img:
        for op in (lambda: img.write(1 * MiB + 8192, b"\x05" * 100),
                   lambda: img.write(1 * MiB, b"\x05" * CS),
                   lambda: img.pull().result(timeout=60)):
            with pytest.raises((ImageFormatError, blockpull.PullError), match="guest offset"):
                op()
    assert ((d / "t.qcow2").read_bytes(), (d / "t.data").read_bytes()) == before


@pytest.mark.parametrize("opts", ["data_file=t.data", "data_file=t.data,extended_l2=on",
                                  "extended_l2=on", "lazy_refcounts=off"])
def test_a_failed_sync_keeps_later_zero_writes(tmp_path, opts):
    # clusters 0 and 1 copied in, then zero writes over them, then the sync fails: the
    # copies' undo must not bring back what the entries said before over the zeros (at
    # cluster 0 of a data file the copy and a zero cluster both name offset 0; with
    # subclusters the zero bits live in the copy's entry), or the disk would read the
    # backing there again while later flushes succeed
    import errno
    from blockpull import faults
    d = tmp_path
    q("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=d)
    qio("base.qcow2", "write -P 1 0 1M", cwd=d)
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.qcow2",
      "-F", "qcow2", "t.qcow2", cwd=d)
    top = str(d / "t.qcow2")
    want = to_raw(top, d)
    # metadata only (zero clusters; zero subclusters): no guest data is lost, so the
    # flushes after the failed one succeed and nothing else says the zeros are gone
    zeros = [(0, CS), (CS + 4096, 8192) if "extended_l2" in opts else (CS, CS)]
    img = blockpull.open(top, copy_on_read=True)
    img.read(0, 2 * CS)
    for off, n in zeros:
        img.write_zeroes(off, n)
        want[off:off + n] = bytes(n)
    inj = faults.attach(img, faults.FaultInjector(record_writes=False))
    inj.fail("sync", "data" if "data_file" in opts else "top", errno.EIO, nth=1)
    with pytest.raises(OSError):
        img.flush()
    faults.detach(img)
    img.flush()
    assert bytes(img.read(0, 2 * CS)) == bytes(want[:2 * CS])
    img.close()
    clean(top, d)
    assert same(top, want, d)


@pytest.mark.parametrize("extl2", [False, True])
def test_zero_writes_over_data_far_into_the_data_file(tmp_path, extl2):
    """Whole-cluster zero writes over data the top holds at 4 MiB and more: the entries
    name offsets in the data file, far past the end of the small image file, and must be
    taken as the guest offsets they are (not refused as pointing past the image file)."""
    d = tmp_path
    q("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "8M", cwd=d)
    qio("base.qcow2", "write -P 1 0 8M", cwd=d)
    opts = "data_file=t.data" + (",extended_l2=on" if extl2 else "")
    q("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2",
      "t.qcow2", "8M", cwd=d)
    qio("t.qcow2", "write -P 2 5M 1M", cwd=d)
    top = str(d / "t.qcow2")
    want = to_raw(top, d)
    with blockpull.open(top) as img:
        img.write_zeroes(4 << 20, 2 << 20)
        img.write_zeroes((6 << 20) + 512, 100000)
        want[4 << 20:6 << 20] = bytes(2 << 20)
        want[(6 << 20) + 512:(6 << 20) + 512 + 100000] = bytes(100000)
        assert img.pull().result(timeout=60).status == "completed"
    assert same(top, bytes(want), d)
    r = q("qemu-img", "check", "t.qcow2", cwd=d, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
