"""Training data: a list of batches, synthetic batches, or a memory-mapped token file read in a resumable order.

Every source hands out the plan's batches one after the other (a step with --grad-accum N takes N of them) and
knows its ``position``, which checkpoints save so that a resumed run continues the same stream.
"""
import ast
import os

import torch

from .core import fail, shard
from .plan import EXAMPLE_DIMS, INPUTS

TOKEN_FILE_SUFFIXES = (".bin", ".npy")


class InputList:
    """``--data`` holding a torch.save'd list of input tuples: one batch after the other."""

    def __init__(self, path, needed):
        batches = torch.load(path, weights_only=True)
        if not isinstance(batches, (list, tuple)) or len(batches) < needed:
            count = len(batches) if isinstance(batches, (list, tuple)) else type(batches).__name__
            fail(f"--data {path} must hold a list of at least {needed} input tuples (one per step and "
                 f"accumulation microstep), found {count}")
        self.batches, self.position = batches, 0

    def next(self):
        self.position += 1
        return self.batches[self.position - 1]


class SyntheticBatches:
    """Random inputs of the example sizes (integers below each input's bound), the same on every rank."""

    def __init__(self, seed):
        self.seed, self.position = seed, 0

    def next(self):
        self.position += 1
        return synthetic_batch(self.seed, self.position - 1)


def synthetic_batch(seed, index):
    """The synthetic batch ``index`` of ``seed``."""
    g = torch.Generator().manual_seed(seed * 100003 + index)
    shapes = [[EXAMPLE_DIMS.get(d, d) for d in dims] for _, dims, _, _, _ in INPUTS]
    return tuple(torch.randn(shape, generator=g, dtype=dtype) if dtype.is_floating_point
                 else torch.randint(0, high, shape, generator=g, dtype=dtype)
                 for shape, (_, _, dtype, _, high) in zip(shapes, INPUTS))


class TokenFile:
    """A flat file of token ids (``.bin`` of --data-dtype, or ``.npy``), memory-mapped (only the windows read
    are paged in). Its samples are windows
    of ``length + 1`` tokens starting every ``length`` tokens; sample ``n`` of the stream is window
    ``order(n // windows)[n % windows]``, a permutation of the windows drawn from the seed per epoch. A batch is
    ``batch`` consecutive samples: the model's inputs are a window's first ``length`` tokens and, for a second
    input, its last ``length`` (the next-token targets). This rank reads only the rows of the batch its shards
    hold; the others stay zero. ``position``: the samples handed out so far."""

    def __init__(self, path, dtype, seed, microbatches):
        self.tokens = memory_map(path, dtype)
        names = [name for name, _, _, _, _ in INPUTS]
        if len(INPUTS) not in (1, 2) or any(d.is_floating_point or len(dims) != 2 for _, dims, d, _, _ in INPUTS):
            fail(f"--data {path}: a token file feeds models whose inputs are token ids of shape (batch, sequence) "
                 f"and optionally their targets; this model's inputs are {names}")
        self.batch, self.length = (EXAMPLE_DIMS.get(d, d) for d in INPUTS[0][1])
        self.windows = (len(self.tokens) - 1) // self.length
        if self.windows < 1:
            fail(f"--data {path} holds {len(self.tokens)} tokens; one sample needs {self.length + 1}")
        self.seed, self.position, self.rows = seed, 0, needed_rows(self.batch, self.length, microbatches)
        self.orders = {}

    def order(self, epoch):
        """The windows' order in ``epoch``, the same on every rank."""
        if epoch not in self.orders:
            self.orders = {epoch: torch.randperm(self.windows, generator=torch.Generator().manual_seed(
                self.seed * 1000003 + epoch))}
        return self.orders[epoch]

    def next(self):
        rows = torch.zeros(self.batch, self.length + 1, dtype=INPUTS[0][2])
        for row in self.rows:
            n = self.position + row
            start = int(self.order(n // self.windows)[n % self.windows]) * self.length
            rows[row] = self.tokens[start:start + self.length + 1].to(rows.dtype)
        self.position += self.batch
        return tuple(rows[:, i:i + self.length].to(INPUTS[i][2]) for i in range(len(INPUTS)))  # ids, targets


def memory_map(path, dtype):
    """The token ids of a ``.bin`` (of ``dtype``) or ``.npy`` (its header's dtype) file, memory-mapped."""
    size = os.path.getsize(path)
    offset, dtype = npy_header(path) if path.endswith(".npy") else (0, getattr(torch, dtype))
    raw = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)  # mapped: pages are read when used
    if (size - offset) % dtype.itemsize:
        fail(f"--data {path}: {size - offset} bytes of token ids are not a whole number of {dtype} values")
    return raw[offset:].view(dtype)


def npy_header(path):
    """Where the data of a ``.npy`` file of a flat uint16/uint32 array starts, and its dtype."""
    with open(path, "rb") as f:
        magic = f.read(8)
        if magic[:6] != b"\x93NUMPY":
            fail(f"--data {path} is not a .npy file (no NUMPY magic)")
        width = 2 if magic[6] == 1 else 4
        length = int.from_bytes(f.read(width), "little")
        header = ast.literal_eval(f.read(length).decode("latin1"))
    dtypes = {"<u2": torch.uint16, "<u4": torch.uint32, "|u2": torch.uint16, "|u4": torch.uint32}
    if header.get("descr") not in dtypes or header.get("fortran_order") or len(header.get("shape", ())) != 1:
        fail(f"--data {path}: expected a flat array of little-endian uint16 or uint32 token ids, found "
             f"dtype {header.get('descr')} of shape {header.get('shape')}")
    return 8 + width + length, dtypes[header["descr"]]


def needed_rows(batch, length, microbatches):
    """The rows of a (batch, length) input that this rank's shards hold, over every input and pipeline
    microbatch."""
    rows = set()
    for _, _, _, layout, _ in INPUTS:
        for micro in torch.arange(batch).chunk(microbatches):
            rows.update(shard(micro.view(-1, 1).expand(-1, length), layout, balanced=True)[:, 0].tolist())
    return sorted(rows)


def open_batches(args, needed, microbatches=1):
    """The source of this run's batches: ``--data`` (a token file or a list of at least ``needed`` input tuples)
    or synthetic. ``microbatches``: pipelines cut each batch into that many."""
    if args.data is None:
        return SyntheticBatches(args.seed)
    if not os.path.exists(args.data):
        fail(f"--data file {args.data} does not exist; pass a token file (.bin, .npy) or a torch.save'd list of "
             f"input tuples")
    if args.data.endswith(TOKEN_FILE_SUFFIXES):
        return TokenFile(args.data, args.data_dtype, args.seed, microbatches)
    return InputList(args.data, needed)
