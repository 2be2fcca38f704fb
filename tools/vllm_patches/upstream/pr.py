"""Prepare the follow-up to vllm-project/vllm#42596 as a pull request against vLLM.

Patches 0002 (the builtin class speaks the installed lmcache's adapter API by name), 0003 (its
tests), 0004 (the hardened resolution) and 0005 (its tests) become commits on a branch of a
pinned checkout, in vLLM's style (title tags, no downstream trailers, AI attribution,
DCO sign-off by the submitter). vLLM's own hooks and tests run on them, and the
``git format-patch`` series and ``PR.md`` (the checkout's template, filled) are written.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from string import Template

from packaging.version import Version

from vllm_patches._git import (
    current_ref,
    git_ok,
    require_tagged_checkout,
    run_git,
    tracked_changes,
)
from vllm_patches._proc import logger
from vllm_patches.diagnosis.matrix import shipped
from vllm_patches.diagnosis.vllm_tests import RESOLUTION_TESTS, UNIT_DIR, Report, run_vllm_tests
from vllm_patches.errors import PatchToolError, ReportedError
from vllm_patches.series.hooks import HookResult, run_hooks
from vllm_patches.series.manifest import REPO_ROOT, load_manifest
from vllm_patches.sources.releases import checkout

PR_PATCHES = ("0002", "0003", "0004", "0005")
DOWNSTREAM_TRAILERS = re.compile(
    r"^(Upstream-Status|Forwarded|Last-Update|Origin|Applied-Upstream|Bug|Gbp-Pq|"
    r"Signed-off-by|Co-authored-by): .*\n",
    re.MULTILINE,
)
TEST_FILE = f"{UNIT_DIR}/{RESOLUTION_TESTS}.py"


@dataclass(frozen=True)
class PullRequest:
    """What was prepared."""

    title: str
    branch: str
    checkout: Path
    out: Path
    hooks: list[HookResult]
    tests: Report
    base: str

    def lines(self) -> list[str]:
        """What was prepared, for people."""
        out = [
            f"title: {self.title}",
            f"branch {self.branch} in {self.checkout}: {len(PR_PATCHES)} signed-off commits",
        ]
        out += [f"  {h.id}: {h.outcome}{f' ({h.detail})' if h.detail else ''}" for h in self.hooks]
        runs = (("vLLM " + self.base, self.tests.baseline), ("with the change", self.tests.patched))
        out += [f"tests, {name}: {run.counts_text()} in {run.seconds:.1f} s" for name, run in runs]
        out.append(
            f"written: {self.out}/PR.md, {self.out}/patches/, {self.out}/checks.txt, "
            f"{self.out}/tests/"
        )
        return out


def newest_release() -> str:
    """The newest release with a series: the default base."""
    manifest = load_manifest()
    return max((v for v, r in manifest.releases.items() if r.groups), key=Version)


def _submitter(tree: Path) -> tuple[str, str]:
    """Name and email of whoever signs off, from git's configuration."""
    name = run_git(["config", "user.name"], tree, check=False).strip()
    email = run_git(["config", "user.email"], tree, check=False).strip()
    if not name or not email:
        msg = (
            "git user.name and user.email are not set: the DCO sign-off must be yours; "
            "run git config --global user.name 'Your Name' and user.email you@example.com"
        )
        raise PatchToolError(msg)
    return name, email


def _message(patch: Path, submitter: str, assisted_by: list[str]) -> str:
    """The commit message vLLM wants: title, body, AI attribution, then the sign-off."""
    text = patch.read_text()
    rest = text.partition("\nSubject: [PATCH] ")[2]
    subject, _, body = rest.partition("\n\n")
    body = body[: body.index("\n---\n")]
    body = DOWNSTREAM_TRAILERS.sub("", body + "\n").rstrip()
    trailers = [f"Co-authored-by: {who}" for who in assisted_by] + [f"Signed-off-by: {submitter}"]
    return f"{' '.join(subject.split())}\n\n{body}\n\n" + "\n".join(trailers) + "\n"


def _check_dco(tree: Path, base: str) -> None:
    """Every commit signed off by its author, as vLLM's DCO check requires."""
    log = run_git(["log", "--format=%H%x00%an <%ae>%x00%B%x01", f"{base}..HEAD"], tree)
    for entry in filter(str.strip, log.split("\x01")):
        commit, author, body = entry.strip().split("\x00", 2)
        if f"Signed-off-by: {author}" not in body.splitlines():
            msg = f"commit {commit[:12]} has no Signed-off-by: {author} (DCO); nothing was kept"
            raise PatchToolError(msg)


