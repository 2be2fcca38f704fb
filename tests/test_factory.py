"""kv_connector_module_path on real vLLM 0.12.0 and 0.19.1: ignored unpatched, honoured patched."""

from __future__ import annotations

import textwrap

import pytest
from conftest import factory_class
from vllm_patches.sources.venvs import vllm_env
from vllm_patches.targets.apply import apply, status
from vllm_patches.targets.find import installed_vllm

pytestmark = pytest.mark.slow

FACTORY = "vllm/distributed/kv_transfer/kv_connector/factory.py"
BUILTIN_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector"


@pytest.fixture
def my_module(tmp_path):
    (tmp_path / "my_mp_connector.py").write_text(
        textwrap.dedent("""
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

        class LMCacheMPConnector(KVConnectorBase_V1):
            pass
        """)
    )
    return tmp_path


@pytest.mark.parametrize(
    "version, lmcache, module_path, expected",
    [
        ("0.12.0", "0.3.9.post2", "my_mp_connector", "my_mp_connector.LMCacheMPConnector"),
        (
            "0.19.1",
            "0.5.3",
            "lmcache.integration.vllm.lmcache_mp_connector_0180",
            "lmcache.integration.vllm.lmcache_mp_connector_0180.LMCacheMPConnector",
        ),
    ],
)
def test_module_path_ignored_unpatched_honoured_patched(
    my_module, version, lmcache, module_path, expected
):
    python = vllm_env(version, lmcache)
    site = installed_vllm(str(python))
    original = (site.root / FACTORY).read_bytes()
    # The bug: the registry wins, even for a module that does not exist.
    assert (
        factory_class(python, module_path, my_module)["cls"]
        == f"{BUILTIN_MODULE}.LMCacheMPConnector"
    )
    assert factory_class(python, "no_such_module", my_module)["cls"].startswith(BUILTIN_MODULE)
    apply(site)
    try:
        assert "0008 applied" in " ".join(status(site).lines())
        got = factory_class(python, module_path, my_module)
        assert got["cls"] == expected
        assert got["log"] == f"{expected}, from kv_connector_module_path={module_path}"
        missing = factory_class(python, "no_such_module", my_module)
        assert missing["error"].startswith("ModuleNotFoundError: No module named 'no_such_module'")
        registry = factory_class(python, "", my_module)
        # Without a module path: the registry; the factory names the class it got and
        # nothing else (the resolution logs its own reason at import).
        assert registry["log"] == f"{registry['cls']}, from vLLM's connector registry"
    finally:
        apply(site, revert=True)
    assert (site.root / FACTORY).read_bytes() == original
    assert (
        factory_class(python, module_path, my_module)["cls"]
        == f"{BUILTIN_MODULE}.LMCacheMPConnector"
    )
