"""The one exception users see."""

from __future__ import annotations


class PatchToolError(Exception):
    """Cannot proceed; the message is the sentence the user reads (what is wrong, what to do)."""
