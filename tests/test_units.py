"""Unit tests of the small pieces, hermetic: real git and real files in ``tmp_path``.

``_git``, the target finder and the three kinds of target, the overlay's patch runner, the
pre-commit planner of vLLM's hooks, the PR prose and the series' test-id filter.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import USER_IDENTITY
from vllm_patches._git import (
    current_ref,
    git_ok,
    is_git_worktree,
    require_tagged_checkout,
    run_git,
    tracked_changes,
)
from vllm_patches._proc import run_subprocess
from vllm_patches.diagnosis.vllm_tests import RESOLUTION_TESTS, SERIES_TESTS, Report, Run
from vllm_patches.errors import PatchToolError, ReportedError
from vllm_patches.series import hooks
from vllm_patches.series.manifest import Release
from vllm_patches.series.overlay import apply_to_bytes
from vllm_patches.targets.apply import place_for
from vllm_patches.targets.files import plan
from vllm_patches.targets.find import Target, resolve_target
from vllm_patches.upstream import pr

PATCH = """\
diff --git a/pkg/mod.py b/pkg/mod.py
--- a/pkg/mod.py
+++ b/pkg/mod.py
@@ -1,2 +1,2 @@
 x = 1
-y = 2
+y = 3
"""


def _repo(root: Path, files: dict[str, str], tag: str = "v0.21.0") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for args in (
        ["init", "-q", "-b", "main"],
        ["add", "-A"],
        ["commit", "-qm", "base"],
        ["tag", tag],
    ):
        subprocess.run(["git", *USER_IDENTITY, *args], cwd=root, check=True, capture_output=True)
    return root


# --- _git ---------------------------------------------------------------------------------------


def test_git_helpers_on_a_real_repository(tmp_path):
    root = _repo(tmp_path / "r", {"a.txt": "one\n"})
    assert is_git_worktree(root) and not is_git_worktree(tmp_path)
    assert current_ref(root) == "main"
    assert tracked_changes(root) == []
    (root / "a.txt").write_text("two\n")
    (root / "untracked.txt").write_text("x\n")
    assert tracked_changes(root) == ["a.txt"]  # untracked files are not the user's edits
    assert git_ok(["rev-parse", "--verify", "-q", "refs/tags/v0.21.0"], root)
    run_git(["switch", "-q", "--detach", "v0.21.0"], root)
    assert len(current_ref(root)) == 40  # detached: the commit


def test_run_git_failure_is_one_error_line(tmp_path):
    root = _repo(tmp_path / "r", {"a.txt": "one\n"})
    with pytest.raises(PatchToolError, match="git rev-parse"):
        run_git(["rev-parse", "--verify", "no-such-ref"], root)
    assert run_git(["rev-parse", "--verify", "-q", "no-such-ref"], root, check=False) == ""


def test_require_tagged_checkout(tmp_path):
    root = _repo(tmp_path / "r", {"a.txt": "one\n"})
    assert require_tagged_checkout(root, "v0.21.0") == root
    with pytest.raises(PatchToolError, match=r"has no tag v0\.22\.0"):
        require_tagged_checkout(root, "v0.22.0")
    (root / "sub").mkdir()
    with pytest.raises(PatchToolError, match="not the top of a git work tree"):
        require_tagged_checkout(root / "sub", "v0.21.0")


# --- targets ------------------------------------------------------------------------------------


def _vllm_tree(root: Path, version: str = "0.21.0") -> Path:
    (root / "vllm").mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text("")
    (root / "PKG-INFO").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return root


def test_resolve_target_tells_the_kinds_apart(tmp_path):
    tree = resolve_target(_vllm_tree(tmp_path / "tree", "0.21.0+empty"))
    assert (tree.kind, tree.version) == ("tree", "0.21.0")
    git = resolve_target(_repo(tmp_path / "git", {"vllm/__init__.py": ""}, tag="v0.19.1"))
    assert (git.kind, git.version) == ("git", "0.19.1")
    assert resolve_target(tmp_path / "tree", version="v0.20.0").version == "0.20.0"


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (
            lambda p: p.mkdir(),
            "{t} is not a vLLM source tree (no vllm/__init__.py); pass a vLLM checkout, "
            "an unpacked sdist, or --site/--python for an installed vLLM",
        ),
        (
            lambda p: (p / "vllm").mkdir(parents=True) or (p / "vllm/__init__.py").touch(),
            "cannot tell which vLLM release {t} is (no vX.Y.Z tag, no PKG-INFO); "
            "pass --vllm-version",
        ),
    ],
)
def test_resolve_target_refuses_what_it_cannot_tell(tmp_path, make, error):
    make(tmp_path / "t")
    message = error.format(t=tmp_path / "t")
    with pytest.raises(PatchToolError, match=f"^{re.escape(message)}$"):
        resolve_target(tmp_path / "t")
    with pytest.raises(PatchToolError, match="give a vLLM tree"):
        resolve_target(None)


def test_describe_names_kind_root_and_release(tmp_path):
    assert (
        Target("site", tmp_path, "0.21.0").describe() == f"installed vLLM {tmp_path} (vLLM 0.21.0)"
    )
    assert Target("git", tmp_path, "0.21.0").describe().startswith("git checkout ")


def test_a_source_tree_reads_what_is_there(tmp_path):
    place = place_for(Target("tree", _vllm_tree(tmp_path / "t"), "0.21.0"))
    assert place.read("vllm/__init__.py") == b""
    assert place.read("vllm/missing.py") is None


def test_a_damaged_copy_of_the_series_is_refused_before_anything_is_written(tmp_path, manifest):
    group = replace(manifest.groups["tests"], results=("0" * 64,))
    place = place_for(Target("tree", _vllm_tree(tmp_path / "t"), "0.21.0"))
    with pytest.raises(
        PatchToolError,
        match=r"^the series' files of group tests do not give the sha256 that .*series\.toml "
        r"records \(a damaged copy\); reinstall vllm-lmcache-mp, or in a clone of it run "
        r"vllm-patches overlay --check$",
    ):
        plan(place, Release("0.21.0", (group,)), reverse=False)


def test_without_git_a_plain_tree_resolves_and_a_checkout_is_refused(tmp_path, without_git):
    tree = _vllm_tree(tmp_path / "tree")
    checkout = _repo(tmp_path / "git", {"vllm/__init__.py": ""})
    without_git()
    assert resolve_target(tree).kind == "tree"
    message = (
        f"{checkout.resolve()} is a git checkout but git is not installed or not on PATH; "
        "install git, or patch an unpacked sdist or an installed vLLM instead"
    )
    with pytest.raises(PatchToolError, match=f"^{re.escape(message)}$"):
        resolve_target(checkout)


# --- _proc ---------------------------------------------------------------------------------------


def test_a_command_past_its_timeout_is_stopped_with_one_error_line():
    with pytest.raises(
        PatchToolError,
        match=r"^sleep 30 did not finish in 0\.2 s and was stopped; check that it runs by hand, "
        r"then run the command again$",
    ):
        run_subprocess(["sleep", "30"], timeout=0.2)


# --- overlay: patches applied exactly, without git, forwards and back ----------------------------


def test_apply_to_bytes_forwards_and_back(tmp_path):
    patch = tmp_path / "0001-y.patch"
    patch.write_text(PATCH)
    base = b"x = 1\ny = 2\n"
    (after,) = apply_to_bytes("pkg/mod.py", base, [patch])
    assert after == b"x = 1\ny = 3\n"
    assert apply_to_bytes("pkg/mod.py", after, [patch], reverse=True) == [base]
    with pytest.raises(
        PatchToolError,
        match=r"^0001-y\.patch does not apply to pkg/mod\.py: its hunk at line 1 does not match",
    ):
        apply_to_bytes("pkg/mod.py", b"something else\n", [patch])


NOTES = "pkg/notes.txt"
CREATE = f"""\
diff --git a/{NOTES} b/{NOTES}
new file mode 100644
--- /dev/null
+++ b/{NOTES}
@@ -0,0 +1,3 @@
+one
+
+two
"""
# The empty context line has lost its leading space, as editors that trim lines leave it.
END = f"""\
diff --git a/{NOTES} b/{NOTES}
--- a/{NOTES}
+++ b/{NOTES}
@@ -2,2 +2,3 @@

