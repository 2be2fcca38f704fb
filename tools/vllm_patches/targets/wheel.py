"""Patched vLLM wheels: repack an official wheel (unchanged members copied as compressed
bytes, streaming), build one from a patched checkout, and verify one."""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import os
import re
import struct
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from vllm_patches._proc import logger
from vllm_patches._record import encode_digest, parse_record, record_hash
from vllm_patches.errors import PatchToolError
from vllm_patches.series.manifest import Group, Release, load_manifest, sha256_bytes

LOCAL_LABEL = "lmcachemp1"
WHEEL_NAME = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-(?P<build>\d[^-]*))?-(?P<tags>[^-]+-[^-]+-[^-]+)\.whl$"
)
CHUNK = 1 << 20
STALE_PART_SECONDS = 600
"""A repack's ``.part`` file older than this was left by an interrupted run (a repack of the
248 MB official wheel takes well under a second)."""


def patched_version(version: str) -> str:
    """``0.21.0`` -> ``0.21.0+lmcachemp1``; ``0.21.0+cu129`` -> ``0.21.0+cu129.lmcachemp1``."""
    return f"{version}{'.' if '+' in version else '+'}{LOCAL_LABEL}"


@dataclass(frozen=True)
class WheelInfo:
    """What a wheel says about itself, checked for consistency."""

    path: Path
    version: str
    dist_info: str
    tags: str
    release: str
    """The public vLLM release (no local label)."""


def _unsafe(name: str) -> bool:
    return name.startswith(("/", "\\")) or ".." in name.split("/") or name[1:2] == ":"


def inspect_wheel(path: Path, zf: zipfile.ZipFile) -> WheelInfo:
    """Validate a vLLM wheel's name, members and metadata; every problem is one clear error."""
    match = WHEEL_NAME.match(path.name)
    if not match:
        msg = f"{path.name} is not a wheel file name (name-version-python-abi-platform.whl)"
        raise PatchToolError(msg)
    if canonicalize_name(match["name"]) != "vllm":
        msg = f"{path.name} is a wheel of {match['name']}, not of vLLM"
        raise PatchToolError(msg)
    bad = [n for n in zf.namelist() if _unsafe(n)]
    if bad:
        msg = f"{path.name} has a member outside the install tree ({bad[0]}); refusing it"
        raise PatchToolError(msg)
    dist_infos = {
        n.split("/", 1)[0] for n in zf.namelist() if n.split("/", 1)[0].endswith(".dist-info")
    }
    if len(dist_infos) != 1:
        msg = f"{path.name} has {len(dist_infos)} .dist-info directories; expected one"
        raise PatchToolError(msg)
    dist_info = dist_infos.pop()
    try:
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    except KeyError:
        msg = f"{path.name} has no {dist_info}/METADATA"
        raise PatchToolError(msg) from None
    found = re.search(r"^Version: (\S+)$", metadata, re.M)
    name = re.search(r"^Name: (\S+)$", metadata, re.M)
    if not found or not name or canonicalize_name(name.group(1)) != "vllm":
        msg = f"{path.name}: METADATA does not describe vLLM"
        raise PatchToolError(msg)
    version = found.group(1)
    if dist_info != f"{match['name']}-{version}.dist-info" and Version(
        dist_info[len(match["name"]) + 1 : -len(".dist-info")]
    ) != Version(version):
        msg = f"{path.name}: {dist_info} does not match METADATA's version {version}"
        raise PatchToolError(msg)
    try:
        release = Version(version).public
    except InvalidVersion:
        msg = f"{path.name}: {version!r} is not a valid version"
        raise PatchToolError(msg) from None
    return WheelInfo(path, version, dist_info, match["tags"], release)


