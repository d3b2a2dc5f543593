"""Sharded parameters (FSDP): gathered just before use, freed after it, gathered again for backward.

Autograd would keep a gathered parameter alive until backward; instead, what it saves of it is packed
as the shard and gathered again when backward needs it, so each full weight lives only around its use.

Gathers go by layer, as ``fully_shard`` on each block does. The first step gathers shard by shard and
records, per phase (``forward``, ``backward``), the order of the gathers; the order is then cut into
segments: the longest runs of consecutive gathers of one layer (parameters whose names share the prefix up
to their first index, ``blocks.0`` of ``blocks.0.attn.qkv.weight``; parameters outside indexed layers form
runs of their own) on one mesh axis. From the second step on, a segment is one collective: its shards,
flattened and concatenated (as bytes where bf16 and fp32 shards mix), are all-gathered at once and split
again; in backward, the gradients of a forward segment's parameters are reduce-scattered together, with one
collective, once the layer's backward has made them all. Each segment's gather is launched asynchronously
one segment ahead: forward's first when forward starts, each next one when the tensors of the one before it
are taken, and backward's first when forward's last is taken, so their communication runs while the
current layer computes. Forward's last segment is not gathered again: backward needs it first, so it stays
(as ``fully_shard`` keeps the root's parameters). Every rank runs the same forward and backward, so all
launch the same collectives in the same order.

A plan that computes in a lower precision than its parameters (``bf16-mixed``) casts such a shard before
gathering it (``dtype``): the gather moves half the bytes, and the fp32 shard stays what the optimizer
updates; the gradients are reduce-scattered in ``grad_dtype`` (the plan's reduce dtype) and reach the
parameter unrounded, in its own dtype.
"""
import functools
import re

import torch
import torch.distributed as dist

from .collectives import _all_gather
from .core import GROUPS
from .regather import regathering, remember_gather

LAYER_PREFIX = re.compile(r"^(.*?[._]\d+)(?:[._]|$)")  # a name up to its first index: blocks.0, layers_3


def layer_of(name):
    """The layer a parameter belongs to for gathering: its name up to the first index (``blocks.0``), or ''."""
    match = LAYER_PREFIX.match(name)
    return match.group(1) if match else ""


def _cast(shard, dtype):
    return shard if dtype is None or shard.dtype == dtype else shard.to(dtype)


def _gather_shard(shard, axis, dim, dtype=None):
    """The full tensor of one shard (cast to ``dtype`` first), gathered now."""
    return _all_gather(_cast(shard.detach(), dtype), axis, dim)


def _reduce_scatter_grads(grads, axis, dims, grad_dtype):
    """This rank's parts of the sums over ``axis`` of several full gradients (each split on its dim of
    ``dims``), summed in ``grad_dtype`` (default: theirs) with one collective; None stays None. The parts come
    back in the dtype they were summed in (autograd gives a parameter its gradient in its own dtype)."""
    group, ranks, me = GROUPS[axis]
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return [None] * len(grads)
    chunks = [[c.reshape(-1) for c in _cast(grads[i], grad_dtype).chunk(len(ranks), dim=dims[i])] for i in present]
    inputs = [torch.cat([c[r] for c in chunks]) for r in range(len(ranks))]  # rank r's part of every gradient
    mine = torch.empty_like(inputs[me])
    dist.reduce_scatter(mine, inputs, group=group)
    parts = mine.split([c[me].numel() for c in chunks])
    shards = [None] * len(grads)
    for i, part in zip(present, parts):
        shape = list(grads[i].shape)
        shape[dims[i]] //= len(ranks)
        shards[i] = part.view(shape)
    return shards


class GatherShard(torch.autograd.Function):
    """S(d) -> B for one parameter shard (cast to ``dtype`` first); backward reduce-scatters its gradient in
    ``grad_dtype``."""

    @staticmethod
    def forward(ctx, shard, axis, dim, dtype=None, grad_dtype=None):
        ctx.axis, ctx.dim, ctx.grad_dtype = axis, dim, grad_dtype
        return _gather_shard(shard, axis, dim, dtype)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_grads([grad], ctx.axis, [ctx.dim], ctx.grad_dtype)[0], None, None, None, None


