"""Capture a PyTorch module into the IR with ``torch.export`` (or ``torch.fx.symbolic_trace`` first).

The captured graph holds ATen ops. The batch and sequence dims of the inputs stay symbolic
(sympy symbols ``batch``, ``seq``); every other dim is concrete. Parameters shared under two names
(tied weights) are one IR parameter under their first ``named_parameters()`` name.

The graph is functional: a program that writes tensors in place (``x /= d``, ``relu_``, a slice
assignment, BatchNorm's running statistics, ``num_batches_tracked += 1``) goes through torch's
functionalization, so every node makes new values and a buffer's new value is an explicit
``update %buffer <- %value`` of the graph.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import operator
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import sympy
import torch
import torch.fx
from torch.export import Dim

from frontend.local_writes import make_local_writes_functional, written_args
from ir.core import Graph, Value
from ir.ops import custom as custom_ops
from ir.types import DTYPE_NAMES, TensorType, dim_symbol

DROPPED_OPS = {
    "aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
    "aten.sym_constrain_range_for_size.default", "aten._assert_async.msg",
    "aten.sym_constrain_range.default",
}
INPUT_DIM_NAMES = ("batch", "seq")
CASTS = ("aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten.to.other")
"""``Tensor.to``: the tensor itself when its dtype (and device) already are the ones asked for."""
RESHAPE_VIEWS = ("aten.view.default", "aten._unsafe_view.default")
"""What functionalization makes of ``reshape``, chosen by the strides of the traced tensors."""


class CaptureError(RuntimeError):
    """The model could not be captured; the message names the module, the source line and a fix."""


@dataclass
class Captured:
    """A captured model: the IR graph plus what the backends need to bind weights and inputs."""

    graph: Graph
    weights: dict[str, torch.Tensor]
    """Initial values of every IR parameter and buffer, by ``state_dict`` name."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Tied names: ``{"lm_head.weight": "tok_emb.weight"}``."""
    input_names: list[str] = field(default_factory=list)
    output_structure: Any = None
    """For inference graphs: how the flat outputs nest (a pytree spec)."""


class _LossWrapper(torch.nn.Module):
    """Calls the model and returns the training loss, or the flat outputs in inference."""

    def __init__(self, model: torch.nn.Module, kwarg_names: list[str], loss_fn: Callable | None, train: bool):
        super().__init__()
        self.model = model
        self.kwarg_names = kwarg_names
        self.loss_fn = loss_fn
        self.train_mode = train
        self.out_spec = None

    def forward(self, *flat):
        n_pos = len(flat) - len(self.kwarg_names)
        out = self.model(*flat[:n_pos], **dict(zip(self.kwarg_names, flat[n_pos:])))
        if self.train_mode:
            return find_loss(out, self.loss_fn)
        leaves, self.out_spec = torch.utils._pytree.tree_flatten(out)
        return tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))


