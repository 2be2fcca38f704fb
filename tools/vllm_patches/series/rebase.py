"""Carry the series onto another vLLM release: replay it with ``git am -3`` and export it.

The replay runs in a work tree of its own (a clone of the pinned checkout), one patch at a
time, so that a patch already in the new base is recognised and dropped, and a conflict
stops with the tree left for the user to resolve. ``patches/``, ``vllm_overlay/`` and the
manifest change only when every patch is in, and are put back if writing them fails.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from packaging.version import Version

from vllm_patches._fs import write_atomic
from vllm_patches._git import (
    GIT_IDENTITY,
    git_ok,
    require_tagged_checkout,
    run_git,
    run_git_unchecked,
    tracked_changes,
)
from vllm_patches._proc import logger
from vllm_patches.errors import PatchToolError, ReportedError
from vllm_patches.series.hooks import run_hooks
from vllm_patches.series.manifest import (
    CONNECTOR,
    MANIFEST,
    OVERLAY_DIR,
    PATCHES_DIR,
    Group,
    Manifest,
    PatchInfo,
    Release,
    branch_name,
    load_manifest,
    sha256_bytes,
)
from vllm_patches.series.overlay import dump_manifest, regenerate
from vllm_patches.sources.releases import cache_root, checkout, parse_version, read_sdist_file

COMMAND = "vllm-patches rebase"
"""How messages name this workflow (its alias rebase-patches takes the same flags)."""
STATE_FILE = "vllm-lmcache-mp-rebase.json"
UPSTREAM_STATUS = re.compile(r"^Upstream-Status: .*$", re.MULTILINE)
LAST_UPDATE = re.compile(r"^Last-Update: .*$", re.MULTILINE)
FORMAT_PATCH = ["format-patch", "-N", "--zero-commit", "--no-signature", "--full-index"]


@dataclass
class RebaseState:
    """A rebase in progress, kept in the work tree's ``.git`` between commands."""

    onto: str
    source: str
    patches: list[str]
    """The source release's series (paths relative to ``patches/``), in apply order."""
    old_tip: str
    """The source series as commits on the source release (for ``git range-diff``)."""
    next: int = 0
    """Index of the next patch to replay."""
    in_base: list[str] = field(default_factory=list)
    """Numbers whose change the new base already has."""
    emptied: list[str] = field(default_factory=list)
    """Numbers the user resolved to nothing."""
    left_out: list[str] = field(default_factory=list)
    """Numbers made only for releases before ``onto`` (``only_before``), not replayed."""

    @staticmethod
    def path(work: Path) -> Path:
        return work / ".git" / STATE_FILE

    def save(self, work: Path) -> None:
        self.path(work).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, work: Path) -> RebaseState:
        return cls(**json.loads(cls.path(work).read_text()))


@dataclass(frozen=True)
class RebaseResult:
    """What a finished rebase wrote."""

    onto: str
    source: str
    carried: list[str]
    in_base: list[str]
    left_out: list[str]
    new_groups: list[str]
    reused_groups: list[str]
    range_diff: str

    def lines(self) -> list[str]:
        """What the rebase did, for people (``git range-diff`` last, as git prints it)."""
        out = [f"carried the vLLM {self.source} series onto vLLM {self.onto}: "
               + " ".join(self.carried)]  # fmt: skip
        if self.in_base:
            out.append(
                f"already in vLLM {self.onto}, dropped from its series: {' '.join(self.in_base)}"
            )
        if self.left_out:
            out.append(
                f"made for releases before vLLM {self.onto} only, left out: "
                + " ".join(self.left_out)
            )
        out.append(f"new groups: {', '.join(self.new_groups) or 'none'}; "
                   f"reused: {', '.join(self.reused_groups) or 'none'}")  # fmt: skip
        out.append(f"git range-diff, vLLM {self.source} series -> vLLM {self.onto} series:")
        out.append(self.range_diff.rstrip("\n"))
        out.append("patches/, patches/series.toml and vllm_overlay/ updated")
        return out


