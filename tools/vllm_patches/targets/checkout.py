"""A vLLM git checkout: the series goes on a branch of its own with ``git am -3``."""

from __future__ import annotations

from pathlib import Path

from vllm_patches._git import GIT_IDENTITY, current_ref, git_ok, run_git, tracked_changes
from vllm_patches.errors import PatchToolError
from vllm_patches.series.manifest import Release
from vllm_patches.targets.base import Outcome, Place

BASE_KEY = "vllm-lmcache-mp-from"
"""``git config branch.<series branch>.<BASE_KEY>``: the ref the user was on before."""


def identity_env(root: Path) -> dict[str, str]:
    """A committer for ``git am`` when the checkout has none configured."""
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


def _am_in_progress(root: Path) -> bool:
    # A relative answer is relative to root; joining keeps an absolute one as it is.
    return (root / run_git(["rev-parse", "--git-path", "rebase-apply"], root).strip()).exists()


class GitCheckout(Place):
    """Apply makes branch ``vllm-lmcache-mp/vX`` from where the user is; revert goes back."""

    def force_goes_on(self, *, revert: bool) -> bool:
        return True  # git am -3 merges the series with the local change, on a branch

    def _origin(self, branch: str) -> str:
        return run_git(["config", f"branch.{branch}.{BASE_KEY}"], self.root, check=False).strip()

    def _undo(self, branch: str, origin: str) -> None:
        """Abort a ``git am`` of the series, go back to ``origin`` and delete the series branch.

        The tree was clean before the series (dirty trees are refused), so what is left is
        the series' own.
        """
        if _am_in_progress(self.root):
            run_git(["am", "--abort"], self.root, env=identity_env(self.root))
        run_git(["switch", "-q", origin], self.root)
        run_git(["branch", "-D", "-q", branch], self.root)

    def preflight_apply(self, release: Release) -> None:
        _refuse_dirty(self.root)
        branch = release.branch
        if git_ok(["rev-parse", "--verify", "-q", f"refs/heads/{branch}"], self.root):
            msg = (
                f"branch {branch} already exists in {self.root}; switch to it, or delete it "
                "to start again"
            )
            raise PatchToolError(msg)

    def apply(self, release: Release) -> Outcome:
        root = self.root
        self.preflight_apply(release)
        branch = release.branch
        origin = current_ref(root)
        run_git(["switch", "-q", "-c", branch], root)
        # Recorded first, so that the next command can take back an apply that was killed.
        run_git(["config", f"branch.{branch}.{BASE_KEY}", origin], root)
        patches = [str(p) for p in release.patch_files]
        try:
            run_git(["am", "-q", "-3", "--keep-non-patch", *patches], root, env=identity_env(root))
        except PatchToolError as exc:
            self._undo(branch, origin)
            msg = (
                f"the series for vLLM {release.version} does not apply to {root} ({exc}); "
                "nothing was changed"
            )
            raise PatchToolError(msg) from None
        except BaseException:
            self._undo(branch, origin)  # Ctrl-C, SIGTERM: back where the user was
            raise
        return Outcome(True, f"applied {len(patches)} patches to {root} on branch {branch}")

    def preflight_revert(self, release: Release) -> str:
        """The ref to switch back to, once every check has passed."""
        branch = release.branch
        if current_ref(self.root) != branch:
            msg = f"{self.root} is not on the series branch {branch}; nothing to revert there"
            raise PatchToolError(msg)
        _refuse_dirty(self.root)
        origin = self._origin(branch)
        if not origin:
            msg = (
                f"branch {branch} was not made by vllm-patches apply; switch back and delete it "
                "by hand"
            )
            raise PatchToolError(msg)
        return origin

    def revert(self, release: Release) -> Outcome:
        origin = self.preflight_revert(release)
        branch = release.branch
        run_git(["switch", "-q", origin], self.root)
        run_git(["branch", "-D", "-q", branch], self.root)
        return Outcome(True, f"switched {self.root} back to {origin} and deleted {branch}")

    def recover(self, release: Release, *, check: bool) -> str:
        """Take back an apply that was killed part way (``git am`` in progress or unfinished)."""
        root = self.root
        branch = release.branch
        origin = self._origin(branch) if current_ref(root) == branch else ""
        if not origin:
            return ""
        made = run_git(["rev-list", "--count", f"{origin}..{branch}"], root).strip()
        if not _am_in_progress(root) and int(made) == len(release.patch_files):
            return ""
        if check:
            msg = (
                f"{root} holds a vllm-patches apply that was interrupted ({made} of "
                f"{len(release.patch_files)} patches); run the command without --check to "
                "take it back"
            )
            raise PatchToolError(msg)
        self._undo(branch, origin)
        return f"took back an interrupted apply in {root} (back on {origin}, {branch} deleted); "