-two
+two
+three
\\ No newline at end of file
"""


def test_apply_to_bytes_creates_removes_and_keeps_a_missing_final_newline(tmp_path):
    create, end = tmp_path / "0001-create.patch", tmp_path / "0002-end.patch"
    create.write_text(CREATE)
    end.write_text(END)
    assert apply_to_bytes(NOTES, None, [create, end]) == [b"one\n\ntwo\n", b"one\n\ntwo\nthree"]
    assert apply_to_bytes(NOTES, b"one\n\ntwo\nthree", [end, create], reverse=True) == [
        b"one\n\ntwo\n",
        None,
    ]
    with pytest.raises(
        PatchToolError, match=r"^0001-create\.patch does not apply to .*: the file exists"
    ):
        apply_to_bytes(NOTES, b"", [create])
    with pytest.raises(
        PatchToolError, match=r"^0002-end\.patch does not apply to .*: the file does not exist"
    ):
        apply_to_bytes(NOTES, None, [end])


def test_a_patch_that_changes_another_file_is_refused(tmp_path):
    patch = tmp_path / "0001-y.patch"
    patch.write_text(PATCH)
    with pytest.raises(
        PatchToolError, match=r"it must change pkg/other\.py and nothing else\); restore it$"
    ):
        apply_to_bytes("pkg/other.py", b"x = 1\ny = 2\n", [patch])


# --- vLLM's hooks: which run, which do not and why ----------------------------------------------

CONFIG = """\
default_stages: [pre-commit, manual]
repos:
- repo: https://github.com/astral-sh/ruff-pre-commit
  rev: v0.14.0
  hooks:
  - id: ruff-check
  - id: ruff-format
- repo: https://github.com/crate-ci/typos
  rev: 0123456789abcdef0123456789abcdef01234567
  hooks:
  - id: typos
- repo: https://example.invalid/unknown
  rev: v1.0.0
  hooks:
  - id: mystery
