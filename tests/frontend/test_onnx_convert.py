"""Whole-model ONNX conversion: the GPT example, a CNN, old opsets, errors, external data."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from examples.gpt import example_inputs, make_model
from frontend.onnx import OnnxModule, UnsupportedOnnx, onnx_to_torch
from tests.frontend.onnx_node_cases import GPT_OP_TYPES

ort = pytest.importorskip("onnxruntime")

VS_TORCH = {"rtol": 1e-5, "atol": 1e-6}
VS_ORT = {"rtol": 1e-4, "atol": 1e-5}

# name -> torch.onnx.export arguments. ORT refuses the dynamo exporter's opset-17 model (its
# down-conversion leaves Split-18's num_outputs attribute in an opset-17 graph), so that one
# is only compared with PyTorch; the dynamo export at its native opset 18 is checked with ORT.
GPT_EXPORTS = {
    "torchscript_opset17": {"dynamo": False, "opset_version": 17},
    "dynamo_opset17": {"dynamo": True, "opset_version": 17},
    "dynamo_opset18": {"dynamo": True, "opset_version": 18},
    "torchscript_opset14": {"dynamo": False, "opset_version": 14},
}
ORT_LOADABLE = ["torchscript_opset17", "dynamo_opset18", "torchscript_opset14"]


def export_to_onnx(model: nn.Module, args: tuple, path: Path, **kwargs) -> Path:
    """torch.onnx.export with its chatter silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), verbose=False, **kwargs)
    return path


