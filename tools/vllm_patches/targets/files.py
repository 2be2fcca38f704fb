"""File transactions shared by plain trees and installed vLLM: plan, check, journal."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vllm_patches import _journal as journal
from vllm_patches._journal import JOURNAL_NAME
from vllm_patches.errors import PatchToolError
from vllm_patches.series.manifest import PATCHES_DIR, Group, Release
from vllm_patches.series.overlay import apply_to_bytes
from vllm_patches.targets.base import Place
from vllm_patches.targets.find import Target


def journal_of(target: Target) -> Path:
    """Where a change to ``target`` keeps its journal while it runs (for other writers too)."""
    return (target.dist_info or target.root) / JOURNAL_NAME


def check_writable(dirs: set[Path], what: str) -> None:
    """Refuse, naming the first directory (or its nearest existing parent) that is read-only."""
    for directory in sorted(dirs):
        probe_dir = directory
        while not probe_dir.exists():
            probe_dir = probe_dir.parent
        try:
            fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".vllm-patches-probe-")
        except OSError as exc:
            msg = f"{probe_dir} is not writable ({exc.strerror}); {what}"
            raise PatchToolError(msg) from None
        os.close(fd)
        Path(probe).unlink()


def _transform(group: Group, data: bytes | None, *, reverse: bool) -> bytes | None:
    patches = [PATCHES_DIR / p for p in group.patches]
    if reverse:
        patches.reverse()
    return apply_to_bytes(group.path, data, patches, reverse=reverse)[-1]


def plan(
    place: Place, release: Release, *, reverse: bool, skip_done: bool = False
) -> dict[Path, bytes | None]:
    """The new bytes of each file of ``release`` on ``place``.

    With ``skip_done``, a file already as wanted (restored by hand, say) is left out.
    """
    files: dict[Path, bytes | None] = {}
    done = "unpatched" if reverse else "patched"
    for group in place.groups(release):
        data = place.read(group.path)
        if skip_done and group.state(data)[0] == done:
            continue
        try:
            files[place.root / group.path] = _transform(group, data, reverse=reverse)
        except PatchToolError:
            msg = (
                f"the series for vLLM {release.version} does not "
                f"{'come off' if reverse else 'apply to'} {place.root / group.path}; "
                "nothing was changed"
            )
            raise PatchToolError(msg) from None
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
