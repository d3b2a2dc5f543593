"""Plan text to :class:`~strategy.Strategy`: the grammar (``grammar.lark``), syntax errors in the
user's terms, and the statements turned into the strategy's dict form with the position of every
value, so that any error (here or in :func:`strategy.normalize`) points at the line that wrote it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, NoReturn

import lark
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from frontend.dsl.errors import PlanError, Positions, SourcePosition, located
from strategy import AUTO, VALUE, Strategy, did_you_mean, normalize
from strategy.errors import KeyPath

STATEMENTS = (
    "strategy", "mesh", "param", "activation", "sequence_parallel", "vocab_parallel", "solved_layouts", "fsdp",
    "stages", "stage", "microbatches", "schedule", "virtual_stages", "skip_ratio", "recompute",
    "grad_bucket_bytes", "precision", "cp_attention", "moe_overlap_chunks",
    "regather_activations",
)
"""The words that start a statement."""

GRAMMAR_FILE = Path(__file__).with_name("grammar.lark")
"""The plan grammar (also shown in ``docs/dsl.md``)."""

_MAX_DEVICE_RANGE = 1 << 20


# --------------------------------------------------------------------------------------------
# Syntax


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(GRAMMAR_FILE.read_text(encoding="utf-8"), parser="lalr",
                     propagate_positions=True, keep_all_tokens=True, maybe_placeholders=True)


def terminal_regex(name: str) -> re.Pattern:
    """The grammar's own pattern for a terminal (``AXIS``, ``GLOB``, ...)."""
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
# From parse tree to the strategy's dict form


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
    """Turns statements into the strategy's dict form, recording where each value was written."""

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
        self.strategy["mesh"] = self._entries("mesh", parts, lambda axis: f"mesh axis {axis!r}", _int_or_auto)

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
            per_axis[str(axis)] = AUTO if value.type == "AUTO" else str(value)

    def _add_sequence_parallel(self, keyword: lark.Token, switch: lark.Tree | None) -> None:
        self._add_switch("sequence_parallel", keyword, switch)

    def _add_vocab_parallel(self, keyword: lark.Token, switch: lark.Tree | None) -> None:
        self._add_switch("vocab_parallel", keyword, switch)

    def _add_solved_layouts(self, keyword: lark.Token, switch: lark.Tree | None) -> None:
        self._add_switch("solved_layouts", keyword, switch)

    def _add_regather_activations(self, keyword: lark.Token, switch: lark.Tree | None) -> None:
        self._add_switch("regather_activations", keyword, switch)

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

    def _add_moe_overlap_chunks(self, keyword: lark.Token, value: lark.Token) -> None:
        self._set_scalar("moe_overlap_chunks", keyword, value, int(value))

    def _add_precision(self, keyword: lark.Token, *parts: Any) -> None:
        self.claim(("precision",), keyword, "the precision")
        if isinstance(parts[0], lark.Token):  # a shorthand
            self.mark(("precision", VALUE), parts[0])
            self.strategy["precision"] = str(parts[0])
            return
        self.strategy["precision"] = self._entries("precision", parts, lambda key: f"precision {key}", str)

    def _entries(self, key: str, parts: Any, describe: Any, value: Any) -> dict:
        """The ``name=value`` entries of a statement (``mesh dp=2, tp=4``), each claimed and marked at its
        position under ``key``."""
        entries = {}
        for entry in _trees(parts):
            name, _equal, given = entry.children
            self.claim((key, str(name)), name, describe(str(name)))
            self.mark((key, str(name), VALUE), given)
            entries[str(name)] = value(given)
        return entries

    def _add_cp_attention(self, keyword: lark.Token, value: lark.Token) -> None:
        self._set_scalar("cp_attention", keyword, value, AUTO if value.type == "AUTO" else str(value))

    def _set_scalar(self, key: str, keyword: lark.Token, value_token: lark.Token,
                    value: Any) -> None:
        self.claim((key,), keyword, key)
        self.mark((key, VALUE), value_token)
        self.strategy[key] = value

    # -- whole-plan structure

    def finish(self) -> tuple[dict | str, Positions]:
        """The strategy's dict form (or shorthand) and positions, after the checks that need to see
        every statement; :func:`strategy.normalize` checks the values."""
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


# --------------------------------------------------------------------------------------------
# Public parsing


def parse_plan_with_positions(text: str, source: str = "<plan>") -> tuple[Strategy, Positions]:
    """Parse plan text into a strategy and the position of every value in it.

    Positions map key paths such as ``("params", glob, axis)`` to :class:`SourcePosition`;
    pass them to :func:`~frontend.dsl.validate_plan` so that model errors point at the plan line.
    """
    lines = text.splitlines()
    try:
        tree = _parser().parse(text if text.endswith("\n") else text + "\n")
    except UnexpectedInput as error:
        raise _syntax_error(error, lines, source) from None
    builder = _PlanBuilder(source, lines)
    for statement in _trees(tree.children):
        builder.add(statement)
    written, positions = builder.finish()
    return located(positions, source, lambda: normalize(written)), positions


def parse_plan(text: str, source: str = "<plan>") -> Strategy:
    """Parse plan text into a :class:`~strategy.Strategy` (a shorthand such as ``strategy dp`` too).

    Raises :class:`PlanError` (with line and column) before returning anything.
    """
    return parse_plan_with_positions(text, source)[0]


def load_plan(path: str | os.PathLike) -> Strategy:
    """Parse a ``*.sbp`` plan file; errors name the file."""
    return parse_plan(Path(path).read_text(encoding="utf-8"), source=str(path))
