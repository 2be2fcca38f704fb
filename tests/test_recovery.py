"""A crash after any write of an apply or revert, then the next command: nothing half-done.

The crash is real (the process dies with ``os._exit`` right after its k-th file write, in
tests/programs/crash_after_writes.py); the next command finds the journal and rolls back.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import USER_IDENTITY, assert_record_true, tree_snapshot
from vllm_patches import _journal as journal
from vllm_patches._journal import JOURNAL_NAME
from vllm_patches.series.manifest import CONNECTOR, load_manifest
from vllm_patches.targets.files import check_writable, journal_of
from vllm_patches.targets.find import installed_vllm

CRASHER = Path(__file__).parent / "programs" / "crash_after_writes.py"


def _run(limit: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, CRASHER, str(limit), *map(str, args)], capture_output=True, text=True
    )


@pytest.fixture(params=["site", "tree"])
def target(request, fake_site, plain_tree):
    """(the arguments that name the target, its root) for an installed vLLM and a plain tree."""
    if request.param == "site":
        python, site = fake_site("0.21.0")
        return ["--python", python], site
    tree = plain_tree("0.21.0")
    return [tree], tree


@pytest.mark.parametrize("revert", [False, True], ids=["apply", "revert"])
def test_a_crash_after_any_write_is_rolled_back_by_the_next_command(target, revert):
    args, root = target
    op = ["--revert"] if revert else []
    if revert:
        assert _run(0, *args).returncode == 0
    start = tree_snapshot(root)
    full = _run(0, *op, *args)
    assert full.returncode == 0, full.stderr
    writes = int(full.stdout.split("WRITES ")[-1])
    done = tree_snapshot(root)
    assert writes >= 3  # the journal and at least two files
    back = [] if revert else ["--revert"]
    assert _run(0, *back, *args).returncode == 0
    assert tree_snapshot(root) == start
    for k in range(1, writes + 1):
        crashed = _run(k, *op, *args)
        assert crashed.returncode == 70, (k, crashed.stderr)
        # --check tells the truth: the real command has something to roll back first.
        check = _run(0, "--check", *op, *args)
        assert check.returncode == 1 and "interrupted" in check.stderr, (k, check.stderr)
        again = _run(0, *op, *args)
        assert again.returncode == 0, (k, again.stderr)
        assert "that was interrupted in" in again.stdout, (k, again.stdout)
        assert tree_snapshot(root) == done, k
        assert not list(root.rglob(JOURNAL_NAME))
        if args[0] == "--python":
            assert_record_true(root)
        assert _run(0, *back, *args).returncode == 0
        assert tree_snapshot(root) == start, k


def test_an_empty_backup_directory_does_not_block_apply(fake_site):
    python, site = fake_site("0.21.0")
    backup = next(site.glob("vllm-*.dist-info")) / "vllm_lmcache_mp" / "originals"
    backup.mkdir(parents=True)
    check = _run(0, "--check", "--python", python)
    assert check.returncode == 0 and "will be removed" in check.stdout
    assert backup.is_dir()  # --check changes nothing
    done = _run(0, "--python", python)
    assert done.returncode == 0 and "removed the empty" in done.stdout, done.stderr
    assert_record_true(site)


@pytest.mark.parametrize("in_progress", [False, True], ids=["killed-between", "am-in-progress"])
def test_a_killed_git_apply_is_taken_back_by_the_next_command(git_tree, apply_cli, in_progress):
    """What a SIGKILL during ``git am`` leaves: the series branch with part of the series."""
    tree = git_tree("0.21.0")
    release = load_manifest().release("0.21.0")
    patches = [str(p) for p in release.patch_files]
    branch = release.branch
    git = ["git", *USER_IDENTITY]
    for args in (
        ["switch", "-q", "-c", branch],
        ["config", f"branch.{branch}.vllm-lmcache-mp-from", "main"],
        ["am", "-q", "-3", "--keep-non-patch", *patches[:3]],
    ):
        subprocess.run([*git, *args], cwd=tree, check=True, capture_output=True)
    if in_progress:  # the third patch again: git am stops half-way, as a kill would leave it
        stopped = subprocess.run([*git, "am", "-q", patches[2]], cwd=tree, capture_output=True)
        assert stopped.returncode != 0 and (tree / ".git" / "rebase-apply").exists()
    code, _, err = apply_cli("--check", tree)
    assert code == 1 and f"was interrupted (3 of {len(patches)} patches)" in err
    code, out, err = apply_cli(tree)
    assert code == 0, err
    assert out.startswith(f"took back an interrupted apply in {tree} (back on main, {branch}")
    assert f"applied {len(patches)} patches to {tree} on branch {branch}" in out
    assert not (tree / ".git" / "rebase-apply").exists()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=tree, capture_output=True)
    assert status.stdout == b""


def test_a_test_run_killed_midway_leaves_an_install_the_next_command_heals(fake_site, apply_cli):
    """prepare-upstream-pr and `test` lay files over a cached install for a while."""
    python, site = fake_site("0.21.0")
    target = installed_vllm(str(python))
    before = tree_snapshot(site)
    held = journal.temporarily(
        journal_of(target), target.root, {site / CONNECTOR: b"# 0002 only\n"}, "a test run"
    )
    held.__enter__()  # the process is killed inside the block: it never leaves it
    assert (site / CONNECTOR).read_bytes() == b"# 0002 only\n"
    code, out, err = apply_cli("--python", python)
    assert code == 0, err
    assert out.startswith(f"rolled back a test run that was interrupted in {site}; applied")
    code, _, err = apply_cli("--revert", "--python", python)
    assert code == 0, err
    assert tree_snapshot(site) == before


def test_sigterm_during_a_git_apply_goes_back_to_the_users_branch(git_tree):
    tree = git_tree("0.21.0")
    before = tree_snapshot(tree)
    program = Path(__file__).parent / "programs" / "term_during.py"
    proc = subprocess.run(
        [sys.executable, program, "vllm_patches.targets.checkout:identity_env", "apply_main", tree],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.startswith("error: interrupted; what had been changed was put back")
    head = subprocess.run(
        ["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=tree, capture_output=True, text=True
    )
    assert head.stdout.strip() == "main"
    assert tree_snapshot(tree) == before  # no series branch, no git am in progress


def test_the_writability_check_leaves_no_name_a_crash_could_strand(tmp_path, monkeypatch):
    """The check creates an unnamed file (O_TMPFILE): no name exists at any instant, so a
    kill anywhere in it leaves nothing; a named probe is only the fallback of a file system
    without unnamed files."""

    def named(*args, **kwargs):
        raise AssertionError("a named probe was made")

    monkeypatch.setattr(tempfile, "mkstemp", named)
    check_writable({tmp_path / "a" / "b"}, "make it writable")
    assert list(tmp_path.iterdir()) == []


def test_a_probe_an_older_run_left_is_removed_by_the_next_command(fake_site, apply_cli):
    """What a kill between creating and removing a named probe left (the tool before the
    unnamed probe did: issue 31): the next apply and revert take it away."""
    python, site = fake_site("0.21.0")
    start = tree_snapshot(site)
    stale = (site / CONNECTOR).parent / ".vllm-patches-probe-k1ll3d00"
    stale.write_bytes(b"")
    assert apply_cli("--python", python)[0] == 0
    assert not stale.exists()
    stale.write_bytes(b"")
    assert apply_cli("--revert", "--python", python)[0] == 0
    assert not stale.exists()
    assert tree_snapshot(site) == start
