"""Proof on real installs: vLLM built from its sdist (CPU, ``empty`` target) + a real lmcache.

Fakes are used only where no real lmcache gives the case: a module that raises at import, or
that exports the wrong type; and on vLLM 0.12.0, whose lmcache has no MP connector at all.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from vllm_patches.diagnosis.probe import probe, resolution_line
from vllm_patches.series.manifest import CONNECTOR
from vllm_patches.sources.venvs import lmcache_layer, vllm_env
from vllm_patches.targets.apply import apply, status
from vllm_patches.targets.find import installed_vllm

pytestmark = pytest.mark.slow

LMCACHE_MODULE = "lmcache.integration.vllm.lmcache_mp_connector"
BUILTIN = (
    "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector.LMCacheMPConnectorUpstream"
)
UNPATCHED = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector.LMCacheMPConnector"
# (vLLM, lmcache of its time): the oldest release, the newest without #42596, the newest.
PAIRS = {"0.12.0": "0.3.9.post2", "0.21.0": "0.5.3", "0.33.0": "0.5.6"}
FROZEN = "lmcache.integration.vllm.lmcache_mp_connector_{}.LMCacheMPConnector"
MAIN = f"{LMCACHE_MODULE}.LMCacheMPConnector"
# What the patched resolution picks with the venv's own lmcache: the builtin on 0.12.0
# (lmcache 0.3.9.post2 has no MP connector); lmcache 0.5.3's _0201 on 0.21.0 (its main module
# needs a newer vLLM; _0201 imports and its calls bind; the builtin's do not); lmcache 0.5.6's
# main connector on 0.33.0.
DEFAULT = {"0.12.0": BUILTIN, "0.21.0": FROZEN.format("0201"), "0.33.0": MAIN}
UNAVAILABLE = (
    "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector"
    ".LMCacheMPConnectorUnavailable"
)
# ... and when lmcache's main module is broken: on 0.33.0 nothing (lmcache 0.5.6 ships no
# frozen copies, and vLLM 0.33.0's builtin cannot be built with it: `server_urls`), so the
# one clear error where upstream would fall back to a builtin that fails at engine start.
FALLBACK = {**DEFAULT, "0.33.0": UNAVAILABLE}
# Unpatched: vLLM's own class before #42596, lmcache's main connector after it.
UNPATCHED_CLASS = {"0.12.0": UNPATCHED, "0.21.0": UNPATCHED, "0.33.0": MAIN}
GOOD = """
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

class LMCacheMPConnector(KVConnectorBase_V1):
    pass
