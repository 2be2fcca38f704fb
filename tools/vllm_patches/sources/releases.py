"""vLLM sources: sdists through pip's index, the cache, safe extraction, pinned checkouts."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version
from tqdm import tqdm

from vllm_patches._fs import write_atomic
from vllm_patches._git import GIT_IDENTITY, run_git
from vllm_patches._proc import logger, run_subprocess
from vllm_patches.errors import PatchToolError
from vllm_patches.sources.index import open_url, pip_command, project_files

CHUNK = 1 << 20


def cache_root() -> Path:
    """Where downloads, checkouts and venvs are cached (``$VLLM_LMCACHE_MP_CACHE`` overrides)."""
    override = os.environ.get("VLLM_LMCACHE_MP_CACHE")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "vllm-lmcache-mp"


def release_arg(text: str) -> str:
    """A release number as given on the command line: ``v0.21.0`` and `` 0.21.0 `` mean 0.21.0.

    :raises PatchToolError: not a release number.
    """
    cleaned = text.strip().removeprefix("v").removeprefix("V")
    try:
        Version(cleaned)
    except InvalidVersion:
        msg = f"{text!r} is not a release number; give one like 0.21.0"
        raise PatchToolError(msg) from None
    return cleaned


def parse_version(text: str) -> Version:
    """Parse a vLLM release number, or explain what is expected."""
    try:
        return Version(text)
    except InvalidVersion:
        msg = f"{text!r} is not a vLLM release number; give one like 0.21.0"
        raise PatchToolError(msg) from None


@dataclass(frozen=True)
class Sdist:
    """An sdist listed by the index."""

    version: str
    filename: str
    url: str
    sha256: str
    size: int | None


def list_sdists(project: str = "vllm") -> dict[str, Sdist]:
    """Every sdist of ``project`` on the configured index, by version."""
    found: dict[str, Sdist] = {}
    prefix = f"{project}-"
    for page, entry in reversed(project_files(project)):  # the main index's files win
        name = entry["filename"]
        if not (name.startswith(prefix) and name.endswith(".tar.gz")) or entry.get("yanked"):
            continue
        version = name[len(prefix) : -len(".tar.gz")]
        sha = entry.get("hashes", {}).get("sha256")
        if not sha:
            continue
        url = urllib.parse.urljoin(page, entry["url"])
        found[version] = Sdist(version, name, url, sha, entry.get("size"))
    return found


def final_releases(project: str, first: str) -> list[str]:
    """``project``'s final releases (post releases included) from ``first`` on, oldest first.

    Read from the file names on the configured index; a release whose files are all
    yanked is left out.
    """
    found: set[Version] = set()
    for _, entry in project_files(project):
        name = entry["filename"]
        try:
            if name.endswith(".whl"):
                version = parse_wheel_filename(name)[1]
            else:
                version = parse_sdist_filename(name)[1]
        except (InvalidWheelFilename, InvalidSdistFilename):
            continue
        if not entry.get("yanked") and not version.is_prerelease and version >= Version(first):
            found.add(version)
    return [str(v) for v in sorted(found)]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _download(sdist: Sdist, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with (
            open_url(sdist.url, timeout=300) as response,
            tmp.open("wb") as out,
            tqdm(
                total=sdist.size,
                unit="B",
                unit_scale=True,
                desc=sdist.filename,
                disable=None,
                file=sys.stderr,
            ) as bar,
        ):
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    except (TimeoutError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        msg = f"downloading {sdist.filename} failed ({exc}); run the command again"
        raise PatchToolError(msg) from None
    except BaseException:  # our own errors, Ctrl-C, SIGTERM: no .part is left behind
        tmp.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != sdist.sha256:
        tmp.unlink()
        msg = (
            f"{sdist.filename}: sha256 {digest.hexdigest()} does not match the index's "
            f"{sdist.sha256}; the download is corrupt, run the command again"
        )
        raise PatchToolError(msg)
    tmp.replace(dest)


def fetch_sdist(version: str) -> Path:
    """Return the cached sdist of vLLM ``version``, downloading and checking it on first use."""
    parse_version(version)
    cache = cache_root() / "sdists"
    path = cache / f"vllm-{version}.tar.gz"
    sha_file = path.with_name(path.name + ".sha256")
    if path.is_file() and sha_file.is_file():
        if sha256_file(path) == sha_file.read_text().strip():
            return path
        logger.warning("cached %s is corrupt; downloading it again", path.name)
    sdists = list_sdists()
    if version not in sdists:
        raise _no_sdist(version)
    cache.mkdir(parents=True, exist_ok=True)
    sdist = sdists[version]
    if not (path.is_file() and sha256_file(path) == sdist.sha256):
        _download(sdist, path)
    sha_file.write_text(sdist.sha256 + "\n")
    return path


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a tar.gz with the ``data`` filter and return its single top-level directory."""
    try:
        with tarfile.open(archive) as tar:
            tops = {Path(m.name).parts[0] for m in tar.getmembers() if m.name not in ("", ".")}
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _damaged(archive, exc) from exc
    if len(tops) != 1:
        msg = f"{archive} does not hold one top-level directory ({sorted(tops)[:3]})"
        raise PatchToolError(msg)
    return dest / tops.pop()


def _damaged(archive: Path, exc: BaseException) -> PatchToolError:
    """A cached sdist that cannot be read is removed, so that the next run downloads it."""
    cached = archive.parent == cache_root() / "sdists"
    if cached:
        archive.unlink(missing_ok=True)
        archive.with_name(archive.name + ".sha256").unlink(missing_ok=True)
    what = "removed it from the cache; run the command again" if cached else "replace it"
    return PatchToolError(f"cannot read {archive} ({type(exc).__name__}: {exc}); {what}")


