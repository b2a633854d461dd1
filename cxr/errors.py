"""One error type for everything a user can get wrong, so the CLI can print it in one line."""
from __future__ import annotations

from pathlib import Path


class CxrError(Exception):
    """A problem with the user's input: names the file (when there is one) and what is wrong."""

    def __init__(self, problem: str, path: str | Path | None = None):
        # One line, always: the CLI prints it as `cxr CMD: error: ...`.
        problem = "; ".join(line.strip() for line in str(problem).splitlines() if line.strip())
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
