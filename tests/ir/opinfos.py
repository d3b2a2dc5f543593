"""An op database for the op-rule tests: tiny one-node graphs, with real inputs, for every ruled op.

Each :class:`OpSample` names an op and its arguments exactly as ``torch.export`` writes them, with
:class:`T` placeholders for tensor inputs. :meth:`OpSample.build` turns it into a one-node IR
:class:`~ir.core.Graph` (placeholders become graph inputs or parameters with concrete shapes; the
output types come from running the op) plus the real input tensors.

Float inputs are multiples of 1/64 with small magnitudes, so sums of partial values and products
of such numbers are exact in fp32: a sharded run that adds the same numbers in another order gives
bitwise the same result, and any mismatch points at a rule, not at rounding.

Samples may list :class:`Reject` s: signatures a correct rule must not offer on a mesh (splits that
do not divide, or layouts the op cannot compute locally).

The module also holds what the sharded checks share: :func:`distribute` cuts a full tensor into
per-rank locals for an N-D layout (random partial values for ``P``), :func:`assert_same` and
:func:`assert_broadcast_agrees` compare results.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ir.core import Graph, Node, Value
from ir.ops.schema import parameters
from ir.sbp import Broadcast, Split
from ir.types import DTYPE_NAMES, Mesh, TensorType
from ir.verifier import resolve_op

MESHES: dict[str, Mesh] = {
    "2": Mesh.make(["a"], [2]),
    "3": Mesh.make(["a"], [3]),
    "4": Mesh.make(["a"], [4]),
    "2x2": Mesh.make(["a", "b"], [2, 2]),
}
"""The meshes every signature is checked on, by a short key."""

INT_MAX = 9223372036854775807
"""What ``torch.export`` writes for an open-ended slice."""
RTOL, ATOL = 1e-5, 1e-6
"""The fp32 standard: sharded results against the unsharded op."""


@dataclass(frozen=True)
class T:
    """A tensor input of a sample: its shape, dtype and what values it holds."""

    shape: tuple
    dtype: torch.dtype = torch.float32
    fill: str = "normal"
    """``normal`` (multiples of 1/64 in [-2, 2)), ``positive`` ([0.25, 2.5)), ``distinct`` (no ties),
    ``int`` (in [-high, high)), ``index`` (in [0, high)), ``prob`` (in (0, 1)), ``const`` (every entry
    ``high``: for arguments whose values set output shapes), ``bool``, ``pow2`` (0.5, 1, 2 or 4) or
    ``sign`` (-1 or 1), ``offsets`` (the cumulative sizes of groups of ``high`` rows, some groups empty). Where an op's gradient of a broadcast operand sums terms that are not exact
    (1 / y), the samples pick ``pow2`` or ``sign`` values that make them exact, so that summing in
    another order (per shard, then over ranks) cannot round differently."""
    high: int = 4
    param: bool = False
    """Make it a graph parameter (like a weight) rather than a graph input."""
    grad: bool = True
    """Whether its gradient is checked (False for buffers an op updates in place)."""


@dataclass(frozen=True)
class Reject:
    """A signature that must not be offered on ``mesh`` (N-D SBP text per input, and per output)."""

    mesh: str
    inputs: tuple
    outputs: tuple | None = None
    """None: no signature with these inputs may be offered, whatever its outputs."""


@dataclass
class BuiltSample:
    """A sample made concrete: the graph, its one node, and one real tensor per node input."""

    sample: "OpSample"
    graph: Graph
    node: Node
    inputs: list
    """One real tensor per ``node.input_values()``."""
    specs: list
    """The :class:`T` of each node input."""


@dataclass
class OpSample:
    """One way to call an op: its arguments (with :class:`T` placeholders) and what to check."""

    op: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    differentiable: bool = True
    """Whether gradients of float outputs are checked."""
    exact_values: bool = True
    """False for ops whose values are undefined (``empty``): only shapes and dtypes are compared."""
    rejects: tuple = ()
    """:class:`Reject` s: signatures the rule must not offer for this sample."""
    note: str = ""
    """Why the sample is there (shown when a reject fails)."""

    def __str__(self) -> str:
        return f"{self.op}({', '.join(_describe(a) for a in self.args)}{self._kwargs_text()})"

    def _kwargs_text(self) -> str:
        return "".join(f", {k}={_describe(v)}" for k, v in self.kwargs.items())

    def build(self, seed: int = 0) -> BuiltSample:
        """The one-node graph and real inputs; ``seed`` picks the input values."""
        gen = torch.Generator().manual_seed(seed)
        graph = Graph(name=self.op.split(".")[1])
        tensors: dict[int, torch.Tensor] = {}
        specs: dict[int, T] = {}

        def to_value(spec: T) -> Value:
            name = f"w{len(graph.params)}" if spec.param else f"x{len(graph.inputs)}"
            ttype = TensorType.of(spec.shape, spec.dtype)
            v = graph.add_param(name, ttype, name) if spec.param else graph.add_input(name, ttype)
            tensors[id(v)] = make_tensor(spec, gen)
            specs[id(v)] = spec
            return v

        args, kwargs = replace_placeholders(list(self.args), to_value), replace_placeholders(self.kwargs, to_value)
        full_args = replace_values(args, tensors)
        full_kwargs = replace_values(kwargs, tensors)
        result = resolve_op(self.op)(*full_args, **full_kwargs)
        results = list(result) if isinstance(result, (list, tuple)) else [result]
        out_types = [TensorType.of(r.shape, DTYPE_NAMES[r.dtype]) for r in results]
        node = graph.create_node(self.op, args, kwargs, out_types, [f"out{i}" for i in range(len(results))])
        graph.outputs = list(node.outputs)
        values = node.input_values()
        return BuiltSample(self, graph, node, [tensors[id(v)] for v in values], [specs[id(v)] for v in values])


def _describe(arg: Any) -> str:
    if isinstance(arg, T):
        return f"{DTYPE_NAMES[arg.dtype]}{list(arg.shape)}"
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_describe(a) for a in arg) + "]"
    return repr(arg)


def replace_placeholders(obj: Any, fn) -> Any:
    """``obj`` with every :class:`T` replaced by ``fn(T)``, in nested lists and dicts."""
    if isinstance(obj, T):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(replace_placeholders(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: replace_placeholders(v, fn) for k, v in obj.items()}
    return obj


def replace_values(obj: Any, tensors: dict) -> Any:
    """``obj`` with every :class:`Value` replaced by its tensor in ``tensors`` (keyed by id)."""
    if isinstance(obj, Value):
        return tensors[id(obj)]
    if isinstance(obj, (list, tuple)):
        return type(obj)(replace_values(o, tensors) for o in obj)
    if isinstance(obj, dict):
        return {k: replace_values(v, tensors) for k, v in obj.items()}
    return obj


def make_tensor(spec: T, gen: torch.Generator) -> torch.Tensor:
    """Values for one placeholder (see :attr:`T.fill`)."""
    shape = tuple(spec.shape)
    if spec.fill == "bool":
        return torch.randint(0, 2, shape, generator=gen).bool()
    if spec.fill == "int":
        return torch.randint(-spec.high, spec.high, shape, generator=gen).to(spec.dtype)
    if spec.fill == "index":
        return torch.randint(0, spec.high, shape, generator=gen).to(spec.dtype)
    if spec.fill == "prob":
        return (torch.randint(1, 64, shape, generator=gen) / 64).to(spec.dtype)
    if spec.fill == "const":
        return torch.full(shape, spec.high, dtype=spec.dtype)
    if spec.fill == "positive":
        return (torch.randint(16, 160, shape, generator=gen) / 64).to(spec.dtype)
    if spec.fill == "distinct":
        n = max(1, int(torch.tensor(shape).prod()))
        return ((torch.randperm(n, generator=gen) - n // 2) / 16).reshape(shape).to(spec.dtype)
    if spec.fill == "pow2":
        return (2.0 ** torch.randint(-1, 3, shape, generator=gen)).to(spec.dtype)
    if spec.fill == "sign":
        return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(spec.dtype)
    if spec.fill == "normal":
        return (torch.randint(-128, 128, shape, generator=gen) / 64).to(spec.dtype)
    if spec.fill == "offsets":
        ends = torch.randint(0, spec.high + 1, (shape[0] - 1,), generator=gen).sort().values
        return torch.cat([ends, torch.tensor([spec.high])]).to(spec.dtype)
    raise ValueError(f"unknown fill {spec.fill!r} for a sample input; expected one of normal, positive, "
                     f"distinct, int, index, prob, const, bool, pow2, sign, offsets")


# -- cutting full tensors into per-rank locals ----------------------------------------------------------

def distribute(full: torch.Tensor, sbp: tuple, mesh: Mesh, gen: torch.Generator) -> list[torch.Tensor]:
    """Per-rank local tensors holding ``full`` in layout ``sbp``, partial values drawn at random.

    A rank's tensor depends only on its coordinates on the axes that are not ``B``: ranks that
    differ on broadcast axes hold the same copy (of the same random partial values).
    """
    held = [axis for axis, s in enumerate(sbp) if not isinstance(s, Broadcast)]
    pieces = {(): full}
    for axis in held:
        pieces = {coords + (c,): part for coords, t in pieces.items()
                  for c, part in enumerate(split_on_axis(t, sbp[axis], mesh.shape[axis], gen))}
    return [pieces[tuple(mesh.coords(r)[a] for a in held)].clone() for r in range(mesh.size)]


def split_on_axis(t: torch.Tensor, s, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """``n`` pieces of ``t`` that combine back into it under ``s``."""
    if isinstance(s, Split):
        assert t.shape[s.dim] % n == 0, f"S({s.dim}) of shape {tuple(t.shape)} over {n} ranks"
        return list(t.chunk(n, s.dim))
    if isinstance(s, Broadcast):
        return [t] * n
    assert t.dtype != torch.bool, f"a bool tensor held as {s}: partial values of bools mean nothing"
    if s.op == "sum":
        parts = [random_like(t, gen, -128, 128) for _ in range(n - 1)]
        return parts + [t - sum(parts, torch.zeros_like(t))]
    below = [t - random_like(t, gen, 0, 64) for _ in range(n)]
    winner = torch.randint(0, n, t.shape, generator=gen)
    return [torch.where(winner == k, t, part) for k, part in enumerate(below)]


def random_like(t: torch.Tensor, gen: torch.Generator, low: int, high: int) -> torch.Tensor:
    """Random values like ``t``: integers in [low, high), divided by 64 for floats (exact sums)."""
    ints = torch.randint(low, high, t.shape, generator=gen)
    return (ints / 64).to(t.dtype) if t.is_floating_point() else ints.to(t.dtype)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str, exact_values: bool = True) -> None:
    """Equal shape and dtype, and values (close for floats, exact otherwise)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: expected {expected.dtype}{list(expected.shape)}, found {actual.dtype}{list(actual.shape)}")
    if not exact_values:
        return
    if expected.is_floating_point():
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, equal_nan=True, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(actual, expected), f"{what}: expected {expected}, found {actual}"


