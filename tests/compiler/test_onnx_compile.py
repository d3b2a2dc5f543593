"""Issue 7: a GPT exported to ONNX compiles with DP and TP and runs equal to onnxruntime and PyTorch."""
from pathlib import Path

import numpy as np
import pytest
import torch

from compiler import Cluster, compile
from compiler.cli import main as sbpc
from frontend.onnx import onnx_to_torch
from tests.frontend.test_onnx_convert import VS_ORT, VS_TORCH, export_to_onnx, run_ort
from tests.models import gpt_inputs, gpt_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = gpt_model().eval()
    idx, _ = gpt_inputs(batch=4, seq=16)
    path = export_to_onnx(model, (idx,), tmp_path_factory.mktemp("onnx") / "gpt.onnx", input_names=["idx"],
                          output_names=["logits"], opset_version=17, dynamo=False)
    with torch.no_grad():
        logits = model(idx)
    return path, idx, logits


def megatron_by_shape(path: Path) -> dict:
    """Column-parallel (S(1) of [in, out] MatMul weights) into the wide dims, row-parallel out of them."""
    params = {}
    for name, p in onnx_to_torch(path).named_parameters():
        if p.ndim == 2 and tuple(p.shape) in {(64, 192), (64, 256)}:
            params[name] = {"tp": "S(1)"}
        elif p.ndim == 2 and tuple(p.shape) in {(64, 64), (256, 64)}:
            params[name] = {"tp": "S(0)"}
    return params


@pytest.mark.parametrize("strategy", ["dp", "tp"])
def test_onnx_gpt_matches_onnxruntime_and_pytorch(exported, strategy):
    path, idx, logits = exported
    chosen = "dp" if strategy == "dp" else {"mesh": {"tp": 2}, "params": megatron_by_shape(path)}
    plan = compile(str(path), (idx,), cluster=Cluster.local(2), strategy=chosen, mode="infer")
    if strategy == "tp":
        assert any(n.op == "comm.all_reduce" for n in plan.graph.nodes)
        assert any(str(p.sbp[0]).startswith("S") for p in plan.graph.params)
    (out,) = plan.run_virtual(idx).outputs
    torch.testing.assert_close(out, logits, **VS_TORCH)
    (ort,) = run_ort(path, {"idx": idx.numpy()})
    np.testing.assert_allclose(out.numpy(), ort, **VS_ORT)


def test_cli_compiles_an_onnx_file(exported, capsys):
    path, _, _ = exported
    assert sbpc(["compile", str(path), "--cluster", "local:2", "--mode", "infer", "--batch", "4",
                 "--dump-ir", "-"]) == 0
    assert "graph OnnxModule" in capsys.readouterr().out


def test_unsupported_onnx_op_is_one_error(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    node = helper.make_node("FancyOp", ["x"], ["y"], name="fancy_1")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ValueError, match="fancy_1.*FancyOp|FancyOp.*fancy_1"):
        compile(str(path), (torch.zeros(2),), mode="infer")
