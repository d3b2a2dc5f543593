"""Sharded checkpoints: each rank saves and loads only its own shards, through torch.distributed.checkpoint.

A checkpoint is a directory ``step-00000006`` in ``--checkpoint-dir``: DCP's files (each rank's shards of the
parameters, buffers and optimizer state, described to DCP as DTensors on the plan's mesh, in the dtype the
program keeps them; the step, the data position, each rank's RNG state) and ``plan.json`` (the plan as DSL
text, the mesh, every tensor's shape, dtype and layout). It is written as ``step-00000006.tmp`` and renamed
when whole, so a directory without the suffix is complete; ``--keep`` keeps the newest N. A load goes by the
chunks DCP recorded: each rank reads the saved chunks overlapping its own shards, whatever plan wrote them,
so no rank ever gathers the model.

DCP and DTensor are imported inside the functions that use them: a run that never checkpoints does not pay
their import (about 0.8 s of CPU per rank).
"""
import functools
import json
import math
import os
import re
import shutil

import torch
import torch.distributed as dist

from .controls import restore_schedule
from .core import DEVICE, GROUPS, fail, my_position, split_dim
from .plan import MESH_AXES, MESH_DEVICES, MESH_SHAPE, OPTIMIZER, PLAN_TEXT

CHECKPOINT_FORMAT = "sbpc-checkpoint-1"
WHOLE_CHECKPOINT = re.compile(r"step-(\d+)$")  # a checkpoint directory; step-N.tmp is one being written


@functools.cache
def plan_mesh():
    """This rank's pipeline position's mesh as a DeviceMesh over the process groups of its axes."""
    from torch.distributed.device_mesh import DeviceMesh
    devices = torch.tensor(MESH_DEVICES[my_position()]).view(MESH_SHAPE)
    return DeviceMesh.from_group([GROUPS[axis][0] for axis in MESH_AXES], DEVICE.type, mesh=devices,
                                 mesh_dim_names=MESH_AXES)


