"""The one error type that reaches the user of git-annex-shell."""

from __future__ import annotations


class ShellError(Exception):
    """A refusal or failure, printed as one line `git-annex-shell: <message>` and a blank
    line, as git-annex-shell prints its errors.

    The exit code is 1 unless a command documents another (inannex uses 100). It is never
    255, which git-annex reads as "ssh failed".
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
