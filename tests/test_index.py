"""The index client against a local index on 127.0.0.1 that requires credentials.

It serves the simple JSON API for one project, ``vllm``, with one sdist; pip's configuration
is given through its own environment variables, isolated from the machine's (PIP_CONFIG_FILE).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import sys
import tarfile

import pytest
from conftest import local_index
from vllm_patches.errors import PatchToolError
from vllm_patches.sources import index as _index
from vllm_patches.sources.releases import fetch_sdist, list_sdists

SECRET = "s3cret-token"


def _sdist() -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        payload = b"# setup\n"
        info = tarfile.TarInfo("vllm-9.9.9/setup.py")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return data.getvalue()


SDIST = _sdist()


ROUTES = {
    "/simple/vllm/": (
        json.dumps(
            {
                "files": [
                    {
                        "filename": "vllm-9.9.9.tar.gz",
                        "url": "../../files/vllm-9.9.9.tar.gz",
                        "hashes": {"sha256": hashlib.sha256(SDIST).hexdigest()},
                        "size": len(SDIST),
                    }
                ]
            }
        ).encode(),
        _index.SIMPLE_JSON,
    ),
    "/files/vllm-9.9.9.tar.gz": (SDIST, "application/gzip"),
}
AUTH = "Basic " + base64.b64encode(f"ci:{SECRET}".encode()).decode()


@pytest.fixture
def index(monkeypatch, tmp_path):
    """The local index's base URL; pip configured by environment only, caches emptied."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CERT", "PIP_CLIENT_CERT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLLM_LMCACHE_MP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    _index.config.cache_clear()
    with local_index(ROUTES, AUTH) as address:
        yield address
    _index.config.cache_clear()


def test_credentials_in_the_index_url_are_sent_and_the_sdist_checks_out(index, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", f"http://ci:{SECRET}@{index}/simple")
    assert list(list_sdists()) == ["9.9.9"]
    assert fetch_sdist("9.9.9").read_bytes() == SDIST


def test_a_rejected_credential_is_never_printed(index, monkeypatch, cli):
    monkeypatch.setenv("PIP_INDEX_URL", f"http://ci:{SECRET}-old@{index}/simple")
    with pytest.raises(PatchToolError) as error:
        list_sdists()
    assert SECRET not in str(error.value)
    assert f"http://ci:****@{index}/simple/" in str(error.value)
    code, out, err = cli("checkout", "9.9.9")
    assert code == 1 and SECRET not in out + err and "ci:****@" in err


def test_extra_index_url_is_searched_too(index, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", f"http://ci:{SECRET}@{index}/elsewhere")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"http://ci:{SECRET}@{index}/simple")
    assert list(list_sdists()) == ["9.9.9"]


def test_credentials_from_netrc(index, monkeypatch, tmp_path):
    netrc = tmp_path / "home" / ".netrc"
    netrc.write_text(f"machine 127.0.0.1 login ci password {SECRET}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://{index}/simple")
    assert list(list_sdists()) == ["9.9.9"]


def test_redact_keeps_the_user_and_hides_the_password():
    assert (
        _index.redact("https://u:p@h.example:8443/simple/")
        == "https://u:****@h.example:8443/simple/"
    )
    assert _index.redact("https://h.example/simple/") == "https://h.example/simple/"


def test_a_pipless_venv_uses_the_pip_on_path(monkeypatch, caplog):
    """uv makes venvs without pip: the tool then runs the pip it finds on PATH."""
    monkeypatch.setattr(_index.importlib.util, "find_spec", lambda name: None)
    _index.pip_command.cache_clear()
    try:
        command = _index.pip_command()
    finally:
        _index.pip_command.cache_clear()
    assert command[0] != sys.executable
    assert "has no pip; using " in caplog.text