def assert_broadcast_agrees(locals_: list, sbp: tuple, mesh: Mesh, what: str) -> None:
    """Ranks that differ only on axes where ``sbp`` is ``B`` hold the same tensor."""
    for axis, s in enumerate(sbp):
        if isinstance(s, Broadcast):
            for group in mesh.groups(axis):
                for r in group[1:]:
                    assert_same(locals_[r], locals_[group[0]], f"{what}: rank {r} vs rank {group[0]} (B on axis {axis})")


# -- argument coverage -------------------------------------------------------------------------------

DIM_ARGUMENTS = ("dim", "dims", "dim0", "dim1", "start_dim", "end_dim")
"""Arguments that name dims: the samples give each a negative and a positive value somewhere."""
UNEXERCISED = {
    "device": "placement: the virtual mesh runs every rank on the CPU",
    "layout": "dense strided tensors only",
    "pin_memory": "placement of host memory: values do not change",
    "memory_format": "memory layout: values do not change",
    "non_blocking": "a copy's synchronisation: values do not change",
    "copy": "whether ``to`` copies an unchanged tensor: values do not change",
    "sparse": "sparse gradients: no backend shards sparse tensors",
    "sparse_grad": "sparse gradients: no backend shards sparse tensors",
    "cudnn_enable": "a CUDA kernel choice",
    "cudnn_enabled": "a CUDA kernel choice",
    "implicit": "marks an expand torch inserted: values do not change",
    "half_to_float": "needs a half input on CUDA",
}
"""Arguments the samples need not give, by name, and why."""
UNEXERCISED_OF_OP = {
    ("aten._native_batch_norm_legit.no_stats", "training"):
        "without running statistics there are only batch statistics (torch crashes on training=False)",
}
"""Arguments one op's samples need not vary, and why."""


def given_arguments(sample: OpSample) -> dict[str, tuple[Any, bool]]:
    """The arguments a sample writes, by schema name: ``(value, given by keyword)``."""
    params = parameters(sample.op)
    positional = [p for p in params if not p.kwarg_only]
    given = {p.name: (a, False) for p, a in zip(positional, sample.args)}
    given.update({k: (v, True) for k, v in sample.kwargs.items()})
    return given


