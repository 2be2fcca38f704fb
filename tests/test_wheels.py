"""Patched wheels: repack (real vLLM wheel built from the 0.21.0 sdist), verify, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from vllm_patches._proc import stopped_on_signals
from vllm_patches._record import record_hash
from vllm_patches.series.manifest import CONNECTOR, load_manifest
from vllm_patches.sources.releases import cache_root, fetch_sdist, read_sdist_file
from vllm_patches.sources.venvs import vllm_env
from vllm_patches.targets import wheel as wheels

FACTORY = "vllm/distributed/kv_transfer/kv_connector/factory.py"


def make_wheel(directory: Path, files: dict[str, bytes], name="vllm", version="0.21.0") -> Path:
    """A small wheel with a consistent RECORD (for the bad-input cases)."""
    dist = f"{name}-{version}.dist-info"
    files = {
        **files,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nBuild: 1\nTag: py3-none-any\n",
    }
    rows = [f"{n},{record_hash(d)},{len(d)}" for n, d in files.items()]
    files[f"{dist}/RECORD"] = ("\n".join([*rows, f"{dist}/RECORD,,"]) + "\n").encode()
    path = directory / f"{name}-{version}-1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in files.items():
            zf.writestr(member, data)
    return path


@pytest.fixture
def small_wheel(tmp_path):
    files = {
        "vllm/__init__.py": b"",
        CONNECTOR: read_sdist_file("0.21.0", CONNECTOR),
        FACTORY: read_sdist_file("0.21.0", FACTORY),
        "vllm-0.21.0.dist-info/entry_points.txt": b"[console_scripts]\nvllm = vllm.cli:main\n",
    }
    src = tmp_path / "in"
    src.mkdir()
    return make_wheel(src, files)


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


def test_small_wheel_repack(small_wheel, out, cli):
    code, stdout, err = cli("wheel", "0.21.0", "--from-wheel", small_wheel, "--out", out)
    assert code == 0, err
    path = Path(stdout.strip().splitlines()[-1])
    assert path.name == "vllm-0.21.0+lmcachemp1-py3-none-any.whl"
    assert [p.name for p in out.iterdir()] == [path.name]
    assert wheels.verify(path) == []
    with zipfile.ZipFile(path) as zf:
        wheel = zf.read("vllm-0.21.0+lmcachemp1.dist-info/WHEEL").decode()
        assert "Build:" not in wheel
        metadata = zf.read("vllm-0.21.0+lmcachemp1.dist-info/METADATA").decode()
        assert "Version: 0.21.0+lmcachemp1\n" in metadata
        entry_points = zf.read("vllm-0.21.0+lmcachemp1.dist-info/entry_points.txt")
        assert entry_points.startswith(b"[console_scripts]")
        assert not [n for n in zf.namelist() if n.startswith("vllm-0.21.0.dist-info/")]
    assert cli("verify-wheel", path)[0] == 0


def test_local_label_is_kept():
    assert wheels.patched_version("0.21.0+cu129") == "0.21.0+cu129.lmcachemp1"
    assert wheels.patched_version("0.21.0") == "0.21.0+lmcachemp1"


def _refused(cli, out, *args, match):
    code, stdout, err = cli("wheel", *args, "--out", out)
    assert (code, stdout) == (1, "")
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
    assert not out.exists() or list(out.iterdir()) == []


def test_corrupt_zip(tmp_path, out, cli):
    bad = tmp_path / "vllm-0.21.0-py3-none-any.whl"
    bad.write_bytes(b"not a zip at all" * 100)
    _refused(cli, out, "0.21.0", "--from-wheel", bad, match="is not a readable wheel")


def test_truncated_zip(small_wheel, tmp_path, out, cli):
    cut = tmp_path / small_wheel.name
    cut.write_bytes(small_wheel.read_bytes()[: small_wheel.stat().st_size // 2])
    _refused(cli, out, "0.21.0", "--from-wheel", cut, match="is not a readable wheel")


def test_wheel_of_another_project(tmp_path, out, cli):
    other = make_wheel(tmp_path, {"foo/__init__.py": b""}, name="foo")
    _refused(cli, out, "0.21.0", "--from-wheel", other, match="is a wheel of foo, not of vLLM")


@pytest.mark.parametrize("member", ["../evil.py", "/etc/evil.py", "vllm/../../evil.py"])
def test_member_outside_the_tree(tmp_path, out, cli, member):
    bad = make_wheel(tmp_path, {member: b"x", "vllm/__init__.py": b""})
    _refused(cli, out, "0.21.0", "--from-wheel", bad, match="has a member outside the install tree")


def test_release_without_series(tmp_path, out, cli):
    old = make_wheel(tmp_path, {"vllm/__init__.py": b""}, version="0.10.0")
    _refused(cli, out, "0.10.0", "--from-wheel", old, match="vLLM 0.10.0 has no series")


@pytest.mark.network
def test_already_modified_target(tmp_path, out, cli):
    files = {CONNECTOR: b"# edited\n", FACTORY: read_sdist_file("0.21.0", FACTORY)}
    modified = make_wheel(tmp_path, files)
    _refused(cli, out, "0.21.0", "--from-wheel", modified, match="is not vLLM 0.21.0's original")
    code, _, _ = cli("wheel", "0.21.0", "--from-wheel", modified, "--out", out, "--force")
    assert code == 0


def test_out_dir_not_writable(small_wheel, tmp_path, cli):
    import shutil

    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available to make a directory read-only as root")
    out = tmp_path / "ro"
    out.mkdir()
    subprocess.run(["chattr", "+i", out], check=True)
    try:
        code, _, err = cli("wheel", "0.21.0", "--from-wheel", small_wheel, "--out", out)
    finally:
        subprocess.run(["chattr", "-i", out], check=True)
    assert code == 1 and "is not writable" in err
    assert list(out.iterdir()) == []


def test_interrupted_run_leaves_nothing(small_wheel, out, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(wheels, "_copy_run", interrupt)
    with pytest.raises(KeyboardInterrupt):
        wheels.repack(small_wheel, out)
    assert list(out.iterdir()) == []


def test_sigterm_during_a_repack_leaves_nothing(small_wheel, out, monkeypatch):
    def terminate(*args):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(wheels, "_copy_run", terminate)
    with pytest.raises(KeyboardInterrupt), stopped_on_signals():
        wheels.repack(small_wheel, out)
    assert list(out.iterdir()) == []


def test_a_stale_part_file_is_swept(small_wheel, out, cli):
    out.mkdir()
    stale = out / ".vllm-repack-abc.whl.part"
    stale.write_bytes(b"x" * 1000)
    old = time.time() - wheels.STALE_PART_SECONDS - 60
    os.utime(stale, (old, old))
    fresh = out / ".vllm-repack-def.whl.part"  # another repack may be writing this one
    fresh.write_bytes(b"y")
    code, _, err = cli("wheel", "0.21.0", "--from-wheel", small_wheel, "--out", out)
    assert code == 0, err
    assert not stale.exists() and fresh.exists()


@pytest.mark.network
def test_an_input_whose_record_does_not_verify(tmp_path, out, cli):
    files = {CONNECTOR: read_sdist_file("0.21.0", CONNECTOR)}
    good = make_wheel(tmp_path, {**files, FACTORY: read_sdist_file("0.21.0", FACTORY)})
    bad = tmp_path / "bad" / good.name
    bad.parent.mkdir()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data + b"# changed\n" if item.filename == CONNECTOR else data)
    _refused(cli, out, "0.21.0", "--from-wheel", bad, match="does not verify against its RECORD")
    code, _, err = cli("wheel", "0.21.0", "--from-wheel", bad, "--out", out, "--force")
    assert code == 0, err


def test_version_must_match_the_wheel(small_wheel, out, cli):
    _refused(
        cli,
        out,
        "0.20.1",
        "--from-wheel",
        small_wheel,
        match="is vLLM 0.21.0, not 0.20.1; give the wheel of 0.20.1, or pass --force",
    )
    code, stdout, err = cli("wheel", "0.20.1", "--from-wheel", small_wheel, "--out", out, "--force")
    assert code == 0, err
    assert Path(stdout.strip()).name == "vllm-0.21.0+lmcachemp1-py3-none-any.whl"


def test_out_that_is_a_file(small_wheel, tmp_path, cli):
    target = tmp_path / "file"
    target.write_text("x")
    code, _, err = cli("wheel", "0.21.0", "--from-wheel", small_wheel, "--out", target)
    assert code == 1 and err == f"error: {target} is a file; give --out a directory\n"


def test_verify_catches_a_tampered_record(small_wheel, out, tmp_path, cli):
    path = wheels.repack(small_wheel, out)
    tampered = tmp_path / path.name
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/RECORD"):
                data = data.replace(b"vllm/__init__.py,sha256=", b"vllm/__init__.py,sha256=X")
            dst.writestr(item, data)
    problems = wheels.verify(tampered)
    assert problems and problems[0].startswith("vllm/__init__.py: RECORD says sha256=X")
    code, _, err = cli("verify-wheel", tampered)
    assert code == 1 and "RECORD says" in err


# --- a real vLLM wheel (built from the 0.21.0 sdist, `empty` target) ---------------------------


@pytest.fixture(scope="module")
def real_wheel():
    python = vllm_env("0.21.0", "0.5.3")
    cached = cache_root() / "built-wheels" / "0.21.0"
    found = sorted(cached.glob("vllm-*.whl")) if cached.is_dir() else []
    if found:
        return found[0], python
    return wheels.pip_wheel(python, fetch_sdist("0.21.0"), cached, "0.21.0+empty", "empty"), python


@pytest.mark.slow
def test_real_wheel_repack_install_import_uninstall(real_wheel, tmp_path):
    source, env_python = real_wheel
    path = wheels.repack(source, tmp_path / "out")
    assert path.name == "vllm-0.21.0+empty.lmcachemp1-py3-none-any.whl"
    assert wheels.verify(path) == []
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(path) as new:
        # Unchanged members are the same compressed bytes (copied, not recompressed).
        member = "vllm/config/__init__.py"
        assert (old.getinfo(member).CRC, old.getinfo(member).compress_size) == (
            new.getinfo(member).CRC,
            new.getinfo(member).compress_size,
        )
        for group in load_manifest().release("0.21.0").groups:
            if group.installed:
                assert new.read(group.path) == group.overlay_file.read_bytes()
    # A fresh venv that sees the cached env's torch and lmcache behind its own site-packages.
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    base = next((env_python.parents[1] / "lib").glob("python3*/site-packages"))
    (site / "_base_env.pth").write_text(f"{base}\n")
    py = venv / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", path], check=True)
    probe = subprocess.run(
        [py, "-c", (
            "import importlib.metadata as md\n"
            "import vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector as m\n"
            "print(md.version('vllm'), m.__file__, m.LMCacheMPConnector.__module__)"
        )],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    version, module_file, resolved = probe.stdout.split()
    assert version == "0.21.0+empty.lmcachemp1"
    assert module_file.startswith(str(site))
    assert resolved == "lmcache.integration.vllm.lmcache_mp_connector_0201"
    before = {p.name for p in site.iterdir()}
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", "vllm"], check=True)
    left = {p.name for p in site.iterdir()}
    assert not any(n.startswith("vllm") for n in left)
    assert before - left >= {"vllm", "vllm-0.21.0+empty.lmcachemp1.dist-info"}


@pytest.mark.slow
def test_from_source(real_wheel, tmp_path, cli):
    code, out, err = cli("wheel", "0.21.0", "--from-source", "--out", tmp_path)
    assert code == 0, err
    path = Path(out.strip().splitlines()[-1])
    assert path.name == "vllm-0.21.0+empty.lmcachemp1-py3-none-any.whl"
    assert wheels.verify(path) == []
