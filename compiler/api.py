"""``compile()``: capture a model, apply a strategy through the passes, and hand back a plan."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import torch

from backends import torch_distributed
from backends.virtual import VirtualResult, run_virtual
from compiler.context_choice import choose_cp_attention, only_cp_attention_open
from cost.estimate import PlanOptions
from frontend.torch_capture import Captured, capture
from cluster import Cluster
from ir.core import Graph
from ir.sbp import Split
from passes import (boxing, context_parallel, decompose, experts, grad_sync, layouts, pipeline, precision,  # noqa: F401
                    propagate, recompute, regather)  # (register passes)
from passes.manager import PassContext, as_calls, run_passes
from strategy import Strategy

DEFAULT_PASSES = ["decompose", "layouts", "propagate", "boxing", "grad_sync"]
PIPELINE_PASSES = ["pipeline", "schedule"]
OPTIMIZERS = ("SGD", "AdamW", "Adam")


@dataclass
class CompiledPlan:
    """The result of :func:`compile`: the SBP-annotated IR and ways to run it."""

    graph: Graph
    weights: dict[str, torch.Tensor]
    strategy: Strategy
    """The strategy the passes applied (normalised for the cluster)."""
    cluster: Cluster
    mode: str
    optimizer: tuple
    aliases: dict = field(default_factory=dict)
    passes: list = field(default_factory=list)
    input_ranges: dict = field(default_factory=dict)
    example_dims: dict = field(default_factory=dict)
    search_report: Any = None
    """What the planner considered, when the strategy had ``"auto"`` parts."""

    def to_dsl(self) -> str:
        """The plan as DSL text; compiling that text again gives the same IR."""
        from frontend.dsl import format_plan
        return format_plan(self.strategy)

    def simulate(self, **options):
        """Estimated step time, throughput, MFU, memory and traffic on the plan's cluster."""
        from compiler.simulate import simulate
        return simulate(self, **options)

    def explain(self) -> str:
        """Why this plan: the chosen layouts and degrees, how much work runs split, and the best
        alternatives considered."""
        from compiler.explain import explain
        return explain(self)

    def parallelism(self):
        """Per mesh axis, the share of forward FLOPs on split data and the ops that run replicated
        (a :class:`~compiler.parallelism.ParallelismReport`)."""
        from compiler.parallelism import parallelism_report
        return parallelism_report(self.graph)

    @property
    def ir(self) -> str:
        """The SBP-annotated IR as text (parseable with ``ir.parse``)."""
        return str(self.graph)

    def run_virtual(self, *inputs: torch.Tensor, mode: str | None = None,
                    stages: list[int] | None = None, loss_scale: torch.Tensor | None = None) -> VirtualResult:
        """Simulate every rank in this process: loss and full gradients (train) or outputs (infer).

        ``stages`` (pipelined plans, ``mode="infer"``): run every microbatch through those stages only.
        ``loss_scale`` (fp16 plans): backward from the loss times it; the gradients come back scaled.
        """
        return run_virtual(self.graph, self.weights, tuple(inputs), mode or self.mode, stages=stages,
                           loss_scale=loss_scale)

    def emit(self, out_dir: str | os.PathLike) -> Path:
        """Write a standalone torchrun program into ``out_dir``: ``main.py`` (the plan's own code) and the
        ``runtime.py`` it imports from, ``weights.pt``, and ``launch.sh`` with its single-node and multi-node
        torchrun command lines. Returns the path of ``main.py``."""
        plan = "".join(f"    {line}\n" for line in self.to_dsl().splitlines())
        header = (f"Plan:\n{plan}Passes: {', '.join(self.passes)}\n"
                  f"Optimizer: torch.optim.{self.optimizer[0]}({self.optimizer[1]})")
        return torch_distributed.emit(self.graph, self.weights, out_dir, optimizer=self.optimizer,
                                      input_ranges=self.input_ranges, example_dims=self.example_dims,
                                      aliases=self.aliases, header=header, plan_text=self.to_dsl(),
                                      node_devices=tuple(node.num_devices for node in self.cluster.nodes))

    def parameter_memory(self) -> dict[int, int]:
        """Bytes of parameters each device stores at rest (its shards), by device id."""
        out: dict[int, int] = {}
        for p in self.graph.params:
            if p.kind != "param":
                continue
            mesh = self.graph.meshes[p.mesh]
            local = int(p.type.nbytes())
            for s, n in zip(p.sbp, mesh.shape):
                local //= n if isinstance(s, Split) else 1
            for d in mesh.devices:
                out[d] = out.get(d, 0) + local
        return out

    def total_parameter_bytes(self) -> int:
        """Bytes of all (unsharded) parameters."""
        sizes = {p.target: int(p.type.nbytes()) for p in self.graph.params if p.kind == "param"}
        return sum(sizes.values())  # a tied weight copied onto two pipeline stages counts once


