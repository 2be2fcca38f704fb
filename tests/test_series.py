"""The series itself: headers, no duplicates, bases, and overlay == base + series."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SUPPORTED, upstream_patches
from packaging.version import Version
from vllm_patches.series.manifest import (
    CONNECTOR,
    OVERLAY_DIR,
    PATCHES_DIR,
    file_sha256,
    load_manifest,
    sha256_bytes,
)
from vllm_patches.series.overlay import apply_to_bytes, regenerate
from vllm_patches.sources.releases import final_releases, read_sdist_file, release_file

# OE-core meta/lib/oe/qa.py check_upstream_status.
UPSTREAM_STATUS = re.compile(
    r"^Upstream-Status: (Pending|Submitted|Denied|Inappropriate|Backport|Inactive-Upstream)"
    r"( .+)?$",
    re.M,
)
ALL_PATCHES = sorted(PATCHES_DIR.rglob("*.patch"))


def _message(patch: Path) -> str:
    text = patch.read_text()
    return text[: text.index("\n---\n")]


@pytest.mark.parametrize("patch", ALL_PATCHES, ids=lambda p: f"{p.parent.name}/{p.name[:4]}")
def test_patch_headers(patch):
    message = _message(patch)
    assert message.startswith("From 0000000000000000000000000000000000000000 ")
    assert UPSTREAM_STATUS.search(message), "missing or malformed Upstream-Status"
    assert "Upstream-Status: Accepted" not in message
    assert re.search(r"^Last-Update: \d{4}-\d{2}-\d{2}$", message, re.M)
    trailers = [ln for ln in message.splitlines() if re.match(r"^[A-Z][\w-]+: ", ln)]
    assert trailers[-1].startswith("Signed-off-by: "), "Signed-off-by must be the last trailer"
    assert re.search(r"^Subject: \[PATCH\] \[KVConnector\](\[LMCache\])? ", message, re.M)
    assert "base-commit: " in patch.read_text()
    if "Backport [" in message:
        assert re.search(r"^Origin: backport, https://\S+", message, re.M)


def test_no_patch_is_stored_twice():
    bodies: dict[str, Path] = {}
    for patch in ALL_PATCHES:
        text = patch.read_text()
        diff = text[text.index("\ndiff --git ") :]
        # Same change against the same blob = the same patch stored twice.
        key = hashlib.sha256(re.sub(r"@@ .* @@", "", diff).encode()).hexdigest()
        assert key not in bodies, f"{patch} repeats {bodies[key]}"
        bodies[key] = patch


@pytest.mark.network
def test_the_series_has_every_release_on_the_index(manifest):
    """The oracle for SUPPORTED: every final vLLM release on the index from 0.12.0 to the
    series' newest has a series (a release dropped from the manifest fails here); one
    newer than that is the release watcher's to carry, not a failure."""
    newest = max(SUPPORTED, key=Version)
    on_index = [v for v in final_releases("vllm", "0.12.0") if Version(v) <= Version(newest)]
    assert on_index == SUPPORTED
    assert {"0.15.0", "0.15.1"} <= set(on_index)  # wheels only: carried all the same


def test_manifest_covers_every_release(manifest):
    assert not set(SUPPORTED) & set(manifest.unsupported)  # supported or refused, not both
    referenced = {p for g in manifest.groups.values() for p in g.patches}
    assert referenced == {p.relative_to(PATCHES_DIR).as_posix() for p in ALL_PATCHES}
    every = [f"{n:04d}" for n in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)]
    tests = {"0003", "0005", "0010", "0012"}
    for version in SUPPORTED:
        upstream = upstream_patches(version)
        assert manifest.releases[version].upstream == tuple(sorted(upstream))
        numbers = [p.name[:4] for p in manifest.releases[version].patch_files]
        # 0006 answers vLLM 0.34.0's scheduler output (no resumed_req_ids): from 0.34.0 on.
        # A release that ships wheels only has no tests to patch.
        wheel_only = version in ("0.15.0", "0.15.1")
        assert manifest.releases[version].wheel_only == wheel_only
        carried = [n for n in every if n not in upstream and not (wheel_only and n in tests)]
        if Version(version) < Version("0.34.0"):
            carried.remove("0006")
        # 0000 brings a release's own class to vLLM 0.21.0's, which 0001 and 0002 are for;
        # vLLM 0.20.0 and later ship that class.
        if Version(version) >= Version("0.20.0"):
            carried.remove("0000")
        # 0011 answers vLLM 0.12/0.13's update_state_after_alloc (the blocks of one call).
        if version not in ("0.12.0", "0.13.0"):
            carried.remove("0011")
        # 0012 tests the table of lmcache's connector copies, which only 0.20.x/0.21.0 have.
        if not wheel_only and not Version("0.20.0") <= Version(version) < Version("0.22.0"):
            carried.remove("0012")
        assert numbers == carried
    assert manifest.patches["0001"].first_release == "0.22.0"
    assert manifest.patches["0008"].first_release == "0.20.0"
    assert manifest.patches["0000"].only_before == "0.20.0"


