"""Prepare the follow-up to vllm-project/vllm#42596 as a pull request against vLLM.

Patches 0002 (hardened resolution) and 0003 (its tests) become commits on a branch of a
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

from packaging.version import Version

from vllm_patches._git import (
    current_ref,
    git_ok,
    require_tagged_checkout,
    run_git,
    tracked_changes,
)
from vllm_patches._proc import logger
from vllm_patches.errors import PatchToolError, ReportedError
from vllm_patches.matrix import shipped
from vllm_patches.precommit import HookResult, run_hooks
from vllm_patches.series import REPO_ROOT, load_manifest
from vllm_patches.sources import checkout
from vllm_patches.vllm_tests import UNIT_DIR, Report, run_vllm_tests

FIRST_WITH_42596 = "0.22.0"
PR_PATCHES = ("0002", "0003")
DOWNSTREAM_TRAILERS = re.compile(
    r"^(Upstream-Status|Forwarded|Last-Update|Origin|Applied-Upstream|Bug|Gbp-Pq|"
    r"Signed-off-by|Co-authored-by): .*\n",
    re.MULTILINE,
)
TEST_FILE = "tests/v1/kv_connector/unit/test_lmcache_mp_connector_resolution.py"


@dataclass(frozen=True)
class PullRequest:
    """What was prepared."""

    title: str
    branch: str
    checkout: Path
    out: Path
    hooks: list[HookResult]
    tests: Report


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
    return state.removeprefix("imports: no: ") if state.startswith("imports: no: ") else ""


def _sections(base: str, pr: PullRequest, commands: list[str], tests: list[str]) -> dict[str, str]:
    example = _measured_example()
    purpose = (
        "Follow-up to vllm-project/vllm#42596, which resolves `LMCacheMPConnector` to "
        "lmcache's own implementation at import time. It left weak spots that hit real "
        "deployments: any non-empty `LMCACHE_USE_UPSTREAM_MP` (even `0`) forces the builtin "
        "class, only `ImportError` is caught, the external class is never checked against "
        "`KVConnectorBase_V1`, and nothing tests the resolution."
    )
    if example:
        purpose += (
            " Measured example (vLLM built from its sdist, CPU): with lmcache 0.5.6 installed "
            "next to vLLM 0.21.0, lmcache's `lmcache_mp_connector` does not import "
            f"(`{example}`); an lmcache that does not match the running vLLM is common, and "
            "the resolution must say why it falls back instead of hiding it."
        )
    claims = "\n".join(
        [
            "- `LMCACHE_USE_UPSTREAM_MP` is read as a boolean: `1/true/yes/on` force the builtin "
            "class; unset, empty and `0/false/no/off` prefer lmcache's; anything else is "
            "ignored with one warning.",
            "- Any exception while importing lmcache's module falls back to the builtin class "
            "with a warning naming it (a module that is simply absent: an info line), instead "
            "of taking the process down.",
            "- The external object must be a class and a subclass of `KVConnectorBase_V1`.",
            "- One log line states the choice, the reason and lmcache's version.",
            f"- `{TEST_FILE}`: CPU-only tests (`cpu_test`) of every branch above.",
        ]
    )
    counts = {
        name: run.counts() for name, run in (("base", pr.tests.baseline), ("pr", pr.tests.patched))
    }
    own = [
        o for t, o in pr.tests.patched.outcomes.items() if "lmcache_mp_connector_resolution" in t
    ]
    ran = [h for h in pr.hooks if h.outcome != "skipped"]
    skipped: dict[str, list[str]] = {}
    for hook in pr.hooks:
        if hook.outcome == "skipped":
            skipped.setdefault(hook.detail, []).append(f"`{hook.id}`")
    checks = "\n".join(
        [
            "| hook | result |",
            "|---|---|",
            *(f"| `{h.id}` | {h.outcome} |" for h in ran),
            "",
            "Not run: "
            + "; ".join(f"{', '.join(dict.fromkeys(ids))} ({why})" for why, ids in skipped.items())
            + ".",
        ]
    )
    plan = "\n".join(
        [
            f"On vLLM {base} built from its sdist for CPU (`VLLM_TARGET_DEVICE=empty`), with "
            f"lmcache {pr.tests.lmcache}:",
            "",
            "```bash",
            *commands,
            "```",
        ]
    )
    result = "\n".join(
        [
            f"`pytest -m cpu_test {' '.join(tests)}` ({len(own)} of the tests are "
            f"new, in `{TEST_FILE}`):",
            "",
            "| run | tests | wall |",
            "|---|---|---|",
            f"| vLLM {base} | {_counts(counts['base'])} | {pr.tests.baseline.seconds:.1f} s |",
            f"| vLLM {base} + this PR | {_counts(counts['pr'])} | "
            f"{pr.tests.patched.seconds:.1f} s |",
            "",
            f"New tests: {own.count('passed')} passed of {len(own)}; regressions: "
            f"{len(pr.tests.regressions)}.",
            "",
            "vLLM's pre-commit hooks on the changed files (hook list, arguments and versions "
            "from `.pre-commit-config.yaml`; remote hooks from PyPI at the pinned version):",
            "",
            checks,
        ]
    )
    matrix = REPO_ROOT / "matrix" / "matrix.md"
    details = "\n".join(
        [
            "The resolution stays where #42596 put it (module import time, same names), so "
            "every process of a deployment makes the same choice. The fallback keeps vLLM "
            "starting with the builtin class whenever lmcache's cannot be used, and the log "
            "line says which one runs and why.",
            "",
            "Limitation: the fallback is only as good as the builtin class. On vLLM 0.33.0 "
            "with lmcache 0.5.6 the builtin itself cannot be built "
            "(`LMCacheMPSchedulerAdapter() missing a required argument: 'server_urls'`, "
            "measured by binding its calls to lmcache's signatures). Checking that a candidate "
            "can be built before choosing it is a separate change, not part of this PR.",
            "",
            "If AI assistance was used, say so here and with `--assisted-by` (vLLM's rule). "
            "The submitter must review every changed line, rerun the test plan, "
            "and check that no open PR already covers this (`gh pr list --repo "
            "vllm-project/vllm --search \"LMCacheMPConnector in:title\"`) before opening it.",
            *(
                ["", "<details><summary>vLLM x lmcache pairing table (measured; 'patched' is "
                 "the full downstream series, of which this PR is the first part)</summary>", "",
                 matrix.read_text(), "</details>"]
                if matrix.is_file()
                else []
            ),
        ]
    )  # fmt: skip
    return {
        "purpose": purpose,
        "overview": purpose,
        "claims": claims,
        "test plan": plan,
        "test result": result,
        "validation": plan + "\n\n" + result,
        "details": details,
    }


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "none"


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
    if Version(base) < Version(FIRST_WITH_42596):
        msg = (
            f"vLLM {base} predates vllm-project/vllm#42596 (first in {FIRST_WITH_42596}), so the "
            f"follow-up cannot go upstream against it; for {base} use the backport series: "
            f"tools/apply-patches"
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
    return PullRequest(pr.title, branch, checkout_path, out, pr.hooks, pr.tests)


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
    outcomes = report.patched.outcomes
    own = {t: o for t, o in outcomes.items() if "lmcache_mp_connector_resolution" in t}
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
    pr = PullRequest(title, branch, tree, staging, hooks, report)
    commands = [
        f"tools/prepare-upstream-pr --base {base}   # this project: branch, hooks, tests",
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