def coverage_gaps(op: str, samples: list[OpSample]) -> list[str]:
    """What the samples of ``op`` leave unexercised: an argument never given a non-default value, a bool
    never given both ways, a dim never negative or never positive, a defaulted dim never given by keyword."""
    gaps = []
    given = [given_arguments(s) for s in samples]
    for p in parameters(op):
        if p.name in UNEXERCISED or (op, p.name) in UNEXERCISED_OF_OP:
            continue
        values = [g[p.name][0] for g in given if p.name in g]
        seen = values + ([p.default] if p.has_default and len(values) < len(samples) else [])
        if p.has_default and not any(_differs(v, p.default) for v in values):
            gaps.append(f"{p.name}: never given a value other than its default {p.default!r}")
        if any(isinstance(v, bool) for v in seen) and not {True, False} <= {v for v in seen if isinstance(v, bool)}:
            gaps.append(f"{p.name}: never given both True and False")
        if p.name in DIM_ARGUMENTS:
            dims = [d for v in values if v is not None for d in (v if isinstance(v, (list, tuple)) else [v])]
            if not any(d < 0 for d in dims) or not any(d > 0 for d in dims):
                gaps.append(f"{p.name}: needs a negative and a positive dim among the samples, found {dims}")
            if p.has_default and not p.kwarg_only and not any(g[p.name][1] for g in given if p.name in g):
                gaps.append(f"{p.name}: never given by keyword")
    return gaps


def _differs(value: Any, default: Any) -> bool:
    """Whether a sample's value is another than the schema default (a tensor differs from None)."""
    if isinstance(value, T) or default is None:
        return value is not None
    return value != default


# -- the database ----------------------------------------------------------------------------------

SAMPLES: dict[str, list[OpSample]] = {}
"""Every sample, by op name."""


def add(op: str, *args: Any, kw: dict | None = None, **options: Any) -> None:
    """Register a sample of ``op`` called with ``args`` (and keyword arguments ``kw``)."""
    SAMPLES.setdefault(op, []).append(OpSample(op, args, dict(kw or {}), **options))


def samples_for(op: str) -> list[OpSample]:
    """The samples of ``op`` (empty when it has none)."""
    return SAMPLES.get(op, [])


F32, F64, I64, BOOL = torch.float32, torch.float64, torch.int64, torch.bool
X = T((4, 1, 6))
"""The default elementwise input: splits over 2, 3 and 4 ranks and a size-1 dim that never splits."""


def rej(mesh: str, inputs: list[str], outputs: list[str] | None = None) -> Reject:
    """Shorthand for :class:`Reject`."""
    return Reject(mesh, tuple(inputs), None if outputs is None else tuple(outputs))


def _elementwise_unary() -> None:
    plain = ["gelu", "tanh", "relu", "silu", "sigmoid", "exp", "cos", "sin", "abs", "erf", "floor", "ceil",
             "sign", "expm1", "hardswish", "hardsigmoid", "mish", "round", "trunc", "relu6", "elu",
             "isnan", "neg", "clone", "contiguous", "alias", "lift_fresh_copy"]
    for name in plain:
        add(f"aten.{name}.default", X)
    for name in ["log", "sqrt", "rsqrt", "log1p", "reciprocal"]:
        add(f"aten.{name}.default", T((4, 1, 6), fill="positive"))
    add("aten.gelu.default", T((6, 4)), kw={"approximate": "tanh"})
    add("aten.detach.default", X, differentiable=False)
    add("aten.pow.Tensor_Scalar", X, 2)
    add("aten.pow.Tensor_Scalar", T((6, 4), fill="positive"), 0.5)
    add("aten.logical_not.default", T((4, 1, 6), BOOL, "bool"))
    for cmp in ["ne", "eq", "lt", "gt", "le", "ge"]:
        add(f"aten.{cmp}.Scalar", X, 0.5)
    add("aten.ne.Scalar", T((4, 6), I64, "int"), 1)
    add("aten.bitwise_not.default", T((4, 1, 6), BOOL, "bool"))
    add("aten.bitwise_not.default", T((6, 4), I64, "int"))
    add("aten.bitwise_and.Scalar", T((4, 1, 6), I64, "int", high=8), 3)
    add("aten.hardtanh.default", X, -1.0, 1.0)
    add("aten.hardtanh.default", X, -0.5, 0.75)
    add("aten.elu.default", X, 0.5, 2.0, 1.5)
    add("aten.leaky_relu.default", X, 0.1)
    add("aten.softplus.default", X, 2.0, 1.0)
    add("aten.clamp.default", X, -1.0, 0.5)
    add("aten.clamp.default", X, None, 0.5)
    add("aten.clamp_min.default", X, 0.0)
    add("aten.clamp_max.default", X, 0.5)
    add("aten.mul.Scalar", X, 2.5)
    add("aten.div.Scalar", X, 4.0)
    add("aten.rsub.Scalar", X, 1.0)
    add("aten.rsub.Scalar", X, 1.0, 2)
    add("aten.remainder.Scalar", X, 0.75)


def _conversions() -> None:
    add("aten.to.dtype", X, F64)
    add("aten.to.dtype", X, I64, rejects=(rej("2", ["(P(sum))"]),), note="float to int truncates: not linear")
    add("aten.to.dtype", T((4, 1, 6), I64, "int"), F32)
    add("aten.to.dtype", T((4, 1, 6), BOOL, "bool"), I64)
    add("aten.to.dtype_layout", X, kw={"dtype": F64, "layout": torch.strided, "device": torch.device("cpu")})
    add("aten.to.dtype_layout", X, kw={"dtype": BOOL, "layout": torch.strided, "device": torch.device("cpu")})
    add("aten.to.device", X, torch.device("cpu"), F32)
    add("aten._to_copy.default", X, kw={"dtype": F64})
    add("aten._to_copy.default", X, kw={"dtype": I64})
    add("aten.type_as.default", X, T((2, 3), F64))
    add("aten.type_as.default", X, T((2, 3), I64, "int"))
    add("aten.dropout.default", X, 0.0, True)
    add("aten.dropout.default", X, 0.5, False)
    add("aten.dropout.default", X, 0.5, True, exact_values=False, differentiable=False,
        rejects=(rej("2", ["(P(sum))"]),), note="a mask per rank: masked partial sums are no masked sum")
    add("aten.feature_dropout.default", T((4, 6, 2)), 0.0, True)
    add("aten.feature_dropout.default", T((4, 6, 2)), 0.5, False)
    add("aten.feature_dropout.default", T((4, 6, 2)), 0.5, True, exact_values=False, differentiable=False,
        rejects=(rej("2", ["(P(sum))"]),), note="a mask per rank: masked partial sums are no masked sum")


