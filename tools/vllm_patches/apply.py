"""Put the series onto a target, tell whether it is there, and take it off again.

Every operation checks everything first and changes nothing when a check fails.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vllm_patches import _journal as journal
from vllm_patches._git import GIT_IDENTITY, current_ref, git_ok, run_git, tracked_changes
from vllm_patches._journal import JOURNAL_NAME
from vllm_patches._record import rewrite_record
from vllm_patches.errors import PatchToolError
from vllm_patches.overlay import apply_to_bytes
from vllm_patches.series import (
    CONNECTOR,
    PATCHES_DIR,
    Group,
    Manifest,
    Release,
    load_manifest,
)
from vllm_patches.targets import Target

Overall = Literal["unpatched", "patched", "upstream", "modified"]
BACKUP_DIR = "vllm_lmcache_mp"
BASE_KEY = "vllm-lmcache-mp-from"


@dataclass
class Status:
    """Where a target stands with respect to its release's series."""

    target: Target
    overall: Overall
    release: Release
    patches: dict[str, str] = field(default_factory=dict)
    """Per patch number: ``applied``, ``missing`` or ``upstream``."""
    files: dict[str, str] = field(default_factory=dict)
    """Per file: ``unpatched``, ``patched``, ``partial`` or ``modified``."""

    def as_dict(self) -> dict:
        """What ``status --json`` prints."""
        return {
            "overall": self.overall,
            "kind": self.target.kind,
            "root": str(self.target.root),
            "vllm": self.target.version,
            "patches": dict(sorted(self.patches.items())),
            "files": self.files,
        }

    def lines(self) -> list[str]:
        detail = ", ".join(f"{n} {s}" for n, s in sorted(self.patches.items()))
        return [self.overall, f"{self.target.describe()}: {detail or 'no patches'}"]


def _groups(release: Release, target: Target) -> list[Group]:
    return [g for g in release.groups if target.kind != "site" or g.installed]


def _read(target: Target, path: str) -> bytes | None:
    file = target.root / path
    return file.read_bytes() if file.is_file() else None


def _release(manifest: Manifest, target: Target) -> Release:
    """The target's release, or a clear error for one without a series."""
    if _read(target, CONNECTOR) is None:
        msg = (
            f"vLLM {target.version} at {target.root} has no {CONNECTOR}; the connector first "
            "shipped in vLLM 0.11.1 and the series starts at 0.12.0"
        )
        raise PatchToolError(msg)
    return manifest.release(target.version)


def status(target: Target, manifest: Manifest | None = None) -> Status:
    """Classify ``target``: unpatched, patched, upstream (the release has the whole series) or
    modified."""
    manifest = manifest or load_manifest()
    release = _release(manifest, target)
    result = Status(target, "unpatched", release)
    result.patches = dict.fromkeys(release.upstream, "upstream")
    for group in _groups(release, target):
        state, count = group.state(_read(target, group.path))
        result.files[group.path] = state
        for index, number in enumerate(group.numbers):
            result.patches[number] = "applied" if index < count else "missing"
    states = set(result.files.values())
    if not states:
        result.overall = "upstream" if release.upstream else "patched"
    elif states == {"unpatched"}:
        result.overall = "unpatched"
    elif states == {"patched"}:
        result.overall = "patched"
    else:
        result.overall = "modified"
    return result


def _refuse_modified(st: Status, force: bool) -> None:
    bad = [p for p, s in st.files.items() if s not in ("unpatched", "patched")]
    if bad and not force:
        msg = (
            f"{st.target.root / bad[0]} matches neither vLLM {st.target.version}'s original nor "
            "the patched file (local changes?); restore it, or pass --force to try anyway"
        )
        raise PatchToolError(msg)


@dataclass(frozen=True)
class Outcome:
    """What an operation did, in one line for the user."""

    changed: bool
    message: str


# --- git checkouts ----------------------------------------------------------------------------


def _identity_env(root: Path) -> dict[str, str]:
    if git_ok(["config", "user.email"], root):
        return {}
    return GIT_IDENTITY


def _refuse_dirty(root: Path) -> None:
    """Uncommitted changes are the user's: no flag lets a command switch branches over them."""
    dirty = tracked_changes(root)
    if dirty:
        msg = (
            f"{root} has uncommitted changes ({', '.join(dirty[:3])}); commit or stash them "
            "first (--force does not override this: nothing was changed)"
        )
        raise PatchToolError(msg)


