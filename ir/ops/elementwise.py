"""Elementwise ops: splits follow broadcasting; partial values flow only through linear ones."""
from __future__ import annotations

from ir.core import Node
from ir.ops.registry import Signature, all_b, register
from ir.ops.schema import arg
from ir.sbp import B, P, Split


def aligned_dim(in_shape: tuple, out_shape: tuple, out_dim: int) -> int | None:
    """The input dim that broadcasts onto ``out_dim`` without being expanded, or None."""
    j = out_dim - (len(out_shape) - len(in_shape))
    if j < 0 or in_shape[j] != out_shape[out_dim]:
        return None
    return j


def split_signatures(node: Node) -> list[Signature]:
    """All-B, plus for each output dim: inputs split on their aligned dim (B where broadcast)."""
    ins = node.input_values()
    out = node.outputs[0].type.shape
    sigs = [all_b(node)]
    for d in range(len(out)):
        if out[d] == 1:
            continue
        in_sbps = []
        for v in ins:
            j = aligned_dim(v.type.shape, out, d)
            in_sbps.append(Split(j) if j is not None else B)
        sigs.append(Signature(tuple(in_sbps), tuple(Split(d) for _ in node.outputs)))
    return sigs


def is_scalar_tensor(v) -> bool:
    """Zero-dim constants and inputs are always broadcast (computed scalars may be partial)."""
    return v.type.ndim == 0 and v.kind != "node"


UNARY_NONLINEAR = [
    "aten.gelu.default", "aten.tanh.default", "aten.relu.default", "aten.silu.default",
    "aten.sigmoid.default", "aten.exp.default", "aten.log.default", "aten.sqrt.default",
    "aten.rsqrt.default", "aten.cos.default", "aten.sin.default", "aten.abs.default",
    "aten.pow.Tensor_Scalar", "aten.erf.default", "aten.reciprocal.default", "aten.logical_not.default",
    "aten.ne.Scalar", "aten.eq.Scalar", "aten.lt.Scalar", "aten.gt.Scalar", "aten.le.Scalar",
    "aten.ge.Scalar", "aten.bitwise_not.default", "aten.floor.default", "aten.ceil.default",
    "aten.hardtanh.default", "aten.leaky_relu.default", "aten.elu.default", "aten.softplus.default",
    "aten.clamp.default", "aten.clamp_min.default", "aten.clamp_max.default", "aten.sign.default",
    "aten.log1p.default", "aten.expm1.default", "aten.isnan.default", "aten.relu6.default",
    "aten.hardswish.default", "aten.hardsigmoid.default", "aten.mish.default", "aten.round.default",
    "aten.trunc.default", "aten.logical_and.default", "aten.bitwise_and.Scalar", "aten.rsub.Scalar",
]
BINARY_NONLINEAR = [
    "aten.eq.Tensor", "aten.ne.Tensor", "aten.lt.Tensor", "aten.gt.Tensor", "aten.le.Tensor",
    "aten.ge.Tensor", "aten.__and__.Tensor", "aten.__or__.Tensor", "aten.bitwise_and.Tensor",
    "aten.bitwise_or.Tensor", "aten.logical_and.default", "aten.logical_or.default",
    "aten.maximum.default", "aten.minimum.default", "aten.pow.Tensor_Tensor", "aten.where.self",
    "aten.masked_fill.Scalar", "aten.masked_fill.Tensor", "aten.remainder.Tensor",
    "aten.floor_divide.default", "aten.remainder.Scalar", "aten.atan2.default", "aten.where.ScalarOther",
    "aten.where.ScalarSelf", "aten.min.other", "aten.max.other",
]
LINEAR_UNARY = [
    "aten.neg.default", "aten.clone.default", "aten.contiguous.default", "aten.to.dtype",
    "aten.to.dtype_layout", "aten.to.device", "aten._to_copy.default", "aten.alias.default",
    "aten.detach.default", "aten.lift_fresh_copy.default", "aten.type_as.default",
]
# Linear in the tensor inputs jointly: sums of partial values are partial values.
LINEAR_SUM = ["aten.add.Tensor", "aten.sub.Tensor"]
# Linear in any one tensor input when the others are broadcast.
LINEAR_PRODUCT = ["aten.mul.Tensor", "aten.div.Tensor"]
# Linear in the tensor, given a scalar literal.
LINEAR_SCALAR = ["aten.mul.Scalar", "aten.div.Scalar"]
FLOAT_DTYPES = ("f32", "f64", "f16", "bf16")
DROPOUTS = ("aten.dropout.default", "aten.feature_dropout.default")


