"""Shape and indexing ONNX ops: Shape, Reshape, Slice, Gather, Concat, Split, Pad, Constant...

Where ONNX passes configuration (targets, bounds, axes) as tensors, converters read them as
Python values at conversion time (:meth:`NodeContext.static`) so the torch graph is static;
the torch helpers also accept run-time tensors, for eager use.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F

from frontend.onnx.dtypes import sparse_to_dense, tensor_from_numpy, torch_dtype
from frontend.onnx.ops import shape_values as sv
from frontend.onnx.ops.common import int_list, scalar
from frontend.onnx.registry import NodeContext, Value, converter, normalize_axis, prod


# ----- Shape / Size -----------------------------------------------------------------------
def _shape_bounds(ctx: NodeContext) -> tuple[int, int | None]:
    if ctx.since < 15:
        return 0, None
    return ctx.attr("start"), ctx.attr("end")


@converter("Shape")
def convert_shape(ctx: NodeContext) -> Value:
    """Shape: a constant when the input's shape is static, else a symbolic int list."""
    x = ctx.input(0)
    start, end = _shape_bounds(ctx)
    if x.shape is not None:
        return Value(const=torch.tensor(x.shape[start:end], dtype=torch.int64))
    return sv.emit(ctx, sv.shape_of, x, start, end)


def tensor_size(x: torch.Tensor) -> torch.Tensor:
    """The number of elements as a 0-D int64 tensor."""
    return torch.scalar_tensor(x.numel(), dtype=torch.int64)


@converter("Size")
def convert_size(ctx: NodeContext) -> Value:
    """Size: the element count (a constant when the shape is static)."""
    x = ctx.input(0)
    if x.shape is not None:
        return Value(const=torch.tensor(prod(x.shape), dtype=torch.int64))
    return ctx.call(tensor_size, x)


# ----- Reshape / Flatten / Squeeze / Unsqueeze / Transpose --------------------------------
def resolve_reshape(in_shape: list[Any], target: list[Any], allowzero: int) -> list[Any]:
    """ONNX reshape target -> torch target: 0 copies the input dim (unless allowzero)."""
    if allowzero:
        return list(target)
    return [in_shape[i] if dim == 0 else dim for i, dim in enumerate(target)]


def onnx_reshape(x: torch.Tensor, shape: Any, allowzero: int) -> torch.Tensor:
    """Reshape with ONNX's 0 (copy) and -1 (infer) conventions; ``shape`` may be a tensor."""
    return torch.reshape(x, resolve_reshape(list(x.shape), int_list(shape), allowzero))


@converter("Reshape")
def convert_reshape(ctx: NodeContext) -> Value:
    """Reshape: target from the ``shape`` attribute (opset < 5) or input."""
    x = ctx.input(0)
    allowzero = ctx.attr("allowzero") if ctx.since >= 14 else 0
    target = ctx.attr("shape") if ctx.since < 5 else ctx.static_ints(1)
    if isinstance(target, list) and x.shape is not None:
        return ctx.call(torch.reshape, x, _infer_minus_one(x.shape, resolve_reshape(
            list(x.shape), target, allowzero)))
    if not isinstance(target, list):
        target = ctx.shape_input(1)
    return ctx.call(onnx_reshape, x, target, allowzero)


