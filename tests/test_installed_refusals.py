"""Every refusal an installed user can meet, from the tool's own wheel, without a clone or git.

The wheel is installed into a fresh venv (not editable) and run from a directory outside the
clone, with a PATH of that venv's bin and no git. Each refusal is one ``error:`` line, no
traceback and no ``tools/`` path, and every command it tells the user to run is one that venv
has: the program is in its bin, ``vllm-patches WORD`` names a subcommand that
``vllm-patches --help`` lists, and every ``--flag`` is one that subcommand's ``--help`` takes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pytest
from conftest import path_without_git
from vllm_patches.series.manifest import CONNECTOR, REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.network]

OTHER_PROGRAMS = frozenset(
    {"git", "pre-commit", "docker", "uv", "conda", "sudo", "apt-get", "chattr", "chmod", "curl"}
)
"""Programs a message could name that the venv does not have: none may start a suggestion."""
SUGGESTION = re.compile(r"(?:[;:(]\s*|\b(?:run|with|or|then)\s+)(?=([a-z][\w.+-]*))")
"""The first word of a suggestion: after ``;``, ``:`` or ``(`` (a message says what is wrong,
then what to do), or after run / with / or / then."""
MENTION = re.compile(r"\bvllm-patches\s+([\w-]+)")
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
OPTION = re.compile(r"^ {2}(?:-\w, )?(--[\w-]+)", re.M)
"""An option of a ``--help`` text."""
SUBCOMMAND = re.compile(r"^ {4}(\S+)", re.M)
"""A subcommand of ``vllm-patches --help`` (its lines are indented by four)."""


@dataclass
class InstalledTool:
    """``vllm-patches`` installed from its wheel into ``venv``, run in ``cwd`` with ``path``."""

    venv: Path
    cwd: Path
    path: str
    _options: dict[str, set[str]] = field(default_factory=dict)

    def run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PATH": self.path}
        env.pop("PYTHONPATH", None)
        return subprocess.run(
            [self.venv / "bin" / "vllm-patches", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=self.cwd,
            env=env,
        )

    @cached_property
    def subcommands(self) -> set[str]:
        return set(SUBCOMMAND.findall(self.run("--help").stdout))

    def options(self, subcommand: str) -> set[str]:
        if subcommand not in self._options:
            self._options[subcommand] = set(OPTION.findall(self.run(subcommand, "--help").stdout))
        return self._options[subcommand]

    def has_program(self, name: str) -> bool:
        return (self.venv / "bin" / name).is_file()


@pytest.fixture(scope="module")
def tool(tool_wheel, tmp_path_factory) -> InstalledTool:
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "-q", tool_wheel],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    assert not elsewhere.is_relative_to(REPO_ROOT)
    path = path_without_git(tmp_path_factory.mktemp("no-git") / "bin", venv / "bin")
    installed = InstalledTool(venv, elsewhere, path)
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import vllm_patches; print(vllm_patches.__file__)"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), "the wheel, not the clone"
    return installed


def refusal(tool: InstalledTool, *args: str | Path) -> str:
    """Run ``vllm-patches args``; check it is a refusal whose every suggestion the venv can
    follow, and return its message."""
    proc = tool.run(*args)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    message = proc.stderr.removeprefix("error: ").strip()
    assert "tools/" not in message
    for word in SUGGESTION.findall(message):
        assert word not in OTHER_PROGRAMS or tool.has_program(word), (word, message)
    for clause in message.split(";"):
        command, *named = MENTION.split(clause)
        # Flags before any mention are options of the command that was run.
        flags_of = {str(args[0]): FLAG.findall(command)}
        for subcommand, text in zip(named[::2], named[1::2], strict=True):
            assert tool.has_program("vllm-patches")
            assert subcommand in tool.subcommands, (subcommand, message)
            flags_of.setdefault(subcommand, []).extend(FLAG.findall(text))
        for subcommand, flags in flags_of.items():
            assert set(flags) <= tool.options(subcommand), (subcommand, flags, message)
    return message


@pytest.mark.parametrize("version", ["0.12.0", "0.16.0", "0.19.1", "0.21.0", "0.33.0"])
def test_a_tree_with_an_edited_connector_is_refused_and_reported_modified(
    tool, plain_tree, version
):
    tree = plain_tree(version).resolve()
    connector = tree / CONNECTOR
    with connector.open("a") as fh:
        fh.write("# a local change\n")
    edited = connector.read_bytes()
    for command in ("apply", "revert"):
        message = refusal(tool, command, tree)
        assert message.startswith(f"{connector} matches neither vLLM {version}'s original")
    assert connector.read_bytes() == edited
    status = tool.run("status", tree)
    assert (status.returncode, status.stderr) == (4, "")
    assert status.stdout.startswith("modified\nsource tree ") and "tools/" not in status.stdout


def test_apply_to_a_read_only_tree_is_refused(tool, plain_tree):
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available to make a directory read-only as root")
    tree = plain_tree("0.21.0").resolve()
    folder = (tree / CONNECTOR).parent
    subprocess.run(["chattr", "+i", folder], check=True)
    try:
        message = refusal(tool, "apply", tree)
    finally:
        subprocess.run(["chattr", "-i", folder], check=True)
    assert message.startswith(f"{folder} is not writable (")
    assert message.endswith("make the tree writable first")


def test_a_checkout_cannot_be_patched_without_git(tool, plain_tree):
    tree = plain_tree("0.21.0").resolve()
    (tree / ".git").mkdir()
    message = refusal(tool, "apply", tree)
    assert message == (
        f"{tree} is a git checkout but git is not installed or not on PATH; install git, or "
        "patch an unpacked sdist or an installed vLLM instead"
    )


def test_revert_of_an_unpatched_tree_is_not_a_refusal(tool, plain_tree):
    tree = plain_tree("0.12.0")
    reverted = tool.run("revert", tree)
    assert (reverted.returncode, reverted.stderr) == (0, "")
    assert reverted.stdout.endswith("is not patched: nothing to revert\n")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("rebase", "--onto", "0.99.0"), "needs a clone of vllm-lmcache-mp"),
        (("upstream-pr",), "in a clone of vllm-lmcache-mp"),
        (("overlay",), "needs a clone of vllm-lmcache-mp"),
        (("pairs", "9.9.9"), "vLLM 9.9.9 is newer than the pairing table"),
        (("matrix", "--vllm", "abc"), "'abc' is not a release number"),
        (("matrix", "--vllm", "9.9.9"), "vLLM 9.9.9 has no series"),
        (("test", "9.9.9"), "vLLM 9.9.9 has no series"),
        (("wheel", "0.21.0", "--from-wheel", "missing.whl"), "missing.whl is not a file"),
        (("verify-wheel", "missing.whl"), "missing.whl is not a file"),
        (("apply", "."), ". is not a vLLM source tree"),
        (("apply",), "give a vLLM tree, --site or --python PATH"),
        (("apply", "--site"), "no vllm is installed in "),
        (("doctor",), "no vllm is installed in "),
        (("doctor", "--python", "missing/python"), "missing/python does not exist"),
        (("checkout", "0.21.0", "--dest", "vllm"), "git is not installed or not on PATH"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, tuple) else None,
)
def test_refusal_names_only_commands_the_venv_has(tool, args, says):
    assert says in refusal(tool, *args)
