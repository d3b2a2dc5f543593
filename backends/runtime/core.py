"""Process groups and layouts: one group per mesh axis, this rank's shard of a full tensor, failures."""
import datetime
import importlib
import os
import sys

import torch
import torch.distributed as dist

from .plan import MESH_AXES, MESH_DEVICES, MESH_SHAPE

aten = torch.ops.aten
# this rank's device, fixed when the program starts (torchrun has set LOCAL_RANK): nccl on CUDA, else gloo
DEVICE = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
          if torch.cuda.is_available() and os.environ.get("SBPC_FORCE_GLOO") != "1" else torch.device("cpu"))
GROUPS = {}  # mesh axis -> (process group, its global ranks, my index among them)
COORD = {}  # mesh axis -> my coordinate on it


def fail(message, abandon=False):
    """Stop this rank with one clear line (no traceback). ``abandon``: exit at once, without the interpreter's
    teardown, for a rank whose process group lost a peer (destroying it then can abort the process with
    "terminate called without an active exception" instead of exit status 2)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if abandon:
        sys.stdout.flush()
        os._exit(2)
    sys.exit(2)


def init_distributed(timeout_s):
    """Join the world (nccl on CUDA, else gloo) and make one process group per mesh axis. Only torchrun's
    environment is read (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so the same
    program runs on one node or many (launch.sh beside it has both command lines)."""
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)
    timeout = datetime.timedelta(seconds=timeout_s)
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if restarted and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        print("warning: torchrun restarted this job on its shared rendezvous store, which in torch 2.13 still holds "
              "the previous attempt's addresses (pytorch/pytorch#167288); if joining fails, launch torchrun with "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", file=sys.stderr, flush=True)
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo", timeout=timeout)
    want = sum(len(devices) for devices in MESH_DEVICES)
    if dist.get_world_size() != want:
        fail(f"this program was compiled for {want} ranks (mesh {dict(zip(MESH_AXES, MESH_SHAPE))} on "
             f"{len(MESH_DEVICES)} pipeline position(s)) but was launched with world size "
             f"{dist.get_world_size()}; run torchrun --nproc-per-node {want}")
    grid = torch.tensor(MESH_DEVICES).view(-1, *MESH_SHAPE)  # pipeline position, then the mesh axes
    for a, axis in enumerate(MESH_AXES):
        for ranks in grid.movedim(a + 1, -1).reshape(-1, MESH_SHAPE[a]).tolist():  # each group along the axis
            group = dist.new_group(ranks, timeout=timeout)
            if dist.get_rank() in ranks:
                COORD[axis] = ranks.index(dist.get_rank())
                GROUPS[axis] = (group, ranks, COORD[axis])
    check_node_placement()


def check_node_placement():
    """Warn when the innermost mesh axis (tensor parallelism, the most traffic) spans nodes. torchrun numbers the
    ranks of a node consecutively (LOCAL_WORLD_SIZE of them), so it stays inside one when its size divides that."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    if len(MESH_AXES) < 2 or per_node >= dist.get_world_size():
        return
    inner = MESH_AXES[-1]
    _, ranks, me = GROUPS[inner]
    if me == 0 and len({rank // per_node for rank in ranks}) > 1:
        print(f"warning: mesh axis {inner} (innermost) joins ranks {ranks} on different nodes "
              f"({per_node} processes per node); launch with --nproc-per-node a multiple of {len(ranks)}",
              file=sys.stderr, flush=True)


def load_custom_op(name, module):
    """The custom op ``name`` (``namespace.op.overload``, a ``torch.library`` op outside ATen) that the plan
    calls, registered in this process by importing ``module``, the Python module that defines it."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        fail(f"this program calls the custom op {name}, which the Python module {module} registers, but {module} "
             f"cannot be imported here ({err}); install it (the version the plan was compiled with) on every node")
    namespace, op, overload = name.split(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, RuntimeError):
        fail(f"importing {module} did not register the custom op {name} (torch.ops.{namespace}.{op}.{overload}); "
             f"install the version of {module.split('.')[0]} the plan was compiled with")


def my_position():
    """This rank's pipeline position (0 without pipelining): the index of the device list holding it."""
    return next(p for p, devices in enumerate(MESH_DEVICES) if dist.get_rank() in devices)


def split_dim(entry):
    """The dim a layout entry splits: ``S(1)`` -> 1; None for ``B`` and ``P(sum)``."""
    return int(entry[2:-1]) if entry.startswith("S(") else None


def shard(full, layout, balanced=False):
    """This rank's local tensor of a full tensor held in ``layout`` (one entry per mesh axis). ``balanced``:
    an input, whose sequence split over the cp axis is load-balanced (:func:`balanced_part`)."""
    for axis, entry in zip(MESH_AXES, layout):
        dim = split_dim(entry)
        if dim is not None and axis == "cp" and balanced:
            full = balanced_part(full, dim, len(GROUPS[axis][1]), COORD[axis])
        elif dim is not None:
            size = full.shape[dim] // len(GROUPS[axis][1])
            full = full.narrow(dim, COORD[axis] * size, size)
    return full.contiguous()


def balanced_part(x, dim, ways, index):
    """Rank ``index``'s part of ``x`` under a load-balanced sequence split over ``ways`` ranks: of ``2 * ways``
    equal chunks of ``dim``, chunks ``index`` and ``2 * ways - 1 - index`` (early and late positions alike, so
    causal attention costs every rank the same)."""
    chunks = x.chunk(2 * ways, dim=dim)
    return torch.cat([chunks[index], chunks[2 * ways - 1 - index]], dim=dim)


def balance(x, dim, ways):
    """``x`` in sequence order along ``dim`` -> the ranks' load-balanced parts one after another."""
    return torch.cat([balanced_part(x, dim, ways, i) for i in range(ways)], dim=dim)


def unbalance(x, dim, ways):
    """The inverse of :func:`balance`: the ranks' load-balanced parts one after another -> sequence order."""
    halves = x.chunk(2 * ways, dim=dim)  # rank i's chunks i and 2 * ways - 1 - i are halves 2i and 2i + 1
    return torch.cat([halves[2 * i] for i in range(ways)] + [halves[2 * i + 1] for i in reversed(range(ways))],
                     dim=dim)


def is_seed_rank(layout):
    """Whether this rank's copy of a value counts: coordinate 0 on the axes where it is broadcast."""
    return all(COORD[axis] == 0 for axis, entry in zip(MESH_AXES, layout) if entry == "B")
