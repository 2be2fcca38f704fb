"""Real LMCache multiprocess servers on loopback, one per lmcache release, always stopped."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_patches._proc import logger, run_subprocess
from vllm_patches.errors import PatchToolError

SERVER_MODULE = "lmcache.v1.multiprocess.server"
"""The multiprocess server's entry point (lmcache 0.3.10 and later; 0.3.9.post2 has none)."""
START_SECONDS = 90.0
# Flags given where the release's server has them: a small L1 cache (5-10 s start-up on a
# CPU), an eviction policy (0.5.6 refuses to start without one), no metrics endpoint (it
# would listen on every interface, port 9090).
_OPTIONAL_FLAGS = (
    ("--l1-size-gb", "0.2"),
    ("--eviction-policy", "LRU"),
    ("--disable-metrics", None),
    ("--cpu-buffer-size", "0.2"),
    # Serve the transfer a CPU worker registers with (lmcache 0.4.6 serves only one mode, the
    # GPU one unless told; 0.5.4 and later default to the GPU one): otherwise a CPU worker's
    # registration waits for a reply that never comes.
    ("--transfer-mode", "non_gpu"),
    ("--supported-transfer-mode", "auto"),
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _env(layer: Path | None) -> dict[str, str]:
    env = {"LMCACHE_LOG_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore"}
    if layer is not None:
        env["PYTHONPATH"] = str(layer)
    return env


def server_flags(python: Path, layer: Path | None) -> list[str] | str:
    """The flags this release's server takes (``--help`` read once, cached in the layer).

    :returns: the flags, or why the release has no server that can run here.
    """
    cache = layer / ".server-flags.json" if layer is not None else None
    if cache is not None and cache.is_file():
        return json.loads(cache.read_text())
    proc = run_subprocess(
        [python, "-m", SERVER_MODULE, "--help"], env=_env(layer), check=False, timeout=120
    )
    found: list[str] | str
    if proc.returncode == 0:
        found = sorted(set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", proc.stdout)))
    elif "No module named" in proc.stderr and SERVER_MODULE in proc.stderr:
        found = f"it has no multiprocess server ({SERVER_MODULE} is missing)"
    else:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        found = f"its server does not start here: {lines[-1] if lines else proc.returncode}"
    if cache is not None:
        cache.write_text(json.dumps(found))
    return found


@dataclass
class Server:
    """One running server: its URL (``tcp://127.0.0.1:PORT``) and its log file."""

    url: str
    log: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    def stop(self) -> None:
        """Stop the server and everything it started (its process group)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _log_tail(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def start(python: Path, layer: Path | None, log_dir: Path, name: str) -> Server:
    """Start the lmcache server of ``layer`` (or of ``python``'s own lmcache) on loopback.

    :raises PatchToolError: the release has no server, or it did not listen in time.
    """
    flags = server_flags(python, layer)
    if isinstance(flags, str):
        msg = f"lmcache {name}: {flags}"
        raise PatchToolError(msg)
    port = free_port()
    argv = [str(python), "-m", SERVER_MODULE, "--host", "127.0.0.1", "--port", str(port)]
    for flag, value in _OPTIONAL_FLAGS:
        if flag in flags:
            argv += [flag] if value is None else [flag, value]
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"lmcache-server-{re.sub(r'[^A-Za-z0-9.]+', '-', name).strip('-')}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **_env(layer)},
            start_new_session=True,
        )
    server = Server(f"tcp://127.0.0.1:{port}", log, process)
    deadline = time.monotonic() + START_SECONDS
    try:
        while not _listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                how = "exited" if process.returncode else f"did not listen in {START_SECONDS:.0f} s"
                msg = f"lmcache {name}: its server {how}: {_log_tail(log)}"
                raise PatchToolError(msg)
            time.sleep(0.2)
    except BaseException:  # a timeout, Ctrl-C or SIGTERM while it starts: no orphan
        server.stop()
        raise
    logger.info("lmcache %s server on %s (log %s)", name, server.url, log)
    return server


class ServerPool:
    """Servers by lmcache release, started on first use, all stopped on :meth:`close`.

    A release whose server cannot start is remembered with the reason, not retried.
    """

    def __init__(self, log_dir: Path | None = None) -> None:
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="vllm-patches-servers-"))
        self.servers: dict[str, Server] = {}
        self.failures: dict[str, str] = {}

    def get(self, python: Path, layer: Path | None, name: str) -> Server | str:
        """The running server of lmcache ``name``, or why there is none."""
        if name in self.failures:
            return self.failures[name]
        if name not in self.servers:
            try:
                self.servers[name] = start(python, layer, self.log_dir, name)
            except PatchToolError as exc:
                self.failures[name] = str(exc)
                return self.failures[name]
        return self.servers[name]

    def close(self) -> None:
        """Stop every server."""
        for server in self.servers.values():
            server.stop()
        self.servers.clear()

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