def _elementwise_binary() -> None:
    """Broadcasting both ways: [4,1,6] with [3,1] gives [4,3,6]; and a zero-dim tensor operand."""
    left, right = T((4, 1, 6)), T((3, 1))
    for name in ["maximum.default", "minimum.default", "add.Tensor", "sub.Tensor", "mul.Tensor", "min.other",
                 "max.other"]:
        add(f"aten.{name}", left, right)
        add(f"aten.{name}", T((6, 4)), T(()))
    for cmp in ["eq", "ne", "lt", "gt", "le", "ge"]:
        add(f"aten.{cmp}.Tensor", left, right)
        add(f"aten.{cmp}.Tensor", T((6, 4), I64, "int"), T((), I64, "int"))
    for name in ["__and__.Tensor", "__or__.Tensor", "bitwise_and.Tensor", "bitwise_or.Tensor",
                 "logical_and.default", "logical_or.default"]:
        add(f"aten.{name}", T((4, 1, 6), BOOL, "bool"), T((3, 1), BOOL, "bool"))
    add("aten.bitwise_and.Tensor", T((6, 4), I64, "int", high=8), T((4,), I64, "int", high=8))
    add("aten.min.other", T((6, 4), I64, "int"), T((6, 1), I64, "int"))
    add("aten.__and__.Tensor", T((), BOOL, "bool"), T((4, 1, 6), BOOL, "bool"))
    add("aten.atan2.default", T((4, 1, 6), fill="sign"), T((3, 1), fill="sign"))
    add("aten.atan2.default", T((6, 4)), T(()))
    # d/dbase = e * base^(e-1) is exact for powers of two; d/dexponent is not, so it is not broadcast.
    add("aten.pow.Tensor_Tensor", T((3, 1), fill="pow2"), T((4, 3, 6), fill="int", high=3))
    add("aten.remainder.Tensor", left, T((3, 1), fill="positive"))
    add("aten.floor_divide.default", left, T((3, 1), fill="positive"), differentiable=False)
    add("aten.div.Tensor", left, T((3, 1), fill="pow2"))
    add("aten.div.Tensor", T((6, 4)), T((), fill="pow2"))
    add("aten.div.Tensor", X, 4.0)
    add("aten.mul.Tensor", X, 2)
    add("aten.add.Tensor", X, 1)
    add("aten.add.Tensor", left, right, kw={"alpha": 2})
    add("aten.sub.Tensor", X, 0.5, kw={"alpha": 2})
    add("aten.add.Tensor", T((4, 6), I64, "int"), T((4, 6), I64, "int"))
    # torch has no derivative for aten.copy (functionalization writes it for copy_ outside autograd)
    add("aten.broadcast_tensors.default", [T((4, 1, 6)), T((3, 1))])
    add("aten.broadcast_tensors.default", [T((6, 4)), T(()), T((4,))])
    add("aten.copy.default", T((4, 3, 6)), T((3, 1)), differentiable=False)
    add("aten.copy.default", T((4, 6), I64, "int"), T((4, 6)), True, differentiable=False,
        rejects=(rej("2", ["(B)", "(P(sum))"]),), note="copying floats into ints truncates: not linear")
    add("aten.copy.default", T((4, 6), F64), T((6,)), differentiable=False)
    add("aten.fill.Scalar", T((4, 6)), 1.5)
    add("aten.fill.Scalar", T((4, 1, 6), I64, "int"), 3)
    add("aten.fill.Tensor", T((4, 6)), T(()))
    add("aten.where.self", T((4, 1, 6), BOOL, "bool"), T((3, 1)), T((4, 3, 1)))
    add("aten.where.ScalarOther", T((4, 1, 6), BOOL, "bool"), T((3, 1)), 0.0)
    add("aten.where.ScalarSelf", T((4, 1, 6), BOOL, "bool"), 1.5, T((3, 1)))
    add("aten.masked_fill.Scalar", T((4, 3, 6)), T((3, 1), BOOL, "bool"), -1.5)
    add("aten.masked_fill.Tensor", T((4, 1, 6)), T((4, 3, 6), BOOL, "bool"), T(()))


def _reductions() -> None:
    x3 = T((4, 6, 12))
    add("aten.sum.dim_IntList", x3, [1])
    add("aten.sum.dim_IntList", x3, [-1, 0], True)
    add("aten.sum.dim_IntList", T((4, 6)), [1], False, kw={"dtype": F64})
    add("aten.sum.dim_IntList", T((4, 6), I64, "int"), [0])
    add("aten.sum.dim_IntList", x3, None, True)
    add("aten.sum.dim_IntList", x3, [], kw={"keepdim": False})
    add("aten.sum.default", T((4, 6)))
    add("aten.sum.default", T((4, 6)), kw={"dtype": F64})
    add("aten.mean.dim", x3, [-1], True)
    add("aten.mean.dim", x3, [0, 2])
    add("aten.mean.dim", T((4, 6)), [1], False, kw={"dtype": F64})
    add("aten.mean.default", T((4, 6)))
    add("aten.mean.default", T((4, 6)), kw={"dtype": F64})
    xd = T((4, 6, 12), fill="distinct")
    add("aten.amax.default", xd, [1])
    add("aten.amax.default", xd, [-1, 0], True)
    add("aten.amax.default", T((4, 6), fill="distinct"))
    add("aten.amax.default", xd, kw={"dim": [2], "keepdim": False})
    add("aten.amin.default", xd, [0])
    add("aten.amin.default", xd, [-1, 1], True)
    add("aten.amin.default", xd, kw={"dim": [-2]})
    add("aten.cumsum.default", x3, 1)
    add("aten.cumsum.default", T((4, 6), BOOL, "bool"), -1)
    add("aten.cumsum.default", T((4, 6)), 0, kw={"dtype": F64})
    add("aten.cumprod.default", T((4, 6, 12), fill="pow2"), 1)
    add("aten.cumprod.default", T((4, 6), fill="pow2"), -1, kw={"dtype": F64})
    add("aten.var.correction", x3, [1], kw={"correction": 1, "keepdim": True})
    add("aten.var.correction", T((4, 6)), None, kw={"correction": 0})
    add("aten.var.correction", x3, kw={"dim": [-2], "correction": 2})
    add("aten.var_mean.correction", x3, [1], kw={"correction": 0})
    add("aten.var_mean.correction", x3, kw={"dim": [-1], "correction": 1, "keepdim": True})
    add("aten.std.correction", x3, [0, -1], kw={"correction": 1})
    add("aten.std.correction", x3, kw={"dim": [1], "correction": 0, "keepdim": True})
    add("aten.var.dim", x3, [1], True, True)
    add("aten.var.dim", x3, [-1], False)
    add("aten.std.dim", x3, [1])
    add("aten.std.dim", x3, [-1], False, True)
    add("aten.var_mean.dim", x3, [0], True, True)
    add("aten.var_mean.dim", x3, [-1], False)
    add("aten.var_mean.dim", x3, [1, 2])
    add("aten.argmax.default", xd, 1)
    add("aten.argmax.default", T((4, 6), fill="distinct"))
    add("aten.argmax.default", xd, kw={"dim": -1, "keepdim": True})
    add("aten.argmax.default", xd, None, True, note="no dim: the index into the flattened input")
    add("aten.argmin.default", xd, -1, True)
    add("aten.argmin.default", xd, kw={"dim": 1})
    add("aten.max.dim", xd, 1)
    add("aten.max.dim", xd, -1, True)
    add("aten.min.dim", xd, 0, True)
    add("aten.min.dim", xd, -2)
    add("aten.min.dim", xd, 2)
    add("aten.logsumexp.default", x3, [1])
    add("aten.logsumexp.default", x3, [0, 2], True)
    add("aten.logsumexp.default", x3, [-1])
    add("aten.prod.dim_int", T((4, 6, 12), fill="pow2"), 1)
    add("aten.prod.dim_int", T((4, 6, 12), fill="pow2"), -1, True, kw={"dtype": F64})
    add("aten.any.dim", T((4, 6, 12), BOOL, "bool"), 1)
    add("aten.any.dim", T((4, 6, 12), BOOL, "bool"), -2, True)
    add("aten.all.dim", T((4, 6, 12), BOOL, "bool"), 0, True)
    add("aten.all.dim", T((4, 6, 12), BOOL, "bool"), -1)
    add("aten.all.dim", T((4, 6, 12), BOOL, "bool"), 1)
    add("aten.topk.default", xd, 3)
    add("aten.topk.default", xd, 2, 1, False, False)
    add("aten.topk.default", xd, 4, kw={"dim": -2})
    add("aten.topk.default", T((12, 4), fill="distinct"), 2, note="Mixtral's router: top-k experts per token")
    add("aten.sort.default", xd)
    add("aten.sort.default", xd, 1, True)
    add("aten.sort.default", xd, kw={"dim": -3})
    add("aten.sort.stable", xd, kw={"stable": True, "dim": 0, "descending": True})
    add("aten.sort.stable", T((4, 6, 12), fill="int"), kw={"stable": True, "dim": -2})
    add("aten.sort.stable", xd, kw={"stable": False, "dim": 1})
    add("aten.argsort.default", xd)
    add("aten.argsort.default", xd, 1, True)
    add("aten.argsort.default", xd, kw={"dim": -3})
    add("aten.argsort.stable", T((4, 6, 12), fill="int"), kw={"stable": True, "dim": 1, "descending": True})
    add("aten.argsort.stable", xd, kw={"stable": False, "dim": -1})