@pytest.mark.parametrize("name", sorted(load_manifest().groups))
def test_every_group_goes_on_and_comes_off_exactly_without_git(manifest, name):
    """The overlay file with the group's patches taken off is its base; put back on, each
    step gives the result the manifest records and the last one the overlay file."""
    group = manifest.groups[name]
    patches = [PATCHES_DIR / p for p in group.patches]
    top = group.overlay_file.read_bytes() if group.installed else None
    base = apply_to_bytes(group.path, top, patches[::-1], reverse=True)[-1] if top else None
    assert file_sha256(base) == group.base_sha256
    results = apply_to_bytes(group.path, base, patches)
    assert [file_sha256(r) for r in results] == list(group.results)
    if top is not None:
        assert results[-1] == top


@pytest.mark.network
def test_overlay_and_hashes_are_up_to_date():
    assert regenerate(check=True) == []


@pytest.mark.parametrize("version", SUPPORTED)
@pytest.mark.network
def test_base_plus_series_equals_overlay(manifest, version):
    """For every supported release, its files (from its sdist, or its official wheel where it
    ships no sdist) + its series == the overlay, byte for byte."""
    release = manifest.releases[version]
    for group in release.groups:
        base = release_file(version, group.path)
        assert (sha256_bytes(base) if base is not None else "") == group.base_sha256
        results = apply_to_bytes(group.path, base, [PATCHES_DIR / p for p in group.patches])
        assert [sha256_bytes(r) for r in results] == list(group.results)
        if group.installed:
            assert group.overlay_file.read_bytes() == results[-1]


@pytest.mark.parametrize("version", ["0.22.0", "0.33.0"])
@pytest.mark.network
def test_upstream_releases_carry_42596(version):
    text = read_sdist_file(version, CONNECTOR)
    assert b"class LMCacheMPConnectorUpstream(" in text
    assert b"LMCacheMPConnector = _resolve_lmcache_mp_connector()" in text


@pytest.mark.network
def test_0001_on_021_is_upstreams_022_file(manifest):
    """0001 is faithful: on 0.21.0 it yields exactly vLLM 0.22.0's file."""
    group = manifest.releases["0.21.0"].groups[0]
    base = read_sdist_file("0.21.0", group.path)
    first = apply_to_bytes(group.path, base, [PATCHES_DIR / group.patches[0]])[0]
    assert first == read_sdist_file("0.22.0", CONNECTOR)


@pytest.mark.parametrize("overlay", sorted(OVERLAY_DIR.rglob("*.py")), ids=lambda p: p.parts[-7])
@pytest.mark.network
def test_overlay_passes_vllms_ruff_config(manifest, overlay, tmp_path):
    group = manifest.groups[overlay.relative_to(OVERLAY_DIR).parts[0]]
    # Lay the file out as in vLLM's tree, so that ruff sees ``vllm`` as first-party.
    (tmp_path / "pyproject.toml").write_bytes(read_sdist_file(group.base_release, "pyproject.toml"))
    copy = tmp_path / group.path
    copy.parent.mkdir(parents=True)
    copy.write_bytes(overlay.read_bytes())
    for parent in Path(group.path).parents:
        if parent != Path():
            (tmp_path / parent / "__init__.py").touch()
    text = overlay.read_text()
    assert text.startswith(
        "# SPDX-License-Identifier: Apache-2.0\n"
        "# SPDX-FileCopyrightText: Copyright contributors to the vLLM project\n"
    )
    for args in (["check"], ["format", "--check"]):
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", *args, group.path],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


