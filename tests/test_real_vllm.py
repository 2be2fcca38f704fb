"""Proof on real installs: vLLM built from its sdist (CPU, ``empty`` target) + a real lmcache.

Fakes are used only where no real lmcache gives the case: a module that raises at import, or
that exports the wrong type; on vLLM 0.12.0, whose lmcache has no MP connector at all; and an
adapter API no vLLM knows (lmcache 0.5.6 with one more required field).
"""

from __future__ import annotations

import re
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import factory_class, lmcache_unknown_to_the_builtin
from vllm_patches.diagnosis.live import model_dir
from vllm_patches.diagnosis.probe import probe, resolution_line
from vllm_patches.probes import PROBES
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
# needs a newer vLLM; _0201 is the copy measured to work there with 0.5.2-0.5.5); lmcache
# 0.5.6's main connector on 0.33.0.
DEFAULT = {"0.12.0": BUILTIN, "0.21.0": FROZEN.format("0201"), "0.33.0": MAIN}
# ... and when lmcache's main module is broken: on 0.33.0 the builtin (lmcache 0.5.6 ships no
# copies), which speaks 0.5.6's adapter API by name.
FALLBACK = {**DEFAULT, "0.33.0": BUILTIN}
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
    """LMCACHE_USE_UPSTREAM_MP=0: vLLM 0.22.0+ (#42596) reads any non-empty value as "force
    the builtin", earlier releases do not read it; patched, "0" prefers lmcache's class."""
    version, python, _, unpatched = patched
    assert unpatched["0"].cls == (BUILTIN if version == "0.33.0" else UNPATCHED)
    assert probe(python, {"LMCACHE_USE_UPSTREAM_MP": "0"}).cls == DEFAULT[version]


def test_status_is_patched(patched):
    _, _, site, _ = patched
    assert status(site).overall == "patched"


def test_default_resolution_with_real_lmcache(patched):
    version, python, _, _ = patched
    result = probe(python)
    assert result.ok and result.cls == DEFAULT[version]
    assert result.factory_is_cls and result.subclass
    line = _clean(result.log)
    assert "INFO" in line and f"LMCacheMPConnector is {DEFAULT[version]} (" in line
    if version == "0.33.0":
        assert f"({LMCACHE_MODULE} imports)." in line
    elif version == "0.12.0":
        # lmcache 0.3.9.post2 has no MP connector.
        assert f"({LMCACHE_MODULE}: ModuleNotFoundError: No module named " in line
    else:
        # lmcache 0.5.3's main module needs vLLM >= 0.23 (KVCacheSpecKind); its _0201 imports:
        # lmcache's real connector, where upstream's resolution gives the builtin.
        assert f"({LMCACHE_MODULE}: ImportError: cannot import name 'KVCacheSpecKind'" in line
        assert f"; {LMCACHE_MODULE}_0201 imports)." in line


@pytest.mark.parametrize("value", ["1", "true", "ON"])
def test_env_forces_builtin(patched, value):
    _, python, _, _ = patched
    result = probe(python, {"LMCACHE_USE_UPSTREAM_MP": value})
    assert result.cls == BUILTIN and result.factory_is_cls
    assert f"{BUILTIN} (LMCACHE_USE_UPSTREAM_MP is set)." in _clean(result.log)


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
    assert f"LMCacheMPConnector is {expected} ({LMCACHE_MODULE} imports)." in _clean(result.log)


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
    assert "INFO" in line and f"LMCacheMPConnector is {FALLBACK[version]} (" in line
    assert f"({LMCACHE_MODULE}: {reason}" in line


# On 0.12.0 the module after 0000 and 0001 does not import with lmcache 0.3.9.post2 at all
# (it has no multi-process adapter), so upstream's resolution is shown where the module imports.
@pytest.mark.parametrize("patched", ["0.21.0", "0.33.0"], indirect=True)
def test_broken_lmcache_module_crashes_upstreams_resolution(patched, tmp_path):
    """Why 0004 exists: with 0001 alone, a RuntimeError at import stops vLLM."""
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


