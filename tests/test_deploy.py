"""The container recipes in examples/, their steps run for real against an image-like venv.

Images cannot be pulled here, so the image is played by a copy of a real vLLM install built
from the sdist (hardlinked, so making it is cheap and the cached original is never written:
pip and the tool replace files by rename). The Dockerfile is parsed as Docker reads it
(ARG defaults, --build-arg overrides, COPY into the container's paths, RUN through sh -c
with the ARGs in the environment); only FROM is played by that venv. An image may have no
git: the steps run with a PATH of the venv's bin and a shell, and no git.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import path_without_git
from vllm_patches.series.manifest import REPO_ROOT
from vllm_patches.sources.releases import cache_root, fetch_sdist
from vllm_patches.sources.venvs import vllm_env
from vllm_patches.targets import wheel as wheels

pytestmark = [pytest.mark.slow, pytest.mark.network]
EXAMPLES = REPO_ROOT / "examples"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def run_dockerfile(
    dockerfile: Path, context: Path, build_args: dict[str, str], path: str
) -> list[str]:
    """Play ``dockerfile``'s steps on this machine, from outside this clone (in ``context``),
    with ``path`` as the image's PATH; return each RUN's output."""
    args: dict[str, str] = {}
    outputs = []
    for keyword, rest in _instructions(dockerfile):
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = build_args.get(name, args.get(name, default))
        elif keyword == "COPY":
            source, dest = rest.split()
            if Path(dest).exists():
                shutil.rmtree(dest)
            shutil.copytree(context / source, dest)
        elif keyword == "RUN":
            proc = subprocess.run(
                ["sh", "-c", rest],
                capture_output=True,
                text=True,
                env={**_env(path), **args},
                cwd=context,
            )
            assert proc.returncode == 0, f"{rest}\n{proc.stdout}\n{proc.stderr}"
            outputs.append(proc.stdout)
        else:
            assert keyword == "FROM", keyword
    return outputs


def _env(path: str) -> dict[str, str]:
    env = {**os.environ, "PATH": path}
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture
def image(tmp_path):
    """A venv laid out like the image: a real vLLM 0.21.0 (from its sdist) and nothing else of
    ours; a hardlinked copy of the cached install."""
    source = vllm_env("0.21.0", "0.5.3").parents[1]
    copy = tmp_path / "image"
    subprocess.run(["cp", "-al", source, copy], check=True)
    (copy / ".complete").unlink(missing_ok=True)
    yield copy / "bin" / "python"
    shutil.rmtree("/tmp/vllm-lmcache-mp", ignore_errors=True)


@pytest.fixture
def image_path(image, tmp_path) -> str:
    """The image's PATH, without git: its venv's bin (python, pip) and a shell."""
    return path_without_git(tmp_path / "image-tools", image.parent, programs=("sh",))


def test_dockerfile_patches_the_images_vllm_and_gates_on_doctor(
    image, image_path, tool_wheel, tmp_path
):
    context = tmp_path / "context"
    (context / "dist").mkdir(parents=True)
    shutil.copy(tool_wheel, context / "dist")
    outputs = run_dockerfile(
        EXAMPLES / "Dockerfile",
        context,
        {"VLLM_VERSION": "0.21.0", "LMCACHE_VERSION": "0.5.5", "VLLM_PYTHON": str(image)},
        image_path,
    )
    assert outputs[2].startswith("applied the series of vLLM 0.21.0 to ")
    assert "lmcache_mp_connector_0201.LMCacheMPConnector" in outputs[3]
    assert outputs[3].rstrip().endswith("verdict: OK")

    # The installed tool, run from a directory outside the clone, finds its own series.
    def tool(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [image, "-m", "vllm_patches", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=_env(image_path),
        )

    status = tool("status", "--python", str(image))
    assert status.returncode == 0 and status.stdout.startswith("patched\n")
    pairs = tool("pairs", "0.21.0")
    assert pairs.returncode == 0 and pairs.stdout.startswith("vLLM 0.21.0: install lmcache==")
    reverted = tool("revert", "--python", str(image))
    assert reverted.returncode == 0, reverted.stderr
    assert tool("status", "--python", str(image)).returncode == 3  # unpatched
    rebase = tool("rebase", "--onto", "0.99.0")
    assert rebase.returncode == 1 and "needs a clone of vllm-lmcache-mp" in rebase.stderr


def test_dockerfile_gate_fails_the_build_on_a_pairing_that_cannot_start(
    image, image_path, tool_wheel, tmp_path
):
    context = tmp_path / "context"
    (context / "dist").mkdir(parents=True)
    shutil.copy(tool_wheel, context / "dist")
    refusal = (
        r"verdict: will fail when the engine starts: RuntimeError: vLLM 0\.21\.0\S*'s "
        r"LMCacheMPConnector does not know the adapter API of lmcache 0\.4\.3: "
    )
    with pytest.raises(AssertionError, match=refusal):
        run_dockerfile(
            EXAMPLES / "Dockerfile",
            context,
            # The series' builtin refuses lmcache 0.4.3 at construction (measured).
            {"VLLM_VERSION": "0.21.0", "LMCACHE_VERSION": "0.4.3", "VLLM_PYTHON": str(image)},
            image_path,
        )


def test_wheel_recipe_installs_the_patched_wheel(image, image_path, tool_wheel, tmp_path):
    # A wheel versioned as the release itself (the official wheels are), built from the sdist.
    built = cache_root() / "built-wheels" / "0.21.0-release"
    official = sorted(built.glob("vllm-*.whl")) if built.is_dir() else []
    if not official:
        python = vllm_env("0.21.0", "0.5.3")
        official = [wheels.pip_wheel(python, fetch_sdist("0.21.0"), built, "0.21.0", "empty")]
    context = tmp_path / "context"
    (context / "dist").mkdir(parents=True)
    shutil.copy(tool_wheel, context / "dist")
    wheels.repack(official[0], context / "dist")
    outputs = run_dockerfile(
        EXAMPLES / "Dockerfile.wheel",
        context,
        {"VLLM_VERSION": "0.21.0", "LMCACHE_VERSION": "0.5.5", "VLLM_PYTHON": str(image)},
        image_path,
    )
    assert outputs[-1].rstrip().endswith("verdict: OK")
    assert "patched (this series)" in outputs[-1]
