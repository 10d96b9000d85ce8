"""User-facing errors: a message that names the problem and a hint that names the fix.

The CLI prints these without a traceback (``--debug`` or VLMTUNE_DEBUG=1 shows it) and exits
non-zero. Anything that is not a VlmtuneError is a bug in vlmtune and keeps its traceback.
"""

from __future__ import annotations


class VlmtuneError(Exception):
    """An error the user can fix. ``hint`` says how."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


class RecipeError(VlmtuneError):
    """The recipe (or an override) is invalid. ``problems`` lists every problem at once."""

    def __init__(self, message: str, problems: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint)
        self.problems = problems or []

    def __str__(self) -> str:
        lines = [self.message, *(f"  - {p}" for p in self.problems)]
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


class DataError(VlmtuneError):
    """A dataset or a sample is unusable."""


class ModelError(VlmtuneError):
    """The model cannot be found, detected or loaded."""


class RunDirError(VlmtuneError):
    """A run folder is missing, incomplete, or would be overwritten."""