def default_workdir(onto: str) -> Path:
    """Where the rebase onto ``onto`` runs unless told otherwise."""
    return cache_root() / "rebase" / f"v{onto}"


def _number(patch: str) -> str:
    return Path(patch).name[:4]


def _source_release(manifest: Manifest, onto: str, source: str | None) -> Release:
    with_series = sorted(
        (v for v, r in manifest.releases.items() if r.groups and not r.wheel_only), key=Version
    )
    if source is None:
        older = [v for v in with_series if Version(v) < Version(onto)]
        if not older:
            msg = f"no release older than {onto} has a series to carry; pass --from VERSION"
            raise PatchToolError(msg)
        source = older[-1]
    if source not in with_series:
        msg = (
            f"--from {source}: patches/series.toml has no series for vLLM {source} "
            f"(series exist for {with_series[0]} … {with_series[-1]})"
        )
        raise PatchToolError(msg)
    return manifest.releases[source]


def _pinned_checkout(onto: str, user_checkout: Path | None) -> Path:
    if user_checkout is None:
        return checkout(onto)
    return require_tagged_checkout(user_checkout, f"v{onto}")


def start(
    onto: str,
    source: str | None = None,
    *,
    user_checkout: Path | None = None,
    workdir: Path | None = None,
) -> RebaseResult:
    """Replay ``source``'s series onto vLLM ``onto`` and, if nothing conflicts, write it.

    :raises ReportedError: on a conflict or a failing ruff hook, with the work tree left for
        the user.
    """
    parse_version(onto)
    manifest = load_manifest()
    existing = manifest.releases.get(onto)
    if existing is not None and existing.groups:
        msg = (
            f"vLLM {onto} already has a series ({', '.join(g.name for g in existing.groups)}); "
            "nothing to rebase"
        )
        raise PatchToolError(msg)
    release = _source_release(manifest, onto, source)
    work = (workdir or default_workdir(onto)).resolve()
    if RebaseState.path(work).is_file():
        msg = (
            f"a rebase onto {onto} is already in progress in {work}; finish it with "
            f"{COMMAND} --continue, or drop it with {COMMAND} --abort"
        )
        raise PatchToolError(msg)
    if work.exists():
        msg = f"{work} exists and holds no rebase; remove it or pass another --workdir"
        raise PatchToolError(msg)
    pinned = _pinned_checkout(onto, user_checkout)
    if run_git(["cat-file", "-t", f"v{onto}:{CONNECTOR}"], pinned, check=False).strip() != "blob":
        msg = f"vLLM {onto} has no {CONNECTOR}; the series cannot be carried onto it"
        raise PatchToolError(msg)
    old_base = checkout(release.version)
    patches, left_out = [], []
    for path in release.patch_files:
        before = manifest.patches[_number(path.name)].only_before
        if before and Version(onto) >= Version(before):
            left_out.append(_number(path.name))
        else:
            patches.append(str(path.relative_to(PATCHES_DIR)))
    work.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_git(["clone", "-q", "--no-checkout", str(pinned), str(work)], work.parent)
        run_git(["remote", "remove", "origin"], work)
        old_tag = f"v{release.version}"
        refspec = f"refs/tags/{old_tag}:refs/tags/{old_tag}"
        run_git(["fetch", "-q", "--no-tags", str(old_base), refspec], work)
        run_git(["checkout", "-q", "-b", release.branch, old_tag], work)
        run_git(
            ["am", "-q", "-3", "--keep-non-patch", *(str(PATCHES_DIR / p) for p in patches)],
            work,
            env=GIT_IDENTITY,
        )
        old_tip = _head(work)
        run_git(["checkout", "-q", "-b", branch_name(onto), f"v{onto}"], work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    state = RebaseState(
        onto=onto, source=release.version, patches=patches, old_tip=old_tip, left_out=left_out
    )
    state.save(work)
    return _replay(work, state)


def _find_work(workdir: Path | None) -> Path:
    if workdir is not None:
        work = workdir.resolve()
        if not RebaseState.path(work).is_file():
            msg = f"no rebase is in progress in {work}; start one with {COMMAND} --onto VERSION"
            raise PatchToolError(msg)
        return work
    root = cache_root() / "rebase"
    found = sorted(p.parent.parent for p in root.glob(f"*/.git/{STATE_FILE}"))
    if not found:
        msg = f"no rebase is in progress; start one with {COMMAND} --onto VERSION"
        raise PatchToolError(msg)
    if len(found) > 1:
        msg = f"{len(found)} rebases are in progress ({', '.join(map(str, found))}); pass --workdir"
        raise PatchToolError(msg)
    return found[0]


def _unmerged(work: Path) -> list[str]:
    return run_git(["diff", "--name-only", "--diff-filter=U"], work).split()


def _head(work: Path) -> str:
    return run_git(["rev-parse", "HEAD"], work).strip()


def _index_is_head(work: Path) -> bool:
    return git_ok(["diff", "--cached", "--quiet", "HEAD"], work)


def resume(workdir: Path | None = None) -> RebaseResult:
    """Go on after the user resolved a conflict and added the files."""
    work = _find_work(workdir)
    state = RebaseState.load(work)
    if not (work / ".git" / "rebase-apply").is_dir():
        if state.next == len(state.patches):
            # Stopped by the lint gate: the user amended the commits; check again.
            if tracked_changes(work):
                msg = f"{work} has uncommitted changes; amend them into their patch's commit first"
                raise PatchToolError(msg)
            return _finish(work, state)
        msg = f"{work} has no patch stopped in git am; run {COMMAND} --abort"
        raise PatchToolError(msg)
    unmerged = _unmerged(work)
    if unmerged:
        msg = f"{', '.join(unmerged)} in {work} still conflict; resolve them and git add them"
        raise PatchToolError(msg)
    unstaged = run_git(["diff", "--name-only"], work).split()
    if unstaged:
        msg = (
            f"{', '.join(unstaged)} in {work} have changes not added; git add them "
            f"(or git checkout -- them) and run {COMMAND} --continue again"
        )
        raise PatchToolError(msg)
    number = _number(state.patches[state.next])
    if _index_is_head(work):
        run_git(["am", "--skip"], work, env=GIT_IDENTITY)
        state.emptied.append(number)
        logger.warning("patch %s was resolved to no change; it is left out", number)
    else:
        run_git(["am", "--continue"], work, env=GIT_IDENTITY)
    state.next += 1
    state.save(work)
    return _replay(work, state)


def abort(workdir: Path | None = None) -> str:
    """Drop a rebase in progress and its work tree."""
    work = _find_work(workdir)
    state = RebaseState.load(work)
    shutil.rmtree(work)
    return f"dropped the rebase onto vLLM {state.onto} ({work}); patches/ was not changed"


def _replay(work: Path, state: RebaseState) -> RebaseResult:
    while state.next < len(state.patches):
        patch = state.patches[state.next]
        head = _head(work)
        proc = run_git_unchecked(
            ["am", "-3", "--keep-non-patch", str(PATCHES_DIR / patch)], work, env=GIT_IDENTITY
        )
        if proc.returncode == 0 and _head(work) == head:
            # "No changes -- Patch already applied.": the base has the change.
            state.in_base.append(_number(patch))
        elif proc.returncode != 0:
            if not _unmerged(work) and _index_is_head(work) and not _missing_preimages(work, patch):
                # Merged to no change: the base has it.
                run_git(["am", "--skip"], work, env=GIT_IDENTITY)
                state.in_base.append(_number(patch))
            else:
                state.save(work)
                raise _conflict(work, state, proc.stdout + proc.stderr)
        state.next += 1
        state.save(work)
    return _finish(work, state)


def _missing_preimages(work: Path, patch: str) -> list[str]:
    """The files' blobs the patch was made against (its ``index`` lines) that ``work`` lacks.

    The replay of the series on its own base makes every blob a patch names, unless a patch
    before it was edited by hand: then ``git am -3`` cannot merge, and changes nothing.
    """
    text = (PATCHES_DIR / patch).read_text(errors="replace")
    blobs = {b for b in re.findall(r"^index ([0-9a-f]+)\.\.", text, re.MULTILINE) if b.strip("0")}
    return sorted(
        b for b in blobs if run_git_unchecked(["cat-file", "-e", f"{b}^{{blob}}"], work).returncode
    )


def _conflict(work: Path, state: RebaseState, output: str) -> ReportedError:
    patch = state.patches[state.next]
    files = _unmerged(work)
    if not files:
        # git could not even merge: nothing to resolve in place.
        missing = _missing_preimages(work, patch)
        run_git(["am", "--abort"], work, check=False)
        shutil.rmtree(work)
        if missing:
            msg = (
                f"patch {patch} does not apply to vLLM {state.onto}, and git cannot merge it: "
                f"it was made against blob {missing[0][:12]}, which the patches before it do not "
                f"produce (was one of them edited by hand?); export the series again from its "
                f"commits with git format-patch"
            )
        else:
            msg = f"patch {patch} does not apply to vLLM {state.onto}: {output.strip()[-300:]}"
        raise PatchToolError(msg)
    hunks = run_git(["diff", "--no-color", "--", *files], work)
    report = "\n".join(
        [
            f"patch {patch} conflicts with vLLM {state.onto} in: {', '.join(files)}",
            hunks.rstrip(),
            "",
            f"Resolve the conflict in {work}, then:",
            f"  git -C {work} add {' '.join(files)}",
            f"  {COMMAND} --continue --workdir {work}",
            f"or drop the rebase: {COMMAND} --abort --workdir {work}",
            "patches/, vllm_overlay/ and patches/series.toml were not changed.",
        ]
    )
    msg = (
        f"patch {_number(patch)} conflicts with vLLM {state.onto} in {', '.join(files)}; "
        f"resolve it in {work} and run {COMMAND} --continue"
    )
    return ReportedError(msg, report)


# --- writing the new series -------------------------------------------------------------------


def _group_prefix(group: Group) -> str:
    suffix = f"-{group.base_release}"
    return group.name[: -len(suffix)] if group.name.endswith(suffix) else group.name


def _file_at(work: Path, rev: str, path: str) -> bytes | None:
    proc = run_git_unchecked(["show", f"{rev}:{path}"], work, text=False)
    return proc.stdout if proc.returncode == 0 else None


def _changed_lines(patch_text: str) -> list[str]:
    """The lines a patch adds or removes (not its context, blob ids or line numbers)."""
    diff = patch_text[patch_text.find("\ndiff --git ") :]
    return [
        line
        for line in diff.splitlines()
        if line[:1] in ("+", "-") and not line.startswith(("+++ ", "--- ")) and line != "-- "
    ]


def _export(work: Path, commit: str, source: Path, base_tag: str, dest: Path) -> Path:
    """``git format-patch`` one commit under its number; a changed patch gets a new Last-Update."""
    out = run_git(
        [*FORMAT_PATCH, f"--base={base_tag}", f"--start-number={int(source.name[:4])}",
         "-o", str(dest), "-1", commit],
        work,
    )  # fmt: skip
    path = Path(out.strip())
    text = path.read_text()
    if _changed_lines(text) != _changed_lines(source.read_text()):
        today = datetime.date.today().isoformat()
        path.write_text(LAST_UPDATE.sub(f"Last-Update: {today}", text, count=1))
    return path


def _mark_upstream(text: str, where: str) -> str:
    """``Upstream-Status: Backport [where]``; ``Forwarded: no`` no longer holds."""
    text = UPSTREAM_STATUS.sub(f"Upstream-Status: Backport [{where}]", text, count=1)
    return text.replace("\nForwarded: no\n", "\n", 1)


def _lint(work: Path, state: RebaseState) -> None:
    """Stop if a changed file fails the new release's own ruff hooks (its pinned version)."""
    tag = f"v{state.onto}"
    changed = run_git(["diff", "--name-only", tag, "HEAD"], work).split()
    results, output = run_hooks(work, changed, only={"ruff-check", "ruff-format"})
    failed = [r.id for r in results if r.outcome == "failed"]
    if failed:
        report = "\n".join(
            [
                f"the carried series does not pass vLLM {state.onto}'s {', '.join(failed)}:",
                output.strip(),
                "",
                f"Fix each file in {work} in the commit of the patch that introduced the code",
                f"(git -C {work} rebase -i {tag}, mark it edit, amend), then:",
                f"  {COMMAND} --continue --workdir {work}",
                "patches/, vllm_overlay/ and patches/series.toml were not changed.",
            ]
        )
        msg = (
            f"the series carried onto vLLM {state.onto} fails that release's ruff hooks; "
            f"fix it in {work} and run {COMMAND} --continue"
        )
        raise ReportedError(msg, report)


def _commits_by_path(
    work: Path, state: RebaseState, commits: list[str], carried: list[str]
) -> dict[str, list[tuple[str, str]]]:
    """The replayed (patch, commit) pairs of each file, in order; one file per patch."""
    if len(commits) != len(carried):
        msg = f"{work} has {len(commits)} commits for {len(carried)} patches; run {COMMAND} --abort"
        raise PatchToolError(msg)
    by_path: dict[str, list[tuple[str, str]]] = {}
    for commit, patch in zip(commits, carried, strict=True):
        files = run_git(["diff-tree", "--no-commit-id", "--name-only", "-r", commit], work).split()
        if len(files) != 1:
            msg = f"patch {patch} touches {len(files)} files on vLLM {state.onto}; one is expected"
            raise PatchToolError(msg)
        by_path.setdefault(files[0], []).append((patch, commit))
    return by_path


def _group_for(
    work: Path, manifest: Manifest, state: RebaseState, old: Group, chain: list[tuple[str, str]]
) -> Group:
    """An existing group that gives the same result from the same base, or a new one (with
    no patches yet: they are exported afterwards)."""
    tag = f"v{state.onto}"
    base = _file_at(work, tag, old.path)
    base_sha = sha256_bytes(base) if base is not None else ""
    numbers = tuple(_number(p) for p, _ in chain)
    final = _file_at(work, "HEAD", old.path)
    final_sha = sha256_bytes(final) if final is not None else None
    for group in manifest.groups_for(old.path):
        same_base = group.base_sha256 == base_sha and group.numbers == numbers
        if same_base and group.results and group.results[-1] == final_sha:
            return group
    released = read_sdist_file(state.onto, old.path)
    if (sha256_bytes(released) if released is not None else "") != base_sha:
        msg = (
            f"{old.path} in {work} at v{state.onto} differs from vLLM {state.onto}'s sdist; "
            f"a series is recorded against released files: run {COMMAND} --abort, and rebase onto "
            "the release itself"
        )
        raise PatchToolError(msg)
    name = f"{_group_prefix(old)}-{state.onto}"
    if name in manifest.groups or (PATCHES_DIR / name).exists():
        msg = f"patches/{name} already exists; remove it (it belongs to no release?) first"
        raise PatchToolError(msg)
    return Group(name, old.path, state.onto, base_sha, (), ())


def _finish(work: Path, state: RebaseState) -> RebaseResult:
    _lint(work, state)
    manifest = load_manifest()
    source = manifest.releases[state.source]
    tag = f"v{state.onto}"
    commits = run_git(["rev-list", "--reverse", f"{tag}..HEAD"], work).split()
    skipped = set(state.in_base) | set(state.emptied)
    carried = [p for p in state.patches if _number(p) not in skipped]
    by_path = _commits_by_path(work, state, commits, carried)
    groups: list[Group] = []
    new_dirs: dict[str, list[tuple[str, str]]] = {}
    for old in source.groups:
        chain = by_path.pop(old.path, [])
        if not chain:
            continue
        group = _group_for(work, manifest, state, old, chain)
        if not group.patches:
            new_dirs[group.name] = chain
        groups.append(group)
    if by_path:
        msg = f"the replayed series touches files its groups do not know: {sorted(by_path)}"
        raise PatchToolError(msg)

    with tempfile.TemporaryDirectory(dir=PATCHES_DIR, prefix=".rebase-") as tmp:
        for name, chain in new_dirs.items():
            out = Path(tmp) / name
            files = [_export(work, c, PATCHES_DIR / p, tag, out) for p, c in chain]
            index = next(i for i, g in enumerate(groups) if g.name == name)
            groups[index] = replace(groups[index], patches=tuple(f"{name}/{f.name}" for f in files))
        _write(manifest, state, groups, Path(tmp), list(new_dirs))
    range_diff = run_git(
        ["range-diff", "--no-color", f"v{state.source}..{state.old_tip}", f"{tag}..HEAD"], work
    )
    shutil.rmtree(work)
    return RebaseResult(
        onto=state.onto,
        source=state.source,
        carried=[_number(p) for p in carried],
        in_base=state.in_base,
        left_out=state.left_out,
        new_groups=list(new_dirs),
        reused_groups=[g.name for g in groups if g.name not in new_dirs],
        range_diff=range_diff,
    )


def _upstream_marks(
    manifest: Manifest, state: RebaseState
) -> tuple[dict[str, PatchInfo], dict[Path, tuple[str, str]]]:
    """The patches found upstream at ``state.onto``: their first release, and each stored
    copy's text before and after marking it ``Upstream-Status: Backport``."""
    patches = dict(manifest.patches)
    rewritten: dict[Path, tuple[str, str]] = {}
    for number in state.in_base:
        info = patches[number]
        if not info.first_release or Version(info.first_release) > Version(state.onto):
            patches[number] = replace(info, first_release=state.onto)
        where = f"{info.upstream}, v{patches[number].first_release}".lstrip(", ")
        stored = [rel for g in manifest.groups.values() for rel in g.patches]
        for rel in stored:
            path = PATCHES_DIR / rel
            if _number(rel) != number:
                continue
            text = path.read_text()
            if _mark_upstream(text, where) != text:
                rewritten[path] = (text, _mark_upstream(text, where))
    return patches, rewritten


def _write(
    manifest: Manifest, state: RebaseState, groups: list[Group], staged: Path, new: list[str]
) -> None:
    """Move the new groups into ``patches/``, update the manifest, regenerate the overlay.

    On any failure everything written is put back.
    """
    source = manifest.releases[state.source]
    patches, rewritten = _upstream_marks(manifest, state)
    upstream = tuple(sorted(set(source.upstream) | set(state.in_base)))
    releases = dict(manifest.releases)
    releases[state.onto] = Release(state.onto, tuple(groups), upstream)
    releases = {v: releases[v] for v in sorted(releases, key=Version)}
    all_groups = dict(manifest.groups)
    all_groups.update({g.name: g for g in groups if g.name in new})
    updated = replace(manifest, patches=patches, groups=all_groups, releases=releases)
    old_manifest = MANIFEST.read_text()
    try:
        for name in new:
            (staged / name).rename(PATCHES_DIR / name)
        for path, (_, text) in rewritten.items():
            write_atomic(path, text.encode())
        write_atomic(MANIFEST, dump_manifest(updated).encode())
        regenerate(load_manifest())
    except BaseException:
        for name in new:
            shutil.rmtree(PATCHES_DIR / name, ignore_errors=True)
            shutil.rmtree(OVERLAY_DIR / name, ignore_errors=True)
        for path, (text, _) in rewritten.items():
            write_atomic(path, text.encode())
        write_atomic(MANIFEST, old_manifest.encode())
        raise
