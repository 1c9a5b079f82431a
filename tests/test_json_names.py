"""``json:`` backing names of a plain file, as libvirt and oVirt write them.

Accepted: exactly a format driver (qcow2, qed, raw) over a ``file`` child with a
filename, nested or flat; the driver is the backing's format. Everything else is
refused as a protocol. A relative filename resolves against the directory of the image
that names it, like any backing name (QEMU resolves it against its working directory:
the qemu-img judges below run in the images' directory, where both agree).
"""
from __future__ import annotations

import json
import subprocess

import pytest

import blockpull
from blockpull.paths import json_backing as _json_backing

MiB = 1 << 20


def nested(fmt, filename):
    return "json:" + json.dumps({"driver": fmt, "file": {"driver": "file",
                                                         "filename": str(filename)}})


def flat(fmt, filename):
    return "json:" + json.dumps({"driver": fmt, "file.driver": "file",
                                 "file.filename": str(filename)})


def qimg(cwd, *args):
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    assert r.returncode in (0, 1), r.stderr
    return r


def rebase(qemu, top, name, fmt, top_fmt="qcow2"):
    qemu.img("rebase", "-u", "-f", top_fmt, "-b", name, "-F", fmt, str(top))


def chain(qemu, tmp_path):
    base = qemu.create(tmp_path / "base.qcow2", 4 * MiB)
    qemu.io(base, "write -P 1 0 2M", "write -P 2 3M 512k")
    mid = qemu.create(tmp_path / "mid.qcow2", 4 * MiB, backing="base.qcow2")
    qemu.io(mid, "write -P 3 1M 128k", "write -z 3M 64k")
    top = qemu.create(tmp_path / "top.qcow2", 4 * MiB, backing="mid.qcow2")
    qemu.io(top, "write -P 4 10k 5k")
    return top, mid, base


@pytest.mark.parametrize("shape", [nested, flat])
@pytest.mark.parametrize("absolute", [True, False])
def test_open_map_and_pull_through_a_json_name(tmp_path, qemu, shape, absolute):
    top, mid, base = chain(qemu, tmp_path)
    rebase(qemu, top, shape("qcow2", mid if absolute else "mid.qcow2"), "qcow2")
    want = tmp_path / "want.raw"
    qimg(tmp_path, "convert", "-O", "raw", top, want)
    with blockpull.open(top, readonly=True) as img:
        assert [c.path for c in img.chain] == [top, mid, base]
        assert img.read(0, img.size) == want.read_bytes()
        assert [e.to_json() for e in img.map()] == \
            json.loads(qimg(tmp_path, "map", "--output=json", top).stdout)
    with blockpull.open(top) as img:
        img.pull().result(timeout=60)
    qemu.assert_clean(top)
    assert "backing-filename" not in qemu.info(top)
    assert qemu.compare(top, str(want), "qcow2", "raw")


@pytest.mark.parametrize("shape", [nested, flat])
def test_a_kept_json_base_is_written_as_a_plain_name(tmp_path, qemu, shape):
    top, mid, base = chain(qemu, tmp_path)
    rebase(qemu, mid, shape("qcow2", "base.qcow2"), "qcow2")
    want = tmp_path / "want.raw"
    qimg(tmp_path, "convert", "-O", "raw", top, want)
    with blockpull.open(top) as img:
        assert img.chain[2].path == base
        img.pull(base="base.qcow2").result(timeout=60)     # the name the json gives
    info = qemu.info(top)
    assert (info["backing-filename"], info["backing-filename-format"]) == \
        ("base.qcow2", "qcow2")
    qemu.assert_clean(top)
    assert qemu.compare(top, str(want), "qcow2", "raw")


def test_json_name_in_a_qed_top_gives_the_format(tmp_path, qemu):
    """QED records no format for a qcow2 backing; its json: name does."""
    base = qemu.create(tmp_path / "base.qed", 4 * MiB, fmt="qed")
    qemu.io(base, "write -P 1 0 1M", fmt="qed")
    mid = qemu.create(tmp_path / "mid.qcow2", 4 * MiB, backing="base.qed", backing_fmt="qed")
    qemu.io(mid, "write -P 2 512k 1M")
    top = qemu.create(tmp_path / "top.qed", 4 * MiB, fmt="qed")
    qemu.io(top, "write -P 3 0 4k", fmt="qed")
    rebase(qemu, top, nested("qcow2", "mid.qcow2"), "qcow2", top_fmt="qed")
    want = tmp_path / "want.raw"
    qimg(tmp_path, "convert", "-O", "raw", top, want)
    with blockpull.open(top) as img:
        assert [c.format for c in img.chain] == ["qed", "qcow2", "qed"]
        img.pull(base=base).result(timeout=60)
    info = qemu.info(top)
    assert info["backing-filename"] == "base.qed" and "backing-filename-format" not in info
    qemu.assert_clean(top, "qed")
    assert qemu.compare(top, str(want), "qed", "raw")


def test_json_raw_driver(tmp_path, qemu):
    raw = tmp_path / "b.raw"
    raw.write_bytes(b"\x09" * MiB)
    top = qemu.create(tmp_path / "t.qcow2", MiB)
    rebase(qemu, top, flat("raw", "b.raw"), "raw")
    with blockpull.open(top, readonly=True) as img:
        assert [c.format for c in img.chain] == ["qcow2", "raw"]
        assert img.read(0, MiB) == raw.read_bytes()
    assert qimg(tmp_path, "compare", "-F", "raw", top, raw).returncode == 0


