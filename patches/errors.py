"""The one error type of the generator: every message names a file and a line."""

from __future__ import annotations


class PatchError(Exception):
    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line = path, line
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")
