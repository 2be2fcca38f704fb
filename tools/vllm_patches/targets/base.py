"""The one interface every kind of target implements, and what its operations return."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from vllm_patches.series.manifest import Group, Release
from vllm_patches.targets.find import Target


@dataclass(frozen=True)
class Outcome:
    """What an operation did, in one line for the user."""

    changed: bool
    message: str


class Place(ABC):
    """A target the series can be put on and taken off again.

    Every ``preflight_*`` checks what its operation needs and raises a one-line error,
    changing nothing; the operation runs its preflight first. ``recover`` takes back what an
    interrupted run left, and says what it did ('' when nothing was left).
    """

    def __init__(self, target: Target) -> None:
        self.target = target

    @property
    def root(self) -> Path:
        return self.target.root

    def groups(self, release: Release) -> list[Group]:
        """The groups of ``release`` this kind of target carries."""
        return list(release.groups)

    def force_goes_on(self, *, revert: bool) -> bool:
        """Whether ``--force`` lets the operation go on over a file that is neither vLLM's
        original nor the patched one. Not where the series replaces whole files: the local
        change would be lost."""
        return False

    def read(self, path: str) -> bytes | None:
        file = self.root / path
        return file.read_bytes() if file.is_file() else None

    @abstractmethod
    def preflight_apply(self, release: Release) -> object: ...

    @abstractmethod
    def apply(self, release: Release) -> Outcome: ...

    @abstractmethod
    def preflight_revert(self, release: Release) -> object: ...

    @abstractmethod
    def revert(self, release: Release) -> Outcome: ...

    @abstractmethod
    def recover(self, release: Release, *, check: bool) -> str: ...
