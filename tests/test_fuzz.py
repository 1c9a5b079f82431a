"""Property: a mutated real qcow2 image either works or raises ImageFormatError /
BackingChainError at open, map, read or check: never another exception, a crash or a hang.

The hypothesis loop runs in a child process (tests/fuzz_child.py) under a 2 GiB
address-space limit: a segfault or a hang is reported here as a failure, with the input
that caused it saved. The run is repeatable: a fixed seed (BLOCKPULL_FUZZ_SEED) and no
example database; BLOCKPULL_FUZZ_EXAMPLES sets the number of mutants (default 2000).
"""
import json
import os
import shutil
import subprocess
import sys

from relhelp import child_env

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = int(os.environ.get("BLOCKPULL_FUZZ_EXAMPLES", "2000"))
SEED = int(os.environ.get("BLOCKPULL_FUZZ_SEED", "20240611"))
TIMEOUT = max(240, EXAMPLES // 5)


def make_seeds(qemu, d):
    """Small real images covering the layouts the parser knows."""
    size = 2 << 20
    a = qemu.create(d / "v3.qcow2", size)
    qemu.io(a, "write -P 1 0 64k", "write -c -P 2 512k 64k", "write -z 1M 64k",
            "write -P 3 1536k 4k")
    b = qemu.create(d / "v2_4k.qcow2", size, opts=["compat=0.10,cluster_size=4096"])
    qemu.io(b, "write -P 1 0 12k", "write -c -P 2 1M 4k")
    c = qemu.create(d / "snap.qcow2", size)
    qemu.io(c, "write -P 1 0 64k")
    qemu.img("snapshot", "-c", "s1", c)
    qemu.io(c, "write -P 2 0 4k")
    e = qemu.create(d / "rc1_512.qcow2", 1 << 20, opts=["cluster_size=512,refcount_bits=1"])
    qemu.io(e, "write -P 1 0 4k", "write -c -P 3 8k 512")
    f = qemu.create(d / "zstd.qcow2", size, opts=["compression_type=zstd"])
    qemu.io(f, "write -c -P 4 0 64k", "write -P 5 64k 64k")
    x = qemu.create(d / "extl2.qcow2", size, opts=["extended_l2=on,cluster_size=32k"])
    qemu.io(x, "write -P 7 0 4k", "write -P 8 40k 8k", "write -z 100k 32k")
    bm = qemu.create(d / "bitmaps.qcow2", size, opts=["cluster_size=4096"])
    qemu.img("bitmap", "--add", "-g", "4096", bm, "b0")
    qemu.img("bitmap", "--add", "--disable", bm, "b1")
    qemu.io(bm, "write -P 9 0 8k", "write -P 9 1M 4k")
    with open(d / "base.raw", "wb") as fh:
        fh.truncate(size)
    g = qemu.create(d / "backed.qcow2", size, backing="base.raw", backing_fmt="raw")
    qemu.io(g, "write -P 6 64k 4k")


def test_fuzz_mutated_headers_and_tables(tmp_path, qemu):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    make_seeds(qemu, seeds)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(seeds / "base.raw", out / "base.raw")   # the mutants' backing file
    env = child_env(HERE)
    try:
        r = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_child.py"), str(seeds),
                            str(out), str(EXAMPLES), str(SEED)],
                           capture_output=True, text=True, timeout=TIMEOUT, env=env,
                           cwd=str(seeds))
    except subprocess.TimeoutExpired:
        keep = shutil.copy(out / "current.qcow2", tmp_path / "hang.qcow2")
        raise AssertionError(f"fuzz (seed {SEED}) hung; input saved in {keep}")
    if r.returncode < 0:
        keep = shutil.copy(out / "current.qcow2", tmp_path / "crash.qcow2")
        raise AssertionError(f"fuzz (seed {SEED}) crashed with signal {-r.returncode}; "
                             f"input saved in {keep}\n{r.stderr[-2000:]}")
    assert r.returncode == 0, f"fuzz (seed {SEED}) failed:\n{r.stdout[-3000:]}{r.stderr[-5000:]}"
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["examples"] >= EXAMPLES
    # the mutations must reach both outcomes, or the property tests nothing
    assert stats["opened"] > EXAMPLES // 20 and stats["refused"] > EXAMPLES // 20, stats