@register(*UNARY_NONLINEAR, *BINARY_NONLINEAR, doc="elementwise, nonlinear")
def nonlinear(node: Node) -> list[Signature]:
    return _with_scalars_broadcast(node, split_signatures(node))


@register(*LINEAR_UNARY, *LINEAR_SCALAR, doc="elementwise, linear in its tensor")
def linear_unary(node: Node) -> list[Signature]:
    sigs = split_signatures(node)
    if not _cast_is_linear(node):
        return sigs
    return sigs + [Signature((P,) * len(node.input_values()), (P,))]


@register(*DROPOUTS, doc="elementwise: linear when inactive")
def dropout(node: Node) -> list[Signature]:
    """Active dropout draws a mask per rank: a sum of masked partial values is not a masked sum."""
    sigs = split_signatures(node)
    if arg(node, "train") and float(arg(node, "p")) > 0.0:
        return sigs
    return sigs + [Signature((P,), (P,))]


def _cast_is_linear(node: Node) -> bool:
    """Whether the cast from the first input's dtype to the output's is linear."""
    return is_linear_cast(node.input_values()[0].type.dtype, node.outputs[0].type.dtype)


def is_linear_cast(src: str, dst: str) -> bool:
    """Keeping the dtype or casting to a float dtype is linear; casting floats to ints truncates."""
    return dst == src or dst in FLOAT_DTYPES


@register("aten.copy.default", doc="src's values in self's shape and dtype: splits follow broadcasting; linear in src")
def copy(node: Node) -> list[Signature]:
    """The functional form of ``copy_``: self gives only its shape and dtype, so with src partial it may be
    anything (it is taken broadcast)."""
    sigs = split_signatures(node)
    src = arg(node, "src")
    if is_linear_cast(src.type.dtype, node.outputs[0].type.dtype):
        sigs.append(Signature((B, P), (P,)))
    return _with_scalars_broadcast(node, sigs)


@register("aten.fill.Tensor", doc="a tensor of self's shape filled with a zero-dim value: linear in the value")
def fill_tensor(node: Node) -> list[Signature]:
    """The functional form of ``fill_``: self gives its shape (which may be split), value every entry."""
    self_ = node.input_values()[0]
    sigs = [all_b(node), Signature((B, P), (P,))]
    sigs += [Signature((Split(i), B), (Split(i),)) for i in range(self_.type.ndim)]
    return _with_scalars_broadcast(node, sigs)


@register("aten.broadcast_tensors.default", doc="each input expanded to the common shape: splits follow broadcasting")
def broadcast_tensors(node: Node) -> list[Signature]:
    """Every output has the broadcast shape (:func:`split_signatures` splits them all alike); each is its
    input expanded, so partial inputs give partial outputs."""
    sigs = split_signatures(node) + [Signature((P,) * len(node.input_values()), (P,) * len(node.outputs))]
    return _with_scalars_broadcast(node, sigs)


@register(*LINEAR_SUM, doc="sum/difference: partial + partial is partial")
def linear_sum(node: Node) -> list[Signature]:
    sigs = split_signatures(node)
    ins = node.input_values()
    has_scalar_literal = len(ins) < 2
    if not has_scalar_literal and not any(is_scalar_tensor(v) for v in ins):
        sigs.append(Signature((P,) * len(ins), (P,)))
    return _with_scalars_broadcast(node, sigs)


@register(*LINEAR_PRODUCT, doc="product/quotient: linear in one operand")
def linear_product(node: Node) -> list[Signature]:
    sigs = split_signatures(node)
    ins = node.input_values()
    partial_positions = [0] if node.op == "aten.div.Tensor" else range(len(ins))
    for i in partial_positions:
        sigs.append(Signature(tuple(P if j == i else B for j in range(len(ins))), (P,)))
    return _with_scalars_broadcast(node, sigs)


def _with_scalars_broadcast(node: Node, sigs: list[Signature]) -> list[Signature]:
    """Zero-dim tensor inputs stay broadcast in every signature."""
    ins = node.input_values()
    out = []
    for s in sigs:
        fixed = tuple(B if is_scalar_tensor(v) and s.inputs[i] != P else s.inputs[i]
                      for i, v in enumerate(ins))
        if any(is_scalar_tensor(v) and s.inputs[i] == P for i, v in enumerate(ins)):
            continue
        out.append(Signature(fixed, s.outputs))
    return out
