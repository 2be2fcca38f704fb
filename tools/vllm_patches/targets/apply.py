"""Put the series onto a target, tell whether it is there, and take it off again.

Every operation checks everything first and changes nothing when a check fails. Each kind
of target is a :class:`~vllm_patches.targets.base.Place`; :func:`place_for` is the one
place that picks the implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from packaging.version import Version

from vllm_patches.errors import PatchToolError
from vllm_patches.series.manifest import CONNECTOR, FACTORY, Manifest, Release, load_manifest
from vllm_patches.targets.base import Outcome, Place
from vllm_patches.targets.checkout import GitCheckout
from vllm_patches.targets.find import Target
from vllm_patches.targets.installed import InstalledVllm
from vllm_patches.targets.tree import SourceTree

Overall = Literal["unpatched", "patched", "upstream", "modified"]
PLACES: dict[str, type[Place]] = {"git": GitCheckout, "tree": SourceTree, "site": InstalledVllm}


def place_for(target: Target) -> Place:
    """The implementation of the target interface for ``target``'s kind."""
    return PLACES[target.kind](target)


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


def _release(manifest: Manifest, place: Place) -> Release:
    """The target's release, or a clear error for one without a series."""
    target = place.target
    if place.read(CONNECTOR) is None:
        msg = (
            f"vLLM {target.version} at {target.root} has no {CONNECTOR}; the connector first "
            "shipped in vLLM 0.11.1 and the series starts at 0.12.0"
        )
        raise PatchToolError(msg)
    if target.version not in manifest.releases and Version(target.version) > max(
        map(Version, manifest.releases)
    ):
        files = {path: place.read(path) for path in (CONNECTOR, FACTORY)}
        same = manifest.same_files(files)
        if same is not None:
            msg = (
                f"vLLM {target.version} has no series yet, but its {CONNECTOR} and "
                f"{FACTORY} are byte for byte vLLM {same.version}'s: apply that series with "
                f"--vllm-version {same.version}"
            )
            raise PatchToolError(msg)
    return manifest.release(target.version)


def _overall(states: set[str], release: Release) -> Overall:
    if not states:
        return "upstream" if release.upstream else "patched"
    if states == {"unpatched"}:
        return "unpatched"
    if states == {"patched"}:
        return "patched"
    return "modified"


def status(target: Target, manifest: Manifest | None = None) -> Status:
    """Classify ``target``: unpatched, patched, upstream (the release has the whole series) or
    modified."""
    place = place_for(target)
    return _status(place, _release(manifest or load_manifest(), place))


def _status(place: Place, release: Release) -> Status:
    result = Status(place.target, "unpatched", release)
    result.patches = dict.fromkeys(release.upstream, "upstream")
    for group in place.groups(release):
        state, count = group.state(place.read(group.path))
        result.files[group.path] = state
        for index, number in enumerate(group.numbers):
            result.patches[number] = "applied" if index < count else "missing"
    result.overall = _overall(set(result.files.values()), release)
    return result


def _refuse_modified(place: Place, st: Status, *, revert: bool, force: bool) -> None:
    bad = [p for p, s in st.files.items() if s not in ("unpatched", "patched")]
    forceable = place.force_goes_on(revert=revert)
    if not bad or (force and forceable):
        return
    advice = (
        "restore it, or pass --force to try anyway"
        if forceable
        else "restore it (the series replaces whole files here, so --force cannot help)"
    )
    msg = (
        f"{st.target.root / bad[0]} matches neither vLLM {st.target.version}'s original nor "
        f"the patched file (local changes?); {advice}"
    )
    raise PatchToolError(msg)


def recover(target: Target) -> str:
    """Roll back what an interrupted run left on ``target``; say what ('' when nothing)."""
    place = place_for(target)
    release = _release(load_manifest(), place)
    return place.recover(release, check=False) if release.groups else ""


def apply(
    target: Target, *, check: bool = False, revert: bool = False, force: bool = False
) -> Outcome:
    """Apply (or with ``revert`` remove) the series; ``check`` only says what would happen.

    A run that was interrupted before (a journal, a ``git am`` left half-done, an empty
    backup directory) is rolled back first, and the outcome says so.

    :raises PatchToolError: when the target cannot take the change; nothing is changed then.
    """
    place = place_for(target)
    release = _release(load_manifest(), place)
    recovered = place.recover(release, check=check) if release.groups else ""
    st = _status(place, release)
    if not release.groups:
        outcome = Outcome(
            False, f"vLLM {target.version} already contains the series: nothing to do"
        )
    else:
        outcome = _change(place, st, revert=revert, check=check, force=force)
    if recovered:
        return Outcome(outcome.changed or not check, recovered + outcome.message)
    return outcome


def _change(place: Place, st: Status, *, revert: bool, check: bool, force: bool) -> Outcome:
    """Apply or revert on ``place`` after the checks both share; ``check`` stops at preflight."""
    what = place.target.describe()
    done, nothing, ready = (
        ("unpatched", "is not patched: nothing to revert", "can be reverted from")
        if revert
        else ("patched", "is already patched: nothing to do", "applies cleanly to")
    )
    if st.overall == done:
        return Outcome(False, f"{what} {nothing}")
    _refuse_modified(place, st, revert=revert, force=force)
    if check:
        (place.preflight_revert if revert else place.preflight_apply)(st.release)
        return Outcome(False, f"the series {ready} {what}")
    return (place.revert if revert else place.apply)(st.release)
