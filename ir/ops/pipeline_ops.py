"""Pipeline ops: the stage-to-stage transfer, and the action lists that schedule a pipeline.

After the ``pipeline`` pass a graph is cut into stages. Every node has ``attrs["stage"]``; stage
``s`` runs on its own mesh ``stage<s>`` (same axes and shape for every stage, other devices).
A value that crosses from stage ``s`` to stage ``s + 1`` goes through a transfer node::

    %x.s1: f32[batch, seq, 64] (S(0)) @stage1 = comm.send_recv(%x, src="stage0", dst="stage1", slot=0)

It keeps the type and the SBP; each device of the source mesh sends its local tensor to the
device at the same mesh coordinates of the destination mesh (its adjoint sends the gradient back).
The transfer outputs of a stage are its *entries*, their inputs in the previous stage that
stage's *exits*, both ordered by ``slot``. The graph describes one microbatch; nodes marked
``whole_batch`` are computed once per step on the whole batch (the global token count of a mean
loss). The graph attributes ``pipeline`` (stage count, positions, microbatches, schedule),
``schedule`` (one action list per device, in the text of :func:`format_actions`), ``paths``
(per-microbatch stage paths, SkipPipe only) and ``tied_params`` complete the program.

The action vocabulary (``F3@s1``, ``SEND_F3@s1->r2``, ...) lives here, in the IR, because both
the passes that build schedules and the backends that run them read it. ``F`` is a stage's forward
on one microbatch, ``B`` its backward, ``W`` the weight-gradient part of that backward for the
zero-bubble schedules: where a schedule has a ``W`` for a (stage, microbatch), its ``B`` computes
only the gradients of the stage's inputs (what goes back to the previous stage) and the ``W``, later
on the same rank, the gradients of the stage's parameters; a ``B`` without a ``W`` does both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ir.core import Graph, Node, Value
from ir.ops.registry import Signature, register

SEND_RECV = "comm.send_recv"
TRANSFER_OPS = (SEND_RECV,)
WHOLE_BATCH = "whole_batch"
"""Node attribute: computed once per step on the whole batch, not per microbatch."""

COMPUTE_KINDS = ("F", "B", "W")
SEND_KINDS = ("SEND_F", "SEND_B")
RECV_KINDS = ("RECV_F", "RECV_B")
ACTION_KINDS = COMPUTE_KINDS + SEND_KINDS + RECV_KINDS

_ACTION_RE = re.compile(r"^(F|B|W|SEND_F|SEND_B|RECV_F|RECV_B)(\d+)@s(\d+)(?:(->|<-)r(\d+))?$")
_RANK_LINE_RE = re.compile(r"^r(\d+):(.*)$")


def stage_mesh_name(stage: int) -> str:
    """The name of the mesh that holds pipeline stage ``stage``."""
    return f"stage{stage}"


def stage_index(mesh_name: str) -> int:
    """The stage held by the mesh called ``mesh_name`` (the inverse of :func:`stage_mesh_name`)."""
    if not (mesh_name.startswith("stage") and mesh_name[5:].isdigit()):
        raise ValueError(f"expected a stage mesh name such as stage0, found {mesh_name!r}")
    return int(mesh_name[5:])


def _transfer_signature(node: Node) -> list[Signature]:
    raise ValueError(f"{node.op} is inserted by the pipeline pass; it is never chosen by propagation")


register(*TRANSFER_OPS, doc="pipeline stage-to-stage transfer")(_transfer_signature)


def transfer_problem(graph: Graph, node: Node) -> str | None:
    """Why a transfer node is malformed (for the verifier), or None when it is fine."""
    values, outs = node.input_values(), node.outputs
    if len(values) != 1 or len(outs) != 1:
        return f"{node.op} moves one value, found {len(values)} input(s) and {len(outs)} output(s)"
    (x,), (y,) = values, outs
    src, dst = node.kwargs.get("src"), node.kwargs.get("dst")
    if x.mesh != src or y.mesh != dst:
        return (f"{node.op} says src={src!r} dst={dst!r}, but moves %{x.name} @{x.mesh} to "
                f"%{y.name} @{y.mesh}; the kwargs must name the meshes of the two values")
    if x.type != y.type or x.sbp != y.sbp:
        return (f"{node.op} keeps the type and layout, but %{x.name} is {x.type} and %{y.name} is {y.type} "
                "(or their SBPs differ)")
    a, b = graph.meshes[src], graph.meshes[dst]
    if (a.axes, a.shape) != (b.axes, b.shape):
        return (f"{node.op} pairs devices by mesh coordinates, so @{src} {a} and @{dst} {b} need the same "
                "axes and shape")
    return None


class ActionSyntaxError(ValueError):
    """Text that is not an action or an action list."""


@dataclass(frozen=True)
class Action:
    """One step of one rank's pipeline program."""

    kind: str
    """One of ``F``, ``B``, ``W`` (the weight gradients of a split backward), ``SEND_F``, ``RECV_F``,
    ``SEND_B``, ``RECV_B``."""
    stage: int
    """Global stage index (virtual stages included); for send/recv the stage that produced the value."""
    microbatch: int
    """Microbatch index."""
    peer: int | None = None
    """The rank on the other side of a send/recv; None for F, B and W."""

    def __post_init__(self) -> None:
        if self.kind not in ACTION_KINDS:
            raise ValueError(f"action kind must be one of {', '.join(ACTION_KINDS)}, found {self.kind!r}")
        if self.stage < 0 or self.microbatch < 0:
            raise ValueError(f"stage and microbatch must be >= 0, found stage={self.stage} "
                             f"microbatch={self.microbatch} in a {self.kind} action")
        if self.is_compute != (self.peer is None):
            need = "no peer" if self.is_compute else "a peer rank"
            raise ValueError(f"a {self.kind} action takes {need}, found peer={self.peer!r}")

    @property
    def is_compute(self) -> bool:
        """True for F, B and W."""
        return self.kind in COMPUTE_KINDS

    @property
    def is_send(self) -> bool:
        """True for SEND_F and SEND_B."""
        return self.kind in SEND_KINDS

    @property
    def is_recv(self) -> bool:
        """True for RECV_F and RECV_B."""
        return self.kind in RECV_KINDS

    @property
    def direction(self) -> str:
        """``F`` for forward work and activations, ``B`` for backward work and gradients, ``W`` for
        weight-gradient work."""
        return self.kind[-1]

    @property
    def value(self) -> tuple[str, int, int]:
        """What the action computes or carries: (direction, stage, microbatch)."""
        return (self.direction, self.stage, self.microbatch)

    def __str__(self) -> str:
        text = f"{self.kind}{self.microbatch}@s{self.stage}"
        if self.is_send:
            return f"{text}->r{self.peer}"
        if self.is_recv:
            return f"{text}<-r{self.peer}"
        return text

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse ``F3@s1``, ``SEND_F3@s1->r2`` or ``RECV_F3@s1<-r0``; the inverse of ``str``."""
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ActionSyntaxError("expected an action such as F3@s1, B3@s1, W3@s1, SEND_F3@s1->r2 or "
                                    f"RECV_B3@s2<-r1, found {text!r}")
        kind, microbatch, stage, arrow, peer = match.groups()
        expected_arrow = {"SEND": "->", "RECV": "<-"}.get(kind.split("_")[0])
        if arrow != expected_arrow:
            wanted = f"'{expected_arrow}r<rank>'" if expected_arrow else "no peer"
            raise ActionSyntaxError(f"a {kind} action takes {wanted}, found {text!r}")
        return cls(kind, int(stage), int(microbatch), None if peer is None else int(peer))




def format_actions(actions: Mapping[int, Sequence[Action]]) -> str:
    """One line per rank, ``r0: F0@s0 SEND_F0@s0->r1 ...``, ranks ascending."""
    return "\n".join(f"r{rank}: " + " ".join(str(a) for a in actions[rank]) for rank in sorted(actions))


def parse_actions(text: str) -> dict[int, list[Action]]:
    """Parse the text of :func:`format_actions` back; errors name the line and the bad token."""
    schedule: dict[int, list[Action]] = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _RANK_LINE_RE.match(line.strip())
        if match is None:
            raise ActionSyntaxError(f"line {line_number}: expected 'r<rank>: <actions>', found {line!r}")
        rank = int(match.group(1))
        if rank in schedule:
            raise ActionSyntaxError(f"line {line_number}: rank {rank} is listed a second time")
        schedule[rank] = [_parse_token(token, line_number) for token in match.group(2).split()]
    return schedule


def _parse_token(token: str, line_number: int) -> Action:
    try:
        return Action.parse(token)
    except ActionSyntaxError as error:
        raise ActionSyntaxError(f"line {line_number}: {error}") from None



def schedule_attr(actions: Mapping[int, Sequence[Action]]) -> dict[str, str]:
    """The ``schedule`` graph attribute: ``{"r0": "F0@s0 SEND_F0@s0->r1 ...", ...}``."""
    return {f"r{rank}": " ".join(str(a) for a in actions[rank]) for rank in sorted(actions)}


def schedule_actions(graph: Graph) -> dict[int, list[Action]]:
    """Each device's action list, read back from the ``schedule`` graph attribute."""
    attr = graph.attrs.get("schedule")
    if not isinstance(attr, dict):
        raise ValueError(f"graph {graph.name} has no schedule attribute; run the pipeline pass first")
    return parse_actions("\n".join(f"{rank}: {text}" for rank, text in attr.items()))


