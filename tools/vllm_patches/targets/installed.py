"""An installed vLLM: files and RECORD rewritten under a journal, originals kept beside."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vllm_patches import _journal as journal
from vllm_patches._record import rewrite_record
from vllm_patches.errors import PatchToolError
from vllm_patches.series.manifest import Group, Release
from vllm_patches.targets.base import Outcome, Place
from vllm_patches.targets.files import check_writable, journal_of, plan, recover_journal

BACKUP_DIR = "vllm_lmcache_mp"
"""Inside ``vllm-X.dist-info``: the originals, the original RECORD and what was changed."""
WRITABLE = "patch a vLLM you can write to (a venv)"


class InstalledVllm(Place):
    """The series' files of the installed package (not its tests), with RECORD kept true."""

    @property
    def dist_info(self) -> Path:
        assert self.target.dist_info is not None
        return self.target.dist_info

    @property
    def backup(self) -> Path:
        return self.dist_info / BACKUP_DIR

    def force_goes_on(self, *, revert: bool) -> bool:
        return revert  # the backup of what apply found is put back whole

    def groups(self, release: Release) -> list[Group]:
        return [g for g in release.groups if g.installed]

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def preflight_apply(self, release: Release) -> dict[Path, bytes | None]:
        if self.backup.exists() and any(p.is_file() for p in self.backup.rglob("*")):
            msg = (
                f"{self.backup} exists from an earlier apply; take that off first with "
                "vllm-patches revert --python PY (the python of this vLLM, or --site)"
            )
            raise PatchToolError(msg)
        files = plan(self, release, reverse=False)
        check_writable({p.parent for p in files} | {self.dist_info}, WRITABLE)
        return files

    def apply(self, release: Release) -> Outcome:
        files = self.preflight_apply(release)
        record_path = self.dist_info / "RECORD"
        record = record_path.read_bytes()
        state = {"release": release.version, "files": [self._rel(p) for p in files]}
        writes: dict[Path, bytes | None] = {}
        for path, data in files.items():
            writes[self.backup / "originals" / self._rel(path)] = path.read_bytes()
            writes[path] = data
        writes[self.backup / "RECORD.orig"] = record
        writes[self.backup / "state.json"] = json.dumps(state, indent=2).encode() + b"\n"
        changes = {self._rel(path): data for path, data in writes.items()}
        writes[record_path] = rewrite_record(record, changes)
        check_writable({p.parent for p in writes}, WRITABLE)
        journal.change(journal_of(self.target), self.root, writes, "an apply of the series")
        return Outcome(True, f"applied the series of vLLM {release.version} to {self.root}")

    def preflight_revert(self, release: Release) -> dict[Path, bytes | None]:
        """What reverting writes, once every check has passed."""
        state_file = self.backup / "state.json"
        if not state_file.is_file():
            msg = f"{self.dist_info} has no backup from vllm-patches apply; nothing to revert"
            raise PatchToolError(msg)
        state = json.loads(state_file.read_text())
        writes: dict[Path, bytes | None] = {}
        for rel in state["files"]:
            saved = self.backup / "originals" / rel
            if not saved.is_file():
                msg = f"the backup {saved} is missing; reinstall vLLM to get the original back"
                raise PatchToolError(msg)
            writes[self.root / rel] = saved.read_bytes()
        writes[self.dist_info / "RECORD"] = (self.backup / "RECORD.orig").read_bytes()
        check_writable(
            {p.parent for p in writes} | {self.backup}, "revert as a user who can write there"
        )
        return writes

    def revert(self, release: Release) -> Outcome:
        writes = self.preflight_revert(release)
        # The backup's files go in the same change; only empty directories are left to remove.
        writes.update({p: None for p in self.backup.rglob("*") if p.is_file()})
        journal.change(journal_of(self.target), self.root, writes, "a revert of the series")
        shutil.rmtree(self.backup)
        version = self.target.version
        return Outcome(True, f"restored the original files of vLLM {version} in {self.root}")

    def recover(self, release: Release, *, check: bool) -> str:
        return recover_journal(self.target, check=check) + self._sweep_empty_backup(check=check)

    def _sweep_empty_backup(self, *, check: bool) -> str:
        """A backup directory without a file in it is what an interrupted revert leaves."""
        backup = self.backup
        if not backup.is_dir() or any(p.is_file() for p in backup.rglob("*")):
            return ""
        if check:
            return f"the empty {backup} will be removed; "
        shutil.rmtree(backup)
        return f"removed the empty {backup}; "
