"""``strategy="auto"``: search degrees, layouts, stages, microbatches, schedule and recomputation.

The search enumerates tensor-parallel degrees that fit a fast-link domain (``cluster.fast_domains()``;
tensor-parallel groups are consecutive devices, so they never cross one), pipeline degrees (stages are
contiguous blocks of devices in RDMA-domain order, so cuts fall on the slow links between nodes) and
data parallelism for the rest. For each degree and layout switch (sequence parallelism, vocabulary
parallelism, FSDP) the tensor-parallel layouts of every op and parameter are solved exactly by
:mod:`passes.planner.intra_op` (once per setting; the solution is affine in the microbatch size). For
every microbatch count and schedule, the layers are cut into stages by a dynamic program that
minimises the slowest stage under each device's memory limit, recomputing a stage only when it does
not fit otherwise; faster devices therefore get more layers. Candidates are ranked with the closed-form
pipeline time; the best ``top_k`` are priced exactly (``schedules.simulate``). The best candidates of the
first few settings are then refined: the solver prices one reference microbatch, so the storage of the
parameters it chose is changed, a parameter (or the parameters one op reads) at a time, while the exactly
priced step gets faster and fits. The fastest wins.

Progress goes to the ``progress`` callback and the ``sbpc.planner`` logger; ``time_budget_s`` stops
the enumeration early (the report says so); results are cached on disk keyed by the graph text, the
cluster fingerprint, the fixed parts of the strategy and the options.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cluster import Cluster
from cost.estimate import Estimator, PlanOptions, optimizer_name
from cost.experts import EXPERT_AXIS, ExpertBlocks, with_expert_parallelism
from cost.memory import in_flight_microbatches
from cost.ops import Precision
from cost.partition import min_max_partition
from cost.placement import (DATA_AXIS, PIPELINE_AXIS, PlanShape, axis_groups, even_layer_ranges,
                            groups_inside_domains, recomputed_segments)
from ir.types import CONTEXT_AXIS
from cost.segments import at
from ir.core import Graph
from ir.layers import block_param_name
from ir.sbp import B, Split
from passes.pipeline import batch_statistics_node, refuse_batch_statistics
from passes.planner.evaluate import ModelView
from passes.planner.intra_op import LayoutSolution, describe_layouts
from strategy import AUTO, Layout, MeshSpec, Options, Pipeline, Strategy, StrategyError, normalize

LOG = logging.getLogger("sbpc.planner")
CACHE_DIR_VARIABLE = "SBPC_CACHE_DIR"
CACHE_VERSION = 4
REFINED_SETTINGS = 3
"""The best plans of this many settings (degrees and switches) are refined after exact pricing: the storage of
the parameters the layout solver chose is changed while that makes the step faster (:meth:`_Planner._refined`)."""
REFINE_MIN_STEP_RATIO = 8
"""Refine only where a replica runs at least this many reference batches a step: below, the solver's weighting
of once-a-step costs is off by less than that factor (and the descent, a layout solve per move, costs more than
the search itself on a model without repeated blocks)."""
REFINE_STEPS = 8
"""At most this many changes of storage in that refinement."""
REFINE_EXACT = 4
"""Each refinement step prices at most this many of its quickest moves exactly."""
QUICK_MARGIN = 1e-3
"""A refinement move is priced exactly only if its quick (closed-form pipeline) price is at most this share
above the quickest move's: the two can order plans that differ in one parameter's storage differently, by
hundredths of a percent (a 530B pipeline's position embedding: 0.004%), not by a tenth."""
MAX_MICROBATCHES = 512
"""The most microbatches per step the planner tries (the 1T-parameter run of Korthikanti et al. used 512)."""
MAX_INTERLEAVING = 4
"""The most model chunks per pipeline position the interleaved schedule is tried with."""
MATMUL_OPS = ("aten.linear.default", "aten.mm.default", "aten.matmul.default", "aten.addmm.default",
              "aten.bmm.default")


@dataclass
class Candidate:
    """One plan the search priced."""

    strategy: Strategy
    summary: str
    step_time_s: float
    max_memory_bytes: float
    fits: bool
    exact: bool
    """Priced with the real schedule (True) or the closed form (False)."""

    def to_dict(self) -> dict:
        """Plain data (for the cache): the strategy in its dict form."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "strategy": self.strategy.to_dict()}

    @staticmethod
    def from_dict(data: dict) -> "Candidate":
        """Inverse of :meth:`to_dict`."""
        return Candidate(**{**data, "strategy": normalize(data["strategy"])})


@dataclass
class SearchReport:
    """What the search did and found."""

    chosen: Candidate
    alternatives: list
    """The best other candidates (exactly priced), fastest first."""
    evaluated: int
    layout_solves: int
    elapsed_s: float
    truncated: bool = False
    """The time budget ran out before every candidate was priced."""
    cached: bool = False
    cluster: str = ""
    options: dict = field(default_factory=dict)
    layouts: list = field(default_factory=list)
    """The chosen tensor-parallel layout of each op of one block (and the prologue / epilogue)."""
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain data (for the cache)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["chosen"] = self.chosen.to_dict()
        data["alternatives"] = [c.to_dict() for c in self.alternatives]
        return data

    @staticmethod
    def from_dict(data: dict) -> "SearchReport":
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["chosen"] = Candidate.from_dict(data["chosen"])
        data["alternatives"] = [Candidate.from_dict(c) for c in data["alternatives"]]
        return SearchReport(**data)


class SearchError(ValueError):
    """No plan fits: names what was tried and what to change."""


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def search(graph: Graph, cluster: Cluster, strategy: Any = AUTO, *, train: bool = True,
           time_budget_s: float | None = None, progress: Callable[[str], None] | bool | None = None,
           cache_dir: str | os.PathLike | None = None, use_cache: bool = True, top_k: int = 24,
           options: PlanOptions | None = None, **option_values) -> tuple[Strategy, SearchReport]:
    """Fill the ``"auto"`` parts of ``strategy`` (a :class:`~strategy.Strategy`, or anything
    :func:`strategy.normalize` reads) for ``graph`` on ``cluster``; returns (strategy, report).

    ``options`` (or keyword values for :class:`PlanOptions`: ``global_batch``, ``precision``,
    ``optimizer``, ...) say how to price plans. The returned strategy leaves nothing to the planner.
    ``cache_dir``: see :func:`cache_directory`; ``use_cache=False`` neither reads nor writes it.
    """
    options = options or PlanOptions(**option_values)
    fixed = _fixed_parts(strategy)
    options = options.for_plan_precision(fixed.precision)  # priced as the plan will run
    key = _cache_key(graph, cluster, fixed, options, train)
    cache = cache_directory(cache_dir)
    if use_cache:
        hit = _read_cache(cache, key)
        if hit is not None:
            _say(progress, f"plan cache hit ({key[:12]}): {hit[1].chosen.summary}")
            return hit
    planner = _Planner(ModelView(graph, train), cluster, fixed, options, time_budget_s, progress)
    result = planner.run(top_k)
    if use_cache and not result[1].truncated:
        _write_cache(cache, key, result)
    return result


def cache_directory(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where plans are cached: ``cache_dir``, else ``$SBPC_CACHE_DIR``, else ``~/.cache/sbpc``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_DIR_VARIABLE) or Path.home() / ".cache" / "sbpc")


def _say(progress, message: str) -> None:
    """Log ``message``; ``progress`` True prints it (a line per step) to stderr, a callable receives it."""
    LOG.info(message)
    if progress is True:
        print(message, file=sys.stderr, flush=True)
    elif callable(progress):
        progress(message)
    elif progress not in (None, False):
        raise TypeError(f"search option progress is True, False or a callable taking one message, "
                        f"found {type(progress).__name__}")


# --------------------------------------------------------------------------------------------------
# What the user fixed
# --------------------------------------------------------------------------------------------------


def _fixed_parts(strategy: Any) -> Strategy:
    """The concrete parts of a (partial) strategy; ``"auto"`` and absent values are left to the search."""
    strategy = Strategy(shorthand=AUTO) if strategy is None else normalize(strategy)
    if strategy.shorthand not in (None, AUTO):
        raise SearchError(f"expected 'auto' or a strategy with 'auto' parts, found {strategy.shorthand!r}")
    return strategy.fixed_parts()


def _cache_key(graph: Graph, cluster: Cluster, fixed: Strategy, options: PlanOptions, train: bool) -> str:
    text = json.dumps([CACHE_VERSION, hashlib.sha256(str(graph).encode()).hexdigest(), cluster.fingerprint(),
                       fixed.to_dict(), options.key(), train], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_cache(directory: Path, key: str):
    path = directory / f"plan-{key}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        report = SearchReport.from_dict(data["report"])
    except (ValueError, KeyError, TypeError):  # a stale or damaged entry: plan again
        return None
    report.cached = True
    return normalize(data["strategy"]), report


def _write_cache(directory: Path, key: str, result: tuple) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"plan-{key}.json").write_text(json.dumps({"strategy": result[0].to_dict(),
                                                                "report": result[1].to_dict()}, default=str))
    except OSError as error:  # a read-only home: planning still works, only slower next time
        LOG.warning("cannot write the plan cache in %s: %s", directory, error)


# --------------------------------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------------------------------


OVERLAP_CHUNKS = (1, 2, 4)
"""The ``moe_overlap_chunks`` the planner tries for a plan with expert parallelism."""


@dataclass
class _Setting:
    """Degrees and layout switches; one layout solve each."""

    tp: int
    pp: int
    dp: int
    sequence_parallel: bool
    vocab_parallel: bool
    devices: list
    """Per pipeline rank, its devices (row-major over :attr:`stage_axes`)."""
    cp: int = 1
    """Context parallelism: ranks sharing every sequence (ring attention, the load-balanced split)."""
    ep: int = 1
    """Ranks of ``dp`` the MoE experts are folded over (the mesh ``dp / ep, ep, tp``); 1: no expert parallelism."""
    chunks: int = 1
    """``moe_overlap_chunks``: chunks of tokens each MoE layer's all-to-alls run in (with ``ep > 1``)."""
    regather: bool = False
    """``regather_activations``: sequence parallelism's gathered norm outputs kept as shards for backward."""

    @property
    def stage_axes(self) -> tuple[tuple, tuple]:
        """The stage mesh's axes and sizes: ``dp, tp``, with experts folded over ``ep`` (``dp / ep, ep, tp``) or
        sequences split over ``cp`` (``dp, cp, tp``); tp innermost."""
        axes, sizes = [DATA_AXIS], [self.dp // self.ep]
        if self.ep > 1:
            axes, sizes = axes + [EXPERT_AXIS], sizes + [self.ep]
        if self.cp > 1:
            axes, sizes = axes + [CONTEXT_AXIS], sizes + [self.cp]
        return tuple(axes) + ("tp",), tuple(sizes) + (self.tp,)


class _Planner:
    def __init__(self, view: ModelView, cluster: Cluster, fixed: Strategy, options: PlanOptions,
                 time_budget_s: float | None, progress):
        self.view = view
        self.cluster = cluster
        self.fixed = fixed
        self.options = options
        self.budget = time_budget_s
        self.progress = progress
        self.started = time.perf_counter()
        self.truncated = False
        self.evaluated = 0
        self.order = _device_order(cluster)
        self.batch = view.global_batch(options)
        self._estimators: dict[tuple, Estimator] = {}
        self.experts = view.experts(options)
        """The MoE blocks' experts (None: no mixture-of-experts blocks; expert parallelism is not searched)."""
        self.max_microbatches = self._microbatch_limit()
        self._refinements: dict[int, str] = {}
        """Candidate id -> what :meth:`_refined` changed in it (a note of the report when it is chosen)."""

    def _microbatch_limit(self) -> int:
        """1 where an op normalises with statistics of the whole batch (training BatchNorm: each microbatch
        would use its own, so compile() refuses more), else :data:`MAX_MICROBATCHES`."""
        node = batch_statistics_node(self.view.variant(False)[0]) if self.view.train else None
        if node is None:
            return MAX_MICROBATCHES
        if self.fixed.pipeline.microbatches not in (None, 1):
            try:
                refuse_batch_statistics(self.view.variant(False)[0], self.fixed.pipeline.microbatches)
            except StrategyError as error:
                raise SearchError(str(error)) from None
        return 1

    def elapsed(self) -> float:
        """Seconds since the search started."""
        return time.perf_counter() - self.started

    def out_of_time(self) -> bool:
        """Whether the time budget is spent (remembered: the report says the search was cut short)."""
        if self.budget is not None and self.elapsed() > self.budget:
            self.truncated = True
        return self.truncated

    # -- enumeration -------------------------------------------------------------------------------
    def run(self, top_k: int) -> tuple[Strategy, SearchReport]:
        """Price every candidate quickly, the ``top_k`` best exactly; return the fastest that fits."""
        view = self.view
        _say(self.progress, f"planning {view.graph.name} ({view.num_layers} layers, batch {self.batch}) on "
                            f"{self.cluster.name} ({self.cluster.world_size} devices)")
        ranked: list[tuple[float, PlanShape, _Setting, Any]] = []
        for setting in self.settings():
            if ranked and self.out_of_time():  # always finish one setting, so there is a plan
                break
            solution = self.solve(setting)
            if solution is None:
                continue
            for shape in self.shapes(setting, solution):
                self.evaluated += 1
                quick = self.estimator(setting, solution).estimate(shape, exact=False)
                if quick.fits:
                    ranked.append((quick.step_time_s, shape, setting, solution))
            best = min((r[0] for r in ranked), default=math.inf)
            _say(self.progress, f"  tp={setting.tp} pp={setting.pp} dp={setting.dp} sp={setting.sequence_parallel} "
                                f"vp={setting.vocab_parallel}{' regather' if setting.regather else ''}: "
                                f"{self.evaluated} plans priced, best so far "
                                f"{best * 1e3:.1f} ms ({self.elapsed():.1f}s)")
        if not ranked and self.evaluated == 0:
            raise SearchError(self.why_nothing_was_priced())
        if not ranked:
            raise SearchError(f"no plan fits in memory on {self.cluster.name} for batch {self.batch}: tried "
                              f"{self.evaluated} plans; use more devices, a smaller batch, or give fewer fixed "
                              f"choices")
        ranked.sort(key=lambda r: r[0])
        exact = []
        for quick_time, shape, setting, solution in _with_rivals(ranked, top_k):
            estimate = self.estimator(setting, solution).estimate(shape, exact=True)
            strategy = self.strategy_of(setting, shape, solution)
            exact.append((Candidate(strategy, _summary(setting, shape), estimate.step_time_s,
                                    estimate.max_memory_bytes, estimate.fits, True), solution,
                          (setting, shape, estimate)))
        feasible = sorted((c for c in exact if c[0].fits), key=lambda c: c[0].step_time_s)
        if not feasible:
            raise SearchError("every candidate exceeded memory once priced with its real schedule; give a smaller "
                              "batch or more devices")
        feasible = self._with_refined(feasible)
        chosen, best_solution, _ = feasible[0]
        alternatives = _distinct([c for c, _, _ in feasible[1:]], 6)
        report = SearchReport(chosen, alternatives, self.evaluated, view.solves, self.elapsed(), self.truncated,
                              cluster=self.cluster.name, options=asdict(self.options),
                              layouts=describe_layouts(best_solution) if best_solution.problem.request.mesh.size > 1
                              else [], notes=self.notes() + self._context_note(feasible)
                              + ([self._refinements[id(chosen)]] if id(chosen) in self._refinements else []))
        _say(self.progress, f"chose {chosen.summary}: {chosen.step_time_s * 1e3:.1f} ms/step, "
                            f"{chosen.max_memory_bytes / 2**30:.1f} GiB peak ({self.evaluated} plans, "
                            f"{self.elapsed():.1f}s)")
        return chosen.strategy, report

    def _with_refined(self, feasible: list) -> list:
        """``feasible`` (fastest first) with the best candidate of each of its first :data:`REFINED_SETTINGS`
        settings refined (:meth:`_refined`), sorted again."""
        firsts = {}
        for k, (_, _, (setting, _, _)) in enumerate(feasible):
            firsts.setdefault(_setting_key(setting), k)
        for k in sorted(firsts.values())[:REFINED_SETTINGS]:
            feasible[k] = self._refined(*feasible[k])
        return sorted(feasible, key=lambda c: c[0].step_time_s)

    def _refined(self, candidate: Candidate, solution: LayoutSolution, priced: tuple) -> tuple:
        """The candidate after a descent over the storage of the parameters the layout solver chose: each
        move stores one of them another way it could be, or keeps whole (``B``) the ones an op reads together;
        every move is laid out as ``compile()`` lays out the strategy it stands for and priced quickly, the
        quickest (within :data:`QUICK_MARGIN`) exactly, and the best is taken while it makes the step faster
        and fits (at most :data:`REFINE_STEPS` moves).

        The solver's objective is one reference microbatch, in which a parameter's gradient all-reduce (once
        a step) weighs as much as the ops (every microbatch): with many microbatches it shards norms or a
        position embedding to spare that all-reduce and pays a conversion in every microbatch instead, or splits
        a table by its hidden dim where a split by rows costs the step less. The estimator prices the step."""
        setting, shape, estimate = priced
        if self.batch // setting.dp < REFINE_MIN_STEP_RATIO * self.options.reference_batch:
            return candidate, solution, priced  # the solver's weighting is nearly the step's
        options = solution.storage_options()
        moves = [{target: storage[0]} for target, storages in sorted(options.items()) for storage in storages]
        moves += [dict.fromkeys(group, B) for group in solution.storage_groups()]
        solved = {t: sbp[0] for t, sbp in solution.param_sbp.items() if sbp[0] != B}
        stored, refined = solved, None
        for _ in range(REFINE_STEPS):
            trials = self._storage_trials(setting, shape, stored, moves)
            exact = [(self.estimator(setting, trial).estimate(shape, exact=True), trial_stored, trial)
                     for trial_stored, trial in trials[:REFINE_EXACT]]
            exact = [e for e in exact if e[0].fits and e[0].step_time_s < estimate.step_time_s]
            if not exact:
                break
            estimate, stored, refined = min(exact, key=lambda e: e[0].step_time_s)
        if refined is None:
            return candidate, solution, priced
        better = Candidate(self.strategy_of(setting, shape, refined), candidate.summary, estimate.step_time_s,
                           estimate.max_memory_bytes, estimate.fits, True)
        changes = ", ".join(f"{t} {solved.get(t, B)} -> {stored.get(t, B)}" for t in sorted(set(solved) | set(stored))
                            if solved.get(t, B) != stored.get(t, B))
        self._refinements[id(better)] = (f"refined for the whole step ({candidate.step_time_s:.4g} s -> "
                                         f"{estimate.step_time_s:.4g} s): {changes}")
        return better, refined, (setting, shape, estimate)

    def _storage_trials(self, setting: _Setting, shape: PlanShape, stored: dict, moves: list) -> list:
        """``(stored, layouts)`` of each move from ``stored`` that fits, quickest first, those priced within
        :data:`QUICK_MARGIN` of the quickest."""
        trials = []
        for move in moves:
            trial_stored = {t: sbp for t, sbp in stored.items() if t not in move}
            trial_stored.update({t: sbp for t, sbp in move.items() if sbp != B})
            if trial_stored == stored or self.out_of_time():
                continue
            trial = self.solve(setting, trial_stored)
            quick = self.estimator(setting, trial).estimate(shape, exact=False) if trial else None
            if quick is not None and quick.fits:
                trials.append((quick.step_time_s, trial_stored, trial))
        trials.sort(key=lambda t: t[0])
        return [(s, trial) for q, s, trial in trials if q <= trials[0][0] * (1 + QUICK_MARGIN)]

    def _context_note(self, feasible: list) -> list[str]:
        """Why the chosen plan splits sequences over cp: what the best plans without cp (and the best with a
        longer pipeline) cost, and where their steps spend the time the chosen one saves."""
        chosen, _, (setting, shape, estimate) = feasible[0]
        if setting.cp == 1:
            return []
        mine = self._breakdown(setting, shape, estimate, feasible[0][1])
        rivals = [c for c in feasible if c[2][0].cp == 1]
        line = (f"context parallelism cp={setting.cp} (ring attention, load-balanced sequence chunks) chosen: "
                f"{chosen.step_time_s:.3g} s per step, {chosen.max_memory_bytes / 2**30:.1f} GiB peak")
        if not rivals:
            line += "; no plan without cp fits the devices' memory"
            rivals = [None]
        picked = [("the best plan without cp", rivals[0])] if rivals[0] is not None else []
        longer = [c for c in rivals if c is not None and c[2][0].pp > setting.pp]
        if longer and longer[0] is not rivals[0]:
            picked.append(("the best longer pipeline", longer[0]))
        recomputing = [c for c in feasible[1:] if len(c[2][1].recompute) > len(shape.recompute)]
        if recomputing:
            picked.append(("the best plan recomputing more", recomputing[0]))
        for label, (rival, solution, (r_setting, r_shape, r_estimate)) in picked:
            theirs = self._breakdown(r_setting, r_shape, r_estimate, solution)
            worse = sorted(((theirs.get(k, 0.0) - mine.get(k, 0.0), k) for k in set(theirs) | set(mine)), reverse=True)
            why = ", ".join(f"{k} +{d:.3g} s" for d, k in worse[:3] if d > 0)
            line += f"; {label}, {rival.summary}, takes {rival.step_time_s:.3g} s" + (f" ({why})" if why else "")
        return [line]

    def _breakdown(self, setting: _Setting, shape: PlanShape, estimate, solution: LayoutSolution) -> dict:
        """Where a candidate's step goes (seconds by part, the rank that finishes last)."""
        return self.estimator(setting, solution).breakdown(shape, estimate)

    def why_nothing_was_priced(self) -> str:
        """Why the fixed parts left no degree to price (for the error)."""
        mesh = self.fixed.mesh if isinstance(self.fixed.mesh, MeshSpec) else None
        fixed = {a: mesh.size(a) for a in (mesh or {}) if mesh.size(a) != AUTO}
        pp = fixed.get(PIPELINE_AXIS, 1)
        if pp != 1 and self.view.num_layers == 0:
            return (f"the strategy fixes pp={pp}, but {self.view.graph.name} has no stack of identical blocks the "
                    f"planner could cut into stages (it cuts pipelines only between identical blocks); give the "
                    f"stages (\"stages\": [module, ...]) or leave pp to the planner")
        return (f"no degrees fit the fixed mesh {fixed or 'auto'} on {self.cluster.name} ({self.cluster.world_size} "
                f"devices, fast-link domains of {min(len(d) for d in self.cluster.fast_domains())}) with batch "
                f"{self.batch}: sizes must multiply to the device count, tp must divide a domain and dp the batch")

    def notes(self) -> list[str]:
        """Lines for the report: budget, structure, and the pricing assumptions."""
        notes = []
        if self.truncated:
            notes.append(f"the time budget ({self.budget}s) ran out; the plan is the best found so far")
        if self.view.num_layers == 0:
            notes.append("the graph has no repeated blocks: no pipeline cuts were considered")
        precision = Precision.resolve(self.options.precision, self.view.graph)
        notes.append(f"priced with {precision.describe()}, {self.options.optimizer} optimizer state, "
                     f"global batch {self.batch}")
        return notes

    def settings(self):
        """Degrees and switches allowed by the fixed parts, by tensor-parallel then pipeline degree."""
        world = self.cluster.world_size
        mesh = self.fixed.mesh if isinstance(self.fixed.mesh, MeshSpec) else None
        unknown = sorted(set(mesh or {}) - {DATA_AXIS, "tp", PIPELINE_AXIS, EXPERT_AXIS, CONTEXT_AXIS})
        if unknown:
            raise SearchError(f"the planner searches the mesh axes dp, tp, pp, ep and cp; the strategy names {unknown}. "
                              f"Rename them or give the whole mesh without 'auto'")
        domain = min(len(d) for d in self.cluster.fast_domains())
        layers = max(self.view.num_layers, 1)
        for tp in _divisors(world):
            if not _allowed(mesh, "tp", tp) or (tp > 1 and domain % tp):
                continue
            for pp in _divisors(world // tp):
                if not _allowed(mesh, PIPELINE_AXIS, pp) or pp > layers:
                    continue
                if pp > 1 and self.view.num_layers == 0:
                    continue
                for cp in self._context_degrees(mesh, world // (tp * pp), pp):
                    dp = world // (tp * pp * cp)
                    if self.batch % dp:
                        continue
                    ranks = dp * cp * tp
                    devices = [tuple(self.order[r * ranks:(r + 1) * ranks]) for r in range(pp)]
                    axes, sizes = _Setting(tp, pp, dp, False, False, devices, cp=cp).stage_axes
                    if tp > 1 and not groups_inside_domains([g for d in devices for g in axis_groups(d, axes, sizes, "tp")],
                                                            self.cluster):
                        continue
                    for ep in self._expert_degrees(mesh, dp, cp):
                        for chunks in self._overlap_chunks(ep):
                            for sp in _switch(self.fixed.options.sequence_parallel, tp > 1):
                                for vp in _switch(self.fixed.options.vocab_parallel, tp > 1):
                                    for regather in _switch(self.fixed.options.regather_activations, sp):
                                        yield _Setting(tp, pp, dp, sp, vp, devices, cp=cp, ep=ep, chunks=chunks,
                                                       regather=regather)

    def _context_degrees(self, mesh: MeshSpec | None, ranks: int, pp: int) -> list[int]:
        """The cp degrees to try on ``ranks`` devices of each of ``pp`` pipeline positions: those the fixed mesh
        allows whose load-balanced split (two chunks per rank) divides the sequence, for a model with attention
        (1 always, where allowed). A cp rank costs what a data-parallel rank does plus the ring's exchange, so
        unless the mesh fixes cp, cp > 1 is tried only where data parallelism cannot take those ranks: the batch
        does not split over them, or would leave fewer microbatches than pipeline positions (long sequences, few
        of them)."""
        sequence = self.view.sequence_length
        fixed = mesh is not None and mesh.size(CONTEXT_AXIS) not in (1, AUTO)
        out = []
        for cp in _divisors(ranks):
            if not _allowed(mesh, CONTEXT_AXIS, cp):
                continue
            if cp > 1 and (sequence is None or sequence % (2 * cp)):
                continue
            if cp > 1 and not fixed and _allowed(mesh, DATA_AXIS, ranks) and self.batch % ranks == 0 \
                    and self.batch // ranks >= pp:
                continue  # dp over all the ranks does what cp would, without the exchange
            out.append(cp)
        return out

    def _expert_degrees(self, mesh: MeshSpec | None, dp: int, cp: int = 1) -> list[int]:
        """The ``ep`` degrees to try: divisors of ``dp`` that divide the experts, as the fixed mesh allows; 1
        without MoE blocks, with FSDP asked for, or with sequences split over cp (the planner does not combine the
        two). The ``ep`` ranks are consecutive devices (``ep`` inside ``dp``, outside ``tp``), so an ``ep x tp``
        group stays inside a node where it fits; a larger one spans nodes, and its all-to-alls are priced on the
        links between them, so it wins only where that pays (the experts' memory and gradient reduction shrink
        with ``ep``)."""
        if self.experts is None or self.fixed.options.fsdp or cp > 1:
            return [1] if _allowed(mesh, DATA_AXIS, dp) and _allowed(mesh, EXPERT_AXIS, 1) else []
        return [ep for ep in _divisors(dp) if not self.experts.experts % ep and _allowed(mesh, DATA_AXIS, dp // ep)
                and _allowed(mesh, EXPERT_AXIS, ep)]

    def _overlap_chunks(self, ep: int) -> tuple[int, ...]:
        """The ``moe_overlap_chunks`` to try with ``ep``: the strategy's, else :data:`OVERLAP_CHUNKS` (the same
        layouts and shapes priced again with the exchanges in chunks: cheap); 1 without expert parallelism."""
        given = self.fixed.options.moe_overlap_chunks
        if given is not None:
            return (given,)
        return OVERLAP_CHUNKS if ep > 1 else (1,)

    def solve(self, setting: _Setting, stored: dict | None = None) -> LayoutSolution | None:
        """The tensor-parallel layouts of a setting (None when the fixed parts rule every layout out).
        ``stored``: every sharded parameter's storage (target -> SBP; the others whole), as ``compile()`` solves
        a strategy's layouts (:meth:`_refined`); without it the solver chooses the storage too."""
        tp_group = axis_groups(setting.devices[0], *setting.stage_axes, "tp")[0]
        chosen = replace(self.fixed, mesh=MeshSpec.of({"dp": setting.dp, "tp": setting.tp}),
                         options=replace(self.fixed.options, vocab_parallel=setting.vocab_parallel))
        pins, hints = self.view.pins_and_hints(chosen, "tp")
        pins.update(stored or {})
        try:
            return self.view.layouts(self.cluster, tuple(tp_group), self.options,
                                     vocab_parallel=setting.vocab_parallel, sequence_parallel=setting.sequence_parallel,
                                     pins=pins, hints=hints, free_params=stored is None)
        except ValueError as error:  # e.g. a fixed layout that this degree cannot honour
            LOG.info("tp=%d: %s", setting.tp, error)
            return None

    def estimator(self, setting: _Setting, solution: LayoutSolution) -> Estimator:
        """The estimator of a setting's profile (one per layouts and data-parallel degree)."""
        key = (id(solution), setting.dp, setting.cp, setting.ep, setting.chunks, setting.regather)
        if key not in self._estimators:
            profile = self.view.profile(solution, setting.dp, self.options, setting.cp, setting.regather)
            if setting.ep > 1:
                profile = with_expert_parallelism(profile, self.experts, setting.ep, self.options.moe_imbalance,
                                                  setting.chunks)
            self._estimators[key] = self.options.estimator(profile, self.cluster)
        return self._estimators[key]

    def shapes(self, setting: _Setting, solution: LayoutSolution):
        """Microbatches x schedule x fsdp, each with its stage cut and recomputation."""
        per_replica = self.batch // setting.dp
        estimator = self.estimator(setting, solution)
        for m in [d for d in _divisors(per_replica) if d <= self.max_microbatches]:
            whole_batch = setting.dp == 1 and m == per_replica  # as many microbatches as the batch has samples
            if self.fixed.pipeline.microbatches not in (None, m) or (setting.pp > 1 and m < setting.pp and not whole_batch):
                continue  # fewer microbatches than stages leaves most of the pipeline idle (unless no more exist)
            for schedule, virtual in self._schedules(setting, m):
                for fsdp in _switch(self.fixed.options.fsdp, (setting.dp > 1 or setting.cp > 1) and setting.ep == 1):
                    # parameters shard over the data-parallel ranks, or without them over the cp ranks
                    fsdp_axis = (DATA_AXIS if setting.dp > 1 else CONTEXT_AXIS) if fsdp else None
                    base = PlanShape(*setting.stage_axes, setting.pp, m, schedule, virtual, [], setting.devices,
                                     frozenset(), fsdp_axis, optimizer_name(self.options.optimizer))
                    if fsdp and self.fixed.options.fsdp is None and self._fits_plainly(base, estimator):
                        continue  # sharding only buys memory, and this plan does not need it
                    yield from self._cuts(base, estimator)

    def _fits_plainly(self, base: PlanShape, estimator: Estimator) -> bool:
        """Whether the plan fits without FSDP or recomputation with an even stage cut."""
        layers = self.view.num_layers
        stages = base.pp * base.virtual_stages
        ranges = even_layer_ranges(layers, stages) if stages > 1 else [(0, layers - 1)]
        plain = PlanShape(**{**base.__dict__, "fsdp_axis": None, "stage_layers": ranges})
        return estimator.fits(estimator.memory(plain))

    def _schedules(self, setting: _Setting, m: int) -> list[tuple[str, int]]:
        if setting.pp == 1:
            return [("none", 1)]
        fixed = self.fixed.pipeline.schedule
        options = [("1f1b", 1), ("zb-h1", 1)]
        layers = self.view.num_layers
        if m % setting.pp == 0:  # interleaving takes whole rounds of microbatches, and v chunks cut evenly
            options += [("interleaved", v) for v in range(2, MAX_INTERLEAVING + 1) if layers % (v * setting.pp) == 0]
        if layers % (2 * setting.pp) == 0:  # the V shapes: two stages per position, cut evenly
            options += [("zbv", 2)] + ([("dualpipev", 2)] if m >= 2 * setting.pp else [])
        if fixed:
            options = [(s, v) for s, v in options + [("gpipe", 1)] if s == fixed]
        return options

    def _cuts(self, base: PlanShape, estimator: Estimator):
        """The stage cuts to price: given ones, else the memory-aware DP cut and the even cut."""
        layers = self.view.num_layers
        stages = base.pp * base.virtual_stages
        recompute_fixed = self.fixed.recompute
        if self.fixed.pipeline.stage_layers is not None or isinstance(self.fixed.pipeline.stages, tuple):
            mesh = MeshSpec.of({"pp": base.pp, **dict(zip(base.axes, base.shape))})
            shape = self.view.shape_of(replace(self.fixed, mesh=mesh), self.cluster, self.options)
            base.stage_layers = shape.stage_layers
            yield from self._with_recompute(base, estimator, recompute_fixed)
            return
        cuts = [even_layer_ranges(layers, stages)] if stages > 1 else [[(0, layers - 1)]]
        if stages > 1 and base.virtual_stages == 1:
            dp_cut = partition_layers(estimator, base)
            if dp_cut is not None and dp_cut[0] not in cuts:
                cuts.insert(0, dp_cut[0])
        for ranges in cuts:
            shape = PlanShape(**{**base.__dict__, "stage_layers": list(ranges)})
            yield from self._with_recompute(shape, estimator, recompute_fixed)

    def _with_recompute(self, shape: PlanShape, estimator: Estimator, fixed):
        """No recomputation where the stage fits, full recomputation of its blocks where it does not."""
        if fixed is not None:
            shape.recompute = recomputed_segments(fixed, self.view.structure.prefix, self.view.num_layers)
            yield shape
            return
        plain = PlanShape(**{**shape.__dict__, "recompute": frozenset()})
        yield plain
        memory = estimator.memory(plain)
        crowded = {plain.rank_of_stage(k) for k in range(plain.num_stages)
                   if not estimator.fits({d: memory[d] for d in plain.stage_devices[plain.rank_of_stage(k)]})}
        if crowded:
            segs = set()
            for k in range(plain.num_stages):
                if plain.rank_of_stage(k) in crowded:
                    segs |= {j for j in plain.segments_of_stage(k, self.view.num_layers)
                             if 1 <= j <= self.view.num_layers}
            yield PlanShape(**{**shape.__dict__, "recompute": frozenset(segs)})

    # -- strategies --------------------------------------------------------------------------------
    def strategy_of(self, setting: _Setting, shape: PlanShape, solution: LayoutSolution) -> Strategy:
        """The strategy of a candidate (what ``compile`` runs)."""
        mesh = {}
        if setting.pp > 1:
            mesh[PIPELINE_AXIS] = setting.pp
        mesh[DATA_AXIS] = setting.dp // setting.ep
        if setting.ep > 1:
            mesh[EXPERT_AXIS] = setting.ep
        if setting.cp > 1:
            mesh[CONTEXT_AXIS] = setting.cp
        if setting.tp > 1:
            mesh["tp"] = setting.tp
        params, activations = _layout_strategy(solution, self.view) if setting.tp > 1 else ((), ())
        if setting.ep > 1:
            params = _with_experts_split(params, self.experts, self.view.structure.prefix)
        tensor_parallel = setting.tp > 1  # the switches mean something only with a tensor axis
        options = Options(sequence_parallel=setting.sequence_parallel if tensor_parallel else None,
                          vocab_parallel=setting.vocab_parallel if tensor_parallel else None,
                          solved_layouts=_solved_layouts(self.fixed.options.solved_layouts, tensor_parallel),
                          fsdp=shape.fsdp_axis, grad_bucket_bytes=self.fixed.options.grad_bucket_bytes,
                          cp_attention="ring" if setting.cp > 1 else None,
                          moe_overlap_chunks=setting.chunks if setting.chunks > 1 else self.fixed.options.moe_overlap_chunks,
                          regather_activations=setting.regather or None)
        pipeline = Pipeline(microbatches=shape.microbatches, skip_ratio=self.fixed.pipeline.skip_ratio)
        if setting.pp > 1:
            ranks = setting.dp * setting.cp * setting.tp
            default = [tuple(range(r * ranks, (r + 1) * ranks)) for r in range(setting.pp)]
            devices = tuple(tuple(d) for d in setting.devices)
            pipeline = replace(pipeline, stage_layers=tuple(tuple(r) for r in shape.stage_layers),
                               stage_devices=devices if list(devices) != default else None,
                               schedule=shape.schedule,
                               virtual_stages=shape.virtual_stages if shape.schedule == "interleaved" else None)
        return Strategy(MeshSpec.of(mesh), params, activations, options, pipeline,
                        _recompute_value(shape, self.view), self.fixed.precision)


def _setting_key(setting: _Setting) -> tuple:
    """What makes two settings different layout solves (their degrees and switches)."""
    return (setting.tp, setting.pp, setting.dp, setting.cp, setting.ep, setting.chunks, setting.sequence_parallel,
            setting.vocab_parallel)


def _with_rivals(ranked: list, top_k: int) -> list:
    """The ``top_k`` fastest quick-priced candidates, and where they all split sequences over cp, the fastest
    without cp and the fastest longer pipeline without it (the choice of cp is explained against them)."""
    chosen = list(ranked[:top_k])
    if chosen and all(r[2].cp > 1 for r in chosen):
        plain = [r for r in ranked if r[2].cp == 1]
        longer = [r for r in plain if r[2].pp > chosen[0][2].pp]
        chosen += [r for r in plain[:1] + longer[:1] if all(r is not c for c in chosen)]
    return chosen


def _solved_layouts(fixed: bool | None, tensor_parallel: bool) -> bool | None:
    """A plan with a tensor axis is compiled with the layouts the planner priced (unless the user said off)."""
    if not tensor_parallel:
        return None
    return True if fixed is None else fixed


def _switch(fixed, meaningful: bool) -> list[bool]:
    """The settings of a switch to try: the fixed one, else off and (where it means something) on."""
    if fixed is not None:
        return [bool(fixed)]
    return [False, True] if meaningful else [False]


def _recompute_value(shape: PlanShape, view: ModelView) -> bool | tuple[str, ...]:
    blocks = sorted(j - 1 for j in shape.recompute if 1 <= j <= view.num_layers)
    if not blocks:
        return False
    prefix = view.structure.prefix
    if len(blocks) == view.num_layers:
        return (f"{prefix}.*",)
    return tuple(f"{prefix}.{i}" for i in blocks)


def _layout_strategy(solution: LayoutSolution, view: ModelView) -> tuple[tuple[Layout, ...], tuple[Layout, ...]]:
    """Parameter layouts (globs over blocks) and the output layouts of matmul modules, on ``tp``."""
    prefix = view.structure.prefix
    params = {}
    for target, sbp in solution.param_sbp.items():
        if sbp[0] != B:
            params[block_param_name(target, prefix)] = Layout(block_param_name(target, prefix), (("tp", sbp[0]),))
    last_of_module = {}
    for unit in solution.problem.units:  # an activation layout applies to a module's last op
        module = unit.node.attrs.get("module", "")
        if module:
            last_of_module[module] = unit
    activations = {}
    for module, unit in last_of_module.items():
        if unit.node.op in MATMUL_OPS:
            glob = block_param_name(module, prefix) if unit.segment == "block" else module
            activations[glob] = Layout(glob, (("tp", solution.node_choice[unit.node.name][1][0][0]),))
    return tuple(params.values()), tuple(activations.values())


def _with_experts_split(params: tuple[Layout, ...], experts: ExpertBlocks, prefix: str) -> tuple[Layout, ...]:
    """The parameter layouts with every block's stacked expert weights split ``S(0)`` over ``ep`` (kept with a
    ``tp`` split the layouts give them)."""
    by_glob = {layout.glob: layout for layout in params}
    for tail in experts.param_tails:
        glob = f"{prefix}.*.{tail}"
        tp = dict(by_glob[glob].sbp) if glob in by_glob else {}
        by_glob[glob] = Layout(glob, ((EXPERT_AXIS, Split(0)), *tp.items()))
    return tuple(by_glob.values())


def _summary(setting: _Setting, shape: PlanShape) -> str:
    parts = [f"dp={setting.dp // setting.ep}", *([f"ep={setting.ep}"] if setting.ep > 1 else []),
             *([f"moe_overlap_chunks={setting.chunks}"] if setting.chunks > 1 else []),
             *([f"cp={setting.cp}"] if setting.cp > 1 else []), f"tp={setting.tp}", f"pp={setting.pp}",
             f"microbatches={shape.microbatches}"]
    if setting.tp > 1:
        parts.append(f"sequence_parallel={'on' if setting.sequence_parallel else 'off'}")
        parts.append(f"vocab_parallel={'on' if setting.vocab_parallel else 'off'}")
    if setting.regather:
        parts.append("regather_activations=on")
    if shape.fsdp_axis:
        parts.append("fsdp" if shape.fsdp_axis == DATA_AXIS else f"fsdp over {shape.fsdp_axis}")
    if setting.pp > 1:
        sched = shape.schedule + (f"(v={shape.virtual_stages})" if shape.virtual_stages > 1 else "")
        parts.append(f"schedule={sched}")
        parts.append("layers=" + "/".join(str(b - a + 1) for a, b in shape.stage_layers))
    parts.append(f"recompute={len([j for j in shape.recompute])} blocks" if shape.recompute else "recompute=none")
    return " ".join(parts)


def _distinct(candidates: list, limit: int) -> list:
    out, seen = [], set()
    for c in candidates:
        if c.summary not in seen:
            seen.add(c.summary)
            out.append(c)
        if len(out) == limit:
            break
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _allowed(mesh: MeshSpec | None, axis: str, size: int) -> bool:
    """Whether a fixed mesh admits ``size`` on ``axis`` (an axis it does not name has size 1)."""
    if mesh is None:
        return True
    value = mesh.size(axis)
    return value == AUTO or int(value) == size


def _device_order(cluster: Cluster) -> list[int]:
    """Devices grouped by RDMA domain (InfiniBand/RoCE-connected nodes together), nodes kept whole."""
    return [d for group in cluster.domains("roce") for d in group]


# --------------------------------------------------------------------------------------------------
# Inter-op: cutting layers into stages
# --------------------------------------------------------------------------------------------------


def partition_layers(estimator: Estimator, shape: PlanShape) -> tuple[list, float] | None:
    """The contiguous cut of the blocks into ``shape.pp`` stages minimising the slowest stage.

    :func:`cost.partition.min_max_partition` over, per stage ``k``, ``T_k(j..l)``: the forward + backward
    time of blocks ``j..l`` on stage ``k``'s devices (the prologue on stage 0, the epilogue on the last),
    ``inf`` where those blocks do not fit the stage's memory even with recomputation (then
    recomputation's forward is added to the time). Returns (ranges, bottleneck seconds) or None when
    no cut fits.
    """
    if shape.pp > estimator.profile.num_layers:
        return None
    return min_max_partition([_stage_table(estimator, shape, k) for k in range(shape.pp)])


def _stage_table(estimator: Estimator, shape: PlanShape, k: int) -> np.ndarray:
    """``T[j, l]``: seconds per microbatch of blocks j..l on stage k (inf where they cannot fit)."""
    prof = estimator.profile
    layers = prof.num_layers
    rank = shape.rank_of_stage(k)
    batch = estimator.microbatch_size(shape)
    distinct: dict[int, tuple] = {}
    work = []
    for j in range(layers + 2):  # blocks share one segment cost: price each distinct one once
        segment = prof.segments[j]
        if id(segment) not in distinct:
            distinct[id(segment)] = estimator.segment_work(shape, rank, j)
        work.append(distinct[id(segment)])
    edges = ([0] if k == 0 else []) + ([layers + 1] if k == shape.num_stages - 1 else [])
    sums = [estimator.param_sums(segment) for segment in prof.segments]
    edge_time = sum(sum(work[j]) for j in edges)
    edge_params = sum(sums[j].elements for j in edges)
    edge_saved = sum(prof.segments[j].kept_bytes(batch) for j in edges)
    blocks = range(1, layers + 1)

    def prefix(values) -> np.ndarray:
        """Prefix sums with a leading zero: blocks j..l sum to prefix[l + 1] - prefix[j]."""
        return np.concatenate([[0.0], np.cumsum(list(values))])

    total = prefix(sum(work[j]) for j in blocks)
    forward = prefix(work[j][0] + work[j][1] for j in blocks)
    params = prefix(sums[j].elements for j in blocks)
    trainable = prefix(sums[j].trainable for j in blocks)
    edge_trainable = sum(sums[j].trainable for j in edges)
    saved = prefix(prof.segments[j].kept_bytes(batch) for j in blocks)
    rematerialised = max((at(prof.segments[j].saved_bytes, batch) for j in blocks), default=0.0)
    inputs = prefix(at(prof.segments[j - 1].output_bytes, batch) for j in blocks)
    fsdp = estimator.fsdp_analytic(shape)
    if fsdp:  # the gathered parameters are kept for backward, as the compiled program does
        extra = prefix(sums[j].nbytes for j in blocks)
        saved = saved + extra
    in_flight = in_flight_microbatches(shape.schedule, shape.pp, k, shape.microbatches)
    devices = shape.stage_devices[rank]
    limit = min(estimator.cluster.device(d).memory_bytes for d in devices) * estimator.options.memory_headroom
    shards = estimator.fsdp_shards(shape)
    first = np.arange(layers)[:, None]
    last = np.arange(layers)[None, :]
    elements = (params[last + 1] - params[first] + edge_params) / shards
    trained = (trainable[last + 1] - trainable[first] + edge_trainable) / shards
    stored = estimator.param_element_bytes  # frozen parameters: stored, without gradient or optimizer state
    state = elements * stored + trained * (_bytes_per_param(estimator, shape) - stored)
    plain_memory = state + in_flight * (saved[last + 1] - saved[first] + edge_saved)
    rc_memory = state + in_flight * (inputs[last + 1] - inputs[first] + edge_saved) + rematerialised
    seconds = total[last + 1] - total[first] + edge_time
    out = np.where(plain_memory <= limit, seconds,
                   np.where(rc_memory <= limit, seconds + forward[last + 1] - forward[first], math.inf))
    return np.where(last >= first, out, math.inf)


def _bytes_per_param(estimator: Estimator, shape: PlanShape) -> float:
    """Bytes of parameter, gradient, optimizer state (and master copy) per parameter element (the state's share
    where a distributed optimizer splits it)."""
    return float(estimator.training_memory(shape, 1.0, 0.0, estimator.param_element_bytes).total)
