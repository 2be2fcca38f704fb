"""The server pool's life cycle: loopback only, a free port, always stopped, reasons kept.

These use a stand-in ``lmcache.v1.multiprocess.server`` (``programs/lmcache_server_stand_in.py``,
which listens on the port it is given) so that they run in a second; the real servers are in
test_live.py and test_engine_loop.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest
from vllm_patches.diagnosis import servers
from vllm_patches.diagnosis.servers import ServerPool, free_port, server_flags, start
from vllm_patches.errors import PatchToolError

STAND_IN = Path(__file__).parent / "programs" / "lmcache_server_stand_in.py"


def _layer(root: Path) -> Path:
    package = root / "lmcache" / "v1" / "multiprocess"
    package.mkdir(parents=True)
    for directory in (root / "lmcache", root / "lmcache" / "v1", package):
        (directory / "__init__.py").write_text("")
    shutil.copyfile(STAND_IN, package / "server.py")
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
    layer = _layer(tmp_path / "layer")
    flags = server_flags(Path(sys.executable), layer)
    assert {"--host", "--port", "--l1-size-gb", "--eviction-policy"} <= set(flags)
    assert "--disable-metrics" not in flags
    assert (layer / ".server-flags.json").is_file()


def test_a_server_starts_on_loopback_and_is_stopped(tmp_path):
    layer = _layer(tmp_path / "layer")
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


def test_a_release_without_a_runnable_server_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_SERVER", "no-cuda")
    layer = _layer(tmp_path / "layer")
    with ServerPool(tmp_path / "logs") as pool:
        why = pool.get(Path(sys.executable), layer, "0.3.10")
        assert why == (
            "lmcache 0.3.10: its server does not start here: "
            "ImportError: libcudart.so.12: cannot open"
        )
        assert pool.failures == {"0.3.10": why}


def test_a_server_that_exits_at_start_names_its_last_log_line(tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_SERVER", "dies")
    layer = _layer(tmp_path / "layer")
    with pytest.raises(PatchToolError, match=r"^lmcache 0\.4\.4: its server exited: Assert"):
        start(Path(sys.executable), layer, tmp_path / "logs", "0.4.4")
    assert (
        "Torch not compiled with CUDA"
        in (tmp_path / "logs" / "lmcache-server-0.4.4.log").read_text()
    )


def test_a_server_interrupted_while_it_starts_is_stopped(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (which the CLI turns into KeyboardInterrupt) before the server listens
    leaves no server behind."""
    monkeypatch.setenv("STAND_IN_SERVER", "deaf")
    layer = _layer(tmp_path / "layer")
    log = tmp_path / "logs" / "lmcache-server-0.5.6.log"

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 3.0)
        with pytest.raises(KeyboardInterrupt):
            start(Path(sys.executable), layer, tmp_path / "logs", "0.5.6")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    pid = int(log.read_text().split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_server_that_never_listens_is_stopped_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_SERVER", "deaf")
    monkeypatch.setattr(servers, "START_SECONDS", 2.0)
    with pytest.raises(
        PatchToolError, match=r"^lmcache 0\.5\.6: its server did not listen in 2 s: \d+$"
    ):
        start(Path(sys.executable), _layer(tmp_path / "layer"), tmp_path / "logs", "0.5.6")
    pid = int((tmp_path / "logs" / "lmcache-server-0.5.6.log").read_text().split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_release_without_the_server_module_says_so(tmp_path):
    layer = tmp_path / "layer"
    (layer / "lmcache").mkdir(parents=True)
    (layer / "lmcache" / "__init__.py").write_text("")
    assert server_flags(Path(sys.executable), layer) == (
        "it has no multiprocess server (lmcache.v1.multiprocess.server is missing)"
    )