def compile(model: Any, example_inputs: tuple = (), example_kwargs: dict | None = None, *,
            cluster: Cluster | str | None = None, strategy: Any = "dp", optimizer: Any = None,
            loss_fn: Callable | None = None, mode: str = "train", capture_method: str = "auto",
            dump_after: str | list | None = None, dump_to: TextIO | None = None,
            search_options: dict | None = None, passes: str | list | None = None,
            decompose_custom_ops: bool | Iterable[str] = True) -> CompiledPlan:
    """Compile ``model`` for ``cluster`` with ``strategy``.

    ``model``: an ``nn.Module`` (called as ``model(*example_inputs, **example_kwargs)``; in ``train``
    mode its output is the loss, has ``.loss`` / ``["loss"]``, or ``loss_fn(output)`` gives it).
    ``strategy``: ``"dp"``, ``"fsdp"``, ``"auto"``, a dict or plan text (see ``docs/``); ``"auto"``
    parts are searched by the planner, with ``search_options`` (precision, global_batch,
    optimizer, time_budget_s, progress, cache_dir, ...; see ``passes.planner.search``).
    ``optimizer``: ``(torch.optim.SGD, {"lr": 0.1})`` for emitted programs. ``dump_after``: pass name(s), or ``"all"``, whose IR to print.
    ``decompose_custom_ops``: custom ops (``torch.library`` ops outside ATen) that have a decomposition
    are captured as the ops they decompose into, which keep the plan's parallelism (True, the default);
    False keeps every custom op as one op, run replicated; a collection of op names decomposes those.
    ``passes``: the pass pipeline, as text (``"decompose,layouts,propagate,boxing,grad_sync{bucket_bytes=1048576}"``)
    or a list of pass texts; by default the one the strategy needs (:func:`passes_for`).
    """
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', found {mode!r}")
    cluster = _cluster(cluster)
    train = mode == "train"
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    captured = capture_model(model, example_inputs, example_kwargs, loss_fn=loss_fn, train=train,
                             method=capture_method, decompose_custom_ops=decompose_custom_ops)
    flat_inputs = example_inputs + tuple((example_kwargs or {}).values())
    graph = captured.graph
    example_dims = _example_dims(graph, flat_inputs)
    graph.attrs["example_dims"] = example_dims
    graph.attrs["aliases"] = dict(captured.aliases)
    strategy = resolve_strategy(strategy, model if isinstance(model, torch.nn.Module) else None, graph,
                                cluster.world_size)
    report = None
    if only_cp_attention_open(strategy):
        strategy, report = choose_cp_attention(graph, cluster, strategy, train=train, passes_for=passes_for,
                                               **(search_options or {}))
    elif strategy.wants_search:
        strategy, report = search_strategy(graph, cluster, strategy, train=train, **(search_options or {}))
    ctx = PassContext(strategy=strategy, world_size=cluster.world_size, train=train, cluster=cluster)
    if strategy_was_searched(report):  # lay the tensor axis out as the planner priced it
        ctx.options[propagate.PLAN_OPTIONS] = PlanOptions(**report.options)
    names = [str(call) for call in as_calls(passes if passes is not None else passes_for(ctx.strategy))]
    run_passes(graph, names, ctx, dump_after=dump_after, dump_to=dump_to)
    check_example_inputs(graph, flat_inputs)
    plan = CompiledPlan(graph, captured.weights, ctx.strategy, cluster, mode, _optimizer(optimizer),
                        dict(captured.aliases), names, _input_ranges(graph, flat_inputs), example_dims)
    plan.search_report = report
    return plan