def _preflight_apply_git(target: Target, release: Release) -> None:
    root = target.root
    _refuse_dirty(root)
    branch = release.branch
    if git_ok(["rev-parse", "--verify", "-q", f"refs/heads/{branch}"], root):
        msg = f"branch {branch} already exists in {root}; switch to it, or delete it to start again"
        raise PatchToolError(msg)


def _apply_git(target: Target, release: Release) -> Outcome:
    root = target.root
    _preflight_apply_git(target, release)
    branch = release.branch
    origin = current_ref(root)
    run_git(["switch", "-q", "-c", branch], root)
    # Recorded first, so that the next command can take back an apply that was killed.
    run_git(["config", f"branch.{branch}.{BASE_KEY}", origin], root)
    patches = [str(p) for p in release.patch_files]
    try:
        run_git(["am", "-q", "-3", "--keep-non-patch", *patches], root, env=_identity_env(root))
    except PatchToolError as exc:
        _undo_git_apply(root, branch, origin)
        msg = (
            f"the series for vLLM {release.version} does not apply to {root} ({exc}); "
            "nothing was changed"
        )
        raise PatchToolError(msg) from None
    except BaseException:
        _undo_git_apply(root, branch, origin)  # Ctrl-C, SIGTERM: back where the user was
        raise
    return Outcome(True, f"applied {len(patches)} patches to {root} on branch {branch}")


def _am_in_progress(root: Path) -> bool:
    # A relative answer is relative to root; joining keeps an absolute one as it is.
    return (root / run_git(["rev-parse", "--git-path", "rebase-apply"], root).strip()).exists()


def _undo_git_apply(root: Path, branch: str, origin: str) -> None:
    """Abort a ``git am`` of the series, go back to ``origin`` and delete the series branch.

    The tree was clean before the series (dirty trees are refused), so what is left is the
    series' own.
    """
    if _am_in_progress(root):
        run_git(["am", "--abort"], root, env=_identity_env(root))
    run_git(["switch", "-q", origin], root)
    run_git(["branch", "-D", "-q", branch], root)


def _recover_git(target: Target, release: Release, *, check: bool) -> str:
    """Take back an apply that was killed part way (``git am`` in progress or unfinished)."""
    root = target.root
    branch = release.branch
    if current_ref(root) != branch:
        return ""
    origin = run_git(["config", f"branch.{branch}.{BASE_KEY}"], root, check=False).strip()
    if not origin:
        return ""
    made = run_git(["rev-list", "--count", f"{origin}..{branch}"], root).strip()
    if not _am_in_progress(root) and int(made) == len(release.patch_files):
        return ""
    if check:
        msg = (
            f"{root} holds an apply-patches run that was interrupted ({made} of "
            f"{len(release.patch_files)} patches); run the command without --check to take it back"
        )
        raise PatchToolError(msg)
    _undo_git_apply(root, branch, origin)
    return f"took back an interrupted apply in {root} (back on {origin}, {branch} deleted); "


def recover(target: Target) -> str:
    """Roll back what an interrupted run left on ``target``; say what ('' when nothing)."""
    manifest = load_manifest()
    release = _release(manifest, target)
    return _recover(target, release, check=False) if release.groups else ""


def _recover(target: Target, release: Release, *, check: bool) -> str:
    """Finish off what an interrupted run left; say what was done ('' when nothing was)."""
    if target.kind == "git":
        return _recover_git(target, release, check=check)
    found = journal_of(target)
    if not found.is_file():
        return _sweep_empty_backup(target, check=check)
    if check:
        msg = (
            f"{target.describe()} holds a change that was interrupted ({found}); run the "
            "command without --check to roll it back"
        )
        raise PatchToolError(msg)
    what = journal.roll_back(found, target.root)
    return f"rolled back {what} that was interrupted in {target.root}; " + _sweep_empty_backup(
        target, check=check
    )


def _sweep_empty_backup(target: Target, *, check: bool) -> str:
    """A backup directory without a file in it is what an interrupted revert leaves."""
    if target.dist_info is None:
        return ""
    backup = target.dist_info / BACKUP_DIR
    if not backup.is_dir() or any(p.is_file() for p in backup.rglob("*")):
        return ""
    if check:
        return f"the empty {backup} will be removed; "
    shutil.rmtree(backup)
    return f"removed the empty {backup}; "


