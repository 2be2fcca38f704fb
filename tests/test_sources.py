"""Pinned checkouts from real sdists, through pip's configured index, cached."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
from vllm_patches.sources import index as _index
from vllm_patches.sources import venvs
from vllm_patches.sources.releases import cache_root


def _git(tree, *args):
    return subprocess.run(["git", *args], cwd=tree, check=True, capture_output=True, text=True)


@pytest.mark.network
def test_checkout_is_cached_and_reused(cli):
    code, out, _ = cli("checkout", "0.21.0")
    first = out.splitlines()[-1]
    assert code == 0 and first == str(cache_root() / "checkouts" / "v0.21.0")
    head = _git(first, "rev-parse", "HEAD").stdout
    assert _git(first, "rev-list", "--count", "HEAD").stdout.strip() == "1"
    assert _git(first, "rev-parse", "v0.21.0^{commit}").stdout == head
    code, out, _ = cli("checkout", "0.21.0")
    assert out.splitlines()[-1] == first
    assert _git(first, "rev-parse", "HEAD").stdout == head


@pytest.mark.network
def test_checkout_dest(cli, tmp_path):
    code, out, _ = cli("checkout", "0.12.0", "--dest", tmp_path / "v")
    assert code == 0 and out.splitlines()[-1] == str(tmp_path / "v")
    assert _git(tmp_path / "v", "describe", "--tags").stdout.strip() == "v0.12.0"
    assert _git(tmp_path / "v", "status", "--porcelain").stdout == ""
    assert (tmp_path / "v" / "PKG-INFO").read_text().startswith("Metadata-Version")


def test_checkout_refuses_a_non_empty_dest(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    code, out, err = cli("checkout", "0.12.0", "--dest", tmp_path)
    assert (code, out) == (1, "")
    assert err == f"error: {tmp_path} exists and is not empty; pass another --dest or remove it\n"


@pytest.mark.network
def test_unknown_and_malformed_versions(cli):
    code, _, err = cli("checkout", "0.21.7")
    assert code == 1 and err == (
        "error: vLLM 0.21.7 has no sdist on the package index; pick a released version\n"
    )
    code, _, err = cli("checkout", "latest")
    assert code == 2 and "'latest' is not a release number" in err


def test_index_url_follows_pip(monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.invalid/simple")
    _index.config.cache_clear()
    try:
        assert _index.config().urls[0] == "https://mirror.invalid/simple/"
    finally:
        _index.config.cache_clear()


def test_one_process_builds_a_venv_and_the_others_wait_for_it(tmp_path, monkeypatch, caplog):
    """Two builders of one venv would remove each other's half-built trees (seen when two
    matrix runs shared a row): the second waits, then uses what the first built."""
    monkeypatch.setenv("VLLM_LMCACHE_MP_CACHE", str(tmp_path))
    builds = []
    started = threading.Event()

    def build(venv, version, lmcache, *, test_deps):
        builds.append(venv.name)
        started.set()
        time.sleep(0.5)
        venv.mkdir(parents=True)
        (venv / ".complete").write_text("built\n")

    monkeypatch.setattr(venvs, "_build", build)
    found = []
    first = threading.Thread(target=lambda: found.append(venvs.vllm_env("0.21.0", "0.5.3")))
    first.start()
    started.wait(5)
    found.append(venvs.vllm_env("0.21.0", "0.5.3"))
    first.join()
    assert builds == ["vllm-0.21.0-lmcache-0.5.3"]
    assert found == [tmp_path / "venvs/vllm-0.21.0-lmcache-0.5.3/bin/python"] * 2
    assert "waiting for another process that builds" in caplog.text


def test_the_cached_venvs_share_their_identical_files(tmp_path):
    big = bytes(range(256)) * 400  # 100 KiB: over the 64 KiB hardlink looks at
    for name in ("vllm-a", "vllm-b", "vllm-half-built"):
        site = tmp_path / name / "lib" / "site-packages"
        site.mkdir(parents=True)
        (site / "libtorch.so").write_bytes(big)
        (site / "small.py").write_bytes(b"x" * 100)
        (site / "own.so").write_bytes(big + name.encode())
    for name in ("vllm-a", "vllm-b"):
        (tmp_path / name / ".complete").write_text("vllm\n")

    venvs.share_identical_files(tmp_path)

    def inode(name, file):
        return (tmp_path / name / "lib" / "site-packages" / file).stat().st_ino

    assert inode("vllm-a", "libtorch.so") == inode("vllm-b", "libtorch.so")
    # A venv still being built is left alone; small and differing files keep their own copies.
    assert inode("vllm-half-built", "libtorch.so") != inode("vllm-a", "libtorch.so")
    assert inode("vllm-a", "small.py") != inode("vllm-b", "small.py")
    assert inode("vllm-a", "own.so") != inode("vllm-b", "own.so")
    assert (tmp_path / "vllm-b" / "lib" / "site-packages" / "libtorch.so").read_bytes() == big
