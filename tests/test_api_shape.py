"""The API's words and hooks: the not-found error, job statuses and error policies as str
enums, ``Image.layers``, ``Image.pull_range`` during a pull, the copy loop built from an
image's parts, and job.py free of image.py at run time. Judged by qemu-img where an image
is involved."""
import ast
import json
import os

import pytest

import blockpull
from blockpull import ImageNotFoundError, JobStatus, OnError
from blockpull._ratelimit import RateLimiter
from blockpull._stream import Stream


def test_missing_image_is_image_not_found(tmp_path):
    path = tmp_path / "nope.qcow2"
    with pytest.raises(ImageNotFoundError) as ei:
        blockpull.open(path)
    assert isinstance(ei.value, blockpull.BlockpullError)
    assert isinstance(ei.value, FileNotFoundError)
    assert str(path) in str(ei.value)


def test_job_status_is_a_word(tmp_path, qemu, chain3):
    top, _mid, _base = chain3
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    events = []
    with blockpull.open(top) as img:
        job = img.pull(on_event=events.append)
        info = job.result(timeout=60)
    assert job.status is JobStatus.COMPLETED
    assert job.status == "completed" and info.status == "completed"
    assert str(job.status) == "completed" and f"{info.status}" == "completed"
    assert json.dumps({"status": info.status}) == '{"status": "completed"}'
    assert [e.kind for e in events] == ["completed"]
    assert blockpull.job.STATUSES == ("running", "paused", "completed", "failed", "cancelled")
    qemu.assert_clean(top)
    assert qemu.compare(top, str(want), None, "raw")
    assert qemu.info(top).get("backing-filename") is None


def test_on_error_is_one_vocabulary(tmp_path, qemu, chain3):
    top, _mid, _base = chain3
    assert [m.value for m in OnError] == ["report", "stop", "ignore"]
    with blockpull.open(top) as img:
        with pytest.raises(ValueError, match="report, stop, ignore"):
            img.pull(on_error="retry")
        with pytest.raises(ValueError, match="report, stop, ignore"):
            blockpull.qemu.pull("/nonexistent.sock", "drive0", on_error="retry")
        job = img.pull(on_error=OnError.STOP)
        assert job.on_error == "stop"
        assert job.result(timeout=60).status == "completed"
    assert qemu.info(top).get("backing-filename") is None


def test_layers_are_the_chain_top_first(qemu, chain3):
    top, mid, base = chain3
    with blockpull.open(top) as img:
        layers = img.layers
        assert [d.file.path for d in layers] == [c.path for c in img.chain]
        assert [d.file.path for d in layers] == [top, mid, base]
        assert isinstance(layers, tuple)
        assert layers[0].cluster_size == qemu.info(top)["cluster-size"]
        img.pull(base=base).result(timeout=60)
        assert [d.file.path for d in img.layers] == [top, base]
    assert qemu.info(top)["backing-filename"] == "base.qcow2"


def test_pull_range_during_a_pull_counts_as_done(tmp_path, qemu, chain3):
    """What ``pull_range`` (the NBD cache request) fills while a pull runs counts toward
    the pull's progress: the pull still ends with cur == end."""
    top, _mid, _base = chain3
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    with blockpull.open(top) as img:
        job = img.pull(bandwidth="64K")
        job.pause()
        img.pull_range(0, img.size)
        job.resume()
        job.set_speed(0)
        info = job.result(timeout=60)
        assert info.cur == info.end > 0
    qemu.assert_clean(top)
    assert qemu.compare(top, str(want), None, "raw")
    assert qemu.info(top).get("backing-filename") is None


def test_stream_takes_the_chains_own_top(chain3):
    top, _mid, _base = chain3
    with blockpull.open(top) as img:
        st = Stream(img.chain_obj, img.layers[0], img.lock, len(img.layers),
                    RateLimiter(0))
        assert st.prepare() > 0       # bytes to fill: the top lacks most of the disk
        with pytest.raises(ValueError):
            Stream(img.chain_obj, img.layers[1], img.lock, len(img.layers), RateLimiter(0))


def _runtime_imports(path):
    """The blockpull modules a source file imports outside ``if TYPE_CHECKING:``."""
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.module:
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            visit(child)
    with open(path) as f:
        visit(ast.parse(f.read()))
    return {m for m in found if m.startswith("blockpull")}


def test_job_does_not_import_image():
    src = os.path.dirname(blockpull.__file__)
    for name in ("job.py", "policy.py", "errors.py"):
        imports = _runtime_imports(os.path.join(src, name))
        assert "blockpull.image" not in imports, name
        assert "blockpull.compat" not in imports, name


def test_pull_of_a_closed_image_says_closed(qemu, chain3):
    top, _mid, _base = chain3
    img = blockpull.open(top)
    img.close()
    with pytest.raises(ValueError, match="closed"):
        img.pull()
    assert qemu.info(top)["backing-filename"] == "mid.qcow2"
    qemu.assert_clean(top)


def test_force_share_reads_an_image_another_process_holds(qemu, tmp_path):
    import subprocess
    import time as _time
    img_path = tmp_path / "held.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(img_path), "1M")
    qemu.io(str(img_path), "write -P 0x42 0 4096", fmt="qcow2")
    # qemu-io holds the image (a writer's locks) while it sleeps
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", "-c", "sleep 5000", str(img_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = _time.monotonic() + 10
        while True:
            try:
                blockpull.open(str(img_path), readonly=True).close()
            except blockpull.ImageLockedError:
                break
            assert _time.monotonic() < deadline, "qemu-io never took its locks"
            _time.sleep(0.05)
        with blockpull.open(str(img_path), readonly=True, force_share=True) as img:
            assert img.read(0, 4096) == b"\x42" * 4096
        with pytest.raises(ValueError, match="readonly=True"):
            blockpull.open(str(img_path), force_share=True)
    finally:
        holder.kill()
        holder.wait()
