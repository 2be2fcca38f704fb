"""A stand-in for ``lmcache.v1.multiprocess.server``: it prints its pid and listens on the port
it is given, as the real server does after its start-up.

``STAND_IN_SERVER`` picks another behaviour: ``no-cuda`` fails at import, ``dies`` exits at
start, ``deaf`` never listens.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

MODE = os.environ.get("STAND_IN_SERVER", "listens")
if MODE == "no-cuda":
    raise ImportError("libcudart.so.12: cannot open")


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--host", "--port", "--l1-size-gb", "--eviction-policy"):
        parser.add_argument(flag)
    args = parser.parse_args()
    print(os.getpid(), flush=True)
    if MODE == "dies":
        raise AssertionError("Torch not compiled with CUDA enabled")
    if MODE == "listens":
        sock = socket.socket()
        sock.bind((args.host, int(args.port)))
        sock.listen()
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
