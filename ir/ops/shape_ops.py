"""View, reshape, transpose, permute, split, slice, cat and friends: splits map through dims."""
from __future__ import annotations

import functools

import sympy

from ir.core import Node
from ir.ops.registry import (LocalCall, LocalContext, Signature, all_b, default_local, local_shape, register,
                             shard_ranges)
from ir.ops.schema import arg, dim_arg, normalize_dim, with_arg
from ir.sbp import B, P, Split
from ir.types import CONTEXT_AXIS


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
          doc="a split maps to the outermost dim of its reshape group")
def reshape(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    out = node.outputs[0].type.shape
    sigs = [all_b(node), Signature((P,), (P,))]
    for gi, go in reshape_groups(x.type.shape, out):
        sigs.append(Signature((Split(gi[0]),), (Split(go[0]),)))
    return sigs


def _flatten_local(node: Node, ctx: LocalContext) -> LocalCall:
    """flatten / unflatten of a shard: a reshape to the shard's output shape."""
    shape = list(local_shape(node.outputs[0].type, ctx.out_sbps[0], ctx.mesh))
    return LocalCall("aten.reshape.default", [node.input_values()[0], shape])


register("aten.flatten.using_ints", "aten.unflatten.int", local=_flatten_local,
         doc="a reshape: a split maps to the outermost dim of its reshape group")(reshape)


@register("aten.transpose.int", doc="swap two dims")
def transpose(node: Node) -> list[Signature]:
    ndim = node.input_values()[0].type.ndim
    a, b = dim_arg(node, "dim0", ndim), dim_arg(node, "dim1", ndim)
    perm = list(range(ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return _permuted(node, perm)


@register("aten.permute.default", doc="reorder dims")
def permute(node: Node) -> list[Signature]:
    ndim = node.input_values()[0].type.ndim
    return _permuted(node, [normalize_dim(d, ndim) for d in arg(node, "dims")])


@register("aten.t.default", doc="2-D transpose")
def t(node: Node) -> list[Signature]:
    return _permuted(node, [1, 0] if node.input_values()[0].type.ndim == 2 else [0])


@register("aten.numpy_T.default", doc="x.T: every dim reversed")
def numpy_t(node: Node) -> list[Signature]:
    return _permuted(node, list(reversed(range(node.input_values()[0].type.ndim))))


def _permuted(node: Node, perm: list[int]) -> list[Signature]:
    sigs = [all_b(node), Signature((P,), (P,))]
    sigs += [Signature((Split(src),), (Split(dst),)) for dst, src in enumerate(perm)]
    return sigs


@register("aten.unsqueeze.default", doc="insert a size-1 dim")
def unsqueeze(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    d = dim_arg(node, "dim", x.type.ndim + 1)
    return _dim_map(node, {i: (i if i < d else i + 1) for i in range(x.type.ndim)})


def _squeezed_dims(node: Node, requested: list[int] | None) -> list[int]:
    """The input dims a squeeze drops: those of size 1 among ``requested`` (None: all dims)."""
    x = node.input_values()[0]
    return [i for i, d in enumerate(x.type.shape) if d == 1 and (requested is None or i in requested)]


def _requested_dims(node: Node) -> list[int]:
    """The dims a ``squeeze.dim`` / ``squeeze.dims`` names (its ``dim`` is one int or a list)."""
    ndim = node.input_values()[0].type.ndim
    dims = arg(node, "dim")
    return [normalize_dim(d, ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]


def _squeeze_signatures(node: Node, dropped: list[int]) -> list[Signature]:
    x = node.input_values()[0]
    kept = [i for i in range(x.type.ndim) if i not in dropped]
    return _dim_map(node, {src: dst for dst, src in enumerate(kept)})


def _squeeze_all_local(node: Node, ctx: LocalContext) -> LocalCall:
    """Squeeze exactly the dims that are 1 globally: a split dim may hold one row on a rank."""
    return LocalCall("aten.squeeze.dims", [node.input_values()[0], _squeezed_dims(node, None)])


def _squeeze_dims_local(node: Node, ctx: LocalContext) -> LocalCall:
    """Squeeze exactly the named dims that are 1 globally."""
    return LocalCall("aten.squeeze.dims", [node.input_values()[0], _squeezed_dims(node, _requested_dims(node))])


@register("aten.squeeze.default", local=_squeeze_all_local, doc="drop every size-1 dim")
def squeeze_all(node: Node) -> list[Signature]:
    return _squeeze_signatures(node, _squeezed_dims(node, None))


@register("aten.squeeze.dim", "aten.squeeze.dims", local=_squeeze_dims_local,
          doc="drop the named dims that have size 1")
def squeeze_dims(node: Node) -> list[Signature]:
    return _squeeze_signatures(node, _squeezed_dims(node, _requested_dims(node)))


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


def _pieces(node: Node, dim: int, drops_dim: bool) -> list[Signature]:
    """Outputs that are pieces of ``self`` along ``dim`` (which they drop when ``drops_dim``): linear, and
    every other dim may be split. Other tensor inputs (``tensor_split``'s index tensor) stay broadcast."""
    x, *rest = node.input_values()
    n_out, others = len(node.outputs), (B,) * len(rest)
    sigs = [all_b(node), Signature((P,) + others, (P,) * n_out)]
    for i in range(x.type.ndim):
        if i != dim:
            out_dim = i - 1 if drops_dim and i > dim else i
            sigs.append(Signature((Split(i),) + others, (Split(out_dim),) * n_out))
    return sigs


@register("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default", "aten.tensor_split.sections",
          "aten.tensor_split.indices", "aten.tensor_split.tensor_indices_or_sections",
          doc="pieces along one dim; other dims may be split")
def split(node: Node) -> list[Signature]:
    return _pieces(node, dim_arg(node, "dim", node.input_values()[0].type.ndim), drops_dim=False)


@register("aten.unbind.int", doc="every index of one dim, that dim dropped; other dims may be split")
def unbind(node: Node) -> list[Signature]:
    return _pieces(node, dim_arg(node, "dim", node.input_values()[0].type.ndim), drops_dim=True)


def _slice_dim(node: Node) -> int:
    return dim_arg(node, "dim", node.input_values()[0].type.ndim)


def _slice_local(node: Node, ctx: LocalContext) -> LocalCall:
    """A full-range slice of a split dim is the identity on each shard."""
    dim = _slice_dim(node)
    if any(isinstance(s, Split) and s.dim == dim for s in ctx.in_sbps[0]):
        return LocalCall("aten.alias.default", [node.input_values()[0]])
    return default_local(node, ctx)


@register("aten.slice.Tensor", "aten.narrow.default", local=_slice_local,
          doc="a range of one dim; others may be split")
def slice_(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    dim = _slice_dim(node)
    sigs = [all_b(node), Signature((P,), (P,))]
    sigs += [Signature((Split(i),), (Split(i),)) for i in range(x.type.ndim) if i != dim]
    if node.outputs[0].type.shape[dim] == x.type.shape[dim]:
        sigs.append(Signature((Split(dim),), (Split(dim),)))
    return sigs


def _scattered(node: Node, dim: int, src_drops_dim: bool) -> list[Signature]:
    """``self`` with a part along ``dim`` replaced by ``src`` (which lacks ``dim`` when ``src_drops_dim``):
    linear in both together; every other dim may be split in both."""
    x = node.input_values()[0]
    sigs = [all_b(node), Signature((P, P), (P,))]
    for i in range(x.type.ndim):
        if i != dim:
            src_dim = i - 1 if src_drops_dim and i > dim else i
            sigs.append(Signature((Split(i), Split(src_dim)), (Split(i),)))
    return sigs


@register("aten.slice_scatter.default", doc="a range of one dim replaced; other dims may be split")
def slice_scatter(node: Node) -> list[Signature]:
    return _scattered(node, dim_arg(node, "dim", node.input_values()[0].type.ndim), src_drops_dim=False)


@register("aten.select_scatter.default", doc="one index of one dim replaced; other dims may be split")
def select_scatter(node: Node) -> list[Signature]:
    return _scattered(node, dim_arg(node, "dim", node.input_values()[0].type.ndim), src_drops_dim=True)


@register("aten.select.int", doc="one index of one dim")
def select(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    dim = dim_arg(node, "dim", x.type.ndim)
    return _dim_map(node, {i: (i if i < dim else i - 1) for i in range(x.type.ndim) if i != dim})


def _joined(node: Node, dim: int, inserts_dim: bool) -> list[Signature]:
    """Inputs joined along output dim ``dim`` (a new dim when ``inserts_dim``); others may be split."""
    ins = node.input_values()
    sigs = [all_b(node), Signature((P,) * len(ins), (P,))]
    for i in range(node.outputs[0].type.ndim):
        if i != dim:
            in_dim = i - 1 if inserts_dim and i > dim else i
            sigs.append(Signature((Split(in_dim),) * len(ins), (Split(i),)))
    return sigs


@register("aten.cat.default", doc="join along one dim; others may be split")
def cat(node: Node) -> list[Signature]:
    return _joined(node, dim_arg(node, "dim", node.outputs[0].type.ndim), inserts_dim=False)


@register("aten.stack.default", doc="join along a new dim; others may be split")
def stack(node: Node) -> list[Signature]:
    return _joined(node, dim_arg(node, "dim", node.outputs[0].type.ndim), inserts_dim=True)


def _padded(node: Node, linear: bool) -> list[Signature]:
    """Padding of trailing dims (two ``pad`` entries per dim); the other dims may be split."""
    x = node.input_values()[0]
    padded = len(arg(node, "pad")) // 2
    sigs = [all_b(node)] + [Signature((Split(i),), (Split(i),)) for i in range(x.type.ndim - padded)]
    if linear:
        sigs.append(Signature((P,), (P,)))
    return sigs


@register("aten.pad.default", doc="pad trailing dims; others may be split")
def pad(node: Node) -> list[Signature]:
    # Reflect, replicate and circular padding copy entries; zero padding adds zeros: all linear.
    return _padded(node, linear=arg(node, "mode") != "constant" or not arg(node, "value"))


@register("aten.constant_pad_nd.default", doc="pad trailing dims with a constant; others may be split")
def constant_pad_nd(node: Node) -> list[Signature]:
    return _padded(node, linear=not arg(node, "value"))


@register("aten.repeat.default", doc="tile; dims repeated once may be split")
def repeat(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    reps = list(arg(node, "repeats"))
    lead = len(reps) - x.type.ndim
    sigs = [all_b(node), Signature((P,), (P,))]
    sigs += [Signature((Split(i),), (Split(i + lead),)) for i in range(x.type.ndim) if reps[i + lead] == 1]
    return sigs


def _repeat_interleave_dim(node: Node) -> int | None:
    """The dim whose entries repeat, or None when the input is flattened first."""
    dim = arg(node, "dim")
    return None if dim is None else dim_arg(node, "dim", node.input_values()[0].type.ndim)


def _repeat_interleave_local(node: Node, ctx: LocalContext) -> LocalCall:
    """``output_size`` is the global size of the repeated dim: a shard gets its local size."""
    if arg(node, "output_size") is None:
        return default_local(node, ctx)
    dim = _repeat_interleave_dim(node)
    size = local_shape(node.outputs[0].type, ctx.out_sbps[0], ctx.mesh)[0 if dim is None else dim]
    args, kwargs = with_arg(node, "output_size", size)
    return LocalCall(node.op, args, kwargs)


@register("aten.repeat_interleave.self_int", local=_repeat_interleave_local,
          doc="each entry repeated in place: every dim may be split, the repeated one too")
def repeat_interleave(node: Node) -> list[Signature]:
    """A shard's entries repeat into a contiguous block of the output, so splits map dim to dim; without
    ``dim`` the input is flattened first, and only a split of its leading dim stays contiguous."""
    x = node.input_values()[0]
    dim = _repeat_interleave_dim(node)
    sigs = [all_b(node), Signature((P,), (P,))]
    if dim is None:
        return sigs + ([Signature((Split(0),), (Split(0),))] if x.type.ndim > 0 else [])
    return sigs + [Signature((Split(i),), (Split(i),)) for i in range(x.type.ndim)]


@register("aten.diff.default", doc="differences along one dim: linear; other dims may be split")
def diff(node: Node) -> list[Signature]:
    ins = node.input_values()
    ndim = ins[0].type.ndim
    dim = dim_arg(node, "dim", ndim)
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
    indices = arg(node, "indices")
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


@register("aten.index_put.default", doc="x[i0, i1, ...] = values with integer index tensors for the leading dims")
def index_put(node: Node) -> list[Signature]:
    """The indices pick data-dependent positions of the indexed (leading) dims, so those stay whole; a dim of
    x that is not indexed may be split with x and the matching dim of ``values`` (indices broadcast; ``values``
    broadcast where it has no such dim or size 1). With ``accumulate`` the op adds ``values`` at the positions:
    linear in x and values together."""
    x, *idx, values = node.input_values()
    indices = arg(node, "indices")
    sigs = [all_b(node)]
    if arg(node, "accumulate"):
        sigs.append(Signature((P,) + (B,) * len(idx) + (P,), (P,)))
    if any(i is None for i in indices) or any(v.type.dtype in ("bool", "u8") for v in idx):
        return sigs  # masks and skipped dims move the indexed dims around; keep the safe layouts
    for j in range(len(indices), x.type.ndim):
        k = values.type.ndim - (x.type.ndim - j)  # values broadcast against x's trailing dims
        same = k >= 0 and _magnitude(values.type.shape[k]) == _magnitude(x.type.shape[j])
        sigs.append(Signature((Split(j),) + (B,) * len(idx) + (Split(k) if same else B,), (Split(j),)))
    return sigs


@register("aten.scatter.value", doc="x with a scalar written at index's positions along one dim; other dims split")
def scatter_value(node: Node) -> list[Signature]:
    """``out[..., index[i], ...] = value`` along ``dim``: the positions along ``dim`` are data-dependent, so it
    stays whole; another dim may be split in x and index alike where index spans all of it (each rank writes
    its own rows)."""
    x, positions = node.input_values()
    dim = dim_arg(node, "dim", x.type.ndim)
    return [all_b(node)] + [Signature((Split(i), Split(i)), (Split(i),)) for i in range(x.type.ndim)
                            if i != dim and _magnitude(positions.type.shape[i]) == _magnitude(x.type.shape[i])]


FACTORIES = [
    "aten.arange.default", "aten.arange.start", "aten.arange.start_step", "aten.zeros.default",
    "aten.ones.default", "aten.full.default", "aten.empty.memory_format", "aten.new_zeros.default",
    "aten.new_ones.default", "aten.new_full.default", "aten.new_empty.default", "aten.scalar_tensor.default",
    "aten.eye.default",
]
LIKE_FACTORIES = ["aten.zeros_like.default", "aten.ones_like.default", "aten.full_like.default", "aten.fill.Scalar",
                  "aten.empty_like.default"]


@register(*FACTORIES, doc="created tensors are broadcast (new_* read only their input's dtype and device)")
def factory(node: Node) -> list[Signature]:
    return [all_b(node)]


def _arange_on_axis(node: Node, axis: str) -> list[Signature]:
    """Positions on sequence shards: on the context-parallel axis each rank makes its block of the range."""
    return [Signature((), (Split(0),))] if axis == CONTEXT_AXIS else []


def _arange_block(node: Node, ctx: LocalContext, start) -> LocalCall:
    """The rank's block of a range beginning at ``start`` (step 1), or the whole range when not split."""
    out = node.outputs[0].type
    if not any(isinstance(s, Split) for s in ctx.out_sbps[0]):
        return default_local(node, ctx)
    ranges = shard_ranges(out, ctx.out_sbps[0], ctx.mesh, 0, ctx.sequences)
    return LocalCall("kernels.arange_shard", [start, [list(r) for r in ranges]], dict(node.kwargs))


def _arange_end_local(node: Node, ctx: LocalContext) -> LocalCall:
    return _arange_block(node, ctx, 0)


def _arange_start_local(node: Node, ctx: LocalContext) -> LocalCall:
    return _arange_block(node, ctx, arg(node, "start"))


register("aten.arange.default", local=_arange_end_local, on_axis=_arange_on_axis,
         doc="created broadcast; on the cp axis, each rank's block of the range (positions of sequence shards)")(factory)
register("aten.arange.start", local=_arange_start_local, on_axis=_arange_on_axis,
         doc="created broadcast; on the cp axis, each rank's block of the range (positions of sequence shards)")(factory)


@register(*LIKE_FACTORIES, doc="a constant (or, empty_like, uninitialised) tensor of the input's shape: follows the "
                              "input's split")
def like_factory(node: Node) -> list[Signature]:
    return [all_b(node)] + [Signature((Split(i),), (Split(i),)) for i in range(node.input_values()[0].type.ndim)]


@register("aten.tril.default", "aten.triu.default", doc="masks the last two dims: linear; batch dims may be split")
def triangle(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    sigs = [all_b(node), Signature((P,), (P,))]
    return sigs + [Signature((Split(i),), (Split(i),)) for i in range(x.type.ndim - 2)]