def _reshapes() -> None:
    add("aten.view.default", T((4, 6)), [2, 12], rejects=(rej("4", ["(S(0))"], ["(S(0))"]),),
        note="4 rows split 4 ways would need 2 output rows split 4 ways")
    add("aten.view.default", T((2, 6, 4)), [12, 4])
    add("aten.reshape.default", T((6, 4)), [4, 6], rejects=(rej("3", ["(S(0))"]),))
    add("aten.reshape.default", T((4, 6)), [-1, 3])
    add("aten.reshape.default", T((4, 6)), [-1])
    add("aten.reshape.default", T((12, 1, 4)), [2, 6, 4])
    add("aten._unsafe_view.default", T((4, 6)), [24])
    add("aten.flatten.using_ints", T((2, 6, 4)), 1)
    add("aten.flatten.using_ints", T((4, 6, 2)))
    add("aten.flatten.using_ints", T((2, 6, 4, 2)), -3, 2)
    add("aten.flatten.using_ints", T((2, 6, 4, 2)), 1, -2)
    add("aten.flatten.using_ints", T((4, 6, 2)), kw={"start_dim": 0, "end_dim": 1})
    add("aten.unflatten.int", T((4, 6)), 1, [2, 3], rejects=(rej("3", ["(S(1))"], ["(S(1))"]),))
    add("aten.unflatten.int", T((12, 2)), 0, [4, -1])
    add("aten.unflatten.int", T((4, 6)), -1, [3, 2])
    add("aten.transpose.int", T((4, 6, 2)), -1, 0)
    add("aten.transpose.int", T((4, 6)), 0, 1)
    add("aten.transpose.int", T((4, 6, 2, 2)), 2, -3)
    add("aten.transpose.int", T((4, 6, 2)), -2, 2)
    add("aten.permute.default", T((4, 6, 2)), [2, 0, 1])
    add("aten.permute.default", T((4, 1, 6)), [-1, 1, 0])
    add("aten.t.default", T((4, 6)))
    add("aten.t.default", T((6,)))
    add("aten.numpy_T.default", T((4, 6)))
    add("aten.numpy_T.default", T((4, 6, 2)))
    add("aten.numpy_T.default", T((6,)))
    add("aten.unsqueeze.default", T((4, 6)), -1)
    add("aten.unsqueeze.default", T((4, 6)), 0)
    add("aten.unsqueeze.default", T((4, 6)), 1)
    add("aten.squeeze.dim", T((4, 1, 6)), 1)
    add("aten.squeeze.dim", T((4, 1, 6)), -1)
    add("aten.squeeze.dims", T((4, 1, 6, 1)), [1, -1])
    add("aten.squeeze.default", T((1, 4, 1, 6)))
    add("aten.expand.default", T((4, 1, 6)), [4, 6, 6])
    add("aten.expand.default", T((1, 6)), [4, 12, 6])
    add("aten.expand.default", T((4, 1)), [-1, 6])


