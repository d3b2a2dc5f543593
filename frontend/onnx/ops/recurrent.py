"""RNN, GRU and LSTM: the ONNX equations unrolled over the (static) sequence length."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from frontend.onnx.registry import NodeContext, Value, converter

Activation = Callable[[torch.Tensor], torch.Tensor]


def _activation(name: str, alpha: float | None, beta: float | None) -> Activation:
    """One of ONNX's recurrent activation functions, with its alpha/beta."""
    table: dict[str, Activation] = {
        "Relu": torch.relu, "Tanh": torch.tanh, "Sigmoid": torch.sigmoid,
        "Softsign": F.softsign, "Softplus": F.softplus,
        "Affine": lambda x: alpha * x + beta,
        "LeakyRelu": lambda x: F.leaky_relu(x, 0.01 if alpha is None else alpha),
        "ThresholdedRelu": lambda x: torch.where(x > (1.0 if alpha is None else alpha), x, 0.0),
        "ScaledTanh": lambda x: alpha * torch.tanh(beta * x),
        "HardSigmoid": lambda x: torch.clamp((0.2 if alpha is None else alpha) * x
                                             + (0.5 if beta is None else beta), 0, 1),
        "Elu": lambda x: F.elu(x, 1.0 if alpha is None else alpha),
    }
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown recurrent activation {name!r}; ONNX defines "
                         f"{sorted(table)}") from None


@dataclass(frozen=True)
class RecurrentSpec:
    """Attributes shared by RNN / GRU / LSTM (plain values: they appear in the fx graph)."""

    kind: str
    hidden: int
    directions: int
    reverse: bool
    layout: int
    clip: float | None
    activations: tuple[str, ...]
    alphas: tuple[float | None, ...]
    betas: tuple[float | None, ...]
    linear_before_reset: int = 0
    input_forget: int = 0


_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_DEFAULT_ACTIVATIONS = {"RNN": ("Tanh",), "GRU": ("Sigmoid", "Tanh"),
                        "LSTM": ("Sigmoid", "Tanh", "Tanh")}


