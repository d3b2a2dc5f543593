"""The plan language: a parallel strategy written as text instead of a Python dict.

A plan (a ``*.sbp`` file, or statements attached to modules) parses into the *strategy dict*
that the compiler consumes, and :func:`format_plan` prints any valid strategy dict back as
canonical text, so that ``parse_plan(format_plan(s)) == s`` for every canonical ``s``::

    mesh dp=2, tp=2
    param blocks.*.attn.qkv.weight: tp=S(0)
    activation blocks.*.mlp.fc: tp=S(2)
    stages at blocks.1
    microbatches 8
    schedule interleaved virtual_stages=2

The grammar is ``frontend/dsl.lark``; ``docs/dsl.md`` explains every statement. Every error is a
:class:`PlanError` that names the source, line and column and shows the line with a caret.
This module reads only :mod:`ir.sbp` from the rest of sbpc.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import math
import os
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, NoReturn, Union

import lark
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from ir.sbp import Broadcast, SbpSyntaxError, Split, parse_sbp
from ir.schedules import SCHEDULE_NAMES, stages_per_position

AUTO = "auto"
"""The value that leaves a choice to the planner."""

SHORTHANDS = ("dp", "fsdp", "auto")
"""Whole strategies that are a single word (``strategy dp`` in a plan)."""

SCHEDULES = SCHEDULE_NAMES + ("auto",)
"""Pipeline schedule names (``ir.schedules`` lists them)."""

STRATEGY_KEYS = (
    "mesh", "params", "activations", "sequence_parallel", "vocab_parallel", "fsdp", "stages",
    "stage_layers", "stage_devices", "microbatches", "schedule", "virtual_stages", "skip_ratio",
    "recompute", "grad_bucket_bytes",
)
"""Every key a strategy dict may have, in the order plans print them; all are optional."""

STATEMENTS = (
    "strategy", "mesh", "param", "activation", "sequence_parallel", "vocab_parallel", "fsdp",
    "stages", "stage", "microbatches", "schedule", "virtual_stages", "skip_ratio", "recompute",
    "grad_bucket_bytes",
)
"""The words that start a statement."""

Strategy = Union[dict, str]
"""A strategy dict, or one of :data:`SHORTHANDS`."""

KeyPath = tuple
"""A key path into a strategy dict, e.g. ``("params", "lm_head.weight", "tp")``."""

_GRAMMAR_FILE = Path(__file__).with_name("dsl.lark")
_WILDCARD_CHARS = set("*?[")
_RECOMPUTE_WORDS = ("all", "none", "auto")  # after `recompute` these are switches, not modules
_INSTANCE_ATTR = "_sbp_plan_annotations"
_CLASS_ATTR = "__sbp_plan__"
_MAX_DEVICE_RANGE = 1 << 20
_BATCH_AND_STAGE_AXES = ("dp", "pp")  # any other mesh axis is a tensor-parallel one


# --------------------------------------------------------------------------------------------
# Errors and source positions


class SourcePosition(NamedTuple):
    """Where a token of a plan was written."""

    source: str
    line: int
    column: int
    line_text: str


VALUE = "<value>"
"""Last element of a position key for the token of the value rather than of its name."""

Positions = dict
"""Maps a strategy key path (a tuple) to the :class:`SourcePosition` that wrote it.

``("params", glob, axis)`` is where the axis name was written and
``("params", glob, axis, VALUE)`` where its SBP was; scalar keys have ``(key,)`` for the
statement word and ``(key, VALUE)`` for the value. List entries use their index.
"""


class PlanError(ValueError):
    """A plan that cannot be parsed, is not a valid strategy, or does not fit the model.

    ``str()`` reads ``plan.sbp:3:12: error: <message>`` followed by the source line and a caret
    under the column; ``line`` and ``column`` are None when the strategy came from a dict.
    """

    def __init__(self, message: str, source: str = "<strategy>", line: int | None = None,
                 column: int | None = None, line_text: str | None = None):
        super().__init__(message)
        self.message = message
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


def _position_of(positions: Positions | None, path: KeyPath) -> SourcePosition | None:
    """The most precise recorded position of ``path`` or of the value holding it."""
    positions = positions or {}
    for length in range(len(path), 0, -1):
        position = positions.get(tuple(path[:length]))
        if position is not None:
            return position
    return None


def _error_at(positions: Positions | None, path: KeyPath, message: str,
              source: str = "<strategy>") -> PlanError:
    """An error at the most precise recorded position of ``path`` (or naming the dict path)."""
    position = _position_of(positions, path)
    if position is not None:
        return PlanError.at(position, message)
    where = "strategy" + "".join(f"[{part!r}]" for part in path if part != VALUE)
    return PlanError(f"{where}: {message}" if path else message, source)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidates, or an empty string."""
    close = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=3, cutoff=0.6)
    if not close:
        return ""
    quoted = [repr(c) for c in close]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f" (did you mean {listed}?)"


# --------------------------------------------------------------------------------------------
# Syntax


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(_GRAMMAR_FILE.read_text(encoding="utf-8"), parser="lalr",
                     propagate_positions=True, keep_all_tokens=True, maybe_placeholders=True)


def _terminal_regex(name: str) -> re.Pattern:
    """The grammar's own pattern for a terminal, so the dict checks accept what the parser does."""
    return re.compile(_parser().get_terminal(name).pattern.to_regexp())


# How a terminal reads in "expected ..." messages: what the user would type there.
_TERMINAL_TEXT = {
    "AXIS": "an axis name (e.g. tp)",
    "WORD": "a word (e.g. 1f1b)",
    "GLOB": "a name or glob (e.g. blocks.*.mlp.fc)",
    "SBP": "an SBP value (S(0), B, P(sum) or P(max))",
    "INT": "a number (e.g. 8)",
    "NUMBER": "a number (e.g. 0.25)",
    "_NL": "end of line",
    "$END": "end of input",
    "AUTO": '"auto"', "ON": '"on"', "OFF": '"off"', "ALL": '"all"', "NONE": '"none"',
    "AT": '"at"', "FROM": '"from"', "LAYERS": '"layers"', "DEVICES": '"devices"',
    "VIRTUAL_STAGES": '"virtual_stages"',
}
_HIDDEN_TERMINALS = {"STATEMENT_WORD", "REST"}  # the catch-all for unknown statements


def _terminal_text(name: str) -> str:
    if name in _TERMINAL_TEXT:
        return _TERMINAL_TEXT[name]
    pattern = _parser().get_terminal(name).pattern
    return f'"{pattern.value}"' if pattern.type == "str" else name.lower()


def _describe_expected(names: Iterable[str]) -> str:
    names = set(names)
    if "STATEMENT_WORD" in names:  # the start of a line
        return "a statement (" + ", ".join(STATEMENTS) + ")"
    names -= _HIDDEN_TERMINALS
    texts = sorted({_terminal_text(n) for n in names}, key=lambda t: (t.startswith('"'), t))
    return texts[0] if len(texts) == 1 else "one of: " + ", ".join(texts)


def _word_at(line_text: str, column: int) -> str:
    rest = line_text[column - 1:]
    match = re.match(r"[^\s,:=]+", rest)
    return repr(match.group(0) if match else rest[:1])


