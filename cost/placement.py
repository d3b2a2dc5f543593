"""Where a strategy's mesh axes and pipeline stages run: device lists, axis groups, layer ranges.

Conventions (the simulator and the planner share them):

- The strategy's mesh axes, in the order written (``{"pp": 2, "dp": 4, "tp": 8}``), number the devices
  row-major: the last axis varies fastest, so ``tp`` groups are consecutive ranks (inside one node
  when ``tp`` divides the node size) and ``pp`` outermost gives each stage a contiguous block of nodes.
- ``stage_devices`` (one list per pipeline rank) overrides that; inside a stage the other axes number
  its devices row-major in the mesh order.
- Stage ``k`` (virtual stages included) runs on pipeline rank ``k % pp``; stage 0 also runs the
  prologue (embeddings), the last stage the epilogue (head, loss).
"""
from __future__ import annotations

import fnmatch
import functools
import math
from dataclasses import dataclass
from typing import Sequence

from cluster import Cluster
from ir.schedules import SCHEDULES, stage_positions
from strategy import AUTO, DATA_AXIS, PIPELINE_AXIS, Strategy


class PlacementError(ValueError):
    """A strategy whose stages or devices cannot be laid out (names the key and what to change)."""


def stage_device_lists(mesh: dict, world_size: int, stage_devices: Sequence | None = None) -> list[tuple]:
    """Devices of each pipeline rank (a single rank holding everything when the mesh has no ``pp``)."""
    axes = list(mesh)
    sizes = [int(mesh[a]) for a in axes]
    if math.prod(sizes) != world_size:
        raise PlacementError(f"the mesh {mesh} holds {math.prod(sizes)} devices, the cluster {world_size}")
    pp = int(mesh.get(PIPELINE_AXIS, 1))
    if stage_devices:
        lists = [tuple(int(d) for d in devices) for devices in stage_devices]
        if len(lists) != pp:
            raise PlacementError(f"stage_devices lists {len(lists)} stages, the mesh has pp={pp}")
        per_stage = world_size // pp
        for k, devices in enumerate(lists):
            if len(devices) != per_stage:
                raise PlacementError(f"stage_devices[{k}] has {len(devices)} devices; every stage needs "
                                     f"{per_stage} (the mesh axes other than pp)")
        return lists
    out: list[list[int]] = [[] for _ in range(pp)]
    for device in range(world_size):
        coords = _coords(device, sizes)
        stage = coords[axes.index(PIPELINE_AXIS)] if PIPELINE_AXIS in axes else 0
        out[stage].append(device)
    return [tuple(d) for d in out]


def _coords(index: int, sizes: Sequence[int]) -> list[int]:
    coords = []
    for size in reversed(sizes):
        coords.append(index % size)
        index //= size
    return coords[::-1]


def axis_groups(devices: Sequence[int], axes: Sequence[str], shape: Sequence[int],
                along: str | Sequence[str]) -> list[tuple]:
    """The device groups along one axis (or several together) of a stage's sub-mesh."""
    along = (along,) if isinstance(along, str) else tuple(along)
    for a in along:
        if a not in axes:
            raise PlacementError(f"mesh axis {a!r} is not in the stage mesh {list(axes)}")
    positions = [axes.index(a) for a in along]
    groups: dict[tuple, list[int]] = {}
    for i, device in enumerate(devices):
        coords = _coords(i, shape)
        key = tuple(c for k, c in enumerate(coords) if k not in positions)
        groups.setdefault(key, []).append(device)
    return [tuple(g) for g in groups.values()]