def _measured_example() -> str:
    """lmcache 0.5.6's connector on vLLM 0.21.0, as the pairing table measured it."""
    cell = shipped()["cells"].get("0.21.0|0.5.6", {})
    state = cell.get("patched", {}).get("candidates", {}).get("lmcache main", "")
    prefix = "fails at: imports ("  # diagnosis.live.built_text
    return state[len(prefix) : -1] if state.startswith(prefix) and state.endswith(")") else ""


SECTIONS = Path(__file__).with_name("sections.md")
"""The prose of each PR section, with ``$name`` placeholders for what was measured."""


def _prose() -> dict[str, Template]:
    """The sections of :data:`SECTIONS` by heading (lower case)."""
    parts = re.split(r"^## (.+)$", SECTIONS.read_text(), flags=re.MULTILINE)
    return {
        heading.strip(): Template(body.strip())
        for heading, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def _hook_values(pr: PullRequest) -> dict[str, str]:
    ran = [h for h in pr.hooks if h.outcome != "skipped"]
    skipped: dict[str, list[str]] = {}
    for hook in pr.hooks:
        if hook.outcome == "skipped":
            skipped.setdefault(hook.detail, []).append(f"`{hook.id}`")
    return {
        "hook_rows": "\n".join(f"| `{h.id}` | {h.outcome} |" for h in ran),
        "hooks_not_run": "; ".join(
            f"{', '.join(dict.fromkeys(ids))} ({why})" for why, ids in skipped.items()
        ),
    }


def _sections(base: str, pr: PullRequest, commands: list[str], tests: list[str]) -> dict[str, str]:
    own = list(pr.tests.patched.of((RESOLUTION_TESTS,)).values())
    matrix = REPO_ROOT / "matrix" / "matrix.md"
    values = {
        "base": base,
        "lmcache": pr.tests.lmcache,
        "commands": "\n".join(commands),
        "tests": " ".join(tests),
        "test_file": TEST_FILE,
        "example": _measured_example(),
        "new_tests": str(len(own)),
        "new_passed": str(own.count("passed")),
        "regressions": str(len(pr.tests.regressions)),
        "base_counts": pr.tests.baseline.counts_text() or "none",
        "pr_counts": pr.tests.patched.counts_text() or "none",
        "base_seconds": f"{pr.tests.baseline.seconds:.1f}",
        "pr_seconds": f"{pr.tests.patched.seconds:.1f}",
        "matrix": matrix.read_text() if matrix.is_file() else "",
        **_hook_values(pr),
    }
    text = {name: prose.substitute(values) for name, prose in _prose().items()}
    purpose = text["purpose"]
    if values["example"]:
        purpose += " " + text["measured example"]
    details = text["details"]
    if values["matrix"]:
        details += "\n\n" + text["pairing table"]
    return {
        "purpose": purpose,
        "overview": purpose,
        "claims": text["claims"],
        "test plan": text["test plan"],
        "test result": text["test result"],
        "validation": text["test plan"] + "\n\n" + text["test result"],
        "details": details,
    }


def fill_template(template: str, sections: dict[str, str], *, ai_assisted: bool = False) -> str:
    """The PR template with every ``##`` section's placeholder replaced by its text.

    :param ai_assisted: tick the template's AI-assistance item (only when the contributor
        said so with ``--assisted-by``).
    """
    out: list[str] = []
    parts = re.split(r"^(## .+)$", template, flags=re.MULTILINE)
    out.append(parts[0])
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        key = heading[3:].strip().lower()
        if key not in sections:
            msg = f"the PR template has a section this tool cannot fill: {heading!r}"
            raise PatchToolError(msg)
        rest = re.sub(r"^\s*<!--.*?-->\s*", "", body, flags=re.DOTALL)
        out.append(f"{heading}\n\n{sections[key]}\n\n{rest.lstrip()}")
    text = "".join(out)
    ticked = ["The purpose", "The test plan", "The test results"]
    if ai_assisted:
        ticked.append("AI assistance was used")
    for item in ticked:
        text = text.replace(f"- [ ] {item}", f"- [x] {item}")
    return text


def prepare(
    base: str | None,
    out: Path,
    *,
    user_checkout: Path | None = None,
    branch: str = "lmcache-mp-connector-hardening",
    lmcache: str | None = None,
    assisted_by: tuple[str, ...] = (),
    tests: list[str] | None = None,
) -> PullRequest:
    """Make the branch, run vLLM's hooks and tests, and write the series and ``PR.md``."""
    base = base or newest_release()
    manifest = load_manifest()
    followed = manifest.patches["0001"]  # the upstream change this PR follows up
    if Version(base) < Version(followed.first_release):
        msg = (
            f"vLLM {base} predates {followed.upstream} (first in {followed.first_release}), so "
            f"the follow-up cannot go upstream against it; for {base} use the backport series: "
            "vllm-patches apply (TREE | --site | --python PY)"
        )
        raise PatchToolError(msg)
    release = manifest.release(base)
    patches = [p for p in release.patch_files if p.name[:4] in PR_PATCHES]
    if [p.name[:4] for p in patches] != list(PR_PATCHES):
        msg = f"the vLLM {base} series lacks {', '.join(PR_PATCHES)}; nothing to send"
        raise PatchToolError(msg)
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        msg = f"{out} exists and is not empty; pass another --out or remove it"
        raise PatchToolError(msg)
    tag = f"v{base}"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if user_checkout is None:
            tree = checkout(base, staging / "vllm")
        else:
            tree = _user_tree(user_checkout, tag, branch)
        submitter = _submitter(tree)
        origin = current_ref(tree)
        run_git(["switch", "-q", "-c", branch, tag], tree)
        try:
            pr = _build(
                tree, tag, branch, patches, submitter, list(assisted_by), base, lmcache, tests,
                staging,
            )  # fmt: skip
        except BaseException:
            run_git(["switch", "-q", "-f", origin], tree, check=False)
            run_git(["branch", "-D", "-q", branch], tree, check=False)
            raise
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    checkout_path = out / "vllm" if user_checkout is None else tree
    return PullRequest(pr.title, branch, checkout_path, out, pr.hooks, pr.tests, base)


def _user_tree(tree: Path, tag: str, branch: str) -> Path:
    require_tagged_checkout(tree, tag)
    if git_ok(["rev-parse", "--verify", "-q", f"refs/heads/{branch}"], tree):
        msg = f"branch {branch} already exists in {tree}; delete it or pass --branch"
        raise PatchToolError(msg)
    if tracked_changes(tree):
        msg = f"{tree} has uncommitted changes; commit or stash them first"
        raise PatchToolError(msg)
    return tree


def _build(
    tree: Path,
    tag: str,
    branch: str,
    patches: list[Path],
    submitter: tuple[str, str],
    assisted_by: list[str],
    base: str,
    lmcache: str | None,
    tests: list[str] | None,
    staging: Path,
) -> PullRequest:
    name, email = submitter
    ident = {
        "GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email,
    }  # fmt: skip
    for patch in patches:
        run_git(["apply", "--index", str(patch)], tree)
        message = staging / "message.txt"
        message.write_text(_message(patch, f"{name} <{email}>", assisted_by))
        run_git(["commit", "-q", "--no-verify", "-F", str(message)], tree, env=ident)
        message.unlink()
    _check_dco(tree, tag)
    files = run_git(["diff", "--name-only", tag, "HEAD"], tree).split()
    logger.warning("running vLLM's pre-commit hooks on %s (first run installs them)", files)
    hooks, output = run_hooks(tree, files)
    (staging / "checks.txt").write_text(output)
    failed = [h.id for h in hooks if h.outcome == "failed"]
    if failed:
        msg = (
            f"vLLM's checks fail on the change ({', '.join(failed)}); "
            "fix the patches and run the command again; nothing was kept"
        )
        raise ReportedError(msg, output)
    change = {f: (tree / f).read_bytes() for f in files}
    tests = tests or [UNIT_DIR]
    report = run_vllm_tests(base, lmcache, staging / "tests", change=change, paths=tests)
    own = report.patched.of((RESOLUTION_TESTS,))
    # Every test the change brings runs and passes on the base it goes upstream against: a
    # skip there is a test the reviewers cannot see pass.
    failing = report.regressions + [t for t, o in own.items() if o != "passed"]
    if failing or not own:
        # The report lives in the staging directory, which is removed: name a test instead.
        first = f"; first: {failing[0]}" if failing else ""
        msg = (
            f"vLLM's tests do not pass with the change ({len(report.regressions)} regressions, "
            f"{list(own.values()).count('passed')}/{len(own)} new tests passed{first}); "
            "nothing was kept"
        )
        raise PatchToolError(msg)
    run_git(["format-patch", "-q", "-o", str(staging / "patches"), f"{tag}..{branch}"], tree)
    title = run_git(["log", "--format=%s", "--reverse", f"{tag}..{branch}"], tree).splitlines()[0]
    pr = PullRequest(title, branch, tree, staging, hooks, report, base)
    commands = [
        f"vllm-patches upstream-pr --base {base}   # vllm-lmcache-mp: branch, hooks, tests",
        f"pre-commit run --files {' '.join(files)}",
        "HF_HUB_OFFLINE=1 pytest -m cpu_test --import-mode=importlib "
        + " ".join(dict.fromkeys([*tests, TEST_FILE])),
    ]
    template = (tree / ".github" / "PULL_REQUEST_TEMPLATE.md").read_text()
    sections = _sections(base, pr, commands, tests)
    body = fill_template(template, sections, ai_assisted=bool(assisted_by))
    (staging / "PR.md").write_text(f"<!-- title: {title} -->\n{body}")
    (staging / "TITLE").write_text(title + "\n")
    return pr