def _syntax_error(error: UnexpectedInput, lines: list[str], source: str) -> PlanError:
    """Translate a lark error into a PlanError in the user's terms."""
    line, column = getattr(error, "line", -1), getattr(error, "column", -1)
    if isinstance(error, UnexpectedCharacters):
        expected = error.allowed or set()
        found = _word_at(lines[line - 1], column)
    elif isinstance(error, UnexpectedToken) and error.token.type not in ("_NL", "$END"):
        expected = error.expected
        # The token came from lark's fallback lexer and may run to the end of the line.
        found = _word_at(lines[line - 1], column)
    else:  # the statement stopped early
        expected = error.expected
        found = "end of line"
        if line < 1:  # lark has no position for the end of input
            line = max(len(lines), 1)
            column = len(lines[line - 1]) + 1 if lines else 1
    line_text = lines[line - 1] if 0 < line <= len(lines) else ""
    return PlanError(f"expected {_describe_expected(expected)}; found {found}", source, line,
                     column, line_text)


# --------------------------------------------------------------------------------------------
# From parse tree to strategy dict


@dataclass
class _StageStatement:
    """What one `stage N: ...` statement said."""

    keyword: lark.Token
    start: lark.Token | None = None  # the module after `from`
    layers: tuple[lark.Token, lark.Token] | None = None
    devices: list[tuple[int, lark.Token]] | None = None
    device_keyword: lark.Token | None = None


@dataclass
class _PlanBuilder:
    """Turns statements into a strategy dict, recording where each value was written."""

    source: str
    lines: list[str]
    strategy: dict = field(default_factory=dict)
    positions: Positions = field(default_factory=dict)
    statements: list[lark.Token] = field(default_factory=list)
    shorthand: str | None = None
    stage_statements: dict[int, _StageStatement] = field(default_factory=dict)

    # -- helpers

    def position(self, token: lark.Token) -> SourcePosition:
        """Where ``token`` was written."""
        return SourcePosition(self.source, token.line, token.column, self.lines[token.line - 1])

    def fail(self, token: lark.Token, message: str) -> NoReturn:
        """Raise a PlanError at ``token``."""
        raise PlanError.at(self.position(token), message)

    def mark(self, path: KeyPath, token: lark.Token) -> None:
        """Record that ``token`` wrote the value at ``path``."""
        self.positions[path] = self.position(token)

    def claim(self, path: KeyPath, token: lark.Token, what: str) -> None:
        """Mark ``path``, or fail if an earlier statement already wrote it."""
        earlier = self.positions.get(path)
        if earlier is not None:
            self.fail(token, f"{what} is given twice (first on line {earlier.line}); "
                             "keep one of them")
        self.mark(path, token)

    # -- statements

    def add(self, statement: lark.Tree) -> None:
        """Apply one statement."""
        keyword = statement.children[0]
        self.statements.append(keyword)
        getattr(self, f"_add_{statement.data}")(keyword, *statement.children[1:])

    def _add_unknown_statement(self, word: lark.Token, *_rest: Any) -> None:
        self.fail(word, f"unknown statement {str(word)!r}{did_you_mean(str(word), STATEMENTS)}; "
                        "a line starts with one of: " + ", ".join(STATEMENTS))

    def _add_strategy(self, keyword: lark.Token, word: lark.Token) -> None:
        self.claim(("strategy",), keyword, "the strategy shorthand")
        self.mark(("strategy", VALUE), word)
        self.shorthand = str(word)

    def _add_mesh(self, keyword: lark.Token, *parts: Any) -> None:
        self.claim(("mesh",), keyword, "the mesh")
        if isinstance(parts[0], lark.Token) and parts[0].type == "AUTO":
            self.strategy["mesh"] = AUTO
            return
        mesh = self.strategy["mesh"] = {}
        for axis_size in _trees(parts):
            axis, _equal, size = axis_size.children
            self.claim(("mesh", str(axis)), axis, f"mesh axis {str(axis)!r}")
            self.mark(("mesh", str(axis), VALUE), size)
            mesh[str(axis)] = _int_or_auto(size)

    def _add_param(self, keyword: lark.Token, glob: lark.Token, _colon: Any,
                   placement: lark.Tree) -> None:
        self._add_placement("params", keyword, glob, placement)

    def _add_activation(self, keyword: lark.Token, glob: lark.Token, _colon: Any,
                        placement: lark.Tree) -> None:
        self._add_placement("activations", keyword, glob, placement)

    def _add_placement(self, key: str, keyword: lark.Token, glob: lark.Token,
                       placement: lark.Tree) -> None:
        self.claim((key, str(glob)), glob, f"{keyword} {glob}")
        first = placement.children[0]
        if isinstance(first, lark.Token) and first.type == "AUTO":
            self.mark((key, str(glob), VALUE), first)
            self.strategy.setdefault(key, {})[str(glob)] = AUTO
            return
        per_axis = self.strategy.setdefault(key, {})[str(glob)] = {}
        for axis_sbp in _trees(placement.children):
            axis, _equal, value = axis_sbp.children
            self.claim((key, str(glob), str(axis)), axis, f"axis {str(axis)!r} of {keyword} {glob}")
            self.mark((key, str(glob), str(axis), VALUE), value)
            per_axis[str(axis)] = AUTO if value.type == "AUTO" else _canonical_sbp(str(value))

    def _add_sequence_parallel(self, keyword: lark.Token, switch: lark.Tree | None) -> None:
        self._add_switch("sequence_parallel", keyword, switch)

    def _add_vocab_parallel(self, keyword: lark.Token, switch: lark.Tree | None) -> None:
        self._add_switch("vocab_parallel", keyword, switch)

    def _add_switch(self, key: str, keyword: lark.Token, switch: lark.Tree | None) -> None:
        self.claim((key,), keyword, key)
        value = switch.children[0] if switch is not None else keyword
        self.mark((key, VALUE), value)
        # A bare `sequence_parallel` (value is the keyword itself) means on.
        self.strategy[key] = {"ON": True, "OFF": False, "AUTO": AUTO}.get(value.type, True)

    def _add_fsdp(self, keyword: lark.Token, axis: lark.Token) -> None:
        self._set_scalar("fsdp", keyword, axis, str(axis))

    def _add_stages(self, keyword: lark.Token, *parts: lark.Token) -> None:
        self.claim(("stages",), keyword, "the stage cuts")
        if parts[0].type == "AUTO":
            self.strategy["stages"] = AUTO
            return
        names = [token for token in parts if token.type == "GLOB"]
        for index, token in enumerate(names):
            self.mark(("stages", index), token)
        self.strategy["stages"] = [str(token) for token in names]

    def _add_stage(self, keyword: lark.Token, number: lark.Token, _colon: Any,
                   *parts: lark.Tree) -> None:
        index = int(number)
        if index < 0:
            self.fail(number, f"stage numbers start at 0, found {index}")
        earlier = self.stage_statements.get(index)
        if earlier is not None:
            self.fail(keyword, f"stage {index} is given twice (first on line "
                               f"{earlier.keyword.line}); put everything about one stage on "
                               "one line")
        statement = self.stage_statements[index] = _StageStatement(keyword)
        for part in parts:
            getattr(self, f"_add_{part.data}")(statement, index, *part.children)

    def _add_stage_from(self, statement: _StageStatement, index: int, keyword: lark.Token,
                        module: lark.Token) -> None:
        if statement.start is not None:
            self.fail(keyword, f"stage {index} says `from` twice")
        statement.start = module

    def _add_stage_layers(self, statement: _StageStatement, index: int, keyword: lark.Token,
                          first: lark.Token, _dots: Any, last: lark.Token) -> None:
        if statement.layers is not None:
            self.fail(keyword, f"stage {index} says `layers` twice")
        statement.layers = (first, last)

    def _add_stage_devices(self, statement: _StageStatement, index: int, keyword: lark.Token,
                           _devices: Any, *spans: Any) -> None:
        if statement.devices is not None:
            self.fail(keyword, f"stage {index} says `on devices` twice")
        statement.device_keyword = keyword
        statement.devices = []
        for span in _trees(spans):
            first, _dots, last = span.children
            low, high = int(first), int(last) if last is not None else int(first)
            if high < low:
                self.fail(first, f"device range {low}..{high} runs backwards; write {high}..{low}")
            if high - low >= _MAX_DEVICE_RANGE:  # expanding it would only exhaust memory
                self.fail(first, f"device range {low}..{high} holds more than "
                                 f"{_MAX_DEVICE_RANGE} devices; check the numbers")
            statement.devices.extend((device, first) for device in range(low, high + 1))

    def _add_microbatches(self, keyword: lark.Token, value: lark.Token) -> None:
        self._set_scalar("microbatches", keyword, value, _int_or_auto(value))

    def _add_schedule(self, keyword: lark.Token, name: lark.Token, virtual: lark.Token | None,
                      _equal: Any, count: lark.Token | None) -> None:
        self._set_scalar("schedule", keyword, name, str(name))
        if virtual is not None:
            self._add_virtual_stages(virtual, count)

    def _add_virtual_stages(self, keyword: lark.Token, value: lark.Token) -> None:
        self._set_scalar("virtual_stages", keyword, value, _int_or_auto(value))

    def _add_skip_ratio(self, keyword: lark.Token, value: lark.Token) -> None:
        self._set_scalar("skip_ratio", keyword, value,
                         AUTO if value.type == "AUTO" else float(value))

    def _add_recompute(self, keyword: lark.Token, *parts: lark.Token) -> None:
        self.claim(("recompute",), keyword, "recompute")
        switch = {"ALL": True, "NONE": False, "AUTO": AUTO}
        if parts[0].type in switch:
            self.mark(("recompute", VALUE), parts[0])
            self.strategy["recompute"] = switch[parts[0].type]
            return
        globs = [token for token in parts if token.type == "GLOB"]
        for index, token in enumerate(globs):
            self.mark(("recompute", index), token)
        self.strategy["recompute"] = [str(token) for token in globs]

    def _add_grad_bucket_bytes(self, keyword: lark.Token, value: lark.Token) -> None:
        self._set_scalar("grad_bucket_bytes", keyword, value, int(value))

    def _set_scalar(self, key: str, keyword: lark.Token, value_token: lark.Token,
                    value: Any) -> None:
        self.claim((key,), keyword, key)
        self.mark((key, VALUE), value_token)
        self.strategy[key] = value

    # -- whole-plan structure

    def finish(self) -> tuple[Strategy, Positions]:
        """The strategy and positions, after the checks that need to see every statement."""
        if self.shorthand is not None:
            others = [kw for kw in self.statements if kw.type != "STRATEGY"]
            if others:
                self.fail(others[0], f"`strategy {self.shorthand}` stands for a whole plan and "
                                     "cannot be combined with other statements; remove one")
            return self.shorthand, self.positions
        self._resolve_stages()
        return self.strategy, self.positions

    def _resolve_stages(self) -> None:
        numbers = sorted(self.stage_statements)
        for expected, number in enumerate(numbers):
            if number != expected:
                self.fail(self.stage_statements[number].keyword,
                          f"stage {number} is given but stage {expected} is missing; number the "
                          "stages 0, 1, 2, ... with no gaps")
        statements = [self.stage_statements[number] for number in numbers]
        if not statements:
            return
        self._resolve_stage_starts(statements)
        if self._all_or_none(statements, "layers", "`layers a..b`"):
            self.strategy["stage_layers"] = [[int(s.layers[0]), int(s.layers[1])]
                                             for s in statements]
            self.mark(("stage_layers",), statements[0].layers[0])
            for index, statement in enumerate(statements):
                self.mark(("stage_layers", index), statement.layers[0])
        if self._all_or_none(statements, "devices", "`on devices ...`"):
            self.strategy["stage_devices"] = [[d for d, _ in s.devices] for s in statements]
            self.mark(("stage_devices",), statements[0].device_keyword)
            for index, statement in enumerate(statements):
                self.mark(("stage_devices", index), statement.device_keyword)
                for slot, (_device, token) in enumerate(statement.devices):
                    self.mark(("stage_devices", index, slot), token)

    def _all_or_none(self, statements: list[_StageStatement], part: str, spelled: str,
                     first_number: int = 0) -> bool:
        """True when every stage gives ``part``; False when none does; fails otherwise."""
        given = [getattr(s, part) is not None for s in statements]
        if any(given) and not all(given):
            missing = given.index(False)
            self.fail(statements[missing].keyword,
                      f"stage {first_number + missing} has no {spelled}, but stage "
                      f"{first_number + given.index(True)} has; give it for every stage "
                      f"{'after 0 ' if first_number else ''}or for none")
        return all(given)

    def _resolve_stage_starts(self, statements: list[_StageStatement]) -> None:
        if statements[0].start is not None:
            self.fail(statements[0].start, "stage 0 begins with the first module; `from` names "
                                           "where stages 1, 2, ... begin")
        later = statements[1:]
        if not later or not self._all_or_none(later, "start", "`from <module>`", first_number=1):
            return
        if "stages" in self.strategy:
            first = self.positions[("stages",)].line
            self.fail(later[0].start, f"the stage cuts are already given by `stages` on line "
                                      f"{first}; keep either that or the `from` parts")
        self.strategy["stages"] = [str(s.start) for s in later]
        self.mark(("stages",), later[0].start)
        for index, statement in enumerate(later):
            self.mark(("stages", index), statement.start)


