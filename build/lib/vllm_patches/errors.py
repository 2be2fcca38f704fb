"""The one exception users see."""

from __future__ import annotations


class PatchToolError(Exception):
    """Cannot proceed; the message is the sentence the user reads (what is wrong, what to do)."""


class ReportedError(PatchToolError):
    """A stop that comes with details to show first (conflicting hunks, a failing hook's output)."""

    def __init__(self, message: str, report: str) -> None:
        super().__init__(message)
        self.report = report
