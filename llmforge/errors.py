"""User-facing errors: one clear line (what, where, what to do), never a traceback."""

from __future__ import annotations


class LlmforgeError(Exception):
    """A mistake in the user's input or environment that llmforge can explain in one line.

    The CLI prints ``error: <message>`` to stderr and exits with ``exit_code``.
    Library code raises it for anything the user can fix; bugs stay ordinary exceptions.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
