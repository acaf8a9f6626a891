"""Exceptions that carry a user-facing message instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a missing file or a missing optional dependency: exit 1, one line, no traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class GateFailed(Exception):
    """A validation gate failed: exit 2."""

    exit_code = 2

    def __init__(self, failed: list[str], report: dict | None = None) -> None:
        super().__init__("validation gates failed: " + ", ".join(failed))
        self.failed = failed
        self.report = report
