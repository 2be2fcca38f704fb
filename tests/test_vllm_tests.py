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
    copies = {t: o for t, o in outcomes.items() if "lmcache_mp_connector_copies" in t}
    factory = {t: o for t, o in outcomes.items() if "kv_connector_factory_module_path" in t}
    # 49 + 6 tests (+ 16 of lmcache's copy table on the 0.20/0.21 bases, which have one),
    # passing whichever lmcache is installed (0.3.9.post2 on 0.12.0, which has no adapter: the
    # tests give the connector lmcache-shaped fakes), none skipped. Six of the 49 are 0004's
    # warnings: quiet where lmcache's module or class is missing (3), a warning with the
    # traceback where it raises (1), an unrecognised variable named (2).
    assert (len(resolution), len(copies), len(factory)) == (
        (49, 16, 6) if version == "0.21.0" else (49, 0, 6)
    )
    assert set(resolution.values()) == set(factory.values()) == {"passed"}
    assert set(copies.values()) <= {"passed"}
    assert not any(t in report["baseline"]["outcomes"] for t in [*resolution, *copies, *factory])
    assert "passed" in report["baseline"]["outcomes"].values()
    assert (tmp_path / "report.md").read_text().startswith(f"# vLLM {version} connector unit tests")
