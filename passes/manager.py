"""The pass manager: passes are small named units with options, requirements and results.

A pass is a function ``fn(graph, ctx, *, option=default, ...)`` registered with
:func:`register_pass`: its keyword-only parameters are its options (typed by their annotations,
with their defaults), ``requires`` names the IR properties earlier passes must have produced and
``produces`` those it leaves behind (:data:`PROPERTIES`). A pipeline is a list of pass calls, also
written as text the way MLIR/xDSL pipelines are: ``"decompose,layouts,propagate,boxing,
grad_sync{bucket_bytes=1048576}"``. :func:`run_passes` checks the whole pipeline first (unknown
passes or options, a requirement no earlier pass produces: one error naming the choices), then runs
each pass, verifies the graph after it, prints the IR where asked, and names the failing pass (and
the passes before it) for any exception a pass raises.
"""
from __future__ import annotations

import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from ir.core import Graph
from ir.verifier import verify
from strategy import AUTO, Strategy, StrategyError, did_you_mean, normalize

PROPERTIES = {
    "decomposed": "mean losses as sum / count, vocabulary-parallel cross entropy and batch norm from sums",
    "laid_out": "a mesh, an SBP on every input and parameter, and the layouts propagation must keep "
                "(graph attr pinned)",
    "context_attention": "attention on sequence shards written as the strategy's cp_attention asks (ring "
                         "attention ops under cp_attention ring)",
    "expert_dispatch": "mixture-of-experts layers with experts split over a mesh axis written as moe.dispatch, "
                       "moe.expert_mm and moe.combine (all-to-all on that axis)",
    "propagated": "an SBP on every value and, on every node, the input layouts its signature needs "
                  "(node attr in_sbp)",
    "boxed": "every node's inputs converted to the layouts its signature needs (no in_sbp left)",
    "grad_buckets": "gradient buckets and the backward collectives (graph attrs grad_buckets, backward_comm)",
    "stages": "the graph cut into pipeline stages with transfers (graph attr pipeline)",
    "scheduled": "each device's pipeline action list (graph attr schedule)",
    "recompute_marked": "recomputed regions marked on their nodes (node attr recompute)",
    "regathered": "the all-gathers of activations backward keeps as shards marked (kwarg regather=True)",
    "precision_cast": "the casts of the strategy's mixed precision, where torch.autocast makes them (graph attr "
                      "precision: the plan's param, compute and reduce dtypes)",
}
"""IR properties passes require and produce, and what each means."""


@dataclass
class PassContext:
    """What passes share: the strategy being applied, the device count, the cluster, and
    programmatic overrides (``options``, e.g. ``boxing_cost``).

    ``strategy`` may be anything :func:`strategy.normalize` reads; it is normalised for
    ``world_size`` here, and must leave nothing to the planner.
    """

    strategy: Strategy
    world_size: int
    train: bool = True
    options: dict = field(default_factory=dict)
    cluster: Any = None

    def __post_init__(self) -> None:
        self.strategy = normalize(self.strategy, self.world_size)
        if self.strategy.wants_search:
            raise StrategyError(f"the strategy leaves choices to the planner ('{AUTO}'); passes need every "
                                "choice made: compile() searches first, or give the values")


@dataclass(frozen=True)
class PassOption:
    """One option of a pass: a keyword-only parameter of its function."""

    name: str
    type: type
    """``int``, ``float``, ``bool`` or ``str``."""
    default: Any
    optional: bool
    """Whether ``none`` (Python ``None``) is a value."""

    def parse(self, text: str, pass_name: str) -> Any:
        """The value written as ``text`` in a pipeline (``key=value``)."""
        if self.optional and text.lower() == "none":
            return None
        try:
            if self.type is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                return text.lower() in ("true", "1")
            return self.type(text)
        except ValueError:
            raise PassFailed(f"option {self.name} of pass {pass_name!r} takes {self.describe()}, found "
                             f"{text!r}") from None

    def describe(self) -> str:
        """``an int (or none)``: what the option takes."""
        article = "an" if self.type.__name__[0] in "aeiou" else "a"
        return f"{article} {self.type.__name__}" + (" (or none)" if self.optional else "")


@dataclass(frozen=True)
class Pass:
    """A registered pass: its function, options, and the IR properties it requires and produces."""

    name: str
    run: Callable[..., None]
    options: dict[str, PassOption]
    requires: tuple[str, ...]
    produces: tuple[str, ...]

    @property
    def doc(self) -> str:
        """The first line of the function's docstring."""
        return (self.run.__doc__ or "").strip().split("\n")[0]


@dataclass(frozen=True)
class PassCall:
    """One pass of a pipeline with the options it is given."""

    name: str
    options: dict = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={_format_value(v)}" for k, v in self.options.items()) + "}"


PASSES: dict[str, Pass] = {}
"""Every registered pass by name."""


class PassFailed(RuntimeError):
    """A pipeline that cannot run, or a pass that raised or left an invalid graph; the message names
    the pass and the passes before it."""


def register_pass(name: str, *, requires: tuple[str, ...] = (), produces: tuple[str, ...] = ()):
    """Decorator: make ``fn(graph, ctx, *, options...)`` the pass ``name``."""
    for prop in (*requires, *produces):
        if prop not in PROPERTIES:
            raise ValueError(f"pass {name!r} names IR property {prop!r}; known properties: {', '.join(PROPERTIES)}")

    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        PASSES[name] = Pass(name, fn, _options_of(fn), tuple(requires), tuple(produces))
        fn.pass_name = name
        return fn
    return wrap