# -- reading a pipelined graph ------------------------------------------------------------------

@dataclass
class PipelineStage:
    """What one stage of a pipelined graph computes, read from the IR."""

    index: int
    """Stage number (virtual stages included)."""
    mesh: str
    """The mesh holding the stage."""
    nodes: list = field(default_factory=list)
    """Per-microbatch nodes in order (without the transfers into the stage)."""
    whole_batch_nodes: list = field(default_factory=list)
    """Nodes computed once per step on the whole batch."""
    entries: list = field(default_factory=list)
    """Values received from the previous stage, by slot (outputs of transfer nodes)."""
    exits: list = field(default_factory=list)
    """Values sent to the next stage, by slot (inputs of transfer nodes)."""
    inputs: list = field(default_factory=list)
    """Graph inputs placed on this stage."""
    params: list = field(default_factory=list)
    """Parameters and buffers placed on this stage (tied ones have a copy per stage)."""


def is_pipelined(graph: Graph) -> bool:
    """Whether the pipeline pass has cut this graph into stages."""
    return isinstance(graph.attrs.get("pipeline"), dict)


def pipeline_stages(graph: Graph) -> list[PipelineStage]:
    """The stages of a pipelined graph, with their entries and exits in slot order."""
    count = int(graph.attrs["pipeline"]["stages"])
    stages = [PipelineStage(s, stage_mesh_name(s)) for s in range(count)]
    entries: dict[int, dict[int, Value]] = {s: {} for s in range(count)}
    exits: dict[int, dict[int, Value]] = {s: {} for s in range(count)}
    for node in graph.nodes:
        stage = _stage_of(node, count)
        if node.op in TRANSFER_OPS:
            slot = int(node.kwargs["slot"])
            entries[stage][slot] = node.outputs[0]
            exits[stage - 1][slot] = node.input_values()[0]
        elif node.attrs.get(WHOLE_BATCH):
            stages[stage].whole_batch_nodes.append(node)
        else:
            stages[stage].nodes.append(node)
    by_mesh = {st.mesh: st for st in stages}
    for v in graph.inputs:
        by_mesh[v.mesh].inputs.append(v)
    for p in graph.params:
        by_mesh[p.mesh].params.append(p)
    for st in stages:
        st.entries = [entries[st.index][k] for k in sorted(entries[st.index])]
        st.exits = [exits[st.index][k] for k in sorted(exits[st.index])]
    return stages


def _stage_of(node: Node, count: int) -> int:
    stage = node.attrs.get("stage")
    if not isinstance(stage, int) or not 0 <= stage < count:
        raise ValueError(f"node %{node.name} ({node.op}) has stage {stage!r}; a pipelined graph gives every "
                         f"node a stage in 0..{count - 1}")
    return stage


def microbatch_paths(graph: Graph) -> list[list[int]]:
    """Per microbatch, the stages it visits in order (every stage unless SkipPipe chose paths)."""
    info = graph.attrs["pipeline"]
    paths = graph.attrs.get("paths")
    if paths:
        return [list(p) for p in paths]
    return [list(range(int(info["stages"]))) for _ in range(int(info["microbatches"]))]


def tied_groups(graph: Graph) -> list[list[Value]]:
    """Groups of parameter copies (one per stage using them) whose gradients are summed."""
    return [list(group) for group in graph.attrs.get("tied_params", [])]
