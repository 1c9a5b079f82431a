"""``blockpull pull A B C``: several images at once under one --bandwidth (a Budget)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from relhelp import child_env

MiB = 1 << 20


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockpull", *map(str, args)],
                          capture_output=True, text=True, env=child_env(), timeout=timeout)


def overlays(qemu, tmp_path: Path, n: int, size: int) -> List[Path]:
    """n overlays of one template (a provisioning burst), each with a write of its own."""
    base = tmp_path / "template.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(base), str(size))
    qemu.io(str(base), f"write -P 0x11 0 {size}", fmt="qcow2")
    tops = []
    for i in range(n):
        top = tmp_path / f"vm{i}.qcow2"
        qemu.img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
        qemu.io(str(top), f"write -P {0x20 + i} {i * 65536} 65536", fmt="qcow2")
        tops.append(top)
    return tops


def expected(qemu, top: Path, tmp_path: Path) -> Path:
    ref = tmp_path / (top.stem + ".raw")
    qemu.img("convert", "-O", "raw", str(top), str(ref))
    return ref


def test_several_images_pulled_at_once_are_exact_and_standalone(qemu, tmp_path):
    tops = overlays(qemu, tmp_path, 4, 4 * MiB)
    refs = [expected(qemu, t, tmp_path) for t in tops]
    r = cli("pull", *tops, "--jobs", "2", "--bandwidth", "0")
    assert r.returncode == 0, r.stderr
    for top, ref in zip(tops, refs):
        assert f"pulled {top}" in r.stdout
        qemu.img("check", str(top))
        qemu.img("compare", "-f", "qcow2", "-F", "raw", str(top), str(ref))
        assert "backing-filename" not in qemu.info(str(top))


def test_json_lines_name_each_image(qemu, tmp_path):
    tops = overlays(qemu, tmp_path, 2, 2 * MiB)
    r = cli("pull", *tops, "--output", "json", "--bandwidth", "100M")
    assert r.returncode == 0, r.stderr
    ends = [json.loads(line) for line in r.stdout.splitlines()]
    done = {e["path"]: e for e in ends if e.get("event") == "completed"}
    assert set(done) == {str(t) for t in tops}
    assert all(e["cur"] == e["end"] > 0 and e["backing"] is None for e in done.values())


def test_one_image_that_cannot_start_fails_the_run_not_the_others(qemu, tmp_path):
    tops = overlays(qemu, tmp_path, 2, 2 * MiB)
    refs = [expected(qemu, t, tmp_path) for t in tops]
    missing = tmp_path / "nope.qcow2"
    r = cli("pull", tops[0], missing, tops[1])
    assert r.returncode == 1
    assert "nope.qcow2" in r.stderr
    for top, ref in zip(tops, refs):
        qemu.img("compare", "-f", "qcow2", "-F", "raw", str(top), str(ref))
        assert "backing-filename" not in qemu.info(str(top))


@pytest.mark.parametrize("extra, words", [
    (["--control", "x.sock"], "--control"),
    (["--base", "template.qcow2"], "--base"),
    (["--jobs", "0"], "--jobs"),
])
def test_options_that_take_one_image_are_refused_with_several(qemu, tmp_path, extra, words):
    tops = overlays(qemu, tmp_path, 2, MiB)
    r = cli("pull", *tops, *extra)
    assert r.returncode == 2
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for top in tops:  # nothing was touched
        assert qemu.info(str(top))["backing-filename"] == "template.qcow2"


def test_the_same_image_twice_is_refused(qemu, tmp_path):
    (top,) = overlays(qemu, tmp_path, 1, MiB)
    r = cli("pull", top, str(top))
    assert r.returncode == 2 and "twice" in r.stderr


def test_ctrl_c_aborts_every_running_pull_and_a_rerun_finishes(qemu, tmp_path):
    tops = overlays(qemu, tmp_path, 3, 16 * MiB)
    refs = [expected(qemu, t, tmp_path) for t in tops]
    proc = subprocess.Popen([sys.executable, "-m", "blockpull", "pull", *map(str, tops),
                             "--jobs", "2", "--bandwidth", "4M", "--output", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "not started" in err and str(tops[2]) in err
    for top in tops:  # valid and still backed
        qemu.img("check", str(top))
        assert qemu.info(str(top))["backing-filename"] == "template.qcow2"
    r = cli("pull", *tops)
    assert r.returncode == 0, r.stderr
    for top, ref in zip(tops, refs):
        qemu.img("compare", "-f", "qcow2", "-F", "raw", str(top), str(ref))


def test_the_same_image_through_a_hard_link_is_refused(qemu, tmp_path):
    (top,) = overlays(qemu, tmp_path, 1, MiB)
    link = tmp_path / "link.qcow2"
    os.link(top, link)
    r = cli("pull", top, link)
    assert r.returncode == 2 and "twice" in r.stderr and len(r.stderr.splitlines()) == 1
    assert qemu.info(str(top))["backing-filename"] == "template.qcow2"


@pytest.mark.parametrize("extra", [["--jobs", "0"], ["--jobs=-1"], ["--jobs", "many"],
                                   ["--bandwidth", "0.5"]])
@pytest.mark.parametrize("n", [1, 2])
def test_bad_jobs_or_bandwidth_is_refused_with_one_image_too(qemu, tmp_path, extra, n):
    # (--jobs 0 with one image was ignored; --bandwidth 0.5 rounded to 0: unlimited)
    tops = overlays(qemu, tmp_path, n, MiB)
    r = cli("pull", *tops, *extra)
    assert r.returncode == 2, r.stderr
    assert extra[0].split("=")[0] in r.stderr and len(r.stderr.splitlines()) == 1
    for top in tops:
        qemu.img("check", str(top))
        assert qemu.info(str(top))["backing-filename"] == "template.qcow2"


def test_an_image_that_cannot_start_is_told_as_the_single_pull_tells_it(qemu, tmp_path):
    tops = overlays(qemu, tmp_path, 1, MiB)
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\x01" * MiB)
    single = cli("pull", raw)
    r = cli("pull", tops[0], raw)
    assert single.returncode == 2 and r.returncode == 1
    assert single.stderr.strip() in r.stderr.splitlines()
    assert "-f raw" in r.stderr and "format=" not in r.stderr
    assert "backing-filename" not in qemu.info(str(tops[0]))


def test_a_signal_while_an_ended_pull_closes_its_image_lets_the_close_finish(
        qemu, tmp_path, monkeypatch, capsys):
    # SIGINT used to raise wherever the loop was, here inside Image.close: the close was
    # cut short, the image reported twice and closed a second time
    from blockpull.cli.main import main
    from blockpull.image import Image
    tops = overlays(qemu, tmp_path, 2, MiB)
    refs = [expected(qemu, t, tmp_path) for t in tops]
    calls = []
    real_close = Image.close

    def close(self):
        if os.path.samefile(self.path, tops[0]):
            calls.append("enter")
            if calls.count("enter") == 1:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the handler runs here
            real_close(self)
            calls.append("done")
        else:
            real_close(self)

    monkeypatch.setattr(Image, "close", close)
    code = main(["pull", *map(str, tops), "--jobs", "1"])
    out, err = capsys.readouterr()
    assert code == 130, err
    assert calls == ["enter", "done"]
    assert out.count(f"pulled {tops[0]}") == 1
    assert "not started" in err and str(tops[1]) in err
    qemu.img("check", str(tops[0]))
    assert "backing-filename" not in qemu.info(str(tops[0]))
    qemu.img("compare", "-f", "qcow2", "-F", "raw", str(tops[0]), str(refs[0]))
    assert qemu.info(str(tops[1]))["backing-filename"] == "template.qcow2"


def test_a_pull_paused_by_an_error_says_how_to_go_on_and_sigusr1_resumes_it(
        qemu, tmp_path, monkeypatch, capsys):
    # under --on-error stop the paused pull said "pull again to resume" (a new pull would
    # be refused: this one holds the image) and, unlike the single pull, not SIGUSR1
    import errno
    import threading

    import blockpull.cli.pull_many as pull_many
    from blockpull.cli.main import main
    from blockpull.faults import FaultInjector, attach
    tops = overlays(qemu, tmp_path, 2, 2 * MiB)
    refs = [expected(qemu, t, tmp_path) for t in tops]
    real_open = pull_many.open_image
    opened = []

    def open_image(args, readonly):
        img = real_open(args, readonly)
        if os.path.samefile(img.path, tops[0]):
            inj = FaultInjector()
            inj.fail("write", role="top", errno=errno.EIO, nth=2, times=1)
            attach(img, inj)
            opened.append(img)
        return img

    def resume_once_paused():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if opened and opened[0].job is not None and opened[0].job.status == "paused":
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.02)

    monkeypatch.setattr(pull_many, "open_image", open_image)
    helper = threading.Thread(target=resume_once_paused, daemon=True)
    helper.start()
    code = main(["pull", *map(str, tops), "--on-error", "stop", "--bandwidth", "8M"])
    helper.join(30)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "I/O error in" in err and "SIGUSR1" in err and "pull again" not in err, err
    for top, ref in zip(tops, refs):
        qemu.img("check", str(top))
        assert "backing-filename" not in qemu.info(str(top))
        qemu.img("compare", "-f", "qcow2", "-F", "raw", str(top), str(ref))


def test_json_lines_tell_the_end_of_an_image_that_could_not_start(qemu, tmp_path):
    # a JSON reader learnt nothing of it: the error was on stderr only
    tops = overlays(qemu, tmp_path, 1, MiB)
    missing = tmp_path / "nope.qcow2"
    r = cli("pull", tops[0], missing, "--output", "json")
    assert r.returncode == 1
    events = [json.loads(line) for line in r.stdout.splitlines()]
    ends = {e["path"]: e for e in events if e["event"] in ("completed", "failed", "cancelled")}
    assert set(ends) == {str(tops[0]), str(missing)}
    assert ends[str(missing)]["event"] == "failed" and "nope.qcow2" in ends[str(missing)]["error"]
    assert "backing-filename" not in qemu.info(str(tops[0]))


def _three_deep(qemu, tmp_path: Path):
    base, mid, top = (tmp_path / f"{n}.qcow2" for n in ("base", "mid", "top"))
    qemu.img("create", "-q", "-f", "qcow2", str(base), str(4 * MiB))
    qemu.io(str(base), f"write -P 0x11 0 {4 * MiB}", fmt="qcow2")
    qemu.img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(mid))
    qemu.io(str(mid), f"write -P 0x22 {MiB} {MiB}", fmt="qcow2")
    qemu.img("create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", str(top))
    qemu.io(str(top), f"write -P 0x33 {3 * MiB} 65536", fmt="qcow2")
    return mid, top


@pytest.mark.parametrize("order", ["top-first", "mid-first"])
def test_an_image_in_anothers_chain_is_told_so_not_blamed_on_another_process(
        qemu, tmp_path, order):
    # our own lock refused the second one, and the message sent the user looking for a VM
    mid, top = _three_deep(qemu, tmp_path)
    refs = {p: expected(qemu, p, tmp_path) for p in (mid, top)}
    first, second = (top, mid) if order == "top-first" else (mid, top)
    r = cli("pull", first, second, "--bandwidth", "2M")  # the first runs for seconds
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert str(second) in line and "backs the other" in line and "--jobs 1" in line, line
    assert "another process" not in line
    assert "backing-filename" not in qemu.info(str(first))
    assert "backing-filename" in qemu.info(str(second))
    r = cli("pull", second, "--jobs", "1")
    assert r.returncode == 0, r.stderr
    for p, ref in refs.items():
        qemu.img("check", str(p))
        qemu.img("compare", "-f", "qcow2", "-F", "raw", str(p), str(ref))
        assert "backing-filename" not in qemu.info(str(p))


def test_overlays_of_one_template_held_by_another_process_still_name_it(qemu, tmp_path):
    import blockpull
    tops = overlays(qemu, tmp_path, 2, 2 * MiB)
    with blockpull.open(str(tops[1])):  # another process holds it read-write
        r = cli("pull", *tops, "--bandwidth", "8M")
    assert r.returncode == 1
    assert "another process" in r.stderr and "backs the other" not in r.stderr
    assert "backing-filename" not in qemu.info(str(tops[0]))
    assert qemu.info(str(tops[1]))["backing-filename"] == "template.qcow2"
