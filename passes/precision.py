"""Mixed precision: the casts ``torch.autocast`` makes, written into the IR.

With a strategy ``precision`` whose ``compute`` dtype differs from its ``param`` dtype (``bf16-mixed``:
fp32 parameters, bf16 compute), every float input of an op autocast lowers (matrix products,
convolutions, attention) is cast to the compute dtype right before it, and every lower-precision input
of an op autocast runs in float32 (losses; on GPUs also norms, softmax, exponentials, sums) is cast up
(:func:`ir.precision.autocast_dtype`), by the lists of the device type the cluster's devices are: a plan
on CPU ranks casts as ``torch.autocast("cpu")``, one on accelerators as ``torch.autocast("cuda")``. Each cast is an ``aten._to_copy`` node of the reader's module,
named after the value and the dtype (``%blocks.0.mlp.fc.weight_bf16``), so the IR dump shows it and
later passes lay it out like any elementwise op: sharded as its input. The dtypes of the values after
a cast follow by PyTorch's own rules (meta execution), as they do in eager autocast. Parameters stay in
the parameter dtype: their gradients arrive through the casts' backward in that dtype, and the
optimizer updates them there (fp32 master weights).

The pass records the plan's dtypes as ``graph.attrs["precision"]`` (IR dtype names); ``grad_sync``
then marks every gradient reduction with the ``reduce`` dtype and the verifier checks the contract.
Without a precision in the strategy the pass changes nothing.
"""
from __future__ import annotations

from ir.core import Graph, Node, Value
from ir.ops.comm import sums_partials
from ir.precision import PRECISION_TO_IR, autocast_device_type, autocast_dtype, model_dtype
from ir.types import DTYPES_BY_NAME, TensorType
from ir.verifier import MetaTyper
from passes.manager import PassContext, register_pass
from strategy import VALUE, PrecisionSpec, StrategyError

PRECISION_ATTR = "precision"
"""The graph attr holding the plan's ``{"param", "compute", "reduce"}`` IR dtypes."""


@register_pass("precision", produces=("precision_cast",))
def precision_pass(graph: Graph, ctx: PassContext) -> None:
    """Insert the casts of the strategy's mixed precision (see the module docstring)."""
    spec = ctx.strategy.precision
    if spec is None:
        return
    check_precision(spec, graph, ctx.cluster)
    dtypes = {key: PRECISION_TO_IR[name] for key, name in spec.as_dict().items()}
    graph.attrs[PRECISION_ATTR] = dtypes
    if not spec.mixed:
        return
    device_type = plan_device_type(ctx.cluster)
    typer = MetaTyper(graph, graph.attrs.get("example_dims") or {}, adopt_dtypes=True)
    for node in list(graph.nodes):  # in order: each node sees its inputs' dtypes after the casts before it
        target = autocast_dtype(node.op, dtypes["compute"], device_type)
        if target is not None:
            for cast in _cast_inputs(graph, node, target):
                typer.run(cast)
        typer.run(node)


def check_precision(spec: PrecisionSpec, graph: Graph, cluster) -> None:
    """The parameter dtype is the model's, a mixed precision keeps fp32 parameters, and every device of
    the cluster lists the compute dtype (a peak FLOP/s entry)."""
    own = model_dtype(graph)
    if PRECISION_TO_IR[spec.param] != own:
        found = next((k for k, v in PRECISION_TO_IR.items() if v == own), own)
        raise StrategyError(f"precision param is {spec.param}, but the model's parameters are {found}; cast the "
                            f"model (model.to(torch.{DTYPES_BY_NAME[PRECISION_TO_IR[spec.param]]})) or write "
                            f"param={found}".replace("torch.torch.", "torch."), ("precision", "param", VALUE))
    if spec.mixed and spec.param != "fp32":
        raise StrategyError(f"mixed precision keeps fp32 master weights, but param is {spec.param} with compute "
                            f"{spec.compute}; write param=fp32 (or the same dtype for both)",
                            ("precision", "param", VALUE))
    for device in getattr(cluster, "devices", ()):
        if spec.compute not in device.peak_flops:
            raise StrategyError(f"compute dtype {spec.compute} is not one the cluster's {device.kind} devices list "
                                f"(device {device.id}); expected one of: {', '.join(device.peak_flops)}",
                                ("precision", "compute", VALUE))


def plan_device_type(cluster) -> str:
    """The device type whose autocast cast lists the plan follows (``"cpu"`` on CPU ranks, else ``"cuda"``;
    :func:`ir.precision.autocast_device_type`)."""
    try:
        return autocast_device_type(d.kind for d in getattr(cluster, "devices", ()))
    except ValueError as err:
        raise StrategyError(str(err), ("precision", "compute", VALUE)) from None


def _cast_inputs(graph: Graph, node: Node, dtype: str) -> list[Node]:
    """Read every float tensor input of ``node`` in ``dtype`` (a cast before it); the casts made."""
    casts: dict[int, Value] = {}
    for v in node.input_values():
        if id(v) in casts or v.type.dtype == dtype or not v.type.torch_dtype.is_floating_point:
            continue
        casts[id(v)] = _cast_before(graph, node, v, dtype)
    if casts:
        node.map_values(lambda v: casts.get(id(v), v))
    return [v.producer for v in casts.values()]


def _cast_before(graph: Graph, node: Node, v: Value, dtype: str) -> Value:
    attrs = {"module": node.attrs["module"]} if "module" in node.attrs else {}
    return graph.create_node("aten._to_copy.default", [v], {"dtype": DTYPES_BY_NAME[dtype]},
                             [TensorType(v.type.shape, dtype)], [f"{v.name}_{dtype}"], attrs, before=node).outputs[0]


def mark_forward_reductions(graph: Graph) -> None:
    """With a precision ``forward_reduce``: give every collective that sums partial values in forward (tensor
    parallelism's all-reduces, sequence parallelism's reduce-scatters; :func:`ir.ops.comm.sums_partials`) the
    dtype its sum runs in (kwarg ``reduce_dtype``): the partials are cast to it, summed across ranks, and
    rounded back to the value's dtype once. Boxing calls this once it has inserted the collectives."""
    forward = graph.attrs.get(PRECISION_ATTR, {}).get("forward_reduce")
    if forward is None:
        return
    for node in filter(sums_partials, graph.nodes):
        node.kwargs["reduce_dtype"] = DTYPES_BY_NAME[forward]