def _trees(children: Iterable[Any]) -> list[lark.Tree]:
    return [child for child in children if isinstance(child, lark.Tree)]


def _int_or_auto(token: lark.Token) -> int | str:
    return AUTO if token.type == "AUTO" else int(token)


def _canonical_sbp(text: str) -> str:
    """``P`` -> ``P(sum)``, ``S( 1 )`` -> ``S(1)``; invalid text is returned for the checks."""
    try:
        return str(parse_sbp(text))
    except SbpSyntaxError:
        return text


# --------------------------------------------------------------------------------------------
# Checks on a strategy dict (shared by parsing, formatting and merging)


@dataclass
class _StrategyChecker:
    """Checks that a strategy dict is well formed; errors point at ``positions`` when known."""

    positions: Positions | None
    source: str

    def fail(self, path: KeyPath, message: str) -> NoReturn:
        """Raise a PlanError for the value at ``path``."""
        raise _error_at(self.positions, path, message, self.source)

    def check(self, strategy: Any) -> None:
        """Check a whole strategy."""
        if isinstance(strategy, str):
            if strategy not in SHORTHANDS:
                self.fail(("strategy", VALUE), f"unknown strategy {strategy!r}"
                          f"{did_you_mean(strategy, SHORTHANDS)}; a one-word strategy is one of: "
                          + ", ".join(SHORTHANDS))
            return
        if not isinstance(strategy, dict):
            self.fail((), "a strategy is a dict or one of " + ", ".join(SHORTHANDS)
                      + f"; found {type(strategy).__name__}")
        for key in strategy:
            if key not in STRATEGY_KEYS:
                self.fail((key,), f"unknown strategy key {key!r}"
                                  f"{did_you_mean(str(key), STRATEGY_KEYS)}")
        axes = self.check_mesh(strategy.get("mesh"))
        for key in ("params", "activations"):
            if key in strategy:
                self.check_placements(key, strategy[key], axes)
        for key in ("sequence_parallel", "vocab_parallel"):
            if key in strategy:
                value = strategy[key]
                self.expect(isinstance(value, bool) or value == AUTO, (key, VALUE),
                            f"{key} is on (True), off (False) or auto, found {value!r}")
        if "fsdp" in strategy:
            self.check_fsdp(strategy["fsdp"], axes)
        self.check_stages(strategy)
        self.check_pipeline(strategy)
        if "recompute" in strategy:
            self.check_recompute(strategy["recompute"])
        if "grad_bucket_bytes" in strategy:
            value = strategy["grad_bucket_bytes"]
            self.expect(_is_int(value) and value >= 1, ("grad_bucket_bytes", VALUE),
                        "grad_bucket_bytes is a whole number of bytes, at least 1, "
                        f"found {value!r}")

    def expect(self, condition: bool, path: KeyPath, message: str) -> None:
        """Fail with ``message`` unless ``condition``."""
        if not condition:
            self.fail(path, message)

    def check_mesh(self, mesh: Any) -> list[str] | None:
        """Check the mesh; return its axis names when they are known."""
        if mesh is None or mesh == AUTO:
            return None
        self.expect(isinstance(mesh, dict) and len(mesh) > 0, ("mesh",),
                    f"the mesh is a dict of axis name -> size (or 'auto'), found {mesh!r}")
        for axis, size in mesh.items():
            self.check_axis_name(("mesh", axis), axis)
            self.expect(size == AUTO or _is_int(size) and size >= 1, ("mesh", axis, VALUE),
                        f"mesh axis {axis!r} needs a size of at least 1 (or auto), found {size!r}")
        return list(mesh)

    def check_axis_name(self, path: KeyPath, axis: Any) -> None:
        """Axis names are identifiers other than 'auto'."""
        self.expect(isinstance(axis, str) and bool(_terminal_regex("AXIS").fullmatch(axis))
                    and axis != AUTO, path,
                    f"an axis name is a word such as dp or tp (not 'auto'), found {axis!r}")

    def check_placements(self, key: str, placements: Any, axes: list[str] | None) -> None:
        """Check ``params`` or ``activations``: glob -> {axis: SBP} or 'auto'."""
        self.expect(isinstance(placements, dict), (key,),
                    f"{key} is a dict of glob -> {{axis: SBP}}, found {placements!r}")
        for glob, placement in placements.items():
            self.check_glob((key, glob), glob)
            if placement == AUTO:
                continue
            self.expect(isinstance(placement, dict) and len(placement) > 0, (key, glob, VALUE),
                        f"{key}[{glob!r}] is a dict of axis -> SBP (or 'auto'), "
                        f"found {placement!r}")
            for axis, sbp in placement.items():
                self.check_axis_name((key, glob, axis), axis)
                self.check_axis_known((key, glob, axis), axis, axes)
                self.check_sbp((key, glob, axis, VALUE), sbp)

    def check_axis_known(self, path: KeyPath, axis: str, axes: list[str] | None) -> None:
        """When the mesh is known, an axis must be one of its axes."""
        if axes is not None and axis not in axes:
            self.fail(path, f"axis {axis!r} is not in the mesh{did_you_mean(axis, axes)}; "
                            "the mesh axes are " + ", ".join(axes))

    def check_sbp(self, path: KeyPath, text: Any) -> None:
        """SBP texts: S(d) with d >= 0, B, P(sum), P(max), or auto."""
        if text == AUTO:
            return
        try:
            sbp = parse_sbp(text) if isinstance(text, str) else None
        except SbpSyntaxError:
            sbp = None
        self.expect(sbp is not None, path, "expected an SBP value such as S(0), B, P(sum) or "
                                           f"P(max) (or auto), found {text!r}")
        self.expect(not isinstance(sbp, Split) or sbp.dim >= 0, path,
                    f"S(d) splits tensor dim d, which is 0 or more; found {text!r}")

    def check_glob(self, path: KeyPath, glob: Any, *, single: bool = False) -> None:
        """Names and globs are dotted words with fnmatch wildcards, no spaces/commas/colons."""
        self.expect(isinstance(glob, str) and bool(_terminal_regex("GLOB").fullmatch(glob)), path,
                    "a name or glob is dotted words with * ? [...] wildcards and no spaces, "
                    f"commas or colons, found {glob!r}")
        if single:
            self.expect(not _WILDCARD_CHARS & set(glob), path,
                        "a stage begins at one module, so its name has no wildcards; "
                        f"found {glob!r}")

    def check_fsdp(self, axis: Any, axes: list[str] | None) -> None:
        """fsdp names a mesh axis (or auto)."""
        if axis == AUTO:
            return
        self.check_axis_name(("fsdp", VALUE), axis)
        self.check_axis_known(("fsdp", VALUE), axis, axes)

    def check_stages(self, strategy: dict) -> None:
        """Stage cuts, layer ranges and devices, and that they agree on the number of stages."""
        counts: list[tuple[str, int]] = []
        stages = strategy.get("stages")
        if stages is not None and stages != AUTO:
            counts.append(("stages", self.check_stage_cuts(stages) + 1))
        if "stage_layers" in strategy:
            self.expect(stages is None, ("stage_layers",), "give the stages either as module "
                        "names (`stages at` / `from`) or as layer ranges, not both")
            counts.append(("stage_layers", self.check_stage_layers(strategy["stage_layers"])))
        if "stage_devices" in strategy:
            counts.append(("stage_devices", self.check_stage_devices(strategy["stage_devices"])))
        if len({count for _key, count in counts}) > 1:
            said = ", ".join(f"{key} gives {count}" for key, count in counts)
            self.fail((counts[-1][0],), f"the number of stages disagrees: {said}; "
                                        "give the same number of stages everywhere")

    def check_stage_cuts(self, stages: Any) -> int:
        """``stages`` is a non-empty list of distinct module names; return its length."""
        self.expect(isinstance(stages, list) and len(stages) > 0, ("stages",),
                    "stages is a non-empty list of the module names where stages 1, 2, ... begin "
                    f"(or 'auto'), found {stages!r}")
        for index, name in enumerate(stages):
            self.check_glob(("stages", index), name, single=True)
            self.expect(name not in stages[:index], ("stages", index),
                        f"stage cut {name!r} is given twice")
        return len(stages)

    def check_stage_layers(self, ranges: Any) -> int:
        """Contiguous inclusive layer ranges from layer 0; return the number of stages."""
        self.expect(isinstance(ranges, list) and len(ranges) > 0, ("stage_layers",),
                    "stage_layers is a non-empty list of [first, last] layer ranges, "
                    f"found {ranges!r}")
        next_layer = 0
        for index, pair in enumerate(ranges):
            path = ("stage_layers", index)
            self.expect(isinstance(pair, list | tuple) and len(pair) == 2
                        and all(_is_int(x) for x in pair), path,
                        f"stage {index}'s layers are [first, last], found {pair!r}")
            first, last = pair
            self.expect(first == next_layer, path, f"stage {index} should start at layer "
                        f"{next_layer} so that every layer has one stage, found {first}")
            self.expect(last >= first, path, f"stage {index}'s layers {first}..{last} run "
                                             f"backwards; write {last}..{first}")
            next_layer = last + 1
        return len(ranges)

    def check_stage_devices(self, stage_devices: Any) -> int:
        """Each stage has a non-empty list of distinct device ids >= 0; return the stage count."""
        self.expect(isinstance(stage_devices, list) and len(stage_devices) > 0, ("stage_devices",),
                    "stage_devices is a non-empty list of device-id lists, "
                    f"found {stage_devices!r}")
        for index, devices in enumerate(stage_devices):
            self.expect(isinstance(devices, list | tuple) and len(devices) > 0,
                        ("stage_devices", index), f"stage {index} needs at least one device, "
                                                  f"found {devices!r}")
            for slot, device in enumerate(devices):
                path = ("stage_devices", index, slot)
                self.expect(_is_int(device) and device >= 0, path,
                            f"device ids are numbers from 0, found {device!r}")
                self.expect(device not in devices[:slot], path,
                            f"stage {index} lists device {device} twice")
        return len(stage_devices)

    def check_pipeline(self, strategy: dict) -> None:
        """Microbatches, schedule, virtual stages and skip ratio."""
        if "microbatches" in strategy:
            value = strategy["microbatches"]
            self.expect(value == AUTO or _is_int(value) and value >= 1, ("microbatches", VALUE),
                        f"microbatches is a whole number of at least 1 (or auto), found {value!r}")
        schedule = strategy.get("schedule")
        if "schedule" in strategy:
            self.expect(schedule in SCHEDULES, ("schedule", VALUE),
                        f"unknown schedule {schedule!r}{did_you_mean(str(schedule), SCHEDULES)}; "
                        "expected one of: " + ", ".join(SCHEDULES))
        if "virtual_stages" in strategy:
            value = strategy["virtual_stages"]
            self.expect(value == AUTO or _is_int(value) and value >= 1, ("virtual_stages", VALUE),
                        "virtual_stages is a whole number of at least 1 (or auto), "
                        f"found {value!r}")
            self.expect(schedule in ("interleaved", AUTO), ("virtual_stages",),
                        "virtual_stages only applies to the interleaved schedule, but the schedule "
                        f"is {schedule or 'not given'}; add `schedule interleaved`")
        if "skip_ratio" in strategy:
            ratio = strategy["skip_ratio"]
            is_number = isinstance(ratio, int | float) and not isinstance(ratio, bool)
            self.expect(ratio == AUTO or is_number and 0 <= ratio < 1, ("skip_ratio", VALUE),
                        f"skip_ratio is a fraction in [0, 1) (or auto), found {ratio!r}")

    def check_recompute(self, recompute: Any) -> None:
        """True, False, auto, or a non-empty list of module globs."""
        if isinstance(recompute, bool) or recompute == AUTO:
            return
        self.expect(isinstance(recompute, list) and len(recompute) > 0, ("recompute",),
                    "recompute is True, False, 'auto' or a non-empty list of module globs, "
                    f"found {recompute!r}")
        for index, glob in enumerate(recompute):
            self.check_glob(("recompute", index), glob)
            self.expect(glob not in _RECOMPUTE_WORDS, ("recompute", index),
                        f"{glob!r} after `recompute` means a switch, not a module; use True, "
                        "False or 'auto' for those")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_strategy(strategy: Strategy, positions: Positions | None = None,
                   source: str = "<strategy>") -> None:
    """Raise :class:`PlanError` unless ``strategy`` is a well-formed strategy dict or shorthand.

    With ``positions`` (from :func:`parse_plan_with_positions`) errors point at the plan text.
    """
    _StrategyChecker(positions, source).check(strategy)


