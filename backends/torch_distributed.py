"""Code generation: a standalone, readable torch.distributed program for a plan.

``emit(graph, weights, out_dir, ...)`` writes into ``out_dir`` the program — ``main.py`` and ``runtime.py``,
which runs under ``torchrun`` on gloo or nccl and imports nothing of sbpc — with ``weights.pt`` (the
initial full state_dict) and ``launch.sh``. ``main.py`` is what is particular to the plan: a header saying
which plan produced it, the names it imports from ``runtime.py``, and ``forward`` (or one function per
pipeline stage): one line per IR node, as the rank with coordinates ``coord`` computes it, each value named
after the module that computes it; then its entry line. ``runtime.py`` holds the plan's tables (mesh,
inputs, layouts, buckets, schedule) and the runtime definitions and local kernels that code reaches
(selected from :mod:`backends.runtime` and :mod:`ir.kernels`, see there).
"""
from __future__ import annotations

import ast
import builtins
import functools
import keyword
import math
import re
from dataclasses import dataclass
from pathlib import Path

import sympy
import torch

from backends import runtime
from backends.runtime import Import, global_reads
from cost.segments import regathers
from ir.core import Graph, Node, Value
from ir.ops import custom as custom_ops
from ir.recompute import RECOMPUTE_ATTR, recompute_regions
from ir.ops.pipeline_ops import (is_pipelined, microbatch_paths, pipeline_stages, schedule_actions,
                                 stage_index, tied_groups)
from ir.ops.attention import RING_ATTENTION, runs_ring
from ir.ops.comm import REGATHER_KWARG
from ir.ops.moe import DISPATCH, EXCHANGING, OverlappedLayer, exchanges, overlapped_layers
from ir.ops.registry import LocalContext, balanced_comm_kwargs, local_call, local_shape, sequence_sizes
from ir.precision import cast_parameter, narrowing_cast, scales_loss
from ir.sbp import format_nd_sbp
from ir.types import DTYPES_BY_NAME

COMM_FUNCS = {"comm.all_reduce": "comm_all_reduce", "comm.all_gather": "comm_all_gather",
              "comm.reduce_scatter": "comm_reduce_scatter", "comm.all_to_all": "comm_all_to_all",
              "comm.slice": "comm_slice", "comm.mask": "comm_mask"}
GENERATED_IMPORTS = {"math": Import("math", None, "math"),
                     "checkpoint": Import("torch.utils.checkpoint", "checkpoint", "checkpoint")}
