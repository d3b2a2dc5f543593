"""Turning what the user passed as ``strategy=`` into one checked :class:`~strategy.Strategy`.

``strategy=`` may be a dict, a shorthand (``"dp"``, ``"fsdp"``, ``"auto"``), plan text in the
DSL of :mod:`frontend.dsl` (any statements, one per line), the path of a ``*.sbp`` plan file, or a
``Strategy``. :func:`resolve` reads it, merges the statements written on the model's modules
(``annotate()``, ``@sbp_plan``) and checks the result against the captured graph, all before any pass
runs: a bad plan raises one :class:`~frontend.dsl.PlanError` (a ``ValueError`` that reads
``plan.sbp:3:12: error: ...`` with the line and a caret) and nothing is half-applied.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from frontend.dsl import (
    STATEMENTS,
    PlanError,
    Positions,
    collect_annotations,
    located,
    merge_strategies,
    parse_plan_with_positions,
    validate_plan,
)
from ir.core import Graph
from strategy import SHORTHANDS, Strategy, did_you_mean, normalize
from strategy.normalize import NO_STRATEGY

PLAN_SUFFIX = ".sbp"
"""The file suffix of plan files."""

ARGUMENT_SOURCE = "the strategy argument"
"""How errors name a strategy given as a dict or shorthand."""

TEXT_SOURCE = "<plan>"
"""How errors name plan text given as ``strategy=``."""

_ONE_WORD = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class PlanInput:
    """A strategy as the user gave it, before merging and checking."""

    strategy: Strategy
    positions: Positions | None
    """Where each value was written, for plan text and files."""
    where: str
    """The file, ``<plan>`` or ``the strategy argument``: how errors name it."""


@dataclass(frozen=True)
class ModelFacts:
    """What a plan is checked against: names and shapes as the captured graph has them."""

    module_names: list[str]
    """Every module that produced a node, and its parents (``blocks.0.attn`` -> ``blocks.0``)."""
    param_shapes: dict[str, tuple[int, ...]]
    """Parameter and buffer shapes by state_dict name, tied aliases included."""


def resolve(strategy: Any, model: torch.nn.Module | None, graph: Graph,
            world_size: int | None = None) -> Strategy:
    """The checked strategy for ``compile`` (it may hold ``"auto"`` parts for the planner).

    Reads ``strategy`` (see :func:`read_strategy`), merges the model's annotations into it,
    and validates the result against ``graph`` (module names, parameter shapes, and, when
    ``world_size`` is given, the mesh size and stage devices). With ``world_size`` the strategy is
    normalised for it (:func:`strategy.normalize`: the shorthands ``dp``/``fsdp`` and a strategy
    without a mesh get their mesh), so that the plan ``CompiledPlan.to_dsl()`` prints compiles
    back to the same IR. Raises :class:`PlanError`.
    """
    given = read_strategy(strategy)
    facts = model_facts(graph)
    annotations = collect_annotations(model) if model is not None else []
    # a mesh written in an annotation wins over the default one a plan without a mesh would get
    annotated_mesh = any(a.mesh is not None for _, _, a in annotations)
    base = given.strategy if annotated_mesh and given.strategy.shorthand is None \
        else _for_world(given.strategy, world_size, given.positions, given.where)
    _validate(base, facts, world_size, given.positions, given.where)
    for _path, where, annotation in annotations:
        _validate(annotation, facts, world_size, None, where)
    merged = merge_strategies(base, given.where, annotations, given.positions)
    if not annotations:
        return merged
    where = f"{given.where} merged with module annotations"
    merged = _for_world(merged, world_size, given.positions, where)
    _validate(merged, facts, world_size, given.positions, where)
    return merged


def read_strategy(strategy: Any) -> PlanInput:
    """Read ``strategy=`` without looking at the model.

    ``None`` and ``"none"`` mean ``"dp"``; a shorthand stays one; a ``*.sbp`` path (a string
    of one line, or an ``os.PathLike``) or an existing file is loaded; other strings are plan
    text; dicts and ``Strategy`` values are checked by :func:`strategy.normalize` (which reads the
    conventions of Python strategies: ``"fsdp": True`` for the dp axis, a bare SBP such as
    ``"S(0)"`` on a 1-D mesh).
    """
    if strategy in NO_STRATEGY:
        return PlanInput(Strategy(shorthand="dp"), None, ARGUMENT_SOURCE)
    if isinstance(strategy, os.PathLike):
        return _read_file(Path(strategy))
    if isinstance(strategy, str):
        return _read_text(strategy)
    if isinstance(strategy, (dict, Strategy)):
        return PlanInput(located(None, ARGUMENT_SOURCE, lambda: normalize(strategy)), None,
                         ARGUMENT_SOURCE)
    raise PlanError(f"strategy= takes a dict, one of {', '.join(SHORTHANDS)}, plan text or the "
                    f"path of a {PLAN_SUFFIX} file; found {type(strategy).__name__}",
                    ARGUMENT_SOURCE)


def model_facts(graph: Graph) -> ModelFacts:
    """Module names and parameter shapes of a captured graph."""
    modules: dict[str, None] = {}
    for node in graph.nodes:
        name = node.attrs.get("module")
        if not name:
            continue
        parts = name.split(".")
        for length in range(1, len(parts) + 1):
            modules.setdefault(".".join(parts[:length]))
    shapes = {p.target: tuple(int(d) for d in p.type.shape) for p in graph.params}
    for alias, target in (graph.attrs.get("aliases") or {}).items():
        if target in shapes:
            shapes.setdefault(alias, shapes[target])
    return ModelFacts(list(modules), shapes)


def _read_text(text: str) -> PlanInput:
    stripped = text.strip()
    if stripped in SHORTHANDS:
        return PlanInput(Strategy(shorthand=stripped), None, ARGUMENT_SOURCE)
    if "\n" not in stripped and (stripped.endswith(PLAN_SUFFIX) or Path(stripped).is_file()):
        return _read_file(Path(stripped))
    if _ONE_WORD.fullmatch(stripped) and stripped not in STATEMENTS:
        # One word that is not a statement: a mistyped shorthand, most likely.
        raise PlanError(f"unknown strategy {stripped!r}{did_you_mean(stripped, SHORTHANDS)}; "
                        f"strategy= takes {', '.join(SHORTHANDS)}, a dict, plan text such as "
                        f"'mesh dp=2, tp=2', or the path of a {PLAN_SUFFIX} file",
                        ARGUMENT_SOURCE)
    strategy, positions = parse_plan_with_positions(text, TEXT_SOURCE)
    return PlanInput(strategy, positions, TEXT_SOURCE)


def _read_file(path: Path) -> PlanInput:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"plan file {path} does not exist; give the path of a {PLAN_SUFFIX} file "
                        "(relative paths start in the current directory)", str(path)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise PlanError(f"cannot read plan file {path}: {error}", str(path)) from None
    strategy, positions = parse_plan_with_positions(text, str(path))
    return PlanInput(strategy, positions, str(path))


def _for_world(strategy: Strategy, world_size: int | None, positions: Positions | None,
               source: str) -> Strategy:
    """The strategy normalised for ``world_size`` (unchanged without one); errors at the plan line."""
    if world_size is None:
        return strategy
    return located(positions, source, lambda: normalize(strategy, world_size))


def _validate(strategy: Strategy, facts: ModelFacts, world_size: int | None,
              positions: Positions | None, source: str) -> None:
    validate_plan(strategy, module_names=facts.module_names, param_shapes=facts.param_shapes,
                  world_size=world_size, positions=positions, source=source)