def normalize_strategy(strategy: Strategy, source: str = "<strategy>") -> Strategy:
    """A checked, canonical copy: SBP texts as ``S(0)``/``B``/``P(sum)``, lists not tuples,
    keys in :data:`STRATEGY_KEYS` order. Errors name ``source``."""
    check_strategy(strategy, source=source)
    if isinstance(strategy, str):
        return strategy
    result = copy.deepcopy(strategy)
    for key in ("params", "activations"):
        for glob, placement in result.get(key, {}).items():
            if isinstance(placement, dict):
                result[key][glob] = {axis: _canonical_sbp(sbp) for axis, sbp in placement.items()}
    for key in ("stage_layers", "stage_devices"):
        if key in result:
            result[key] = [list(entry) for entry in result[key]]
    if isinstance(result.get("skip_ratio"), int):
        result["skip_ratio"] = float(result["skip_ratio"])
    return _in_key_order(result)


def _in_key_order(strategy: dict) -> dict:
    """The keys in :data:`STRATEGY_KEYS` order: one order for every spelling of a plan, so that
    equal plans print (and compile to) identical text."""
    return {key: strategy[key] for key in STRATEGY_KEYS if key in strategy}


# --------------------------------------------------------------------------------------------
# Public parsing and formatting


def parse_plan_with_positions(text: str, source: str = "<plan>") -> tuple[Strategy, Positions]:
    """Parse plan text into a strategy and the position of every value in it.

    Positions map key paths such as ``("params", glob, axis)`` to :class:`SourcePosition`;
    pass them to :func:`validate_plan` so that model errors point at the plan line.
    """
    lines = text.splitlines()
    try:
        tree = _parser().parse(text if text.endswith("\n") else text + "\n")
    except UnexpectedInput as error:
        raise _syntax_error(error, lines, source) from None
    builder = _PlanBuilder(source, lines)
    for statement in _trees(tree.children):
        builder.add(statement)
    strategy, positions = builder.finish()
    check_strategy(strategy, positions, source)
    return (_in_key_order(strategy) if isinstance(strategy, dict) else strategy), positions


