"""What a new user meets on the command line, judged by qemu-img: check -U, locked images
that say how to read them anyway, -F raw spelt out, the README's synopsis, and check's
summary byte for byte as qemu-img check prints it (blockpull prints its findings, one
line each, before it; qemu-img prints its own on stderr)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import blockpull
import qcow2_edit as q
from blockpull.cli import build_parser
from relhelp import child_env

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "blockpull", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=child_env(),
                          timeout=60)


def qimg(*args, cwd=None):
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def same_summary(got, want):
    """blockpull's stdout is its findings, one line each, then exactly qemu-img's stdout."""
    assert got.endswith(want), (got, want)
    findings = got[:len(got) - len(want)].splitlines()
    summary_words = ("errors were found", "leaked clusters were found", "No errors",
                     "% allocated", "Image end offset", "were found and repaired")
    assert not [f for f in findings if any(w in f for w in summary_words)], findings


def error_line(r):
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockpull: error: "), r.stderr
    return lines[0]


@pytest.fixture
def writer(tmp_path, qemu):
    """qemu-storage-daemon holding a qcow2 image read-write, as a running VM does."""
    if not shutil.which("qemu-storage-daemon"):
        pytest.fail("qemu-storage-daemon is required (apt-get install qemu-system-common)")
    img = qemu.create(tmp_path / "vm.qcow2", 4 * MiB)
    qemu.io(img, "write -P 1 0 1M", "write -c -P 2 2M 128k")
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f,filename={img}",
         "--blockdev", "driver=qcow2,node-name=q,file=f",
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=e,node-name=q,writable=on"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < end, "qemu-storage-daemon did not start"
            time.sleep(0.02)
        yield img
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_read_only_commands_take_U_and_say_so_when_locked(tmp_path, writer):
    name = os.path.basename(writer)
    assert qimg("check", name, cwd=tmp_path).returncode != 0     # qemu-img needs -U too
    for cmd in ("info", "map", "check"):
        r = cli(cmd, name, cwd=tmp_path)
        assert r.returncode == 1, (cmd, r.stderr)
        line = error_line(r)
        assert "add -U" in line and name in line, line
    # with -U they read it, and check prints what qemu-img check -U prints
    want = qimg("check", "-U", name, cwd=tmp_path)
    r = cli("check", "-U", name, cwd=tmp_path)
    assert r.returncode == want.returncode, r.stderr
    same_summary(r.stdout, want.stdout)
    r = cli("check", "-U", "--output", "json", name, cwd=tmp_path)
    assert json.loads(r.stdout) == \
        json.loads(qimg("check", "-U", "--output=json", name, cwd=tmp_path).stdout)
    r = cli("map", "-U", "--output", "json", name, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == qimg("map", "-U", "--output=json", name, cwd=tmp_path).stdout
    assert cli("info", "-U", name, cwd=tmp_path).returncode == 0
    # a repair writes: -U is no way around the lock, and the message does not offer it
    r = cli("check", "-r", "leaks", name, cwd=tmp_path)
    assert r.returncode == 1 and "-U" not in error_line(r)
    assert blockpull.check(writer, force_share=True).exit_code == 0
    with pytest.raises(blockpull.ImageLockedError):
        blockpull.check(writer)


def test_U_with_a_repair_is_refused(tmp_path, qemu):
    img = qemu.create(tmp_path / "a.qcow2", MiB)
    r = cli("check", "-U", "-r", "leaks", img)
    assert r.returncode == 2 and "-U" in error_line(r)
    assert qimg("check", "-U", "-r", "leaks", img).returncode != 0     # nor does qemu-img
    with pytest.raises(ValueError):
        blockpull.check(img, repair=True, force_share=True)


def test_a_raw_backing_or_image_names_the_flag(tmp_path, qemu):
    (tmp_path / "raw.img").write_bytes(b"\x01" * MiB)
    r = cli("create", "-b", "raw.img", "ov.qcow2", cwd=tmp_path)
    line = error_line(r)
    assert r.returncode == 2 and "-F raw" in line and "backing_format" not in line, line
    assert not (tmp_path / "ov.qcow2").exists()
    r = cli("create", "-b", "raw.img", "-F", "raw", "ov.qcow2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert qemu.info(tmp_path / "ov.qcow2")["backing-filename-format"] == "raw"
    for cmd in ("info", "map", "check"):
        line = error_line(cli(cmd, "raw.img", cwd=tmp_path))
        assert "-f raw" in line and "format=" not in line, line
    with pytest.raises(blockpull.ImageFormatError, match="backing_format='raw'"):
        blockpull.create(tmp_path / "ov2.qcow2", 0, backing="raw.img")


def synopsis():
    """README's synopsis: command -> its text (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Command line\n\n```\n(.*?)```", text, flags=re.S).group(1)
    out = {}
    cmd = None
    for line in block.splitlines():
        m = re.match(r"blockpull (\w+)\s+(.*)", line)
        if m:
            cmd = m.group(1)
            out[cmd] = m.group(2)
        elif cmd:
            out[cmd] += " " + line.strip()
    return out


