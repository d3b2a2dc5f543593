"""The layer structure of a graph: a prologue, repeated blocks (``blocks.0``, ``blocks.1``, ...), an epilogue.

Transformers are a stack of identical blocks. This is the one layer analysis: the pipeline pass cuts
stages at block boundaries, ``recompute=True`` recomputes the blocks, and the planner and the
simulator work per *segment*: the nodes before the first block (``pre``: embeddings), each block,
and the nodes after the last block (``post``: final norm, head, loss). Blocks are found from the ``module`` attribute of nodes
(``blocks.3.attn.qkv`` is in block 3 of the container ``blocks``); functional ops captured without a
module (residual adds, activations, views) belong to the segment of the node before them.

Blocks are *uniform* when they run the same op sequence with the same wiring; then the planner can
solve one block and reuse it for all of them (see :mod:`passes.planner.intra_op`).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from ir.core import Graph, Node

_INDEXED = re.compile(r"^(?P<prefix>(?:[A-Za-z_][\w]*\.)*?[A-Za-z_][\w]*)\.(?P<index>\d+)(?:\.|$)")
PRE, POST = "pre", "post"


@dataclass
class LayerStructure:
    """A graph cut into a prologue, ``len(blocks)`` blocks and an epilogue (node lists in graph order)."""

    pre: list
    blocks: list
    post: list
    prefix: str | None = None
    """The block container's module path (``blocks``), or None when the graph has no repeated blocks."""
    uniform: bool = False
    """True when every block runs the same ops with the same wiring (see :func:`block_signature`)."""
    _position: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def flat(nodes: list) -> "LayerStructure":
        """The nodes as one segment, without blocks (the layout problem is then solved unrolled)."""
        return _structure(list(nodes), [], [], None)

    @property
    def num_layers(self) -> int:
        """The number of blocks."""
        return len(self.blocks)

    def segments(self) -> list[tuple[str, list]]:
        """``[("pre", nodes), ("blocks.0", nodes), ..., ("post", nodes)]``."""
        named = [(PRE, self.pre)]
        named += [(f"{self.prefix}.{i}", nodes) for i, nodes in enumerate(self.blocks)]
        return named + [(POST, self.post)]

    def segment_of(self, node: Node) -> tuple[str, int]:
        """(``pre``/``block``/``post``, block index or -1) of a node of this structure."""
        return self._position[id(node)][:2]

    def position(self, node: Node) -> int:
        """The node's index inside its segment's node list."""
        return self._position[id(node)][2]


def find_layers(graph: Graph, nodes: list | None = None) -> LayerStructure:
    """Cut ``graph`` (or the given node list of it) into pre / blocks / post by module paths."""
    nodes = list(graph.nodes if nodes is None else nodes)
    labels = _block_labels(nodes)
    prefix = _repeated_prefix(labels)
    if prefix is None:
        return _structure(nodes, [], [], None)
    index_of = [lab[1] if lab and lab[0] == prefix else None for lab in labels]
    current = None
    inherited = []
    for i in index_of:  # module-less ops belong to the segment of the node before them
        current = i if i is not None else current
        inherited.append(current)
    first = next(k for k, i in enumerate(index_of) if i is not None)
    last = max(k for k, i in enumerate(index_of) if i is not None)
    end = last + 1
    first_block_size = sum(1 for k in range(first, last + 1) if inherited[k] == 0)
    last_block_size = sum(1 for k in range(first, last + 1) if inherited[k] == inherited[last])
    while end < len(nodes) and not nodes[end].attrs.get("module") and last_block_size < first_block_size:
        end += 1  # the last block's trailing module-less ops (its residual add), as many as block 0 has
        last_block_size += 1
    pre = nodes[:first]
    post = nodes[end:]
    count = max(i for i in index_of if i is not None) + 1
    blocks: list[list[Node]] = [[] for _ in range(count)]
    for k in range(first, end):
        blocks[inherited[k]].append(nodes[k])
    if any(not b for b in blocks):
        return _structure(nodes, [], [], None)
    return _structure(pre, blocks, post, prefix)


def _block_labels(nodes: list) -> list:
    out = []
    for node in nodes:
        match = _INDEXED.match(node.attrs.get("module", "") or "")
        out.append((match.group("prefix"), int(match.group("index"))) if match else None)
    return out


def _repeated_prefix(labels: list) -> str | None:
    """The container whose children hold the most nodes, if it has two or more children."""
    indices: dict[str, set] = {}
    counts: Counter = Counter()
    for lab in labels:
        if lab:
            indices.setdefault(lab[0], set()).add(lab[1])
            counts[lab[0]] += 1
    candidates = [p for p, idx in indices.items() if len(idx) >= 2 and idx == set(range(len(idx)))]
    return max(candidates, key=lambda p: counts[p]) if candidates else None


def _structure(pre: list, blocks: list, post: list, prefix: str | None) -> LayerStructure:
    if prefix is None:
        pre, blocks, post = pre + [n for b in blocks for n in b] + post, [], []
    out = LayerStructure(pre, blocks, post, prefix)
    for k, node in enumerate(pre):
        out._position[id(node)] = (PRE, -1, k)
    for i, block in enumerate(blocks):
        for k, node in enumerate(block):
            out._position[id(node)] = ("block", i, k)
    for k, node in enumerate(post):
        out._position[id(node)] = (POST, -1, k)
    out.uniform = bool(blocks) and len({block_signature(out, b) for b in blocks}) == 1
    return out


def block_signature(structure: LayerStructure, block: list) -> tuple:
    """What must match for two blocks to be interchangeable: ops, output types and wiring by position."""
    own = {id(n) for n in block}
    items = []
    for node in block:
        wires = []
        for v in node.input_values():
            if v.producer is not None and id(v.producer) in own:
                wires.append(("in", structure.position(v.producer), v.producer.outputs.index(v)))
            elif v.kind in ("param", "buffer"):
                wires.append(("param", str(v.type)))
            else:
                wires.append(("ext", str(v.type)))
        items.append((node.op, tuple(str(o.type) for o in node.outputs), tuple(wires)))
    return tuple(items)


def block_param_name(name: str, prefix: str | None) -> str:
    """``blocks.7.attn.qkv.weight`` -> ``blocks.*.attn.qkv.weight`` (names outside blocks unchanged)."""
    if prefix is None or not name.startswith(prefix + "."):
        return name
    rest = name[len(prefix) + 1:]
    index, _, tail = rest.partition(".")
    return f"{prefix}.*.{tail}" if index.isdigit() else name