def parse_plan(text: str, source: str = "<plan>") -> Strategy:
    """Parse plan text into a strategy dict (or a shorthand such as ``"dp"``).

    Raises :class:`PlanError` (with line and column) before returning anything.
    """
    return parse_plan_with_positions(text, source)[0]


def load_plan(path: str | os.PathLike) -> Strategy:
    """Parse a ``*.sbp`` plan file; errors name the file."""
    return parse_plan(Path(path).read_text(encoding="utf-8"), source=str(path))


def format_plan(strategy: Strategy) -> str:
    """Canonical plan text: ``parse_plan(format_plan(s)) == normalize_strategy(s)``.

    ``normalize_strategy(s) == s`` for every valid ``s`` whose SBP texts are canonical
    (``P(sum)``, not ``P``).
    """
    canonical = normalize_strategy(strategy)
    if isinstance(canonical, str):
        return f"strategy {canonical}\n"
    return "".join(line + "\n" for line in _plan_lines(canonical))


def _plan_lines(strategy: dict) -> Iterator[str]:
    if "mesh" in strategy:
        yield "mesh " + _format_pairs(strategy["mesh"])
    for key, word in (("params", "param"), ("activations", "activation")):
        for glob, placement in strategy.get(key, {}).items():
            yield f"{word} {glob}: {_format_pairs(placement)}"
    for key in ("sequence_parallel", "vocab_parallel"):
        if key in strategy:
            yield {True: key, False: f"{key} off", AUTO: f"{key} auto"}[strategy[key]]
    if "fsdp" in strategy:
        yield f"fsdp {strategy['fsdp']}"
    if "stages" in strategy:
        stages = strategy["stages"]
        yield "stages auto" if stages == AUTO else "stages at " + ", ".join(stages)
    yield from _stage_lines(strategy)
    yield from _pipeline_lines(strategy)
    if "recompute" in strategy:
        recompute = strategy["recompute"]
        words = {True: "all", False: "none", AUTO: AUTO}
        yield "recompute " + (words[recompute] if not isinstance(recompute, list)
                              else ", ".join(recompute))
    if "grad_bucket_bytes" in strategy:
        yield f"grad_bucket_bytes {strategy['grad_bucket_bytes']}"


