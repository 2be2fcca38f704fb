"""vLLM's own connector unit tests, unpatched vs patched, on the oldest and newest release."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

COPY_TABLE_TESTS = {
    "test_copy_is_used_where_main_fails",
    "test_copy_is_not_used_outside_its_releases",
    "test_main_module_is_preferred_to_the_copy",
    "test_unusable_copy_falls_back_to_builtin",
}


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
    # 55 + 6 tests, passing whichever lmcache is installed (0.3.9.post2 on 0.12.0, which has
    # no adapter: the tests give the connector lmcache-shaped fakes). The 16 tests of the copy
    # table skip where the file has none (it exists on the 0.20.0/0.21.0 bases only).
    assert len(resolution) == 55 and len(factory) == 6
    assert set(factory.values()) == {"passed"}
    skipped = {t.split("::")[1].split("[")[0] for t, o in resolution.items() if o == "skipped"}
    assert skipped == (set() if version == "0.21.0" else COPY_TABLE_TESTS)
    assert sum(o == "passed" for o in resolution.values()) == (55 if version == "0.21.0" else 39)
    assert not any(t in report["baseline"]["outcomes"] for t in [*resolution, *factory])
    assert "passed" in report["baseline"]["outcomes"].values()
    assert (tmp_path / "report.md").read_text().startswith(f"# vLLM {version} connector unit tests")