class FlatGather:
    """One asynchronous all-gather of several shards on one mesh axis: each cast to its dtype of ``dtypes`` (None:
    its own), flattened and concatenated into one buffer (as bytes when their dtypes differ, each padded to 8
    bytes so that every one starts aligned); ``result()`` waits for it and splits each rank's buffer into the
    full tensors."""

    def __init__(self, shards, axis, dims, dtypes):
        group, ranks, _ = GROUPS[axis]
        flats = [_cast(s.detach(), dtype).reshape(-1) for s, dtype in zip(shards, dtypes)]
        self.as_bytes = len({f.dtype for f in flats}) > 1
        if self.as_bytes:
            flats = [torch.nn.functional.pad(f.view(torch.uint8), (0, -f.nbytes % 8)) for f in flats]
        self.dtypes, self.sizes = [dtype or s.dtype for s, dtype in zip(shards, dtypes)], [f.numel() for f in flats]
        flat = torch.cat(flats)
        self.parts = [torch.empty_like(flat) for _ in ranks]
        self.work = dist.all_gather(self.parts, flat, group=group, async_op=True)
        self.shapes, self.dims = [s.shape for s in shards], dims

    def result(self):
        self.work.wait()
        pieces = [part.split(self.sizes) for part in self.parts]
        return [torch.cat([self._piece(rank[i], i) for rank in pieces], dim=self.dims[i]) for i in range(len(self.shapes))]

    def _piece(self, flat, i):
        if self.as_bytes:
            flat = flat[:self.shapes[i].numel() * self.dtypes[i].itemsize].view(self.dtypes[i])
        return flat.view(self.shapes[i])


class GatherLayer(torch.autograd.Function):
    """S(d) -> B for a segment's parameter shards at once, from its ``FlatGather``; backward reduce-scatters
    their gradients together (one collective, in ``grad_dtype``)."""

    @staticmethod
    def forward(ctx, flat, axis, dims, grad_dtype, *shards):
        ctx.axis, ctx.dims, ctx.grad_dtype = axis, dims, grad_dtype
        ctx.set_materialize_grads(False)  # an unused output gets no gradient (and nothing is reduced for it)
        return tuple(flat.result())

    @staticmethod
    def backward(ctx, *grads):
        return None, None, None, None, *_reduce_scatter_grads(grads, ctx.axis, ctx.dims, ctx.grad_dtype)


class Gathered:
    """One gather of the learned order: the shard (forward: the parameter itself), how it is gathered, and
    what groups it with its neighbours into a segment."""

    def __init__(self, shard, axis, dim, dtype, grad_dtype, layer, source=None):
        self.key = (shard.data_ptr(), axis, dim)
        self.shard, self.axis, self.dim, self.dtype, self.grad_dtype = shard, axis, dim, dtype, grad_dtype
        reduced = shard.requires_grad  # forward: the gradients of a segment are reduce-scattered together
        self.group = (layer, axis, reduced, (grad_dtype or dtype or shard.dtype) if reduced else None)
        self.source = source  # backward: the position in forward's order of the gather that made the tensor


def _segments(order):
    """The learned order cut into runs of consecutive gathers of one group: one layer and axis, and in forward
    one dtype their gradients are reduce-scattered in (frozen parameters apart)."""
    runs = []
    for i, gathered in enumerate(order):
        if runs and order[runs[-1][0]].group == gathered.group:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


