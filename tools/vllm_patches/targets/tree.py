"""A plain vLLM source tree (an unpacked sdist): files written under a journal."""

from __future__ import annotations

from pathlib import Path

from vllm_patches import _journal as journal
from vllm_patches.series.manifest import Release
from vllm_patches.targets.base import Outcome, Place
from vllm_patches.targets.files import check_writable, journal_of, plan, recover_journal


class SourceTree(Place):
    """Apply and revert rewrite the files in one journaled change."""

    def _preflight(self, release: Release, *, reverse: bool) -> dict[Path, bytes | None]:
        # A plain tree may hold one file already as wanted: the others still go.
        files = plan(self, release, reverse=reverse, skip_done=True)
        check_writable({p.parent for p in files}, "make the tree writable first")
        return files

    def preflight_apply(self, release: Release) -> dict[Path, bytes | None]:
        return self._preflight(release, reverse=False)

    def preflight_revert(self, release: Release) -> dict[Path, bytes | None]:
        return self._preflight(release, reverse=True)

    def _change(self, release: Release, *, reverse: bool) -> Outcome:
        files = self._preflight(release, reverse=reverse)
        what = "a revert of the series" if reverse else "an apply of the series"
        journal.change(journal_of(self.target), self.root, files, what)
        verb = "reverted" if reverse else "applied"
        return Outcome(True, f"{verb} the series of vLLM {release.version} in {self.root}")

    def apply(self, release: Release) -> Outcome:
        return self._change(release, reverse=False)

    def revert(self, release: Release) -> Outcome:
        return self._change(release, reverse=True)

    def recover(self, release: Release, *, check: bool) -> str:
        return recover_journal(self.target, check=check)
