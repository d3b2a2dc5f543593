"""SBP layouts: how one logical tensor is held by the devices of one mesh axis.

``S(d)`` splits tensor dim ``d`` evenly over the axis, ``B`` broadcasts (every device holds the whole
tensor), ``P(sum)`` / ``P(max)`` hold full-shaped partial values whose element-wise sum (max) is the
logical tensor. On an N-D mesh a layout is an :data:`NdSbp`, one entry per mesh axis.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Split:
    """Each device of the axis holds a contiguous, equal slice of tensor dim ``dim``."""

    dim: int
    """The tensor dimension that is split (non-negative)."""

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Broadcast:
    """Each device of the axis holds the whole tensor."""

    def __str__(self) -> str:
        return "B"


@dataclass(frozen=True)
class Partial:
    """Each device holds a full-shaped partial value; ``op`` combines them into the logical tensor."""

    op: str = "sum"
    """How the partial values combine: ``sum`` or ``max``."""

    def __str__(self) -> str:
        return f"P({self.op})"


Sbp = Union[Split, Broadcast, Partial]
NdSbp = tuple  # tuple[Sbp, ...], one entry per mesh axis

B = Broadcast()
P = Partial("sum")
PMAX = Partial("max")
PARTIAL_OPS = ("sum", "max")

IN_SBP_ATTR = "in_sbp"
"""Node attribute: the N-D SBP each input must arrive in for the node's chosen signature (set by
propagation, reconciled and removed by boxing; printed in the IR)."""

PINNED_ATTR = "pinned"
"""Graph attribute: value name -> the N-D SBP propagation must use for that value (a parameter layout
the user gave; the gathered layout of an FSDP-sharded parameter; printed in the IR)."""

_SBP_RE = re.compile(r"^\s*(?:S\(\s*(-?\d+)\s*\)|B|P(?:\(\s*(sum|max)\s*\))?)\s*$")


class SbpSyntaxError(ValueError):
    """A string that is not an SBP value."""


def S(dim: int) -> Split:
    """Shorthand for :class:`Split`."""
    return Split(dim)


def parse_sbp(text: str) -> Sbp:
    """Parse ``S(0)``, ``B``, ``P``, ``P(sum)`` or ``P(max)``; the inverse of ``str``."""
    m = _SBP_RE.match(text)
    if not m:
        raise SbpSyntaxError(f"expected an SBP value such as S(0), B, P(sum) or P(max), found {text!r}")
    if m.group(1) is not None:
        return Split(int(m.group(1)))
    if text.strip() == "B":
        return B
    return Partial(m.group(2) or "sum")


def parse_nd_sbp(text: str) -> NdSbp:
    """Parse ``(S(0), B)`` or a bare ``S(0)`` into an N-D SBP tuple."""
    inner = text.strip()
    if inner.startswith("(") and inner.endswith(")") and not _SBP_RE.match(inner):
        inner = inner[1:-1]
    parts = [p for p in re.split(r",(?![^()]*\))", inner) if p.strip()]
    return tuple(parse_sbp(p) for p in parts)


def format_nd_sbp(nd: NdSbp) -> str:
    """The text form of an N-D SBP: ``(S(0), B)``."""
    return "(" + ", ".join(str(s) for s in nd) + ")"


def dual(sbp: Sbp) -> Sbp:
    """The layout of the gradient of a value held in ``sbp``: B <-> P(sum), S stays S."""
    if isinstance(sbp, Broadcast):
        return P
    if isinstance(sbp, Partial):
        if sbp.op != "sum":
            raise ValueError(f"a value held as {sbp} has no dual gradient layout")
        return B
    return sbp


def nd_dual(nd: NdSbp) -> NdSbp:
    """:func:`dual` applied on every mesh axis."""
    return tuple(dual(s) for s in nd)


def is_split(sbp: Sbp, dim: int | None = None) -> bool:
    """True for ``S(dim)`` (any split when ``dim`` is None)."""
    return isinstance(sbp, Split) and (dim is None or sbp.dim == dim)


def split_dims(nd: NdSbp) -> list[int]:
    """The tensor dims split by some mesh axis, in mesh-axis order."""
    return [s.dim for s in nd if isinstance(s, Split)]


def all_sbp_values(ndim: int, partial_ops: tuple[str, ...] = ("sum",)) -> list[Sbp]:
    """Every 1-D SBP value for a tensor of ``ndim`` dims."""
    return [B, *(Split(d) for d in range(ndim)), *(Partial(op) for op in partial_ops)]
