"""The parallel strategy as one typed value: mesh, layouts, pipeline, recomputation and options.

A :class:`Strategy` is what the plan language parses into and prints from, what the planner
produces, and what every pass, the cost model and the simulator read. Every field says what the
user chose: ``None`` (``()`` for the layout lists) means *not given* — the default named in the
field's docstring applies — and :data:`AUTO` leaves the choice to the planner. Values are built
and checked by :func:`strategy.normalize` (the one normalisation; ``Strategy.from_dict`` is the
Python-dict form of it), so a ``Strategy`` in hand is well formed.

The field names of the records are the keys of the Python dict form (``{"mesh": {"dp": 2},
"sequence_parallel": True, "microbatches": 4, ...}``), in the order :data:`KEYS` lists them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, Literal, Mapping, Union

from ir.sbp import Sbp
from ir.types import CONTEXT_AXIS, EXPERT_AXIS
from ir.schedules import DEFAULT_VIRTUAL_STAGES, SCHEDULE_NAMES, pipeline_schedule

AUTO = "auto"
"""The value that leaves a choice to the planner (the whole strategy, a field, a size, an SBP)."""

Auto = Literal["auto"]

SHORTHANDS = ("dp", "fsdp", "auto")
"""Whole strategies in one word: data parallelism, sharded data parallelism, the planner's choice."""

SCHEDULES = (*SCHEDULE_NAMES, "auto")
"""Pipeline schedule names: those of :data:`ir.schedules.SCHEDULES`, or the planner's choice."""

DATA_AXIS = "dp"
"""The mesh axis that splits the batch."""

PIPELINE_AXIS = "pp"
"""The mesh axis that counts pipeline positions."""

DEFAULT_SCHEDULE = "1f1b"
"""The schedule of a pipelined strategy that names none."""

PRECISION_DTYPES = ("fp32", "bf16", "fp16")
"""The dtypes a precision names (the cluster's peak FLOP/s keys)."""

PRECISION_KEYS = ("param", "compute", "reduce", "forward_reduce")
"""The entries of a precision written as a dict."""

CP_ATTENTIONS = ("ring", "allgather", "a2a")
"""How attention runs on sequence shards (``cp_attention``): ``ring`` passes key/value blocks around
the cp ranks and merges the partial softmaxes online; ``allgather`` gathers keys and values;
``a2a`` (Ulysses) swaps the sequence split for a head split by all-to-all around attention."""

DEFAULT_CP_ATTENTION = "ring"
"""The attention of a strategy with a ``cp`` axis that names none."""



@dataclass(frozen=True)
class MeshSpec:
    """The device mesh a strategy asks for: ordered axis names and their sizes.

    Devices are numbered row-major over the axes in this order (the last axis varies fastest).
    """

    axes: tuple[str, ...] = ()
    """Axis names in order, e.g. ``("dp", "tp")``."""
    sizes: tuple[int | Auto, ...] = ()
    """The size of each axis (``"auto"``: the planner picks it)."""

    @classmethod
    def of(cls, sizes: Mapping[str, int | Auto]) -> MeshSpec:
        """A mesh from ``{axis: size}`` (order kept)."""
        return cls(tuple(sizes), tuple(sizes.values()))

    def __contains__(self, axis: object) -> bool:
        return axis in self.axes

    def __iter__(self) -> Iterator[str]:
        return iter(self.axes)

    def __len__(self) -> int:
        return len(self.axes)

    def items(self) -> Iterator[tuple[str, int | Auto]]:
        """(axis, size) pairs in mesh order."""
        return iter(zip(self.axes, self.sizes))

    def as_dict(self) -> dict[str, int | Auto]:
        """``{axis: size}`` in mesh order."""
        return dict(self.items())

    def size(self, axis: str, default: int = 1) -> int | Auto:
        """The size of ``axis`` (``default`` when the mesh has no such axis)."""
        return self.sizes[self.axes.index(axis)] if axis in self.axes else default

    @property
    def concrete(self) -> bool:
        """Whether every size is a number (none left to the planner)."""
        return AUTO not in self.sizes

    @property
    def device_count(self) -> int:
        """The number of devices the mesh holds (its sizes must be concrete)."""
        return math.prod(int(n) for n in self.sizes)

    def without(self, *axes: str) -> MeshSpec:
        """The mesh without ``axes`` (e.g. a stage's mesh: the mesh without ``pp``)."""
        kept = [(a, n) for a, n in self.items() if a not in axes]
        return MeshSpec(tuple(a for a, _ in kept), tuple(n for _, n in kept))

    def prepend(self, axis: str, size: int | Auto) -> MeshSpec:
        """The mesh with ``axis`` in front."""
        return MeshSpec((axis, *self.axes), (size, *self.sizes))

    @property
    def tensor_axis(self) -> str | None:
        """The axis of tensor (and sequence, vocabulary) parallelism: ``tp`` if present, else the last
        axis that is none of ``dp``, ``pp``, ``cp``, ``ep``; None when there is none."""
        if "tp" in self.axes:
            return "tp"
        others = [a for a in self.axes if a not in (DATA_AXIS, PIPELINE_AXIS, CONTEXT_AXIS, EXPERT_AXIS)]
        return others[-1] if others else None

    def __str__(self) -> str:
        return " x ".join(f"{a}={n}" for a, n in self.items())


