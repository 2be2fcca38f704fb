"""prepare-upstream-pr against the newest release's pinned checkout, with vLLM's own checks."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import project_copy, run_tool, tree_snapshot
from packaging.version import Version
from vllm_patches.series.manifest import REPO_ROOT, load_manifest
from vllm_patches.upstream.pr import _message, fill_template, newest_release

SUBMITTER = "Test Submitter <submitter@example.com>"
QUICK_TESTS = "tests/v1/kv_connector/unit/test_config.py"


@pytest.fixture
def identity(tmp_path, monkeypatch) -> None:
    """A git identity for the DCO sign-off, as a contributor has in ~/.gitconfig."""
    config = tmp_path / "gitconfig"
    config.write_text("[user]\n\tname = Test Submitter\n\temail = submitter@example.com\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))


def _git(tree: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=tree, check=True, capture_output=True, text=True
    ).stdout


def _unfilled_sections(markdown: str) -> list[str]:
    parts = re.split(r"^(## .+)$", markdown, flags=re.MULTILINE)
    return [
        heading
        for heading, body in zip(parts[1::2], parts[2::2], strict=True)
        if not body.strip() or body.strip().startswith("<!--")
    ]


@pytest.mark.slow
def test_prepare_upstream_pr_on_the_newest_release(tmp_path, identity):
    base = newest_release()
    assert base == max(load_manifest().releases, key=Version)
    out = tmp_path / "pr"
    project = project_copy(tmp_path, "9.9.9")
    # vLLM 0.33.0 has ~300 connector unit tests (two runs of ~10 min here): CI runs one
    # file of them besides the new one; VLLM_LMCACHE_MP_FULL=1 runs them all.
    subset = [] if os.environ.get("VLLM_LMCACHE_MP_FULL") else ["--tests", QUICK_TESTS]
    proc = run_tool(project, "prepare-upstream-pr", "--out", out, *subset)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(
        "title: [KVConnector][LMCache] Speak the installed lmcache's adapter API by name\n"
    )

    tree = out / "vllm"
    log = _git(
        tree, "log", "--format=%an <%ae>%x00%B%x01", f"v{base}..lmcache-mp-connector-hardening"
    )
    commits = [c.strip() for c in log.split("\x01") if c.strip()]
    assert len(commits) == 4
    for commit in commits:
        author, message = commit.split("\x00")
        assert author == SUBMITTER
        assert message.splitlines()[0].startswith("[KVConnector][LMCache] ")
        # No attribution trailer unless the contributor passes --assisted-by.
        assert message.splitlines()[-1] == f"Signed-off-by: {SUBMITTER}"
        assert "Co-authored-by" not in message
        assert "Upstream-Status" not in message and "Last-Update" not in message
    # The builtin class, its tests, the resolution, its tests: the series' 0002-0005.
    subjects = [c.split("\x00")[1].splitlines()[0] for c in commits[::-1]]
    assert subjects == [
        "[KVConnector][LMCache] Speak the installed lmcache's adapter API by name",
        "[KVConnector][LMCache] Test the adapter-aware LMCacheMPConnectorUpstream",
        "[KVConnector][LMCache] Harden the LMCacheMPConnector resolution",
        "[KVConnector][LMCache] Test the LMCacheMPConnector resolution",
    ]
    assert sorted(p.name[:4] for p in (out / "patches").glob("*.patch")) == [
        "0001",
        "0002",
        "0003",
        "0004",
    ]

    checks = (out / "checks.txt").read_text()
    for hook in ("ruff-check", "ruff-format", "typos", "mypy", "check-spdx-header",
                 "check-forbidden-imports", "check-root-lazy-imports"):  # fmt: skip
        assert re.search(rf"^{hook}\.+Passed$", checks, re.MULTILINE), hook

    pr = (out / "PR.md").read_text()
    assert _unfilled_sections(pr) == []
    template = (tree / ".github/PULL_REQUEST_TEMPLATE.md").read_text()
    headings = re.findall(r"^## .+$", template, re.MULTILINE)
    assert re.findall(r"^## .+$", pr, re.MULTILINE) == headings
    assert "- [ ] AI assistance was used during the creation of this PR." in pr
    # 0003 and 0005's tests, none skipped (0003 with its non-dataclass case restored and the
    # adapter-call checks); the copy table's are in 0012 (vLLM 0.20/0.21 only).
    assert "New tests: 49 of 49 passed; regressions: 0." in pr
    assert "KVCacheSpecKind" in pr  # the measured lmcache 0.5.6 on vLLM 0.21.0 example
    (tmp_path / "PR.md").write_text(pr)


@pytest.mark.network
def test_an_unformatted_change_fails_the_checks_and_leaves_nothing(tmp_path, identity):
    project = project_copy(tmp_path, "9.9.9")
    (patch,) = (project / f"patches/connector-{newest_release()}").glob("0002-*.patch")
    text = patch.read_text()
    typing = "\n+from typing import TYPE_CHECKING"  # outside what the next patch's context holds
    assert text.count(typing) == 1
    patch.write_text(text.replace(typing, typing.replace("from typing", "from   typing")))
    out = tmp_path / "pr"
    proc = run_tool(project, "prepare-upstream-pr", "--out", out)
    assert proc.returncode == 1
    # vLLM's ruff-check hook (isort, with --fix) is the first to catch it.
    assert re.search(r"^ruff-check\.+Failed$", proc.stdout, re.MULTILINE)
    assert "-from   typing import TYPE_CHECKING" in proc.stdout
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: vLLM's checks fail on the change (ruff-check); fix the patches and run the "
        "command again; nothing was kept"
    ]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pr")] == []


def test_bad_input(tmp_path, identity, git_tree):
    project = project_copy(tmp_path, "9.9.9")
    proc = run_tool(project, "prepare-upstream-pr", "--base", "0.21.0", "--out", tmp_path / "o")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (
        "error: vLLM 0.21.0 predates vllm-project/vllm#42596 (first in 0.22.0), so the "
        "follow-up cannot go upstream against it; for 0.21.0 use the backport series: "
        "vllm-patches apply (TREE | --site | --python PY)\n"
    )
    # A branch of the same name in the user's checkout: refused, checkout untouched.
    tree = git_tree(newest_release())
    _git(tree, "branch", "lmcache-mp-connector-hardening")
    before = tree_snapshot(tree)
    proc = run_tool(project, "prepare-upstream-pr", "--checkout", tree, "--out", tmp_path / "o")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"error: branch lmcache-mp-connector-hardening already exists in {tree}; "
        "delete it or pass --branch\n"
    )
    assert tree_snapshot(tree) == before
    # A non-empty --out.
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").touch()
    proc = run_tool(project, "prepare-upstream-pr", "--out", tmp_path / "full")
    assert proc.stderr == (
        f"error: {tmp_path / 'full'} exists and is not empty; pass another --out or remove it\n"
    )
    assert not any(
        p.name.startswith(".o") or p.name.startswith(".full") for p in tmp_path.iterdir()
    )


def test_no_git_identity_no_sign_off(tmp_path, monkeypatch, git_tree):
    empty = tmp_path / "gitconfig"
    empty.touch()
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    tree = git_tree(newest_release())
    before = tree_snapshot(tree)
    proc = run_tool(
        project_copy(tmp_path, "9.9.9"), "prepare-upstream-pr", "--checkout", tree, "--out",
        tmp_path / "o",
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: git user.name and user.email are not set: the DCO")
    assert tree_snapshot(tree) == before
    assert not (tmp_path / "o").exists()


def test_every_template_section_is_filled():
    sections = {k: f"text for {k}" for k in ("overview", "claims", "validation", "details")}
    template = (
        "<!-- x -->\n\n## Overview\n\n<!-- say -->\n\n## Claims\n\n## Details\n<!--\nmulti\n-->\n"
        "kept\n"
    )
    filled = fill_template(template, sections)
    assert _unfilled_sections(filled) == []
    assert "text for claims" in filled and "kept" in filled and "<!-- say -->" not in filled


def test_no_attribution_trailer_or_ticked_ai_box_unless_the_contributor_asks():
    patch = next((REPO_ROOT / "patches" / "connector-0.31.0").glob("0002-*.patch"))
    plain = _message(patch, "A U Thor <a@example.org>", [])
    assert "Co-authored-by" not in plain
    assert plain.splitlines()[-1] == "Signed-off-by: A U Thor <a@example.org>"
    asked = _message(patch, "A U Thor <a@example.org>", ["Some Assistant"])
    assert asked.splitlines()[-2:] == [
        "Co-authored-by: Some Assistant",
        "Signed-off-by: A U Thor <a@example.org>",
    ]
    template = "## Purpose\n\n<!-- x -->\n- [ ] AI assistance was used during the creation\n"
    assert "- [ ] AI assistance" in fill_template(template, {"purpose": "p"})
    assert "- [x] AI assistance" in fill_template(template, {"purpose": "p"}, ai_assisted=True)


@pytest.mark.slow
def test_the_whole_series_passes_vllms_own_hooks_on_the_newest_release(tmp_path):
    """Every patch, not just what prepare-upstream-pr sends, passes vLLM's pre-commit hooks
    (mypy, forbidden imports, ruff with its config, …) on the newest supported release."""
    from vllm_patches.series.hooks import run_hooks
    from vllm_patches.sources.releases import checkout

    base = newest_release()
    tree = tmp_path / "vllm"
    subprocess.run(["git", "clone", "-q", checkout(base), tree], check=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    patches = [str(p) for p in load_manifest().releases[base].patch_files]
    subprocess.run(
        ["git", "am", "-q", "-3", "--keep-non-patch", *patches], cwd=tree, env=env, check=True
    )
    files = _git(tree, "diff", "--name-only", f"v{base}..HEAD").split()
    assert len(files) == 4
    results, output = run_hooks(tree, files)
    ran = {r.id: r.outcome for r in results if r.outcome != "skipped"}
    assert {"ruff-check", "mypy", "check-forbidden-imports"} <= set(ran)
    assert set(ran.values()) == {"passed"}, output
