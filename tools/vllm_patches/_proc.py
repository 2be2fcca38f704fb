"""The only place that starts subprocesses, and the project's logger."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_patches.errors import PatchToolError

logger = logging.getLogger("vllm_patches")


def run_subprocess(
    cmd: Sequence[str | os.PathLike[str]],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    check: bool = True,
    what: str | None = None,
    timeout: float | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess[Any]:
    """Run ``cmd`` with captured text output.

    :param cmd: argv list, never a shell string.
    :param cwd: working directory.
    :param env: extra environment variables laid over ``os.environ``.
    :param check: raise :class:`PatchToolError` on a non-zero exit.
    :param what: what the command does, for the error message.
    :param timeout: seconds to wait; past them the command is killed and this is an error.
    :param text: decode the output; ``False`` keeps stdout as bytes.
    :returns: the completed process.
    """
    argv = [str(c) for c in cmd]
    full_env = {**os.environ, **env} if env else None
    try:
        proc = subprocess.run(
            argv, cwd=cwd, env=full_env, capture_output=True, text=text, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        msg = (
            f"{what or ' '.join(argv)} did not finish in {timeout:g} s and was stopped; "
            "check that it runs by hand, then run the command again"
        )
        raise PatchToolError(msg) from None
    except FileNotFoundError:
        msg = (
            f"{argv[0]} does not exist; give the path of a program that does"
            if os.sep in argv[0]
            else f"{argv[0]} is not installed or not on PATH; install it and run the command again"
        )
        raise PatchToolError(msg) from None
    except OSError as exc:
        msg = f"cannot run {argv[0]} ({exc.strerror}); give a program that runs here"
        raise PatchToolError(msg) from None
    if check and proc.returncode != 0:
        logger.debug("command failed: %s\n%s\n%s", argv, proc.stdout, proc.stderr)
        out, err = (s if text else s.decode(errors="replace") for s in (proc.stdout, proc.stderr))
        tail = (err.strip() or out.strip()).splitlines()[-5:]
        msg = f"{what or ' '.join(argv[:3])} failed (exit {proc.returncode}): " + " | ".join(tail)
        raise PatchToolError(msg)
    return proc


@contextlib.contextmanager
def stopped_on_signals() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while inside, so that ``finally`` blocks run."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
