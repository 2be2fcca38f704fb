"""Nothing in vLLM's connector module reads source or walks packages at import (issue #24).

The probe (``probes/import_reads.py``) records the standard library's source readers and
package walkers when the module's own code calls them while it imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_patches.probes import PROBES

PROBE = PROBES / "import_reads.py"


def _reads(python: str | Path, module: str | None = None, path: Path | None = None) -> list:
    env = {**os.environ, "PYTHONPATH": str(path)} if path else None
    out = subprocess.run(
        [str(python), str(PROBE), *([module] if module else [])],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("READS "))
    return json.loads(line.removeprefix("READS "))


def test_the_probe_sees_a_module_that_reads_source_and_walks_packages(tmp_path):
    (tmp_path / "reader.py").write_text(
        "import ast\nimport inspect\nimport json\nimport pkgutil\n\n"
        "ast.parse(inspect.getsource(json))\n"
        "found = list(pkgutil.iter_modules(json.__path__))\n"
    )
    assert _reads(sys.executable, "reader", tmp_path) == [
        "inspect.getsource",
        "ast.parse",
        "pkgutil.iter_modules",
    ]


def test_the_probe_does_not_count_what_imported_modules_do(tmp_path):
    (tmp_path / "importer.py").write_text("import reader\nimport inspect\n")
    (tmp_path / "reader.py").write_text("import inspect\ninspect.getsource(inspect)\n")
    assert _reads(sys.executable, "importer", tmp_path) == []
    assert _reads(sys.executable, "reader", tmp_path) == ["inspect.getsource"]


@pytest.mark.slow
@pytest.mark.parametrize(("version", "lmcache"), [("0.21.0", "0.5.3"), ("0.21.0", "0.5.6")])
def test_the_patched_connector_module_reads_no_source_at_import(
    patched, monkeypatch, version, lmcache
):
    """On 0.21.0 the resolution runs every step there is: lmcache's main connector fails to
    import there, then (0.5.3) lmcache's copy made for it is imported."""
    from vllm_patches.sources.venvs import lmcache_layer

    python = patched(version, "0.5.3")
    layer = lmcache_layer(python, lmcache)
    assert _reads(python, path=layer) == []
