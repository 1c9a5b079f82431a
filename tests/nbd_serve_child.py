"""Serve an image in a child process for the fault tests: prints the server's socket
path on stdout, then serves until stdin closes (or the process is killed).

usage: nbd_serve_child.py IMAGE SOCKET [AS_LIMIT_BYTES] [pull-bandwidth]
"""
import logging
import resource
import sys

import blockpull


def main() -> None:
    path, sock = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3 and int(sys.argv[3]):
        lim = int(sys.argv[3])
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    logging.basicConfig(level=logging.ERROR)  # a server-side traceback shows on stderr
    bw = sys.argv[4] if len(sys.argv) > 4 else None
    srv = blockpull.serve(path, socket=sock, backing_format="qcow2",
                          pull=bw is not None, bandwidth=bw or 0)
    print(srv.socket_path, flush=True)
    sys.stdin.read()
    srv.close()
    print("closed", flush=True)


if __name__ == "__main__":
    main()