@dataclass(frozen=True)
class Layout:
    """The layout asked for the parameters (or module outputs) a glob matches: an SBP per mesh axis."""

    glob: str
    """A ``model.named_parameters()`` / ``named_modules()`` name with fnmatch wildcards."""
    sbp: tuple[tuple[str, Sbp | Auto], ...] | Auto
    """``(axis, SBP)`` pairs for the axes it fixes (an SBP may be ``"auto"``), or ``"auto"`` for all."""

    def on(self, axis: str) -> Sbp | Auto | None:
        """The SBP on ``axis``: ``"auto"`` when left to the planner, None when not given."""
        if self.sbp == AUTO:
            return AUTO
        return dict(self.sbp).get(axis)

    def per_axis(self) -> dict[str, Sbp | Auto]:
        """``{axis: SBP}`` of the axes it fixes (empty when the whole layout is ``"auto"``)."""
        return {} if self.sbp == AUTO else dict(self.sbp)


@dataclass(frozen=True)
class Options:
    """Switches of layouts and gradient synchronisation."""

    sequence_parallel: bool | Auto | None = None
    """Norms and the residual stream on sequence shards over the tensor axis (Megatron-LM). Default off."""
    vocab_parallel: bool | Auto | None = None
    """Embedding tables and the loss split over the vocabulary on the tensor axis. Default off."""
    fsdp: str | Auto | None = None
    """The mesh axis over which parameters and optimizer state are stored ``S(0)`` (sharded data
    parallelism; ``True`` in a dict means ``"dp"``). Default: none."""
    grad_bucket_bytes: int | None = None
    """The size of one gradient all-reduce bucket in bytes. Default: the ``grad_sync`` pass's (4 MiB)."""
    cp_attention: str | Auto | None = None
    """Attention under context parallelism (a ``cp`` mesh axis): one of :data:`CP_ATTENTIONS` or
    ``auto``. Default: :data:`DEFAULT_CP_ATTENTION`."""
    solved_layouts: bool | Auto | None = None
    """The tensor axis's layouts that the strategy leaves free are solved exactly by the planner's cost
    model on the cluster (``passes/propagate.py``), as ``"auto"`` prices them (its plans turn this on);
    off, the propagation picks them greedily, op by op. Default off."""
    moe_overlap_chunks: int | None = None
    """Expert parallelism: each MoE layer's tokens dispatched and combined in this many chunks, so the
    all-to-all of one chunk runs while the experts compute another (FSMoE-style overlap, forward and
    backward). Default 1 (one all-to-all each way)."""
    regather_activations: bool | Auto | None = None
    """An activation all-gathered for an op that saves it for backward (sequence parallelism's norm outputs
    entering the tensor-parallel matmuls) is kept as this rank's shard and gathered again in backward, as
    Megatron-LM's sequence-parallel linear layers do: its share of activation memory shrinks by the tensor degree,
    for one more all-gather in backward. Default off; ``auto`` lets the planner decide."""


