"""The release watcher against a package index of its own on 127.0.0.1.

The index serves vLLM 0.34.0's real sdist and the same sdist repacked as 0.35.0 (a release
newer than the series), and lists an lmcache 0.5.7 beside 0.5.6: ``releases`` must find
both, and ``watch`` must carry the series onto 0.35.0 and write the pull request's body.
The index is the only thing made up: the sdists, git am -3 and the hooks are real.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import local_index, project_copy, run_tool
from vllm_patches.series.manifest import load_manifest
from vllm_patches.sources.releases import fetch_sdist

SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"


def _repack(sdist: Path, version: str, dest: Path) -> Path:
    """``sdist`` as vLLM ``version``: its top directory and PKG-INFO renamed, nothing else."""
    old_top = sdist.name.removesuffix(".tar.gz")
    out = dest / f"vllm-{version}.tar.gz"
    with tarfile.open(sdist) as src, tarfile.open(out, "w:gz", compresslevel=1) as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            member.name = f"vllm-{version}" + member.name[len(old_top) :]
            member.pax_headers.pop("path", None)  # it would name the old directory again
            if member.name == f"vllm-{version}/PKG-INFO" and data is not None:
                old = old_top.removeprefix("vllm-")
                data = data.replace(f"Version: {old}".encode(), f"Version: {version}".encode())
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return out


def _entry(path: Path, url: str) -> dict:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {
        "filename": path.name,
        "url": url,
        "hashes": {"sha256": digest},
        "size": path.stat().st_size,
    }


@pytest.fixture(scope="module")
def package_index(tmp_path_factory) -> Iterator[str]:
    """A PEP 691 index on 127.0.0.1 (a free port), stopped at the end."""
    files = tmp_path_factory.mktemp("index-files")
    real = fetch_sdist("0.34.0")
    served = {real.name: real, "vllm-0.35.0.tar.gz": _repack(real, "0.35.0", files)}
    pages = {
        "/simple/vllm/": {
            "meta": {"api-version": "1.0"},
            "name": "vllm",
            "files": [_entry(p, f"/files/{n}") for n, p in served.items()],
        },
        "/simple/lmcache/": {
            "meta": {"api-version": "1.0"},
            "name": "lmcache",
            "files": [  # listed, never downloaded
                {"filename": f"lmcache-{v}.tar.gz", "url": "/files/", "hashes": {"sha256": "0"}}
                for v in ("0.5.6", "0.5.7")
            ],
        },
    }

    routes = {path: (json.dumps(page).encode(), SIMPLE_JSON) for path, page in pages.items()}
    routes |= {
        f"/files/{name}": (path.read_bytes(), "application/gzip") for name, path in served.items()
    }
    with local_index(routes) as address:
        yield f"http://{address}/simple/"


@pytest.fixture
def watched(package_index, tmp_path, monkeypatch) -> Path:
    """A copy of this project that reads only the local index, its cache holding the older
    groups' base sdists (regenerating ``vllm_overlay/`` reads them) but not 0.34.0's."""
    cache = tmp_path / "cache" / "sdists"
    cache.mkdir(parents=True)
    for release in {g.base_release for g in load_manifest().groups.values()} - {"0.34.0"}:
        sdist = fetch_sdist(release)
        for path in (sdist, sdist.with_name(sdist.name + ".sha256")):
            (cache / path.name).symlink_to(path)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", package_index)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("VLLM_LMCACHE_MP_CACHE", str(tmp_path / "cache"))
    return project_copy(tmp_path, "99")


@pytest.mark.slow
def test_the_watcher_finds_a_new_release_and_carries_the_series(watched, tmp_path):
    proc = run_tool(watched, "vllm-patches", "releases", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "vllm": ["0.35.0"],
        "vllm_sdist": {"0.35.0": True},
        "vllm_missing": [],
        "table_rows": [],
        "lmcache": ["0.5.7"],
    }

    out = tmp_path / "bodies"
    proc = run_tool(watched, "vllm-patches", "watch", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"vLLM 0.35.0: carried: {out / 'vllm-0.35.0.md'}\n"
    meta = json.loads((out / "vllm-0.35.0.json").read_text())
    assert meta == {
        "title": "Carry the series onto vLLM 0.35.0",
        "carried": True,
        "body": str(out / "vllm-0.35.0.md"),
    }
    body = (out / "vllm-0.35.0.md").read_text().splitlines()
    assert body[:4] == [
        "The release watcher carried the series onto vLLM 0.35.0 with `vllm-patches rebase`.",
        "",
        "- carried the vLLM 0.34.0 series onto vLLM 0.35.0: "
        "0002 0003 0004 0005 0006 0007 0009 0010",
        "- new groups: none; reused: connector-0.34.0, tests, factory-0.34.0, tests-factory",
    ]
    assert "git range-diff, vLLM 0.34.0 series -> vLLM 0.35.0 series:" in body
    # The same files: every patch is carried unchanged ("=" in git range-diff).
    fence = body.index("```text")
    assert sum(" = " in line for line in body[fence:]) == 8

    carried = load_manifest(watched / "patches" / "series.toml").releases["0.35.0"]
    assert [g.name for g in carried.groups] == [
        "connector-0.34.0",
        "tests",
        "factory-0.34.0",
        "tests-factory",
    ]
    assert carried.upstream == ("0001", "0008")

    proc = run_tool(watched, "vllm-patches", "releases", "--json")
    assert json.loads(proc.stdout)["vllm"] == []
    assert json.loads(proc.stdout)["table_rows"] == ["0.35.0"]