def test_create_over_a_json_name_records_its_format(tmp_path, qemu):
    base = qemu.create(tmp_path / "base.qed", MiB, fmt="qed")
    qemu.io(base, "write -P 5 0 64k", fmt="qed")
    top = str(tmp_path / "t.qcow2")
    name = nested("qed", "base.qed")
    blockpull.create(top, 0, backing=name)
    info = qemu.info(top)
    assert (info["backing-filename"], info["backing-filename-format"]) == (name, "qed")
    with blockpull.open(top, readonly=True) as img:
        assert img.read(0, 65536) == b"\x05" * 65536
    with pytest.raises(blockpull.BackingChainError, match="names format"):
        blockpull.create(str(tmp_path / "u.qcow2"), 0, backing=name, backing_format="qcow2")


def test_a_json_format_that_contradicts_the_recorded_one_is_refused(tmp_path, qemu):
    top, mid, base = chain(qemu, tmp_path)
    rebase(qemu, top, nested("raw", "mid.qcow2"), "qcow2")
    with pytest.raises(blockpull.BackingChainError, match="names format 'raw'"):
        blockpull.open(top, readonly=True)


REFUSED = [
    '{"driver":"qcow2","file":{"driver":"nbd","server":{"type":"unix","path":"/s"}}}',
    '{"driver":"qcow2","file":{"driver":"http","url":"http://h/b.qcow2"}}',
    '{"driver":"qcow2","file":{"driver":"ssh","path":"/b","server":{"host":"h"}}}',
    '{"driver":"nbd","path":"/s"}',
    '{"driver":"vmdk","file":{"driver":"file","filename":"b.vmdk"}}',
    '{"driver":"qcow2","file":{"driver":"file","filename":"b.qcow2","locking":"off"}}',
    '{"driver":"qcow2","file.driver":"file","file.filename":"b.qcow2","read-only":true}',
    '{"driver":"qcow2","file":{"driver":"file","filename":"b.qcow2"},"backing":null}',
    '{"driver":"qcow2","file":{"driver":"host_device","filename":"/dev/sda"}}',
    '{"driver":"qcow2","file":{"driver":"file"}}',
    '{"driver":"qcow2","file":{"driver":"file","filename":""}}',
    '{"driver":"qcow2","file":{"driver":"file","filename":7}}',
    '{"file":{"driver":"file","filename":"b.qcow2"}}',
    '{"driver":"qcow2","file":{"driver":"file","filename":"b.qcow2"},'
    '"file.filename":"c.qcow2"}',
    '{"driver":"qcow2","driver":"raw","file":{"driver":"file","filename":"b.qcow2"}}',
    '{"driver":"qcow2","file":"b.qcow2"}',
    '["qcow2"]',
    '{"driver":"qcow2",',
    '',
]


@pytest.mark.parametrize("text", REFUSED)
def test_other_json_shapes_are_refused_as_protocols(tmp_path, qemu, text):
    qemu.create(tmp_path / "b.qcow2", MiB)
    top = qemu.create(tmp_path / "t.qcow2", MiB)
    # write the name as an image would hold it (qemu-img rebase opens some of them)
    with blockpull.open(top) as img:
        img.layers[0].set_backing("json:" + text, "qcow2")
    assert qemu.info(top)["backing-filename"] == "json:" + text
    with pytest.raises(blockpull.BackingChainError, match="protocols are refused"):
        blockpull.open(top, readonly=True)
    assert _json_backing("json:" + text) is None


def test_accepted_shapes():
    assert _json_backing(nested("qed", "/a/b.qed")) == ("/a/b.qed", "qed")
    assert _json_backing(flat("raw", "b.raw")) == ("b.raw", "raw")
    assert _json_backing('json: {"file": {"filename": "x", "driver": "file"}, '
                         '"driver": "qcow2"}') == ("x", "qcow2")


def test_the_names_as_libvirt_spells_them(tmp_path, qemu):
    """The exact spellings of a rebase -u that libvirt and oVirt flows write."""
    top, mid, base = chain(qemu, tmp_path)
    want = tmp_path / "want.raw"
    qimg(tmp_path, "convert", "-O", "raw", top, want)
    for name in ('json:{"driver":"qcow2","file":{"driver":"file","filename":"%s"}}' % mid,
                 'json:{"driver":"qcow2","file.driver":"file","file.filename":"mid.qcow2"}'):
        rebase(qemu, top, name, "qcow2")
        assert qemu.info(top)["backing-filename"] == name
        with blockpull.open(top, readonly=True) as img:
            assert [c.path for c in img.chain] == [top, mid, base]
            assert img.read(0, img.size) == want.read_bytes()
    with blockpull.open(top) as img:
        img.pull(base=base).result(timeout=60)
    info = qemu.info(top)
    assert (info["backing-filename"], info["backing-filename-format"]) == \
        ("base.qcow2", "qcow2")
    qemu.assert_clean(top)
    assert qemu.compare(top, str(want), "qcow2", "raw")
