"""How emitted programs judge checkpoint directories, on real DCP checkpoints written in this process: which
are whole, what damage is named, when a damaged newest one falls back to the previous, how another model's is
refused, what --keep removes. (The programs saving and loading them under torchrun:
``test_checkpoint_torchrun.py``.)"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from backends.runtime import checkpoint
from backends.runtime.plan import OPTIMIZER

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
MODEL = {"w": ((8, 4), ["B"], 0), "b": ((4,), ["B"], 0)}  # name: (shape, layout, stage), as the loops build it


def write(directory: Path, step: int, shapes: dict | None = None, optimizer: str = OPTIMIZER[0],
          value: float = 1.0) -> Path:
    """A whole checkpoint ``step-N`` as the programs write it (one process: no process group needed)."""
    path = directory / f"step-{step:08d}"
    shapes = shapes or {name: shape for name, (shape, _, _) in MODEL.items()}
    items = {f"model.{name}": torch.full(shape, value) for name, shape in shapes.items()} | {"train.step": step}
    dcp.save(items, checkpoint_id=str(path), no_dist=True)
    plan = {"format": checkpoint.CHECKPOINT_FORMAT, "step": step, "plan": "mesh dp=1\n", "mesh": {"dp": 1},
            "devices": [[0]], "world_size": 1, "optimizer": [optimizer, {}], "tensors": {}}
    (path / "plan.json").write_text(json.dumps(plan))
    return path


def shard_file(path: Path) -> Path:
    return next(path.glob("*.distcp"))


def test_a_whole_checkpoint_has_no_damage_and_a_truncated_or_missing_shard_is_named(tmp_path):
    path = write(tmp_path, 4)
    metadata, _ = checkpoint.read_checkpoint(str(path))
    assert checkpoint.damage(str(path), metadata) is None
    shard = shard_file(path)
    size = shard.stat().st_size
    os.truncate(shard, size - 10)
    assert checkpoint.damage(str(path), metadata) == (f"its shard file {shard.name} has {size - 10} bytes, its index "
                                                      f"needs {size} (truncated)")
    shard.unlink()
    assert checkpoint.damage(str(path), metadata) == f"its shard file {shard.name} is missing"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    previous, newest = write(tmp_path, 4), write(tmp_path, 8)
    assert checkpoint.choose_checkpoint(str(tmp_path), MODEL) == (str(newest), None, [])
    os.truncate(shard_file(newest), 100)
    path, refusal, warnings = checkpoint.choose_checkpoint(str(tmp_path), MODEL)
    assert (path, refusal) == (str(previous), None)
    assert len(warnings) == 1 and warnings[0].startswith(f"checkpoint {newest} is damaged: its shard file ")
    assert warnings[0].endswith("(truncated); trying the previous one")
    (previous / ".metadata").write_bytes(b"\x80\x04 not a whole pickle")
    path, refusal, warnings = checkpoint.choose_checkpoint(str(tmp_path), MODEL)
    assert path is None and refusal == f"no whole checkpoint in {tmp_path} (every one is damaged, see above)"
    assert warnings[1].startswith(f"checkpoint {previous} is damaged (")


def test_no_checkpoint_yet_means_starting_at_step_zero(tmp_path):
    assert checkpoint.choose_checkpoint(str(tmp_path / "none"), MODEL) == (None, None, [])
    (tmp_path / "step-00000004.tmp").mkdir()  # a save that never finished is not a checkpoint
    assert checkpoint.choose_checkpoint(str(tmp_path), MODEL) == (None, None, [])


@pytest.mark.parametrize("shapes, differing", [
    ({"w": (8, 4), "b": (5,)}, "b, of shape [5] there and [4] here"),
    ({"w": (8, 4)}, "b, which it does not have"),
    ({"w": (8, 4), "b": (4,), "c": (2,)}, "c, which this model does not have"),
])
def test_another_models_checkpoint_is_refused_naming_the_first_differing_tensor(tmp_path, shapes, differing):
    path = write(tmp_path, 4, shapes)
    _, refusal, _ = checkpoint.choose_checkpoint(str(tmp_path), MODEL)
    assert refusal == (f"checkpoint {path} holds another model: its first differing tensor is {differing}; point "
                       f"--checkpoint-dir at this model's checkpoints")


def test_a_checkpoint_of_another_optimizer_is_refused(tmp_path):
    path = write(tmp_path, 4, optimizer="Adagrad")
    _, refusal, _ = checkpoint.choose_checkpoint(str(tmp_path), MODEL)
    assert refusal.startswith(f"checkpoint {path} was written with optimizer Adagrad; this program uses "
                              f"{OPTIMIZER[0]}, whose state differs")


def test_keep_removes_the_oldest_whole_checkpoints_only(tmp_path):
    for step in (3, 6, 9):
        write(tmp_path, step)
    (tmp_path / "step-00000012.tmp").mkdir()
    checkpoint.prune(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step-00000006", "step-00000009", "step-00000012.tmp"]
    checkpoint.prune(str(tmp_path), keep=0)  # 0 keeps all
    assert len(os.listdir(tmp_path)) == 3


def test_publishing_a_step_again_replaces_the_old_one_once_the_new_one_is_in_place(tmp_path):
    old = write(tmp_path, 6, value=1.0)
    partial = tmp_path / "step-00000006.tmp"
    write(tmp_path / "next", 6, value=2.0).rename(partial)
    checkpoint.publish(str(partial), str(old))
    assert sorted(os.listdir(tmp_path)) == ["next", "step-00000006"]
    loaded = {"model.w": torch.zeros(8, 4)}
    dcp.load(loaded, checkpoint_id=str(old), no_dist=True)
    assert torch.equal(loaded["model.w"], torch.full((8, 4), 2.0))