def test_readme_synopsis_lists_every_option():
    syn = synopsis()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) <= set(syn), set(sub.choices) - set(syn)
    common = {"-h", "--help", "-v", "--verbose", "--debug"}
    for cmd, p in sub.choices.items():
        words = set(re.findall(r"--?[\w-]+", syn[cmd]))
        for action in p._actions:
            opts = set(action.option_strings) - common
            if action.option_strings and opts:
                assert opts & words, f"README synopsis of {cmd} lacks {sorted(opts)}"


# ---- check's summary, byte for byte -------------------------------------------------------


def leak(path, n=3):
    with blockpull.open(path) as img:                # clusters written and never linked
        top = img.layers[0]
        top.file.pwrite(b"x" * n * top.cluster_size, top.alloc_clusters(n))


def make(tmp_path, qemu, kind):
    p = str(tmp_path / ("c.qed" if kind.startswith("qed") else "c.qcow2"))
    if kind == "empty":
        qemu.create(p, 4 * MiB)
    elif kind in ("fragmented", "v2", "ext-l2", "small-clusters", "leaky", "corrupt"):
        opts = {"v2": ["compat=0.10"], "ext-l2": ["extended_l2=on"],
                "small-clusters": ["cluster_size=4096"]}.get(kind, [])
        qemu.create(p, 8 * MiB, opts=opts)
        qemu.io(p, "write -P 1 3M 64k", "write -P 2 0 64k", "write -P 3 1M 200k",
                "write -c -P 4 5M 192k", "write -z 6M 64k", "write -P 5 4097k 3k")
        if kind == "leaky":
            leak(p)
        if kind == "corrupt":      # a data cluster whose refcount says free
            cluster = (q.l2_entry(p, 0) & 0x00FFFFFFFFFFFE00) >> q.header(p)["cluster_bits"]
            q.set_refcount(p, cluster, 0)
    elif kind == "qed-empty":
        qemu.create(p, 4 * MiB, fmt="qed")
    elif kind in ("qed", "qed-leaky"):
        qemu.create(p, 8 * MiB, fmt="qed")
        qemu.io(p, "write -P 1 3M 64k", "write -P 2 0 64k", "write -P 3 1M 200k",
                "write -z 6M 64k", fmt="qed")
        if kind == "qed-leaky":
            with open(p, "r+b") as f:
                f.seek(0, os.SEEK_END)
                f.write(b"y" * 3 * 65536)
    return os.path.basename(p)


KINDS = ["empty", "fragmented", "v2", "ext-l2", "small-clusters", "leaky", "corrupt",
         "qed-empty", "qed", "qed-leaky"]


@pytest.mark.parametrize("kind", KINDS)
def test_check_prints_what_qemu_img_check_prints(tmp_path, qemu, kind):
    name = make(tmp_path, qemu, kind)
    want = qimg("check", name, cwd=tmp_path)
    got = cli("check", name, cwd=tmp_path)
    assert got.returncode == want.returncode, (got.stdout, got.stderr, want.stdout)
    same_summary(got.stdout, want.stdout)
    want_json = json.loads(qimg("check", "--output=json", name, cwd=tmp_path).stdout)
    got_json = json.loads(cli("check", "--output", "json", name, cwd=tmp_path).stdout)
    assert got_json == want_json


@pytest.mark.parametrize("kind", ["leaky", "fragmented"])
def test_check_after_a_leak_repair_prints_what_qemu_img_prints(tmp_path, qemu, kind):
    name = make(tmp_path, qemu, kind)
    shutil.copy(tmp_path / name, tmp_path / "q.qcow2")
    shutil.copy(tmp_path / name, tmp_path / "j.qcow2")
    shutil.copy(tmp_path / name, tmp_path / "jq.qcow2")
    want = qimg("check", "-r", "leaks", "q.qcow2", cwd=tmp_path)
    got = cli("check", "-r", "leaks", name, cwd=tmp_path)
    assert got.returncode == want.returncode == 0, got.stderr
    same_summary(got.stdout, want.stdout)
    if kind == "leaky":
        assert "Double checking the fixed image now...\n" in got.stdout
    # and what each says right after
    same_summary(cli("check", name, cwd=tmp_path).stdout,
                 qimg("check", "q.qcow2", cwd=tmp_path).stdout)
    want_json = json.loads(qimg("check", "-r", "leaks", "--output=json", "jq.qcow2",
                                cwd=tmp_path).stdout)
    got_json = json.loads(cli("check", "-r", "leaks", "--output", "json", "j.qcow2",
                              cwd=tmp_path).stdout)
    want_json["filename"] = "j.qcow2"
    assert got_json == want_json
