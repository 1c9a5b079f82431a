"""TLS (NBD_OPT_STARTTLS with x509 through Python's ssl): QEMU's client connects with
credentials the test makes with openssl; a plain client is refused on a TLS export."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

import blockpull
import nbdclient as C
from test_nbd import make_chain, nbdtools  # noqa: F401 (a fixture)


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if not shutil.which("openssl"):
        if os.environ.get("CI"):
            pytest.fail("openssl missing: apt-get install openssl")
        pytest.skip("openssl missing")
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca-key.pem",
            "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=blockpull test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    (d / "ext.cnf").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who in ("server", "client"):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{who}-key.pem",
                "-out", f"{who}.csr", "-subj", "/CN=localhost", cwd=d)
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey",
                "ca-key.pem", "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "2",
                "-extfile", "ext.cnf", cwd=d)
    return str(d)


def qemu_compare_tls(qemu, certdir, server_opts, ref):
    opts = f"driver=nbd,{server_opts},tls-creds=tls0,tls-hostname=localhost"
    r = qemu.img("compare", "--object",
                 f"tls-creds-x509,id=tls0,dir={certdir},endpoint=client",
                 "--image-opts", opts, f"driver=qcow2,file.filename={ref}", check=False)
    return r


@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_qemu_connects_with_tls(tmp_path, nbdtools, certs, where):
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path))
    tls = (os.path.join(certs, "server-cert.pem"), os.path.join(certs, "server-key.pem"))
    kw = {"port": 0} if where == "tcp" else {}
    with blockpull.serve(top, tls=tls, **kw) as srv:
        assert srv.uri.startswith("nbds")
        if where == "tcp":
            server = f"server.type=inet,server.host=127.0.0.1,server.port={srv.port}"
        else:
            server = f"server.type=unix,server.path={srv.socket_path}"
        r = qemu_compare_tls(qemu, certs, server, ref)
        assert r.returncode == 0, r.stdout + r.stderr
        if where == "unix":
            # a plain client is refused: every option but STARTTLS/ABORT says TLS_REQD
            c = C.Client(srv.socket_path)
            c.greeting()
            go = struct.pack(">I", 0) + struct.pack(">H", 0)
            assert c.option(C.OPT_GO, go)[-1][0] == (1 << 31) + 5
            assert c.option(C.OPT_LIST)[-1][0] == (1 << 31) + 5
            c.s.close()
            r = qemu.img("info", srv.uri.replace("nbds+unix", "nbd+unix"), check=False)
            assert r.returncode != 0
            r = subprocess.run(["nbdinfo", srv.uri.replace("nbds+unix", "nbd+unix")],
                               capture_output=True, text=True)
            assert r.returncode != 0


def test_client_certificates_required_with_a_ca(tmp_path, nbdtools, certs):
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path))
    tls = (os.path.join(certs, "server-cert.pem"), os.path.join(certs, "server-key.pem"),
           os.path.join(certs, "ca-cert.pem"))
    with blockpull.serve(top, tls=tls) as srv:
        server = f"server.type=unix,server.path={srv.socket_path}"
        r = qemu_compare_tls(qemu, certs, server, ref)          # has client-cert.pem
        assert r.returncode == 0, r.stdout + r.stderr
        bare = tmp_path / "bare"
        bare.mkdir()
        shutil.copy(os.path.join(certs, "ca-cert.pem"), bare / "ca-cert.pem")
        r = qemu_compare_tls(qemu, str(bare), server, ref)      # no client certificate
        assert r.returncode != 0
        # the refused client did not disturb the server
        r = qemu_compare_tls(qemu, certs, server, ref)
        assert r.returncode == 0, r.stdout + r.stderr


def test_non_loopback_needs_tls(tmp_path, nbdtools, certs):
    top, _ref = make_chain(nbdtools, str(tmp_path))
    with pytest.raises(blockpull.ServeError, match="TLS"):
        blockpull.serve(top, host="0.0.0.0", port=0)
    tls = (os.path.join(certs, "server-cert.pem"), os.path.join(certs, "server-key.pem"))
    with blockpull.serve(top, host="0.0.0.0", port=0, tls=tls) as srv:
        assert srv.uri == f"nbds://0.0.0.0:{srv.port}/"
    with pytest.raises(blockpull.ServeError, match="certificate"):
        blockpull.serve(top, tls=(os.path.join(certs, "nope.pem"), tls[1]))