def _format_pairs(pairs: dict | str) -> str:
    return AUTO if pairs == AUTO else ", ".join(f"{k}={v}" for k, v in pairs.items())


def _stage_lines(strategy: dict) -> Iterator[str]:
    layers = strategy.get("stage_layers")
    devices = strategy.get("stage_devices")
    for index in range(len(layers or devices or [])):
        parts = []
        if layers:
            parts.append(f"layers {layers[index][0]}..{layers[index][1]}")
        if devices:
            ids = devices[index]
            parts.append(("on device " if len(ids) == 1 else "on devices ") + _format_devices(ids))
        yield f"stage {index}: " + " ".join(parts)


def _format_devices(ids: list[int]) -> str:
    """``0..3, 6``: runs of three or more consecutive ids become ranges."""
    spans: list[list[int]] = []
    for device in ids:
        if spans and device == spans[-1][-1] + 1:
            spans[-1].append(device)
        else:
            spans.append([device])
    return ", ".join(f"{s[0]}..{s[-1]}" if len(s) >= 3 else ", ".join(map(str, s)) for s in spans)


def _stages_per_position(schedule: str) -> int:
    """Stages per pipeline position under a schedule name (1 for ``auto`` and names the checks report)."""
    return stages_per_position(schedule) if schedule in SCHEDULE_NAMES else 1


def _pipeline_lines(strategy: dict) -> Iterator[str]:
    if "microbatches" in strategy:
        yield f"microbatches {strategy['microbatches']}"
    if "schedule" in strategy:
        virtual = strategy.get("virtual_stages")
        yield f"schedule {strategy['schedule']}" + (
            f" virtual_stages={virtual}" if virtual is not None else "")
    if "skip_ratio" in strategy:
        ratio = strategy["skip_ratio"]
        yield f"skip_ratio {ratio if ratio == AUTO else repr(float(ratio))}"


# --------------------------------------------------------------------------------------------
# Checks against a model


@dataclass
class _ModelChecker:
    """Checks a strategy against a model's module names, parameter shapes and world size."""

    strategy: dict
    module_names: list[str]
    param_shapes: dict[str, tuple[int, ...]]
    world_size: int | None  # None: checks that need it are left out
    positions: Positions | None
    source: str = "<strategy>"

    def fail(self, path: KeyPath, message: str) -> NoReturn:
        """Raise a PlanError for the value at ``path``."""
        raise _error_at(self.positions, path, message, self.source)

    def check(self) -> None:
        """Run every model check."""
        self.check_world_size()
        self.check_tensor_axis()
        self.check_params()
        for path, glob in self.module_globs():
            self.matches(glob, self.module_names, path, "module")
        self.check_pipeline_axis()
        self.check_stage_order()
        self.check_stage_count()
        self.check_stage_layers()
        self.check_stage_devices()
        self.check_stage_device_counts()

    def mesh(self) -> dict:
        mesh = self.strategy.get("mesh")
        return mesh if isinstance(mesh, dict) else {}

    def check_world_size(self) -> None:
        sizes = list(self.mesh().values())
        if not sizes or AUTO in sizes or self.world_size is None:
            return
        product = math.prod(sizes)
        if product != self.world_size:
            shape = " x ".join(f"{axis}={size}" for axis, size in self.mesh().items())
            self.fail(("mesh",), f"the mesh {shape} has {product} devices, but the world has "
                                 f"{self.world_size}; make the axis sizes multiply to "
                                 f"{self.world_size}")

    def check_tensor_axis(self) -> None:
        """Sequence and vocabulary parallelism split over a tensor-parallel axis (not dp or pp)."""
        mesh = self.strategy.get("mesh")
        if not isinstance(mesh, dict) or any(axis not in _BATCH_AND_STAGE_AXES for axis in mesh):
            return
        for key in ("sequence_parallel", "vocab_parallel"):
            if self.strategy.get(key) is True:
                self.fail((key,), f"{key} splits over a tensor-parallel mesh axis, but the mesh "
                                  f"has only {', '.join(mesh)}; add an axis such as tp=2 to the "
                                  f"mesh or turn {key} off")

    def matches(self, glob: str, names: list[str], path: KeyPath, kind: str) -> list[str]:
        """The names ``glob`` matches; fail with the closest names when there are none."""
        found = [name for name in names if fnmatch.fnmatchcase(name, glob)]
        if found:
            return found
        pool = list(names) + [_generalize(name) for name in names]
        if _WILDCARD_CHARS & set(glob):
            message = f"{glob!r} matches no {kind}"
        else:
            message = f"unknown {kind} {glob!r}"
        self.fail(path, f"{message}{did_you_mean(glob, pool)}; {kind} names are those of "
                        f"model.named_{'parameters' if kind == 'parameter' else 'modules'}()")

    def module_globs(self) -> Iterator[tuple[KeyPath, str]]:
        """(position path, glob) of every module name in the plan other than parameters."""
        for glob in self.strategy.get("activations", {}):
            yield ("activations", glob), glob
        for key in ("recompute", "stages"):
            if isinstance(self.strategy.get(key), list):
                for index, glob in enumerate(self.strategy[key]):
                    yield (key, index), glob

    def check_params(self) -> None:
        names = list(self.param_shapes)
        for glob, placement in self.strategy.get("params", {}).items():
            matched = self.matches(glob, names, ("params", glob), "parameter")
            if placement == AUTO:
                continue
            for axis, text in placement.items():
                if text != AUTO:
                    self.check_split(glob, axis, parse_sbp(text), matched)

    def check_split(self, glob: str, axis: str, sbp: Any, matched: list[str]) -> None:
        path = ("params", glob, axis, VALUE)
        if not isinstance(sbp, (Split, Broadcast)):
            self.fail(path, f"{axis}={sbp}: a parameter is stored split, S(d), or whole, B, on "
                            f"each mesh axis; partial values arise only for activations and "
                            f"gradients")
        if not isinstance(sbp, Split):
            return
        size = self.mesh().get(axis)
        for name in matched:
            shape = tuple(self.param_shapes[name])
            if sbp.dim >= len(shape):
                self.fail(path, f"{axis}={sbp} splits dim {sbp.dim}, but {name} has only "
                                f"{len(shape)} dims (shape {shape}); split a dim below "
                                f"{len(shape)}")
            if _is_int(size) and shape[sbp.dim] % size != 0:
                self.fail(path, f"{axis}={sbp} splits dim {sbp.dim} of {name} (size "
                                f"{shape[sbp.dim]}) over axis {axis} (size {size}), which does "
                                f"not divide it; use an axis size that divides {shape[sbp.dim]} "
                                "or split another dim")

    def stage_count(self) -> int | None:
        stages = self.strategy.get("stages")
        if isinstance(stages, list):
            return len(stages) + 1
        for key in ("stage_layers", "stage_devices"):
            if key in self.strategy:
                return len(self.strategy[key])
        return None

    def check_pipeline_axis(self) -> None:
        """Stage cuts run on pipeline positions, which the mesh's pp axis counts."""
        mesh = self.strategy.get("mesh")
        if mesh == AUTO or isinstance(mesh, dict) and "pp" in mesh:
            return
        for key in ("stages", "stage_layers", "stage_devices"):
            if isinstance(self.strategy.get(key), list):
                count = self.stage_count()
                self.fail((key,), f"the plan has {count} pipeline stages, but the mesh has no pp "
                                  f"axis to run them on; add pp={count} to the mesh (pp is the "
                                  "number of pipeline positions)")

    def check_stage_order(self) -> None:
        """Stage cuts in the order their modules come in the model."""
        stages = self.strategy.get("stages")
        if not isinstance(stages, list):
            return
        order = {name: index for index, name in enumerate(self.module_names)}
        for index in range(1, len(stages)):
            before, name = stages[index - 1], stages[index]
            if before in order and name in order and order[name] < order[before]:
                self.fail(("stages", index), f"stage cut {name!r} comes before {before!r} in the "
                                             "model; list the cuts in model order")

    def virtual_stages(self) -> int | None:
        """Stages per pipeline position: interleaved 1F1B has 2 unless the plan says otherwise, V shapes 2."""
        virtual = self.strategy.get("virtual_stages")
        if _is_int(virtual):
            return virtual
        schedule = self.strategy.get("schedule") or "1f1b"
        return None if virtual is not None or schedule == AUTO else _stages_per_position(schedule)

    def check_stage_count(self) -> None:
        pipeline = self.mesh().get("pp")
        count = self.stage_count()
        if not _is_int(pipeline) or count is None:
            return
        virtual = self.virtual_stages()
        allowed = {pipeline} | ({pipeline * virtual} if virtual is not None else set())
        if count not in allowed:
            key = next(k for k in ("stages", "stage_layers", "stage_devices") if k in self.strategy)
            self.fail((key,), f"the plan has {count} stages, but the pp axis has size {pipeline}; "
                              f"give {pipeline} stages (or pp x virtual_stages for interleaved)")

    def check_stage_layers(self) -> None:
        ranges = self.strategy.get("stage_layers")
        layers = _layer_count(self.module_names)
        if not ranges or layers is None:
            return
        parent, count = layers
        last = ranges[-1][1]
        if last != count - 1:
            self.fail(("stage_layers", len(ranges) - 1),
                      f"the stages cover layers 0..{last}, but the model has {count} layers "
                      f"({parent}.0..{parent}.{count - 1}); the last stage should end at layer "
                      f"{count - 1}")

    def check_stage_devices(self) -> None:
        holder: dict[int, int] = {}
        interleaved = _stages_per_position(self.strategy.get("schedule") or "1f1b") > 1
        for index, devices in enumerate(self.strategy.get("stage_devices", [])):
            for slot, device in enumerate(devices):
                path = ("stage_devices", index, slot)
                if self.world_size is not None and device >= self.world_size:
                    self.fail(path, f"stage {index} is placed on device {device}, but the world "
                                    f"has {self.world_size} devices (0..{self.world_size - 1}), so "
                                    "no device would hold it; use device ids below "
                                    f"{self.world_size}")
                other = holder.setdefault(device, index)
                if other != index and not interleaved:
                    self.fail(path, f"device {device} holds both stage {other} and stage {index}; "
                                    "only `schedule interleaved` (or zbv, dualpipev) puts several stages on one "
                                    "device, so give each stage its own devices or use it")


    def check_stage_device_counts(self) -> None:
        """Every stage runs on a mesh of the non-pp axes, so it needs that many devices."""
        mesh = self.mesh()
        sizes = {axis: size for axis, size in mesh.items() if axis != "pp"}
        if (not self.strategy.get("stage_devices") or "pp" not in mesh
                or not all(map(_is_int, sizes.values()))):
            return
        wanted = math.prod(sizes.values())
        shape = " x ".join(f"{axis}={size}" for axis, size in sizes.items()) or "no other axes"
        for index, devices in enumerate(self.strategy["stage_devices"]):
            if len(devices) != wanted:
                self.fail(("stage_devices", index),
                          f"stage {index} is placed on {len(devices)} devices, but every stage "
                          f"runs on the mesh of the axes other than pp ({shape}), which has "
                          f"{wanted}; give every stage {wanted} devices")