def as_global(local, layout, name):
    """``local`` as DCP sees it: a DTensor of the full shape when some mesh axis splits it (DCP writes and reads
    this rank's chunk), else the tensor itself (replicated: one rank's copy is written)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    if "P(sum)" in layout:
        fail(f"{name} is a partial sum ({layout}) at the end of a step, which a checkpoint cannot hold")
    if all(split_dim(entry) is None for entry in layout):
        return local
    shape = list(local.shape)
    for axis, entry in zip(MESH_AXES, layout):
        if split_dim(entry) is not None:
            shape[split_dim(entry)] *= len(GROUPS[axis][1])
    placements = [Replicate() if split_dim(entry) is None else Shard(split_dim(entry)) for entry in layout]
    return DTensor.from_local(local, plan_mesh(), placements, run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def as_local(value):
    """A loaded value without its DTensor wrapper."""
    from torch.distributed.tensor import DTensor
    return value.to_local() if isinstance(value, DTensor) else value


class TrainingState:
    """What a checkpoint holds of this rank: its shards of the model's tensors, the optimizer's state of its
    trainable ones, the step, the learning-rate schedule's state and the data source's position.

    ``places``: local key -> (state_dict name, layout) of each tensor this rank saves and loads (parameters and
    buffers, also those outside the model's state_dict, so that a resumed run reads nothing else); ``copies``:
    local keys of tied copies (pipelines: a parameter on several stages), loaded from their state_dict name
    but not saved; ``model``: every tensor of the whole model, state_dict name -> (shape, layout, stage);
    ``schedule``: the learning-rate schedule (``controls.py``); ``data``: the batch source (``data.py``);
    ``loss_scaler``: fp16 programs' loss scale (``loss_scaling.py``)."""

    def __init__(self, params, buffers, optimizer, places, model, copies=(), schedule=None, data=None,
                 loss_scaler=None):
        self.params, self.buffers, self.optimizer = params, buffers, optimizer
        self.places, self.model, self.copies = places, model, set(copies)
        self.schedule, self.data, self.loss_scaler = schedule, data, loss_scaler

    def local(self, key):
        """This rank's tensor ``key`` now (buffers are replaced every step), without autograd."""
        return (self.params[key] if key in self.params else self.buffers[key]).detach()

    def saved_items(self, step):
        """The flat dict DCP saves: ``model.NAME``, ``optimizer.NAME.KEY``, ``train.*``, ``rng.*.rankR``."""
        items = {"train.step": step, "train.data_position": self.data.position if self.data else step}
        if self.schedule is not None:
            items["train.lr_schedule"] = json.dumps(self.schedule.state_dict())
        if self.loss_scaler is not None:
            items["train.loss_scaler"] = json.dumps(self.loss_scaler.state_dict())
        items |= {f"rng.{kind}.rank{dist.get_rank()}": state for kind, state in rng_states().items()}
        for key, (name, layout) in self.places.items():
            if key in self.copies:
                continue
            tensor = self.local(key)
            items[f"model.{name}"] = as_global(tensor, layout, name)
            state = self.optimizer.state.get(self.params[key], {}) if key in self.params and self.optimizer else {}
            for entry, value in state.items():
                if isinstance(value, torch.Tensor):  # shaped like the parameter: sharded like it; else replicated
                    shaped = value.shape == tensor.shape
                    items[f"optimizer.{name}.{entry}"] = as_global(value, layout, name) if shaped else value
        return items

    def load_items(self, metadata):
        """The flat dict DCP loads into: this rank's tensors themselves, new tensors for the optimizer state and
        RNG states the checkpoint holds (shaped by its metadata), placeholders for the counters."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        items = {"train.step": 0, "train.data_position": 0}
        if self.schedule is not None and "train.lr_schedule" in metadata.state_dict_metadata:
            items["train.lr_schedule"] = ""
        if self.loss_scaler is not None and "train.loss_scaler" in metadata.state_dict_metadata:
            items["train.loss_scaler"] = ""
        items |= {key: torch.empty_like(state) for key, state in
                  ((f"rng.{kind}.rank{dist.get_rank()}", state) for kind, state in rng_states().items())
                  if key in metadata.state_dict_metadata}
        loaded = set()
        for key, (name, layout) in self.places.items():
            if name in loaded:
                continue  # a second copy on this rank: adopt() copies the first
            loaded.add(name)
            tensor = self.local(key)
            items[f"model.{name}"] = as_global(tensor, layout, name)
            if key not in self.params or self.optimizer is None or not self.params[key].requires_grad:
                continue
            prefix = f"optimizer.{name}."
            for fqn, md in metadata.state_dict_metadata.items():
                if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata):
                    if tuple(md.size) == tuple(self.model[name][0]):
                        items[fqn] = as_global(torch.empty(tensor.shape, dtype=md.properties.dtype, device=DEVICE),
                                               layout, name)
                    else:
                        items[fqn] = torch.empty(md.size, dtype=md.properties.dtype)
        return items

    def adopt(self, items, same_plan):
        """Take what DCP loaded: tied copies from the loaded tensor, the optimizer state through
        ``load_state_dict`` (which places it as torch does), the schedule's step, the loss scale, the data
        position, and this rank's RNG states under the same plan."""
        first = {}
        for key, (name, _) in self.places.items():
            if name in first:
                self.local(key).copy_(self.local(first[name]))
            first.setdefault(name, key)
        if self.optimizer is not None:
            order = [p for group in self.optimizer.param_groups for p in group["params"]]
            index = {id(p): i for i, p in enumerate(order)}
            state = {}
            for key, (name, _) in self.places.items():
                prefix = f"optimizer.{name}."
                entries = {fqn[len(prefix):]: as_local(v) for fqn, v in items.items() if fqn.startswith(prefix)}
                if first[name] != key:  # a second copy on this rank gets state of its own
                    entries = {entry: value.clone() for entry, value in entries.items()}
                if entries and key in self.params and id(self.params[key]) in index:
                    state[index[id(self.params[key])]] = entries
            self.optimizer.load_state_dict({"state": state,
                                            "param_groups": self.optimizer.state_dict()["param_groups"]})
        if self.schedule is not None and items.get("train.lr_schedule"):
            restore_schedule(self.schedule, json.loads(items["train.lr_schedule"]))
        if self.loss_scaler is not None and items.get("train.loss_scaler"):
            self.loss_scaler.load_state_dict(json.loads(items["train.loss_scaler"]))
        if self.data is not None:
            self.data.position = items["train.data_position"]
        if same_plan:
            restore_rng_states({key.split(".")[1]: v for key, v in items.items() if key.startswith("rng.")})
        return items["train.step"]


def rng_states():
    """This rank's random number generator states (CPU, and the device's on CUDA)."""
    states = {"cpu": torch.get_rng_state()}
    if DEVICE.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(DEVICE)
    return states


def restore_rng_states(states):
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    if "cuda" in states and DEVICE.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], DEVICE)


