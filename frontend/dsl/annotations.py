"""Plans written on modules (``annotate()``, ``@sbp_plan``) and their merging with the model's plan.

Names in an annotation are relative to its module; :func:`collect_annotations` prefixes them with the
module path. :func:`merge_strategies` merges them into the plan given to ``compile()``: ``auto``
yields to a given value, lists of recomputed modules are joined, and a contradiction names both
places (and the plan's line).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, NoReturn

from frontend.dsl.errors import PlanError, Positions, located, position_of
from frontend.dsl.parser import parse_plan
from strategy import AUTO, Layout, Strategy, normalize
from strategy.errors import KeyPath

_INSTANCE_ATTR = "_sbp_plan_annotations"
_CLASS_ATTR = "__sbp_plan__"


@dataclass(frozen=True)
class _Annotation:
    """Statements attached to a module or module class, with names relative to it."""

    strategy: Strategy
    where: str  # "" for annotate(): the module path completes it when collected


def _caller_location(depth: int) -> str:
    frame = sys._getframe(depth + 1)
    filename = frame.f_code.co_filename
    relative = os.path.relpath(filename) if os.path.isabs(filename) else filename
    shown = filename if relative.startswith("..") else relative
    return f"{shown}:{frame.f_lineno}"


def _parse_annotation(text: str, source: str) -> Strategy:
    strategy = parse_plan(text, source)
    if strategy.shorthand is not None:
        raise PlanError(f"`strategy {strategy.shorthand}` stands for a whole plan; on a module, write "
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


def collect_annotations(model: Any) -> list[tuple[str, str, Strategy]]:
    """Every annotation in ``model``: (module path, where it was written, prefixed strategy).

    Names in the strategy are prefixed with the module path, so they are relative to ``model``.
    """
    collected = []
    for path, module in model.named_modules():
        for annotation in _annotations_of(module):
            where = annotation.where or f"annotate() on {path or 'the root module'}"
            collected.append((path, where, _prefixed(annotation.strategy, path, where)))
    return collected


def _prefixed(strategy: Strategy, path: str, where: str) -> Strategy:
    """``strategy`` with module and parameter names made relative to the root module."""
    if not path:
        return strategy

    def join(name: str) -> str:
        return f"{path}.{name}"

    def joined(layouts: tuple[Layout, ...]) -> tuple[Layout, ...]:
        return tuple(replace(layout, glob=join(layout.glob)) for layout in layouts)

    recompute = strategy.recompute
    if isinstance(recompute, tuple):
        recompute = tuple(join(glob) for glob in recompute)
    elif recompute is True:
        recompute = (path,)  # `recompute all` on a module: all of that module
    elif recompute is not None:
        raise PlanError(f"`recompute {'none' if recompute is False else recompute}` on module "
                        f"{path} cannot be limited to that module; write it in the model's plan",
                        where)
    stages = strategy.pipeline.stages
    if isinstance(stages, tuple):
        stages = tuple(join(name) for name in stages)
    return replace(strategy, params=joined(strategy.params), activations=joined(strategy.activations),
                   pipeline=replace(strategy.pipeline, stages=stages), recompute=recompute)


# --------------------------------------------------------------------------------------------
# Merging a plan with annotations (on the dict form, whose key paths the errors name)

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
        """Merge one strategy (dict form) written at ``where``."""
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
        position = position_of(self.base_positions, path) if first == self.base_where else None
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


def _format_pairs(pairs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in pairs.items())


def merge_strategies(base: Strategy | dict | str, base_where: str,
                     annotations: list[tuple[str, str, Strategy]],
                     positions: Positions | None = None) -> Strategy:
    """Merge a whole-model plan with module annotations (from :func:`collect_annotations`).

    ``auto`` yields to a given value; lists of recomputed modules are joined; any contradiction
    (one param glob with two SBPs on one axis, two meshes, two schedules, ...) raises
    :class:`~frontend.dsl.PlanError` naming both places (and pointing at the plan's line when the
    ``positions`` of ``base`` are given). The shorthand ``auto`` becomes ``mesh auto`` plus the
    annotations, so that the planner still fills what they leave open. The result is checked
    as a whole.
    """
    base = located(positions, base_where, lambda: normalize(base))
    if not annotations:
        return base
    if base.shorthand not in (None, AUTO):
        raise PlanError(f"the plan is the shorthand `strategy {base.shorthand}`, which cannot be combined "
                        f"with the module annotations ({annotations[0][1]}, ...); write the plan "
                        "as statements instead", base_where)
    merger = _Merger(source=f"{base_where} merged with module annotations",
                     base_where=base_where, base_positions=positions)
    merger.add({"mesh": AUTO} if base.shorthand == AUTO else base.to_dict(), base_where)
    for path, where, strategy in annotations:
        # annotate() places already end with the path; class decorators name only the class.
        place = where if not path or where.endswith(f" on {path}") else f"{where} on {path}"
        merger.add(strategy.to_dict(), place)
    return located(None, merger.source, lambda: normalize(merger.merged))