def _make_checkout(version: str, final: Path) -> None:
    sdist = fetch_sdist(version)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".tmp-") as tmp:
        tree = safe_extract(sdist, Path(tmp))
        env = {
            **GIT_IDENTITY,
            "GIT_AUTHOR_DATE": "2000-01-01T00:00:00Z",
            "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z",
        }
        run_git(["init", "-q", "-b", "main"], tree)
        run_git(["config", "core.autocrlf", "false"], tree)
        run_git(["add", "-A", "-f", "."], tree)
        message = f"vLLM {version} from {sdist.name}\n\nsha256: {sha256_file(sdist)}\n"
        run_git(["commit", "-q", "--no-verify", "-m", message], tree, env=env)
        run_git(["tag", f"v{version}"], tree, env=env)
        tree.rename(final)


def checkout(version: str, dest: Path | None = None) -> Path:
    """Make (or reuse) a git checkout of vLLM ``version`` with one commit tagged ``vVERSION``.

    :param version: the vLLM release.
    :param dest: where the user wants it; by default the cached checkout itself.
    :returns: the checkout's path.
    """
    parse_version(version)
    if dest is not None:
        dest = dest.resolve()
        if dest.exists() and not dest.is_dir():
            msg = f"{dest} is a file; give --dest a directory that is empty or does not exist"
            raise PatchToolError(msg)
        if dest.exists() and any(dest.iterdir()):
            msg = f"{dest} exists and is not empty; pass another --dest or remove it"
            raise PatchToolError(msg)
    cached = cache_root() / "checkouts" / f"v{version}"
    if not (cached / ".git").is_dir():
        if cached.exists():
            shutil.rmtree(cached)
        _make_checkout(version, cached)
    if dest is None:
        return cached
    run_git(["clone", "-q", "--no-checkout", str(cached), str(dest)], cached.parent)
    run_git(["remote", "remove", "origin"], dest)
    run_git(["checkout", "-q", "-B", "main", f"v{version}"], dest)
    return dest


def read_sdist_file(version: str, path: str) -> bytes | None:
    """The bytes of ``path`` (relative to vLLM's tree) in the sdist of ``version``, or None."""
    entry = sdist_file(version, path)
    return entry.read_bytes() if entry is not None else None


def has_sdist(version: str) -> bool:
    """Whether vLLM ``version`` ships an sdist (cached here, else listed by the index)."""
    cached = cache_root() / "sdists" / f"vllm-{version}.tar.gz.sha256"
    return cached.is_file() or version in list_sdists()


def _no_sdist(version: str) -> PatchToolError:
    if version in final_releases("vllm", version):
        msg = (
            f"vLLM {version} ships wheels only (no sdist on the package index), so there is no "
            f"source tree or test suite of it to build from; patch its official wheel "
            f"(vllm-patches wheel {version}) or an installed vLLM (vllm-patches apply --site)"
        )
    else:
        msg = f"vLLM {version} has no sdist on the package index; pick a released version"
    return PatchToolError(msg)


def release_file(version: str, path: str) -> bytes | None:
    """The bytes of ``path`` as vLLM ``version`` ships it, or None where it does not.

    Read from the release's sdist; a release that ships wheels only (0.15.0, 0.15.1) is read
    from its official wheel, which holds ``vllm/`` but no ``tests/`` or ``requirements/``.
    """
    if has_sdist(version):
        return read_sdist_file(version, path)
    with zipfile.ZipFile(download_wheel(version)) as wheel:
        try:
            return wheel.read(path)
        except KeyError:
            return None


def sdist_file(version: str, path: str) -> Path | None:
    """A cached copy of ``path`` (relative to vLLM's tree) from the sdist of ``version``, or
    None where the sdist has no such file.

    Each answer is cached next to the sdist, keyed by its sha256: scanning a compressed
    tar for one member takes about a second, reading the cached copy microseconds.
    """
    sdist = fetch_sdist(version)
    digest = sdist.with_name(sdist.name + ".sha256").read_text().strip()
    entry = cache_root() / "sdist-files" / f"{version}-{digest[:16]}" / path
    absent = entry.with_name(entry.name + ".absent")
    if entry.is_file():
        return entry
    if absent.is_file():
        return None
    data = None
    try:
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/", 1)
                if len(parts) == 2 and parts[1] == path and member.isfile():
                    handle = tar.extractfile(member)
                    data = handle.read() if handle else None
                    break
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _damaged(sdist, exc) from exc
    write_atomic(entry if data is not None else absent, data or b"")
    return entry if data is not None else None


def download_wheel(version: str) -> Path:
    """The official vLLM wheel of ``version``, fetched by pip (its index, proxy, certs), cached.

    pip downloads into a directory of its own and the wheel is renamed into the cache: an
    interrupted download leaves no wheel that a later run would take for a complete one.
    """
    cache = cache_root() / "wheels" / version
    found = sorted(cache.glob("vllm-*.whl")) if cache.is_dir() else []
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".tmp-") as tmp:
        run_subprocess(
            [*pip_command(), "download", "--no-deps", "--only-binary", ":all:",
             "--dest", tmp, f"vllm=={version}"],
            what=f"pip download vllm=={version}",
        )  # fmt: skip
        (wheel,) = Path(tmp).glob("vllm-*.whl")
        return wheel.replace(cache / wheel.name)


def wheel_requirements(version: str) -> list[str]:
    """The ``Requires-Dist`` lines of vLLM ``version``'s official wheel."""
    with zipfile.ZipFile(download_wheel(version)) as wheel:
        (metadata,) = (n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        text = wheel.read(metadata).decode()
    prefix = "Requires-Dist: "
    return [line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)]