def find_loss(out: Any, loss_fn: Callable | None) -> torch.Tensor:
    """The loss from a model output: ``loss_fn(out)``, a scalar, ``out.loss`` or ``out["loss"]``."""
    if loss_fn is not None:
        return loss_fn(out)
    if isinstance(out, torch.Tensor) and out.ndim == 0:
        return out
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if isinstance(loss, torch.Tensor) and loss.ndim == 0:
        return loss
    found = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a tensor of shape {tuple(out.shape)}"
    raise CaptureError(f"expected the model's output to be the loss (a scalar tensor), to have .loss or "
                       f"['loss'], found {found}; pass loss_fn=... to compile(), or mode='infer'")


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *,
            loss_fn: Callable | None = None, train: bool = True, method: str = "auto",
            decompose_custom_ops: bool | Iterable[str] = True) -> Captured:
    """Capture ``model(*args, **kwargs)`` into an IR graph.

    ``method``: ``"export"`` uses ``torch.export``; ``"fx"`` first traces with
    ``torch.fx.symbolic_trace`` (plain models), then lowers that graph to ATen with ``torch.export``;
    ``"auto"`` tries ``"fx"`` and falls back to ``"export"`` for models that do not trace.

    ``decompose_custom_ops``: custom ops (``torch.library`` ops outside ATen) that have a decomposition
    are replaced by it, ops the SBP rules know, so their work keeps the plan's parallelism; a custom
    op kept as it is runs replicated (see :mod:`ir.ops.custom`). True: every custom op with a
    decomposition; False: none; a collection of op names (``"mylib.gated_mlp.default"``): those.
    """
    kwargs = dict(kwargs or {})
    model = _meta_twin_of_fake_model(model)
    flat = _inputs_for_meta_model(model, tuple(args) + tuple(kwargs.values()))
    names = _input_names(model, len(args), list(kwargs))
    program, wrapper = None, None
    already_a_graph = isinstance(model, torch.fx.GraphModule)
    if method == "fx" or (method == "auto" and not already_a_graph):
        try:
            traced = _symbolic_trace(model, len(args), kwargs)
            _check_trace_agrees(model, traced, args, kwargs)
            wrapper = _wrapper(traced, model, kwargs, loss_fn, train)
            program = _export(wrapper, flat, model)
        except CaptureError:
            if method == "fx":
                raise
    if program is None:
        wrapper = _wrapper(model, model, kwargs, loss_fn, train)
        program = _export(wrapper, flat, model)
    program, functionalized = _functionalize(program, model, decompose_custom_ops)
    captured = _Converter(program, model, names, functionalized).convert(train)
    captured.output_structure = wrapper.out_spec
    return captured


def _functionalize(program: torch.export.ExportedProgram, model: torch.nn.Module,
                   decompose: bool | Iterable[str] = True) -> tuple[torch.export.ExportedProgram, bool]:
    """The program with every in-place write replaced by new values (torch's functionalization) and the
    custom ops that ``decompose`` selects replaced by their decompositions (see :func:`capture`), and
    whether it was rewritten. A write through a view reaches its base (``slice_scatter``...), later
    reads see the new value, and each written buffer becomes an output of kind ``BUFFER_MUTATION``.
    Decomposed ops keep their module path: the ops they become carry it.

    Programs that neither write nor call such a custom op are returned as exported: functionalization
    would also rewrite ``reshape`` / ``contiguous`` / ``flatten`` into stride-dependent views and copies.
    So are programs whose writes are all local (into tensors the forward made, see
    :mod:`frontend.local_writes`), those writes made functional without tracing the program again.
    """
    table = _custom_decompositions(program, decompose)
    written = [node for node in program.graph.nodes if written_args(node)]
    if not table and not written:
        return program, False
    if not table and make_local_writes_functional(program, written):  # no second trace of the whole program
        return program, False
    for _ in range(MAX_DECOMPOSITION_ROUNDS):  # a decomposition may call custom ops with their own
        try:
            with _quiet_torch():
                program = program.run_decompositions(table)
        except Exception as err:  # functionalization fails on what it cannot trace again
            raise CaptureError(_rewrite_failure(model, table, err)) from None
        more = {op: fn for op, fn in _custom_decompositions(program, decompose).items() if op not in table}
        if not more:
            return program, True
        table.update(more)
    raise CaptureError(f"custom ops of {type(model).__name__} still decompose into custom ops after "
                       f"{MAX_DECOMPOSITION_ROUNDS} rounds ({', '.join(map(str, table))}); compile with "
                       f"decompose_custom_ops=False or name the ops to decompose")


MAX_DECOMPOSITION_ROUNDS = 8


def _custom_decompositions(program: torch.export.ExportedProgram, decompose: bool | Iterable[str]) -> dict:
    """The custom ops of the program that ``decompose`` selects and that have a decomposition, each with it."""
    wanted = (lambda name: decompose) if isinstance(decompose, bool) else (lambda name: name in set(decompose))
    table = {}
    for node in program.graph.nodes:
        op = node.target
        if isinstance(op, torch._ops.OpOverload) and op not in table and custom_ops.is_custom(str(op)) \
                and wanted(str(op)):
            found = custom_ops.decomposition(op)
            if found is not None:
                table[op] = found
    return table


