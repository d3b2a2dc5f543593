"""Per-device memory of a training step: parameters, gradients, optimizer state and activations
(including the Megatron-LM activation formula), and what an optimizer step reads and writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import sympy

from cluster import Device
from cost.ops import Shape, numel

OPTIMIZER_STATES = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}
"""Optimizer state tensors per parameter: SGD none (momentum: one buffer), Adam/AdamW two moments. torch
keeps them in the parameter's dtype (``zeros_like``); mixed precision keeps them in fp32."""

OPTIMIZER_STATE_BYTES_PER_PARAM = {name: 4 * n for name, n in OPTIMIZER_STATES.items()}
"""fp32 optimizer state per parameter."""

OPTIMIZER_STEP_ACCESSES = {"sgd": 3, "sgd_momentum": 5, "adam": 7, "adamw": 7}
"""Elements read or written per parameter by one optimizer step: the parameter (read, written), its
gradient (read) and each state (read, written)."""

OPTIMIZER_STEP_BYTES = {name: 4 * n for name, n in OPTIMIZER_STEP_ACCESSES.items()}
"""Bytes read and written per parameter by one fp32 optimizer step."""


def state_element_bytes(param_bytes: float, master_weights: bool) -> float:
    """Bytes of one optimizer state element: fp32 beside master weights, else the parameter's size."""
    return 4 if master_weights else param_bytes


def optimizer_step_bytes(optimizer: str, param_bytes: float, master_weights: bool) -> float:
    """Bytes one optimizer step reads and writes per parameter of ``param_bytes`` (with master weights the
    update runs on the fp32 copy and its fp32 states, then writes the low-precision parameter)."""
    if not master_weights:
        return OPTIMIZER_STEP_ACCESSES[optimizer] * param_bytes
    return OPTIMIZER_STEP_BYTES[optimizer] + param_bytes

PIPELINE_SCHEDULES = ("none", "1f1b", "gpipe", "zb-h1")
"""The one-stage-per-rank schedules :func:`in_flight_microbatches` knows in closed form."""


def param_memory(params: int | sympy.Expr | Iterable[Shape], dtype_bytes: int = 4) -> sympy.Expr:
    """Bytes of parameters given as a count or as shapes (ints or sympy symbols)."""
    if isinstance(params, (int, sympy.Expr)):
        count = sympy.sympify(params)
    else:
        count = sum((numel(s) for s in params), sympy.Integer(0))
    return dtype_bytes * count


def in_flight_microbatches(schedule: str, num_stages: int, stage_index: int, num_microbatches: int) -> int:
    """Microbatches whose activations a stage holds at its peak: 1F1B p - i (at most m), GPipe m, none 1,
    ZB-H1 p (at most m: p - i before their backward, up to i more waiting for their W)."""
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"expected a pipeline schedule in {PIPELINE_SCHEDULES}, found {schedule!r}")
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"expected stage_index in 0..{num_stages - 1}, found {stage_index}")
    if schedule == "1f1b":
        return min(num_stages - stage_index, num_microbatches)
    if schedule == "zb-h1":
        return min(num_stages, num_microbatches)
    return num_microbatches if schedule == "gpipe" else 1


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-device bytes at the peak of a training step, split by what holds them."""

    parameters: Any
    gradients: Any
    optimizer_state: Any
    activations: Any

    @property
    def total(self) -> Any:
        """Sum of all parts (a number, or a sympy expression if any part is symbolic)."""
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def fits(self, device: Device, headroom: float = 0.9) -> bool:
        """Whether :attr:`total` stays under ``headroom`` of the device's memory (needs numeric parts)."""
        return float(self.total) <= headroom * device.memory_bytes

    @classmethod
    def estimate(cls, num_params: Any, activation_bytes: Any, *, stage_input_bytes: Any = 0,
                 optimizer: str = "adamw", param_dtype_bytes: int = 4, grad_dtype_bytes: int | None = None,
                 master_weights: bool | None = None, schedule: str = "none", num_stages: int = 1,
                 stage_index: int = 0, num_microbatches: int = 1, recompute: bool = False,
                 trainable_params: Any = None, optimizer_shards: int = 1) -> "MemoryEstimate":
        """Memory of one device holding ``num_params`` parameters of a pipeline stage.

        ``activation_bytes`` is what one microbatch keeps for backward on this stage; ``stage_input_bytes``
        the stage's input per microbatch. Without recomputation every in-flight microbatch keeps its
        activations; with it they keep only the stage input, plus one microbatch re-materialised during
        its backward. Mixed precision (params under 4 bytes) adds an fp32 master copy and keeps the
        optimizer state (:data:`OPTIMIZER_STATES`) in fp32 unless ``master_weights`` says otherwise
        (False: pure low-precision training, the state in the parameters' dtype).
        Gradients, optimizer state and master copies exist for the ``trainable_params`` only (default:
        all ``num_params``; frozen parameters have none). ``optimizer_shards``: the ranks that split the optimizer
        state and master copies between them (a distributed optimizer; 1: each keeps all of it).
        """
        if optimizer not in OPTIMIZER_STATES:
            raise ValueError(f"expected an optimizer in {sorted(OPTIMIZER_STATES)}, found {optimizer!r}")
        master = param_dtype_bytes < 4 if master_weights is None else master_weights
        trainable = num_params if trainable_params is None else trainable_params
        state = OPTIMIZER_STATES[optimizer] * state_element_bytes(param_dtype_bytes, master)
        optimizer_bytes = (state + (4 if master else 0)) * trainable / optimizer_shards
        in_flight = in_flight_microbatches(schedule, num_stages, stage_index, num_microbatches)
        kept = in_flight * stage_input_bytes + activation_bytes if recompute else in_flight * activation_bytes
        return cls(parameters=param_dtype_bytes * num_params,
                   gradients=(grad_dtype_bytes or param_dtype_bytes) * trainable,
                   optimizer_state=optimizer_bytes, activations=kept)


RECOMPUTE_MODES = ("none", "selective", "full")


def megatron_activation_bytes(s: Any, b: Any, h: Any, a: Any, t: Any = 1, sequence_parallel: bool = False,
                              recompute: str = "none") -> sympy.Expr:
    """Activation bytes one transformer layer keeps for backward (Korthikanti et al., 2022, 16-bit).

    ``s`` sequence length, ``b`` microbatch size, ``h`` hidden size, ``a`` attention heads, ``t``
    tensor-parallel size. none: sbh(34 + 5as/h); tensor parallel: sbh(10 + 24/t + 5as/(ht)); tensor +
    sequence parallel: (sbh/t)(34 + 5as/h); selective recompute: 34·sbh/t with sequence parallelism
    (sbh(10 + 24/t) without, as in the paper); full recompute: 2sbh (only the layer input).
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"expected recompute in {RECOMPUTE_MODES}, found {recompute!r}")
    s, b, h, a, t = (sympy.sympify(v) for v in (s, b, h, a, t))
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh
    if recompute == "selective":
        return 34 * sbh / t if sequence_parallel else sbh * (10 + 24 / t)
    if sequence_parallel:
        return sbh / t * (34 + 5 * a * s / h)
    return sbh * (10 + 24 / t + 5 * a * s / (h * t))