@dataclass(frozen=True)
class Pipeline:
    """Pipeline stages, where they run, microbatches and the schedule (the mesh's ``pp`` axis counts
    the pipeline positions)."""

    stages: tuple[str, ...] | Auto | None = None
    """The modules where stages 1, 2, ... begin. Default: cuts balancing the estimated work."""
    stage_layers: tuple[tuple[int, int], ...] | None = None
    """Per stage, its inclusive range of layers (of the model's repeated blocks), from layer 0."""
    stage_devices: tuple[tuple[int, ...], ...] | None = None
    """Per stage (or per pipeline position), its device ids. Default: the devices of its ``pp``
    coordinate."""
    microbatches: int | Auto | None = None
    """Microbatches per step. Default: one per pipeline position (1 without a pipeline)."""
    schedule: str | None = None
    """A name of :data:`ir.schedules.SCHEDULES` (``gpipe``, ``1f1b``, ``interleaved``, the zero-bubble ``zb-h1``,
    ``zbv``, ``dualpipev``) or ``auto``. Default: ``1f1b``."""
    virtual_stages: int | Auto | None = None
    """Stages per pipeline position (interleaved schedule only). Default: 2 when interleaved, the schedule's
    own count otherwise (2 for the V-shaped zbv and dualpipev, else 1)."""
    skip_ratio: float | Auto | None = None
    """SkipPipe: the share of stages a microbatch may skip, in [0, 1). Default: a plain schedule."""

    @property
    def cut_count(self) -> int | None:
        """The number of stages the cuts, layer ranges or stage devices give (None when none does)."""
        if isinstance(self.stages, tuple):
            return len(self.stages) + 1
        for given in (self.stage_layers, self.stage_devices):
            if given is not None:
                return len(given)
        return None

    @property
    def schedule_name(self) -> str:
        """The schedule to run: the one given, else :data:`DEFAULT_SCHEDULE`."""
        return self.schedule if self.schedule not in (None, AUTO) else DEFAULT_SCHEDULE

    @property
    def virtual_stage_count(self) -> int:
        """Stages per pipeline position: the number given, else the schedule's own (2 for interleaved)."""
        if isinstance(self.virtual_stages, int):
            return self.virtual_stages
        return pipeline_schedule(self.schedule_name).stages_per_position or DEFAULT_VIRTUAL_STAGES

    def microbatch_count(self, positions: int) -> int:
        """Microbatches per step: the number given, else one per pipeline position."""
        return self.microbatches if isinstance(self.microbatches, int) else positions


@dataclass(frozen=True)
class PrecisionSpec:
    """The dtypes of a training step (mixed precision when ``param`` and ``compute`` differ).

    ``param`` is the dtype parameters, their gradients and the optimizer state are kept in (with
    ``fp32`` beside a lower ``compute``: fp32 master weights); ``compute`` the dtype the matrix
    products (and the ops ``torch.autocast`` lowers) run in; ``reduce`` the dtype every gradient
    reduction runs in (data-parallel buckets, FSDP reduce-scatters, the adjoint all-reduces of tensor
    parallelism). ``forward_reduce``, when given, the dtype forward's partial sums across ranks run in
    (tensor-parallel all-reduces and sequence-parallel reduce-scatters: the partials are cast to it, summed,
    and rounded back to their own dtype once); None: their own dtype. Written as a shorthand of
    :data:`PRECISION_SHORTHANDS` or as a dict of :data:`PRECISION_KEYS`.
    """

    param: str = "fp32"
    compute: str = "fp32"
    reduce: str = "fp32"
    forward_reduce: str | None = None

    @property
    def mixed(self) -> bool:
        """Whether compute runs in another dtype than the parameters (casts in the IR, master weights)."""
        return self.param != self.compute

    @property
    def shorthand(self) -> str | None:
        """The shorthand naming exactly these dtypes, if any."""
        return next((name for name, spec in PRECISION_SHORTHANDS.items() if spec == self), None)

    def as_dict(self) -> dict[str, str]:
        """``{"param": ..., "compute": ..., "reduce": ...}`` (and ``"forward_reduce"`` when given)."""
        forward = {"forward_reduce": self.forward_reduce} if self.forward_reduce else {}
        return {"param": self.param, "compute": self.compute, "reduce": self.reduce} | forward

    def __str__(self) -> str:
        return self.shorthand or ", ".join(f"{k}={v}" for k, v in self.as_dict().items())


