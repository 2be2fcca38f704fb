"""One patch of the series applied to one file's bytes, in Python: no git, no fuzz, no offset.

A patch of the series changes one file and was made against exactly the bytes it is applied
to, so each hunk must match where its header says; anything else is an error, never a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vllm_patches.errors import PatchToolError

_HUNK = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_SIDES = {b" ": (0, 1), b"-": (0,), b"+": (1,)}
"""Which sides (0 before, 1 after) a hunk line of each kind belongs to."""


@dataclass(frozen=True)
class Hunk:
    """Where the hunk starts on each side (1-based, as in its header) and each side's lines."""

    starts: tuple[int, int]
    sides: tuple[list[bytes], list[bytes]]


@dataclass(frozen=True)
class FileDiff:
    """One file's change: whether the file exists before and after, and the hunks."""

    exists: tuple[bool, bool]
    hunks: list[Hunk]


def split_lines(data: bytes) -> list[bytes]:
    """``data``'s lines, each with its ``\\n`` (the last one may have none)."""
    lines = [line + b"\n" for line in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def _malformed(patch: Path, why: str) -> PatchToolError:
    return PatchToolError(f"{patch} is not a patch of the series ({why}); restore it")


def _read_hunk(
    patch: Path, lines: list[bytes], i: int, header: re.Match[bytes]
) -> tuple[Hunk, int]:
    """The hunk whose ``header`` is ``lines[i]``, and the index of the line after it."""
    counts = [int(header[2] or 1), int(header[4] or 1)]
    sides: tuple[list[bytes], list[bytes]] = ([], [])
    last: tuple[int, ...] = ()
    i += 1
    while i < len(lines) and (any(counts) or lines[i].startswith(b"\\")):
        line = lines[i]
        if line.startswith(b"\\"):  # "\ No newline at end of file": said of the line before
            for side in last:
                sides[side][-1] = sides[side][-1].removesuffix(b"\n")
        else:
            # An empty context line may have lost its leading space.
            tag, text = (b" ", line) if line == b"\n" else (line[:1], line[1:])
            last = _SIDES.get(tag, ())
            if not last or any(counts[side] == 0 for side in last):
                raise _malformed(patch, f"line {i + 1} does not fit its hunk")
            for side in last:
                sides[side].append(text)
                counts[side] -= 1
        i += 1
    if any(counts):
        raise _malformed(patch, "it ends inside a hunk")
    return Hunk((int(header[1]), int(header[3])), sides), i


def parse(patch: Path, path: str) -> FileDiff:
    """The change ``patch`` makes to ``path``, which must be the one file it changes."""
    lines = split_lines(patch.read_bytes())
    heads = [i for i, line in enumerate(lines) if line.startswith(b"diff --git ")]
    if [lines[i] for i in heads] != [f"diff --git a/{path} b/{path}\n".encode()]:
        raise _malformed(patch, f"it must change {path} and nothing else")
    i = heads[0] + 1
    while i < len(lines) and not lines[i].startswith(b"--- "):
        i += 1
    if i + 1 >= len(lines) or not lines[i + 1].startswith(b"+++ "):
        raise _malformed(patch, "no ---/+++ lines")
    exists = (lines[i] != b"--- /dev/null\n", lines[i + 1] != b"+++ /dev/null\n")
    i += 2
    hunks: list[Hunk] = []
    while i < len(lines) and (header := _HUNK.match(lines[i])):
        hunk, i = _read_hunk(patch, lines, i, header)
        hunks.append(hunk)
    if not hunks and all(exists):
        raise _malformed(patch, "no hunks")
    return FileDiff(exists, hunks)


def apply(patch: Path, path: str, data: bytes | None, *, reverse: bool = False) -> bytes | None:
    """``data`` (``None``: no file) with ``patch`` applied, or with ``reverse`` taken off.

    :raises PatchToolError: the patch does not apply exactly to ``data``.
    """
    diff = parse(patch, path)
    before, after = (1, 0) if reverse else (0, 1)
    if (data is not None) != diff.exists[before]:
        state = "does not exist" if data is None else "exists already"
        msg = f"{patch.name} does not apply to {path}: the file {state}"
        raise PatchToolError(msg)
    lines = split_lines(data or b"")
    out: list[bytes] = []
    cursor = 0
    for hunk in diff.hunks:
        old = hunk.sides[before]
        # A hunk that only adds lines names the line they follow; others their first line.
        start = hunk.starts[before] - (1 if old else 0)
        if start < cursor or lines[start : start + len(old)] != old:
            msg = (
                f"{patch.name} does not apply to {path}: its hunk at line "
                f"{hunk.starts[before]} does not match the file"
            )
            raise PatchToolError(msg)
        out += lines[cursor:start] + hunk.sides[after]
        cursor = start + len(old)
    result = b"".join(out + lines[cursor:])
    if diff.exists[after]:
        return result
    if result:
        msg = f"{patch.name} does not apply to {path}: lines would be left in a removed file"
        raise PatchToolError(msg)
    return None
