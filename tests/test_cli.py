"""The command line, driven as a subprocess and judged by qemu-img."""
from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest

import blockpull
from blockpull.cli.demo import build_demo_chain
from relhelp import child_env

def _env(**extra: str) -> dict:
    env = child_env()
    env.pop("COLUMNS", None)
    env.update(extra)
    return env


def cli(*args: str, cwd: Optional[Path] = None, env: Optional[dict] = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``python -m blockpull ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "blockpull", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env or _env(),
                          timeout=timeout)


def start(*args: str, cwd: Optional[Path] = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "blockpull", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env=_env())


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def assert_one_error_line(r: subprocess.CompletedProcess, codes=(1, 2)) -> str:
    """Exactly one stderr line, ``blockpull: error: ...``, no traceback, exit in codes."""
    lines = r.stderr.splitlines()
    assert r.returncode in codes, f"exit {r.returncode}: {r.stderr}"
    assert len(lines) == 1, f"expected one stderr line, got:\n{r.stderr}"
    assert lines[0].startswith("blockpull: error: "), lines[0]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    return lines[0]


@pytest.fixture
def big_chain(tmp_path, qemu):
    """base (qemu-io patterns, 6 MiB of data) <- top (blockpull create, a write of its
    own): big enough that a pull at 1 MiB/s is still running seconds later."""
    base = qemu.create(tmp_path / "base.qcow2", 16 << 20)
    qemu.io(base, "write -P 11 0 3M", "write -P 12 5M 2M", "write -P 13 12M 1M",
            "write -z 4M 1M")
    ok(cli("create", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2"))
    qemu.io(str(tmp_path / "top.qcow2"), "write -P 14 1M 100k")
    return str(tmp_path / "top.qcow2"), base


# ---- create -----------------------------------------------------------------------------


def test_create_images_pass_qemu_check_and_record_the_backing(tmp_path, qemu):
    r = ok(cli("create", "-o", "cluster_size=4K,compat=0.10", "base.qcow2", "3M", cwd=tmp_path))
    assert "base.qcow2" in r.stdout and "qcow2" in r.stdout
    r = ok(cli("create", "--output", "json", "-b", "base.qcow2", "top.qcow2", cwd=tmp_path))
    report = json.loads(r.stdout)
    assert report["backing"] == "base.qcow2" and report["backing_format"] == "qcow2"
    assert report["virtual_size"] == 3 << 20         # taken from the backing file
    for name in ("base.qcow2", "top.qcow2"):
        qemu.assert_clean(tmp_path / name)
    base = qemu.info(tmp_path / "base.qcow2")
    assert base["virtual-size"] == 3 << 20 and base["cluster-size"] == 4096
    assert base["format-specific"]["data"]["compat"] == "0.10"
    top = qemu.info(tmp_path / "top.qcow2")
    assert top["backing-filename"] == "base.qcow2"
    assert top["backing-filename-format"] == "qcow2"
    assert top["virtual-size"] == 3 << 20


def test_create_takes_human_sizes(tmp_path, qemu):
    ok(cli("create", tmp_path / "a.qcow2", "1.5G"))
    ok(cli("create", "-o", "cluster_size=512", "-o", "compat=1.1", tmp_path / "b.qcow2", "512K"))
    assert qemu.info(tmp_path / "a.qcow2")["virtual-size"] == 3 << 29
    info = qemu.info(tmp_path / "b.qcow2")
    assert info["virtual-size"] == 512 << 10 and info["cluster-size"] == 512
    qemu.assert_clean(tmp_path / "b.qcow2")


def test_qed_chain_through_the_command_line(tmp_path, qemu):
    if "qed" not in blockpull.formats.creatable():
        line = assert_one_error_line(cli("create", "-f", "qed", tmp_path / "b.qed", "8M"), (2,))
        assert "qed" in line
        return
    ok(cli("create", "-f", "qed", tmp_path / "base.qed", "8M"))
    qemu.io(str(tmp_path / "base.qed"), "write -P 5 0 2M", "write -P 6 5M 64k", fmt="qed")
    r = ok(cli("create", "-f", "qed", "-b", "base.qed", "top.qed", cwd=tmp_path))
    assert "header" in r.stdout               # QED records no backing format but raw
    top = str(tmp_path / "top.qed")
    qemu.io(top, "write -P 7 1M 64k", fmt="qed")
    assert qemu.info(top)["backing-filename"] == "base.qed"
    ok(cli("info", top))                      # the QED magic of base.qed is probed
    want = qemu.img("map", "--output=json", top).stdout
    assert ok(cli("map", "--output", "json", top)).stdout == want
    assert ok(cli("map", "-F", "qed", "--output", "json", top)).stdout == want
    raw = tmp_path / "want.raw"
    qemu.to_raw(top, raw)
    ok(cli("pull", top))
    qemu.assert_clean(top, "qed")
    assert "backing-filename" not in qemu.info(top)
    assert qemu.compare(top, raw, "qed", "raw")


# ---- info and map -----------------------------------------------------------------------


def test_map_json_is_qemu_img_map_output(chain3, qemu):
    top, mid, base = chain3
    for path in (top, mid, base):
        want = qemu.img("map", "--output=json", path).stdout
        assert ok(cli("map", "--output", "json", path)).stdout == want


def test_map_human_lists_the_same_data_extents_as_qemu(chain3, qemu):
    top, _, _ = chain3
    ours = ok(cli("map", top)).stdout.splitlines()
    theirs = qemu.img("map", top).stdout.splitlines()
    assert [line.split()[:3] for line in ours] == [line.split()[:3] for line in theirs]
    assert len(ours) > 2


def test_info_shows_chain_sizes_and_allocation(chain3, qemu):
    top, mid, base = chain3
    report = json.loads(ok(cli("info", "--output", "json", top)).stdout)
    assert [c["path"] for c in report["chain"]] == [top, mid, base]
    assert [c["format"] for c in report["chain"]] == ["qcow2"] * 3
    assert all(c["virtual_size"] == 4 << 20 for c in report["chain"])
    assert all(c["disk_size"] > 0 for c in report["chain"])
    data = [0, 0, 0]
    zero = unalloc = 0
    for e in qemu.map(top):
        if e["data"]:
            data[e["depth"]] += e["length"]
        elif e["present"]:
            zero += e["length"]
        else:
            unalloc += e["length"]
    assert [c["data_bytes"] for c in report["chain"]] == data
    a = report["allocation"]
    assert (a["data_in_top"], a["data_in_backing"], a["zero"], a["unallocated"]) == \
        (data[0], data[1] + data[2], zero, unalloc)
    assert sum(a.values()) == 4 << 20
    assert report["backing"] == "mid.qcow2"
    human = ok(cli("info", top)).stdout
    for path in (top, mid, base):
        assert path in human
    assert "a pull copies about" in human


# ---- pull -------------------------------------------------------------------------------


def test_pull_whole_chain_matches_qemu(chain3, qemu, tmp_path):
    top, _, _ = chain3
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    r = ok(cli("pull", top))
    assert "no backing file now" in r.stdout and r.stderr == ""   # piped: no bar
    qemu.assert_clean(top)
    assert "backing-filename" not in qemu.info(top)
    assert qemu.compare(top, want, "qcow2", "raw")


def test_pull_with_base_keeps_the_base(chain3, qemu, tmp_path):
    top, mid, base = chain3
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    ok(cli("pull", "--base", base, "--bandwidth", "64M", top))
    qemu.assert_clean(top)
    info = qemu.info(top)
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert qemu.compare(top, want, "qcow2", "raw")


def test_pull_json_lines_end_with_the_final_event(big_chain, qemu):
    top, _ = big_chain
    r = ok(cli("pull", "--output", "json", "--bandwidth", "24M", top))
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) >= 3
    assert all(d["type"] == "progress" for d in lines[:-1])
    last = lines[-1]
    assert last["type"] == "event" and last["event"] == "completed"
    assert last["status"] == "completed" and last["error"] is None and last["backing"] is None
    assert last["cur"] == last["end"] > 0
    assert last["bandwidth"] == 24 << 20
    curs = [d["cur"] for d in lines]
    assert curs == sorted(curs)
    assert r.stderr == ""
    qemu.assert_clean(top)


def test_pull_progress_bar_only_when_asked_off_a_terminal(big_chain):
    top, _ = big_chain
    r = ok(cli("pull", "--progress", "--bandwidth", "48M", top))
    bar = r.stderr.replace("\r", "\n")
    last = bar.strip().splitlines()[-1]
    assert "100%" in last and "MiB/s" in last and "ETA" in last
    assert re.search(r" (\d+\.\d MiB)/\1 ", last), last      # bytes copied / total
    assert "0 B/" in bar                                       # drawn from the start
    assert "pulled" in r.stdout


def _wait_for_progress(proc: subprocess.Popen, minimum: int = 1) -> List[dict]:
    """Read JSON lines until one shows at least ``minimum`` bytes copied."""
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        d = json.loads(line)
        seen.append(d)
        if d["type"] == "progress" and d["cur"] >= minimum:
            return seen
    raise AssertionError(f"the pull ended before it was interrupted: {seen}")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_aborts_cleanly_and_a_second_pull_completes(big_chain, qemu, tmp_path,
                                                              signum, code):
    top, _ = big_chain
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    proc = start("pull", "--output", "json", "--bandwidth", "1M", top)
    try:
        _wait_for_progress(proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    last = json.loads(out.splitlines()[-1])
    assert last["type"] == "event" and last["event"] == "cancelled"
    assert 0 < last["cur"] < last["end"]
    assert last["backing"] == "base.qcow2"
    lines = err.splitlines()
    assert len(lines) == 1 and "aborted" in lines[0] and "still backed" in lines[0], err
    qemu.assert_clean(top)
    assert qemu.info(top)["backing-filename"] == "base.qcow2"
    assert qemu.compare(top, want, "qcow2", "raw")

    r = ok(cli("pull", "--output", "json", top))
    done = json.loads(r.stdout.splitlines()[-1])
    assert done["event"] == "completed"
    assert done["end"] == last["end"] - last["cur"]       # only what was left
    qemu.assert_clean(top)
    assert "backing-filename" not in qemu.info(top)
    assert qemu.compare(top, want, "qcow2", "raw")


# ---- errors -----------------------------------------------------------------------------


@pytest.fixture
def junk(tmp_path):
    """A text file, a directory and a valid image to aim bad commands at."""
    (tmp_path / "notes.txt").write_text("not a disk image\n" * 100)
    (tmp_path / "dir").mkdir()
    blockpull.create(tmp_path / "ok.qcow2", 1 << 20)
    return tmp_path


BAD = [
    # (argv, exit code, a word the message must contain)
    (["info", "missing.qcow2"], 2, "missing.qcow2"),
    (["map", "missing.qcow2"], 2, "missing.qcow2"),
    (["pull", "missing.qcow2"], 2, "missing.qcow2"),
    (["check", "missing.qcow2"], 1, "missing.qcow2"),     # check's 2 means corrupt
    (["info", "notes.txt"], 2, "not a qcow2"),
    (["map", "--output", "json", "notes.txt"], 2, "not a qcow2"),
    (["pull", "notes.txt"], 2, "not a qcow2"),
    (["check", "notes.txt"], 1, "notes.txt"),
    (["info", "dir"], 2, "directory"),
    (["pull", "-f", "raw", "notes.txt"], 2, "raw"),
    (["create", "new.qcow2", "12Q"], 2, "invalid size"),
    (["create", "new.qcow2", "-5"], 2, "size"),
    (["create", "new.qcow2"], 2, "SIZE"),
    (["create", "new.qcow2", "0"], 2, "positive"),
    (["create", "new.qcow2", "100E"], 2, "too large"),
    (["create", "-f", "vmdk", "new.vmdk", "1M"], 2, "vmdk"),
    (["info", "-f", "vmdk", "ok.qcow2"], 2, "vmdk"),
    (["create", "-o", "cluster_size=3000", "new.qcow2", "1M"], 2, "cluster_size"),
    (["create", "-o", "colour=blue", "new.qcow2", "1M"], 2, "colour"),
    (["create", "-o", "compat=9", "new.qcow2", "1M"], 2, "compat"),
    (["create", "ok.qcow2", "1M"], 2, "exists"),
    (["create", "-b", "missing.qcow2", "new.qcow2"], 2, "missing.qcow2"),
    (["create", "-b", "notes.txt", "new.qcow2"], 2, "not a qcow2"),
    (["create", "-F", "qcow2", "new.qcow2", "1M"], 2, "--backing"),
    (["create", "nodir/new.qcow2", "1M"], 2, "nodir"),
    (["pull", "--bandwidth", "fast", "ok.qcow2"], 2, "bandwidth"),
    (["pull", "--bandwidth", "-1M", "ok.qcow2"], 2, "bandwidth"),
    (["pull", "--on-error", "shrug", "ok.qcow2"], 2, "on-error"),
    (["pull", "--base", "other.qcow2", "ok.qcow2"], 2, "base"),
    (["pull", "--progress", "--no-progress", "ok.qcow2"], 2, "not allowed"),
    (["demo", "--size", "lots"], 2, "size"),
    (["frobnicate"], 2, "frobnicate"),
    ([], 2, "COMMAND"),
    (["info"], 2, "PATH"),
    (["info", "--output", "yaml", "ok.qcow2"], 2, "yaml"),
]


@pytest.mark.parametrize("argv, code, word", BAD, ids=[" ".join(a) or "none" for a, _c, _w in BAD])
def test_user_errors_are_one_line_with_the_right_exit_code(junk, argv, code, word):
    r = cli(*argv, cwd=junk)
    line = assert_one_error_line(r, (code,))
    assert word.lower() in line.lower(), line
    assert not (junk / "new.qcow2").exists()


def test_locked_image_is_an_operation_failure(junk):
    with blockpull.open(junk / "ok.qcow2"):          # holds the writer's lock bytes
        r = cli("pull", "ok.qcow2", cwd=junk)
    line = assert_one_error_line(r, (1,))
    assert "ok.qcow2" in line


def test_missing_backing_file_is_bad_input(tmp_path, qemu):
    qemu.create(tmp_path / "base.qcow2", 1 << 20)
    qemu.create(tmp_path / "top.qcow2", 1 << 20, backing="base.qcow2")
    (tmp_path / "base.qcow2").unlink()
    for cmd in ("info", "map", "pull"):
        line = assert_one_error_line(cli(cmd, tmp_path / "top.qcow2"), (2,))
        assert "base.qcow2" in line


def test_debug_shows_the_traceback_and_still_ends_with_the_error_line(tmp_path):
    r = cli("--debug", "info", tmp_path / "missing.qcow2")
    assert r.returncode == 2
    assert "Traceback" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("blockpull: error: ")


# ---- check ------------------------------------------------------------------------------


def test_check_follows_qemu_img_check(tmp_path, qemu):
    img = qemu.create(tmp_path / "c.qcow2", 4 << 20)
    qemu.io(img, "write -P 1 0 64k", "write -P 2 1M 64k")
    r = ok(cli("check", img))
    assert "No errors were found on the image." in r.stdout
    report = json.loads(ok(cli("check", "--output", "json", img)).stdout)
    assert report["filename"] == img and report["format"] == "qcow2"
    assert report["check-errors"] == 0 and "corruptions" not in report
    # an L1 entry that points into the middle of a cluster: corrupt for qemu-img and us
    with open(img, "r+b") as f:
        l1 = struct.unpack(">Q", f.read(48)[40:48])[0]
        f.seek(l1)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1)
        f.write(struct.pack(">Q", entry + 512))
    assert qemu.check(img) == 2
    r = cli("check", img)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_check_reports_and_repairs_leaks_like_qemu_img(tmp_path, qemu):
    img = qemu.create(tmp_path / "l.qcow2", 4 << 20)
    qemu.io(img, "write -P 1 0 128k")
    with blockpull.open(img) as im:       # write clusters and never link them: leaks
        top = im.layers[0]
        top.file.pwrite(b"x" * 3 * top.cluster_size, top.alloc_clusters(3))
    assert qemu.check(img) == 3
    r = cli("check", img)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "3 leaked clusters" in r.stdout
    ok(cli("check", "-r", "leaks", img))
    assert qemu.check(img) == 0


# ---- demo -------------------------------------------------------------------------------


def test_demo_in_a_directory_builds_pulls_and_verifies(tmp_path, qemu):
    out = tmp_path / "demo"
    r = ok(cli("demo", out, "--size", "6M", "--bandwidth", "64M"))
    assert "verified" in r.stdout and "no backing file" in r.stdout
    assert "template.qcow2 (qcow2)" in r.stdout          # the chain before
    vm = out / "vm.qcow2"
    qemu.assert_clean(vm)
    qemu.assert_clean(out / "template.qcow2")
    assert "backing-filename" not in qemu.info(vm)
    # the demo is deterministic: the same chain built again, still backed, reads the same
    again = tmp_path / "again"
    again.mkdir()
    built = build_demo_chain(str(again), 6 << 20)
    assert qemu.info(built.overlay)["backing-filename"] == "template.qcow2"
    assert qemu.compare(vm, built.overlay)
    mapped = qemu.map(built.overlay)
    assert {e["depth"] for e in mapped if e["data"]} == {0, 1}       # data in both layers
    assert any(e["zero"] and e["present"] and e["depth"] == 0 for e in mapped)  # zeroed ranges
    # a second demo in the same directory refuses to overwrite
    assert_one_error_line(cli("demo", out, "--size", "1M"), (2,))


def test_demo_without_qemu_in_a_temporary_directory(tmp_path):
    env = _env(TMPDIR=str(tmp_path), PATH="/nonexistent")    # no qemu-img to lean on
    r = cli("demo", "--size", "2M", "--bandwidth", "0", "--output", "json", env=env)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["verified"] is True and summary["kept"] is False
    assert summary["after"] == "vm.qcow2 (qcow2), no backing file"
    assert summary["copied_bytes"] > 0
    assert list(tmp_path.iterdir()) == []                   # removed afterwards
    r = cli("demo", "--size", "1M", "--keep", env=env)
    assert r.returncode == 0, r.stderr
    kept = list(tmp_path.iterdir())
    assert len(kept) == 1 and (kept[0] / "vm.qcow2").exists()


# ---- the rest ---------------------------------------------------------------------------


def test_verbose_shows_the_library_log(big_chain):
    top, _ = big_chain
    r = ok(cli("-v", "pull", top))
    assert "blockpull INFO" in r.stderr and "started" in r.stderr
    quiet = ok(cli("info", top))
    assert quiet.stderr == ""


def test_help_and_version():
    r = ok(cli("--help"))
    for cmd in ("create", "info", "map", "pull", "check", "demo"):
        assert cmd in r.stdout
    assert ok(cli("pull", "--help")).stdout.count("--bandwidth") >= 1
    assert ok(cli("--version")).stdout.strip() == f"blockpull {blockpull.__version__}"


def test_console_script_entry_point_is_main():
    from blockpull.cli import main
    assert main(["--version"]) == 0
    assert main(["info", "/nonexistent/x.qcow2"]) == 2