def _options_of(fn: Callable) -> dict[str, PassOption]:
    hints = typing.get_type_hints(fn)
    options = {}
    for param in inspect.signature(fn).parameters.values():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        hint = hints.get(param.name, type(param.default))
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
            else (hint,)
        base = next(a for a in args if a is not type(None))
        options[param.name] = PassOption(param.name, base, param.default, type(None) in args)
    return options


# --------------------------------------------------------------------------------------------------
# Pipelines as text

_CALL = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_pipeline(text: str) -> list[PassCall]:
    """``"decompose,layouts,grad_sync{bucket_bytes=1048576}"`` as pass calls, options checked."""
    calls, position = [], 0
    text = text.strip()
    while position < len(text):
        match = _CALL.match(text, position)
        if match is None or match.end() == position:
            raise PassFailed(f"cannot read the pass pipeline at column {position + 1} of {text!r}: expected "
                             "name or name{key=value,...}, separated by commas")
        name, options = match.group(1), match.group(2)
        calls.append(_call(name, _option_texts(name, options or "")))
        position = match.end()
    return calls


def _option_texts(name: str, text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equal, value = item.partition("=")
        if not equal or not key.strip() or not value.strip():
            raise PassFailed(f"pass {name!r}: options are written key=value, found {item!r}")
        out[key.strip()] = value.strip()
    return out


def _call(name: str, option_texts: dict[str, str]) -> PassCall:
    spec = pass_named(name)
    values = {}
    for key, text in option_texts.items():
        if key not in spec.options:
            choices = ", ".join(spec.options) or "none"
            raise PassFailed(f"pass {name!r} has no option {key!r}{did_you_mean(key, spec.options)}; its options: "
                             f"{choices}")
        values[key] = spec.options[key].parse(text, name)
    return PassCall(name, values)


def pass_named(name: str) -> Pass:
    """The registered pass ``name``; one error with the choices when there is none."""
    if name not in PASSES:
        raise PassFailed(f"unknown pass {name!r}{did_you_mean(name, PASSES)}; known passes: "
                         f"{', '.join(sorted(PASSES))}")
    return PASSES[name]


def as_calls(passes: str | list) -> list[PassCall]:
    """A pipeline given as text, or as a list of names, texts or :class:`PassCall`."""
    if isinstance(passes, str):
        return parse_pipeline(passes)
    calls = []
    for item in passes:
        calls += [item] if isinstance(item, PassCall) else parse_pipeline(item)
    return calls


def check_pipeline(calls: list[PassCall], provided: tuple[str, ...] = ()) -> None:
    """Every pass is known and finds what it requires produced by a pass before it (or ``provided``)."""
    available = set(provided)
    for index, call in enumerate(calls):
        spec = pass_named(call.name)
        for prop in spec.requires:
            if prop not in available:
                producers = [p.name for p in PASSES.values() if prop in p.produces]
                before = ", ".join(str(c) for c in calls[:index]) or "none"
                raise PassFailed(f"pass {call.name!r} needs {prop} ({PROPERTIES[prop]}), which no pass before it "
                                 f"produces (passes before it: {before}); run {' or '.join(producers)} first")
        available |= set(spec.produces)


def _format_value(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# --------------------------------------------------------------------------------------------------
# Running


def run_passes(graph: Graph, passes: str | list, ctx: PassContext, *, dump_after: str | list[str] | None = None,
               dump_to: TextIO | None = None, verify_each: bool = True, provided: tuple[str, ...] = ()) -> Graph:
    """Run the pipeline ``passes`` (text, or a list of names / texts / calls) over ``graph`` in place.

    The pipeline is checked before any pass runs (``provided``: properties the graph already has);
    the graph is verified after each pass; ``dump_after`` names passes (or ``"all"``) whose IR is
    written to ``dump_to`` (stdout). Any exception a pass raises becomes :class:`PassFailed`.
    """
    calls = as_calls(passes)
    check_pipeline(calls, provided)
    wanted = _dump_set(dump_after, [c.name for c in calls])
    for index, call in enumerate(calls):
        try:
            PASSES[call.name].run(graph, ctx, **call.options)
            if verify_each:
                verify(graph)
        except Exception as err:  # any failure: say which pass, after which
            before = ", ".join(str(c) for c in calls[:index]) or "none"
            raise PassFailed(f"pass {call.name!r} failed (after passes: {before}): {_describe(err)}") from err
        if call.name in wanted or "all" in wanted:
            (dump_to or sys.stdout).write(f"// IR after pass {call}\n{graph}")
    return graph


def _describe(err: Exception) -> str:
    """The message of an error; the type too where the message alone would not say what went wrong."""
    if isinstance(err, (ValueError, KeyError, TypeError, NotImplementedError)):
        return str(err)
    return f"{type(err).__name__}: {err}"


def _dump_set(dump_after, names) -> set[str]:
    if not dump_after:
        return set()
    wanted = {dump_after} if isinstance(dump_after, str) else set(dump_after)
    unknown = wanted - set(names) - {"all"}
    if unknown:
        raise PassFailed(f"--dump-after names {sorted(unknown)}, which are not in this pipeline: {', '.join(names)}")
    return wanted
