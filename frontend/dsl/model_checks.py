"""Checks of a strategy against a model: names that match nothing, splits that do not divide,
stages that do not fit its layers, and (through :func:`strategy.check_complete`) the world size."""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Iterator, NoReturn

from frontend.dsl.errors import Positions, error_at, located
from ir.sbp import Broadcast, Split
from strategy import AUTO, VALUE, WILDCARD_CHARS, Strategy, did_you_mean, normalize
from strategy.normalize import check_mesh_fits, check_stages_fit
from strategy.errors import KeyPath


def validate_plan(strategy: Strategy | dict | str, *, module_names: list[str],
                  param_shapes: dict[str, tuple[int, ...]], world_size: int | None,
                  positions: Positions | None = None, source: str = "<strategy>") -> None:
    """Check a strategy against a model; raise :class:`~frontend.dsl.PlanError` at the first problem.

    The mesh against ``world_size`` and the tensor axis that sequence or vocabulary parallelism
    need (:func:`strategy.normalize.check_mesh_fits`); names and globs that match no module or
    parameter (with the closest names), splits that do not divide a parameter dim, parameters laid
    out ``P``; stages without a pp axis or in another number than it says, devices outside the world
    or shared without the interleaved schedule, stages on the wrong number of devices
    (:func:`strategy.normalize.check_stages_fit`); stage cuts out of model order and layer ranges
    past the model. With ``positions`` errors point at the plan; without, they name ``source`` and the dict
    path. A ``world_size`` of None skips the checks that need it.
    """
    strategy = located(positions, source, lambda: normalize(strategy))
    if strategy.shorthand is not None:
        return
    names = [name for name in module_names if name]
    checker = _ModelChecker(strategy, names, dict(param_shapes), positions, source)
    located(positions, source, lambda: check_mesh_fits(strategy, world_size))
    checker.check_names()
    located(positions, source, lambda: check_stages_fit(strategy, world_size))
    checker.check_stages()


@dataclass
class _ModelChecker:
    """Checks a strategy against a model's module names and parameter shapes."""

    strategy: Strategy
    module_names: list[str]
    param_shapes: dict[str, tuple[int, ...]]
    positions: Positions | None
    source: str = "<strategy>"

    def fail(self, path: KeyPath, message: str) -> NoReturn:
        """Raise a PlanError for the value at ``path``."""
        raise error_at(self.positions, path, message, self.source)

    def check_names(self) -> None:
        """Every parameter glob and module name matches; splits divide the parameters."""
        self.check_params()
        for path, glob in self.module_globs():
            self.matches(glob, self.module_names, path, "module")

    def check_stages(self) -> None:
        """Stage cuts in model order; layer ranges up to the model's last layer."""
        self.check_stage_order()
        self.check_stage_layers()

    def matches(self, glob: str, names: list[str], path: KeyPath, kind: str) -> list[str]:
        """The names ``glob`` matches; fail with the closest names when there are none."""
        found = [name for name in names if fnmatch.fnmatchcase(name, glob)]
        if found:
            return found
        pool = list(names) + [_generalize(name) for name in names]
        if WILDCARD_CHARS & set(glob):
            message = f"{glob!r} matches no {kind}"
        else:
            message = f"unknown {kind} {glob!r}"
        self.fail(path, f"{message}{did_you_mean(glob, pool)}; {kind} names are those of "
                        f"model.named_{'parameters' if kind == 'parameter' else 'modules'}()")

    def module_globs(self) -> Iterator[tuple[KeyPath, str]]:
        """(position path, glob) of every module name in the plan other than parameters."""
        for layout in self.strategy.activations:
            yield ("activations", layout.glob), layout.glob
        for key, globs in (("recompute", self.strategy.recompute), ("stages", self.strategy.pipeline.stages)):
            if isinstance(globs, tuple):
                for index, glob in enumerate(globs):
                    yield (key, index), glob

    def check_params(self) -> None:
        names = list(self.param_shapes)
        for layout in self.strategy.params:
            matched = self.matches(layout.glob, names, ("params", layout.glob), "parameter")
            for axis, sbp in layout.per_axis().items():
                if sbp != AUTO:
                    self.check_split(layout.glob, axis, sbp, matched)

    def check_split(self, glob: str, axis: str, sbp: Any, matched: list[str]) -> None:
        path = ("params", glob, axis, VALUE)
        if not isinstance(sbp, (Split, Broadcast)):
            self.fail(path, f"{axis}={sbp}: a parameter is stored split, S(d), or whole, B, on "
                            f"each mesh axis; partial values arise only for activations and "
                            f"gradients")
        if not isinstance(sbp, Split):
            return
        size = self.strategy.mesh_spec.size(axis, None)
        for name in matched:
            shape = tuple(self.param_shapes[name])
            if sbp.dim >= len(shape):
                self.fail(path, f"{axis}={sbp} splits dim {sbp.dim}, but {name} has only "
                                f"{len(shape)} dims (shape {shape}); split a dim below "
                                f"{len(shape)}")
            if isinstance(size, int) and shape[sbp.dim] % size != 0:
                self.fail(path, f"{axis}={sbp} splits dim {sbp.dim} of {name} (size "
                                f"{shape[sbp.dim]}) over axis {axis} (size {size}), which does "
                                f"not divide it; use an axis size that divides {shape[sbp.dim]} "
                                "or split another dim")

    def check_stage_order(self) -> None:
        """Stage cuts in the order their modules come in the model."""
        stages = self.strategy.pipeline.stages
        if not isinstance(stages, tuple):
            return
        order = {name: index for index, name in enumerate(self.module_names)}
        for index in range(1, len(stages)):
            before, name = stages[index - 1], stages[index]
            if before in order and name in order and order[name] < order[before]:
                self.fail(("stages", index), f"stage cut {name!r} comes before {before!r} in the "
                                             "model; list the cuts in model order")

    def check_stage_layers(self) -> None:
        ranges = self.strategy.pipeline.stage_layers
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