def _generalize(name: str) -> str:
    """``blocks.3.attn`` -> ``blocks.*.attn``, so suggestions can be globs too."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _layer_count(module_names: list[str]) -> tuple[str, int] | None:
    """(parent, count) of the largest numbered module list, e.g. ("blocks", 4)."""
    indices: dict[str, set[int]] = {}
    for name in module_names:
        match = re.fullmatch(r"(.+)\.(\d+)", name)
        if match:
            indices.setdefault(match.group(1), set()).add(int(match.group(2)))
    if not indices:
        return None
    parent = max(indices, key=lambda p: len(indices[p]))
    return parent, max(indices[parent]) + 1


def validate_plan(strategy: Strategy, *, module_names: list[str],
                  param_shapes: dict[str, tuple[int, ...]], world_size: int | None,
                  positions: Positions | None = None, source: str = "<strategy>") -> None:
    """Check a strategy against a model; raise :class:`PlanError` at the first problem.

    Catches names and globs that match no module or parameter (with the closest names), splits
    that do not divide a parameter dim, a mesh whose size is not ``world_size``, stage counts
    that differ from the pp axis, layer ranges past the model, devices outside the world and
    shared devices without the interleaved schedule, parameters laid out ``P``, and sequence or
    vocabulary parallelism without a tensor-parallel axis. With ``positions`` errors point at the
    plan; without, they name ``source`` and the dict path. A ``world_size`` of None skips the
    checks that need it.
    """
    check_strategy(strategy, positions, source)
    if isinstance(strategy, str):
        return
    names = [name for name in module_names if name]
    _ModelChecker(strategy, names, dict(param_shapes), world_size, positions, source).check()


# --------------------------------------------------------------------------------------------
# Plans written on modules


@dataclass(frozen=True)
class _Annotation:
    """Statements attached to a module or module class, with names relative to it."""

    strategy: dict
    where: str  # "" for annotate(): the module path completes it when collected


def _caller_location(depth: int) -> str:
    frame = sys._getframe(depth + 1)
    filename = frame.f_code.co_filename
    relative = os.path.relpath(filename) if os.path.isabs(filename) else filename
    shown = filename if relative.startswith("..") else relative
    return f"{shown}:{frame.f_lineno}"


def _parse_annotation(text: str, source: str) -> dict:
    strategy = parse_plan(text, source)
    if isinstance(strategy, str):
        raise PlanError(f"`strategy {strategy}` stands for a whole plan; on a module, write "
                        "statements such as `param fc.weight: tp=S(0)`", source)
    return strategy


def annotate(module: Any, text: str) -> Any:
    """Attach plan statements to one module instance; names in them are relative to it.

    The statements are parsed now (errors raise here); :func:`collect_annotations` finds them.
    Returns ``module`` so that calls can be chained.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"annotate() takes a torch.nn.Module, found {type(module).__name__}")
    source = f"annotate() on {type(module).__name__} ({_caller_location(1)})"
    annotation = _Annotation(_parse_annotation(text, source), "")
    module.__dict__.setdefault(_INSTANCE_ATTR, []).append(annotation)
    return module