def checkpoint_due(args, done):
    """Whether to save after ``done`` steps: every --checkpoint-every steps, and after the last."""
    return bool(args.checkpoint_every) and (done % args.checkpoint_every == 0 or done == args.steps)


def save_checkpoint(args, state, step):
    """Write ``step-N.tmp`` (every rank its own shards), then, on rank 0, the plan, the rename that makes it
    visible, and the removal of checkpoints beyond --keep (only now that a newer one is whole)."""
    import torch.distributed.checkpoint as dcp
    final = os.path.join(args.checkpoint_dir, f"step-{step:08d}")
    partial = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run that died while saving
        os.makedirs(partial)
    dist.barrier()
    metadata = dcp.save(state.saved_items(step), checkpoint_id=partial)
    if dist.get_rank() == 0:
        write_plan(partial, state, metadata, step)
        publish(partial, final)
        prune(args.checkpoint_dir, args.keep)
        print(f"saved checkpoint {final}", flush=True)


def write_plan(directory, state, metadata, step):
    """``plan.json``: the plan as DSL text, the mesh, and each tensor's shape, dtype and layout."""
    tensors = {}
    for name, (shape, layout, stage) in state.model.items():
        md = metadata.state_dict_metadata.get(f"model.{name}")
        tensors[name] = {"shape": list(shape), "dtype": str(md.properties.dtype) if md is not None else None,
                         "layout": dict(zip(MESH_AXES, layout)), "stage": stage}
    plan = {"format": CHECKPOINT_FORMAT, "step": step, "plan": PLAN_TEXT, "mesh": dict(zip(MESH_AXES, MESH_SHAPE)),
            "devices": MESH_DEVICES, "world_size": dist.get_world_size(), "optimizer": OPTIMIZER,
            "tensors": tensors}
    with open(os.path.join(directory, "plan.json"), "w") as out:
        json.dump(plan, out, indent=1)


def publish(partial, final):
    """Rename the written checkpoint into place; one of the same step (from before a restart) is replaced only
    after the new one is in place."""
    if os.path.exists(final):
        os.rename(final, final + ".old")
    os.rename(partial, final)
    shutil.rmtree(final + ".old", ignore_errors=True)


def prune(directory, keep):
    """Remove whole checkpoints beyond the newest ``keep`` (0 keeps all)."""
    if keep > 0:
        for path in whole_checkpoints(directory)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def whole_checkpoints(directory):
    """The complete checkpoints in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), m.group(0)) for m in map(WHOLE_CHECKPOINT.match, os.listdir(directory)) if m]
    return [os.path.join(directory, name) for _, name in sorted(found)]


def damage(path, metadata):
    """What makes a checkpoint unreadable: a shard file missing or shorter than its index says, or a tensor
    whose chunks do not cover it; None when whole."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    sizes = {}
    for info in metadata.storage_data.values():
        file = os.path.join(path, info.relative_path)
        if file not in sizes:
            sizes[file] = os.path.getsize(file) if os.path.exists(file) else None
        if sizes[file] is None:
            return f"its shard file {info.relative_path} is missing"
        if sizes[file] < info.offset + info.length:
            return (f"its shard file {info.relative_path} has {sizes[file]} bytes, its index needs "
                    f"{info.offset + info.length} (truncated)")
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            covered = sum(math.prod(chunk.sizes) for chunk in md.chunks)
            if covered != math.prod(md.size):
                return f"the chunks of {fqn} cover {covered} of its {math.prod(md.size)} elements"
    return None