PRECISION_SHORTHANDS = {
    "fp32": PrecisionSpec("fp32", "fp32", "fp32"),
    "bf16": PrecisionSpec("bf16", "bf16", "bf16"),
    "fp16": PrecisionSpec("fp16", "fp16", "fp16"),
    "bf16-mixed": PrecisionSpec("fp32", "bf16", "fp32"),
    "fp16-mixed": PrecisionSpec("fp32", "fp16", "fp32"),
}
"""Precisions in one word: pure fp32 / bf16 / fp16 training, or bf16 / fp16 compute on fp32 master
weights with fp32 gradient reductions (``-mixed``)."""


Recompute = Union[bool, Auto, tuple[str, ...], None]


@dataclass(frozen=True)
class Strategy:
    """A parallel strategy (see the module docstring). Build one with :func:`strategy.normalize` or
    :meth:`from_dict`; print one as plan text with :func:`frontend.dsl.format_plan`."""

    mesh: MeshSpec | Auto | None = None
    """The device mesh. Default: one ``dp`` axis over every device."""
    params: tuple[Layout, ...] = ()
    """Parameter layouts by glob (parameters stored ``S(d)`` or ``B``); unmatched ones are ``B``."""
    activations: tuple[Layout, ...] = ()
    """Layouts of module outputs by glob (the module's last op); others are chosen by propagation."""
    options: Options = field(default_factory=Options)
    """Layout and gradient-synchronisation switches."""
    pipeline: Pipeline = field(default_factory=Pipeline)
    """Stages, microbatches and schedule."""
    recompute: Recompute = None
    """Activations recomputed in backward: True (every repeated block), False, ``"auto"``, or module
    globs. Default: none."""
    precision: PrecisionSpec | None = None
    """The dtypes of parameters, compute and gradient reductions. Default: the model's own dtype
    everywhere (no casts)."""
    shorthand: str | None = None
    """One of :data:`SHORTHANDS` when the whole strategy is one word (every other field unset)."""

    # -- the Python dict form ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, strategy: Mapping[str, Any] | str) -> Strategy:
        """Read and check the Python form: a dict of :data:`KEYS` (or a shorthand); see :func:`normalize`."""
        from strategy.normalize import normalize
        return normalize(strategy)

    def to_dict(self) -> dict[str, Any] | str:
        """The Python form: keys in :data:`KEYS` order, only those given; the shorthand's word for a
        one-word strategy. ``Strategy.from_dict(s.to_dict()) == s``."""
        if self.shorthand is not None:
            return self.shorthand
        out = {}
        for key, value in self._entries():
            if value is not None and value != ():
                out[key] = _plain(value)
        return out

    def _entries(self) -> Iterator[tuple[str, Any]]:
        for f in fields(self):
            if f.name == "shorthand":
                continue
            value = getattr(self, f.name)
            if isinstance(value, (Options, Pipeline)):
                yield from ((g.name, getattr(value, g.name)) for g in fields(value))
            else:
                yield f.name, value

    # -- what passes read -------------------------------------------------------------------------
    @property
    def mesh_spec(self) -> MeshSpec:
        """The mesh as a :class:`MeshSpec` (empty when not given or ``"auto"``)."""
        return self.mesh if isinstance(self.mesh, MeshSpec) else MeshSpec()

    @property
    def tensor_axis(self) -> str | None:
        """The tensor-parallel mesh axis (see :attr:`MeshSpec.tensor_axis`)."""
        return self.mesh_spec.tensor_axis

    @property
    def sequence_parallel(self) -> bool:
        """Whether sequence parallelism is on."""
        return self.options.sequence_parallel is True

    @property
    def vocab_parallel(self) -> bool:
        """Whether vocabulary parallelism is on."""
        return self.options.vocab_parallel is True

    @property
    def fsdp_axis(self) -> str | None:
        """The axis parameters are sharded over, or None."""
        return self.options.fsdp if self.options.fsdp not in (None, AUTO) else None

    @property
    def regather_activations(self) -> bool:
        """Whether gathered activations are kept as shards for backward and gathered again there."""
        return self.options.regather_activations is True

    @property
    def moe_overlap_chunks(self) -> int:
        """Chunks of each MoE layer's dispatch and combine (1 when not given)."""
        return self.options.moe_overlap_chunks or 1

    @property
    def context_parallel(self) -> int:
        """The size of the ``cp`` axis (1 without one)."""
        size = self.mesh_spec.size(CONTEXT_AXIS)
        return int(size) if size != AUTO else 1

    @property
    def cp_attention(self) -> str:
        """The attention method under context parallelism: the one given, else :data:`DEFAULT_CP_ATTENTION`."""
        method = self.options.cp_attention
        return method if method not in (None, AUTO) else DEFAULT_CP_ATTENTION

    @property
    def positions(self) -> int:
        """Pipeline positions: the size of the ``pp`` axis (1 without one)."""
        return int(self.mesh_spec.size(PIPELINE_AXIS))

    @property
    def is_pipelined(self) -> bool:
        """Whether the strategy asks for pipeline stages (a ``pp`` axis, stage cuts or layer ranges)."""
        stages = self.pipeline.stages
        return PIPELINE_AXIS in self.mesh_spec or bool(stages and stages != AUTO) \
            or bool(self.pipeline.stage_layers)

    @property
    def wants_search(self) -> bool:
        """Whether any choice is left to the planner (``"auto"`` anywhere)."""
        return self.shorthand == AUTO or _has_auto(self.to_dict())

    def fixed_parts(self) -> Strategy:
        """What the planner must keep: the strategy without the values left wholly to it (a mesh, layout,
        switch or pipeline entry that is ``"auto"``); ``"auto"`` sizes in a mesh and per-axis ``"auto"``
        SBPs stay, as the free parts of what the user fixed."""
        if self.shorthand is not None:
            return Strategy() if self.shorthand == AUTO else self
        mesh = self.mesh if isinstance(self.mesh, MeshSpec) else None
        return replace(
            self, mesh=mesh,
            params=tuple(p for p in self.params if p.sbp != AUTO),
            activations=tuple(a for a in self.activations if a.sbp != AUTO),
            options=_without_auto(self.options), pipeline=_without_auto(self.pipeline),
            recompute=None if self.recompute == AUTO else self.recompute)


def _without_auto(record):
    return replace(record, **{f.name: None for f in fields(record) if getattr(record, f.name) == AUTO})


def _has_auto(value: Any) -> bool:
    if value == AUTO:
        return True
    if isinstance(value, dict):
        return any(_has_auto(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_auto(v) for v in value)
    return False


def _plain(value: Any) -> Any:
    """A field value in the dict form: meshes and layouts as dicts, SBPs as text, tuples as lists."""
    if isinstance(value, MeshSpec):
        return value.as_dict()
    if isinstance(value, PrecisionSpec):
        return value.shorthand or value.as_dict()
    if isinstance(value, tuple) and value and isinstance(value[0], Layout):
        return {layout.glob: _plain_layout(layout) for layout in value}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _plain_layout(layout: Layout) -> dict | str:
    return AUTO if layout.sbp == AUTO else {axis: str(sbp) for axis, sbp in layout.sbp}


def _keys() -> tuple[str, ...]:
    return tuple(key for key, _ in Strategy()._entries())


KEYS = _keys()
"""Every key of the dict form, in the order plans print them; all are optional."""
