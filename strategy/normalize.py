"""The one normalisation of a strategy: every form the user writes, read, checked and made canonical.

:func:`normalize` takes what ``strategy=`` may be after the plan language has parsed any text —
``None`` or ``"none"`` (data parallelism), a shorthand (``"dp"``, ``"fsdp"``, ``"auto"``), a dict of
:data:`~strategy.types.KEYS`, or a :class:`~strategy.types.Strategy` — and returns one checked
``Strategy``. Python dicts may use two conventions the plan language spells out: ``"fsdp": True``
(shard over ``dp``) and a bare SBP such as ``"S(0)"`` for the only axis of a 1-D mesh (``dp`` when
no mesh is given).

With a ``world_size`` the result is a strategy the passes can run: ``dp`` / ``fsdp`` become their
mesh, a missing mesh is ``{"dp": world_size}``, microbatches without a ``pp`` axis make a one-stage
pipeline (gradient accumulation), and :func:`check_complete` checks the strategy as a whole (mesh
size, the axes that sequence/vocabulary parallelism and stages need, stage devices).

Every error is a :class:`~strategy.errors.StrategyError` whose ``path`` names the entry of the
dict form, so that the plan language can point at the line that wrote it.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, NoReturn

from ir.sbp import SbpSyntaxError, Split, parse_sbp
from ir.schedules import SCHEDULES as SCHEDULE_SPECS
from strategy.errors import VALUE, KeyPath, StrategyError, did_you_mean
from strategy.types import (AUTO, CONTEXT_AXIS, CP_ATTENTIONS, DATA_AXIS, KEYS, PIPELINE_AXIS, PRECISION_DTYPES,
                            PRECISION_KEYS, PRECISION_SHORTHANDS, SCHEDULES, SHORTHANDS, Layout, MeshSpec, Options,
                            Pipeline, PrecisionSpec, Strategy)

AXIS_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""A mesh axis name (the plan grammar's ``AXIS``)."""

GLOB_PATTERN = re.compile(r"[A-Za-z0-9_*?\[\]!\-]+(\.[A-Za-z0-9_*?\[\]!\-]+)*")
"""A module or parameter name with fnmatch wildcards: no spaces, commas or colons (``GLOB``)."""

WILDCARD_CHARS = frozenset("*?[")
RECOMPUTE_WORDS = ("all", "none", "auto")
"""After ``recompute`` in a plan these words are switches, so they cannot be module globs."""

NO_STRATEGY = (None, "none")
"""What reads as plain data parallelism (``"dp"``)."""


def normalize(strategy: Any, world_size: int | None = None) -> Strategy:
    """The checked, canonical :class:`Strategy` of ``strategy`` (see the module docstring).

    Raises :class:`StrategyError` naming the first bad entry.
    """
    if isinstance(strategy, Strategy):
        strategy = strategy.to_dict()  # re-read: a strategy built in code gets the same checks
    result = _Reader().read("dp" if strategy in NO_STRATEGY else strategy)
    if world_size is None:
        return result
    result = _for_world(result, world_size)
    check_complete(result, world_size)
    return result


def _for_world(strategy: Strategy, world_size: int) -> Strategy:
    """Shorthands and a missing mesh made explicit; gradient accumulation as a one-stage pipeline."""
    if strategy.shorthand == AUTO:
        return strategy
    if strategy.shorthand is not None:
        fsdp = DATA_AXIS if strategy.shorthand == "fsdp" else None
        return Strategy(mesh=MeshSpec.of({DATA_AXIS: world_size}), options=Options(fsdp=fsdp))
    mesh = strategy.mesh
    if mesh is None:
        mesh = MeshSpec.of({DATA_AXIS: world_size})
    micro = strategy.pipeline.microbatches
    if isinstance(mesh, MeshSpec) and mesh.concrete and isinstance(micro, int) and micro > 1 \
            and PIPELINE_AXIS not in mesh:
        mesh = mesh.prepend(PIPELINE_AXIS, 1)  # gradient accumulation is a one-stage pipeline
    return replace(strategy, mesh=mesh)


def _fail(path: KeyPath, message: str) -> NoReturn:
    raise StrategyError(message, path)


