"""The format table (blockpull.formats): what it creates, probes and opens, judged by
qemu-img info; raw is never probed and never opened writable; FIFOs are refused."""
import os

import pytest

import blockpull
from blockpull import formats

MiB = 1 << 20


def test_the_table_names_what_each_format_may_do():
    assert formats.creatable() == ["qcow2", "qed"]
    assert formats.checkable() == ["qcow2", "qed"]
    assert formats.AUTO_SAFE == ("qcow2", "qed")
    assert formats.JSON_FORMATS == ("qcow2", "qed", "raw")
    assert [n for n, f in formats.FORMATS.items() if not f.top] == ["raw"]


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_created_image_is_probed_and_opened_as_qemu_sees_it(tmp_path, qemu, fmt):
    p = str(tmp_path / f"a.{fmt}")
    blockpull.create(p, 4 * MiB, fmt=fmt)
    assert qemu.info(p)["format"] == fmt
    assert formats.probe_path(p, "top") == fmt
    drv = formats.open_driver(p, None, False, "top")
    try:
        assert (drv.format, drv.size) == (fmt, qemu.info(p)["virtual-size"])
    finally:
        drv.file.close()


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_a_qemu_image_is_probed_as_its_format(tmp_path, qemu, fmt):
    p = qemu.create(tmp_path / f"q.{fmt}", 4 * MiB, fmt=fmt)
    assert formats.probe_path(p, "top") == qemu.info(p)["format"]


def test_raw_is_never_probed_and_never_a_top(tmp_path, qemu):
    p = qemu.create(tmp_path / "r.raw", 4 * MiB, fmt="raw")
    assert qemu.info(p)["format"] == "raw"
    with pytest.raises(blockpull.ImageFormatError, match="not a qcow2 or QED image"):
        formats.probe_path(p, "top")
    with pytest.raises(blockpull.ImageFormatError, match="raw images can only be backing"):
        formats.open_driver(p, "raw", True, "top")
    drv = formats.open_driver(p, "raw", False, "backing")
    try:
        assert drv.size == 4 * MiB
    finally:
        drv.file.close()


def test_unknown_format_and_bad_magic_are_named_errors(tmp_path, qemu):
    p = qemu.create(tmp_path / "q.qcow2", 4 * MiB)
    with pytest.raises(blockpull.ImageFormatError, match="unsupported format 'vmdk'"):
        formats.open_driver(p, "vmdk", False, "top")
    with pytest.raises(blockpull.ImageFormatError, match="not a qed image"):
        formats.open_driver(p, "qed", False, "top")


def test_fifo_is_refused_before_it_is_opened(tmp_path):
    p = str(tmp_path / "pipe")
    os.mkfifo(p)
    with pytest.raises(blockpull.ImageFormatError, match="named pipe"):
        formats.probe_path(p, "top")
    with pytest.raises(blockpull.ImageFormatError, match="named pipe"):
        formats.open_driver(p, "qcow2", False, "top")
