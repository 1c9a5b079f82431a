"""QED's header as _qed_format lays it out: changing the backing link writes the new name
clear of the old one, and qemu-img reads every link that results."""
import pytest

from blockpull import _qed
from blockpull._fileio import File


def relink(path, name, fmt):
    drv = _qed.Qed(File(path, True, "top"), True)
    try:
        drv.set_backing(name, fmt)
        return drv.backing_offset
    finally:
        drv.file.close()


def test_backing_link_changes_read_back_by_qemu(tmp_path, qemu):
    qemu.create(tmp_path / "base.qcow2", 1 << 20)
    qemu.create(tmp_path / "raw.img", 1 << 20, fmt="raw")
    top = qemu.create(tmp_path / "top.qed", 1 << 20, fmt="qed", backing="base.qcow2")
    spans = [(64, 64 + len("base.qcow2"))]
    for name, fmt in [("raw.img", "raw"), ("./base.qcow2", "qcow2"),
                      ("../" + tmp_path.name + "/raw.img", "raw")]:
        off = relink(top, name, fmt)
        # the new name is written where the name in use is not
        assert off + len(name) <= spans[-1][0] or off >= spans[-1][1]
        spans.append((off, off + len(name)))
        info = qemu.info(top)
        assert info["backing-filename"] == name
        if fmt == "raw":
            assert info["backing-filename-format"] == "raw"
        assert qemu.check(top, fmt="qed") == 0
    relink(top, None, None)
    assert "backing-filename" not in qemu.info(top)


def test_backing_name_refused_when_it_cannot_be_recorded(tmp_path, qemu):
    top = qemu.create(tmp_path / "top.qed", 1 << 20, fmt="qed")
    for bad in ["", "a\0b", "x" * 1024]:
        with pytest.raises(ValueError, match="1..1023 bytes without NUL"):
            relink(top, bad, "raw")
    assert qemu.check(top, fmt="qed") == 0
