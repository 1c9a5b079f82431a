"""``blockpull serve``: the URI first, the pull's progress, SIGINT/SIGTERM close cleanly."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from relhelp import child_env
from test_nbd import make_chain, model, nbdtools, qio  # noqa: F401 (a fixture)


def start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "blockpull", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env=child_env())


def test_serve_pull_json_then_sigterm(tmp_path, nbdtools):
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path))
    ctl = str(tmp_path / "q.sock")
    p = start(["--pull", "--bandwidth", "64M", "--output", "json", "--control", ctl, top],
              str(tmp_path))
    try:
        first = json.loads(p.stdout.readline())
        assert first["type"] == "serving" and first["uri"].startswith("nbd+unix:///?socket=")
        assert first["control"] == ctl and os.path.exists(ctl)
        uri = first["uri"]
        model_path = str(tmp_path / "model.qcow2")
        shutil.copy(ref, model_path)
        qio(uri, "write -P 33 3M 70000")
        model(qemu, model_path, ["write -P 33 3M 70000"])
        lines = []
        while True:
            line = json.loads(p.stdout.readline())
            lines.append(line)
            if line["type"] == "event":
                break
        assert line["event"] == "completed" and line["backing"] is None
        assert all(x["type"] == "progress" for x in lines[:-1])
        # still serving after the pull: the client sees the same disk
        r = qemu.img("compare", "-f", "raw", "-F", "qcow2", uri, model_path, check=False)
        assert r.returncode == 0, r.stdout
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == {"type": "closed"}
    assert "backing-filename" not in qemu.info(top)
    qemu.assert_clean(top)
    assert qemu.compare(top, model_path)


def test_serve_sigint_aborts_the_pull_cleanly(tmp_path, nbdtools):
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path))
    sock = str(tmp_path / "s.sock")
    # no copy-on-read: the compare reads the whole disk, and with copy-on-read its reads
    # would copy it, leaving the pull (which pays only for what it copies) nothing to
    # do before the signal
    p = start(["--socket", sock, "--pull", "--bandwidth", "1M", "--no-copy-on-read", top],
              str(tmp_path))
    try:
        uri = p.stdout.readline().strip()
        assert uri == f"nbd+unix:///?socket={sock}"
        qemu.img("compare", "-f", "raw", "-F", "qcow2", uri, ref)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "aborted" in err and "still backed" in err
    assert not os.path.exists(sock)
    assert qemu.info(top)["backing-filename"] == "base.qcow2"
    qemu.assert_clean(top)
    assert qemu.compare(top, ref)


@pytest.mark.parametrize("args, words", [
    (["--bind", "0.0.0.0", "--port", "0"], "TLS"),
    (["--bandwidth", "5M"], "--pull"),
    (["--tls-cert", "x.pem"], "--tls-key"),
    (["--readonly", "--pull"], "read-write"),
])
def test_serve_usage_errors(tmp_path, nbdtools, args, words):
    top, _ref = make_chain(nbdtools, str(tmp_path))
    p = start(args + [top], str(tmp_path))
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2 and words in err and err.startswith("blockpull: error:"), err
    assert "Traceback" not in err


@pytest.mark.slow
def test_demo_serve_boots_a_vm(tmp_path):
    """`blockpull demo --serve`: a VM boots from the served overlay while it is pulled."""
    from blockpull.cli.vmdemo import Missing, find_guest
    try:
        find_guest()
    except Missing as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    d = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "blockpull", "demo", "--serve", "--output",
                        "json", str(d)], capture_output=True, text=True, env=child_env(),
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    guest = [x["line"] for x in lines if x["type"] == "guest"]
    assert any(g.startswith("guest: MD5=") for g in guest), guest
    assert lines[-1]["type"] == "demo" and lines[-1]["line"].startswith("verified:")
    assert any(x["type"] == "event" and x["event"] == "completed" for x in lines)
