"""File transactions shared by plain trees and installed vLLM: plan, check, journal; no git."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from vllm_patches import _journal as journal
from vllm_patches._journal import JOURNAL_NAME
from vllm_patches.errors import PatchToolError
from vllm_patches.series.manifest import MANIFEST, PATCHES_DIR, Group, Release, file_sha256
from vllm_patches.series.overlay import apply_to_bytes
from vllm_patches.targets.base import Place
from vllm_patches.targets.find import Target


def journal_of(target: Target) -> Path:
    """Where a change to ``target`` keeps its journal while it runs (for other writers too)."""
    return (target.dist_info or target.root) / JOURNAL_NAME


PROBE_PREFIX = ".vllm-patches-probe-"
"""The name of the file a writability check makes where the file system has no unnamed ones."""


def _probe(directory: Path) -> None:
    """Create a file in ``directory`` and let it go: an unnamed one (``O_TMPFILE``), which a
    crash cannot leave behind, else a named one removed at once."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        fd, name = tempfile.mkstemp(dir=directory, prefix=PROBE_PREFIX)
        Path(name).unlink()
    os.close(fd)


def check_writable(dirs: set[Path], what: str) -> None:
    """Refuse, naming the first directory (or its nearest existing parent) that is read-only.

    A named probe an earlier run left there (killed between creating and removing it) is
    removed first.
    """
    for directory in sorted(dirs):
        probe_dir = directory
        while not probe_dir.exists():
            probe_dir = probe_dir.parent
        try:
            for stale in probe_dir.glob(PROBE_PREFIX + "*"):
                stale.unlink(missing_ok=True)
            _probe(probe_dir)
        except OSError as exc:
            msg = f"{probe_dir} is not writable ({exc.strerror}); {what}"
            raise PatchToolError(msg) from None


def _series_bytes(group: Group, data: bytes | None, *, reverse: bool) -> bytes | None:
    patches = [PATCHES_DIR / p for p in group.patches]
    if reverse:
        return apply_to_bytes(group.path, data, patches[::-1], reverse=True)[-1]
    if group.installed:
        return group.overlay_file.read_bytes()
    return apply_to_bytes(group.path, data, patches)[-1]


def _transform(group: Group, data: bytes | None, *, reverse: bool) -> bytes | None:
    """The file with the series on (with ``reverse``: off), from ``data``, the group's base
    (with ``reverse``: its result); no git is needed.

    The patched bytes are the overlay file the series ships (for vLLM's own files), the rest
    the series' patches applied here; either way they are checked against the manifest.

    :raises PatchToolError: the copy of the series does not give what the manifest records.
    """
    wanted = group.base_sha256 if reverse else group.results[-1]
    try:
        new = _series_bytes(group, data, reverse=reverse)
        good = file_sha256(new) == wanted
    except (PatchToolError, OSError):
        new, good = None, False
    if not good:
        msg = (
            f"the series' files of group {group.name} do not give the sha256 that {MANIFEST} "
            "records (a damaged copy); reinstall vllm-lmcache-mp, or in a clone of it run "
            "vllm-patches overlay --check"
        )
        raise PatchToolError(msg)
    return new


def plan(
    place: Place, release: Release, *, reverse: bool, skip_done: bool = False
) -> dict[Path, bytes | None]:
    """The new bytes of each file of ``release`` on ``place``, each file checked to be exactly
    vLLM's original (with ``reverse``: exactly the patched file).

    With ``skip_done``, a file already as wanted (restored by hand, say) is left out.
    """
    files: dict[Path, bytes | None] = {}
    done, ready = ("unpatched", "patched") if reverse else ("patched", "unpatched")
    for group in place.groups(release):
        data = place.read(group.path)
        state = group.state(data)[0]
        if skip_done and state == done:
            continue
        path = place.root / group.path
        if state != ready:
            msg = (
                f"the series for vLLM {release.version} does not "
                f"{'come off' if reverse else 'apply to'} {path}: it is {state}, not {ready}; "
                "restore vLLM's original files, nothing was changed"
            )
            raise PatchToolError(msg)
        files[path] = _transform(group, data, reverse=reverse)
    return files


def recover_journal(target: Target, *, check: bool) -> str:
    """Roll back a change whose journal is still there; say what ('' when there is none)."""
    found = journal_of(target)
    if not found.is_file():
        return ""
    if check:
        msg = (
            f"{target.describe()} holds a change that was interrupted ({found}); run the "
            "command without --check to roll it back"
        )
        raise PatchToolError(msg)
    what = journal.roll_back(found, target.root)
    return f"rolled back {what} that was interrupted in {target.root}; "
