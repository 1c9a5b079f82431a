"""create() refuses formats this build cannot create with a named error, not a KeyError."""
import pytest

import blockpull
from blockpull.formats import creatable


@pytest.mark.parametrize("fmt", ["vmdk", "raw", "qed"])
def test_create_unavailable_format_is_a_named_error(tmp_path, fmt):
    path = tmp_path / f"x.{fmt}"
    if fmt in creatable():
        blockpull.create(path, 1 << 20, fmt=fmt)
        with blockpull.open(path, readonly=True) as img:
            assert img.format == fmt
        return
    with pytest.raises(blockpull.ImageFormatError, match="cannot create format"):
        blockpull.create(path, 1 << 20, fmt=fmt)
    assert not path.exists()


@pytest.mark.parametrize("size", [1 << 63, 100 << 60, "100E"])
def test_create_size_beyond_int64_is_a_value_error(tmp_path, size):
    path = tmp_path / "huge.qcow2"
    with pytest.raises(ValueError, match="too large"):
        blockpull.create(path, size)
    assert not path.exists()
