"""The server pool's life cycle: loopback only, a free port, always stopped, reasons kept.

These use a stand-in ``lmcache.v1.multiprocess.server`` (a few lines that listen on the port
they are given) so that they run in a second; the real servers are in test_live.py.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from vllm_patches.diagnosis.servers import ServerPool, free_port, server_flags, start
from vllm_patches.errors import PatchToolError

LISTENING_SERVER = """\
import argparse, socket, time
p = argparse.ArgumentParser()
p.add_argument("--host"); p.add_argument("--port", type=int)
p.add_argument("--l1-size-gb"); p.add_argument("--eviction-policy")
args = p.parse_args()
s = socket.socket(); s.bind((args.host, args.port)); s.listen()
while True:
    time.sleep(1)
"""


def _layer(root: Path, server_source: str) -> Path:
    package = root / "lmcache" / "v1" / "multiprocess"
    package.mkdir(parents=True)
    for directory in (root / "lmcache", root / "lmcache" / "v1", package):
        (directory / "__init__.py").write_text("")
    (package / "server.py").write_text(server_source)
    return root


def _listening(url: str) -> bool:
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0


def test_free_port_names_a_port_nothing_holds_on_loopback():
    """What start() gives the server: a real port, not listened on, released for the server."""
    port = free_port()
    assert type(port) is int and 1024 <= port <= 65535
    assert not _listening(f"tcp://127.0.0.1:{port}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_flags_are_read_from_the_servers_help_and_cached(tmp_path):
    layer = _layer(tmp_path / "layer", LISTENING_SERVER)
    flags = server_flags(Path(sys.executable), layer)
    assert {"--host", "--port", "--l1-size-gb", "--eviction-policy"} <= set(flags)
    assert "--disable-metrics" not in flags
    assert (layer / ".server-flags.json").is_file()


def test_a_server_starts_on_loopback_and_is_stopped(tmp_path):
    layer = _layer(tmp_path / "layer", LISTENING_SERVER)
    with ServerPool(tmp_path / "logs") as pool:
        server = pool.get(Path(sys.executable), layer, "9.9.9")
        assert not isinstance(server, str)
        assert server.url.startswith("tcp://127.0.0.1:") and _listening(server.url)
        # Reused, not started twice.
        assert pool.get(Path(sys.executable), layer, "9.9.9") is server
        argv = server.process.args
        assert argv[argv.index("--l1-size-gb") + 1] == "0.2"
    assert server.process.poll() is not None
    assert not _listening(server.url)


def test_a_release_without_a_runnable_server_is_a_reason_not_a_crash(tmp_path):
    layer = _layer(tmp_path / "layer", "raise ImportError('libcudart.so.12: cannot open')\n")
    with ServerPool(tmp_path / "logs") as pool:
        why = pool.get(Path(sys.executable), layer, "0.3.10")
        assert why == (
            "lmcache 0.3.10: its server does not start here: "
            "ImportError: libcudart.so.12: cannot open"
        )
        assert pool.failures == {"0.3.10": why}


def test_a_server_that_exits_at_start_names_its_last_log_line(tmp_path):
    dies = LISTENING_SERVER.replace(
        "s = socket.socket(); s.bind((args.host, args.port)); s.listen()",
        "raise AssertionError('Torch not compiled with CUDA enabled')",
    )
    layer = _layer(tmp_path / "layer", dies)
    with pytest.raises(PatchToolError, match=r"^lmcache 0\.4\.4: its server exited: Assert"):
        start(Path(sys.executable), layer, tmp_path / "logs", "0.4.4")
    assert (
        "Torch not compiled with CUDA"
        in (tmp_path / "logs" / "lmcache-server-0.4.4.log").read_text()
    )


def test_a_release_without_the_server_module_says_so(tmp_path):
    layer = tmp_path / "layer"
    (layer / "lmcache").mkdir(parents=True)
    (layer / "lmcache" / "__init__.py").write_text("")
    assert server_flags(Path(sys.executable), layer) == (
        "it has no multiprocess server (lmcache.v1.multiprocess.server is missing)"
    )