def _rewrite_failure(model: torch.nn.Module, table: dict, err: Exception) -> str:
    if table:
        return (f"cannot decompose the custom ops {', '.join(map(str, table))} of {type(model).__name__} "
                f"(tracing their decompositions failed: {_first_line(err)}); compile with "
                f"decompose_custom_ops=False to keep them as ops")
    return (f"cannot make the in-place writes of {type(model).__name__} explicit (torch functionalization "
            f"failed: {_first_line(err)}); write those ops out of place")


def _wrapper(module, model, kwargs, loss_fn, train) -> _LossWrapper:
    wrapper = _LossWrapper(module, list(kwargs), loss_fn, train)
    wrapper.train(model.training)
    return wrapper


def _check_trace_agrees(model: torch.nn.Module, traced: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """symbolic_trace silently bakes in Python branches on dtypes or shapes: compare one call of each."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in leaves) or _on_meta(model):
        return
    with torch.no_grad(), torch.random.fork_rng(), _buffers_restored(model):
        torch.manual_seed(0)
        expected = torch.utils._pytree.tree_leaves(model(*args, **kwargs))
        torch.manual_seed(0)
        got = torch.utils._pytree.tree_leaves(traced(*args, **kwargs))
    same = len(expected) == len(got) and all(
        not isinstance(e, torch.Tensor) or (isinstance(g, torch.Tensor) and e.shape == g.shape
                                            and e.dtype == g.dtype and torch.equal(e, g))
        for e, g in zip(expected, got))
    if not same:
        raise CaptureError(f"torch.fx.symbolic_trace changed what {type(model).__name__} computes "
                           f"(Python branches on tensor properties); use method='export'")


@contextlib.contextmanager
def _buffers_restored(model: torch.nn.Module):
    """Put every buffer back as it was, the same tensor holding the same values (a training-mode call
    updates BatchNorm's running statistics; compiling must not). Yields a function naming the buffers
    changed so far."""
    saved = [(f"{prefix}{'.' if prefix else ''}{name}", module, name, b, b.detach().clone())
             for prefix, module in model.named_modules() for name, b in module._buffers.items() if b is not None]

    def changed() -> list[str]:
        return [full for full, module, name, tensor, value in saved if module._buffers.get(name) is not tensor
                or (not tensor.is_meta and not torch.equal(tensor, value))]

    try:
        yield changed
    finally:
        with torch.no_grad():
            for _, module, name, tensor, value in saved:
                module._buffers[name] = tensor
                tensor.copy_(value)


def _on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _symbolic_trace(model: torch.nn.Module, n_pos: int, kwargs: dict) -> torch.nn.Module:
    """``torch.fx.symbolic_trace`` with the forward arguments the call leaves out fixed to their defaults."""
    import inspect
    concrete = {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    for p in params[n_pos:]:
        if p.name not in kwargs and p.default is not inspect.Parameter.empty:
            concrete[p.name] = p.default
    try:
        with _buffers_restored(model) as changed:
            traced = torch.fx.symbolic_trace(model, concrete_args=concrete or None)
            written = changed()
    except Exception as err:  # symbolic_trace raises many kinds on dynamic Python
        raise CaptureError(f"torch.fx.symbolic_trace cannot trace {type(model).__name__}: "
                           f"{_first_line(err)}; use method='export'") from None
    if written:  # buffers are plain tensors to the tracer: their writes ran once, outside the graph
        raise CaptureError(f"torch.fx.symbolic_trace cannot record the write of buffer {written[0]} in "
                           f"{type(model).__name__}; use method='export'")
    traced.train(model.training)
    return traced


def _meta_twin_of_fake_model(model: torch.nn.Module) -> torch.nn.Module:
    """For a model built under ``FakeTensorMode``: a structural copy with meta tensors of the same shapes
    (``torch.export`` cannot trace tensors of another fake mode); tied parameters stay tied. Other
    models are returned as they are."""
    from torch._subclasses.fake_tensor import FakeTensor
    if not any(isinstance(t, FakeTensor) for t in list(model.parameters()) + list(model.buffers())):
        return model
    tensors: dict[int, torch.Tensor] = {}
    modules: dict[int, torch.nn.Module] = {}

    def meta(t: torch.Tensor | None, parameter: bool):
        if t is None:
            return None
        if id(t) not in tensors:
            empty = torch.empty(t.shape, dtype=t.dtype, device="meta")
            tensors[id(t)] = torch.nn.Parameter(empty, t.requires_grad) if parameter else empty
        return tensors[id(t)]

    def twin(module: torch.nn.Module | None):
        if module is None:
            return None
        if id(module) not in modules:
            clone = modules[id(module)] = module.__class__.__new__(module.__class__)
            clone.__dict__.update(module.__dict__)
            clone._parameters = {k: meta(v, True) for k, v in module._parameters.items()}
            clone._buffers = {k: meta(v, False) for k, v in module._buffers.items()}
            clone._modules = {k: twin(v) for k, v in module._modules.items()}
        return modules[id(module)]

    return twin(model)


def _inputs_for_meta_model(model: torch.nn.Module, flat: tuple) -> tuple:
    """Inputs moved to the meta device when the model's weights are there (planning without weights).

    A model built under ``torch.device("meta")`` cannot run on real example tensors; giving export meta
    inputs of the same shapes and dtypes captures the same graph without allocating anything.
    """
    on_meta = any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())
    if not on_meta:
        return flat
    return tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in flat)


def _export(wrapper: torch.nn.Module, flat: tuple, model: torch.nn.Module) -> torch.export.ExportedProgram:
    for dynamic in (_named_dims(flat), tuple(_dynamic_dims(t) for t in flat)):
        try:
            with _quiet_torch(), _traceable_cumulative_batch_norms(model):
                return torch.export.export(wrapper, flat, dynamic_shapes=(dynamic,), strict=False)
        except CaptureError:
            raise
        except Exception:  # a shape constraint we guessed does not hold: try looser ones
            continue
    try:
        with _quiet_torch(), _traceable_cumulative_batch_norms(model):
            return torch.export.export(wrapper, flat, strict=False)
    except CaptureError:
        raise
    except Exception as err:
        raise CaptureError(_describe_capture_failure(model, err)) from None


@contextlib.contextmanager
def _traceable_cumulative_batch_norms(model: torch.nn.Module):
    """While exporting, BatchNorms with ``momentum=None`` (a cumulative average of the batch statistics)
    run :func:`_cumulative_batch_norm`: torch computes their averaging factor as the Python float
    ``1 / num_batches_tracked``, which depends on a buffer's value and so cannot be traced."""
    from torch.nn.modules.batchnorm import _BatchNorm
    patched = [m for m in model.modules() if isinstance(m, _BatchNorm) and type(m).forward is _BatchNorm.forward
               and m.momentum is None and m.track_running_stats and "forward" not in m.__dict__]
    for m in patched:
        m.forward = functools.partial(_cumulative_batch_norm, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _cumulative_batch_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``_BatchNorm.forward`` computes with ``momentum=None``, the factor kept a tensor: normalise
    with the batch statistics; the running mean and (unbiased) variance move to ``(1 - f) * running +
    f * batch`` with ``f = 1 / num_batches_tracked``, counted after this batch."""
    from torch.nn.modules.batchnorm import _BatchNorm
    if not module.training:
        return _BatchNorm.forward(module, x)
    module._check_input_dim(x)
    module.num_batches_tracked.add_(1)
    factor = 1.0 / module.num_batches_tracked
    dims = [0, *range(2, x.ndim)]
    count = x.numel() // x.shape[1]
    data = x.detach()
    mean = data.sum(dims) / count
    var = (data - mean.reshape([1, -1] + [1] * (x.ndim - 2))).pow(2).sum(dims) / (count - 1)
    module.running_mean.copy_(module.running_mean * (1 - factor) + mean * factor)
    module.running_var.copy_(module.running_var * (1 - factor) + var * factor)
    return torch.nn.functional.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)


@contextlib.contextmanager
def _quiet_torch():
    """Silence torch's own logging of failed export attempts (we report failures ourselves)."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


SEQUENCE_MIN = 3
"""The smallest ``seq`` the shared dims declare. torch treats sizes 0 and 1 apart (a dynamic size is at least
2), so a sequence shifted by one position (a causal LM's labels, an encoder-decoder's decoder inputs) guards
``seq >= 3``; declared from 1, that guard fails the whole export at its end, and a second export follows."""


def _named_dims(flat: tuple) -> tuple:
    """Shared ``batch`` / ``seq`` dims for inputs whose leading sizes match the first input's (``seq`` from
    :data:`SEQUENCE_MIN`, or the first input's length when shorter)."""
    first = next((t for t in flat if isinstance(t, torch.Tensor) and t.ndim), None)
    if first is None:
        return tuple(None for _ in flat)
    lowest = {"seq": min(SEQUENCE_MIN, first.shape[1]) if first.ndim > 1 else 1}
    names = [Dim(n, min=lowest.get(n, 1)) for n in INPUT_DIM_NAMES]
    out = []
    for t in flat:
        spec = _dynamic_dims(t)
        if spec is not None:
            spec = {i: (names[i] if i < first.ndim and t.shape[i] == first.shape[i] else Dim.AUTO) for i in spec}
        out.append(spec)
    return tuple(out)


def _dynamic_dims(t: Any):
    if not isinstance(t, torch.Tensor) or t.ndim == 0:
        return None
    return {i: Dim.AUTO for i in range(min(t.ndim, 2 if not t.is_floating_point() else 1))}


def _describe_capture_failure(model: torch.nn.Module, err: Exception) -> str:
    where = _failure_location(err, model)
    reason = _first_line(err)
    untyped = _custom_op_without_types(err)
    if untyped is not None:
        qualname = untyped.name()
        return (f"custom op {untyped} called{where or ' by ' + type(model).__name__} has neither a fake kernel "
                f"nor a decomposition, so its output types cannot be traced ({reason}); register a fake kernel "
                f"with torch.library.register_fake(\"{qualname}\") (a function of the inputs' shapes and dtypes "
                f"returning empty outputs), or define the op by other ops (a CompositeImplicitAutograd kernel)")
    return (f"cannot capture {type(model).__name__}{where}: {reason}. torch.export needs a forward "
            f"without data-dependent Python control flow: replace `if tensor...`/`.item()` with "
            f"torch.where or torch.cond, or pass loss_fn= / mode='infer' if the output is the problem")


def _custom_op_without_types(err: Exception) -> torch._ops.OpOverload | None:
    """The custom op that was running when tracing failed, when it has neither a fake kernel nor a
    decomposition (the innermost op on the failing stack, across the exception chain)."""
    seen, current = set(), err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for frame, _ in reversed(list(traceback.walk_tb(current.__traceback__))):
            op = frame.f_locals.get("self")
            if isinstance(op, torch._ops.OpOverload) and custom_ops.is_custom(str(op)):
                untyped = not custom_ops.has_fake_kernel(op) and custom_ops.decomposition(op) is None
                return op if untyped else None
        current = current.__cause__ or current.__context__
    return None


LIBRARY_DIRS = ("site-packages", "dist-packages")


@dataclass
class _FrameAt:
    """One traceback entry: the frame and the line it was at."""

    frame: Any
    line: int

    @property
    def filename(self) -> str:
        return self.frame.f_code.co_filename

    def is_torch_or_sbpc(self) -> bool:
        return "/torch/" in self.filename or "frontend/torch_capture" in self.filename or "<" in self.filename

    def is_library(self) -> bool:
        return any(f"/{d}/" in self.filename for d in LIBRARY_DIRS)

    def __str__(self) -> str:
        path = self.filename
        for d in LIBRARY_DIRS:
            path = path.split(f"/{d}/", 1)[-1]
        return f"{path}:{self.line} (in {self.frame.f_code.co_name})"


def _failure_location(err: Exception, model: torch.nn.Module) -> str:
    """Where tracing stopped: the module of ``model`` whose forward was running (by its name in the
    model), the innermost frame outside torch (library code such as transformers included), and the
    innermost frame of the user's own code when that is another one. Empty when nothing is known."""
    frames = _traceback_frames(err)
    outside_torch = [f for f in frames if not f.is_torch_or_sbpc()]
    user = [f for f in outside_torch if not f.is_library()]
    parts = []
    module = _running_module(frames, model)
    if module:
        parts.append(f" in module {module}")
    if outside_torch:
        parts.append(f" at {outside_torch[-1]}")
    if user and user[-1] is not outside_torch[-1]:
        parts.append(f" called from {user[-1]}")
    return ",".join(parts)


def _traceback_frames(err: Exception) -> list[_FrameAt]:
    """The traceback, outermost first, of the first exception of the chain (``err``, then what it was
    raised from) that passed through code outside torch."""
    seen = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = [_FrameAt(frame, line) for frame, line in traceback.walk_tb(current.__traceback__)]
        if any(not f.is_torch_or_sbpc() for f in frames):
            return frames
        current = current.__cause__ or current.__context__
    return []


def _running_module(frames: list[_FrameAt], model: torch.nn.Module) -> str:
    """``lm.model.layers.0.mlp.experts (MixtralExperts)``: the innermost submodule of ``model`` among
    the frames' ``self``; empty when none (or only the model itself) was running."""
    names = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    for f in reversed(frames):
        owner = f.frame.f_locals.get("self")
        name = names.get(id(owner)) if isinstance(owner, torch.nn.Module) else None
        if name:
            return f"{name} ({type(owner).__name__})"
    return ""


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(err).__name__


def _input_names(model: torch.nn.Module, n_pos: int, kwarg_names: list[str]) -> list[str]:
    import inspect
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        pos = [p.name for p in params[:n_pos]]
    except (TypeError, ValueError):
        pos = []
    pos += [f"input{i}" for i in range(len(pos), n_pos)]
    return pos + kwarg_names


# -- conversion of the exported program ----------------------------------------------------------

class _Converter:
    """Turns an ExportedProgram's ATen graph into an IR graph."""

    def __init__(self, program: torch.export.ExportedProgram, model: torch.nn.Module, names: list[str],
                 functionalized: bool = False):
        self.program = program
        self.model = model
        self.functionalized = functionalized
        self.buffers: dict[str, Value] = {}
        self.graph = Graph(name=_graph_name(model))
        self.env: dict[str, Any] = {}
        self.symbols: dict[sympy.Symbol, sympy.Expr] = {}
        self.input_names = names
        self.canonical = _canonical_param_names(model)

    def convert(self, train: bool) -> Captured:
        sig = self.program.graph_signature
        self._name_symbols(sig)
        weights: dict[str, torch.Tensor] = {}
        for spec in sig.input_specs:
            self._placeholder(spec, weights)
        for node in self.program.graph.nodes:
            if node.op == "call_function":
                self._call(node)
        self._outputs(sig, train)
        aliases = {n: c for n, c in self.canonical.items() if n != c}
        return Captured(self.graph, weights, aliases, list(self.input_names))

    def _name_symbols(self, sig) -> None:
        users = [s for s in sig.input_specs if s.kind.name == "USER_INPUT"]
        by_node = {n.name: n for n in self.program.graph.nodes if n.op == "placeholder"}
        for spec in users:
            val = by_node[spec.arg.name].meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            for i, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt):
                    expr = size.node.expr
                    if expr.is_Symbol and expr not in self.symbols:
                        name = INPUT_DIM_NAMES[i] if i < len(INPUT_DIM_NAMES) else f"dim{i}"
                        taken = {str(v) for v in self.symbols.values()}
                        while name in taken:
                            name += "_"
                        self.symbols[expr] = dim_symbol(name)

    def sym(self, value: Any) -> Any:
        """A SymInt (or plain int) as a sympy expression over our named symbols."""
        if isinstance(value, torch.SymInt):
            expr = value.node.expr
            return sympy.sympify(expr).subs(self.symbols)
        return value

    def ttype(self, val: torch.Tensor) -> TensorType:
        return TensorType(tuple(sympy.sympify(self.sym(s)) for s in val.shape), DTYPE_NAMES[val.dtype])

    def _placeholder(self, spec, weights: dict) -> None:
        node = next(n for n in self.program.graph.nodes if n.op == "placeholder" and n.name == spec.arg.name)
        val = node.meta.get("val")
        kind = spec.kind.name
        if kind == "USER_INPUT":
            if not isinstance(val, torch.Tensor):
                raise CaptureError(f"input {node.name} is a {type(val).__name__}; only tensor inputs are supported")
            idx = len(self.graph.inputs)
            name = self.input_names[idx] if idx < len(self.input_names) else node.name
            self.env[node.name] = self.graph.add_input(name, self.ttype(val))
            return
        target = _strip_wrapper(spec.target)
        if kind == "PARAMETER":
            target = self.canonical.get(target, target)
            existing = next((p for p in self.graph.params if p.target == target), None)
            if existing is not None:
                self.env[node.name] = existing
                return
            parameter = self.model.get_parameter(target)
            weights[target] = parameter.detach().clone()
            self.env[node.name] = self.graph.add_param(target, self.ttype(val), target, "param",
                                                       requires_grad=parameter.requires_grad)
            return
        tensor = self._buffer_or_constant(spec, target)
        weights[target] = tensor.detach().clone()
        in_state_dict = kind == "BUFFER" and spec.persistent is not False  # lifted constants are not
        self.env[node.name] = self.buffers[target] = self.graph.add_param(
            target, self.ttype(val), target, "buffer", persistent=in_state_dict)

    def _buffer_or_constant(self, spec, target: str) -> torch.Tensor:
        if spec.kind.name == "BUFFER":
            return self.model.get_buffer(target)
        return self.program.constants[spec.target]

    def _call(self, node: torch.fx.Node) -> None:
        target = node.target
        if target is operator.getitem:
            self.env[node.name] = self.env[node.args[0].name][node.args[1]]
            return
        if isinstance(target, torch._ops.HigherOrderOperator):
            raise CaptureError(_higher_order_refusal(node))
        op = str(target) if isinstance(target, torch._ops.OpOverload) else None
        val = node.meta.get("val")
        if op in DROPPED_OPS:
            return
        written = written_args(node)
        if written:
            raise CaptureError(f"op {op} at node {node.name} (module {_module_path(node) or '<top>'}) writes "
                               f"{', '.join(written)} in place, which torch's functionalization keeps and sbpc "
                               f"cannot make explicit; {_WRITE_HINTS.get(op, 'write it out of place')}")
        if self.functionalized and op in RESHAPE_VIEWS:
            # a rank's shard may be laid out unlike the traced tensor; in a functional graph the two are one
            op = "aten.reshape.default"
        if op is None or isinstance(val, (torch.SymInt, torch.SymFloat, int, float, bool)):
            self.env[node.name] = self._symbolic_scalar(node, val)
            return
        args = self.arg(list(node.args))
        kwargs = {k: self.arg(v) for k, v in node.kwargs.items()}
        vals = list(val) if isinstance(val, (list, tuple)) else [val]
        if not all(isinstance(v, torch.Tensor) for v in vals):
            raise CaptureError(f"op {op} at node {node.name} returns a non-tensor; not supported")
        attrs = {"module": _module_path(node)} if _module_path(node) else {}
        if op == "aten.copy.default":
            self.env[node.name] = self._copy(node.name, args[0], args[1], attrs)
            return
        if op in CASTS and isinstance(args[0], Value) and args[0].type == self.ttype(val):
            self.env[node.name] = args[0]  # a cast to what the tensor already is returns the tensor itself
            return
        base = node.name if len(vals) == 1 else f"{node.name}_"
        ir_node = self.graph.create_node(op, args, kwargs, [self.ttype(v) for v in vals],
                                         [base if len(vals) == 1 else f"{base}{i}" for i in range(len(vals))],
                                         attrs)
        self.env[node.name] = ir_node.outputs[0] if not isinstance(val, (list, tuple)) else ir_node.outputs

    def _copy(self, name: str, dest: Value, src: Value, attrs: dict) -> Value:
        """``copy(dest, src)``, what functionalization makes of ``dest.copy_(src)``: ``src`` cast to the
        dtype of ``dest`` and broadcast to its shape, written with ops that have derivatives (``aten::copy``
        has none)."""
        out = src
        if out.type.dtype != dest.type.dtype:
            cast = TensorType(out.type.shape, dest.type.dtype)
            out = self.graph.create_node("aten._to_copy.default", [out], {"dtype": dest.type.torch_dtype}, [cast],
                                         [f"{name}_cast"], attrs).outputs[0]
        if out.type.shape != dest.type.shape:
            out = self.graph.create_node("aten.expand.default", [out, list(dest.type.shape)], {}, [dest.type],
                                         [f"{name}_expand"], attrs).outputs[0]
        return out

    def _symbolic_scalar(self, node: torch.fx.Node, val: Any) -> Any:
        if isinstance(val, torch.SymInt) or isinstance(val, int):
            return self.sym(val)
        if isinstance(val, torch.SymFloat):
            expr = _float_of_sizes(val.node.expr)
            if expr is not None:
                return expr.subs(self.symbols)
        raise CaptureError(f"node {node.name} ({node.target}) at module "
                           f"{_module_path(node) or '<top>'} computes a Python scalar from tensor data; "
                           f"not supported — keep values as tensors")

    def arg(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return self.env[a.name]
        if isinstance(a, (list, tuple)):
            return [self.arg(x) for x in a]
        if isinstance(a, torch.SymInt):
            return self.sym(a)
        return a

    def _outputs(self, sig, train: bool) -> None:
        for spec in sig.output_specs:
            kind = spec.kind.name
            if kind == "BUFFER_MUTATION":
                buffer, value = self.buffers[_strip_wrapper(spec.target)], self.env[spec.arg.name]
                if value is not buffer:
                    self.graph.buffer_updates[buffer] = value
            elif kind == "USER_INPUT_MUTATION":
                continue  # later reads in the graph see the new value; the caller's tensor is not written
            elif kind != "USER_OUTPUT":
                raise CaptureError(f"the model writes {spec.target or spec.arg.name} in place ({kind}); only "
                                   f"buffers may change in a step: make it a buffer or write it out of place")
        user = [s for s in sig.output_specs if s.kind.name == "USER_OUTPUT"]
        outs = [self.env[s.arg.name] for s in user if hasattr(s.arg, "name")]
        self.graph.outputs = [o for o in outs if isinstance(o, Value)]
        if train:
            loss = self.graph.outputs[0]
            if loss.type.ndim != 0 or not loss.type.torch_dtype.is_floating_point:
                raise CaptureError(f"expected a scalar floating-point loss, found {loss.type}")
            self.graph.loss = loss


def _higher_order_refusal(node: torch.fx.Node) -> str:
    """Why a node that calls one of torch's higher-order ops (``auto_functionalized``, ``cond``, ...) is refused."""
    where = f"node {node.name} (module {_module_path(node) or '<top>'})"
    inner = node.args[0] if node.args and isinstance(node.args[0], torch._ops.OpOverload) else None
    if node.target.name().startswith("auto_functionalized") and inner is not None:
        return (f"{where} calls the custom op {inner}, which writes its arguments in place (its schema "
                f"{inner._schema}); sbpc captures functional custom ops only: define it with mutates_args=() "
                f"and return new tensors")
    return f"{where} calls torch's higher-order op {node.target.name()}, which sbpc does not capture"


_WRITE_HINTS = {
    "aten.instance_norm.default": "InstanceNorm with track_running_stats=True updates its running statistics "
                                  "inside the op in training mode: use track_running_stats=False, or eval mode",
}


def _float_of_sizes(expr: sympy.Expr) -> sympy.Expr | None:
    """A float computed from sizes (``0.0 + x.shape[0]``, ``float(b * s)``: torch's ``ToFloat(s0*s1)``) as a
    sympy expression with a float coefficient (``1.0*s0*s1``), which the IR prints and backends evaluate to
    a Python float; None for other functions of sizes."""
    from torch.utils._sympy.functions import ToFloat
    out = expr.replace(ToFloat, lambda inner: sympy.Float(1.0) * inner)
    allowed = (sympy.Symbol, sympy.Number, sympy.Add, sympy.Mul, sympy.Pow)
    if not all(isinstance(e, allowed) for e in sympy.preorder_traversal(out)):
        return None
    return out if out.has(sympy.Float) else sympy.Float(1.0) * out


def _strip_wrapper(target: str) -> str:
    return target[len("model."):] if target.startswith("model.") else target


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?", "", str(path))
    path = _strip_wrapper(path)
    return "" if path == "model" else path


def _canonical_param_names(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter name (tied ones included) mapped to the first name of that tensor."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out


def _graph_name(model: torch.nn.Module) -> str:
    return re.sub(r"\W", "_", type(model).__name__) or "model"