def _slicing() -> None:
    add("aten.split.Tensor", T((4, 6)), 2, 1)
    add("aten.split.Tensor", T((6, 4)), 4)
    add("aten.split.Tensor", T((4, 6, 2)), 4, -2)
    add("aten.split.Tensor", T((4, 6)), 3, kw={"dim": 1})
    add("aten.split_with_sizes.default", T((4, 6, 4)), [1, 3], -1)
    add("aten.split_with_sizes.default", T((4, 6, 4)), [2, 4], kw={"dim": 1})
    add("aten.chunk.default", T((4, 6)), 2, 1)
    add("aten.chunk.default", T((4, 6, 2)), 3, kw={"dim": -2})
    add("aten.tensor_split.sections", T((4, 6)), 3, 1)
    add("aten.tensor_split.sections", T((6, 4)), 2)
    add("aten.tensor_split.sections", T((4, 6)), 4, kw={"dim": -1}, note="uneven pieces: 2, 2, 1, 1")
    add("aten.tensor_split.indices", T((4, 6, 8)), [8], 2, note="Mamba: the second piece is empty")
    add("aten.tensor_split.indices", T((4, 6)), [1, 4], -1)
    add("aten.tensor_split.indices", T((6, 4)), [2], kw={"dim": 0})
    add("aten.tensor_split.tensor_indices_or_sections", T((4, 6)), T((), I64, "const", high=3), 1)
    add("aten.tensor_split.tensor_indices_or_sections", T((4, 6)), T((2,), I64, "const", high=2), kw={"dim": -2})
    add("aten.unbind.int", T((4, 3, 6)), 1)
    add("aten.unbind.int", T((2, 6)))
    add("aten.unbind.int", T((2, 4, 3, 4)), 2, note="q, k, v = x.view(b, s, 3, d).unbind(2)")
    add("aten.unbind.int", T((4, 3, 6)), kw={"dim": -2})
    add("aten.slice.Tensor", T((4, 6)), 1, 1, INT_MAX)
    add("aten.slice.Tensor", T((4, 6)), kw={"dim": -1, "start": 2, "end": 4})
    add("aten.slice.Tensor", T((4, 6)), 0, 0, INT_MAX)
    add("aten.slice.Tensor", T((4, 6)), 1, 0, 6, 2)
    add("aten.slice.Tensor", T((4, 12)), -1, 0, -6)
    add("aten.narrow.default", T((4, 6)), 1, 2, 3)
    add("aten.narrow.default", T((4, 6)), 0, 0, 4)
    add("aten.narrow.default", T((4, 6)), -1, 1, 4)
    add("aten.slice_scatter.default", T((4, 6)), T((4, 2)), 1, 2, 4)
    add("aten.slice_scatter.default", T((6, 4)), T((3, 4)), kw={"dim": 0, "start": 0, "end": 6, "step": 2})
    add("aten.slice_scatter.default", T((4, 6, 2)), T((4, 3, 2)), -2, 1, None, 2)
    add("aten.select_scatter.default", T((4, 6)), T((4,)), 1, 2)
    add("aten.select_scatter.default", T((4, 6, 2)), T((6, 2)), 0, -1)
    add("aten.select_scatter.default", T((4, 6, 2)), T((4, 2)), -2, 3)
    add("aten.select.int", T((4, 6)), 1, -1)
    add("aten.select.int", T((4, 6, 2)), 0, 2)
    add("aten.select.int", T((4, 6, 2)), -2, 3)
    add("aten.cat.default", [T((4, 6)), T((4, 2))], 1)
    add("aten.cat.default", [T((4, 6)), T((2, 6))])
    add("aten.cat.default", [T((4, 6, 2)), T((4, 6, 1))], -1)
    add("aten.cat.default", [T((4, 6)), T((4, 2))], kw={"dim": -1})
    add("aten.stack.default", [T((4, 6)), T((4, 6))], 1)
    add("aten.stack.default", [T((4, 6)), T((4, 6))], -1)
    add("aten.stack.default", [T((4, 6)), T((4, 6)), T((4, 6))])
    add("aten.stack.default", [T((4, 6)), T((4, 6))], kw={"dim": 2})
    add("aten.pad.default", T((4, 6)), [1, 2])
    add("aten.pad.default", T((2, 4, 6)), [1, 1, 0, 2], "constant", 0.5)
    add("aten.pad.default", T((2, 4, 6)), [1, 1], "reflect")
    add("aten.pad.default", T((4, 6), I64, "int"), [0, 1], "constant", -100.0)
    add("aten.constant_pad_nd.default", T((4, 6)), [1, 1], 0.0)
    add("aten.constant_pad_nd.default", T((4, 6)), [0, 0, 1, 0], 2.0)
    add("aten.repeat.default", T((4, 6)), [2, 1])
    add("aten.repeat.default", T((4, 6)), [3, 1, 1])
    add("aten.repeat_interleave.self_int", T((4, 6)), 2, note="no dim: the input is flattened")
    add("aten.repeat_interleave.self_int", T((4, 3, 6)), 3, 1)
    add("aten.repeat_interleave.self_int", T((4, 6)), 2, -1, kw={"output_size": 12})
    add("aten.repeat_interleave.self_int", T((4, 6)), 2, kw={"dim": 0})
    add("aten.repeat_interleave.self_int", T((2, 6, 1, 2)), 2, 3, note="GPT-J's rotary sin/cos")
    add("aten.diff.default", T((4, 6)))
    add("aten.diff.default", T((4, 6), I64, "int"), 1, -1, T((4, 1), I64, "int"))
    add("aten.diff.default", T((4, 6)), 1, 0, None, T((2, 6)))
    add("aten.diff.default", T((4, 6, 2)), 2, kw={"dim": 1})
    add("aten.index.Tensor", T((4, 6)), [T((4, 1, 1), I64, "index", high=4), T((1, 6), I64, "index", high=6)])
    add("aten.index.Tensor", T((4, 6, 2)), [T((12,), I64, "index", high=4)])
    add("aten.index.Tensor", T((6, 4)), [T((2, 6), I64, "index", high=6), T((6,), I64, "index", high=4)])
    add("aten.index_put.default", T((6, 4)), [T((3,), I64, "index", high=6)], T((3, 4)))
    add("aten.index_put.default", T((4, 6, 2)), [T((3,), I64, "index", high=4), T((3,), I64, "index", high=6)],
        T((2,)), True)
    add("aten.index_put.default", T((6, 4)), [T((2,), I64, "index", high=6)], T((1,)), kw={"accumulate": True})
    add("aten.index_put.default", T((8,), I64, "int"), [T((8,), I64, "index", high=8)], T((8,), I64, "int"),
        note="MoE routing (transformers' grouped experts): the inverse of a sort's permutation")
    add("aten.scatter.value", T((4, 6)), 1, T((4, 3), I64, "index", high=6), 1.5)
    add("aten.scatter.value", T((6, 4, 2)), -3, T((2, 4, 2), I64, "index", high=6), -1.0)
    add("aten.scatter.value", T((4, 6)), -1, T((2, 6), I64, "index", high=6), 0.0,
        note="index spans 2 of the 4 rows: rows may not split")
    add("aten.histc.default", T((4, 6)), 4, 0, 3, differentiable=False)
    add("aten.histc.default", T((8,)), kw={"bins": 5, "min": -2, "max": 2}, differentiable=False)
    add("aten.histc.default", T((6,)), differentiable=False, note="bounds from the data: no split")


def _factories() -> None:
    cpu = torch.device("cpu")
    add("aten.arange.default", 6, kw={"device": cpu, "pin_memory": False})
    add("aten.arange.start", 2, 8, kw={"dtype": F32})
    add("aten.arange.default", 6, kw={"dtype": F64})
    add("aten.arange.start_step", 0, 12, 2)
    add("aten.arange.start_step", 1, 12, 3, kw={"dtype": F32})
    add("aten.zeros.default", [4, 6], kw={"device": cpu, "pin_memory": False})
    add("aten.zeros.default", [4, 6], kw={"dtype": I64})
    add("aten.ones.default", [4, 6], kw={"dtype": BOOL})
    add("aten.full.default", [4, 6], 1.5)
    add("aten.full.default", [4, 6], 3, kw={"dtype": F64})
    add("aten.empty.memory_format", [4, 6], exact_values=False)
    add("aten.empty.memory_format", [4, 6], kw={"dtype": F64}, exact_values=False)
    add("aten.eye.default", 4)
    add("aten.eye.default", 3, kw={"dtype": I64})
    add("aten.scalar_tensor.default", 2.0, kw={"dtype": F32})
    add("aten.new_zeros.default", T((4, 6)), [3, 2], kw={"pin_memory": False})
    add("aten.new_zeros.default", T((4, 6)), [2], kw={"dtype": F64})
    add("aten.new_ones.default", T((4, 6), I64, "int"), [], kw={"dtype": BOOL, "pin_memory": False})
    add("aten.new_full.default", T((4, 6)), [6, 2], 2.0)
    add("aten.new_full.default", T((4, 6)), [6], 2, kw={"dtype": I64})
    add("aten.new_empty.default", T((4, 6)), [4, 6], exact_values=False)
    add("aten.new_empty.default", T((4, 6)), [4], kw={"dtype": F64}, exact_values=False)
    add("aten.zeros_like.default", T((4, 6)), kw={"pin_memory": False})
    add("aten.zeros_like.default", T((4, 6)), kw={"dtype": I64})
    add("aten.empty_like.default", T((4, 6)), kw={"pin_memory": False}, exact_values=False)
    add("aten.empty_like.default", T((4, 6)), kw={"dtype": I64}, exact_values=False)
    add("aten.ones_like.default", T((4, 1, 6)))
    add("aten.ones_like.default", T((4, 6)), kw={"dtype": BOOL})
    add("aten.full_like.default", T((4, 6)), 3.0)
    add("aten.full_like.default", T((4, 6)), 3, kw={"dtype": I64})
    add("aten.tril.default", T((2, 4, 4)))
    add("aten.tril.default", T((4, 6)), -1)
    add("aten.triu.default", T((2, 4, 4)), 1)