def check_example_inputs(graph: Graph, inputs: tuple) -> None:
    """The example batch must split evenly over the ranks that share it (one clear error if not)."""
    from backends.virtual import bind_dims
    bind_dims(graph, inputs)


def passes_for(strategy: Strategy) -> list[str]:
    """The pass pipeline for a strategy: the casts of its precision first when it names one, attention on
    sequence shards when it has a cp axis, pipeline cutting and scheduling when it has stages; then the
    recomputed regions and the gathers kept as shards (no-ops unless the strategy asks)."""
    passes = (["precision"] if strategy.precision is not None else []) + list(DEFAULT_PASSES)
    passes.insert(passes.index("layouts") + 1, "experts")  # a no-op without experts split over an axis
    if strategy.context_parallel > 1:
        passes.insert(passes.index("layouts") + 1, "context_parallel")
    if strategy.is_pipelined:
        passes += PIPELINE_PASSES
    return passes + ["recompute", "regather"]


def strategy_was_searched(report: Any) -> bool:
    """Whether ``report`` is the planner's (a :class:`~passes.planner.SearchReport`, with its pricing options)."""
    from passes.planner import SearchReport
    return isinstance(report, SearchReport) and bool(report.options)


def search_strategy(graph: Graph, cluster: Cluster, strategy: Strategy, *, train: bool, **options):
    """Fill the ``"auto"`` parts of a strategy with the planner (see ``passes/planner``)."""
    from passes.planner import search
    return search(graph, cluster, strategy, train=train, **options)


def resolve_strategy(strategy: Any, model: torch.nn.Module | None, graph: Graph, world_size: int) -> Strategy:
    """A strategy from a dict, a shorthand, DSL text or a ``*.sbp`` file, merged with the model's annotations."""
    from compiler.plans import resolve
    return resolve(strategy, model, graph, world_size=world_size)


def capture_model(model: Any, args: tuple, kwargs: dict | None, *, loss_fn, train: bool, method: str,
                  decompose_custom_ops: bool | Iterable[str] = True) -> Captured:
    """Capture a PyTorch module, or an ONNX model (path or ModelProto) through the ONNX frontend."""
    if isinstance(model, (str, os.PathLike)) or type(model).__name__ == "ModelProto":
        from frontend.onnx import onnx_to_torch
        model = onnx_to_torch(model)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected an nn.Module, an ONNX file path or an onnx.ModelProto, found "
                        f"{type(model).__name__}")
    return capture(model, args, kwargs, loss_fn=loss_fn, train=train, method=method,
                   decompose_custom_ops=decompose_custom_ops)


def _cluster(cluster) -> Cluster:
    if cluster is None:
        return Cluster.local(1)
    if isinstance(cluster, str):
        return Cluster.load(cluster)
    return cluster


def _optimizer(spec) -> tuple:
    if spec is None:
        return ("SGD", {"lr": 0.1})
    cls, kwargs = spec if isinstance(spec, tuple) else (spec, {})
    name = cls if isinstance(cls, str) else cls.__name__
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name} is not supported in emitted programs; use one of {', '.join(OPTIMIZERS)}")
    return name, dict(kwargs)


def _example_dims(graph: Graph, inputs: tuple) -> dict:
    dims = {}
    for v, t in zip(graph.inputs, inputs):
        for d, size in zip(v.type.shape, t.shape):
            if d.is_Symbol:
                dims[str(d)] = int(size)
    return dims


def _input_ranges(graph: Graph, inputs: tuple) -> dict:
    """For integer inputs, one more than the largest example value (synthetic batches stay in range)."""
    out = {}
    for v, t in zip(graph.inputs, inputs):
        if not t.is_floating_point() and not t.is_complex() and t.numel() and t.device.type != "meta":
            out[v.name] = int(t.to(torch.float64).max()) + 1  # unsigned ints have no max kernel
    return out
