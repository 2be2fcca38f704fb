"""A wheel's or an installed distribution's ``RECORD``: hashes, parsing, rewriting."""

from __future__ import annotations

import base64
import csv
import hashlib
import io


def encode_digest(digest: bytes) -> str:
    """RECORD's ``sha256=<urlsafe base64, no padding>`` of a sha256 digest."""
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def record_hash(data: bytes) -> str:
    """RECORD's hash of ``data``."""
    return encode_digest(hashlib.sha256(data).digest())


def parse_record(text: str) -> dict[str, tuple[str, str]]:
    """Path -> (hash, size) for every row."""
    return {row[0]: (row[1], row[2]) for row in csv.reader(io.StringIO(text)) if row}


def rewrite_record(record: bytes, changes: dict[str, bytes | None]) -> bytes:
    """``record`` with each changed path's row updated (``None``: the row removed), new paths
    added before RECORD's own last row."""
    rows = list(csv.reader(io.StringIO(record.decode())))
    seen: set[str] = set()
    out: list[list[str]] = []
    for row in rows:
        if row and row[0] in changes:
            seen.add(row[0])
            data = changes[row[0]]
            if data is not None:
                out.append([row[0], record_hash(data), str(len(data))])
        else:
            out.append(row)
    for path, data in changes.items():
        if path not in seen and data is not None:
            out.insert(len(out) - 1, [path, record_hash(data), str(len(data))])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(out)
    return buffer.getvalue().encode()