def test_lmcache_050_gets_the_builtin(vllm_021):
    """lmcache 0.5.0: its main module needs a newer vLLM, and no copy of it was measured to
    work on 0.21.0 (_0180: ZMQError, _0201: ParallelStrategy's arity): the builtin, which
    speaks 0.5.0's adapter API by name."""
    result = probe(vllm_021, pythonpath=[lmcache_layer(vllm_021, "0.5.0")])
    assert result.ok and result.cls == BUILTIN
    line = _clean(result.log)
    assert f"({LMCACHE_MODULE}: ImportError: cannot import name 'KVCacheSpecKind'" in line
    assert "_0180" not in line and "_0201" not in line


BUILD = """
import sys
sys.path.insert(0, {probes!r})
from connector_build import construct, error_text, kv_cache_config, vllm_config
import vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector as m
config = vllm_config({model!r}, "tcp://127.0.0.1:1")
for role in ("SCHEDULER", "WORKER"):
    try:
        construct(m.LMCacheMPConnector, config, role, kv_cache_config(config))
    except Exception as exc:
        print("ERROR", role, error_text(exc))
"""


def test_an_adapter_the_builtin_does_not_know_stops_it_with_one_error(vllm_021, tmp_path):
    """The module imports (doctor, tools) and resolves to the builtin; constructing it, as the
    engine does for each role, stops before it connects with one error naming both versions
    and what to do."""
    layer = lmcache_unknown_to_the_builtin(vllm_021, tmp_path)
    result = probe(vllm_021, pythonpath=[layer])
    assert result.ok and result.cls == BUILTIN
    build = subprocess.run(
        [vllm_021, "-c", BUILD.format(probes=str(PROBES), model=str(model_dir()))],
        env={"PYTHONPATH": str(layer), "PATH": "/usr/bin:/bin", "LMCACHE_LOG_LEVEL": "ERROR"},
        capture_output=True,
        text=True,
        check=True,
    )
    error = (
        "RuntimeError: vLLM 0.21.0+cpu's LMCacheMPConnector does not know the adapter API of "
        "lmcache 0.9.0: its ParallelStrategy requires cp_rank. Install an lmcache release whose "
        "adapter this vLLM knows (0.4.6 to 0.5.6 were checked), or set kv_connector_module_path "
        "to a connector made for lmcache 0.9.0."
    )
    errors = [line for line in build.stdout.splitlines() if line.startswith("ERROR ")]
    assert errors == [f"ERROR SCHEDULER {error}", f"ERROR WORKER {error}"]


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (f"{LMCACHE_MODULE}_0201", FROZEN.format("0201")),
        # The user's choice is taken as it is, even a copy the resolution would not pick.
        (f"{LMCACHE_MODULE}_0180", FROZEN.format("0180")),
        ("no_such_module", "ModuleNotFoundError: No module named 'no_such_module'"),
    ],
)
def test_kv_connector_module_path_names_the_module(vllm_021, tmp_path, module, expected):
    got = factory_class(vllm_021, module, tmp_path)
    if module == "no_such_module":
        assert got["error"].startswith(expected)
    else:
        log = f"{expected}, from kv_connector_module_path={module}"
        assert got == {"cls": expected, "log": log}


def test_the_cli_on_a_real_vllm_0_34_0_install(cli):
    """The newest release as a user meets it: status, apply, pairs, doctor and revert on vLLM
    0.34.0 with lmcache 0.5.6 installed, the files back byte for byte."""
    python = vllm_env("0.34.0", "0.5.6")
    site = installed_vllm(str(python))
    files = [CONNECTOR, "vllm/distributed/kv_transfer/kv_connector/factory.py"]
    before = {path: (site.root / path).read_bytes() for path in files}
    code, out, _ = cli("status", "--python", python)
    assert code == 3 and out.startswith("unpatched\n")
    code, out, err = cli("apply", "--python", python)
    try:
        assert code == 0, err
        code, out, _ = cli("status", "--python", python)
        assert code == 0 and out.startswith("patched\n")
        code, out, _ = cli("pairs", "0.34.0")
        assert code == 0 and out.startswith("vLLM 0.34.0: install lmcache==0.5.6 ")
        code, out, _ = cli("doctor", "--python", python)
        assert code == 0 and out.endswith("verdict: OK\n"), out
        assert f"resolves to {BUILTIN}\n" in out
    finally:
        code, _, err = cli("revert", "--python", python)
    assert code == 0, err
    assert cli("status", "--python", python)[0] == 3
    assert {path: (site.root / path).read_bytes() for path in files} == before
