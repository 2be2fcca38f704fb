"""vLLM's own connector unit tests, unpatched vs patched, on the oldest and newest release."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("version", ["0.12.0", "0.21.0"])
def test_no_regressions_and_0003_passes(cli, tmp_path, version):
    code, out, err = cli("test", version, "--out", tmp_path)
    assert "no regressions" in out
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["regressions"] == []
    outcomes = report["patched"]["outcomes"]
    resolution = {t: o for t, o in outcomes.items() if "lmcache_mp_connector_resolution" in t}
    factory = {t: o for t, o in outcomes.items() if "kv_connector_factory_module_path" in t}
    # 35 + 6 tests; on 0.12.0 one is skipped (its builtin uses vLLM's own copy of the adapters).
    assert len(resolution) == 35 and len(factory) == 6
    assert set(factory.values()) == {"passed"}
    assert set(resolution.values()) == (
        {"passed", "skipped"} if version == "0.12.0" else {"passed"}
    )
    assert not any(t in report["baseline"]["outcomes"] for t in [*resolution, *factory])
    assert "passed" in report["baseline"]["outcomes"].values()
    assert (tmp_path / "report.md").read_text().startswith(f"# vLLM {version} connector unit tests")
