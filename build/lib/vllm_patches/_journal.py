"""Multi-file changes that a crash cannot leave half-done.

Before the first file is touched, a journal with every affected file's original bytes is
written (atomically, flushed to disk); then the files are written, one atomic rename each;
the journal is removed last. Whoever finds a journal (the next command on the same target)
rolls the change back: every file gets its original bytes again, which is idempotent, so a
crash during the rollback is rolled back by the command after that.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vllm_patches._fs import write_atomic
from vllm_patches.errors import PatchToolError

JOURNAL_NAME = ".vllm-lmcache-mp-journal.json"


def _encode(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _decode(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def change(journal: Path, root: Path, writes: dict[Path, bytes | None], what: str) -> None:
    """Write every file of ``writes`` (``None`` removes it) under the protection of ``journal``.

    :param root: the directory the journal's paths are relative to.
    :param what: what the change is, for the message of whoever rolls it back.
    :raises PatchToolError: a write failed; every file was restored (the journal removed).
    """
    _begin(journal, root, writes, what)
    journal.unlink()


@contextmanager
def temporarily(
    journal: Path, root: Path, writes: dict[Path, bytes | None], what: str
) -> Iterator[None]:
    """Write ``writes`` for the duration of the ``with`` block, then put the originals back.

    The journal stays until the originals are back: a process killed inside the block is
    rolled back by the next command that looks at ``journal``.
    """
    _begin(journal, root, writes, what)
    try:
        yield
    finally:
        roll_back(journal, root)


def _begin(journal: Path, root: Path, writes: dict[Path, bytes | None], what: str) -> None:
    """Write the journal, then the files; on any failure put everything back."""
    originals = {
        path.relative_to(root).as_posix(): _encode(path.read_bytes() if path.is_file() else None)
        for path in writes
    }
    write_atomic(journal, json.dumps({"what": what, "originals": originals}).encode())
    try:
        for path, data in writes.items():
            write_atomic(path, data)
    except OSError as exc:
        roll_back(journal, root)
        msg = f"writing under {root} failed ({exc}); every file was restored, nothing was changed"
        raise PatchToolError(msg) from None
    except BaseException:
        roll_back(journal, root)  # Ctrl-C, SIGTERM (as KeyboardInterrupt): nothing half-done
        raise


def roll_back(journal: Path, root: Path) -> str | None:
    """Undo the change ``journal`` records, if there is one; return what it was."""
    if not journal.is_file():
        return None
    try:
        record = json.loads(journal.read_text())
    except (OSError, ValueError) as exc:
        msg = f"cannot read {journal} ({exc}); move it away and check the files it names by hand"
        raise PatchToolError(msg) from None
    for rel, original in record["originals"].items():
        write_atomic(root / rel, _decode(original))
    journal.unlink()
    return str(record["what"])
