"""Plan errors: where a plan went wrong (source, line, column), printed like a compiler's."""
from __future__ import annotations

from typing import Callable, NamedTuple, TypeVar

from strategy import StrategyError, dict_path
from strategy.errors import KeyPath

T = TypeVar("T")


class SourcePosition(NamedTuple):
    """Where a token of a plan was written."""

    source: str
    line: int
    column: int
    line_text: str


Positions = dict
"""Maps a strategy key path (a tuple) to the :class:`SourcePosition` that wrote it.

``("params", glob, axis)`` is where the axis name was written and
``("params", glob, axis, VALUE)`` where its SBP was; scalar keys have ``(key,)`` for the
statement word and ``(key, VALUE)`` for the value. List entries use their index.
"""


class PlanError(StrategyError):
    """A plan that cannot be parsed, is not a valid strategy, or does not fit the model.

    ``str()`` reads ``plan.sbp:3:12: error: <message>`` followed by the source line and a caret
    under the column; ``line`` and ``column`` are None when the strategy came from a dict.
    """

    def __init__(self, message: str, source: str = "<strategy>", line: int | None = None,
                 column: int | None = None, line_text: str | None = None):
        super().__init__(message)
        self.source = source
        self.line = line
        self.column = column
        self.line_text = line_text

    @classmethod
    def at(cls, position: SourcePosition, message: str) -> PlanError:
        """An error located at ``position``."""
        return cls(message, position.source, position.line, position.column, position.line_text)

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.source}: error: {self.message}"
        head = f"{self.source}:{self.line}:{self.column}: error: {self.message}"
        if self.line_text is None:
            return head
        # Keep tabs so the caret lines up however the terminal renders them.
        pad = "".join("\t" if ch == "\t" else " " for ch in self.line_text[: self.column - 1])
        return f"{head}\n    {self.line_text}\n    {pad}^"


def position_of(positions: Positions | None, path: KeyPath) -> SourcePosition | None:
    """The most precise recorded position of ``path`` or of the value holding it."""
    positions = positions or {}
    for length in range(len(path), 0, -1):
        position = positions.get(tuple(path[:length]))
        if position is not None:
            return position
    return None


def error_at(positions: Positions | None, path: KeyPath, message: str,
             source: str = "<strategy>") -> PlanError:
    """An error at the most precise recorded position of ``path`` (or naming the dict path)."""
    position = position_of(positions, path)
    if position is not None:
        return PlanError.at(position, message)
    where = dict_path(path)
    return PlanError(f"{where}: {message}" if where else message, source)


def located(positions: Positions | None, source: str, check: Callable[[], T]) -> T:
    """``check()``, its :class:`StrategyError` raised as a :class:`PlanError` at the plan line."""
    try:
        return check()
    except PlanError:
        raise
    except StrategyError as error:
        raise error_at(positions, error.path, error.message, source) from None

