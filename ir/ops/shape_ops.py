"""View, reshape, transpose, permute, split, slice, cat and friends: splits map through dims."""
from __future__ import annotations

import functools

import sympy

from ir.core import Node
from ir.ops.registry import LocalCall, LocalContext, Signature, all_b, register, default_local
from ir.sbp import B, P, Split



_SYMBOL_PRIMES: dict[str, int] = {}


def _magnitude(d) -> int:
    """A number standing for a dim, to compare symbolic sizes (each symbol name gets its own prime)."""
    if isinstance(d, int):
        return d
    return _magnitude_of(sympy.sympify(d))


@functools.lru_cache(maxsize=65536)
def _magnitude_of(expr: sympy.Expr) -> int:
    subs = {s: _prime_for(str(s)) for s in expr.free_symbols}
    return int(expr.subs(subs))


def _prime_for(name: str) -> int:
    if name not in _SYMBOL_PRIMES:
        _SYMBOL_PRIMES[name] = int(sympy.prime(len(_SYMBOL_PRIMES) + 169))  # primes above 1000
    return _SYMBOL_PRIMES[name]


def reshape_groups(in_shape: tuple, out_shape: tuple) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of input and output dims with equal products (size-1 dims left out)."""
    ins = [i for i, d in enumerate(in_shape) if _magnitude(d) != 1]
    outs = [j for j, d in enumerate(out_shape) if _magnitude(d) != 1]
    groups, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        gi, go = [ins[i]], [outs[j]]
        pi, po = _magnitude(in_shape[ins[i]]), _magnitude(out_shape[outs[j]])
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po and i < len(ins):
                gi.append(ins[i]); pi *= _magnitude(in_shape[ins[i]]); i += 1
            elif po < pi and j < len(outs):
                go.append(outs[j]); po *= _magnitude(out_shape[outs[j]]); j += 1
            else:
                return groups
        groups.append((gi, go))
    return groups


@register("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
          "aten.flatten.using_ints", "aten.unflatten.int",
          doc="a split maps to the outermost dim of its reshape group")
def reshape(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    out = node.outputs[0].type.shape
    sigs = [all_b(node), Signature((P,), (P,))]
    for gi, go in reshape_groups(x.type.shape, out):
        sigs.append(Signature((Split(gi[0]),), (Split(go[0]),)))
    return sigs


def _flatten_local(node: Node, ctx: LocalContext) -> LocalCall:
    shape = list(_local_out(node, ctx))
    return LocalCall("aten.reshape.default", [node.input_values()[0], shape])


def _local_out(node: Node, ctx: LocalContext):
    from ir.ops.registry import local_shape
    return local_shape(node.outputs[0].type, ctx.out_sbps[0], ctx.mesh)


for _op in ("aten.flatten.using_ints", "aten.unflatten.int"):
    from ir.ops.registry import RULES as _R
    _R[_op].local = _flatten_local


@register("aten.transpose.int", doc="swap two dims")
def transpose(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    a, b = (_norm(d, x.type.ndim) for d in node.args[1:3])
    perm = list(range(x.type.ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return _permuted(node, perm)


@register("aten.permute.default", doc="reorder dims")
def permute(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    return _permuted(node, [_norm(d, x.type.ndim) for d in node.args[1]])


@register("aten.t.default", doc="2-D transpose")
def t(node: Node) -> list[Signature]:
    return _permuted(node, [1, 0] if node.input_values()[0].type.ndim == 2 else [0])


def _permuted(node: Node, perm: list[int]) -> list[Signature]:
    sigs = [all_b(node), Signature((P,), (P,))]
    sigs += [Signature((Split(src),), (Split(dst),)) for dst, src in enumerate(perm)]
    return sigs


def _norm(d, ndim: int) -> int:
    d = int(d)
    return d + ndim if d < 0 else d


@register("aten.unsqueeze.default", doc="insert a size-1 dim")
def unsqueeze(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    d = _norm(node.args[1], x.type.ndim + 1)
    return _dim_map(node, {i: (i if i < d else i + 1) for i in range(x.type.ndim)})


@register("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default", doc="drop size-1 dims")
def squeeze(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    kept = [i for i, d in enumerate(x.type.shape) if d != 1 or not _squeezed(node, i, x.type.ndim)]
    return _dim_map(node, {src: dst for dst, src in enumerate(kept)})


def _squeezed(node: Node, i: int, ndim: int) -> bool:
    if node.op == "aten.squeeze.default":
        return True
    dims = node.args[1] if isinstance(node.args[1], list) else [node.args[1]]
    return i in [_norm(d, ndim) for d in dims]


def _squeeze_local(node: Node, ctx: LocalContext) -> LocalCall:
    """Squeeze exactly the dims that are 1 globally: a split dim may hold one row on a rank."""
    x = node.input_values()[0]
    dims = [i for i, d in enumerate(x.type.shape) if d == 1 and _squeezed(node, i, x.type.ndim)]
    return LocalCall("aten.squeeze.dims", [x, dims])


def _dim_map(node: Node, mapping: dict[int, int]) -> list[Signature]:
    x = node.input_values()[0]
    sigs = [all_b(node), Signature((P,), (P,))]
    sigs += [Signature((Split(s),), (Split(d),)) for s, d in mapping.items() if x.type.shape[s] != 1]
    return sigs


@register("aten.expand.default", doc="broadcast size-1 dims; expanded dims may be split from B")
def expand(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    out = node.outputs[0].type.shape
    lead = len(out) - x.type.ndim
    sigs = [all_b(node), Signature((P,), (P,))]
    for d in range(len(out)):
        j = d - lead
        if j >= 0 and x.type.shape[j] == out[d] and out[d] != 1:
            sigs.append(Signature((Split(j),), (Split(d),)))
        elif out[d] != 1:
            sigs.append(Signature((B,), (Split(d),)))
    return sigs


@register("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default",
          "aten.unbind.int", doc="pieces along one dim; other dims may be split")
def split(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    dim = _norm(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), x.type.ndim)
    n_out = len(node.outputs)
    sigs = [all_b(node), Signature((P,), (P,) * n_out)]
    for i in range(x.type.ndim):
        if i != dim:
            out_dim = i if node.op != "aten.unbind.int" or i < dim else i - 1
            sigs.append(Signature((Split(i),), (Split(out_dim),) * n_out))
    return sigs


@register("aten.slice.Tensor", "aten.narrow.default", doc="a range of one dim; others may be split")
def slice_(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, x.type.ndim)
    sigs = [all_b(node), Signature((P,), (P,))]
    sigs += [Signature((Split(i),), (Split(i),)) for i in range(x.type.ndim) if i != dim]
    if node.outputs[0].type.shape[dim] == x.type.shape[dim]:
        sigs.append(Signature((Split(dim),), (Split(dim),)))
    return sigs


def _slice_local(node: Node, ctx: LocalContext) -> LocalCall:
    """A full-range slice of a split dim is the identity on each shard."""
    x = node.input_values()[0]
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, x.type.ndim)
    if any(isinstance(s, Split) and s.dim == dim for s in ctx.in_sbps[0]):
        return LocalCall("aten.alias.default", [x])
    return default_local(node, ctx)


from ir.ops.registry import RULES as _RULES  # noqa: E402
_RULES["aten.slice.Tensor"].local = _slice_local
_RULES["aten.narrow.default"].local = _slice_local
for _op in ("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default"):
    _RULES[_op].local = _squeeze_local


@register("aten.select.int", doc="one index of one dim")
def select(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    dim = _norm(node.args[1], x.type.ndim)
    return _dim_map(node, {i: (i if i < dim else i - 1) for i in range(x.type.ndim) if i != dim})


@register("aten.cat.default", "aten.stack.default", doc="join along one dim; others may be split")
def cat(node: Node) -> list[Signature]:
    ins = node.input_values()
    ndim = node.outputs[0].type.ndim
    dim = _norm(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), ndim)
    sigs = [all_b(node), Signature((P,) * len(ins), (P,))]
    for i in range(ndim):
        if i == dim:
            continue
        in_dim = i if node.op == "aten.cat.default" or i < dim else i - 1
        sigs.append(Signature((Split(in_dim),) * len(ins), (Split(i),)))
    return sigs


@register("aten.pad.default", "aten.constant_pad_nd.default", doc="pad trailing dims; others may be split")
def pad(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    padded = len(node.args[1]) // 2
    keep = range(x.type.ndim - padded)
    sigs = [all_b(node)] + [Signature((Split(i),), (Split(i),)) for i in keep]
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    if node.op == "aten.constant_pad_nd.default":
        value = node.args[2] if len(node.args) > 2 else 0
        mode = "constant"
    if mode != "constant" or not value:
        # Reflect, replicate and circular padding copy entries; zero padding adds zeros: all linear.
        sigs.append(Signature((P,), (P,)))
    return sigs


@register("aten.repeat.default", doc="tile; dims repeated once may be split")
def repeat(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    reps = list(node.args[1])
    lead = len(reps) - x.type.ndim
    sigs = [all_b(node), Signature((P,), (P,))]
    sigs += [Signature((Split(i),), (Split(i + lead),)) for i in range(x.type.ndim) if reps[i + lead] == 1]
    return sigs


@register("aten.diff.default", doc="differences along one dim: linear; other dims may be split")
def diff(node: Node) -> list[Signature]:
    ins = node.input_values()
    ndim = ins[0].type.ndim
    dim = _norm(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1), ndim)
    # prepend / append have the input's shape except along ``dim``, so they split alike.
    sigs = [all_b(node), Signature((P,) * len(ins), (P,))]
    sigs += [Signature((Split(i),) * len(ins), (Split(i),)) for i in range(ndim) if i != dim]
    return sigs


@register("aten.index.Tensor", doc="x[i0, i1, ...] with integer index tensors for the leading dims")
def index(node: Node) -> list[Signature]:
    """Index tensors broadcast together into the leading output dims; x's other dims follow.

    An output dim from the index tensors may be split with them (x broadcast); a dim of x that is
    not indexed may be split with x (indices broadcast); indexing is linear in x.
    """
    from ir.ops.elementwise import aligned_dim
    x, *idx = node.input_values()
    indices = node.args[1]
    sigs = [all_b(node), Signature((P,) + (B,) * len(idx), (P,))]
    if any(i is None for i in indices) or any(v.type.dtype in ("bool", "u8") for v in idx):
        return sigs  # masks and skipped dims move the result dims around; keep the safe layouts
    out = node.outputs[0].type.shape
    lead = len(out) - (x.type.ndim - len(indices))
    for d in range(lead):
        if out[d] != 1:
            idx_sbps = tuple(B if aligned_dim(v.type.shape, out[:lead], d) is None
                             else Split(aligned_dim(v.type.shape, out[:lead], d)) for v in idx)
            sigs.append(Signature((B,) + idx_sbps, (Split(d),)))
    for j in range(len(indices), x.type.ndim):
        sigs.append(Signature((Split(j),) + (B,) * len(idx), (Split(lead + j - len(indices)),)))
    return sigs


FACTORIES = [
    "aten.arange.default", "aten.arange.start", "aten.arange.start_step", "aten.zeros.default",
    "aten.ones.default", "aten.full.default", "aten.empty.memory_format", "aten.new_zeros.default",
    "aten.new_ones.default", "aten.new_full.default", "aten.new_empty.default", "aten.zeros_like.default",
    "aten.ones_like.default", "aten.full_like.default", "aten.scalar_tensor.default",
    "aten.tril.default", "aten.triu.default", "aten.eye.default",
]


@register(*FACTORIES, doc="created tensors are broadcast; *_like follow their input's split")
def factory(node: Node) -> list[Signature]:
    sigs = [all_b(node)]
    ins = node.input_values()
    if node.op.endswith("_like.default") and ins:
        sigs += [Signature((Split(i),), (Split(i),)) for i in range(ins[0].type.ndim)]
    if node.op in ("aten.tril.default", "aten.triu.default"):
        sigs += [Signature((Split(i),), (Split(i),)) for i in range(ins[0].type.ndim - 2)]
        sigs.append(Signature((P,), (P,)))
    return sigs