def read_checkpoint(path):
    """The DCP metadata and the plan of a checkpoint; raises OSError or ValueError when they are unreadable."""
    import torch.distributed.checkpoint as dcp
    metadata = dcp.FileSystemReader(path).read_metadata()
    with open(os.path.join(path, "plan.json")) as f:
        plan = json.load(f)
    if plan.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"plan.json has format {plan.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return metadata, plan


def model_difference(model, metadata):
    """How a checkpoint's model differs from ``model`` (name -> (shape, ...)): its first differing tensor."""
    saved = {fqn[len("model."):]: md for fqn, md in metadata.state_dict_metadata.items() if fqn.startswith("model.")}
    for name, (shape, *_) in model.items():
        if name not in saved:
            return f"holds another model: its first differing tensor is {name}, which it does not have"
        if tuple(saved[name].size) != tuple(shape):
            return (f"holds another model: its first differing tensor is {name}, of shape {list(saved[name].size)} "
                    f"there and {list(shape)} here")
    extra = [name for name in saved if name not in model]
    if extra:
        return f"holds another model: its first differing tensor is {extra[0]}, which this model does not have"
    return None


def choose_checkpoint(directory, model):
    """The newest whole checkpoint of ``model``'s in ``directory``: ``(path or None, refusal or None, warnings)``.
    Damaged ones are skipped with a warning; another model's (or another optimizer's) is refused."""
    warnings = []
    for path in reversed(whole_checkpoints(directory)):
        try:
            metadata, plan = read_checkpoint(path)
        except Exception as error:  # a truncated pickle or JSON file raises anything from EOFError to KeyError
            warnings.append(f"checkpoint {path} is damaged ({type(error).__name__}: {error}); trying the previous one")
            continue
        refusal = model_difference(model, metadata)
        if refusal is None and plan["optimizer"][0] != OPTIMIZER[0]:
            refusal = (f"was written with optimizer {plan['optimizer'][0]}; this program uses {OPTIMIZER[0]}, "
                       f"whose state differs")
        if refusal is not None:
            return None, f"checkpoint {path} {refusal}; point --checkpoint-dir at this model's checkpoints", warnings
        problem = damage(path, metadata)
        if problem is None:
            return path, None, warnings
        warnings.append(f"checkpoint {path} is damaged: {problem}; trying the previous one")
    if warnings:
        return None, f"no whole checkpoint in {directory} (every one is damaged, see above)", warnings
    return None, None, warnings


def find_checkpoint(args, model):
    """The checkpoint --resume continues from (rank 0 chooses for all): the newest whole one of --checkpoint-dir,
    None when there is none yet. ``model``: every tensor of this program's model, name -> (shape, ...)."""
    choice = [choose_checkpoint(args.checkpoint_dir, model) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    path, refusal, warnings = choice[0]
    if dist.get_rank() == 0:
        for line in warnings:
            print(f"warning: {line}", flush=True)
        if refusal is None and path is None:
            print(f"no checkpoint in {args.checkpoint_dir}: starting at step 0", flush=True)
    if refusal is not None:
        fail(refusal)
    return path


def load_checkpoint(path, state):
    """Fill this rank's tensors and optimizer state from the checkpoint at ``path``, each rank reading the saved
    chunks that overlap its own shards; returns the step to continue from."""
    import torch.distributed.checkpoint as dcp
    metadata, plan = read_checkpoint(path)
    items = state.load_items(metadata)
    dcp.load(items, checkpoint_id=path)
    same_plan = plan["plan"] == PLAN_TEXT and plan["devices"] == MESH_DEVICES
    step = state.adopt(items, same_plan)
    if dist.get_rank() == 0:
        how = "" if same_plan else (f", written under mesh {plan['mesh']} on {len(plan['devices'])} pipeline "
                                    f"position(s): resharded on load")
        print(f"resuming from {path} at step {step}{how}", flush=True)
    return step
