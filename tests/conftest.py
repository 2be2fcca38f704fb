"""Shared fixtures: real vLLM trees from real sdists (download-cached under ~/.cache)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pytest
from packaging.version import Version
from vllm_patches.__main__ import apply_main, main
from vllm_patches._record import record_hash
from vllm_patches.series.manifest import CONNECTOR, REPO_ROOT, load_manifest
from vllm_patches.series.overlay import dump_manifest
from vllm_patches.sources.releases import checkout, fetch_sdist

INDEX_FIXTURES = {"git_tree", "plain_tree", "fake_site", "small_wheel"}
"""Fixtures built from real sdists, which a fresh machine fetches from the package index."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that reach the index are ``network``: the sdist-backed fixtures, and ``slow``.

    The hermetic tier runs first, then ``network``, then ``slow``: a run fails fast.
    """
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        if uses & INDEX_FIXTURES or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.network)
    items.sort(
        key=lambda item: (
            item.get_closest_marker("slow") is not None,
            item.get_closest_marker("network") is not None,
        )
    )


USER_IDENTITY = ("-c", "user.name=A User", "-c", "user.email=user@example.org")
"""What a test passes to git for commits of its own, as a user with an identity would."""


@pytest.fixture(autouse=True, scope="session")
def _no_machine_git_config(tmp_path_factory):
    """Run as on a fresh machine: no ~/.gitconfig (so no identity) and no system config."""
    empty = tmp_path_factory.mktemp("git-config") / "gitconfig"
    empty.write_text("")
    patch = pytest.MonkeyPatch()
    patch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    patch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    yield
    patch.undo()


SUPPORTED = sorted(load_manifest().releases, key=Version)
"""Every release the series supports, oldest first, as the manifest lists them (that these
are every vLLM release on the index from 0.12.0 on, but the refused ones, is checked against
the index by ``test_series.py::test_the_series_has_every_release_on_the_index``)."""
FROM_SDIST = [v for v in SUPPORTED if not load_manifest().releases[v].wheel_only]
"""The supported releases that ship an sdist (a tree with tests can be made of them)."""


def upstream_patches(version: str) -> tuple[str, ...]:
    """The series' patches upstream took by ``version`` (each patch's ``first_release``)."""
    return tuple(
        number
        for number, info in load_manifest().patches.items()
        if info.first_release and Version(version) >= Version(info.first_release)
    )


@pytest.fixture(scope="session")
def manifest():
    return load_manifest()


def run_cli(
    entry: Callable, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """Run a CLI entry point in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = entry([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli(capsys):
    return lambda *args: run_cli(main, capsys, *args)


@pytest.fixture
def apply_cli(capsys):
    return lambda *args: run_cli(apply_main, capsys, *args)


def tree_snapshot(root: Path) -> dict[str, str]:
    """Hash of every file below ``root`` and of git's HEAD, refs and config (proves no change).

    git's own bookkeeping (objects, reflogs, ORIG_HEAD, the index's stat cache) may change.
    """
    snap: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".git/") and not (
            rel in (".git/HEAD", ".git/config", ".git/packed-refs") or rel.startswith(".git/refs/")
        ):
            continue
        if path.is_file():
            snap[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return snap


@pytest.fixture
def git_tree(tmp_path) -> Callable[[str], Path]:
    """A fresh git checkout (one commit, tag vX) of a release, cloned from the cache."""
    return lambda version: checkout(version, tmp_path / f"vllm-{version}")


@pytest.fixture
def plain_tree(tmp_path) -> Callable[[str], Path]:
    """An unpacked sdist of a release (no git)."""

    def make(version: str) -> Path:
        with tarfile.open(fetch_sdist(version)) as tar:
            tar.extractall(tmp_path / "plain", filter="data")
        return tmp_path / "plain" / f"vllm-{version}"

    return make


def _record_row(rel: str, data: bytes) -> str:
    return f"{rel},{record_hash(data)},{len(data)}"


@pytest.fixture
def fake_site(tmp_path) -> Callable[[str], tuple[Path, Path]]:
    """A real interpreter (venv) where "vllm" is installed as the release's own kv_transfer files.

    Enough for apply/revert bookkeeping; the import proofs use real installs (test_real_vllm.py).
    """

    def make(version: str) -> tuple[Path, Path]:
        venv = tmp_path / f"site-{version}"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
        site = next((venv / "lib").glob("python3*/site-packages"))
        dist_info = site / f"vllm-{version}+cpu.dist-info"
        dist_info.mkdir()
        rows = []
        with tarfile.open(fetch_sdist(version)) as tar:
            for member in tar.getmembers():
                rel = member.name.split("/", 1)[-1]
                if member.isfile() and (
                    rel == "vllm/__init__.py" or rel.startswith("vllm/distributed/kv_transfer/")
                ):
                    data = tar.extractfile(member).read()
                    (site / rel).parent.mkdir(parents=True, exist_ok=True)
                    (site / rel).write_bytes(data)
                    rows.append(_record_row(rel, data))
        for name, text in {
            "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n",
            "INSTALLER": "pip\n",
        }.items():
            (dist_info / name).write_text(text)
            rows.append(_record_row(f"{dist_info.name}/{name}", text.encode()))
        rows.append(f"{dist_info.name}/RECORD,,")
        (dist_info / "RECORD").write_text("\n".join(rows) + "\n")
        return venv / "bin" / "python", site

    return make


@pytest.fixture
def without_git(tmp_path, monkeypatch) -> Callable[[], None]:
    """Call it to take git away for the rest of the test: PATH holds only a python."""

    def hide() -> None:
        bin_dir = tmp_path / "bin-without-git"
        bin_dir.mkdir()
        for name in ("python", "python3"):
            (bin_dir / name).symlink_to(sys.executable)
        monkeypatch.setenv("PATH", str(bin_dir))
        assert shutil.which("git") is None

    return hide


def path_without_git(links: Path, *first: Path, programs: tuple[str, ...] = ()) -> str:
    """A PATH as on a machine without git: the directories ``first``, then ``links``, made here
    with a link to each of ``programs`` as this machine's PATH finds it."""
    links.mkdir()
    for name in programs:
        found = shutil.which(name)
        assert found is not None, name
        (links / name).symlink_to(found)
    path = os.pathsep.join(str(d) for d in (*first, links))
    assert shutil.which("git", path=path) is None
    return path


@pytest.fixture(scope="session")
def tool_wheel(tmp_path_factory) -> Path:
    """This project's own wheel, as the README builds it."""
    dist = tmp_path_factory.mktemp("dist")
    # From a clean copy: setuptools builds in the source tree (build/), which must not
    # collect stale files across runs, nor litter the clone.
    source = tmp_path_factory.mktemp("src") / "vllm-lmcache-mp"
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__")
    shutil.copytree(REPO_ROOT, source, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, source],
        check=True,
        capture_output=True,
    )
    (found,) = dist.glob("vllm_lmcache_mp-*.whl")
    return found


def connector_bytes(root: Path) -> bytes:
    return (root / CONNECTOR).read_bytes()


PROJECT_DIRS = ("tools", "patches", "vllm_overlay", "matrix")


def project_copy(tmp_path: Path, first_dropped: str) -> Path:
    """This project with the series of ``first_dropped`` and every later release removed."""
    root = tmp_path / "project"
    for name in PROJECT_DIRS:
        shutil.copytree(
            REPO_ROOT / name,
            root / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
        )
    manifest_path = root / "patches" / "series.toml"
    manifest = load_manifest(manifest_path)
    releases = {v: r for v, r in manifest.releases.items() if Version(v) < Version(first_dropped)}
    kept = {g.name for r in releases.values() for g in r.groups}
    for name in set(manifest.groups) - kept:
        shutil.rmtree(root / "patches" / name)
        shutil.rmtree(root / "vllm_overlay" / name, ignore_errors=True)
    groups = {n: g for n, g in manifest.groups.items() if n in kept}
    manifest_path.write_text(dump_manifest(replace(manifest, groups=groups, releases=releases)))
    return root


def run_tool(project: Path, tool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run one of the copy's own ``tools/`` commands."""
    env = {**os.environ, "VLLM_PATCHES_PYTHON": sys.executable}
    return subprocess.run(
        [project / "tools" / tool, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def assert_record_true(site: Path) -> None:
    """Every row of the installed vLLM's RECORD states its file's hash and size, and every file
    below ``site`` has a row (so that ``pip uninstall`` removes it)."""
    import csv

    record = next(site.glob("vllm-*.dist-info")) / "RECORD"
    rows = {r[0]: r for r in csv.reader(record.read_text().splitlines())}
    for rel, row in rows.items():
        if row[1]:
            data = (site / rel).read_bytes()
            assert row[1:] == [record_hash(data), str(len(data))], rel
    listed = {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()}
    assert listed <= set(rows), "every file must be in RECORD so that pip uninstall removes it"


@pytest.fixture
def patched():
    """Apply the series to a cached venv (real vLLM, real lmcache) for the test, revert it
    afterwards."""
    from vllm_patches.sources.venvs import vllm_env
    from vllm_patches.targets.apply import apply
    from vllm_patches.targets.find import installed_vllm

    sites = []

    def _patched(version: str, lmcache: str) -> Path:
        python = vllm_env(version, lmcache)
        site = installed_vllm(str(python))
        apply(site)
        sites.append(site)
        return python

    yield _patched
    for site in sites:
        apply(site, revert=True)


ADAPTER_FILE = Path("lmcache/integration/vllm/vllm_multi_process_adapter.py")


def lmcache_unknown_to_the_builtin(python: Path, root: Path) -> Path:
    """An lmcache layer whose adapter API no vLLM knows: lmcache 0.5.6, whose ParallelStrategy
    here also requires ``cp_rank``, installed as lmcache 0.9.0.

    No release is such a one yet, so this is the one changed file, the rest of the real
    release linked (its server runs as it is).
    """
    from vllm_patches.sources.venvs import lmcache_layer

    real = lmcache_layer(python, "0.5.6")
    layer = root / "lmcache-0.9.0"

    def mirror(rel: Path) -> None:
        (layer / rel).mkdir(parents=True)
        for entry in (real / rel).iterdir():
            sub = rel / entry.name
            if sub == ADAPTER_FILE:
                field = "\n    n_servers: int\n"  # ParallelStrategy's
                text = entry.read_text()
                assert text.count(field) == 1
                (layer / sub).write_text(text.replace(field, field + "    cp_rank: int\n"))
            elif sub in ADAPTER_FILE.parents:
                mirror(sub)
            elif not entry.name.endswith(".dist-info"):
                (layer / sub).symlink_to(entry)

    mirror(Path())
    (layer / "lmcache-0.9.0.dist-info").mkdir()
    (layer / "lmcache-0.9.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: lmcache\nVersion: 0.9.0\n"
    )
    return layer


FACTORY_CLASS = Path(__file__).parent / "programs" / "factory_class.py"


def factory_class(python: Path, module_path: str, pythonpath: Path) -> dict:
    """What vLLM's connector factory in ``python`` gives for LMCacheMPConnector with
    ``kv_connector_module_path=module_path`` (``programs/factory_class.py``)."""
    proc = subprocess.run(
        [python, FACTORY_CLASS, module_path],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin", "LMCACHE_LOG_LEVEL": "ERROR"},
    )
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("FACTORY "))
    return json.loads(line[len("FACTORY ") :])


class _LocalIndex(http.server.BaseHTTPRequestHandler):
    """Answers GET from ``routes`` (path -> (body, content type)); 404 elsewhere; with
    ``auth``, 401 to a request without that Authorization header."""

    routes: ClassVar[dict[str, tuple[bytes, str]]] = {}
    auth: ClassVar[str | None] = None

    def do_GET(self) -> None:
        if self.auth is not None and self.headers.get("Authorization") != self.auth:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="index"')
            self.end_headers()
            return
        if self.path not in self.routes:
            self.send_response(404)
            self.end_headers()
            return
        body, kind = self.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # A client that hangs up before the body is written is not an error of the index.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def local_index(routes: dict[str, tuple[bytes, str]], auth: str | None = None) -> Iterator[str]:
    """A package index on 127.0.0.1 (a free port) serving ``routes``; ``HOST:PORT`` while it
    runs, stopped at the end."""
    handler = type("Index", (_LocalIndex,), {"routes": routes, "auth": auth})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
