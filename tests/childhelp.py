"""What the child processes of the full-disk tests share (run as scripts, they import
this from their own directory): qemu-img as the judge of an image they left."""
import json
import subprocess


def sh(*args, check=True):
    r = subprocess.run(list(args), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def check_clean(path, what):
    r = sh("qemu-img", "check", "-U", path, check=False)
    assert r.returncode == 0, f"{what}: qemu-img check exit {r.returncode}\n{r.stdout}{r.stderr}"


def same(path, other, what, other_fmt=None):
    """``path`` reads as ``other`` (an image, or a file of format ``other_fmt``)."""
    fmt = ["-F", other_fmt] if other_fmt else []
    r = sh("qemu-img", "compare", "-U", *fmt, path, other, check=False)
    assert r.returncode == 0, f"{what}: reads differ from the chain\n{r.stdout}{r.stderr}"


def judge(top, other, what, other_fmt=None):
    """``check_clean`` and ``same``."""
    check_clean(top, what)
    same(top, other, what, other_fmt)


def top_map(path):
    """The extents the top itself maps (qemu-img map: depth 0, data), as map entries."""
    r = sh("qemu-img", "map", "-U", "--output=json", path)
    return [e for e in json.loads(r.stdout) if e["depth"] == 0 and e["data"]]


def top_bytes(path):
    """Bytes the top itself maps."""
    return sum(e["length"] for e in top_map(path))


def backing_of(path):
    r = sh("qemu-img", "info", "-U", "--output=json", path)
    return json.loads(r.stdout).get("backing-filename")