def _matmuls() -> None:
    add("aten.linear.default", T((4, 6)), T((12, 6), param=True), T((12,), param=True))
    add("aten.linear.default", T((2, 4, 6)), T((4, 6), param=True))
    add("aten.linear.default", T((6,)), T((4, 6), param=True), T((4,), param=True))
    add("aten.addmm.default", T((12,), param=True), T((4, 6)), T((6, 12), param=True))
    add("aten.addmm.default", T((4, 12)), T((4, 6)), T((6, 12)), rejects=(rej("2", ["(B)", "(S(0))", "(B)"]),),
        note="a full-shaped bias splits with the rows")
    add("aten.addmm.default", T((1, 12)), T((4, 6)), T((6, 12)))
    add("aten.addmm.default", T((12,)), T((4, 6)), T((6, 12)), kw={"beta": 0.5, "alpha": 2})
    add("aten.mm.default", T((4, 6)), T((6, 12)))
    add("aten.bmm.default", T((4, 2, 6)), T((4, 6, 3)))
    add("aten.matmul.default", T((2, 4, 6)), T((6, 12)))
    add("aten.matmul.default", T((1, 4, 6)), T((3, 6, 2)))
    add("aten.matmul.default", T((2, 1, 4, 6)), T((3, 6, 4)))
    add("aten.matmul.default", T((6,)), T((6, 4)))
    import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)
    add("transformers.grouped_mm_fallback.default", T((6, 4)), T((4, 4, 8), param=True),
        T((4,), torch.int32, "offsets", high=6), note="a custom op of transformers (MoE experts)")


def _lookups() -> None:
    add("aten.embedding.default", T((12, 4), param=True), T((2, 6), I64, "index", high=12))
    add("aten.embedding.default", T((12, 4), param=True), T((2, 6), I64, "index", high=12), 7,
        note="padding_idx: that row gets no gradient")
    add("aten.embedding.default", T((12, 4), param=True), T((2, 6), I64, "index", high=12), -1, True,
        rejects=(rej("2", ["(S(0))", "(B)"]), rej("2", ["(B)", "(S(0))"])),
        note="scale_grad_by_freq counts each row among all indices: neither a vocabulary nor an index shard can")
    add("aten.gather.default", T((4, 6)), 1, T((4, 3), I64, "index", high=6))
    add("aten.gather.default", T((4, 6)), 0, T((2, 6), I64, "index", high=4))
    add("aten.gather.default", T((4, 6, 2)), -2, T((4, 12, 2), I64, "index", high=6))
    add("aten.index_select.default", T((4, 6)), 1, T((3,), I64, "index", high=6))
    add("aten.index_select.default", T((6, 4, 2)), 0, T((4,), I64, "index", high=6), note="ONNX Gather of rows")
    add("aten.index_select.default", T((4, 6, 2)), -2, T((2,), I64, "index", high=6))
    add("aten.index_select.default", T((4, 6)), -1, T((), I64, "index", high=6))


def _normalisations() -> None:
    add("aten.layer_norm.default", T((4, 6)), [6], T((6,), param=True), T((6,), param=True), 1e-5, False)
    add("aten.layer_norm.default", T((2, 4, 6)), [4, 6], T((4, 6), param=True), T((4, 6), param=True))
    add("aten.layer_norm.default", T((4, 6, 2)), [2])
    add("aten.layer_norm.default", T((4, 6)), [6], T((6,), param=True), None, 1e-3)
    add("aten.rms_norm.default", T((4, 6)), [6], T((6,), param=True))
    add("aten.rms_norm.default", T((2, 4, 6)), [6], None, 1e-6)
    add("aten.softmax.int", T((4, 6)), -1)
    add("aten.softmax.int", T((2, 4, 6)), 1)
    add("aten.softmax.int", T((4, 6)), 1, F64)
    add("aten.softmax.int", T((2, 4, 6)), -2, kw={"dtype": F64})
    add("aten._softmax.default", T((4, 6)), 0, False)
    add("aten._softmax.default", T((2, 4, 6)), -2, False)
    add("aten._softmax.default", T((2, 4, 6)), 2, False)
    add("aten.log_softmax.int", T((2, 4, 6)), 0)
    add("aten.log_softmax.int", T((2, 4, 6)), -1, F64)
    add("aten.log_softmax.int", T((2, 4, 6)), 1)
    add("aten._log_softmax.default", T((4, 6)), -1, False)
    add("aten._log_softmax.default", T((4, 6)), 1, False)
    running = (T((6,), grad=False), T((6,), fill="positive", grad=False))
    bn = (T((6,), param=True), T((6,), param=True), *running)
    add("aten.batch_norm.default", T((4, 6, 3, 3)), *bn, False, 0.1, 1e-5, False)
    add("aten.batch_norm.default", T((4, 6, 3, 3)), *bn, True, 0.1, 1e-5, False)
    add("aten.batch_norm.default", T((4, 6)), None, None, *running, False, 0.1, 1e-5, False)
    add("aten._native_batch_norm_legit_no_training.default", T((4, 6, 2)), *bn, 0.1, 1e-5)
    add("aten._native_batch_norm_legit_functional.default", T((4, 6, 3, 3)), *bn, True, 0.1, 1e-5)
    add("aten._native_batch_norm_legit_functional.default", T((4, 6)), None, None, *running, True, 0.1, 1e-5)
    add("aten._native_batch_norm_legit_functional.default", T((4, 6, 2)), *bn, False, 0.1, 1e-5)
    add("aten._native_batch_norm_legit.no_stats", T((4, 6, 3)), T((6,), param=True), T((6,), param=True),
        True, 0.1, 1e-5)