def _open(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        msg = f"{path} is not a file; give the path of a vLLM wheel (vllm-*.whl)"
        raise PatchToolError(msg)
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        msg = f"{path} is not a readable wheel ({exc}); download it again"
        raise PatchToolError(msg) from None


def _copy_raw(src: zipfile.ZipFile, info: zipfile.ZipInfo, dst: zipfile.ZipFile, name: str) -> None:
    """Append ``info``'s compressed bytes to ``dst`` under ``name``, without recompressing."""
    fp = src.fp
    assert fp is not None and dst.fp is not None
    fp.seek(info.header_offset)
    header = fp.read(30)
    if header[:4] != b"PK\x03\x04":
        msg = f"{src.filename}: {info.filename} has a corrupt local header; download it again"
        raise PatchToolError(msg)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    fp.seek(info.header_offset + 30 + name_len + extra_len)
    out = zipfile.ZipInfo(name, date_time=info.date_time)
    out.compress_type = info.compress_type
    out.CRC = info.CRC
    out.compress_size = info.compress_size
    out.file_size = info.file_size
    out.external_attr = info.external_attr
    out.create_system = info.create_system
    out.flag_bits = info.flag_bits & ~0x08  # sizes go in the local header, no data descriptor
    out.header_offset = dst.fp.tell()
    zip64 = info.file_size > zipfile.ZIP64_LIMIT or info.compress_size > zipfile.ZIP64_LIMIT
    dst.fp.write(out.FileHeader(zip64))
    remaining = info.compress_size
    while remaining:
        chunk = fp.read(min(CHUNK, remaining))
        if not chunk:
            msg = f"{src.filename} is truncated inside {info.filename}; download it again"
            raise PatchToolError(msg)
        dst.fp.write(chunk)
        remaining -= len(chunk)
    dst.filelist.append(out)
    dst.NameToInfo[name] = out
    dst.start_dir = dst.fp.tell()
    dst._didModify = True


def _copy_range(src: zipfile.ZipFile, dst: zipfile.ZipFile, start: int, end: int) -> None:
    """Append bytes ``start:end`` of ``src``'s file to ``dst``, in the kernel where it can."""
    assert src.fp is not None and dst.fp is not None
    dst.fp.flush()
    position = dst.fp.tell()
    offset, remaining = start, end - start
    try:
        while remaining:
            done = os.copy_file_range(src.fp.fileno(), dst.fp.fileno(), remaining, offset)
            if done == 0:
                break
            offset, remaining = offset + done, remaining - done
    except OSError:
        os.lseek(dst.fp.fileno(), position + (offset - start), os.SEEK_SET)
    dst.fp.seek(position + (offset - start))
    src.fp.seek(offset)
    while remaining:
        chunk = src.fp.read(min(CHUNK, remaining))
        if not chunk:
            msg = f"{src.filename} is truncated; download it again"
            raise PatchToolError(msg)
        dst.fp.write(chunk)
        remaining -= len(chunk)


def _copy_run(
    src: zipfile.ZipFile, run: list[zipfile.ZipInfo], end: int, dst: zipfile.ZipFile
) -> None:
    """Copy members that stay as they are (name included) with their local headers, verbatim."""
    assert dst.fp is not None
    delta = dst.fp.tell() - run[0].header_offset
    _copy_range(src, dst, run[0].header_offset, end)
    for member in run:
        moved = copy.copy(member)
        moved.header_offset = member.header_offset + delta
        dst.filelist.append(moved)
        dst.NameToInfo[moved.filename] = moved
    dst.start_dir = dst.fp.tell()
    dst._didModify = True


def _targets(release: Release) -> list[Group]:
    return [g for g in release.groups if g.installed]


def _out_dir(out_dir: Path) -> None:
    """Make ``out_dir`` and sweep ``.part`` files that crashed repacks left there."""
    if out_dir.exists() and not out_dir.is_dir():
        msg = f"{out_dir} is a file; give --out a directory"
        raise PatchToolError(msg)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        msg = f"{out_dir} is not writable; pass another --out"
        raise PatchToolError(msg)
    stale = time.time() - STALE_PART_SECONDS
    for part in out_dir.glob(".vllm-repack-*.whl.part"):
        if part.stat().st_mtime < stale:
            logger.warning("removing %s, left by an interrupted repack", part)
            part.unlink(missing_ok=True)


def repack(wheel: Path, out_dir: Path, *, force: bool = False, version: str | None = None) -> Path:
    """Write a patched copy of an official vLLM wheel into ``out_dir`` and return its path.

    Unchanged members are copied as compressed bytes; the overlay's files replace the
    originals; the version gets the ``lmcachemp1`` local label everywhere it appears
    (file name, ``.dist-info``, METADATA, RECORD); the build tag is dropped.

    :param force: accept an input whose RECORD does not verify, whose release is not
        ``version``, or whose target files do not match the recorded base hashes.
    :param version: the vLLM release the caller expects the wheel to be.
    :raises PatchToolError: for a bad input; nothing is left in ``out_dir`` then.
    """
    manifest = load_manifest()
    with _open(wheel) as zf:
        info = inspect_wheel(wheel, zf)
        if version is not None and info.release != version and not force:
            msg = (
                f"{wheel.name} is vLLM {info.release}, not {version}; give the wheel of "
                f"{version}, or pass --force to repack it as it is"
            )
            raise PatchToolError(msg)
        problems = record_problems(zf, info)
        if problems and not force:
            msg = (
                f"{wheel.name} does not verify against its RECORD ({problems[0]}); download "
                "it again, or pass --force to repack it anyway"
            )
            raise PatchToolError(msg)
        release = manifest.release(info.release)
        targets = _targets(release)
        if not targets:
            msg = f"vLLM {info.release} already contains the change: nothing to repack"
            raise PatchToolError(msg)
        replacements: dict[str, bytes] = {}
        for group in targets:
            try:
                current = zf.read(group.path)
            except KeyError:
                msg = f"{wheel.name} has no {group.path}"
                raise PatchToolError(msg) from None
            if sha256_bytes(current) != group.base_sha256 and not force:
                msg = (
                    f"{wheel.name}: {group.path} is not vLLM {info.release}'s original (already "
                    "patched or modified); pass --force to replace it anyway"
                )
                raise PatchToolError(msg)
            replacements[group.path] = group.overlay_file.read_bytes()
        new_version = patched_version(info.version)
        new_dist = f"vllm-{new_version}.dist-info"
        old_data, new_data = (
            f"{info.dist_info[: -len('.dist-info')]}.data/",
            f"vllm-{new_version}.data/",
        )
        record = parse_record(zf.read(f"{info.dist_info}/RECORD").decode())
        _out_dir(out_dir)
        final = out_dir / f"vllm-{new_version}-{info.tags}.whl"
        fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=".vllm-repack-", suffix=".whl.part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _write(zf, info, tmp, replacements, record, new_dist, old_data, new_data, new_version)
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o666 & ~umask)
            tmp.replace(final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return final


def _rename(name: str, old_dist: str, new_dist: str, old_data: str, new_data: str) -> str:
    if name.startswith(f"{old_dist}/"):
        return new_dist + name[len(old_dist) :]
    if name.startswith(old_data):
        return new_data + name[len(old_data) :]
    return name


def _new_bytes(
    zf: zipfile.ZipFile,
    member: zipfile.ZipInfo,
    dist_info: str,
    replacements: dict[str, bytes],
    new_version: str,
) -> bytes | None:
    """The member's new content, or None when it is copied as it is."""
    if member.filename in replacements:
        return replacements[member.filename]
    if member.filename == f"{dist_info}/METADATA":
        text = zf.read(member).decode()
        pattern = r"^Version: \S+$"
        return re.sub(pattern, f"Version: {new_version}", text, count=1, flags=re.M).encode()
    if member.filename == f"{dist_info}/WHEEL":
        return re.sub(r"^Build: .*\n", "", zf.read(member).decode(), flags=re.M).encode()
    return None


def _write(
    zf: zipfile.ZipFile,
    info: WheelInfo,
    tmp: Path,
    replacements: dict[str, bytes],
    record: dict[str, tuple[str, str]],
    new_dist: str,
    old_data: str,
    new_data: str,
    new_version: str,
) -> None:
    rows: list[tuple[str, str, str]] = []
    skip = {f"{info.dist_info}/{n}" for n in ("RECORD", "RECORD.jws", "RECORD.p7s")}
    members = sorted(zf.infolist(), key=lambda m: m.header_offset)
    ends = [m.header_offset for m in members[1:]] + [zf.start_dir]
    with zipfile.ZipFile(tmp, "w") as out:
        runs = _Runs(zf, out)
        for member in members:
            if member.filename in skip:
                runs.flush(member.header_offset)
                continue
            name = _rename(member.filename, info.dist_info, new_dist, old_data, new_data)
            data = _new_bytes(zf, member, info.dist_info, replacements, new_version)
            if data is not None:
                runs.flush(member.header_offset)
                target = zipfile.ZipInfo(name, date_time=member.date_time)
                target.external_attr = member.external_attr
                target.compress_type = zipfile.ZIP_DEFLATED
                out.writestr(target, data)
                rows.append((name, record_hash(data), str(len(data))))
                continue
            if name == member.filename:
                runs.pending.append(member)
            else:
                runs.flush(member.header_offset)
                _copy_raw(zf, member, out, name)
            rows += _kept_row(info, member, record, name)
        if runs.pending:
            runs.flush(ends[members.index(runs.pending[-1])])
        _write_record(out, new_dist, rows)


@dataclass
class _Runs:
    """Consecutive unchanged members, copied as one byte range when the run ends."""

    src: zipfile.ZipFile
    out: zipfile.ZipFile
    pending: list[zipfile.ZipInfo] = field(default_factory=list)

    def flush(self, end: int) -> None:
        if self.pending:
            _copy_run(self.src, self.pending, end, self.out)
            self.pending = []


def _kept_row(
    info: WheelInfo, member: zipfile.ZipInfo, record: dict[str, tuple[str, str]], name: str
) -> list[tuple[str, str, str]]:
    """The RECORD row of a member copied unchanged (under its new name)."""
    hashed = record.get(member.filename)
    if hashed is None and not member.is_dir():
        msg = f"{info.path.name}: {member.filename} is not in RECORD; the wheel is broken"
        raise PatchToolError(msg)
    return [] if hashed is None else [(name, *hashed)]


def _write_record(out: zipfile.ZipFile, new_dist: str, rows: list[tuple[str, str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(rows)
    writer.writerow((f"{new_dist}/RECORD", "", ""))
    record_info = zipfile.ZipInfo(f"{new_dist}/RECORD", date_time=(1980, 1, 1, 0, 0, 0))
    record_info.compress_type = zipfile.ZIP_DEFLATED
    record_info.external_attr = 0o644 << 16
    out.writestr(record_info, buffer.getvalue())


def record_problems(zf: zipfile.ZipFile, info: WheelInfo) -> list[str]:
    """Every member whose hash or size RECORD does not state, and every row without a member."""
    try:
        record = parse_record(zf.read(f"{info.dist_info}/RECORD").decode())
    except KeyError:
        return [f"no {info.dist_info}/RECORD"]
    problems: list[str] = []
    for member in zf.infolist():
        if member.is_dir() or member.filename == f"{info.dist_info}/RECORD":
            continue
        if member.filename not in record:
            problems.append(f"{member.filename} is not in RECORD")
            continue
        digest = hashlib.sha256()
        with zf.open(member) as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        expected_hash, expected_size = record[member.filename]
        got = encode_digest(digest.digest())
        if got != expected_hash or str(member.file_size) != expected_size:
            problems.append(f"{member.filename}: RECORD says {expected_hash},{expected_size}")
    for name in record:
        if name not in zf.NameToInfo and not name.endswith("/RECORD"):
            problems.append(f"RECORD lists {name}, which is not in the wheel")
    return problems


def verify(path: Path) -> list[str]:
    """Every problem of a patched wheel: RECORD hashes and sizes, version, overlay files."""
    problems: list[str] = []
    with _open(path) as zf:
        info = inspect_wheel(path, zf)
        if LOCAL_LABEL not in (Version(info.version).local or "").split("."):
            problems.append(f"version {info.version} has no {LOCAL_LABEL} local label")
        if not path.name.startswith(f"vllm-{info.version}-"):
            problems.append(f"file name does not carry METADATA's version {info.version}")
        problems += record_problems(zf, info)
        for group in _targets(load_manifest().release(info.release)):
            if zf.read(group.path) != group.overlay_file.read_bytes():
                problems.append(f"{group.path} differs from vllm_overlay/{group.name}")
    return problems


def pip_wheel(python: Path, source: Path, out_dir: Path, version: str, device: str) -> Path:
    """Build a vLLM wheel from ``source`` (sdist or tree) with pip; the wheel lands in ``out_dir``.

    :param version: the version to stamp (``VLLM_VERSION_OVERRIDE``).
    :param device: ``VLLM_TARGET_DEVICE`` (``empty`` builds no kernels).
    """
    from vllm_patches.sources.venvs import pip

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        env = {"VLLM_TARGET_DEVICE": device, "VLLM_VERSION_OVERRIDE": version}
        pip(
            python,
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp,
            str(source),
            env=env,
        )
        (built,) = Path(tmp).glob("*.whl")
        final = out_dir / built.name
        built.replace(final)
    return final


def build_from_source(version: str, device: str, out_dir: Path) -> Path:
    """A wheel built from the pinned checkout of ``version`` with the series applied."""
    from vllm_patches.sources.releases import checkout, fetch_sdist
    from vllm_patches.sources.venvs import default_lmcache, vllm_env
    from vllm_patches.targets.apply import apply
    from vllm_patches.targets.find import resolve_target

    release = load_manifest().release(version)
    fetch_sdist(version)  # refused first where it ships none
    python = vllm_env(version, default_lmcache(version))  # torch + vLLM's build deps, cached
    with tempfile.TemporaryDirectory(prefix="vllm-patches-src-") as tmp:
        tree = checkout(version, Path(tmp) / "vllm")
        apply(resolve_target(tree))
        stamped = patched_version(f"{release.version}+{device}")
        return pip_wheel(python, tree, out_dir, stamped, device)