- repo: local
  hooks:
  - id: only-for-shell
    name: shell
    entry: true
    language: system
    types: [shell]
  - id: on-push
    name: push
    entry: true
    language: system
    stages: [pre-push]
  - id: spdx
    name: spdx
    entry: true
    language: system
    types: [python]
"""


def test_hook_plan_reads_vllms_config(tmp_path):
    pytest.importorskip("yaml")
    pytest.importorskip("identify")
    (tmp_path / ".pre-commit-config.yaml").write_text(CONFIG)
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "x.py").write_text("x = 1\n")
    config, skipped = hooks.plan(tmp_path, ["vllm/x.py"])
    ran = {h["id"]: h for h in config["repos"][0]["hooks"]}
    assert set(ran) == {"ruff-check", "ruff-format", "spdx"}
    assert ran["ruff-check"]["additional_dependencies"] == ["ruff==0.14.0"]
    why = {r.id: r.detail for r in skipped}
    assert "not a release" in why["typos"]
    assert "no known PyPI release" in why["mystery"]
    assert why["only-for-shell"] == "no changed file is its kind"
    assert why["on-push"] == "runs at stage pre-push only"
    config, _ = hooks.plan(tmp_path, ["vllm/x.py"], only={"spdx"})
    assert [h["id"] for h in config["repos"][0]["hooks"]] == ["spdx"]


# --- the PR prose and the series' test-id filter -----------------------------------------------


def test_every_pr_section_has_its_prose_and_every_placeholder_is_known():
    prose = pr._prose()
    assert {"purpose", "claims", "test plan", "test result", "details"} <= set(prose)
    known = {
        "base", "lmcache", "commands", "tests", "test_file", "example", "new_tests",
        "new_passed", "new_skipped", "regressions", "base_counts", "pr_counts", "base_seconds",
        "pr_seconds", "matrix", "hook_rows", "hooks_not_run",
    }  # fmt: skip
    for name, template in prose.items():
        assert set(template.get_identifiers()) <= known, name
    filled = pr.fill_template(
        "## Purpose\n<!-- say why -->\n## Test Plan\n- [ ] The purpose\n",
        {"purpose": "P", "test plan": "T"},
    )
    assert filled == "## Purpose\n\nP\n\n## Test Plan\n\nT\n\n- [x] The purpose\n"


def test_the_series_test_filter():
    run = Run(
        outcomes={
            "tests.v1.kv_connector.unit.test_lmcache_mp_connector_resolution::test_a": "passed",
            "tests.v1.kv_connector.unit.test_kv_connector_factory_module_path::test_b": "failed",
            "tests.v1.kv_connector.unit.test_nixl::test_c": "passed",
        }
    )
    assert sorted(run.of().values()) == ["failed", "passed"]
    assert list(run.of((RESOLUTION_TESTS,)).values()) == ["passed"]
    assert run.counts() == {"failed": 1, "passed": 2}


def test_the_filter_names_the_series_test_files(manifest):
    stems = {Path(g.path).stem for g in manifest.groups.values() if g.path.startswith("tests/")}
    assert stems == set(SERIES_TESTS) and RESOLUTION_TESTS in stems


def _report(patched: dict[str, str], regressions: list[str]) -> Report:
    return Report("0.21.0", "0.5.3", Run({}), Run(patched), regressions, {})


def test_the_test_verdict_is_the_reports():
    own = "tests.v1.kv_connector.unit.test_lmcache_mp_connector_resolution::test_a"
    lines = _report({own: "passed"}, []).summary()
    assert lines[-1] == "the series' own tests: 1 passed, 0 skipped, 0 failed"
    with pytest.raises(ReportedError, match="1 regressions, first t::x"):
        _report({own: "passed"}, ["t::x"]).summary()
    with pytest.raises(ReportedError, match="did not all pass"):
        _report({own: "failed"}, []).summary()
    with pytest.raises(ReportedError, match="did not all pass"):
        _report({"tests.other::t": "passed"}, []).summary()  # the series' tests did not run


def test_the_prs_measured_example_is_read_from_the_shipped_table():
    # The pairing table names a candidate that does not import as "fails at: imports (ERROR)".
    assert pr._measured_example() == (
        "ImportError: cannot import name 'KVCacheSpecKind' from 'vllm.v1.kv_cache_interface'"
    )


@pytest.mark.parametrize(
    ("rev", "raw", "expected"),
    [
        ("v0.14.0", "", "0.14.0"),
        # vLLM up to 0.33.0: a commit id with a "# v0.14.0" note.
        ("0c1b7a2", "  rev: 0c1b7a2  # v0.14.0\n", "0.14.0"),
        # vLLM 0.34.0 freezes every rev to a commit id: "# frozen: v0.17.2".
        ("f368fb3", "  rev: f368fb3  # frozen: v0.17.2\n", "0.17.2"),
        ("f368fb3", "  rev: f368fb3\n", None),
    ],
)
def test_the_release_a_hooks_rev_names(rev, raw, expected):
    from vllm_patches.series.hooks import _version

    assert _version(rev, raw) == expected