# Where a release before 0.20.0 differs from vLLM 0.21.0's file once 0000 carries it there:
# its vLLM has no ParallelStrategy in lmcache_integration, so only lmcache's adapter is
# imported, and its KVConnectorBase_V1 takes kv_cache_config as optional.
_IMPORTS_021 = """try:
    from lmcache.integration.vllm.vllm_multi_process_adapter import (
        LMCacheMPSchedulerAdapter,
        LMCacheMPWorkerAdapter,
        LoadStoreOp,
        ParallelStrategy,
    )

    try:
        from lmcache.v1.multiprocess.custom_types import RequestAllocationRecord
    except ImportError:
        from lmcache.v1.multiprocess.custom_types import (
            BlockAllocationRecord as RequestAllocationRecord,
        )
except ImportError:
    from lmcache.v1.multiprocess.custom_types import (
        BlockAllocationRecord as RequestAllocationRecord,
    )

    from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_integration import (
        LMCacheMPSchedulerAdapter,
        LMCacheMPWorkerAdapter,
        LoadStoreOp,
        ParallelStrategy,
    )
"""
_IMPORTS_OLD = """try:
    from lmcache.v1.multiprocess.custom_types import RequestAllocationRecord
except ImportError:
    from lmcache.v1.multiprocess.custom_types import (
        BlockAllocationRecord as RequestAllocationRecord,
    )
"""
_UTILS = "from lmcache.integration.vllm.utils import mla_enabled\n"
_ADAPTER = """from lmcache.integration.vllm.vllm_multi_process_adapter import (
    LMCacheMPSchedulerAdapter,
    LMCacheMPWorkerAdapter,
    LoadStoreOp,
    ParallelStrategy,
)
"""
_KV_CACHE_CONFIG = ('        kv_cache_config: "KVCacheConfig",\n',
                    '        kv_cache_config: "KVCacheConfig | None" = None,\n')  # fmt: skip
_CONFIG = "from vllm.config import VllmConfig\n"
# vLLM 0.12's AttentionMetadata is in vllm.attention, which sorts before vllm.config.
_ATTENTION_METADATA_012 = (
    ("from vllm.v1.attention.backend import AttentionMetadata\n", ""),
    (_CONFIG, "from vllm.attention.backends.abstract import AttentionMetadata\n" + _CONFIG),
)


def _with_older_imports(text: bytes, release: str) -> bytes:
    """vLLM 0.21.0's (or 0.22.0's) file with the imports of a release before 0.20.0."""
    out = text.decode()
    replacements = [(_IMPORTS_021, _IMPORTS_OLD), (_UTILS, _UTILS + _ADAPTER), _KV_CACHE_CONFIG]
    if release == "0.12.0":
        replacements += _ATTENTION_METADATA_012
    for old, new in replacements:
        assert out.count(old) == 1
        out = out.replace(old, new)
    return out.encode()


@pytest.mark.parametrize("release", ["0.12.0", "0.14.0", "0.16.0", "0.17.0", "0.18.0"])
@pytest.mark.network
def test_0000_carries_021s_class_so_that_0001_is_upstreams_change(manifest, release):
    """On the bases before 0.20.0, 0000 yields vLLM 0.21.0's file and 0001 then vLLM 0.22.0's
    (upstream's change, #42596), each but for the release's imports; 0002 is the rest."""
    group = manifest.groups[f"connector-{release}"]
    assert group.numbers[:3] == ("0000", "0001", "0002")
    base = read_sdist_file(release, CONNECTOR)
    carried, resolved = apply_to_bytes(
        CONNECTOR, base, [PATCHES_DIR / p for p in group.patches[:2]]
    )
    assert carried == _with_older_imports(read_sdist_file("0.21.0", CONNECTOR), release)
    assert resolved == _with_older_imports(read_sdist_file("0.22.0", CONNECTOR), release)