def sbp_plan(text: str) -> Callable[[type], type]:
    """Class decorator attaching plan statements to every instance of a module class.

    Names in the statements are relative to the instance, e.g. on ``MLP``:
    ``@sbp_plan("param fc.weight: tp=S(0)")``.
    """
    location = _caller_location(1)

    def decorate(cls: type) -> type:
        where = f"@sbp_plan on class {cls.__name__} ({location})"
        annotation = _Annotation(_parse_annotation(text, where), where)
        own = list(cls.__dict__.get(_CLASS_ATTR, []))
        setattr(cls, _CLASS_ATTR, [annotation, *own])  # decorators apply bottom-up
        return cls

    return decorate


def _annotations_of(module: Any) -> Iterator[_Annotation]:
    for cls in reversed(type(module).__mro__):  # base classes first
        yield from cls.__dict__.get(_CLASS_ATTR, [])
    yield from module.__dict__.get(_INSTANCE_ATTR, [])


def collect_annotations(model: Any) -> list[tuple[str, str, dict]]:
    """Every annotation in ``model``: (module path, where it was written, prefixed strategy).

    Names in the strategy are prefixed with the module path, so they are relative to ``model``.
    """
    collected = []
    for path, module in model.named_modules():
        for annotation in _annotations_of(module):
            where = annotation.where or f"annotate() on {path or 'the root module'}"
            collected.append((path, where, _prefixed(annotation.strategy, path, where)))
    return collected


def _prefixed(strategy: dict, path: str, where: str) -> dict:
    """``strategy`` with module and parameter names made relative to the root module."""
    if not path:
        return copy.deepcopy(strategy)

    def join(name: str) -> str:
        return f"{path}.{name}"

    result = copy.deepcopy(strategy)
    for key in ("params", "activations"):
        if key in result:
            result[key] = {join(glob): value for glob, value in result[key].items()}
    if isinstance(result.get("stages"), list):
        result["stages"] = [join(name) for name in result["stages"]]
    recompute = result.get("recompute")
    if isinstance(recompute, list):
        result["recompute"] = [join(glob) for glob in recompute]
    elif recompute is True:
        result["recompute"] = [path]  # `recompute all` on a module: all of that module
    elif "recompute" in result:
        raise PlanError(f"`recompute {'none' if recompute is False else recompute}` on module "
                        f"{path} cannot be limited to that module; write it in the model's plan",
                        where)
    return result


# --------------------------------------------------------------------------------------------
# Merging a plan with annotations

_MISSING = object()


@dataclass
class _Merger:
    """Merges strategies, remembering which place gave each value so conflicts can name both."""

    source: str
    base_where: str
    base_positions: Positions | None = None
    merged: dict = field(default_factory=dict)
    origin: dict[KeyPath, str] = field(default_factory=dict)

    def add(self, strategy: dict, where: str) -> None:
        """Merge one strategy written at ``where``."""
        for key, value in strategy.items():
            if key in ("params", "activations"):
                self.add_placements(key, value, where)
            elif key == "mesh":
                self.put(("mesh",), self.merge_mesh(value, where))
            elif key == "recompute":
                self.put((key,), self.merge_recompute(value, where))
            else:
                self.put((key,), self.merge_value((key,), value, where, key.replace("_", " ")))

    def current(self, path: KeyPath) -> Any:
        node: Any = self.merged
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return _MISSING
            node = node[part]
        return node

    def put(self, path: KeyPath, value: Any) -> None:
        node = self.merged
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value

    def origin_of(self, path: KeyPath) -> str:
        """The place that gave the value at ``path`` (or the dict holding it)."""
        for length in range(len(path), 0, -1):
            if path[:length] in self.origin:
                return self.origin[path[:length]]
        return "the plan"

    def conflict(self, path: KeyPath, what: str, old: Any, new: Any, where: str) -> NoReturn:
        """Raise a PlanError naming both places; at the plan's line when the plan gave ``old``."""
        first = self.origin_of(path)
        position = _position_of(self.base_positions, path) if first == self.base_where else None
        if position is not None:
            first = f"{first}:{position.line}"
        message = (f"conflicting {what}: {old} in {first}, but {new} in {where}; make them "
                   "agree or remove one")
        if position is not None:
            raise PlanError.at(position, message)
        raise PlanError(message, self.source)

    def merge_value(self, path: KeyPath, new: Any, where: str, what: str) -> Any:
        """``auto`` yields to any value; two different values conflict."""
        old = self.current(path)
        if old is _MISSING or old == AUTO:
            self.origin[path] = where
            return new
        if new == AUTO or new == old:
            return old
        self.conflict(path, what, repr(old), repr(new), where)

    def merge_mesh(self, new: Any, where: str) -> Any:
        old = self.current(("mesh",))
        if old is _MISSING or old == AUTO or new == AUTO:
            return self.merge_value(("mesh",), new, where, "meshes")
        if list(old) != list(new) or any(a != b and AUTO not in (a, b)
                                          for a, b in zip(old.values(), new.values())):
            self.conflict(("mesh",), "meshes", f"mesh {_format_pairs(old)}",
                          f"mesh {_format_pairs(new)}", where)
        return {axis: new[axis] if size == AUTO else size for axis, size in old.items()}

    def add_placements(self, key: str, placements: dict, where: str) -> None:
        word = "param" if key == "params" else "activation"
        for glob, placement in placements.items():
            old = self.current((key, glob))
            if old is _MISSING or old == AUTO or placement == AUTO:
                value = self.merge_value((key, glob), placement, where, f"{word} {glob}")
                self.put((key, glob), value)
                continue
            for axis, sbp in placement.items():
                path = (key, glob, axis)
                what = f"SBP of {word} {glob} on axis {axis}"
                self.put(path, self.merge_value(path, sbp, where, what))

    def merge_recompute(self, new: Any, where: str) -> Any:
        """Module lists join; ``all`` (True) covers any list; ``none`` agrees only with itself."""
        old = self.current(("recompute",))
        if isinstance(old, list) and isinstance(new, list):
            return list(dict.fromkeys(old + new))
        if (old is True and isinstance(new, list)) or (new is True and isinstance(old, list)):
            return True
        return self.merge_value(("recompute",), new, where, "recompute")


def merge_strategies(base: Strategy, base_where: str,
                     annotations: list[tuple[str, str, dict]],
                     positions: Positions | None = None) -> Strategy:
    """Merge a whole-model plan with module annotations (from :func:`collect_annotations`).

    ``auto`` yields to a given value; lists of recomputed modules are joined; any contradiction
    (one param glob with two SBPs on one axis, two meshes, two schedules, ...) raises
    :class:`PlanError` naming both places (and pointing at the plan's line when the
    ``positions`` of ``base`` are given). The shorthand ``auto`` becomes ``mesh auto`` plus the
    annotations, so that the planner still fills what they leave open. The result is checked
    as a whole and returned in canonical form.
    """
    check_strategy(base, positions, base_where)
    if not annotations:
        return normalize_strategy(base)
    if isinstance(base, str) and base != AUTO:
        raise PlanError(f"the plan is the shorthand `strategy {base}`, which cannot be combined "
                        f"with the module annotations ({annotations[0][1]}, ...); write the plan "
                        "as statements instead", base_where)
    merger = _Merger(source=f"{base_where} merged with module annotations",
                     base_where=base_where, base_positions=positions)
    merger.add(normalize_strategy(base) if isinstance(base, dict) else {"mesh": AUTO}, base_where)
    for path, where, strategy in annotations:
        # annotate() places already end with the path; class decorators name only the class.
        place = where if not path or where.endswith(f" on {path}") else f"{where} on {path}"
        merger.add(normalize_strategy(strategy), place)
    check_strategy(merger.merged, source=merger.source)
    return normalize_strategy(merger.merged)