def _infer_minus_one(in_shape: tuple[int, ...], target: list[int]) -> list[int]:
    if -1 not in target:
        return target
    known = prod([d for d in target if d != -1])
    return [prod(in_shape) // known if d == -1 and known else d for d in target]


def onnx_flatten(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Flatten to 2-D: dims before ``axis`` and from ``axis`` on."""
    shape = list(x.shape)
    return torch.reshape(x, [prod(shape[:axis]), prod(shape[axis:])])


@converter("Flatten")
def convert_flatten(ctx: NodeContext) -> Value:
    """Flatten (negative axis counts from the end)."""
    x = ctx.input(0)
    axis = ctx.attr("axis")
    if x.shape is not None:
        axis = axis + len(x.shape) if axis < 0 else axis
        return ctx.call(torch.reshape, x, [prod(x.shape[:axis]), prod(x.shape[axis:])])
    if axis < 0:
        return ctx.call(_flatten_negative, x, axis)
    return ctx.call(onnx_flatten, x, axis)


def _flatten_negative(x: torch.Tensor, axis: int) -> torch.Tensor:
    return onnx_flatten(x, axis + x.dim())


def _axes(ctx: NodeContext, input_since: int, index: int = 1) -> list[int] | Value | None:
    """Axes from the ``axes`` attribute before ``input_since``, from input ``index`` after."""
    if ctx.since < input_since:
        axes = ctx.attr("axes", None)
        return list(axes) if axes is not None else None
    return ctx.static_ints(index)


def onnx_squeeze(x: torch.Tensor, axes: Any = None) -> torch.Tensor:
    """Remove the listed size-1 axes, or every size-1 axis when ``axes`` is None."""
    if axes is None:
        return torch.squeeze(x)
    dims = tuple(a % x.dim() for a in int_list(axes))
    return torch.squeeze(x, dims)


@converter("Squeeze")
def convert_squeeze(ctx: NodeContext) -> Value:
    """Squeeze: axes attribute before opset 13, input after."""
    data = ctx.shape_input(0)
    axes = _axes(ctx, 13)
    if data.is_shape:
        return sv.emit(ctx, sv.shape_squeeze, data)
    x = ctx.input(0)
    if isinstance(axes, Value):
        return ctx.call(onnx_squeeze, x, axes)
    if x.rank is not None:
        dims = ([i for i, d in enumerate(x.shape) if d == 1] if axes is None
                else [normalize_axis(a, x.rank) for a in axes])
        return ctx.call(torch.squeeze, x, tuple(dims))
    return ctx.call(onnx_squeeze, x, axes)


def onnx_unsqueeze(x: torch.Tensor, axes: Any) -> torch.Tensor:
    """Insert size-1 axes at ``axes`` (positions in the output)."""
    axes = int_list(axes)
    out_rank = x.dim() + len(axes)
    for axis in sorted(a % out_rank for a in axes):
        x = torch.unsqueeze(x, axis)
    return x


@converter("Unsqueeze")
def convert_unsqueeze(ctx: NodeContext) -> Value:
    """Unsqueeze: axes attribute before opset 13, input after."""
    data = ctx.shape_input(0)
    axes = _axes(ctx, 13)
    if data.is_shape:
        return sv.emit(ctx, sv.shape_unsqueeze, data)
    x = ctx.input(0)
    if isinstance(axes, list) and x.shape is not None:
        out_rank = len(x.shape) + len(axes)
        positions = {normalize_axis(a, out_rank) for a in axes}
        dims = iter(x.shape)
        target = [1 if i in positions else next(dims) for i in range(out_rank)]
        return ctx.call(torch.reshape, x, target)
    return ctx.call(onnx_unsqueeze, x, axes)


def reverse_dims(x: torch.Tensor) -> torch.Tensor:
    """Transpose with the default permutation: all axes reversed."""
    return torch.permute(x, tuple(reversed(range(x.dim()))))


@converter("Transpose")
def convert_transpose(ctx: NodeContext) -> Value:
    """Transpose by ``perm`` (default: reverse the axes)."""
    x = ctx.input(0)
    perm = ctx.attr("perm")
    if perm is None and x.rank is not None:
        perm = list(reversed(range(x.rank)))
    if perm is None:
        return ctx.call(reverse_dims, x)
    return ctx.call(torch.permute, x, tuple(perm))


# ----- Concat / Split ---------------------------------------------------------------------
@converter("Concat")
def convert_concat(ctx: NodeContext) -> Value:
    """Concat; symbolic shape lists concatenate as Python lists."""
    raw = [ctx.shape_input(i) for i in range(len(ctx.inputs)) if ctx.has_input(i)]
    if any(v.is_shape for v in raw) and all(sv.is_shape_operand(v) for v in raw):
        return sv.emit(ctx, sv.shape_concat, *[sv.as_shape_arg(v) for v in raw])
    tensors = [ctx.input(i) for i in range(len(ctx.inputs)) if ctx.has_input(i)]
    return ctx.call(torch.cat, tensors, ctx.attr("axis"))


def split_sizes(dim: int, parts: int) -> list[int]:
    """ONNX's split of ``dim`` into ``parts``: equal, the last one smaller when uneven."""
    chunk = -(-dim // parts)
    return [chunk] * (parts - 1) + [dim - chunk * (parts - 1)]


def onnx_split(x: torch.Tensor, axis: int, sizes: Any, parts: int) -> tuple[torch.Tensor, ...]:
    """Split along ``axis`` into ``sizes`` (a list or tensor), or into ``parts`` near-equal."""
    sizes = split_sizes(x.shape[axis], parts) if sizes is None else int_list(sizes)
    return torch.split(x, sizes, dim=axis)


@converter("Split")
def convert_split(ctx: NodeContext) -> list[Value]:
    """Split: sizes from the attribute (< 13) or input (>= 13); else into equal parts."""
    x = ctx.input(0)
    axis = ctx.attr("axis")
    sizes = ctx.attr("split", None) if ctx.since < 13 else ctx.static_ints(1)
    parts = ctx.attr("num_outputs", None) or ctx.num_outputs
    if sizes is None and x.shape is not None:
        sizes = split_sizes(x.shape[axis], parts)
    if isinstance(sizes, list) and not sizes:
        sizes = None
    if isinstance(sizes, list):
        return ctx.call_multi(torch.split, x, sizes, axis, num_results=ctx.num_outputs)
    return ctx.call_multi(onnx_split, x, axis, sizes, parts, num_results=ctx.num_outputs)


# ----- Slice ------------------------------------------------------------------------------
def _clamp(value: Any, low: Any, high: Any) -> Any:
    return max(low, min(value, high))


def slice_bounds(dim: Any, start: int, end: int, step: int) -> tuple[Any, Any]:
    """ONNX Slice start/end for one axis after negative-index and clamping rules."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        return _clamp(start, 0, dim), _clamp(end, 0, dim)
    return _clamp(start, 0, dim - 1), _clamp(end, -1, dim - 1)


def onnx_slice(x: torch.Tensor, starts: Any, ends: Any, axes: Any = None, steps: Any = None
               ) -> torch.Tensor:
    """ONNX Slice: per-axis start/end/step with clamping; negative steps walk backwards."""
    starts, ends = int_list(starts), int_list(ends)
    axes = list(range(len(starts))) if axes is None else int_list(axes)
    steps = [1] * len(starts) if steps is None else int_list(steps)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = axis % x.dim()
        dim = x.shape[axis]
        if dim == 0:
            continue
        begin, stop = slice_bounds(dim, start, end, step)
        index = [slice(None)] * x.dim()
        if step > 0:
            index[axis] = slice(begin, stop, step)
            x = x[tuple(index)]
        else:  # walk the flipped axis forward
            index[axis] = slice(dim - 1 - begin, dim - 1 - stop, -step)
            x = torch.flip(x, (axis,))[tuple(index)]
    return x


def _slice_args(ctx: NodeContext) -> tuple[Any, Any, Any, Any]:
    if ctx.since < 10:
        starts, ends = ctx.attr("starts"), ctx.attr("ends")
        axes = ctx.attr("axes", None)
        return list(starts), list(ends), list(axes) if axes else None, None
    return tuple(ctx.static_ints(i) for i in range(1, 5))


@converter("Slice")
def convert_slice(ctx: NodeContext) -> Value:
    """Slice: bounds from attributes (opset < 10) or inputs; static ones become x[a:b:c]."""
    data = ctx.shape_input(0)
    starts, ends, axes, steps = _slice_args(ctx)
    config = (starts, ends, axes, steps)
    static = not any(isinstance(v, Value) for v in config)
    if data.is_shape and static and len(starts) == 1:
        return sv.emit(ctx, sv.shape_slice, data, starts[0], ends[0], (steps or [1])[0])
    x = ctx.input(0)
    if static and x.shape is not None:
        index = _static_slice_index(x.shape, starts, ends, axes, steps)
        if index is not None:
            return ctx.call(operator.getitem, x, index)
    runtime = [ctx.shape_input(i) if isinstance(v, Value) else v
               for i, v in zip(range(1, 5), config, strict=True)]
    return ctx.call(onnx_slice, x, *runtime)


def _static_slice_index(shape: tuple[int, ...], starts: list[int], ends: list[int],
                        axes: list[int] | None, steps: list[int] | None) -> tuple | None:
    """x[...] index for a positive-step slice of a static shape (None for negative steps)."""
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index: list[slice] = [slice(None)] * len(shape)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = normalize_axis(axis, len(shape))
        if step < 0:
            return None
        begin, stop = slice_bounds(shape[axis], start, end, step)
        index[axis] = slice(begin, max(begin, stop), step)
    while index and index[-1] == slice(None):
        index.pop()
    return tuple(index)


# ----- Gather / Scatter -------------------------------------------------------------------
def _positive_indices(indices: torch.Tensor, dim: Any) -> torch.Tensor:
    return torch.where(indices < 0, indices + dim, indices)


def onnx_gather(data: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    """Gather slices of ``data`` along ``axis`` at ``indices`` (negative ones count back)."""
    axis = axis % data.dim()
    indices = _positive_indices(indices.to(torch.int64), data.shape[axis])
    picked = torch.index_select(data, axis, indices.reshape(-1))
    shape = list(data.shape)
    return torch.reshape(picked, shape[:axis] + list(indices.shape) + shape[axis + 1:])


@converter("Gather")
def convert_gather(ctx: NodeContext) -> Value:
    """Gather; a constant scalar index becomes torch.select, a shape list Python indexing."""
    data = ctx.shape_input(0)
    axis = ctx.attr("axis")
    indices = ctx.input(1)
    if data.is_shape and indices.const is not None:
        return sv.emit(ctx, sv.shape_gather, data, indices.const.tolist())
    data = ctx.input(0)
    if indices.const is not None and indices.const.dim() == 0 and data.rank is not None:
        return ctx.call(torch.select, data, normalize_axis(axis, data.rank),
                        int(indices.const))
    return ctx.call(onnx_gather, data, indices, axis)


def gather_elements(data: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    """GatherElements: torch.gather with negative indices allowed."""
    axis = axis % data.dim()
    return torch.gather(data, axis, _positive_indices(indices.to(torch.int64), data.shape[axis]))


@converter("GatherElements")
def convert_gather_elements(ctx: NodeContext) -> Value:
    """GatherElements along ``axis``."""
    return ctx.call(gather_elements, ctx.input(0), ctx.input(1), ctx.attr("axis"))


def _nd_linear_index(shape: list[Any], indices: torch.Tensor) -> torch.Tensor:
    """Row-major linear index into ``shape[:k]`` of k-tuples in the last axis of ``indices``."""
    k = indices.shape[-1]
    linear = torch.zeros(indices.shape[:-1], dtype=torch.int64, device=indices.device)
    for j in range(k):
        linear = linear * shape[j] + _positive_indices(indices[..., j], shape[j])
    return linear


def gather_nd(data: torch.Tensor, indices: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """GatherND: index tuples (last axis of ``indices``) into ``data`` after batch dims."""
    indices = indices.to(torch.int64)
    batch_shape = list(data.shape[:batch_dims])
    batch = prod(batch_shape)
    k = indices.shape[-1]
    inner = list(data.shape[batch_dims:])
    flat_data = data.reshape([batch, prod(inner[:k])] + inner[k:])
    linear = _nd_linear_index(inner, indices.reshape([batch] + list(indices.shape[batch_dims:])))
    rows = torch.arange(batch, device=data.device).reshape([batch] + [1] * (linear.dim() - 1))
    picked = flat_data[rows, linear]
    return picked.reshape(list(indices.shape[:-1]) + inner[k:])


@converter("GatherND")
def convert_gather_nd(ctx: NodeContext) -> Value:
    """GatherND (batch_dims from opset 12)."""
    batch_dims = ctx.attr("batch_dims") if ctx.since >= 12 else 0
    return ctx.call(gather_nd, ctx.input(0), ctx.input(1), batch_dims)


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def scatter_elements(data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor,
                     axis: int, reduction: str) -> torch.Tensor:
    """ScatterElements with an optional reduction (none, add, mul, max, min)."""
    axis = axis % data.dim()
    indices = _positive_indices(indices.to(torch.int64), data.shape[axis])
    if reduction == "none":
        return torch.scatter(data, axis, indices, updates)
    return torch.scatter_reduce(data, axis, indices, updates, _SCATTER_REDUCE[reduction])


@converter("ScatterElements", "Scatter")
def convert_scatter_elements(ctx: NodeContext) -> Value:
    """ScatterElements (and the deprecated Scatter)."""
    reduction = ctx.attr("reduction", "none")
    return ctx.call(scatter_elements, ctx.input(0), ctx.input(1), ctx.input(2),
                    ctx.attr("axis"), reduction)


def scatter_nd(data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor,
               reduction: str) -> torch.Tensor:
    """ScatterND: write (or reduce) ``updates`` at index tuples into a copy of ``data``."""
    indices = indices.to(torch.int64)
    k = indices.shape[-1]
    shape = list(data.shape)
    flat_data = data.reshape([prod(shape[:k])] + shape[k:])
    linear = _nd_linear_index(shape, indices).reshape(-1)
    flat_updates = updates.reshape([linear.shape[0]] + shape[k:])
    index = linear.reshape([-1] + [1] * (len(shape) - k)).expand(flat_updates.shape)
    if reduction == "none":
        result = torch.scatter(flat_data, 0, index, flat_updates)
    else:
        result = torch.scatter_reduce(flat_data, 0, index, flat_updates,
                                      _SCATTER_REDUCE[reduction])
    return result.reshape(shape)


@converter("ScatterND")
def convert_scatter_nd(ctx: NodeContext) -> Value:
    """ScatterND with an optional reduction."""
    return ctx.call(scatter_nd, ctx.input(0), ctx.input(1), ctx.input(2),
                    ctx.attr("reduction", "none"))


# ----- Expand / Tile / ConstantOfShape / Range / Constant ---------------------------------
def onnx_expand(x: torch.Tensor, shape: Any) -> torch.Tensor:
    """Expand with ONNX's two-way broadcasting (a 1 in ``shape`` keeps x's dim)."""
    target = torch.broadcast_shapes(tuple(x.shape), tuple(int_list(shape)))
    return torch.broadcast_to(x, target)


@converter("Expand")
def convert_expand(ctx: NodeContext) -> Value:
    """Expand; the target shape is resolved at conversion when shapes are static."""
    x = ctx.input(0)
    shape = ctx.static_ints(1)
    if isinstance(shape, list) and x.shape is not None:
        return ctx.call(torch.broadcast_to, x, torch.broadcast_shapes(x.shape, tuple(shape)))
    return ctx.call(onnx_expand, x, shape if isinstance(shape, list) else ctx.shape_input(1))


def onnx_tile(x: torch.Tensor, repeats: Any) -> torch.Tensor:
    """Tile: repeat ``x`` along each axis."""
    return torch.tile(x, tuple(int_list(repeats)))


@converter("Tile")
def convert_tile(ctx: NodeContext) -> Value:
    """Tile by the ``repeats`` input."""
    repeats = ctx.static_ints(1)
    if isinstance(repeats, list):
        return ctx.call(torch.tile, ctx.input(0), tuple(repeats))
    return ctx.call(onnx_tile, ctx.input(0), ctx.shape_input(1))


def constant_of_shape(shape: Any, value: float | int | bool, dtype: torch.dtype
                      ) -> torch.Tensor:
    """A tensor of ``shape`` filled with ``value``."""
    return torch.full(tuple(int_list(shape)), value, dtype=dtype)


@converter("ConstantOfShape")
def convert_constant_of_shape(ctx: NodeContext) -> Value:
    """ConstantOfShape (default value: float32 zero); folds when the shape is static."""
    value = ctx.attr("value")
    fill = value.reshape(-1)[0].item() if value is not None else 0.0
    dtype = value.dtype if value is not None else torch.float32
    shape = ctx.static_ints(0)
    if isinstance(shape, Value):
        shape = ctx.shape_input(0)
    return ctx.call(constant_of_shape, shape, fill, dtype)


def onnx_range(start: Any, limit: Any, delta: Any, dtype: torch.dtype) -> torch.Tensor:
    """Range: ``start + i * delta`` for i < max(ceil((limit - start) / delta), 0)."""
    start, limit, delta = scalar(start), scalar(limit), scalar(delta)
    if all(isinstance(v, (int, torch.SymInt)) for v in (start, limit, delta)):
        count = torch.sym_max(-((start - limit) // delta), 0)  # integer ceil: no float guard
    else:
        count = max(math.ceil((limit - start) / delta), 0)
    if dtype.is_floating_point:  # compute in double, as ONNX's stash_type does
        steps = torch.arange(count, dtype=torch.float64)
        return (start + steps * delta).to(dtype)
    return start + torch.arange(count, dtype=dtype) * delta


@converter("Range")
def convert_range(ctx: NodeContext) -> Value:
    """Range; folds to a constant when start, limit and delta are constants."""
    dtype = ctx.shape_input(0).dtype
    if dtype is None:
        return ctx.call(_range_like, *[ctx.input(i) for i in range(3)])
    # constants as numbers; symbolic shape values stay ints; other run-time values tensors
    args = [ctx.static(i) for i in range(3)]
    args = [a if not isinstance(a, Value) else (a if a.is_shape else ctx.input(i))
            for i, a in enumerate(args)]
    return ctx.call(onnx_range, *args, dtype)


def _range_like(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return onnx_range(start, limit, delta, start.dtype)


_CONSTANT_ATTRS = {"value_float": torch.float32, "value_floats": torch.float32,
                   "value_int": torch.int64, "value_ints": torch.int64}


@converter("Constant")
def convert_constant(ctx: NodeContext) -> Value:
    """Constant from any of its value_* attributes (strings are not supported)."""
    if ctx.has_attr("value"):
        return Value(const=ctx.attr("value"))
    for name, dtype in _CONSTANT_ATTRS.items():
        if ctx.has_attr(name):
            return Value(const=torch.tensor(ctx.attr(name), dtype=dtype))
    if ctx.has_attr("sparse_value"):
        proto = next(a.sparse_tensor for a in ctx.node.attribute if a.name == "sparse_value")
        return Value(const=tensor_from_numpy(sparse_to_dense(proto, ctx.builder.base_dir)))
    raise ctx.unsupported("string constants have no torch equivalent", dtype="STRING")


# ----- Pad --------------------------------------------------------------------------------
def _pad_index(size: Any, before: int, after: int, mode: str, device: torch.device
               ) -> torch.Tensor:
    positions = torch.arange(-before, size + after, device=device)
    if mode == "edge":
        return positions.clamp(0, size - 1)
    if mode == "wrap":
        return positions.remainder(size)
    period = 2 * (size - 1)  # reflect: mirror without repeating the edge
    if period == 0:
        return torch.zeros_like(positions)
    folded = positions.remainder(period)
    return torch.where(folded >= size, period - folded, folded)


def onnx_pad(x: torch.Tensor, pads: Any, value: Any, mode: str, axes: Any = None
             ) -> torch.Tensor:
    """Pad (constant, reflect, edge, wrap); negative pads crop; ``axes`` limits the pads."""
    pads = int_list(pads)
    rank = x.dim()
    axes = list(range(rank)) if axes is None else [a % rank for a in int_list(axes)]
    count = len(axes)
    befores = dict(zip(axes, pads[:count], strict=True))
    afters = dict(zip(axes, pads[count:], strict=True))
    if mode == "constant":
        torch_pads: list[Any] = []
        for axis in reversed(range(rank)):
            torch_pads += [befores.get(axis, 0), afters.get(axis, 0)]
        fill = 0 if value is None else scalar(value)
        return F.pad(x, torch_pads, value=fill)
    for axis in axes:
        before, after = befores[axis], afters[axis]
        # crop first for negative pads, then gather the padded positions
        x = x.narrow(axis, max(-before, 0), x.shape[axis] - max(-before, 0) - max(-after, 0))
        index = _pad_index(x.shape[axis], max(before, 0), max(after, 0), mode, x.device)
        x = torch.index_select(x, axis, index)
    return x


@converter("Pad")
def convert_pad(ctx: NodeContext) -> Value:
    """Pad: pads/value attributes before opset 11, inputs after (axes from opset 18)."""
    x = ctx.input(0)
    mode = ctx.attr("mode")
    if ctx.since < 11:
        return ctx.call(onnx_pad, x, list(ctx.attr("pads")), ctx.attr("value"), mode)
    pads = ctx.static_ints(1)
    value = ctx.static(2)
    axes = ctx.static_ints(3) if ctx.since >= 18 else None
    args = [ctx.input(i) if isinstance(a, Value) else a
            for i, a in zip((1, 2, 3), (pads, value, axes), strict=True)]
    return ctx.call(onnx_pad, x, args[0], args[1], mode, args[2])


# ----- DepthToSpace / SpaceToDepth --------------------------------------------------------
def depth_to_space(x: torch.Tensor, blocksize: int, mode: str) -> torch.Tensor:
    """Move channel blocks into spatial blocks (DCR or CRD channel order)."""
    b, c, h, w = x.shape
    bs = blocksize
    if mode == "DCR":
        y = x.reshape(b, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(b, c // (bs * bs), bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(b, c // (bs * bs), h * bs, w * bs)


def space_to_depth(x: torch.Tensor, blocksize: int, mode: str) -> torch.Tensor:
    """Move spatial blocks into channels (DCR or CRD channel order)."""
    b, c, h, w = x.shape
    bs = blocksize
    y = x.reshape(b, c, h // bs, bs, w // bs, bs)
    y = y.permute(0, 3, 5, 1, 2, 4) if mode == "DCR" else y.permute(0, 1, 3, 5, 2, 4)
    return y.reshape(b, c * bs * bs, h // bs, w // bs)


@converter("DepthToSpace", "SpaceToDepth")
def convert_depth_space(ctx: NodeContext) -> Value:
    """DepthToSpace / SpaceToDepth with their ``mode`` attribute."""
    fn = depth_to_space if ctx.op_type == "DepthToSpace" else space_to_depth
    return ctx.call(fn, ctx.input(0), ctx.attr("blocksize"), ctx.attr("mode", "DCR"))


# ----- Trilu / CumSum / OneHot / NonZero / EyeLike ----------------------------------------
def trilu(x: torch.Tensor, k: Any, upper: int) -> torch.Tensor:
    """Upper (triu) or lower (tril) triangle of the last two axes, diagonal offset ``k``."""
    k = int(scalar(k))
    return torch.triu(x, k) if upper else torch.tril(x, k)


@converter("Trilu")
def convert_trilu(ctx: NodeContext) -> Value:
    """Trilu with an optional constant diagonal offset ``k``."""
    k = ctx.static(1)
    k = 0 if k is None else (ctx.input(1) if isinstance(k, Value) else int(scalar(k)))
    upper = ctx.attr("upper")
    if isinstance(k, int):
        return ctx.call(torch.triu if upper else torch.tril, ctx.input(0), k)
    return ctx.call(trilu, ctx.input(0), k, upper)


def onnx_cumsum(x: torch.Tensor, axis: Any, exclusive: int, reverse: int) -> torch.Tensor:
    """Cumulative sum along ``axis``, optionally exclusive and/or from the end."""
    axis = int(scalar(axis)) % x.dim()
    if reverse:
        x = torch.flip(x, (axis,))
    result = torch.cumsum(x, dim=axis, dtype=x.dtype)
    if exclusive:  # shift by one: the first sum is 0
        result = torch.cat([torch.zeros_like(x.narrow(axis, 0, 1)),
                            result.narrow(axis, 0, x.shape[axis] - 1)], dim=axis)
    return torch.flip(result, (axis,)) if reverse else result


@converter("CumSum")
def convert_cumsum(ctx: NodeContext) -> Value:
    """CumSum with exclusive / reverse."""
    axis = ctx.static(1)
    axis = ctx.input(1) if isinstance(axis, Value) else int(scalar(axis))
    return ctx.call(onnx_cumsum, ctx.input(0), axis, ctx.attr("exclusive"),
                    ctx.attr("reverse"))


def one_hot(indices: torch.Tensor, depth: Any, values: torch.Tensor, axis: int
            ) -> torch.Tensor:
    """OneHot: ``values[1]`` where the index matches, ``values[0]`` elsewhere."""
    depth = int(scalar(depth))
    indices = indices.to(torch.int64)
    indices = torch.where(indices < 0, indices + depth, indices)
    rank = indices.dim() + 1
    axis = axis % rank
    classes = torch.arange(depth, device=indices.device).reshape(
        [depth if i == axis else 1 for i in range(rank)])
    hot = torch.unsqueeze(indices, axis) == classes
    return torch.where(hot, values[1], values[0])


@converter("OneHot")
def convert_one_hot(ctx: NodeContext) -> Value:
    """OneHot along ``axis``."""
    depth = ctx.static(1)
    depth = ctx.input(1) if isinstance(depth, Value) else depth
    return ctx.call(one_hot, ctx.input(0), depth, ctx.input(2), ctx.attr("axis"))


def non_zero(x: torch.Tensor) -> torch.Tensor:
    """Indices of the non-zero elements, one row per axis (data-dependent shape)."""
    return torch.nonzero(x).T.contiguous()


@converter("NonZero")
def convert_non_zero(ctx: NodeContext) -> Value:
    """NonZero (eager only: its output shape depends on the data)."""
    return ctx.call(non_zero, ctx.input(0))


def eye_like(x: torch.Tensor, k: int, dtype: torch.dtype | None) -> torch.Tensor:
    """Ones on diagonal ``k`` of a 2-D tensor shaped like ``x``."""
    rows, cols = x.shape
    positions = torch.arange(max(rows, cols), device=x.device)
    diagonal = (positions[:cols].reshape(1, cols) - positions[:rows].reshape(rows, 1)) == k
    return diagonal.to(x.dtype if dtype is None else dtype)


@converter("EyeLike")
def convert_eye_like(ctx: NodeContext) -> Value:
    """EyeLike with optional dtype and diagonal offset."""
    dtype_attr = ctx.attr("dtype", None)
    dtype = None if dtype_attr is None else torch_dtype(dtype_attr, node=ctx.name,
                                                         op_type=ctx.op_type, opset=ctx.opset)
    return ctx.call(eye_like, ctx.input(0), ctx.attr("k"), dtype)


@converter("If")
def convert_if(ctx: NodeContext) -> list[Value]:
    """If with a condition known at conversion time: the taken branch is inlined.

    A run-time condition would need torch.cond with both branches as functions; not supported.
    """
    condition = ctx.static(0)
    if isinstance(condition, Value):
        raise ctx.unsupported("If with a condition computed at run time is not supported; "
                              "only conditions that fold to constants are")
    taken = bool(scalar(condition))
    return ctx.builder.inline_graph(ctx.attr("then_branch" if taken else "else_branch"))
