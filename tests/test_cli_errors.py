"""Every mistake a user can make gives one ``error:`` line and exit 1, never a traceback."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import sys
import tarfile

import pytest
from vllm_patches.errors import PatchToolError
from vllm_patches.sources.releases import read_sdist_file, release_arg


def _one_error_line(cli, *args: str) -> str:
    code, out, err = cli(*args)
    assert code == 1, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err + out
    return err.strip()


def test_python_that_is_not_a_program(cli, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    err = _one_error_line(cli, "status", "--python", str(text))
    assert "cannot run" in err and "give a program that runs here" in err


def test_python_that_is_not_python(cli):
    err = _one_error_line(cli, "status", "--python", "/bin/true")
    assert err == (
        "error: /bin/true did not answer as a Python interpreter; give the python of vLLM's venv"
    )


def test_doctor_where_there_is_no_vllm(cli):
    for args in ((), ("--live",)):
        err = _one_error_line(cli, "doctor", *args, "--python", sys.executable)
        assert f"no vllm is installed in {sys.executable}".lower() in err.lower()


def test_checkout_dest_that_is_a_file(cli, tmp_path):
    dest = tmp_path / "file"
    dest.write_text("x")
    err = _one_error_line(cli, "checkout", "0.21.0", "--dest", str(dest))
    assert err.endswith("is a file; give --dest a directory that is empty or does not exist")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--vllm", "abc"), "error: 'abc' is not a release number; give one like 0.21.0"),
        (("--vllm", "9.9.9"), "error: vLLM 9.9.9 has no series (supported: 0.12.0 … "),
        (("--vllm", "0.21.0", "--shard", ""), "error: --shard '': give i/n with 1 <= i <= n"),
        (("--merge", "/nonexistent/matrix.json"), "error: cannot read /nonexistent/matrix.json"),
    ],
)
def test_matrix_refuses_bad_input(cli, args, message):
    assert _one_error_line(cli, "matrix", *args).startswith(message)


def test_merge_of_a_file_that_is_not_a_table(cli, tmp_path):
    bad = tmp_path / "matrix.json"
    bad.write_text('{"rows": []}')
    err = _one_error_line(cli, "matrix", "--merge", str(bad))
    assert err == f"error: {bad} is not a matrix.json (no cells); give the files matrix wrote"


def test_release_numbers_are_normalised_or_refused():
    assert release_arg("v0.21.0") == "0.21.0"
    assert release_arg(" 0.21.0 ") == "0.21.0"
    with pytest.raises(
        PatchToolError, match=r"^'abc' is not a release number; give one like 0\.21\.0$"
    ):
        release_arg("abc")


def test_a_truncated_cached_sdist_is_removed_with_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_LMCACHE_MP_CACHE", str(tmp_path))
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        payload = os.urandom(100_000)
        info = tarfile.TarInfo("vllm-0.21.0/setup.py")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    truncated = gzip.compress(data.getvalue())[:50_000]
    sdists = tmp_path / "sdists"
    sdists.mkdir()
    sdist = sdists / "vllm-0.21.0.tar.gz"
    sdist.write_bytes(truncated)
    # Its .sha256 matches it: a truncated file whose checksum file was written after it.
    (sdists / "vllm-0.21.0.tar.gz.sha256").write_text(hashlib.sha256(truncated).hexdigest())
    with pytest.raises(PatchToolError, match=r"cannot read .*vllm-0\.21\.0\.tar\.gz \(EOFError"):
        read_sdist_file("0.21.0", "setup.py")
    assert not sdist.exists()
    assert not (sdists / "vllm-0.21.0.tar.gz.sha256").exists()