def _preflight_revert_git(target: Target, release: Release) -> str:
    """The ref to switch back to, once every check has passed."""
    root = target.root
    branch = release.branch
    if current_ref(root) != branch:
        msg = f"{root} is not on the series branch {branch}; nothing to revert there"
        raise PatchToolError(msg)
    _refuse_dirty(root)
    origin = run_git(["config", f"branch.{branch}.{BASE_KEY}"], root, check=False).strip()
    if not origin:
        msg = f"branch {branch} was not made by apply-patches; switch back and delete it by hand"
        raise PatchToolError(msg)
    return origin


def _revert_git(target: Target, release: Release) -> Outcome:
    root = target.root
    branch = release.branch
    origin = _preflight_revert_git(target, release)
    run_git(["switch", "-q", origin], root)
    run_git(["branch", "-D", "-q", branch], root)
    return Outcome(True, f"switched {root} back to {origin} and deleted {branch}")


# --- plain trees and installed vLLM: file transactions -----------------------------------------


def _transform(group: Group, data: bytes | None, *, reverse: bool) -> bytes | None:
    patches = [PATCHES_DIR / p for p in group.patches]
    if reverse:
        patches.reverse()
    return apply_to_bytes(group.path, data, patches, reverse=reverse)[-1]


def _check_writable(dirs: set[Path], what: str) -> None:
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


def _plan(target: Target, release: Release, *, reverse: bool) -> dict[Path, bytes | None]:
    plan: dict[Path, bytes | None] = {}
    done = "unpatched" if reverse else "patched"
    for group in _groups(release, target):
        data = _read(target, group.path)
        # A plain tree may hold one file already as wanted (restored by hand, say): the
        # others still go. Installed targets keep their backups whole, so never mix there.
        if target.kind == "tree" and group.state(data)[0] == done:
            continue
        try:
            plan[target.root / group.path] = _transform(group, data, reverse=reverse)
        except PatchToolError:
            msg = (
                f"the series for vLLM {release.version} does not "
                f"{'come off' if reverse else 'apply to'} {target.root / group.path}; "
                "nothing was changed"
            )
            raise PatchToolError(msg) from None
    return plan


def _preflight_tree(target: Target, release: Release, *, reverse: bool) -> dict:
    plan = _plan(target, release, reverse=reverse)
    _check_writable({p.parent for p in plan}, "make the tree writable first")
    return plan


def journal_of(target: Target) -> Path:
    """Where a change to ``target`` keeps its journal while it runs (for other writers too)."""
    return (target.dist_info or target.root) / JOURNAL_NAME


def _apply_tree(target: Target, release: Release, *, reverse: bool) -> Outcome:
    plan = _preflight_tree(target, release, reverse=reverse)
    verb = "reverted" if reverse else "applied"
    what = "a revert of the series" if reverse else "an apply of the series"
    journal.change(journal_of(target), target.root, plan, what)
    return Outcome(True, f"{verb} the series of vLLM {release.version} in {target.root}")


# --- installed vLLM -----------------------------------------------------------------------------


def _site_rel(target: Target, path: Path) -> str:
    return path.relative_to(target.root).as_posix()


def _preflight_apply_site(target: Target, release: Release) -> dict:
    assert target.dist_info is not None
    backup = target.dist_info / BACKUP_DIR
    if backup.exists() and any(p.is_file() for p in backup.rglob("*")):
        msg = f"{backup} exists from an earlier apply; run apply-patches --revert first"
        raise PatchToolError(msg)
    plan = _plan(target, release, reverse=False)
    _check_writable(
        {p.parent for p in plan} | {target.dist_info}, "patch a vLLM you can write to (a venv)"
    )
    return plan


def _apply_site(target: Target, release: Release) -> Outcome:
    assert target.dist_info is not None
    backup = target.dist_info / BACKUP_DIR
    plan = _preflight_apply_site(target, release)
    record_path = target.dist_info / "RECORD"
    record = record_path.read_bytes()
    state = {
        "release": release.version,
        "files": [_site_rel(target, p) for p in plan],
    }
    writes: dict[Path, bytes | None] = {}
    changes: dict[str, bytes | None] = {}
    for path, data in plan.items():
        original = path.read_bytes()
        saved = backup / "originals" / _site_rel(target, path)
        writes[saved] = original
        writes[path] = data
        changes[_site_rel(target, saved)] = original
        changes[_site_rel(target, path)] = data
    writes[backup / "RECORD.orig"] = record
    writes[backup / "state.json"] = json.dumps(state, indent=2).encode() + b"\n"
    for extra in ("RECORD.orig", "state.json"):
        changes[_site_rel(target, backup / extra)] = writes[backup / extra]
    writes[record_path] = rewrite_record(record, changes)
    _check_writable({p.parent for p in writes}, "patch a vLLM you can write to (a venv)")
    journal.change(journal_of(target), target.root, writes, "an apply of the series")
    return Outcome(True, f"applied the series of vLLM {release.version} to {target.root}")