"""


def fake_lmcache_module(tmp_path: Path, source: str) -> Path:
    """A sys.path entry whose sitecustomize serves ``source`` as lmcache's connector module."""
    module = tmp_path / "fake_connector.py"
    module.write_text(textwrap.dedent(source))
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys

        class _Fake(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == {LMCACHE_MODULE!r}:
                    return importlib.util.spec_from_file_location(name, {str(module)!r})
                return None

        sys.meta_path.insert(0, _Fake())
        """)
    )
    return tmp_path


@pytest.fixture(scope="module", params=sorted(PAIRS))
def patched(request):
    """A real vLLM + lmcache, patched for the module's tests and reverted afterwards."""
    version = request.param
    python = vllm_env(version, PAIRS[version])
    site = installed_vllm(str(python))
    original = (site.root / CONNECTOR).read_bytes()
    unpatched = {"": probe(python), "0": probe(python, {"LMCACHE_USE_UPSTREAM_MP": "0"})}
    assert apply(site).changed
    yield version, python, site, unpatched
    apply(site, revert=True)
    assert (site.root / CONNECTOR).read_bytes() == original
    assert status(site).overall == "unpatched"


def _clean(log: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", resolution_line(log))


def test_unpatched_resolution(patched):
    version, _, _, unpatched = patched
    assert unpatched[""].ok and unpatched[""].cls == UNPATCHED_CLASS[version]
    assert unpatched[""].factory_is_cls


def test_env_zero_forced_the_builtin_upstream_and_no_longer_does(patched):
    """vLLM 0.22.0+ (#42596): LMCACHE_USE_UPSTREAM_MP=0 forced the builtin; patched, it does not."""
    version, python, _, unpatched = patched
    if version != "0.33.0":
        pytest.skip("the variable exists from vLLM 0.22.0 on")
    assert unpatched["0"].cls == BUILTIN
    assert probe(python, {"LMCACHE_USE_UPSTREAM_MP": "0"}).cls == MAIN


def test_status_is_patched(patched):
    _, _, site, _ = patched
    assert status(site).overall == "patched"


def test_default_resolution_with_real_lmcache(patched):
    version, python, _, _ = patched
    result = probe(python)
    assert result.ok and result.cls == DEFAULT[version]
    assert result.factory_is_cls and result.subclass
    line = _clean(result.log)
    if version == "0.33.0":
        assert "INFO" in line
        assert f"using {MAIN} from lmcache 0.5.6 (lmcache's main connector)" in line
    elif version == "0.12.0":
        # lmcache 0.3.9.post2 has no MP connector: the quiet, info-level fallback.
        assert "INFO" in line and f"{LMCACHE_MODULE} is not installed" in line
    else:
        # lmcache 0.5.3's main module needs vLLM >= 0.23 (KVCacheSpecKind); its frozen _0201
        # imports and binds: lmcache's real connector, where upstream's resolution gives the
        # builtin (which cannot even be built with lmcache 0.5.3).
        assert "INFO" in line and "using lmcache.integration.vllm.lmcache_mp_connector_0201" in line
        assert (
            f"skipped {LMCACHE_MODULE}: ImportError: cannot import name 'KVCacheSpecKind'" in line
        )


@pytest.mark.parametrize("value", ["1", "true", " ON "])
def test_env_forces_builtin(patched, value):
    _, python, _, _ = patched
    result = probe(python, {"LMCACHE_USE_UPSTREAM_MP": value})
    assert result.cls == BUILTIN and result.factory_is_cls
    assert "forced by LMCACHE_USE_UPSTREAM_MP" in _clean(result.log)


def test_env_zero_does_not_force(patched, tmp_path):
    """Upstream forced the builtin for any non-empty value, even 0."""
    _, python, _, _ = patched
    result = probe(python, {"LMCACHE_USE_UPSTREAM_MP": "0"}, [fake_lmcache_module(tmp_path, GOOD)])
    assert result.cls == f"{LMCACHE_MODULE}.LMCacheMPConnector"


def test_importable_lmcache_module_wins(patched, tmp_path):
    version, python, _, _ = patched
    # On 0.21.0 serve lmcache's real frozen connector that works there with lmcache 0.5.3
    # (built for real: _0201) under the main name; lmcache 0.3.9.post2 (the one vLLM 0.12.0
    # imports with) has no MP connector: a fake class.
    source = (
        "from lmcache.integration.vllm.lmcache_mp_connector_0201 import LMCacheMPConnector\n"
        if version == "0.21.0"
        else GOOD
    )
    result = probe(python, pythonpath=[fake_lmcache_module(tmp_path, source)])
    expected = (
        "lmcache.integration.vllm.lmcache_mp_connector_0201.LMCacheMPConnector"
        if version == "0.21.0"
        else f"{LMCACHE_MODULE}.LMCacheMPConnector"
    )
    assert result.ok and result.cls == expected
    assert result.factory == expected and result.factory_is_cls and result.subclass
    assert "using " in _clean(result.log)


@pytest.mark.parametrize(
    "source, reason",
    [
        ("raise RuntimeError('lmcache is broken')", "RuntimeError: lmcache is broken"),
        ("LMCacheMPConnector = object", "not a KVConnectorBase_V1 subclass"),
    ],
)
def test_broken_lmcache_module_falls_back(patched, tmp_path, source, reason):
    version, python, _, _ = patched
    result = probe(python, pythonpath=[fake_lmcache_module(tmp_path, source)])
    assert result.ok, "importing vLLM's module must keep working"
    assert result.cls == FALLBACK[version] and result.factory_is_cls and result.subclass
    line = _clean(result.log)
    assert reason in line
    assert {BUILTIN: "WARNING", UNAVAILABLE: "ERROR"}.get(FALLBACK[version], "INFO") in line


def test_broken_lmcache_module_crashes_upstreams_resolution(patched, tmp_path):
    """Why 0002 exists: with 0001 alone, a RuntimeError at import stops vLLM."""
    version, python, site, _ = patched
    # Put the 0001-only file in place for this one probe.
    from vllm_patches.series.manifest import PATCHES_DIR, load_manifest
    from vllm_patches.series.overlay import apply_to_bytes

    release = load_manifest().releases[version]
    group = next(g for g in release.groups if g.path == CONNECTOR)
    path = site.root / CONNECTOR
    patched_bytes = path.read_bytes()
    from vllm_patches.sources.releases import read_sdist_file

    base = read_sdist_file(group.base_release, CONNECTOR)
    # From 0.22.0 on, vLLM's own file is upstream's resolution (0001).
    only_0001 = (
        base
        if "0001" in release.upstream
        else apply_to_bytes(CONNECTOR, base, [PATCHES_DIR / group.patches[0]])[0]
    )
    path.write_bytes(only_0001)
    try:
        result = probe(
            python, pythonpath=[fake_lmcache_module(tmp_path, "raise RuntimeError('x')")]
        )
    finally:
        path.write_bytes(patched_bytes)
    assert not result.ok and "RuntimeError: x" in result.error


# --- 0.21.0 with other real lmcache releases, laid over the venv's ------------------------------


@pytest.fixture(scope="module")
def vllm_021():
    python = vllm_env("0.21.0", PAIRS["0.21.0"])
    site = installed_vllm(str(python))
    apply(site)
    yield python
    apply(site, revert=True)


def test_lmcache_050_stops_with_the_clear_error(vllm_021):
    """Built for real against lmcache 0.5.0's server, nothing works on 0.21.0 (_0180:
    ZMQError, a URL string for server_urls; _0201 and the builtin: ParallelStrategy's arity):
    the static check sees all three."""
    result = probe(vllm_021, pythonpath=[lmcache_layer(vllm_021, "0.5.0")])
    assert result.ok and result.cls.endswith(".LMCacheMPConnectorUnavailable")
    line = _clean(result.log)
    assert "no connector can be built with vLLM 0.21.0 and lmcache 0.5.0" in line
    assert "lmcache_mp_connector_0180: cannot be built: LMCacheMPSchedulerAdapter() at line" in line
    assert "server_urls takes list[str], not a str" in line
    assert "lmcache_mp_connector_0201: cannot be built: ParallelStrategy() at line" in line


def test_lmcache_056_stops_with_one_clear_error(vllm_021):
    """lmcache 0.5.6: no frozen copies, main module needs vLLM >= 0.23, builtin cannot build."""
    layer = lmcache_layer(vllm_021, "0.5.6")
    result = probe(vllm_021, pythonpath=[layer])
    assert result.ok, "importing vLLM's module must still work (doctor, tools)"
    assert result.cls.endswith(".LMCacheMPConnectorUnavailable") and result.subclass
    line = _clean(result.log)
    assert "ERROR" in line
    assert "no connector can be built with vLLM 0.21.0 and lmcache 0.5.6" in line
    assert "KVCacheSpecKind" in line and "vLLM's builtin connector: cannot be built" in line
    assert "set LMCACHE_MP_CONNECTOR_MODULE" in line
    import subprocess

    build = subprocess.run(
        [
            vllm_021,
            "-c",
            (
                "import vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector as m\n"
                "m.LMCacheMPConnector(None, None)"
            ),
        ],
        env={"PYTHONPATH": str(layer), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert build.returncode == 1
    assert "RuntimeError: LMCacheMPConnector: no connector can be built" in build.stderr


@pytest.mark.parametrize(
    "module, expected, reason",
    [
        ("lmcache.integration.vllm.lmcache_mp_connector_0201", FROZEN.format("0201"), "set by"),
        (
            "lmcache.integration.vllm.lmcache_mp_connector_0180",
            "LMCacheMPConnectorUnavailable",
            "server_urls takes list[str], not a str",
        ),
        ("no_such_module", "LMCacheMPConnectorUnavailable", "no_such_module is not installed"),
        ("json", "LMCacheMPConnectorUnavailable", "json.LMCacheMPConnector is None"),
    ],
)
def test_explicit_module_override(vllm_021, module, expected, reason):
    result = probe(vllm_021, {"LMCACHE_MP_CONNECTOR_MODULE": module})
    assert result.ok and result.cls.endswith(expected)
    line = _clean(result.log)
    assert reason in line
    # The user's choice is the only candidate: no other frozen copy is tried instead.
    others = {"_0180", "_0201"} - {module[-5:]}
    assert not any(f"lmcache_mp_connector{o}" in line for o in others)