def _attention() -> None:
    q4 = T((2, 4, 6, 8))
    add("aten.scaled_dot_product_attention.default", q4, q4, q4)
    add("aten.scaled_dot_product_attention.default", q4, q4, q4, None, 0.0, True)
    add("aten.scaled_dot_product_attention.default", q4, q4, q4, None, 0.5, exact_values=False, differentiable=False,
        note="attention dropout draws a mask per rank: only shapes compare")
    add("aten.scaled_dot_product_attention.default", q4, q4, q4, T((6, 6), BOOL, "bool"))
    add("aten.scaled_dot_product_attention.default", q4, q4, q4, T((2, 1, 6, 6)), kw={"scale": 0.5})
    add("aten.scaled_dot_product_attention.default", q4, T((2, 2, 6, 8)), T((2, 2, 6, 8)),
        kw={"enable_gqa": True})
    add("aten.scaled_dot_product_attention.default", T((4, 6, 8)), T((4, 6, 8)), T((4, 6, 8)),
        rejects=(rej("2", ["(S(1))", "(S(1))", "(S(1))"]),), note="3-D: dim 1 is the sequence")
    # Ring attention off its own axis (these meshes have no axis "cp"): split like attention; its ring
    # on the cp axis is checked against eager in tests/backends/test_context_parallel.py.
    ring = "cp.ring_attention"
    add(ring, q4, q4, q4, None, kw={"axis": "cp", "causal": True, "scale": None},
        rejects=(rej("2", ["(S(2))", "(S(2))", "(S(2))"]),))
    add(ring, q4, q4, q4, T((2, 1, 6, 6)), kw={"axis": "cp", "causal": False, "scale": 0.5, "balanced": True})


def _losses() -> None:
    logits, target = T((4, 6)), T((4,), I64, "index", high=6)
    add("aten.cross_entropy_loss.default", logits, target, None, 2)
    add("aten.cross_entropy_loss.default", logits, target, None, 0)
    add("aten.cross_entropy_loss.default", logits, target)
    add("aten.cross_entropy_loss.default", logits, target, T((6,), fill="positive", grad=False), 2)
    add("aten.cross_entropy_loss.default", logits, target, None, 2, 1, 0.1)
    add("aten.cross_entropy_loss.default", T((4, 6, 2)), T((4, 2), I64, "index", high=6), None, 0)
    add("aten.cross_entropy_loss.default", T((6,)), T((), I64, "index", high=6), None, 0,
        note="an unbatched input: dim 0 is the classes")
    add("aten.nll_loss_nd.default", logits, target, None, 2)
    add("aten.nll_loss_nd.default", logits, target)
    add("aten.nll_loss_nd.default", T((4, 6, 2)), T((4, 2), I64, "index", high=6), T((6,), fill="pow2", grad=False),
        0, 1)
    add("aten.nll_loss.default", logits, target, None, 0, -100)
    x, t = T((4, 6)), T((4, 6))
    for name in ["mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"]:
        add(f"aten.{name}.default", x, t)
        add(f"aten.{name}.default", T((4, 6, 2)), T((4, 6, 2)), 0)
        add(f"aten.{name}.default", x, T((6,), grad=False), 2,
            note="the target broadcasts (torch's gradient of a broadcast target is deprecated)")
    add("aten.smooth_l1_loss.default", x, t, 1, 0.5)
    add("aten.huber_loss.default", x, t, 2, 0.5)
    p, y = T((4, 6), fill="prob"), T((4, 6), fill="prob")
    add("aten.binary_cross_entropy.default", p, y)
    add("aten.binary_cross_entropy.default", p, y, T((6,), fill="pow2", grad=False), 0)
    add("aten.binary_cross_entropy.default", T((4, 6, 2), fill="prob"), T((4, 6, 2), fill="prob"), None, 2)
    add("aten.binary_cross_entropy_with_logits.default", x, y)
    add("aten.binary_cross_entropy_with_logits.default", x, y, T((4, 1), fill="pow2", grad=False),
        T((6,), fill="pow2", grad=False), 0)
    add("aten.binary_cross_entropy_with_logits.default", x, y, None, T((6,), fill="pow2", grad=False), 2)
    add("aten.nll_loss.default", logits, target, T((6,), fill="pow2", grad=False), 2, 3)


def _convolutions() -> None:
    x2 = T((4, 4, 5, 5))
    add("aten.conv2d.default", x2, T((6, 4, 3, 3), param=True), T((6,), param=True), [1, 1], [1, 1])
    add("aten.conv2d.default", x2, T((4, 2, 3, 3)), None, [1, 1], [0, 0], [1, 1], 2)
    add("aten.conv2d.default", T((4, 5, 5)), T((6, 4, 3, 3)), T((6,)), [1, 1], [1, 1],
        rejects=(rej("2", ["(S(0))", "(B)", "(B)"]),), note="unbatched: dim 0 is the channels")
    add("aten.conv2d.default", x2, T((6, 4, 3, 3)), None, [2, 1], [1, 0], [1, 2])
    add("aten.conv1d.default", T((4, 6, 8)), T((4, 6, 3)))
    add("aten.conv1d.default", T((4, 6, 8)), T((4, 3, 3)), T((4,)), [2], [1], [2], 2)
    add("aten.conv3d.default", T((2, 2, 4, 4, 4)), T((4, 2, 3, 3, 3)), T((4,)))
    add("aten.conv3d.default", T((2, 4, 4, 4, 4)), T((4, 2, 3, 3, 3)), None, [1, 2, 1], [1, 1, 0], [2, 1, 1], 2)
    add("aten.convolution.default", x2, T((6, 4, 3, 3)), T((6,)), [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    add("aten.convolution.default", x2, T((4, 2, 3, 3)), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 2,
        rejects=(rej("2", ["(B)", "(S(0))"]),), note="groups=2 is argument 8")
    add("aten.convolution.default", x2, T((4, 6, 3, 3)), T((6,)), [1, 1], [0, 0], [1, 1], True, [0, 0], 1,
        note="transposed: the weight is [in, out, ...]")


def _pools() -> None:
    x = T((4, 6, 4, 4))
    add("aten.max_pool2d.default", x, [2, 2])
    add("aten.max_pool2d.default", T((6, 4, 4)), [2, 2], [1, 1],
        rejects=(rej("2", ["(S(1))"]),), note="unbatched: dim 1 is spatial")
    add("aten.max_pool2d.default", x, [2, 2], [1, 1], [1, 1], [2, 2], True)
    add("aten.max_pool2d_with_indices.default", x, [2, 2])
    add("aten.max_pool2d_with_indices.default", x, [2, 2], [1, 1], [1, 1], [2, 2], True)
    add("aten.avg_pool2d.default", x, [2, 2])
    add("aten.avg_pool2d.default", x, [3, 3], [2, 2], [1, 1], True, False, 2)
    add("aten.avg_pool2d.default", T((6, 4, 4)), [2, 2], rejects=(rej("2", ["(S(1))"]),))
    add("aten.adaptive_avg_pool2d.default", x, [1, 1])
    add("aten.max_pool1d.default", T((4, 6, 8)), [2])
    add("aten.max_pool1d.default", T((6, 8)), [2], rejects=(rej("2", ["(S(1))"]),))
    add("aten.max_pool1d.default", T((4, 6, 8)), [3], [2], [1], [2], True)
    add("aten.avg_pool1d.default", T((4, 6, 8)), [2])
    add("aten.avg_pool1d.default", T((4, 6, 8)), [3], [2], [1], True, False)
    add("aten.adaptive_avg_pool1d.default", T((4, 6, 8)), [2])


for _group in (_elementwise_unary, _conversions, _elementwise_binary, _reductions, _reshapes, _slicing,
               _factories, _matmuls, _lookups, _normalisations, _attention, _losses, _convolutions, _pools):
    _group()