def run_ort(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model with onnxruntime on the CPU."""
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.fixture(scope="module")
def gpt():
    """The example GPT in eval mode, a batch of token ids and its logits."""
    model = make_model().eval()
    idx, _ = example_inputs(batch=2, seq=16)
    with torch.no_grad():
        logits = model(idx)
    return model, idx, logits


@pytest.fixture(scope="module")
def gpt_onnx(gpt, tmp_path_factory):
    """Export the GPT once per variant, lazily: variant name -> .onnx path."""
    model, idx, _ = gpt
    folder = tmp_path_factory.mktemp("gpt_onnx")
    paths: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in paths:
            paths[variant] = export_to_onnx(model, (idx,), folder / f"{variant}.onnx",
                                            input_names=["idx"], output_names=["logits"],
                                            **GPT_EXPORTS[variant])
        return paths[variant]

    return get


@pytest.mark.parametrize("variant", list(GPT_EXPORTS))
def test_gpt_matches_pytorch(gpt, gpt_onnx, variant):
    model, idx, logits = gpt
    module = onnx_to_torch(gpt_onnx(variant))
    with torch.no_grad():
        outputs = module(idx)
    assert isinstance(outputs, tuple) and len(outputs) == 1
    torch.testing.assert_close(outputs[0], logits, **VS_TORCH)


@pytest.mark.parametrize("variant", ORT_LOADABLE)
def test_gpt_matches_onnxruntime(gpt, gpt_onnx, variant):
    _, idx, _ = gpt
    module = onnx_to_torch(gpt_onnx(variant))
    with torch.no_grad():
        ours = module(idx)[0].numpy()
    (theirs,) = run_ort(gpt_onnx(variant), {"idx": idx.numpy()})
    np.testing.assert_allclose(ours, theirs, **VS_ORT)


@pytest.mark.parametrize("variant", list(GPT_EXPORTS))
def test_gpt_op_types_are_in_the_required_node_tests(gpt_onnx, variant):
    op_types = {node.op_type for node in onnx.load(gpt_onnx(variant)).graph.node}
    assert op_types <= GPT_OP_TYPES, sorted(op_types - GPT_OP_TYPES)


def test_gpt_module_is_torch_exportable(gpt, gpt_onnx):
    _, idx, logits = gpt
    module = onnx_to_torch(gpt_onnx("torchscript_opset17"))
    exported = torch.export.export(module, (idx,))
    torch.testing.assert_close(exported.module()(idx)[0], logits, **VS_TORCH)
    # static shapes: every shape computation was folded, no symbolic shape op remains
    targets = {getattr(node.target, "__name__", "") for node in module.graph.nodes}
    assert not {"shape_of", "onnx_reshape", "shape_list_to_tensor"} & targets


def test_gpt_graph_nodes_name_their_onnx_nodes(gpt_onnx):
    proto = onnx.load(gpt_onnx("torchscript_opset17"))
    module = onnx_to_torch(proto)
    names = {node.name for node in proto.graph.node}
    calls = [node for node in module.graph.nodes if node.op == "call_function"]
    assert calls
    for node in calls:
        assert node.meta["onnx_node"] in names
        assert node.meta["onnx_op"] in GPT_OP_TYPES


def test_gpt_initializers_are_trainable_parameters(gpt, gpt_onnx):
    _, idx, _ = gpt
    proto = onnx.load(gpt_onnx("torchscript_opset17"))
    module = onnx_to_torch(proto)
    float_inits = {init.name for init in proto.graph.initializer
                   if init.data_type == TensorProto.FLOAT}
    params = dict(module.named_parameters())
    assert {module.param_onnx_names[name] for name in params} == float_inits
    assert set(module.initializer_names) == {init.name for init in proto.graph.initializer}
    assert all(name.isidentifier() for name in params)

    logits = module(idx)[0]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             idx.reshape(-1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    with torch.no_grad():
        for p in params.values():
            p -= 0.05 * p.grad
        assert torch.nn.functional.cross_entropy(
            module(idx)[0].reshape(-1, logits.shape[-1]), idx.reshape(-1)) < loss


def test_exporter_constants_stay_buffers_unless_listed_trainable(gpt_onnx):
    proto = onnx.load(gpt_onnx("dynamo_opset17"))
    inits = {init.name: onnx.numpy_helper.to_array(init) for init in proto.graph.initializer}
    module = onnx_to_torch(proto)
    trainable = {module.param_onnx_names[name] for name, _ in module.named_parameters()}
    constants = {name for name, array in inits.items()
                 if array.dtype == np.float32 and (array.size == 1 or not np.isfinite(array).all())}
    assert constants and not constants & trainable  # scales, epsilons, the causal mask
    assert "blocks.0.attn.qkv.bias" in trainable
    chosen = onnx_to_torch(proto, trainable=["blocks.0.attn.qkv.bias"])
    assert [chosen.param_onnx_names[name] for name, _ in chosen.named_parameters()] == [
        "blocks.0.attn.qkv.bias"]


def test_gpt_with_dynamic_axes_stays_symbolic(gpt, tmp_path):
    model, idx, _ = gpt
    path = export_to_onnx(model, (idx,), tmp_path / "dynamic.onnx", dynamo=False,
                          opset_version=17, input_names=["idx"], output_names=["logits"],
                          dynamic_axes={"idx": {0: "batch", 1: "seq"}})
    module = onnx_to_torch(path)
    for batch, seq in [(2, 16), (3, 7)]:
        tokens, _ = example_inputs(batch=batch, seq=seq)
        with torch.no_grad():
            torch.testing.assert_close(module(tokens)[0], model(tokens), **VS_TORCH)
    dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=64)}
    exported = torch.export.export(module, (idx,), dynamic_shapes=(dims,))
    tokens, _ = example_inputs(batch=3, seq=9)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(tokens)[0], model(tokens), **VS_TORCH)


def test_model_with_external_data_loads(gpt, gpt_onnx, tmp_path):
    _, idx, logits = gpt
    proto = onnx.load(gpt_onnx("torchscript_opset17"))
    path = tmp_path / "external" / "gpt.onnx"
    path.parent.mkdir()
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="gpt.weights", size_threshold=0)
    assert (path.parent / "gpt.weights").stat().st_size > path.stat().st_size
    with torch.no_grad():
        torch.testing.assert_close(onnx_to_torch(path)(idx)[0], logits, **VS_TORCH)
        torch.testing.assert_close(onnx_to_torch(str(path))(idx)[0], logits, **VS_TORCH)


def test_model_from_serialized_bytes(gpt, gpt_onnx):
    _, idx, logits = gpt
    data = gpt_onnx("torchscript_opset17").read_bytes()
    with torch.no_grad():
        torch.testing.assert_close(onnx_to_torch(data)(idx)[0], logits, **VS_TORCH)


class SmallCnn(nn.Module):
    """Conv/BN/Relu/MaxPool twice, global average pool, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


@pytest.mark.parametrize("opset", [9, 13])
def test_small_cnn_matches_pytorch_and_onnxruntime(tmp_path, opset):
    torch.manual_seed(0)
    model = SmallCnn()
    for module in model.modules():  # non-trivial running statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(2, 3, 20, 20)
    path = export_to_onnx(model, (x,), tmp_path / "cnn.onnx", dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["y"], do_constant_folding=False)
    op_types = {node.op_type for node in onnx.load(path).graph.node}
    assert {"Conv", "BatchNormalization", "Relu", "MaxPool", "GlobalAveragePool", "Flatten",
            "Gemm"} <= op_types
    module = onnx_to_torch(path)
    with torch.no_grad():
        ours = module(x)[0]
        torch.testing.assert_close(ours, model(x), **VS_TORCH)
    np.testing.assert_allclose(ours.numpy(), run_ort(path, {"x": x.numpy()})[0], **VS_ORT)
    statistics = {name for name, _ in module.named_buffers()}
    assert any("running_mean" in name for name in statistics)  # statistics stay buffers


# ----- hand-built models at old opsets, checked against onnxruntime -----------------------
def _float(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(array, name)


def handbuilt_opset7_classifier() -> onnx.ModelProto:
    """Conv-free classifier: BN, MaxPool, Reshape, Gemm, Relu, Concat, Softmax at opset 7."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["bn"],
                         epsilon=1e-3),
        helper.make_node("MaxPool", ["bn"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2],
                         pads=[0, 0, 1, 1]),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["h"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Concat", ["hr", "h"], ["both"], axis=1),
        helper.make_node("Softmax", ["both"], ["probs"], axis=1),
    ]
    initializers = [
        _init("scale", rng.uniform(0.5, 1.5, 2).astype(np.float32)),
        _init("bias", rng.normal(size=2).astype(np.float32)),
        _init("mean", rng.normal(size=2).astype(np.float32)),
        _init("var", rng.uniform(0.5, 2, 2).astype(np.float32)),
        _init("flat_shape", np.array([0, -1], dtype=np.int64)),
        _init("w1", rng.normal(size=(6, 2 * 3 * 3)).astype(np.float32)),
        _init("b1", rng.normal(size=6).astype(np.float32)),
    ]
    graph = helper.make_graph(nodes, "opset7", [_float("x", [4, 2, 5, 5])],
                              [_float("probs", [4, 12])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)


def test_handbuilt_opset7_model_matches_onnxruntime():
    model = handbuilt_opset7_classifier()
    x = np.random.default_rng(1).normal(size=(4, 2, 5, 5)).astype(np.float32)
    module = onnx_to_torch(model)
    assert module.opset == 7 and module.input_names == ["x"]
    with torch.no_grad():
        ours = module(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(ours, run_ort(model, {"x": x})[0], **VS_ORT)


# (opset, node, input shape, initializers): one op whose attributes or inputs changed
OLD_OPSET_CASES = {
    "softmax_v11_coerces_to_2d": (11, helper.make_node("Softmax", ["x"], ["y"], axis=1),
                                  [2, 3, 4], {}),
    "logsoftmax_v9_default_axis": (9, helper.make_node("LogSoftmax", ["x"], ["y"]),
                                   [2, 3, 4], {}),
    "softmax_v13_single_axis": (13, helper.make_node("Softmax", ["x"], ["y"], axis=1),
                                [2, 3, 4], {}),
    "reduce_mean_v11_axes_attribute": (11, helper.make_node("ReduceMean", ["x"], ["y"],
                                                            axes=[0, 2]), [2, 3, 4], {}),
    "reduce_sum_v11_no_keepdims": (11, helper.make_node("ReduceSum", ["x"], ["y"], axes=[-1],
                                                        keepdims=0), [2, 3, 4], {}),
    "reduce_max_v13_axes_attribute": (13, helper.make_node("ReduceMax", ["x"], ["y"],
                                                           axes=[1]), [2, 3, 4], {}),
    "reduce_sum_v13_axes_input": (13, helper.make_node("ReduceSum", ["x", "axes"], ["y"]),
                                  [2, 3, 4], {"axes": np.array([1], np.int64)}),
    "split_v11_split_attribute": (11, helper.make_node("Split", ["x"], ["y", "z"], axis=2,
                                                       split=[1, 3]), [2, 3, 4], {}),
    "squeeze_v11_axes_attribute": (11, helper.make_node("Squeeze", ["x"], ["y"], axes=[1]),
                                   [2, 1, 4], {}),
    "unsqueeze_v11_axes_attribute": (11, helper.make_node("Unsqueeze", ["x"], ["y"],
                                                          axes=[0, -1]), [2, 3], {}),
    "clip_v7_min_max_attributes": (7, helper.make_node("Clip", ["x"], ["y"], min=-0.5,
                                                       max=0.25), [2, 3], {}),
    "slice_v9_attributes": (9, helper.make_node("Slice", ["x"], ["y"], starts=[1, -3],
                                                ends=[1000, -1], axes=[0, 2]), [3, 3, 4], {}),
    "pad_v9_attributes": (9, helper.make_node("Pad", ["x"], ["y"], pads=[0, 1, 2, 0],
                                              value=1.5), [2, 3], {}),
    "pad_v9_reflect": (9, helper.make_node("Pad", ["x"], ["y"], pads=[0, 2, 0, 1],
                                           mode="reflect"), [2, 4], {}),
    "batchnorm_v7_spatial": (7, helper.make_node("BatchNormalization",
                                                 ["x", "s", "b", "m", "v"], ["y"]),
                             [2, 3, 4], {"s": np.array([1.0, 2.0, 0.5], np.float32),
                                         "b": np.array([0.1, 0.0, -0.2], np.float32),
                                         "m": np.array([0.3, -0.1, 0.0], np.float32),
                                         "v": np.array([1.0, 0.5, 2.0], np.float32)}),
    "dropout_v7_is_identity": (7, helper.make_node("Dropout", ["x"], ["y"], ratio=0.3),
                               [2, 3], {}),
    "topk_v9_k_attribute": (9, helper.make_node("TopK", ["x"], ["y", "i"], k=2), [2, 5], {}),
    "flatten_v9_default_axis": (9, helper.make_node("Flatten", ["x"], ["y"]), [2, 3, 4], {}),
    "pow_v10_scalar_exponent": (10, helper.make_node("Pow", ["x", "e"], ["y"]), [2, 3],
                                     {"e": np.array(2.0, np.float32)}),
    "averagepool_v10_ceil": (10, helper.make_node("AveragePool", ["x"], ["y"],
                                                  kernel_shape=[3], strides=[2],
                                                  ceil_mode=1), [1, 2, 8], {}),
}


@pytest.mark.parametrize("case", list(OLD_OPSET_CASES))
def test_opset_dependent_semantics_match_onnxruntime(case):
    opset, node, shape, constants = OLD_OPSET_CASES[case]
    outputs = [onnx.ValueInfoProto(name=name) for name in node.output]  # types inferred
    graph = helper.make_graph([node], case, [_float("x", shape)], outputs,
                              [_init(name, value) for name, value in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    with torch.no_grad():
        ours = onnx_to_torch(model)(torch.from_numpy(x))
    theirs = run_ort(model, {"x": x})
    assert len(ours) == len(theirs)
    for mine, expected in zip(ours, theirs, strict=True):
        assert mine.numpy().dtype == expected.dtype
        np.testing.assert_allclose(mine.numpy(), expected, **VS_ORT)


def recurrent_model(kind: str, direction: str, rng: np.random.Generator, seq: int = 5,
                    batch: int = 3, features: int = 4, hidden: int = 6) -> onnx.ModelProto:
    """One RNN/GRU/LSTM node with biases, ragged sequence_lens and initial states."""
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[kind]
    directions = 2 if direction == "bidirectional" else 1
    arrays = {
        "W": rng.normal(size=(directions, gates * hidden, features)) * 0.5,
        "R": rng.normal(size=(directions, gates * hidden, hidden)) * 0.5,
        "B": rng.normal(size=(directions, 2 * gates * hidden)) * 0.5,
        "h0": rng.normal(size=(directions, batch, hidden)),
    }
    if kind == "LSTM":
        arrays["c0"] = rng.normal(size=(directions, batch, hidden))
        arrays["P"] = rng.normal(size=(directions, 3 * hidden))
    initializers = [_init(name, a.astype(np.float32)) for name, a in arrays.items()]
    initializers.append(_init("lens", np.array([seq, 2, 4][:batch], dtype=np.int32)))
    inputs = ["X", "W", "R", "B", "lens", "h0"] + (["c0", "P"] if kind == "LSTM" else [])
    outputs = ["Y", "Y_h"] + (["Y_c"] if kind == "LSTM" else [])
    node = helper.make_node(kind, inputs, outputs, hidden_size=hidden, direction=direction)
    graph = helper.make_graph([node], kind, [_float("X", [seq, batch, features])],
                              [onnx.ValueInfoProto(name=name) for name in outputs],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_recurrent_ops_with_sequence_lengths_match_onnxruntime(kind, direction):
    rng = np.random.default_rng(3)
    model = recurrent_model(kind, direction, rng)
    x = rng.normal(size=(5, 3, 4)).astype(np.float32)
    with torch.no_grad():
        ours = onnx_to_torch(model)(torch.from_numpy(x))
    theirs = run_ort(model, {"X": x})
    for mine, expected in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(mine.numpy(), expected, **VS_ORT)


# ----- errors -----------------------------------------------------------------------------
def _single_node_model(node: onnx.NodeProto, elem_type: int = TensorProto.FLOAT,
                       opset: int = 17, domains: tuple[str, ...] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "one_node", [helper.make_tensor_value_info("x", elem_type, [2])],
        [helper.make_tensor_value_info(node.output[0], elem_type, [2])])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets)


def test_made_up_op_is_refused_by_node_and_op_name():
    model = _single_node_model(helper.make_node("Frobnicate", ["x"], ["y"], name="my_node"))
    with pytest.raises(UnsupportedOnnx, match=r"'my_node' \(op Frobnicate") as info:
        onnx_to_torch(model)
    assert info.value.node == "my_node" and info.value.op_type == "Frobnicate"


def test_string_normalizer_is_refused_naming_the_node_first():
    node = helper.make_node("StringNormalizer", ["x"], ["y"], name="normalize",
                            case_change_action="LOWER")
    with pytest.raises(UnsupportedOnnx, match="'normalize' \\(op StringNormalizer"):
        onnx_to_torch(_single_node_model(node, TensorProto.STRING, opset=10))


def test_all_unsupported_nodes_are_counted_in_one_error():
    nodes = [helper.make_node("Frobnicate", ["x"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Wibble", ["b"], ["y"], name="second")]
    graph = helper.make_graph(nodes, "two_bad", [_float("x", [2])], [_float("y", [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOnnx, match="'first'.*1 more unsupported node.*Wibble"):
        onnx_to_torch(model)


def test_custom_domain_is_refused_naming_the_domain():
    node = helper.make_node("Gelu", ["x"], ["y"], name="fast_gelu", domain="com.microsoft")
    with pytest.raises(UnsupportedOnnx, match="domain com.microsoft"):
        onnx_to_torch(_single_node_model(node, domains=("com.microsoft",)))


@pytest.mark.parametrize("elem_type, name", [(TensorProto.STRING, "STRING"),
                                             (TensorProto.COMPLEX64, "COMPLEX64"),
                                             (TensorProto.INT4, "INT4")])
def test_unsupported_data_types_are_named(elem_type, name):
    model = _single_node_model(helper.make_node("Identity", ["x"], ["y"]), elem_type)
    with pytest.raises(UnsupportedOnnx, match=f"data type {name}"):
        onnx_to_torch(model)


def test_cast_to_string_is_refused_naming_node_and_type():
    node = helper.make_node("Cast", ["x"], ["y"], name="to_text", to=TensorProto.STRING)
    graph = helper.make_graph([node], "cast", [_float("x", [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UnsupportedOnnx, match="'to_text' \\(op Cast.*data type STRING"):
        onnx_to_torch(model)


def test_opset_below_7_is_refused_when_the_op_changed_since():
    node = helper.make_node("Add", ["x", "x"], ["y"], name="old_add")
    with pytest.raises(UnsupportedOnnx, match="opset 6.*convert_version"):
        onnx_to_torch(_single_node_model(node, opset=6))


def test_opset_below_7_is_accepted_for_ops_unchanged_since():
    model = _single_node_model(helper.make_node("Not", ["x"], ["y"]), TensorProto.BOOL, opset=1)
    x = torch.tensor([True, False])
    assert torch.equal(onnx_to_torch(model)(x)[0], torch.tensor([False, True]))


# ----- module surface ---------------------------------------------------------------------
def test_initializers_listed_as_inputs_are_not_forward_arguments():
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "ir3", [_float("x", [3]), _float("w", [3])],
                              [_float("y", [3])], [_init("w", np.ones(3, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    module = onnx_to_torch(model)
    assert isinstance(module, OnnxModule)
    assert module.input_names == ["x"] and module.output_names == ["y"]
    assert module.initializer_names == ["w"] and module.param_onnx_names == {"w": "w"}
    (y,) = module(torch.zeros(3))
    assert torch.equal(y, torch.ones(3))


def test_sparse_constants_and_initializers_are_densified():
    values = onnx.numpy_helper.from_array(np.array([5.0, 7.0], np.float32), "sparse")
    indices = onnx.numpy_helper.from_array(np.array([1, 4], np.int64), "sparse_indices")
    sparse = helper.make_sparse_tensor(values, indices, [2, 3])
    nodes = [helper.make_node("Constant", [], ["c"], sparse_value=sparse),
             helper.make_node("Add", ["x", "c"], ["xc"]),
             helper.make_node("Add", ["xc", "sparse"], ["y"])]
    graph = helper.make_graph(nodes, "sparse", [_float("x", [2, 3])], [_float("y", [2, 3])],
                              sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    (y,) = onnx_to_torch(model)(torch.zeros(2, 3))
    torch.testing.assert_close(y, torch.tensor([[0.0, 10.0, 0.0], [0.0, 14.0, 0.0]]))


def test_opset_argument_overrides_the_model_opset():
    node = helper.make_node("Softmax", ["x"], ["y"], axis=1)
    graph = helper.make_graph([node], "softmax", [_float("x", [2, 3, 4])],
                              [_float("y", [2, 3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = torch.randn(2, 3, 4)
    per_axis = onnx_to_torch(model)(x)[0]
    coerced = onnx_to_torch(model, opset=11)(x)[0]
    torch.testing.assert_close(per_axis.sum(dim=1), torch.ones(2, 4))
    torch.testing.assert_close(coerced.sum(dim=(1, 2)), torch.ones(2))


def test_inputs_read_as_configuration_can_be_bound_for_export():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "reshape", [_float("x", [2, 6]), helper.make_tensor_value_info(
        "shape", TensorProto.INT64, [2])], [_float("y", [3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = torch.randn(2, 6)
    module = onnx_to_torch(model)
    assert module.config_inputs == ["shape"]
    expected = torch.relu(x.reshape(3, 4))
    torch.testing.assert_close(module(x, torch.tensor([3, -1]))[0], expected)
    static = onnx_to_torch(model, constant_inputs={"shape": np.array([3, -1])})
    assert static.input_names == ["x"] and static.config_inputs == []
    torch.testing.assert_close(torch.export.export(static, (x,)).module()(x)[0], expected)
    with pytest.raises(ValueError, match="not graph inputs"):
        onnx_to_torch(model, constant_inputs={"shapes": np.array([3, -1])})


def test_deepcopy_keeps_the_onnx_attributes(gpt, gpt_onnx):
    _, idx, logits = gpt
    module = onnx_to_torch(gpt_onnx("torchscript_opset17"))
    clone = copy.deepcopy(module)
    assert isinstance(clone, OnnxModule)
    assert clone.input_names == module.input_names
    assert clone.param_onnx_names == module.param_onnx_names
    with torch.no_grad():
        torch.testing.assert_close(clone(idx)[0], logits, **VS_TORCH)
