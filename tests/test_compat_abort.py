"""block_pull_abort returns only once the image is closed, so it can be opened at once."""
import blockpull


def test_image_opens_right_after_block_pull_abort(tmp_path):
    base = tmp_path / "base.qcow2"
    blockpull.create(base, 4 << 20)
    with blockpull.open(base) as img:
        img.write(0, b"\x5a" * (4 << 20))
    for i in range(10):
        top = str(tmp_path / f"top{i}.qcow2")
        blockpull.create(top, 0, backing="base.qcow2")
        blockpull.block_pull(top, bandwidth=1)          # 1 MiB/s: still running
        assert blockpull.block_pull_abort(top) == 0
        with blockpull.open(top) as img:              # no ImageLockedError from our own pull
            assert img.backing == str(base)
            assert img.read(0, 4096) == b"\x5a" * 4096