class GatherPrefetch:
    """The order of a step's gathers per phase, learned on the first step, cut into segments gathered one
    collective each and launched one segment ahead (see the module's docstring). A gather off the learned
    order (a recomputed region) runs at once, alone."""

    def __init__(self):
        self.orders = {"forward": [], "backward": []}  # Gathered, in the order of the first step
        self.segments = {}  # phase -> [[positions in its order]], once learned
        self.segment_of = {}  # phase -> the segment of each position
        self.cursor = {"forward": 0, "backward": 0}  # the position in the order of the next gather
        self.launched = {}  # (phase, segment) -> its FlatGather, launched ahead of use
        self.ready = {}  # (phase, position) -> the full tensor, gathered with its segment, not yet taken
        self.taken = set()  # (phase, segment) gathered in this forward and its backward
        self.names = {}  # shard address -> parameter name, while learning
        self.phase = None

    def start_forward(self, params):
        """A forward begins (``params``: the parameters by name): orders recorded so far are complete; what was
        launched before is waited for; forward's first segment is launched."""
        for phase, order in self.orders.items():
            if order and phase not in self.segments:
                if phase == "backward":  # what forward's last segment gathers is kept for backward, not gathered again
                    order[:] = [g for g in order if not self.keeps(g.source)]
                self.segments[phase] = _segments(order)
                self.segment_of[phase] = [s for s, run in enumerate(self.segments[phase]) for _ in run]
        for flat in self.launched.values():
            flat.work.wait()
        self.launched.clear()
        self.ready.clear()
        self.taken.clear()
        self.cursor = {"forward": 0, "backward": 0}
        self.names = {} if len(self.segments) == 2 else {t.data_ptr(): n for n, t in params.items()}
        self.phase = "forward"
        self.launch("forward", 0)

    def forward_gather(self, shard, axis, dim, dtype, grad_dtype):
        """The full tensor of a parameter ``shard`` in forward, and its position in forward's order (None off it):
        with its segment (one collective, launched ahead), or alone while learning or off the order."""
        if "forward" not in self.segments:
            self._record("forward", shard, axis, dim, dtype, grad_dtype)
            return GatherShard.apply(shard, axis, dim, dtype, grad_dtype), len(self.orders["forward"]) - 1
        position = self._position("forward", (shard.data_ptr(), axis, dim))
        if ("forward", position) in self.ready:
            return self.ready.pop(("forward", position)), position
        segment = self.segment_of["forward"][position] if position is not None else None
        if segment is None or self.segments["forward"][segment][0] != position or ("forward", segment) in self.taken:
            return GatherShard.apply(shard, axis, dim, dtype, grad_dtype), position
        members = [self.orders["forward"][i] for i in self.segments["forward"][segment]]
        fulls = GatherLayer.apply(self._take("forward", segment), axis, [m.dim for m in members], grad_dtype,
                                  *[m.shard for m in members])
        self.ready.update({("forward", i): full for i, full in zip(self.segments["forward"][segment][1:], fulls[1:])})
        return fulls[0], position

    def keeps(self, position):
        """Whether the tensor gathered at ``position`` of forward's order stays for backward: forward's last
        segment, which backward needs first (as ``fully_shard`` keeps the root's parameters)."""
        return position is not None and "forward" in self.segments and position in self.segments["forward"][-1]

    def backward_gather(self, shard, axis, dim, dtype, source):
        """The full tensor of a shard saved in forward (gathered at ``source`` in forward's order), for backward:
        from its segment's gather, launched ahead."""
        if "backward" not in self.segments:
            self._record("backward", shard, axis, dim, dtype, None, source)
            return _gather_shard(shard, axis, dim, dtype)
        position = self._position("backward", (shard.data_ptr(), axis, dim))
        if position is None:
            return _gather_shard(shard, axis, dim, dtype)
        if ("backward", position) not in self.ready:
            segment = self.segment_of["backward"][position]
            if ("backward", segment) in self.taken:
                return _gather_shard(shard, axis, dim, dtype)
            positions = self.segments["backward"][segment]
            self.ready.update({("backward", i): full for i, full in zip(positions, self._take("backward", segment).result())})
        return self.ready.pop(("backward", position))

    def launch(self, phase, segment):
        """Start the gather of ``phase``'s ``segment`` (at most once per forward and backward)."""
        if phase not in self.segments or segment >= len(self.segments[phase]) \
                or (phase, segment) in self.launched or (phase, segment) in self.taken:
            return
        members = [self.orders[phase][i] for i in self.segments[phase][segment]]
        self.launched[(phase, segment)] = FlatGather([m.shard for m in members], members[0].axis,
                                                     [m.dim for m in members], [m.dtype for m in members])

    def _take(self, phase, segment):
        """The segment's gather (launched now if it was not ahead), and the launch of the one after it."""
        self.launch(phase, segment)
        flat = self.launched.pop((phase, segment))
        self.taken.add((phase, segment))
        if segment + 1 < len(self.segments[phase]):
            self.launch(phase, segment + 1)
        elif phase == "forward":
            self.launch("backward", 0)
        return flat

    def _record(self, phase, shard, axis, dim, dtype, grad_dtype, source=None):
        layer = layer_of(self.names.get(shard.data_ptr(), ""))
        self.orders[phase].append(Gathered(shard if phase == "forward" else shard.detach(), axis, dim, dtype,
                                           grad_dtype, layer, source))

    def _position(self, phase, key):
        order = self.orders[phase]
        position = next((i for i in range(self.cursor[phase], len(order)) if order[i].key == key), None)
        if position is not None:
            self.cursor[phase] = position + 1
        return position


PREFETCH = GatherPrefetch()


def comm_gather_param(shard, axis, dim, dtype=None, grad_dtype=None):
    """S(d) -> B for a parameter shard, cast to ``dtype`` (the plan's compute dtype) before the gather when
    given; the full tensor is freed after use, gathered again in backward (whose reduce-scatter runs in
    ``grad_dtype``, default the gradient's)."""
    if PREFETCH.phase == "forward":
        full, position = PREFETCH.forward_gather(shard, axis, dim, dtype, grad_dtype)
    else:  # outside a regathering forward (a recomputed region): alone, now
        full, position = GatherShard.apply(shard, axis, dim, dtype, grad_dtype), None
    remember_gather(full, functools.partial(_backward_gather, shard.detach(), axis, dim, dtype, position))
    return full


def _backward_gather(shard, axis, dim, dtype, position):
    """What makes a gathered parameter again in backward (from its prefetched segment), or None where forward's
    last segment keeps it."""
    if PREFETCH.keeps(position):
        return None
    return functools.partial(PREFETCH.backward_gather, shard, axis, dim, dtype, position)


def regathering_params(function):
    """Run ``function`` (a forward pass or a stage's, its first argument the parameters by name) saving the
    parameters it gathers (and any activation gathered with ``comm_gather_activation``) as shards (see
    comm_gather_param and ``regathering``)."""
    saving_shards = regathering(function)

    @functools.wraps(function)
    def run(p, *args, **kwargs):
        PREFETCH.start_forward(p)
        try:
            return saving_shards(p, *args, **kwargs)
        finally:
            PREFETCH.phase = None
    return run