def _revert_site(target: Target) -> Outcome:
    writes = _preflight_revert_site(target)
    assert target.dist_info is not None
    backup = target.dist_info / BACKUP_DIR
    # The backup's files go in the same change; only empty directories are left to remove.
    writes.update({p: None for p in backup.rglob("*") if p.is_file()})
    journal.change(journal_of(target), target.root, writes, "a revert of the series")
    shutil.rmtree(backup)
    return Outcome(True, f"restored the original files of vLLM {target.version} in {target.root}")


def _preflight_revert_site(target: Target) -> dict[Path, bytes | None]:
    """What reverting writes, once every check has passed."""
    assert target.dist_info is not None
    backup = target.dist_info / BACKUP_DIR
    state_file = backup / "state.json"
    if not state_file.is_file():
        msg = f"{target.dist_info} has no backup from apply-patches; nothing to revert"
        raise PatchToolError(msg)
    state = json.loads(state_file.read_text())
    writes: dict[Path, bytes | None] = {}
    for rel in state["files"]:
        saved = backup / "originals" / rel
        if not saved.is_file():
            msg = f"the backup {saved} is missing; reinstall vLLM to get the original back"
            raise PatchToolError(msg)
        writes[target.root / rel] = saved.read_bytes()
    writes[target.dist_info / "RECORD"] = (backup / "RECORD.orig").read_bytes()
    _check_writable({p.parent for p in writes} | {backup}, "revert as a user who can write there")
    return writes


_PREFLIGHT_APPLY: dict[str, Callable[[Target, Release], object]] = {
    "git": _preflight_apply_git,
    "tree": lambda target, release: _preflight_tree(target, release, reverse=False),
    "site": _preflight_apply_site,
}
"""What each kind checks before applying; ``--check`` runs the same."""
_PREFLIGHT_REVERT: dict[str, Callable[[Target, Release], object]] = {
    "git": _preflight_revert_git,
    "tree": lambda target, release: _preflight_tree(target, release, reverse=True),
    "site": lambda target, _release: _preflight_revert_site(target),
}


# --- entry points -------------------------------------------------------------------------------


def apply(
    target: Target, *, check: bool = False, revert: bool = False, force: bool = False
) -> Outcome:
    """Apply (or with ``revert`` remove) the series; ``check`` only says what would happen.

    A run that was interrupted before (a journal, a ``git am`` left half-done, an empty
    backup directory) is rolled back first, and the outcome says so.

    :raises PatchToolError: when the target cannot take the change; nothing is changed then.
    """
    manifest = load_manifest()
    release = _release(manifest, target)
    recovered = _recover(target, release, check=check) if release.groups else ""
    outcome = _apply(target, manifest, check=check, revert=revert, force=force)
    if recovered:
        return Outcome(outcome.changed or not check, recovered + outcome.message)
    return outcome


def _apply(
    target: Target, manifest: Manifest, *, check: bool, revert: bool, force: bool
) -> Outcome:
    st = status(target, manifest)
    release = st.release
    if not release.groups:
        return Outcome(False, f"vLLM {target.version} already contains the series: nothing to do")
    if revert:
        return _revert(target, release, st, check=check, force=force)
    if st.overall == "patched":
        return Outcome(False, f"{target.describe()} is already patched: nothing to do")
    _refuse_modified(st, force)
    if check:
        _PREFLIGHT_APPLY[target.kind](target, release)
        return Outcome(False, f"the series applies cleanly to {target.describe()}")
    if target.kind == "git":
        return _apply_git(target, release)
    if target.kind == "tree":
        return _apply_tree(target, release, reverse=False)
    return _apply_site(target, release)


def _revert(target: Target, release: Release, st: Status, *, check: bool, force: bool) -> Outcome:
    if st.overall == "unpatched":
        return Outcome(False, f"{target.describe()} is not patched: nothing to revert")
    _refuse_modified(st, force)
    if check:
        _PREFLIGHT_REVERT[target.kind](target, release)
        return Outcome(False, f"the series can be reverted from {target.describe()}")
    if target.kind == "git":
        return _revert_git(target, release)
    if target.kind == "site":
        return _revert_site(target)
    return _apply_tree(target, release, reverse=True)
