"""blockpull.locking: QEMU's lock bytes as QEMU itself sees them (qemu-img / qemu-io as
the other opener)."""
import pytest

import blockpull
from blockpull._fileio import File
from blockpull.locking import lock_image, lock_once, without_read_locks


def qemu_write(qemu, path):
    """Return code of a qemu-io write that takes QEMU's locks."""
    return qemu.run("qemu-io", "-f", "qcow2", "-c", "write 0 4k", path, check=False)


@pytest.fixture
def image(tmp_path, qemu):
    return qemu.create(tmp_path / "a.qcow2", 1 << 20)


def test_a_writer_keeps_qemu_out_and_lets_it_in_after(image, qemu):
    f = File(image, True, "top")
    try:
        lock_image(f, True, image)
        assert qemu.img("info", image, check=False).returncode != 0
        assert qemu_write(qemu, image).returncode != 0
    finally:
        f.close()
    assert qemu.img("info", image, check=False).returncode == 0
    assert qemu_write(qemu, image).returncode == 0


def test_a_reader_shares_reads_but_not_writes(image, qemu):
    f = File(image, False, "top")
    try:
        lock_image(f, False, image)
        assert qemu.img("info", image, check=False).returncode == 0
        r = qemu_write(qemu, image)
        assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr
    finally:
        f.close()


def test_force_share_reader_takes_no_bytes(image, qemu):
    f = File(image, False, "top")
    try:
        with without_read_locks():
            lock_image(f, False, image)
        r = qemu_write(qemu, image)
        assert r.returncode == 0 and "lock" not in (r.stdout + r.stderr).lower()
    finally:
        f.close()


def test_second_writer_is_refused_with_a_named_error(image):
    a, b = File(image, True, "top"), File(image, True, "top")
    try:
        lock_image(a, True, image)
        with pytest.raises(blockpull.ImageLockedError, match="stop it first"):
            lock_once(b, True, image)
    finally:
        a.close()
        b.close()
