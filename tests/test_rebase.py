"""rebase-patches on real vLLM trees, in a copy of this project so that ``patches/`` is its own."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import USER_IDENTITY, project_copy, run_tool, tree_snapshot
from vllm_patches.errors import PatchToolError
from vllm_patches.series import rebase
from vllm_patches.series.manifest import CONNECTOR, REPO_ROOT, load_manifest
from vllm_patches.series.rebase import _mark_upstream


def _series_state(project: Path) -> dict[str, str]:
    return {
        name: digest
        for part in ("patches", "vllm_overlay")
        for name, digest in tree_snapshot(project / part).items()
    }


@pytest.mark.network
def test_rebase_021_onto_022_from_scratch(tmp_path):
    """0001 is found in 0.22.0 and dropped; the rest replays; the result is the shipped series."""
    project = project_copy(tmp_path, "0.22.0")
    work = tmp_path / "work"
    proc = run_tool(project, "rebase-patches", "--onto", "0.22.0", "--workdir", work)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        "carried the vLLM 0.21.0 series onto vLLM 0.22.0: 0002 0003 0004 0005 0007 0009 0010"
    )
    assert lines[1] == "already in vLLM 0.22.0, dropped from its series: 0001"
    # 0012 tests the copy table that only 0.20.x/0.21.0 have (only_before = "0.22.0").
    assert lines[2] == "made for releases before vLLM 0.22.0 only, left out: 0012"
    assert lines[3] == (
        "new groups: connector-0.22.0; reused: tests, factory-0.21.0, tests-factory"
    )
    # git range-diff: 0001 has no counterpart, every other patch is unchanged.
    assert any(re.search(r"< +-: +-+ .*Resolve LMCacheMPConnector", line) for line in lines)
    assert sum(bool(re.search(r" = +\d+: ", line)) for line in lines) == 7
    assert not work.exists()

    ours = load_manifest(project / "patches" / "series.toml")
    shipped = load_manifest()
    mine, theirs = ours.releases["0.22.0"], shipped.releases["0.22.0"]
    assert mine.upstream == theirs.upstream == ("0001", "0008")
    assert [g.patches for g in mine.groups] == [g.patches for g in theirs.groups]
    assert ours.patches["0001"].first_release == "0.22.0"
    # The exported patches are byte for byte the ones this project ships, but 0004: the
    # shipped 0.22.0 series leaves out its table of lmcache's copies (made for vLLM
    # 0.20.1-0.21.x), an edit no rebase makes; 0007 after it makes the same change, from
    # and to other blobs of the file, after another 0004 (its index line, hunk positions and
    # prerequisites).
    exported, shipped_dir = (
        project / "patches/connector-0.22.0",
        REPO_ROOT / "patches/connector-0.22.0",
    )
    ours_files, ships = tree_snapshot(exported), tree_snapshot(shipped_dir)
    differ = {n for n in ours_files.keys() | ships.keys() if ours_files.get(n) != ships.get(n)}
    differs, event = sorted(differ)
    assert differs.startswith("0004-") and event.startswith("0007-")

    def change(path: Path) -> list[str]:
        lines = path.read_text().splitlines()
        return [ln for ln in lines if not ln.startswith(("index ", "@@", "prerequisite-patch-id"))]

    assert change(exported / event) == change(shipped_dir / event)
    assert "+_LMCACHE_MP_CONNECTOR_COPIES = (" in (exported / differs).read_text()
    assert "_LMCACHE_MP_CONNECTOR_COPIES" not in (shipped_dir / differs).read_text()
    patch_0002 = next(exported.glob("0002-*.patch")).read_text()
    assert "Upstream-Status: Pending" in patch_0002
    assert "base-commit: " in patch_0002


def _conflicting_checkout(git_tree, version: str) -> Path:
    """A checkout of ``version`` whose connector file was changed where patch 0004 edits it."""
    tree = git_tree(version)
    path = tree / CONNECTOR
    text = path.read_text()
    line = '"Force use builtin LMCacheMPConnectorUpstream in vLLM.",'
    assert text.count(line) == 1
    path.write_text(text.replace(line, '"Forced by the environment: builtin connector.",'))
    for args in (["commit", "-q", "-a", "-m", "local change"], ["tag", "-f", f"v{version}"]):
        subprocess.run(["git", *USER_IDENTITY, *args], cwd=tree, check=True, capture_output=True)
    return tree


@pytest.fixture
def conflict(tmp_path, git_tree):
    """A rebase onto a conflicting 0.23.0, stopped: (project, series state before, work, proc)."""
    project = project_copy(tmp_path, "0.23.0")
    before = _series_state(project)
    checkout = _conflicting_checkout(git_tree, "0.23.0")
    work = tmp_path / "work"
    args = ("--onto", "0.23.0", "--checkout", checkout, "--workdir", work)
    return project, before, work, run_tool(project, "rebase-patches", *args)


def test_conflict_stops_and_leaves_the_series_untouched(conflict):
    project, before, work, proc = conflict
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: patch 0004 conflicts with vLLM 0.23.0 in {CONNECTOR}; "
        f"resolve it in {work} and run vllm-patches rebase --continue"
    ]
    report = proc.stdout
    assert report.startswith("patch connector-0.22.0/0004-KVConnector-LMCache-Harden-")
    assert "<<<<<<<" in report and ">>>>>>>" in report
    assert f"vllm-patches rebase --continue --workdir {work}" in report
    assert _series_state(project) == before
    conflicted = (work / CONNECTOR).read_text()
    assert "<<<<<<<" in conflicted

    # --continue before the conflict is resolved: refused, nothing changes.
    proc = run_tool(project, "rebase-patches", "--continue", "--workdir", work)
    assert proc.returncode == 1
    assert proc.stderr == (
        f"error: {CONNECTOR} in {work} still conflict; resolve them and git add them\n"
    )
    # A second rebase onto the same release while this one is open: refused.
    proc = run_tool(project, "rebase-patches", "--onto", "0.23.0", "--workdir", work)
    assert proc.returncode == 1 and "already in progress" in proc.stderr
    assert _series_state(project) == before

    proc = run_tool(project, "rebase-patches", "--abort", "--workdir", work)
    assert proc.returncode == 0 and "patches/ was not changed" in proc.stdout
    assert not work.exists()
    assert _series_state(project) == before
    proc = run_tool(project, "rebase-patches", "--continue", "--workdir", work)
    assert proc.returncode == 1
    assert proc.stderr == (
        f"error: no rebase is in progress in {work}; start one with vllm-patches rebase "
        "--onto VERSION\n"
    )


def test_resolved_conflict_continues_but_a_non_release_base_is_not_recorded(conflict):
    """--continue replays the rest; a base that is not the released file is refused at the end."""
    project, before, work, proc = conflict
    assert proc.returncode == 1
    subprocess.run(["git", "checkout", "--theirs", CONNECTOR], cwd=work, check=True)
    subprocess.run(["git", "add", CONNECTOR], cwd=work, check=True)
    proc = run_tool(project, "rebase-patches", "--continue", "--workdir", work)
    assert proc.returncode == 1
    assert proc.stderr == (
        f"error: {CONNECTOR} in {work} at v0.23.0 differs from vLLM 0.23.0's sdist; a series "
        "is recorded against released files: run vllm-patches rebase --abort, and rebase onto "
        "the release itself\n"
    )
    log = subprocess.run(
        ["git", "log", "--format=%s", "v0.23.0..HEAD"], cwd=work, capture_output=True, text=True
    ).stdout.splitlines()
    assert len(log) == 7  # every patch but 0001 replayed, 0004 with the resolution
    assert _series_state(project) == before


def _amend(work: Path, subject: str, old: str, new: str) -> None:
    """Edit the commit whose subject contains ``subject``, as a maintainer would."""
    env = {**os.environ, "GIT_SEQUENCE_EDITOR": f"sed -i -E 's/^pick (\\S+ .*{subject})/edit \\1/'"}
    git = ["git", *USER_IDENTITY]
    subprocess.run([*git, "rebase", "-q", "-i", "v0.31.0"], cwd=work, env=env, check=True)
    path = work / CONNECTOR
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))
    subprocess.run([*git, "commit", "-q", "-a", "--amend", "--no-edit"], cwd=work, check=True)
    subprocess.run([*git, "rebase", "--continue"], cwd=work, check=True, capture_output=True)


@pytest.mark.network
def test_ruff_failure_stops_and_continue_writes_the_fixed_series(tmp_path):
    """vLLM 0.31.0 turned on pydocstyle rules: a series that breaks them stops the rebase there;
    amended, it is written.

    The shipped series meets 0.31.0's rules on every base, so the copy's 0.30.0 series gets a
    docstring 0.31.0 refuses (D403), as a contributor's change might bring.
    """
    project = project_copy(tmp_path, "0.31.0")
    # The file's last patch (0007): a patch file edited by hand no longer matches the blob ids
    # recorded in the patches after it.
    good, bad = '"""Return the event the worker adapter', '"""the event the worker adapter'
    (patch,) = (project / "patches/connector-0.30.0").glob("0007-*.patch")
    text = patch.read_text()
    assert text.count(good) == 1
    patch.write_text(text.replace(good, bad))
    before = _series_state(project)
    work = tmp_path / "work"
    proc = run_tool(project, "rebase-patches", "--onto", "0.31.0", "--workdir", work)
    assert proc.returncode == 1
    assert proc.stderr == (
        "error: the series carried onto vLLM 0.31.0 fails that release's ruff hooks; "
        f"fix it in {work} and run vllm-patches rebase --continue\n"
    )
    # vLLM's ruff-check hook runs with --fix: the report shows what ruff would change.
    assert "- hook id: ruff-check" in proc.stdout
    assert '+        """The event the worker adapter\'s transfer waits on.' in proc.stdout
    assert _series_state(project) == before

    _amend(work, "worker adapter for the transfer event", bad, good)
    proc = run_tool(project, "rebase-patches", "--continue", "--workdir", work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "new groups: connector-0.31.0, factory-0.31.0" in proc.stdout
    today = f"Last-Update: {datetime.date.today().isoformat()}"
    for shipped in sorted((REPO_ROOT / "patches/connector-0.31.0").glob("*.patch")):
        ours = (project / "patches/connector-0.31.0" / shipped.name).read_text()
        # Only the patch whose change was amended gets a new Last-Update; the others keep
        # the one of the series they were carried from (0.30.0's).
        source = next((project / "patches/connector-0.30.0").glob(f"{shipped.name[:4]}-*.patch"))
        if shipped.name[:4] == "0007":
            assert today in ours
        else:
            assert _last_update(ours) == _last_update(source.read_text())
        assert _without_last_update(ours) == _without_last_update(shipped.read_text())
    assert tree_snapshot(project / "vllm_overlay/connector-0.31.0") == tree_snapshot(
        REPO_ROOT / "vllm_overlay/connector-0.31.0"
    )


def _last_update(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("Last-Update:"))


def _without_last_update(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("Last-Update:"))


BAD_INPUT = [
    (
        ["--onto", "0.99.0"],
        "vLLM 0.99.0 has no sdist on the package index; pick a released version",
    ),
    (
        ["--onto", "0.11.0", "--from", "0.12.0"],
        f"vLLM 0.11.0 has no {CONNECTOR}; the series cannot be carried onto it",
    ),
    (
        ["--onto", "0.34.0", "--from", "0.5.0"],
        "--from 0.5.0: patches/series.toml has no series for vLLM 0.5.0 "
        "(series exist for 0.12.0 … 0.33.0)",
    ),
    (
        ["--onto", "0.21.0"],
        "vLLM 0.21.0 already has a series (connector-0.21.0, tests, tests-copies, "
        "factory-0.21.0, tests-factory); nothing to rebase",
    ),
    (
        ["--onto", "banana"],
        "argument --onto: 'banana' is not a release number; give one like 0.21.0 "
        "(see rebase-patches --help)",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
@pytest.mark.network
def test_bad_input_changes_nothing(tmp_path, args, message):
    project = project_copy(tmp_path, "0.34.0")
    before = _series_state(project)
    proc = run_tool(project, "rebase-patches", *args, "--workdir", tmp_path / "work")
    usage_mistake = args[1] == "banana"  # argparse's: exit 2, like every usage mistake
    assert (proc.returncode, proc.stdout) == (2 if usage_mistake else 1, "")
    assert proc.stderr == f"error: {message}\n"
    assert _series_state(project) == before
    assert not (tmp_path / "work").exists()


def test_continue_with_nothing_in_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_LMCACHE_MP_CACHE", str(tmp_path / "cache"))
    proc = run_tool(project_copy(tmp_path, "0.99.0"), "rebase-patches", "--continue")
    assert proc.returncode == 1
    assert proc.stderr == (
        "error: no rebase is in progress; start one with vllm-patches rebase --onto VERSION\n"
    )


def test_existing_workdir_is_not_touched(tmp_path):
    project = project_copy(tmp_path, "0.33.0")
    work = tmp_path / "work"
    (work / "mine").mkdir(parents=True)
    proc = run_tool(project, "rebase-patches", "--onto", "0.33.0", "--workdir", work)
    assert proc.returncode == 1
    assert proc.stderr == (
        f"error: {work} exists and holds no rebase; remove it or pass another --workdir\n"
    )
    assert (work / "mine").is_dir()


def test_a_patch_found_upstream_is_marked_backport():
    text = (
        "Subject: [PATCH] x\n\nBody.\n\nUpstream-Status: Pending [follow-up]\nForwarded: no\n"
        "Last-Update: 2026-11-24\n"
    )
    assert _mark_upstream(text, "vllm-project/vllm#1, v0.40.0") == (
        "Subject: [PATCH] x\n\nBody.\n\nUpstream-Status: Backport [vllm-project/vllm#1, v0.40.0]\n"
        "Last-Update: 2026-11-24\n"
    )


@pytest.mark.network
def test_sigterm_while_the_series_is_written_leaves_the_project_as_it_was(tmp_path):
    project = project_copy(tmp_path, "0.22.0")
    before = _series_state(project)
    manifest = (project / "patches" / "series.toml").read_text()
    work = tmp_path / "work"
    program = Path(__file__).parent / "programs" / "term_during.py"
    proc = subprocess.run(
        [
            sys.executable,
            program,
            "vllm_patches.series.rebase:regenerate",
            "rebase_main",
            "--onto",
            "0.22.0",
            "--workdir",
            work,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(project / "tools")},
        check=False,
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.startswith("error: interrupted; what had been changed was put back")
    assert _series_state(project) == before
    assert (project / "patches" / "series.toml").read_text() == manifest
    # The replay itself is still there to continue or abort.
    proc = run_tool(project, "rebase-patches", "--abort", "--workdir", work)
    assert proc.returncode == 0, proc.stderr
    assert _series_state(project) == before


def _git_in(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *USER_IDENTITY, *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def _repo(path: Path, lines: list[str], *, tag: str) -> None:
    path.mkdir(exist_ok=True)
    if not (path / ".git").is_dir():
        _git_in(path, "init", "-q", "-b", "main")
    (path / "f.py").write_text("".join(lines))
    _git_in(path, "add", "f.py")
    _git_in(path, "commit", "-qm", tag)
    _git_in(path, "tag", tag)


def test_a_patch_git_cannot_merge_is_a_failure_not_a_change_the_base_has(tmp_path, monkeypatch):
    """After a patch is edited by hand, the next one names a blob no replay makes: where its
    context does not apply either, ``git am -3`` changes nothing, as it does for a change the
    base already has. The rebase must stop there, not leave the patch out."""
    lines = [f"x{i} = {i}\n" for i in range(20)]
    author = tmp_path / "author"
    _repo(author, lines, tag="v1")
    _repo(author, [*lines[:1], "x1 = 100\n", *lines[2:]], tag="a")
    _repo(author, [*lines[:1], "x1 = 100\n", *lines[2:15], "x15 = 150\n", *lines[16:]], tag="b")
    patches = tmp_path / "patches"
    _git_in(author, "format-patch", "-q", "--full-index", "-o", patches, "v1")
    first, second = sorted(p.name for p in patches.iterdir())
    text = (patches / first).read_text()
    (patches / first).write_text(text.replace("+x1 = 100\n", "+x1 = 101\n"))  # by hand
    # The new base changed a line of the second patch's context; it never saw the author's.
    work = tmp_path / "work"
    _repo(work, lines, tag="v1")
    _repo(work, [*lines[:14], "x14 = -14\n", *lines[15:]], tag="v2")
    monkeypatch.setattr(rebase, "PATCHES_DIR", patches)
    state = rebase.RebaseState("2", "1", [first, second], old_tip=_git_in(work, "rev-parse", "v1"))
    with pytest.raises(PatchToolError) as raised:
        rebase._replay(work, state)
    blob = re.search(r"^index ([0-9a-f]{12})", (patches / second).read_text(), re.M)
    assert str(raised.value) == (
        f"patch {second} does not apply to vLLM 2, and git cannot merge it: it was made "
        f"against blob {blob[1]}, which the patches before it do not produce (was one of them "
        "edited by hand?); export the series again from its commits with git format-patch"
    )
    assert state.in_base == []