def even_layer_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Inclusive block ranges splitting ``num_layers`` as evenly as possible (earlier stages get extras)."""
    if num_stages > max(num_layers, 1):
        raise PlacementError(f"cannot cut {num_layers} layers into {num_stages} stages; use at most "
                             f"{num_layers} stages")
    base, extra = divmod(num_layers, num_stages)
    out, start = [], 0
    for k in range(num_stages):
        count = base + (1 if k < extra else 0)
        out.append((start, start + count - 1))
        start += count
    return out


def layer_ranges_from_cuts(cuts: Sequence[str], prefix: str | None, num_layers: int) -> list[tuple[int, int]]:
    """Stage ranges from ``stages`` cut names (``blocks.4`` starts a stage at block 4)."""
    starts = [0]
    for name in cuts:
        index = _block_index(name, prefix)
        if index is None:
            raise PlacementError(f"stage cut {name!r} is not a block ({prefix}.<i>); cut the model at block "
                                 f"boundaries, e.g. '{prefix}.{num_layers // 2}'")
        starts.append(index)
    if starts != sorted(set(starts)):
        raise PlacementError(f"stage cuts {list(cuts)} must name increasing, distinct blocks after block 0")
    ends = [s - 1 for s in starts[1:]] + [num_layers - 1]
    return list(zip(starts, ends))


def _block_index(name: str, prefix: str | None) -> int | None:
    if prefix is None or not name.startswith(prefix + "."):
        return None
    rest = name[len(prefix) + 1:].split(".")[0]
    return int(rest) if rest.isdigit() else None


def recomputed_segments(recompute, prefix: str | None, num_layers: int) -> frozenset:
    """Indices of segments (0 = prologue, 1..N = blocks, N + 1 = epilogue) that recompute their activations."""
    if not recompute:
        return frozenset()
    if recompute is True or recompute == "all":
        return frozenset(range(num_layers + 2))
    patterns = [recompute] if isinstance(recompute, str) else list(recompute)
    chosen = set()
    for i in range(num_layers):
        if prefix is not None and any(fnmatch.fnmatchcase(f"{prefix}.{i}", p) for p in patterns):
            chosen.add(i + 1)
    return frozenset(chosen)


@dataclass
class PlanShape:
    """Everything about a strategy the estimator needs, resolved to numbers."""

    axes: tuple
    """Axes of one stage's mesh (the strategy's mesh without ``pp``), in mesh order."""
    shape: tuple
    pp: int
    microbatches: int
    schedule: str
    """``none`` (no pipeline) or a name of :data:`ir.schedules.SCHEDULES` (``1f1b``, ``zbv``, ...)."""
    virtual_stages: int
    stage_layers: list
    """Per stage (``pp * virtual_stages`` of them): inclusive block range ``(first, last)``."""
    stage_devices: list
    """Per pipeline rank: its devices, row-major over :attr:`axes`."""
    recompute: frozenset = frozenset()
    """Segment indices that recompute (see :func:`recomputed_segments`)."""
    fsdp_axis: str | None = None
    optimizer: str = "sgd"

    @property
    def num_stages(self) -> int:
        """Pipeline stages, virtual ones included."""
        return self.pp * self.virtual_stages

    def size(self, axis: str) -> int:
        """The size of a stage-mesh axis (1 when absent)."""
        return self.shape[self.axes.index(axis)] if axis in self.axes else 1

    def rank_of_stage(self, stage: int) -> int:
        """The pipeline rank running ``stage`` (s mod pp; V-shaped schedules: the V of :func:`stage_positions`)."""
        if self.schedule in SCHEDULES and SCHEDULES[self.schedule].v_shape:
            return _stage_positions(self.schedule, self.pp, self.num_stages)[stage]
        return stage % self.pp

    def segments_of_stage(self, stage: int, num_layers: int) -> list[int]:
        """Segment indices of a stage: its blocks, plus the prologue on stage 0, the epilogue on the last."""
        first, last = self.stage_layers[stage]
        out = list(range(first + 1, last + 2))
        if stage == 0:
            out.insert(0, 0)
        if stage == self.num_stages - 1:
            out.append(num_layers + 1)
        return out


@functools.lru_cache(maxsize=None)
def _stage_positions(schedule: str, pp: int, num_stages: int) -> tuple[int, ...]:
    """:func:`~ir.schedules.stage_positions`, once per schedule shape (plan shapes ask for it per stage)."""
    return tuple(stage_positions(schedule, pp, num_stages))


def groups_inside_domains(groups: Sequence[Sequence[int]], cluster: Cluster) -> bool:
    """Whether every group lies inside one fast-link domain (``cluster.fast_domains()``)."""
    home = {}
    for k, domain in enumerate(cluster.fast_domains()):
        for device in domain:
            home[device] = k
    return all(len({home[d] for d in g}) == 1 for g in groups)


def plan_shape(strategy: Strategy, world_size: int, num_layers: int, prefix: str | None, global_batch: int,
               optimizer: str) -> PlanShape:
    """The numbers of a (normalised) strategy: stage meshes, stages, devices, microbatches, schedule,
    recomputation. Stages default to an even cut of the blocks, 1F1B and one microbatch per pipeline
    position; ``stage_devices`` may list one entry per position or per (virtual) stage."""
    mesh = {a: int(n) for a, n in strategy.mesh_spec.items()}
    axes = tuple(a for a in mesh if a != PIPELINE_AXIS)
    stage_shape = tuple(mesh[a] for a in axes)
    pp = mesh.get(PIPELINE_AXIS, 1)
    pipeline = strategy.pipeline
    schedule = pipeline.schedule_name if pp > 1 or pipeline.schedule not in (None, AUTO) else "none"
    virtual = pipeline.virtual_stage_count if schedule in SCHEDULES else 1
    stages = pp * virtual
    if pipeline.stage_layers:
        ranges = [tuple(r) for r in pipeline.stage_layers]
    elif isinstance(pipeline.stages, tuple):
        ranges = layer_ranges_from_cuts(pipeline.stages, prefix, num_layers)
    else:
        ranges = even_layer_ranges(num_layers, stages) if stages > 1 or num_layers else [(0, -1)]
    if len(ranges) != stages:
        raise PlacementError(f"the strategy has {len(ranges)} stages but pp x virtual_stages = {stages}")
    given = pipeline.stage_devices
    devices = stage_device_lists(mesh, world_size, given[:pp] if given else None)
    microbatches = pipeline.microbatch_count(pp)  # the pipeline pass's default: one per position
    dp = mesh.get(DATA_AXIS, 1)
    if global_batch % (dp * microbatches):
        raise PlacementError(f"the global batch {global_batch} does not split into {microbatches} microbatches "
                             f"over dp={dp}; use a batch that is a multiple of {dp * microbatches}")
    recompute = recomputed_segments(strategy.recompute, prefix, num_layers)
    return PlanShape(axes, stage_shape, pp, microbatches, schedule if stages > 1 else "none", virtual, ranges,
                     devices, recompute, strategy.fsdp_axis, optimizer)
