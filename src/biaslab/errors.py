"""Errors biaslab raises on bad input: short, specific, and safe to show to a user without a traceback."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class BiaslabError(Exception):
    """Base class: the CLI prints these as one clear message (no traceback)."""


class UnknownNameError(BiaslabError, KeyError):
    """An unknown benchmark / protocol / model / method / site kind, with the valid choices."""

    def __init__(self, kind: str, name: str, choices: Iterable[str]):
        self.kind, self.name, self.choices = kind, name, sorted(set(choices))
        super().__init__(self.__str__())

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        msg = f"unknown {self.kind} {self.name!r}."
        close = difflib.get_close_matches(str(self.name), self.choices, n=1, cutoff=0.5)
        if close:
            msg += f" Did you mean {close[0]!r}?"
        return msg + f" Valid choices: {', '.join(self.choices)}"


class DataError(BiaslabError):
    """A corrupt or malformed data row: names the file, the line and the field."""

    def __init__(self, path, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = self.path + (f", line {line}" if line is not None else "")
        what = f" field {field!r}:" if field else ""
        super().__init__(f"{where}:{what} {problem}")


class RunConflictError(BiaslabError):
    """The output directory holds a run made with different arguments."""


class PatchMismatchError(BiaslabError):
    """A patch was made for a different base model."""


class MissingDependencyError(BiaslabError):
    """A package or file needed for this operation is not installed; the message says what to install."""
