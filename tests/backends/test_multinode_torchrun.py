"""Multi-node launch of an emitted program: the ``launch.sh`` that ``emit`` writes beside ``main.py`` starts two
torchrun agents on 127.0.0.1 (2 nodes x 2 processes, c10d rendezvous), and the run equals the one-agent
4-rank run step for step, bit for bit."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compiler import Cluster, compile
from tests.compiler.test_tensor_parallel import GPT_MEGATRON, tp
from tests.launch import TIMEOUT_S, torchrun_env
from tests.models import gpt_inputs, gpt_model

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
STEPS = 3
TORCHRUN = {"TORCHRUN": f"{sys.executable} -m torch.distributed.run"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, out: Path, env: dict) -> subprocess.Popen:
    args = ["--steps", str(STEPS), "--metrics", str(out / "metrics.jsonl"), "--save", str(out / "final.pt")]
    return subprocess.Popen(["bash", str(script), *args], env=torchrun_env({**TORCHRUN, **env}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err[-4000:]
    return out


def results(out: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines], torch.load(out / "final.pt", weights_only=True)


def test_two_agents_on_two_nodes_equal_one_agent(tmp_path):
    plan = compile(gpt_model(), gpt_inputs(), cluster=Cluster.local(4),
                   strategy={"mesh": {"dp": 2, "tp": 2}, "params": tp(GPT_MEGATRON)})
    main = plan.emit(tmp_path / "program")
    script = main.parent / "launch.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "--standalone --nproc-per-node" in text and "--rdzv-backend c10d" in text and "--nnodes" in text
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    finished(launch(script, single, {}))
    endpoint = {"NNODES": "2", "NPROC_PER_NODE": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
                "RDZV_ID": f"test-{os.getpid()}"}
    agents = [launch(script, multi, endpoint) for _ in range(2)]
    outputs = [finished(agent) for agent in agents]
    assert sum("step 0 loss" in out for out in outputs) == 1  # rank 0 lives on one of the nodes
    (steps, final), (expected_steps, expected_final) = results(multi), results(single)
    assert steps == expected_steps and [s for s, _ in steps] == list(range(STEPS))
    assert set(final) == set(expected_final)
    assert all(torch.equal(final[name], expected_final[name]) for name in final)
