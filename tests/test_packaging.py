"""What users install: the sdist builds on its own, the wheel carries the compiled core.

The member checks need an sdist and a wheel. With BLOCKPULL_DIST naming a directory that
``python -m build`` filled (CI does this), they read those; otherwise they build both once
(``python -m build``, a few minutes, hence ``slow``). The stub check is fast and always runs.
"""
import glob
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYX = os.path.join(ROOT, "pyx", "blockpull")
PKG = os.path.join(ROOT, "src", "blockpull")
GENERATED = (".c", ".so", ".o", ".html", ".pyc")


def _names(pattern: str, where: str):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(where, pattern)))


def _modules():
    return [os.path.splitext(n)[0] for n in _names("*.pyx", PYX)]


def test_every_compiled_module_has_a_stub():
    mods = _modules()
    assert mods, "no Cython sources under pyx/blockpull"
    missing = [m for m in mods if not os.path.exists(os.path.join(PKG, m + ".pyi"))]
    assert missing == []
    assert os.path.exists(os.path.join(PKG, "py.typed"))


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    given = os.environ.get("BLOCKPULL_DIST")
    if given:
        out = given
    else:
        try:
            import build  # noqa: F401
        except ImportError:
            if os.environ.get("CI"):
                pytest.fail("the 'build' package is missing: pip install build")
            pytest.skip("the 'build' package is not installed (pip install build)")
        out = str(tmp_path_factory.mktemp("dist"))
        subprocess.run([sys.executable, "-m", "build", "--outdir", out, ROOT], check=True,
                       cwd=out, stdout=subprocess.DEVNULL)
    sdists = glob.glob(os.path.join(out, "blockpull-*.tar.gz"))
    wheels = glob.glob(os.path.join(out, "blockpull-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, (out, os.listdir(out))
    return sdists[0], wheels[0]


@pytest.mark.slow
def test_sdist_holds_sources_not_build_outputs(dist):
    with tarfile.open(dist[0]) as tf:
        top = os.path.basename(dist[0])[:-len(".tar.gz")]
        members = {m.name[len(top) + 1:] for m in tf.getmembers() if m.isfile()}
    want = {"pyproject.toml", "setup.py", "README.md", "MANIFEST.in",
            "stubtest-allowlist.txt", "src/blockpull/py.typed"}
    want |= {"pyx/blockpull/" + n for n in _names("*.pyx", PYX) + _names("*.pxd", PYX)}
    want |= {"src/blockpull/" + n for n in _names("*.pyi", PKG)}
    want |= {"docs/" + n for n in _names("*", os.path.join(ROOT, "docs"))}
    want |= {n for n in _names("LICENSE*", ROOT)}
    assert sorted(want - members) == []
    assert sorted(m for m in members if m.endswith(GENERATED)) == []


@pytest.mark.slow
def test_wheel_holds_compiled_modules_and_stubs(dist):
    with zipfile.ZipFile(dist[1]) as zf:
        members = set(zf.namelist())
    for mod in _modules():
        assert [m for m in members if m.startswith("blockpull/%s." % mod)
                and m.endswith(".so")], mod
        assert "blockpull/%s.pyi" % mod in members
    assert "blockpull/py.typed" in members
    assert sorted(m for m in members if m.endswith((".c", ".pyx", ".pxd", ".o"))) == []