def _expect(condition: bool, path: KeyPath, message: str) -> None:
    if not condition:
        _fail(path, message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------
# Reading the dict form


class _Reader:
    """Checks the dict form entry by entry and builds the typed strategy."""

    def read(self, strategy: Any) -> Strategy:
        """The whole strategy."""
        if isinstance(strategy, str):
            _expect(strategy in SHORTHANDS, ("strategy", VALUE),
                    f"unknown strategy {strategy!r}{did_you_mean(strategy, SHORTHANDS)}; a one-word strategy "
                    "is one of: " + ", ".join(SHORTHANDS))
            return Strategy(shorthand=strategy)
        _expect(isinstance(strategy, dict), (), "a strategy is a dict or one of " + ", ".join(SHORTHANDS)
                + f"; found {type(strategy).__name__}")
        for key in strategy:
            _expect(key in KEYS, (key,), f"unknown strategy key {key!r}{did_you_mean(str(key), KEYS)}; "
                                         f"the keys are: {', '.join(KEYS)}")
        mesh = self.mesh(strategy.get("mesh"))
        axes = list(mesh) if isinstance(mesh, MeshSpec) else None
        # a bare SBP applies to the only axis of a 1-D mesh (dp when none is given)
        only_axis = axes[0] if axes is not None and len(axes) == 1 else (DATA_AXIS if mesh is None else None)
        params = self.layouts("params", strategy.get("params"), axes, only_axis)
        activations = self.layouts("activations", strategy.get("activations"), axes, only_axis)
        options = self.options(strategy, axes)
        pipeline = self.pipeline(strategy)
        recompute = self.recompute(strategy["recompute"]) if "recompute" in strategy else None
        precision = self.precision(strategy["precision"]) if "precision" in strategy else None
        return Strategy(mesh, params, activations, options, pipeline, recompute, precision)

    # -- mesh and layouts
    def mesh(self, mesh: Any) -> MeshSpec | str | None:
        """``{axis: size}`` (sizes may be auto) or ``"auto"``."""
        if mesh is None or mesh == AUTO:
            return mesh
        _expect(isinstance(mesh, dict) and len(mesh) > 0, ("mesh",),
                f"the mesh is a dict of axis name -> size (or 'auto'), found {mesh!r}")
        for axis, size in mesh.items():
            self.axis_name(("mesh", axis), axis)
            _expect(size == AUTO or _is_int(size) and size >= 1, ("mesh", axis, VALUE),
                    f"mesh axis {axis!r} needs a size of at least 1 (or auto), found {size!r}")
        return MeshSpec.of(mesh)

    def axis_name(self, path: KeyPath, axis: Any) -> None:
        """Axis names are identifiers other than 'auto'."""
        _expect(isinstance(axis, str) and bool(AXIS_PATTERN.fullmatch(axis)) and axis != AUTO, path,
                f"an axis name is a word such as dp or tp (not 'auto'), found {axis!r}")

    def axis_known(self, path: KeyPath, axis: str, axes: list[str] | None) -> None:
        """When the mesh is known, an axis must be one of its axes."""
        if axes is not None and axis not in axes:
            _fail(path, f"axis {axis!r} is not in the mesh{did_you_mean(axis, axes)}; the mesh axes are "
                        + ", ".join(axes))

    def layouts(self, key: str, placements: Any, axes: list[str] | None,
                only_axis: str | None) -> tuple[Layout, ...]:
        """``params`` or ``activations``: glob -> {axis: SBP} or 'auto'."""
        if placements is None:
            return ()
        _expect(isinstance(placements, dict), (key,),
                f"{key} is a dict of glob -> {{axis: SBP}}, found {placements!r}")
        out = []
        for glob, placement in placements.items():
            self.glob((key, glob), glob)
            if isinstance(placement, str) and placement != AUTO and only_axis is not None:
                placement = {only_axis: placement}
            if placement == AUTO:
                out.append(Layout(glob, AUTO))
                continue
            _expect(isinstance(placement, dict) and len(placement) > 0, (key, glob, VALUE),
                    f"{key}[{glob!r}] is a dict of axis -> SBP (or 'auto'), found {placement!r}")
            per_axis = []
            for axis, text in placement.items():
                self.axis_name((key, glob, axis), axis)
                self.axis_known((key, glob, axis), axis, axes)
                per_axis.append((axis, self.sbp((key, glob, axis, VALUE), text)))
            out.append(Layout(glob, tuple(per_axis)))
        return tuple(out)

    def sbp(self, path: KeyPath, text: Any):
        """SBP texts: S(d) with d >= 0, B, P(sum), P(max), or auto."""
        if text == AUTO:
            return AUTO
        try:
            sbp = parse_sbp(text) if isinstance(text, str) else None
        except SbpSyntaxError:
            sbp = None
        _expect(sbp is not None, path, "expected an SBP value such as S(0), B, P(sum) or P(max) (or auto), "
                                       f"found {text!r}")
        _expect(not isinstance(sbp, Split) or sbp.dim >= 0, path,
                f"S(d) splits tensor dim d, which is 0 or more; found {text!r}")
        return sbp

    def glob(self, path: KeyPath, glob: Any, *, single: bool = False) -> None:
        """Names and globs are dotted words with fnmatch wildcards, no spaces/commas/colons."""
        _expect(isinstance(glob, str) and bool(GLOB_PATTERN.fullmatch(glob)), path,
                "a name or glob is dotted words with * ? [...] wildcards and no spaces, "
                f"commas or colons, found {glob!r}")
        if single:
            _expect(not WILDCARD_CHARS & set(glob), path, "a stage begins at one module, so its name has no "
                                                          f"wildcards; found {glob!r}")

    # -- options
    def options(self, strategy: dict, axes: list[str] | None) -> Options:
        """Sequence and vocabulary parallelism, solved layouts, regathered activations, fsdp, the gradient
        bucket size, context-parallel attention and MoE overlap chunks."""
        switches = {}
        for key in ("sequence_parallel", "vocab_parallel", "solved_layouts", "regather_activations"):
            if key in strategy:
                value = strategy[key]
                _expect(isinstance(value, bool) or value == AUTO, (key, VALUE),
                        f"{key} is on (True), off (False) or auto, found {value!r}")
                switches[key] = value
        fsdp = strategy.get("fsdp")
        if fsdp is True:
            fsdp = DATA_AXIS  # True shards over the data-parallel axis
        if "fsdp" in strategy and fsdp != AUTO:
            self.axis_name(("fsdp", VALUE), fsdp)
            self.axis_known(("fsdp", VALUE), fsdp, axes)
        bucket = strategy.get("grad_bucket_bytes")
        if "grad_bucket_bytes" in strategy:
            _expect(_is_int(bucket) and bucket >= 1, ("grad_bucket_bytes", VALUE),
                    f"grad_bucket_bytes is a whole number of bytes, at least 1, found {bucket!r}")
        cp_attention = strategy.get("cp_attention")
        if "cp_attention" in strategy:
            choices = (*CP_ATTENTIONS, AUTO)
            _expect(cp_attention in choices, ("cp_attention", VALUE),
                    f"unknown cp_attention {cp_attention!r}{did_you_mean(str(cp_attention), choices)}; expected one "
                    "of: " + ", ".join(choices))
        chunks = strategy.get("moe_overlap_chunks")
        if "moe_overlap_chunks" in strategy:
            _expect(_is_int(chunks) and chunks >= 1, ("moe_overlap_chunks", VALUE),
                    f"moe_overlap_chunks is a whole number of chunks, at least 1, found {chunks!r}")
        return Options(fsdp=fsdp, grad_bucket_bytes=bucket, cp_attention=cp_attention, moe_overlap_chunks=chunks,
                       **switches)

    # -- pipeline
    def pipeline(self, strategy: dict) -> Pipeline:
        """Stage cuts, layer ranges and devices (agreeing on the number of stages), microbatches,
        schedule, virtual stages and skip ratio."""
        counts: list[tuple[str, int]] = []
        stages = strategy.get("stages")
        if stages is not None and stages != AUTO:
            stages = self.stage_cuts(stages)
            counts.append(("stages", len(stages) + 1))
        layers = devices = None
        if "stage_layers" in strategy:
            _expect(stages is None, ("stage_layers",), "give the stages either as module names "
                                                       "(`stages at` / `from`) or as layer ranges, not both")
            layers = self.stage_layers(strategy["stage_layers"])
            counts.append(("stage_layers", len(layers)))
        if "stage_devices" in strategy:
            devices = self.stage_devices(strategy["stage_devices"])
            counts.append(("stage_devices", len(devices)))
        if len({count for _key, count in counts}) > 1:
            said = ", ".join(f"{key} gives {count}" for key, count in counts)
            _fail((counts[-1][0],), f"the number of stages disagrees: {said}; give the same number of stages "
                                    "everywhere")
        micro = strategy.get("microbatches")
        if "microbatches" in strategy:
            _expect(micro == AUTO or _is_int(micro) and micro >= 1, ("microbatches", VALUE),
                    f"microbatches is a whole number of at least 1 (or auto), found {micro!r}")
        schedule = strategy.get("schedule")
        if "schedule" in strategy:
            _expect(schedule in SCHEDULES, ("schedule", VALUE),
                    f"unknown schedule {schedule!r}{did_you_mean(str(schedule), SCHEDULES)}; expected one of: "
                    + ", ".join(SCHEDULES))
        virtual = strategy.get("virtual_stages")
        if "virtual_stages" in strategy:
            _expect(virtual == AUTO or _is_int(virtual) and virtual >= 1, ("virtual_stages", VALUE),
                    f"virtual_stages is a whole number of at least 1 (or auto), found {virtual!r}")
            fixed = SCHEDULE_SPECS[schedule].stages_per_position if schedule in SCHEDULE_SPECS else None
            _expect(schedule in ("interleaved", AUTO) or fixed == virtual, ("virtual_stages",),
                    "virtual_stages only applies to the interleaved schedule, but the schedule is "
                    f"{schedule or 'not given'}"
                    + (f", which always runs {fixed} stages per position; drop virtual_stages" if fixed and
                       fixed > 1 else "; add `schedule interleaved`"))
        ratio = strategy.get("skip_ratio")
        if "skip_ratio" in strategy:
            is_number = isinstance(ratio, int | float) and not isinstance(ratio, bool)
            _expect(ratio == AUTO or is_number and 0 <= ratio < 1, ("skip_ratio", VALUE),
                    f"skip_ratio is a fraction in [0, 1) (or auto), found {ratio!r}")
            ratio = ratio if ratio == AUTO else float(ratio)
        return Pipeline(stages, layers, devices, micro, schedule, virtual, ratio)

    def stage_cuts(self, stages: Any) -> tuple[str, ...]:
        """A non-empty list of distinct module names."""
        _expect(isinstance(stages, list | tuple) and len(stages) > 0, ("stages",),
                "stages is a non-empty list of the module names where stages 1, 2, ... begin (or 'auto'), "
                f"found {stages!r}")
        for index, name in enumerate(stages):
            self.glob(("stages", index), name, single=True)
            _expect(name not in stages[:index], ("stages", index), f"stage cut {name!r} is given twice")
        return tuple(stages)

    def stage_layers(self, ranges: Any) -> tuple[tuple[int, int], ...]:
        """Contiguous inclusive layer ranges from layer 0."""
        _expect(isinstance(ranges, list | tuple) and len(ranges) > 0, ("stage_layers",),
                f"stage_layers is a non-empty list of [first, last] layer ranges, found {ranges!r}")
        next_layer = 0
        for index, pair in enumerate(ranges):
            path = ("stage_layers", index)
            _expect(isinstance(pair, list | tuple) and len(pair) == 2 and all(_is_int(x) for x in pair), path,
                    f"stage {index}'s layers are [first, last], found {pair!r}")
            first, last = pair
            _expect(first == next_layer, path, f"stage {index} should start at layer {next_layer} so that every "
                                               f"layer has one stage, found {first}")
            _expect(last >= first, path, f"stage {index}'s layers {first}..{last} run backwards; write "
                                         f"{last}..{first}")
            next_layer = last + 1
        return tuple((int(a), int(b)) for a, b in ranges)

    def stage_devices(self, stage_devices: Any) -> tuple[tuple[int, ...], ...]:
        """Each stage a non-empty list of distinct device ids >= 0."""
        _expect(isinstance(stage_devices, list | tuple) and len(stage_devices) > 0, ("stage_devices",),
                f"stage_devices is a non-empty list of device-id lists, found {stage_devices!r}")
        for index, devices in enumerate(stage_devices):
            _expect(isinstance(devices, list | tuple) and len(devices) > 0, ("stage_devices", index),
                    f"stage {index} needs at least one device, found {devices!r}")
            for slot, device in enumerate(devices):
                path = ("stage_devices", index, slot)
                _expect(_is_int(device) and device >= 0, path, f"device ids are numbers from 0, found {device!r}")
                _expect(device not in devices[:slot], path, f"stage {index} lists device {device} twice")
        return tuple(tuple(devices) for devices in stage_devices)

    # -- recompute
    def recompute(self, recompute: Any):
        """True, False, auto, or a non-empty list of module globs."""
        if isinstance(recompute, bool) or recompute == AUTO:
            return recompute
        _expect(isinstance(recompute, list | tuple) and len(recompute) > 0, ("recompute",),
                f"recompute is True, False, 'auto' or a non-empty list of module globs, found {recompute!r}")
        for index, glob in enumerate(recompute):
            self.glob(("recompute", index), glob)
            _expect(glob not in RECOMPUTE_WORDS, ("recompute", index),
                    f"{glob!r} after `recompute` means a switch, not a module; use True, False or 'auto' for those")
        return tuple(recompute)

    # -- precision
    def precision(self, precision: Any) -> PrecisionSpec:
        """A shorthand (``"bf16-mixed"``) or ``{"param": ..., "compute": ..., "reduce": ...}``; a dict's
        ``compute`` defaults to its ``param`` and its ``reduce`` to its ``param``."""
        if isinstance(precision, PrecisionSpec):
            return precision
        if isinstance(precision, str):
            _expect(precision in PRECISION_SHORTHANDS, ("precision", VALUE),
                    f"unknown precision {precision!r}{did_you_mean(precision, PRECISION_SHORTHANDS)}; expected "
                    "one of: " + ", ".join(PRECISION_SHORTHANDS) + " (or a dict of " + ", ".join(PRECISION_KEYS)
                    + ")")
            return PRECISION_SHORTHANDS[precision]
        _expect(isinstance(precision, dict) and len(precision) > 0, ("precision",),
                "precision is one of " + ", ".join(PRECISION_SHORTHANDS) + " or a dict of "
                + ", ".join(PRECISION_KEYS) + f" -> dtype, found {precision!r}")
        for key, dtype in precision.items():
            _expect(key in PRECISION_KEYS, ("precision", key),
                    f"unknown precision key {key!r}{did_you_mean(str(key), PRECISION_KEYS)}; the keys are: "
                    + ", ".join(PRECISION_KEYS))
            _expect(dtype in PRECISION_DTYPES, ("precision", key, VALUE),
                    f"precision {key} is one of " + ", ".join(PRECISION_DTYPES) + f", found {dtype!r}"
                    + did_you_mean(str(dtype), PRECISION_DTYPES))
        param = precision.get("param", "fp32")
        return PrecisionSpec(param, precision.get("compute", param), precision.get("reduce", param),
                             precision.get("forward_reduce"))


# --------------------------------------------------------------------------------------------------
# The strategy as a whole


def check_complete(strategy: Strategy, world_size: int | None) -> None:
    """Check what only the whole strategy (and the world size) shows: :func:`check_mesh_fits` and
    :func:`check_stages_fit`. The world-size checks are skipped when ``world_size`` is None."""
    check_mesh_fits(strategy, world_size)
    check_stages_fit(strategy, world_size)


def check_mesh_fits(strategy: Strategy, world_size: int | None) -> None:
    """The mesh holds ``world_size`` devices; sequence and vocabulary parallelism have a tensor axis."""
    mesh = strategy.mesh if isinstance(strategy.mesh, MeshSpec) else None
    if mesh is None:
        return
    if world_size is not None and mesh.concrete and mesh.device_count != world_size:
        _fail(("mesh",), f"the mesh {mesh} has {mesh.device_count} devices, but the world has {world_size}; "
                         f"make the axis sizes multiply to {world_size}")
    _check_tensor_axis(strategy, mesh)
    _check_context_axis(strategy, mesh)


def _check_context_axis(strategy: Strategy, mesh: MeshSpec) -> None:
    """``cp_attention`` chooses how attention runs on sequence shards, which needs a cp axis."""
    if strategy.options.cp_attention not in (None, AUTO) and CONTEXT_AXIS not in mesh:
        _fail(("cp_attention",), f"cp_attention {strategy.options.cp_attention} runs attention on sequence shards "
                                 f"over a cp mesh axis, but the mesh has only {', '.join(mesh)}; add an axis such "
                                 "as cp=2 to the mesh or drop cp_attention")


def check_stages_fit(strategy: Strategy, world_size: int | None) -> None:
    """Stage cuts need a ``pp`` axis and as many stages as ``pp`` (or ``pp x virtual_stages``); stage
    devices lie inside the world, are shared only by the interleaved schedule, and number as many as
    the mesh without ``pp`` holds."""
    if strategy.shorthand is not None:
        return
    mesh = strategy.mesh if isinstance(strategy.mesh, MeshSpec) else None
    _check_pipeline_axis(strategy)
    _check_stage_count(strategy, mesh)
    _check_stage_devices(strategy, world_size)
    _check_stage_device_counts(strategy, mesh)


def _check_tensor_axis(strategy: Strategy, mesh: MeshSpec) -> None:
    """Sequence and vocabulary parallelism split over a tensor-parallel axis (not dp or pp)."""
    if mesh.tensor_axis is not None:
        return
    for key in ("sequence_parallel", "vocab_parallel"):
        if getattr(strategy.options, key) is True:
            _fail((key,), f"{key} splits over a tensor-parallel mesh axis, but the mesh has only "
                          f"{', '.join(mesh)}; add an axis such as tp=2 to the mesh or turn {key} off")


def _check_pipeline_axis(strategy: Strategy) -> None:
    """Stage cuts run on pipeline positions, which the mesh's pp axis counts."""
    if strategy.mesh == AUTO or PIPELINE_AXIS in strategy.mesh_spec:
        return
    pipeline = strategy.pipeline
    for key in ("stages", "stage_layers", "stage_devices"):
        if isinstance(getattr(pipeline, key), tuple):
            count = pipeline.cut_count
            _fail((key,), f"the plan has {count} pipeline stages, but the mesh has no pp axis to run them on; "
                          f"add pp={count} to the mesh (pp is the number of pipeline positions)")


def _given_virtual_stages(pipeline: Pipeline) -> int | None:
    """Stages per position as far as the plan fixes them (None: left to the planner)."""
    if _is_int(pipeline.virtual_stages):
        return pipeline.virtual_stages
    if pipeline.virtual_stages is None and pipeline.schedule != AUTO:
        return pipeline.virtual_stage_count
    return None


def _check_stage_count(strategy: Strategy, mesh: MeshSpec | None) -> None:
    positions = mesh.size(PIPELINE_AXIS, None) if mesh is not None else None
    count = strategy.pipeline.cut_count
    if not _is_int(positions) or count is None:
        return
    virtual = _given_virtual_stages(strategy.pipeline)
    allowed = {positions} | ({positions * virtual} if virtual is not None else set())
    if count not in allowed:
        key = next(k for k in ("stages", "stage_layers", "stage_devices")
                   if isinstance(getattr(strategy.pipeline, k), tuple))
        _fail((key,), f"the plan has {count} stages, but the pp axis has size {positions}; give {positions} "
                      "stages (or pp x virtual_stages for interleaved, 2 x pp for zbv and dualpipev)")


def _check_stage_devices(strategy: Strategy, world_size: int | None) -> None:
    holder: dict[int, int] = {}
    schedule = strategy.pipeline.schedule
    shared = schedule not in (None, AUTO) and strategy.pipeline.virtual_stage_count > 1  # interleaved, V shapes
    for index, devices in enumerate(strategy.pipeline.stage_devices or ()):
        for slot, device in enumerate(devices):
            path = ("stage_devices", index, slot)
            if world_size is not None and device >= world_size:
                _fail(path, f"stage {index} is placed on device {device}, but the world has {world_size} devices "
                            f"(0..{world_size - 1}), so no device would hold it; use device ids below "
                            f"{world_size}")
            other = holder.setdefault(device, index)
            if other != index and not shared:
                _fail(path, f"device {device} holds both stage {other} and stage {index}; only the schedules "
                            "with several stages per position (interleaved, zbv, dualpipev) put several stages "
                            "on one device, so give each stage its own devices or use one of them")


def _check_stage_device_counts(strategy: Strategy, mesh: MeshSpec | None) -> None:
    """Every stage runs on a mesh of the non-pp axes, so it needs that many devices."""
    stage_devices = strategy.pipeline.stage_devices
    if not stage_devices or mesh is None or PIPELINE_AXIS not in mesh:
        return
    stage_mesh = mesh.without(PIPELINE_AXIS)
    if not stage_mesh.concrete:
        return
    wanted = stage_mesh.device_count
    shape = str(stage_mesh) or "no other axes"
    for index, devices in enumerate(stage_devices):
        if len(devices) != wanted:
            _fail(("stage_devices", index), f"stage {index} is placed on {len(devices)} devices, but every stage "
                                            f"runs on the mesh of the axes other than pp ({shape}), which has "
                                            f"{wanted}; give every stage {wanted} devices")