def _cell_step(spec: RecurrentSpec, fns: list[Activation], x_proj: torch.Tensor,
               h: torch.Tensor, c: torch.Tensor | None, r: torch.Tensor, rb: torch.Tensor,
               peep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One time step of one direction: new hidden (and cell) state."""

    def clipped(t: torch.Tensor) -> torch.Tensor:
        return t if spec.clip is None else torch.clamp(t, -spec.clip, spec.clip)

    if spec.kind == "RNN":
        return fns[0](clipped(x_proj + h @ r.T + rb)), None
    if spec.kind == "GRU":
        size = spec.hidden
        xz, xr, xh = x_proj.split(size, dim=-1)
        rz, rr, rh = r.split(size, dim=0)
        bz, br, bh = rb.split(size)
        z = fns[0](clipped(xz + h @ rz.T + bz))
        reset = fns[0](clipped(xr + h @ rr.T + br))
        if spec.linear_before_reset:
            candidate = fns[1](clipped(xh + reset * (h @ rh.T + bh)))
        else:
            candidate = fns[1](clipped(xh + (reset * h) @ rh.T + bh))
        return (1 - z) * candidate + z * h, None
    gates = x_proj + h @ r.T + rb
    i, o, f, g = gates.split(spec.hidden, dim=-1)
    pi, po, pf = (peep.split(spec.hidden) if peep is not None else (None, None, None))
    i = fns[0](clipped(i if pi is None else i + pi * c))
    f = fns[0](clipped(f if pf is None else f + pf * c))
    if spec.input_forget:
        f = 1 - i
    c_new = f * c + i * fns[1](clipped(g))
    o = fns[0](clipped(o if po is None else o + po * c_new))
    return o * fns[2](c_new), c_new


def _run_direction(spec: RecurrentSpec, fns: list[Activation], x: torch.Tensor,
                   w: torch.Tensor, r: torch.Tensor, wb: torch.Tensor, rb: torch.Tensor,
                   h: torch.Tensor, c: torch.Tensor | None, peep: torch.Tensor | None,
                   lengths: torch.Tensor | None, backwards: bool
                   ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Run one direction over [seq, batch, input]; per-step outputs and final states."""
    steps = x.shape[0]
    x_proj = x @ w.T + wb  # all time steps at once
    outputs: list[torch.Tensor] = [None] * steps  # type: ignore[list-item]
    order = range(steps - 1, -1, -1) if backwards else range(steps)
    for t in order:
        if lengths is None:
            h, c = _cell_step(spec, fns, x_proj[t], h, c, r, rb, peep)
            outputs[t] = h
            continue
        # past a sequence's length the state holds and the output is 0; reversed runs start
        # at each sequence's own last step
        source = (lengths - 1 - (steps - 1 - t)) if backwards else torch.full_like(lengths, t)
        active = (source >= 0) & (source < lengths)
        step_input = x_proj[source.clamp(0, steps - 1), torch.arange(x.shape[1], device=x.device)]
        h_new, c_new = _cell_step(spec, fns, step_input, h, c, r, rb, peep)
        mask = active.reshape(-1, 1)
        h = torch.where(mask, h_new, h)
        c = torch.where(mask, c_new, c) if c is not None else None
        outputs[t] = torch.where(mask, h_new, torch.zeros_like(h_new))
    if lengths is not None and backwards:  # outputs belong at each sequence's own positions
        outputs = _realign_reversed(outputs, lengths)
    return outputs, h, c


def _realign_reversed(outputs: list[torch.Tensor], lengths: torch.Tensor) -> list[torch.Tensor]:
    stacked = torch.stack(outputs)  # step t holds position lengths - 1 - (steps - 1 - t)
    steps = stacked.shape[0]
    positions = torch.arange(steps, device=stacked.device).reshape(steps, 1)
    source = positions + (steps - lengths.reshape(1, -1))
    valid = positions < lengths.reshape(1, -1)
    gathered = stacked[source.clamp(0, steps - 1),
                       torch.arange(stacked.shape[1], device=stacked.device)]
    return list(torch.where(valid.unsqueeze(-1), gathered, torch.zeros_like(gathered)))


def onnx_recurrent(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None,
                   lengths: torch.Tensor | None, h0: torch.Tensor | None,
                   c0: torch.Tensor | None, peepholes: torch.Tensor | None,
                   **attributes: object) -> tuple[torch.Tensor, ...]:
    """ONNX RNN / GRU / LSTM: (Y, Y_h) or (Y, Y_h, Y_c)."""
    spec = RecurrentSpec(**attributes)  # type: ignore[arg-type]
    if spec.layout:
        x = x.transpose(0, 1)
        h0 = None if h0 is None else h0.transpose(0, 1)
        c0 = None if c0 is None else c0.transpose(0, 1)
    steps, batch = x.shape[0], x.shape[1]
    size = spec.hidden
    gates = _GATES[spec.kind]
    per_direction = len(spec.activations) // spec.directions
    if b is None:
        b = x.new_zeros(spec.directions, 2 * gates * size)
    lengths = None if lengths is None else lengths.to(torch.int64)
    ys, hs, cs = [], [], []
    for d in range(spec.directions):
        names = spec.activations[d * per_direction:(d + 1) * per_direction]
        fns = [_activation(n, a, bt) for n, a, bt in zip(
            names, spec.alphas[d * per_direction:], spec.betas[d * per_direction:])]
        h = x.new_zeros(batch, size) if h0 is None else h0[d]
        c = None
        if spec.kind == "LSTM":
            c = x.new_zeros(batch, size) if c0 is None else c0[d]
        peep = None if peepholes is None else peepholes[d]
        backwards = spec.reverse or d == 1
        outputs, h, c = _run_direction(spec, fns, x, w[d], r[d], b[d, :gates * size],
                                       b[d, gates * size:], h, c, peep, lengths, backwards)
        ys.append(torch.stack(outputs) if steps else x.new_zeros(0, batch, size))
        hs.append(h)
        cs.append(c)
    y = torch.stack(ys, dim=1)  # [seq, directions, batch, hidden]
    y_h = torch.stack(hs)
    results = [y, y_h] + ([torch.stack(cs)] if spec.kind == "LSTM" else [])
    if spec.layout:
        results = [y.permute(2, 0, 1, 3)] + [t.transpose(0, 1) for t in results[1:]]
    return tuple(results)


@converter("RNN", "GRU", "LSTM")
def convert_recurrent(ctx: NodeContext) -> list[Value]:
    """RNN / GRU / LSTM with directions, sequence_lens, clip, activations and layout."""
    kind = ctx.op_type
    direction = ctx.attr("direction")
    directions = 2 if direction == "bidirectional" else 1
    activations = ctx.attr("activations", None)
    activations = tuple(activations) if activations else _DEFAULT_ACTIVATIONS[kind] * directions
    alphas = tuple(ctx.attr("activation_alpha", None) or ())
    betas = tuple(ctx.attr("activation_beta", None) or ())
    count = len(activations)
    inputs = [ctx.optional_input(i) for i in range(8)]
    cell_state, peepholes = (inputs[6], inputs[7]) if kind == "LSTM" else (None, None)
    results = ctx.call_multi(
        onnx_recurrent, inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[5],
        cell_state, peepholes, kind=kind, hidden=ctx.attr("hidden_size"),
        directions=directions, reverse=direction == "reverse",
        layout=ctx.attr("layout", 0) if ctx.since >= 14 else 0, clip=ctx.attr("clip", None),
        activations=activations,
        alphas=alphas + (None,) * (count - len(alphas)),
        betas=betas + (None,) * (count - len(betas)),
        linear_before_reset=ctx.attr("linear_before_reset", 0),
        input_forget=ctx.attr("input_forget", 0),
        num_results=3 if kind == "LSTM" else 2)
    return results
