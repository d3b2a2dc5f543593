"""Errors about strategies and the suggestions they carry."""
from __future__ import annotations

import difflib
from typing import Iterable

VALUE = "<value>"
"""Last element of an error path for the value rather than its key: ``("microbatches", VALUE)``."""

KeyPath = tuple
"""A key path into the dict form of a strategy, e.g. ``("params", "lm_head.weight", "tp", VALUE)``."""


class StrategyError(ValueError):
    """A strategy that is malformed or cannot be applied: names the key (``path``) and what to do.

    ``str()`` reads ``strategy['params']['x']['tp']: <message>`` when the error is about one entry
    of the dict form, else the message alone. The plan language turns ``path`` into a line and
    column (``frontend.dsl.PlanError``).
    """

    def __init__(self, message: str, path: KeyPath = ()):
        super().__init__(message)
        self.message = message
        self.path = tuple(path)

    def __str__(self) -> str:
        where = dict_path(self.path)
        return f"{where}: {self.message}" if where else self.message


def dict_path(path: KeyPath) -> str:
    """``strategy['params']['x']`` for a key path (empty for the whole strategy or its shorthand word)."""
    parts = [p for p in path if p != VALUE]
    if parts[:1] == ["strategy"]:
        parts = parts[1:]
    return "strategy" + "".join(f"[{p!r}]" for p in parts) if parts else ""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidates, or an empty string."""
    close = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=3, cutoff=0.6)
    if not close:
        return ""
    quoted = [repr(c) for c in close]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f" (did you mean {listed}?)"


def closest(name: str, options: Iterable[str], n: int = 3) -> str:
    """``; did you mean a, b?`` for the names closest to ``name`` (empty when none is close)."""
    close = difflib.get_close_matches(name, list(options), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""