"""Modules the generated lines use themselves (``math.inf``, recomputed regions' ``checkpoint``)."""
FUNCTION_ARGS = ("p", "b", "x", "dims", "coord", "entries", "whole")
"""The arguments of the generated functions (parameters, buffers, inputs, sizes, coordinates, ...)."""
WIDTH = 110
RUNTIME_MODULE = "runtime"
"""The program's runtime module, beside ``main.py`` (``runtime.py``)."""
CHECKPOINT_USAGE = ("Checkpoints: add --checkpoint-every 100 --resume (sharded, into --checkpoint-dir; --resume goes on from\n"
                    "the newest whole one, written under this plan or any other plan of the model). Elastic restarts:\n"
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts 3 ... main.py ... --resume\n")
"""How a program's docstring says to checkpoint, resume and restart it (the variable: pytorch/pytorch#167288)."""
BACKEND_NOTE = ("It uses nccl when CUDA is available, else gloo (SBPC_FORCE_GLOO=1 forces gloo). Its runtime is\n"
                f"{RUNTIME_MODULE}.py beside it: keep the two files together.\n")
"""The last lines of a program's docstring: its backend, and the file it imports from."""


class EmitError(RuntimeError):
    """The plan cannot be written as a program (named reason)."""


@dataclass(frozen=True)
class Program:
    """The text of a generated program's two files."""

    main: str
    """``main.py``: the plan's own code and its entry line."""
    runtime: str
    """``runtime.py``: the plan's tables and the runtime definitions ``main.py`` reaches."""


def emit(graph: Graph, weights: dict, out_dir: str | Path, *, optimizer: tuple, input_ranges: dict,
         example_dims: dict, aliases: dict, header: str = "", plan_text: str = "",
         node_devices: tuple[int, ...] = ()) -> Path:
    """Write ``main.py``, ``runtime.py``, ``weights.pt`` and ``launch.sh`` into ``out_dir``; returns the path of
    ``main.py``.
    ``header``: what the program's docstring says produced it (the plan as DSL text, the passes, ...);
    ``plan_text``: the plan as DSL text, which the program records in its checkpoints; ``node_devices``: the
    devices of each node of the cluster the plan was made for (one node of all ranks when empty)."""
    missing = [p.target for p in graph.params if p.target not in weights or weights[p.target].is_meta]
    if missing:
        raise EmitError(f"the plan has no weights for {len(missing)} tensors (e.g. {missing[0]}): it was "
                        f"compiled from a model on the meta device; load real weights and compile again to emit")
    if graph.loss is None:
        raise EmitError("emit writes training programs; compile with mode='train' (a model that returns its loss)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({p.target: weights[p.target].detach().cpu().contiguous() for p in graph.params}, out / "weights.pt")
    writer = PipelineProgramWriter if is_pipelined(graph) else ProgramWriter
    program = writer(graph, optimizer, input_ranges, example_dims, aliases, header, plan_text).write()
    (out / f"{RUNTIME_MODULE}.py").write_text(program.runtime)
    path = out / "main.py"
    path.write_text(program.main)
    launch = out / "launch.sh"
    launch.write_text(launch_script(world_size(graph), node_devices))
    launch.chmod(0o755)
    return path


def world_size(graph: Graph) -> int:
    """How many ranks the program runs on: every device of its meshes."""
    return len({d for mesh in graph.meshes.values() for d in mesh.devices})


def launch_script(world: int, node_devices: tuple[int, ...]) -> str:
    """``launch.sh``: torchrun on one node (``--standalone``), or on NNODES nodes through a c10d rendezvous.
    Processes per node default to the cluster's devices per node (all ranks on one node otherwise)."""
    nodes = len(node_devices) if node_devices and len(set(node_devices)) == 1 else 1
    return f"""#!/usr/bin/env bash
# Launch main.py (with runtime.py beside it) under torchrun ({world} ranks). Arguments are passed to main.py
# (see: main.py --help).
#
# One node:        ./launch.sh --steps 100
# {nodes if nodes > 1 else 2} nodes, on each:  NNODES={nodes if nodes > 1 else 2} RDZV_ENDPOINT=host0:29400 ./launch.sh --steps 100
#
# Each node runs NPROC_PER_NODE ranks ({world} / NNODES by default); ranks of a node are numbered consecutively,
# so the innermost mesh axis stays inside a node. MAX_RESTARTS>0 restarts every rank when one fails (pass
# --checkpoint-every and --resume). TORCHRUN overrides the launcher (e.g. "python -m torch.distributed.run").
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
NNODES="${{NNODES:-1}}"
NPROC_PER_NODE="${{NPROC_PER_NODE:-$(( {world} / NNODES ))}}"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${{TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}}"  # pytorch/pytorch#167288
if [ "$NNODES" = 1 ]; then
    exec ${{TORCHRUN:-torchrun}} --standalone --nproc-per-node "$NPROC_PER_NODE" \\
        --max-restarts "${{MAX_RESTARTS:-0}}" "$HERE/main.py" "$@"
fi
exec ${{TORCHRUN:-torchrun}} --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \\
    --rdzv-backend c10d --rdzv-endpoint "${{RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of one node}}" \\
    --rdzv-id "${{RDZV_ID:-sbpc}}" --max-restarts "${{MAX_RESTARTS:-0}}" "$HERE/main.py" "$@"
"""


class FreshNames:
    """Distinct Python identifiers: ``base``, then ``base_1``, ``base_2``, ...; never one of ``reserved``
    (runtime names, dims, the functions' arguments, builtins, keywords)."""

    def __init__(self, reserved: set[str]):
        self.taken = set(reserved)

    def __call__(self, base: str) -> str:
        name, count = base, 0
        while name in self.taken:
            count += 1
            name = f"{base}_{count}"
        self.taken.add(name)
        return name


class ProgramWriter:
    """Builds the text of one generated program."""

    entry = "training"
    """The runtime piece holding the program's training loop (``main``)."""

    def __init__(self, graph: Graph, optimizer: tuple, input_ranges: dict, example_dims: dict, aliases: dict,
                 header: str, plan_text: str = ""):
        self.graph = graph
        self.plan_text = plan_text
        self.optimizer = optimizer
        self.input_ranges = input_ranges
        self.example_dims = example_dims
        self.aliases = aliases
        self.header = header
        self.sequences = sequence_sizes(graph)
        """The sequence lengths whose splits over the cp axis are load-balanced (collectives reorder them)."""
        self.source: dict[int, str] = {}
        """Value id -> the expression that reads it in the generated code (a local name, ``p[...]``, ...)."""
        self.local: set[int] = set()
        """Ids of the values held in local variables of the generated functions."""
        meshes = graph.meshes
        if len(meshes) != 1 and not is_pipelined(graph):
            raise EmitError(f"this code generator handles one mesh (or one per pipeline stage); the plan has "
                            f"{list(meshes)}")
        self.mesh = next(iter(meshes.values()))
        self.dim_names = sorted({str(s) for v in graph.inputs for d in v.type.shape for s in d.free_symbols})
        self.fresh = FreshNames(self._reserved_names())
        self.custom_ops = {op: self.fresh(_identifier(op.rsplit(".", 1)[0]))
                           for op in dict.fromkeys(n.op for n in graph.nodes if custom_ops.is_custom(n.op))}
        """Custom op name -> the program's variable bound to it (see :meth:`_custom_op_bindings`)."""
        self.overlapped = overlapped_layers(graph)
        """MoE layers run in chunks (``moe_overlap_chunks``), by the ids of their nodes."""

    # -- the whole program ------------------------------------------------------------------------

    def write(self) -> Program:
        """The program. ``main.py``: its docstring, its imports (the runtime names it reads, by name), its own
        code and entry line. ``runtime.py``: its docstring, imports, the plan's constants that the runtime reads,
        then that runtime (see ``backends.runtime``)."""
        code = self._custom_op_bindings() + self._code() + "\n\n" + f'if __name__ == "__main__":\n    {self._entry_call()}\n'
        reads = global_reads(code)[1]
        constants = self._constants()
        wanted = runtime.select(reads, self.entry, GENERATED_IMPORTS).plan_names
        if wanted - set(constants):
            raise EmitError(f"internal: the runtime reads {sorted(wanted - set(constants))}, which the code "
                            f"generator does not write")
        constants_source = "\n".join(text for name, text in constants.items() if name in wanted)
        selection = runtime.select(reads, self.entry, GENERATED_IMPORTS, global_reads(constants_source)[1])
        main = [self._docstring(), _main_imports(selection),
                _section(self._code_title(), "one line per IR node") + "\n" + code]
        parts = [self._runtime_docstring(), "\n".join(selection.imports),
                 _section("The plan", "its mesh, inputs, tensors and their layouts") + "\n" + constants_source]
        parts += [_section(title, where) + "\n" + text for title, where, text in selection.sections]
        return Program(_join_parts(main), _join_parts(parts))

    def _runtime_docstring(self) -> str:
        return _docstring(f"The runtime of main.py beside it ({self.graph.name}), generated by sbpc: the plan's "
                          f"tables, then the\ndefinitions of sbpc's emitted runtime that this plan reaches, each "
                          f"section named after the module\nit comes from. It imports nothing of sbpc.\n")

    def _custom_op_bindings(self) -> str:
        """One line per custom op the plan calls: the op, loaded by importing the Python module that registers
        it (the program's one dependency beyond torch; ``load_custom_op`` fails with one line if it is missing)."""
        lines = []
        for op, name in self.custom_ops.items():
            module = custom_ops.defining_module(op)
            if module is None:
                raise EmitError(f"the plan calls the custom op {op}, but no importable Python module registers it "
                                f"(it was defined in the script run as __main__, or by a C++ extension loaded by "
                                f"other means): define it in a module that the program can import")
            lines.append(f"{name} = load_custom_op({op!r}, {module!r})")
        return "\n".join(lines) + "\n\n\n" if lines else ""

    def _docstring(self) -> str:
        g = self.graph
        return _docstring(f"Distributed training program for {g.name}, generated by sbpc.\n\n{self.header}\n"
                          f"Mesh: {dict(zip(self.mesh.axes, self.mesh.shape))} ({self.mesh.size} ranks).\n"
                          f"Run:  torchrun --standalone --nproc-per-node {self.mesh.size} main.py --steps 5 "
                          f"--metrics losses.jsonl --save final.pt\n{CHECKPOINT_USAGE}"
                          f"{BACKEND_NOTE}")

    def _code_title(self) -> str:
        return "The forward pass"

    def _entry_call(self) -> str:
        """``main(...)`` with the gradient collectives the plan runs outside autograd (and what else the
        plan's runtime takes: :meth:`_entry_arguments`)."""
        syncs = self._gradient_syncs()
        args = ([self._entry_functions()] + ([f"gradient_syncs=[{', '.join(syncs)}]"] if syncs else [])
                + self._entry_arguments() + ["description=__doc__"])
        return f"main({', '.join(args)})"

    def _entry_functions(self) -> str:
        """What ``main`` calls to run the plan: ``forward`` (a pipeline: its stage functions)."""
        return "forward"

    def _entry_arguments(self) -> list[str]:
        """Further keyword arguments of ``main``: fp16 plans' loss scaler (pipelines add the step type of
        split backwards)."""
        return ["loss_scaler=DynamicLossScaler"] if scales_loss(self.graph.attrs.get("precision")) else []

    def _gradient_syncs(self) -> list[str]:
        return ["OverlappedGradientSync"] if self.graph.attrs.get("grad_buckets") else []

    def _reserved_names(self) -> set[str]:
        """Names a value may not take: every runtime name, the plan's, the functions' arguments and locals."""
        names = {name for piece in runtime.pieces().values()
                 for name in [*piece.definitions, *piece.internal, *piece.external]} | runtime.plan_names()
        names |= set(GENERATED_IMPORTS) | set(FUNCTION_ARGS) | set(dir(builtins)) | set(keyword.kwlist)
        names |= set(self.dim_names) | {f"coord_{a}" for a in self.mesh.axes}
        names |= {_recompute_function(node.attrs[RECOMPUTE_ATTR]) for node in self.graph.nodes
                  if RECOMPUTE_ATTR in node.attrs}
        return names

    # -- the plan's constants ---------------------------------------------------------------------

    def _constants(self) -> dict[str, str]:
        """Every constant this program may define, by name (``write`` keeps those its runtime reads)."""
        g = self.graph
        params = {p.target: [str(s) for s in p.sbp] for p in g.params if p.kind == "param"}
        buffers = {p.target: [str(s) for s in p.sbp] for p in g.params if p.kind == "buffer"}
        return {**self._mesh_and_inputs([list(self.mesh.devices)]),
                "PARAMS": _dict("PARAMS", params, "layout per mesh axis"),
                "BUFFERS": _dict("BUFFERS", buffers, "layout per mesh axis"),
                **self._frozen_and_unsaved(lambda p: p.target),
                **self._training(lambda p: p.target)}

    def _mesh_and_inputs(self, mesh_devices: list, note: str = "") -> dict[str, str]:
        """The mesh, its device lists, the inputs."""
        inputs = "\n".join(f"    {_py(i)}," for i in self._input_specs())
        text = "".join(f"    {line + chr(10)!r}\n" for line in self.plan_text.splitlines())
        return {"PLAN_TEXT": f"PLAN_TEXT = (  # the plan as DSL text, recorded in checkpoints\n{text})"
                             if text else 'PLAN_TEXT = ""',
                "MESH_AXES": f"MESH_AXES = {tuple(self.mesh.axes)!r}",
                "MESH_SHAPE": f"MESH_SHAPE = {tuple(self.mesh.shape)!r}",
                "MESH_DEVICES": f"MESH_DEVICES = {mesh_devices!r}{note}",
                "INPUTS": "# name, dims, dtype, layout per mesh axis, exclusive upper bound of synthetic integer "
                          f"values\nINPUTS = [\n{inputs}\n]"}

    def _frozen_and_unsaved(self, key) -> dict[str, str]:
        """Parameters (by ``key(value)``) the model froze; buffers outside its state_dict."""
        frozen = [key(p) for p in self.graph.params if p.kind == "param" and not p.requires_grad]
        unsaved = sorted({p.target for p in self.graph.params if p.kind == "buffer" and not p.persistent})
        return {"FROZEN_PARAMS": f"FROZEN_PARAMS = {frozen!r}  # requires_grad=False in the model: never updated",
                "NOT_SAVED": f"NOT_SAVED = {unsaved!r}  # non-persistent buffers and lifted constants: "
                             f"not in the state_dict"}

    def _training(self, key) -> dict[str, str]:
        """Aliases, gradient buckets (parameters by ``key(value)``), the loss layout, the optimizer, example dims."""
        buckets = "".join(f"    ({tuple(b['axes'])!r}, [\n{_wrapped([repr(key(p)) for p in b['params']], 8)}]),\n"
                          for b in self.graph.attrs.get("grad_buckets", []))
        reduce = {b.get("reduce_dtype") for b in self.graph.attrs.get("grad_buckets", [])} - {None}
        reduce_dtype = f"torch.{DTYPES_BY_NAME[reduce.pop()]}".replace("torch.torch.", "torch.") if reduce else None
        return {"ALIASES": f"ALIASES = {self.aliases!r}",
                "GRAD_BUCKETS": f"GRAD_BUCKETS = [  # mesh axes, parameters\n{buckets}]",
                "GRAD_REDUCE_DTYPE": f"GRAD_REDUCE_DTYPE = {reduce_dtype}  # gradients are summed in this dtype "
                                     "(the plan's precision)",
                "LOSS_SBP": f"LOSS_SBP = {[str(s) for s in self.graph.loss.sbp]!r}",
                "OPTIMIZER": f"OPTIMIZER = ({self.optimizer[0]!r}, {self.optimizer[1]!r})",
                "EXAMPLE_DIMS": f"EXAMPLE_DIMS = {self.example_dims!r}"}

    def _input_specs(self) -> list[tuple]:
        specs = []
        for v in self.graph.inputs:
            dims = [str(d) if not d.is_Integer else int(d) for d in v.type.shape]
            specs.append((v.name, dims, v.type.torch_dtype, [str(s) for s in v.sbp],
                          int(self.input_ranges.get(v.name, 2))))
        return specs

    # -- the generated functions ------------------------------------------------------------------

    def _code(self) -> str:
        g = self.graph
        self._bind_leaves(lambda p: p.target)
        updates = g.buffer_updates
        body = self._body(g.nodes, [g.loss, *updates.values()])
        body.append(f"    return {self.source[id(g.loss)]}, {self._updates_dict(updates, 'target')}")
        doc = ("One rank's forward pass: p parameters and b buffers (local shards), x inputs (local),\n"
               "dims the symbolic sizes of this batch, coord this rank's mesh coordinates. Returns the loss\n"
               "and the buffers' new values, which replace them after the step.")
        return self._function("forward(p, b, x, dims, coord)", doc, body)

    def _bind_leaves(self, key) -> None:
        """Inputs read as ``x[name]``, parameters and buffers as ``p[key]`` / ``b[key]``."""
        for v in self.graph.inputs:
            self.source[id(v)] = f"x[{v.name!r}]"
        for p in self.graph.params:
            self.source[id(p)] = f"{'p' if p.kind == 'param' else 'b'}[{key(p)!r}]"

    def _function(self, signature: str, doc: str, body: list[str]) -> str:
        """A generated function: the dims and coordinates its body reads, then the body. One that gathers
        sharded parameters saves them as shards for backward (``regathering_params``); one that only gathers
        activations to gather them again in backward, those (``regathering``)."""
        read = _names_read(body)
        preamble = [f"    {d} = dims[{d!r}]" for d in self.dim_names if d in read]
        preamble += [f"    coord_{a} = coord[{a!r}]" for a in self.mesh.axes if f"coord_{a}" in read]
        decorator = ("@regathering_params\n" if "comm_gather_param" in read
                     else "@regathering\n" if "comm_gather_activation" in read else "")
        doc = "\n".join(("    " + line) if line else line for line in f'"""{doc}"""'.splitlines())
        return f"{decorator}def {signature}:\n{doc}\n" + "\n".join(preamble + body) + "\n"

    def _updates_dict(self, updates: dict, key: str) -> str:
        """Source of the dict of new buffer values, keyed by the buffers' ``target`` or IR ``name``."""
        return "{" + ", ".join(f"{getattr(b, key)!r}: {self.source[id(v)]}" for b, v in updates.items()) + "}"

    def _body(self, nodes: list, returned: list) -> list[str]:
        """The lines of ``nodes``; each recomputed region (see ``ir/recompute.py``) becomes a nested
        function run under ``checkpoint``. ``returned``: values the caller returns after these lines."""
        kept = {id(v) for v in returned}
        lines: list[str] = []
        nodes = [n for n in nodes if not _cast_in_gather(n)]
        for region, run in recompute_regions(nodes):
            if region is None:
                lines += [line for line in map(self._line, run) if line]
            else:
                lines += self._checkpointed(region, run, kept)
        return lines

    @functools.cached_property
    def _readers(self) -> dict[int, set]:
        """Value id -> ids of the nodes that read it, over the whole graph."""
        readers: dict[int, set] = {}
        for node in self.graph.nodes:
            for v in node.input_values():
                readers.setdefault(id(v), set()).add(id(node))
        return readers

    def _checkpointed(self, region: str, run: list, kept: set) -> list[str]:
        inside = {id(n) for n in run}
        produced = {id(o) for n in run for o in n.outputs}
        inputs = []
        for node in run:
            for v in node.input_values():
                if id(v) not in produced and id(v) in self.local and self.source[id(v)] not in inputs:
                    inputs.append(self.source[id(v)])  # other operands (p[...], x[...], dims) come from the closure
        body = ["    " + line for node in run for line in self._line(node).splitlines()]  # a line may be several
        outputs = [self.source[id(o)] for n in run for o in n.outputs
                   if id(o) in kept or self._readers.get(id(o), set()) - inside]
        if not outputs:
            return [line[4:] for line in body]
        function = _recompute_function(region)
        listed = ", ".join(outputs)
        return ([f"    def {function}({', '.join(inputs)}):",
                 f'        """{region}: run again in backward instead of keeping its activations."""']
                + body + [f"        return {listed}",
                          f"    {listed} = checkpoint({function}"
                          + "".join(f", {i}" for i in inputs) + ", use_reentrant=False)"])

    def _assign(self, value: Value) -> str:
        """A fresh local variable for ``value``, named after what computes it (see ``_stem``)."""
        return self._named(value, self._stem(value))

    def _named(self, value: Value, stem: str) -> str:
        """A fresh local variable for ``value`` named ``stem`` (or ``stem_1``, ...)."""
        self.source[id(value)] = self.fresh(stem)
        self.local.add(id(value))
        return self.source[id(value)]

    def _stem(self, value: Value) -> str:
        """What a value's name starts with: the path of the module computing it (``blocks_0_attn_qkv``;
        ``FreshNames`` makes a second value of that module ``blocks_0_attn_qkv_1``), else its IR name. A
        collective computes a new layout of its input and is named after it (``add_reduce_scatter``); a
        gathered parameter is the parameter (``blocks_0_attn_qkv_weight``)."""
        node = value.producer
        if node is not None and node.op.startswith("comm."):
            source = node.input_values()[0]
            if cast_parameter(source) is not None and node.op == "comm.all_gather":  # the gathered cast parameter
                return f"{_identifier(cast_parameter(source).target)}_{source.type.dtype}"
            if source.kind in ("param", "buffer"):
                stem = _identifier(source.target)
                return stem if node.op == "comm.all_gather" else f"{stem}_{node.op[len('comm.'):]}"
            stem = self.source[id(source)] if id(source) in self.local else _identifier(source.name)
            return f"{stem}_{node.op[len('comm.'):]}"
        module = node.attrs.get("module") if node is not None else None
        return _identifier(module or value.name)

    def _line(self, node: Node) -> str:
        layer = self.overlapped.get(id(node))
        if layer is not None:  # the whole layer is written at its combine; its other nodes write nothing
            return self._overlapped_layer(layer) if node is layer.combine else ""
        return self._node_line(node)

    def _node_line(self, node: Node) -> str:
        if regathers(node) and len(self._readers.get(id(node.outputs[0]), ())) == 1:
            # written into its one reader's call and never bound to a name, so that nothing but backward's
            # regather holds the gathered tensor once its reader has run
            self.source[id(node.outputs[0])] = self._comm_call(node)
            return ""
        outs = [self._assign(v) for v in node.outputs]
        comment = f"  # {', '.join(format_nd_sbp(v.sbp) for v in node.outputs)}"
        if node.op.startswith("comm."):
            return f"    {outs[0]} = {self._comm_call(node)}{comment}"
        mesh = self.graph.meshes[node.outputs[0].mesh]
        if node.op == RING_ATTENTION and runs_ring(node, mesh, node.input_values()[0].sbp):
            args = ", ".join([self._arg(a) for a in node.args] + [f"{k}={self._arg(v)}" for k, v in node.kwargs.items()])
            return f"    {outs[0]} = ring_attention({args}){comment}"
        if node.op in EXCHANGING:
            return f"    {', '.join(outs)} = {self._expert_exchange(node, mesh)}{comment}"
        ctx = LocalContext(mesh, node.outputs[0].mesh, [v.sbp for v in node.input_values()],
                           [v.sbp for v in node.outputs], self.sequences)
        call = local_call(node, ctx)
        fn = call.fn.split(".", 1)[1] if call.fn.startswith("kernels.") else self.custom_ops.get(call.fn, call.fn)
        args = [self._arg(a) for a in call.args] + [f"{k}={self._arg(v)}" for k, v in call.kwargs.items()]
        lhs = outs[0] if len(outs) == 1 and not _returns_list(node) else ", ".join(outs) + ("," if len(outs) == 1 else "")
        return f"    {lhs} = {fn}({', '.join(args)}){comment}"

    def _comm_call(self, node: Node) -> str:
        """The runtime call of a ``comm.*`` node: its collective function on its input (a parameter's shard cast
        and gathered in one call; a parameter gathered to be freed after use; an activation kept as its shard)."""
        source = node.input_values()[0]
        kwargs = {**node.kwargs, **balanced_comm_kwargs(node, self.sequences)}  # load-balanced cp splits
        func = COMM_FUNCS[node.op]
        param = cast_parameter(source) if node.op == "comm.all_gather" else None
        if param is not None:  # a parameter's shard cast, then gathered: one call casts and gathers
            kwargs = {"axis": kwargs.pop("axis"), "dim": kwargs.pop("dim"), "dtype": source.type.torch_dtype,
                      **kwargs}
            source = param
        if node.op == "comm.all_gather" and source.kind == "param":
            func = "comm_gather_param"  # freed after use, gathered again for backward
        if kwargs.pop(REGATHER_KWARG, False):
            func = "comm_gather_activation"  # kept as the shard for backward, gathered again there
        x = self._arg(source)
        kw = ", ".join(f"{k}={self._arg(v)}" for k, v in kwargs.items())
        return f"{func}({x}, {kw})"

    def _expert_exchange(self, node: Node, mesh) -> str:
        """A MoE dispatch or combine (``backends/runtime/moe.py``): all-to-all where its tokens are split over
        its axis, else this rank routes its own tokens to every expert."""
        args = [self._arg(a) for a in node.args]
        experts, axis = node.kwargs["experts"], node.kwargs["axis"]
        if exchanges(node, mesh, node.input_values()[0].sbp):
            return f"moe_{node.op.split('.')[1]}({', '.join(args)}, experts={experts}, axis={axis!r})"
        if node.op == DISPATCH:
            return f"moe_replicated_dispatch({', '.join(args)}, experts={experts}, ranks={node.kwargs['ranks']})"
        return f"moe_replicated_combine({', '.join(args)}, experts={experts})"

    def _overlapped_layer(self, layer: OverlappedLayer) -> str:
        """A MoE layer in chunks (``moe_overlap_chunks``): its experts' lines as a nested function of one chunk's
        rows, which ``moe_overlapped`` calls chunk by chunk between the chunks' exchanges."""
        dispatch, combine = layer.dispatch, layer.combine
        hidden, top_k_index = (self._arg(a) for a in dispatch.args[:2])
        top_k_weights = self._arg(combine.args[2])
        rows, route = (self._named(v, stem) for v, stem in zip(dispatch.outputs, ("routed", "route")))
        function = self.fresh(_identifier(f"{dispatch.attrs.get('module') or dispatch.name}_chunk"))
        body = ["    " + self._node_line(node) for node in layer.experts]
        out = self._assign(combine.outputs[0])
        kwargs = f"experts={combine.kwargs['experts']}, axis={combine.kwargs['axis']!r}, chunks={layer.chunks}"
        return "\n".join([f"    def {function}({rows}, {route}):",
                          '        """The experts on one chunk of tokens\' rows (expert by expert)."""',
                          *body, f"        return {self.source[id(layer.expert_rows)]}",
                          f"    {out} = moe_overlapped({hidden}, {top_k_index}, {top_k_weights}, {function}, {kwargs})"
                          f"  # {format_nd_sbp(combine.outputs[0].sbp)}"])

    def _arg(self, a) -> str:
        if isinstance(a, Value):
            return self.source[id(a)]
        if isinstance(a, sympy.Expr):
            return py_int_expr(a)
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(self._arg(x) for x in a) + "]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k!r}: {self._arg(v)}" for k, v in a.items()) + "}"
        if isinstance(a, torch.device):
            return "DEVICE"
        if isinstance(a, (torch.dtype, torch.layout, torch.memory_format)):
            return str(a)
        if isinstance(a, float):
            return repr(a) if math.isfinite(a) else ("math.nan" if math.isnan(a) else ("math.inf" if a > 0 else "-math.inf"))
        return repr(a)


class PipelineProgramWriter(ProgramWriter):
    """A program for a pipelined plan: one function per stage, each rank running its action list.

    Every rank runs the same file; ``SCHEDULE[rank]`` is its list of ``(kind, stage, microbatch,
    peer)``. A stage's function computes one microbatch on that rank's shards and returns what it
    sends on (the loss share on the last stage); the runtime makes leaves of what it receives and
    calls ``torch.autograd.backward`` with the gradients that come back (zero-bubble schedules: their
    input-gradient part in ``B`` and the weight gradients in ``W``, ``SplitBackwardStep``).
    """

    entry = "pipeline"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stages = pipeline_stages(self.graph)
        self.positions = self.graph.attrs["pipeline"]["positions"]
        count = max(self.positions) + 1
        self.position_devices = [list(self.graph.meshes[self.stages[self.positions.index(q)].mesh].devices)
                                 for q in range(count)]

    def _docstring(self) -> str:
        info = self.graph.attrs["pipeline"]
        ranks = sum(len(d) for d in self.position_devices)
        return _docstring(f"Pipelined training program for {self.graph.name}, generated by sbpc.\n\n{self.header}\n"
                          f"Pipeline: {info['stages']} stages on {len(self.position_devices)} positions, "
                          f"{info['microbatches']} microbatches, schedule {info['schedule']}; each position runs "
                          f"the mesh {dict(zip(self.mesh.axes, self.mesh.shape))} ({ranks} ranks in all).\n"
                          f"Run:  torchrun --standalone --nproc-per-node {ranks} main.py --steps 5 "
                          f"--metrics losses.jsonl --save final.pt\n"
                          f"{CHECKPOINT_USAGE}Inference through some stages only: add --infer-stages 0,2,3 (no training).\n"
                          f"{BACKEND_NOTE}")

    def _code_title(self) -> str:
        return "The stages"

    def _gradient_syncs(self) -> list[str]:
        return ((["BucketedGradientSync"] if self.graph.attrs.get("grad_buckets") else [])
                + (["TiedGradientSync"] if tied_groups(self.graph) else []))

    def _entry_arguments(self) -> list[str]:
        splits = any(a.kind == "W" for actions in schedule_actions(self.graph).values() for a in actions)
        return (["step_type=SplitBackwardStep"] if splits else []) + super()._entry_arguments()

    def _reserved_names(self) -> set[str]:
        names = super()._reserved_names() | {"STAGES"}
        for st in pipeline_stages(self.graph):
            names |= {f"stage_{st.index}", f"prologue_{st.index}", f"entry_shapes_{st.index}",
                      f"exit_shapes_{st.index}"}
        return names

    def _constants(self) -> dict[str, str]:
        g = self.graph
        info = g.attrs["pipeline"]
        tensors = {p.name: (p.target, p.kind, [str(s) for s in p.sbp], stage_index(p.mesh)) for p in g.params}
        schedule = {rank: [(a.kind, a.stage, a.microbatch, a.peer) for a in acts]
                    for rank, acts in schedule_actions(g).items()}
        pipeline = {"stages": int(info["stages"]), "positions": list(self.positions),
                    "microbatches": int(info["microbatches"]), "paths": microbatch_paths(g),
                    "skippable": bool(info.get("skippable"))}
        return {**self._mesh_and_inputs(self.position_devices, "  # per pipeline position"),
                "STAGE_TENSORS": _dict("STAGE_TENSORS", tensors, "IR name: (state_dict name, param or buffer, "
                                                                 "layout per mesh axis, stage)"),
                "TIED_PARAMS": f"TIED_PARAMS = {[[p.name for p in group] for group in tied_groups(g)]!r}",
                **self._frozen_and_unsaved(lambda p: p.name),
                **self._training(lambda p: p.name),
                "PIPELINE": f"PIPELINE = {pipeline!r}",
                "SCHEDULE": "SCHEDULE = {  # rank: [(action, stage, microbatch, peer)]\n"
                            + "".join(f"    {r}: {acts!r},\n" for r, acts in schedule.items()) + "}"}

    def _code(self) -> str:
        self._bind_leaves(lambda p: p.name)
        parts = []
        for st in self.stages:
            if st.whole_batch_nodes:
                parts.append(self._prologue(st))
            parts.append(self._stage_function(st))
            parts.append(self._shapes_function(st, "entry", st.entries))
            parts.append(self._shapes_function(st, "exit", st.exits))
        tables = [
            "    forward={" + ", ".join(f"{st.index}: stage_{st.index}" for st in self.stages) + "},",
            "    prologue={" + ", ".join(f"{st.index}: prologue_{st.index}" for st in self.stages
                                         if st.whole_batch_nodes) + "},",
            "    entry_shapes={" + ", ".join(f"{st.index}: entry_shapes_{st.index}" for st in self.stages) + "},",
            "    exit_shapes={" + ", ".join(f"{st.index}: exit_shapes_{st.index}" for st in self.stages) + "},",
        ]
        return "\n\n".join(parts) + "\n\n" + "STAGES = Stages(\n" + "\n".join(tables) + "\n)\n"

    def _entry_functions(self) -> str:
        return "STAGES"

    def _prologue(self, st) -> str:
        body = [self._line(node) for node in st.whole_batch_nodes]
        outs = [o for node in st.whole_batch_nodes for o in node.outputs]
        body.append("    return {" + ", ".join(f"{o.name!r}: {self.source[id(o)]}" for o in outs) + "}")
        for o in outs:
            self.source[id(o)] = f"whole[{o.name!r}]"
            self.local.discard(id(o))
        doc = f"Stage {st.index}, once per step on the whole batch: the values of its whole-batch nodes."
        return self._function(f"prologue_{st.index}(p, b, x, dims, coord)", doc, body)

    def _stage_function(self, st) -> str:
        body = [f"    {self._assign(v)} = entries[{slot}]" for slot, v in enumerate(st.entries)]
        updates = {b: v for b, v in self.graph.buffer_updates.items() if b.mesh == st.mesh}
        body += self._body(st.nodes, (st.exits or [self.graph.loss]) + list(updates.values()))
        if st.exits:
            result = "[" + ", ".join(self.source[id(v)] for v in st.exits) + "]"
        else:
            result = self.source[id(self.graph.loss)]
        body.append(f"    return {result}, {self._updates_dict(updates, 'name')}")
        what = "the values it sends on, by slot" if st.exits else "this microbatch's share of the loss"
        doc = (f"Stage {st.index} on one microbatch (this rank's shards): entries are what it received, by slot;\n"
               f"returns {what}, and the new values of the buffers it updates.")
        return self._function(f"stage_{st.index}(p, b, x, entries, dims, coord, whole)", doc, body)

    def _shapes_function(self, st, kind: str, values: list) -> str:
        mesh = self.graph.meshes[st.mesh]
        items = []
        for v in values:
            shape = [py_int_expr(d) for d in local_shape(v.type, v.sbp, mesh)]
            items.append(f"(({', '.join(shape)}{',' if len(shape) == 1 else ''}), {v.type.torch_dtype})")
        verb = "receives" if kind == "entry" else "sends"
        doc = f"Local shapes and dtypes of the values stage {st.index} {verb}, by slot."
        return self._function(f"{kind}_shapes_{st.index}(dims)", doc, [f"    return [{', '.join(items)}]"])


def _cast_in_gather(node: Node) -> bool:
    """A parameter's cast that the gathers of its value do themselves (``comm_gather_param(..., dtype=)``)."""
    return (narrowing_cast(node) and node.input_values()[0].kind == "param"
            and all(use.op == "comm.all_gather" for use in node.outputs[0].uses))


def _returns_list(node: Node) -> bool:
    return len(node.outputs) > 1 or node.op in ("aten.split.Tensor", "aten.split_with_sizes.default",
                                                "aten.chunk.default", "aten.unbind.int")


def _recompute_function(region: str) -> str:
    """The name of the nested function that a recomputed region becomes."""
    return "recompute_" + _identifier(region)


def _identifier(text: str) -> str:
    """``text`` (a module path or IR name) as a Python identifier: ``blocks.0.attn`` -> ``blocks_0_attn``."""
    name = re.sub(r"\W", "_", text)
    return f"v_{name}" if not name or name[0].isdigit() else name


def _names_read(body: list[str]) -> set[str]:
    """The names the lines of a function body read."""
    tree = ast.parse("def f():\n" + "\n".join(body))
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _main_imports(selection: runtime.Selection) -> str:
    """``main.py``'s imports: the modules its code reads itself, then the runtime names it reads, by name."""
    from_runtime = f"from {RUNTIME_MODULE} import "
    names = ", ".join(selection.entry_names)
    line = from_runtime + (f"(\n{_wrapped(selection.entry_names, 4)})" if len(from_runtime + names) > WIDTH else names)
    return "\n".join(selection.entry_imports + ([""] if selection.entry_imports else []) + [line])


def _join_parts(parts: list[str]) -> str:
    """A file's parts, two blank lines apart."""
    return "\n\n\n".join(part.strip("\n") for part in parts) + "\n"


def _section(title: str, where: str) -> str:
    """A comment line heading one part of the program: what it is, and where it comes from."""
    text = f"# ---- {title} ({where}) "
    return text + "-" * max(4, WIDTH - len(text))


def _docstring(text: str) -> str:
    """``text`` as a module docstring (backslashes and triple quotes escaped)."""
    return '"""' + text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"') + '"""'


def _dict(name: str, entries: dict, comment: str) -> str:
    """``NAME = {...}``, as many entries per line as fit."""
    if not entries:
        return f"{name} = {{}}"
    return f"{name} = {{  # {comment}\n" + _wrapped([f"{k!r}: {v!r}" for k, v in entries.items()], 4) + "}"


def _wrapped(items: list[str], indent: int) -> str:
    """Comma-separated ``items`` in lines of at most ``WIDTH`` characters, each indented by ``indent``."""
    lines, line = [], ""
    for item in items:
        if line and indent + len(line) + len(item) + 2 > WIDTH:
            lines.append(line)
            line = ""
        line += item + ", "
    lines.append(line)
    return "".join(" " * indent + text.rstrip() + "\n" for text in lines)


def py_int_expr(e: sympy.Expr) -> str:
    """Python source for an integer-valued sympy expression (``batch/2`` becomes ``batch // 2``)."""
    e = sympy.sympify(e)
    if e.is_Integer:
        return str(int(e))
    if e.is_Float:  # a float computed from sizes (ir.types.is_float_expr): its coefficient
        return repr(float(e))
    if e.is_Symbol:
        return str(e)
    if isinstance(e, sympy.Piecewise):
        (val, cond), (other, _) = e.args[0], e.args[1]
        return f"({py_int_expr(val)} if {_py_cond(cond)} else {py_int_expr(other)})"
    num, den = e.as_numer_denom()
    if den != 1:
        return f"(({py_int_expr(num)}) // {py_int_expr(den)})"
    if e.is_Add:
        return "(" + " + ".join(py_int_expr(a) for a in e.args) + ")"
    if e.is_Mul:
        return "(" + " * ".join(py_int_expr(a) for a in e.args) + ")"
    if isinstance(e, sympy.floor):
        return f"({py_int_expr(e.args[0])})"
    raise ValueError(f"cannot write {e} as Python integer code")


def _py_cond(cond) -> str:
    if isinstance(cond, sympy.Eq):
        return f"{py_int_expr(cond.lhs)} == {py_int_expr(cond.rhs)}"
    raise ValueError(f"cannot write condition {cond}")


def _py(obj) -> str:
    if isinstance(obj, tuple):
        return "(" + ", ".join(_py(o) for o in obj) + ("," if len(obj) == 1 else "") + ")"
    if isinstance(obj, torch.dtype):
        return str(obj)
    return repr(obj)
