"""IR: SBP values, meshes, the text format, and the verifier."""
import pytest
import sympy
from hypothesis import given, strategies as st

from compiler import Cluster, compile
from ir.parser import IRSyntaxError, parse
from ir.sbp import B, P, PMAX, Split, format_nd_sbp, parse_nd_sbp, parse_sbp
from ir.types import Mesh
from ir.verifier import VerificationError, verify
from tests.models import gpt_inputs, gpt_model

SBPS = st.one_of(st.builds(Split, st.integers(0, 7)), st.just(B), st.just(P), st.just(PMAX))


@given(SBPS)
def test_sbp_text_round_trip(sbp):
    assert parse_sbp(str(sbp)) == sbp


@given(st.lists(SBPS, min_size=1, max_size=3).map(tuple))
def test_nd_sbp_text_round_trip(nd):
    assert parse_nd_sbp(format_nd_sbp(nd)) == nd


def test_mesh_coordinates_and_groups():
    mesh = Mesh.make(["dp", "tp"], [2, 3])
    assert mesh.coords(4) == (1, 1)
    assert mesh.index_of((1, 1)) == 4
    assert mesh.groups(1) == [[0, 1, 2], [3, 4, 5]]
    assert mesh.groups(0) == [[0, 3], [1, 4], [2, 5]]


@pytest.fixture(scope="module")
def tp_ir() -> str:
    strategy = {"mesh": {"dp": 2, "tp": 2}, "params": {"blocks.*.mlp.fc.weight": {"tp": "S(0)"}}}
    return compile(gpt_model(), gpt_inputs(), cluster=Cluster.local(4), strategy=strategy).ir


def test_text_round_trip_2d_mesh(tp_ir):
    assert str(parse(tp_ir)) == tp_ir


@pytest.mark.parametrize("ir_text", ["tp_ir", "bn_ir"])
def test_a_copy_prints_as_the_graph_and_shares_no_value_or_node(ir_text, request):
    """Graph.copy(): the same text (gradient buckets, buffer updates and node attributes included), its own
    values, nodes and attributes (a value named in an attribute is its copy), use lists and producers of its
    own, and editing it leaves the original as it was."""
    text = request.getfixturevalue(ir_text)
    graph = parse(text)
    graph.attrs["_cache"] = {"private": True}
    copied = graph.copy()
    assert str(copied) == text and "_cache" not in copied.attrs
    originals = {id(v) for v in graph.all_values()} | {id(n) for n in graph.nodes}
    assert not originals & ({id(v) for v in copied.all_values()} | {id(n) for n in copied.nodes})
    named = {v.name: v for v in copied.all_values()}
    for node in copied.nodes:
        assert all(named[v.name] is v and node in v.uses for v in node.input_values())
        assert all(o.producer is node for o in node.outputs)
    assert all(named[v.name] is v for v in copied.outputs + list(copied.buffer_updates) +
               list(copied.buffer_updates.values()))
    buckets = copied.attrs.get("grad_buckets", [])
    assert all(named[p.name] is p for bucket in buckets for p in bucket["params"])
    first = copied.nodes[0]
    first.attrs["module"] = "edited"
    copied.replace_all_uses(first.outputs[0], copied.inputs[0], only=lambda user: user is first.outputs[0].uses[0])
    copied.attrs["note"] = "edited"
    assert str(graph) == text


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.replace("graph GPT {", "graph GPT {{", 1), "line 2:"),
    (lambda t: t.replace("(S(0), B) @world", "(S(0), Q) @world", 1), "line"),
    (lambda t: t.replace("%embedding: ", "%embedding: f32[batch, seq, 64] = ", 1), "line"),
])
def test_syntax_errors_have_line_and_column(tp_ir, mutate, message):
    with pytest.raises(IRSyntaxError, match=message) as err:
        parse(mutate(tp_ir))
    assert "^" in str(err.value)


def test_use_before_definition_is_rejected(tp_ir):
    lines = tp_ir.splitlines()
    first = next(i for i, l in enumerate(lines) if "%embedding:" in l)
    with pytest.raises(IRSyntaxError, match="used before it is defined"):
        parse("\n".join(lines[:first] + [lines[first].replace("%idx", "%nowhere")] + lines[first + 1:]))


def test_verifier_rejects_ill_placed_layout(tp_ir):
    graph = parse(tp_ir)
    node = next(n for n in graph.nodes if n.op == "aten.layer_norm.default")
    node.outputs[0].sbp = (Split(2), Split(2))
    with pytest.raises(VerificationError, match="layer_norm") as err:
        verify(graph)
    assert node.outputs[0].name in str(err.value)


def test_verifier_rejects_ill_typed_node(tp_ir):
    graph = parse(tp_ir)
    node = next(n for n in graph.nodes if n.op == "aten.linear.default")
    t = node.outputs[0].type
    node.outputs[0].type = type(t)(t.shape[:-1] + (sympy.Integer(7),), "f32")
    with pytest.raises(VerificationError, match="is declared f32\\[batch, seq, 7\\].*gives"):
        verify(graph)


def test_verifier_remembers_op_results_without_missing_errors(tp_ir):
    """Repeated layers run each distinct op call once on meta tensors; a later mistake in an already
    seen call, or a call whose inputs no longer fit, is still caught."""
    graph = parse(tp_ir)
    verify(graph)  # fills the cache
    node = [n for n in graph.nodes if n.op == "aten.linear.default"][-1]
    t = node.outputs[0].type
    node.outputs[0].type = type(t)(t.shape[:-1] + (sympy.Integer(7),), "f32")
    with pytest.raises(VerificationError, match="is declared f32\\[batch, seq, 7\\].*gives"):
        verify(graph)
    graph = parse(tp_ir)
    users = [n for n in graph.nodes if n.op == "aten.linear.default"]
    weight = next(v for v in graph.params if v.type.ndim == 2 and
                  [n for n in graph.nodes if v in n.input_values()] == [u for u in users if u.input_values()[1] is v])
    weight.type = type(weight.type)((weight.type.shape[0], sympy.Integer(3)), "f32")  # no longer matches x
    with pytest.raises(VerificationError, match="ill-typed"):
        verify(graph)


def test_verifier_rejects_wrong_collective(tp_ir):
    graph = parse(tp_ir)
    comm = next(n for n in graph.nodes if n.op.startswith("comm."))
    comm.op = "comm.all_to_all" if comm.op != "comm.all_to_all" else "comm.all_reduce"
    with pytest.raises(VerificationError, match="does not do"):
        verify(graph)


@pytest.fixture(scope="module")
def bn_ir() -> str:
    from tests.models import bn_cnn_model, cnn_inputs
    return compile(bn_cnn_model(), cnn_inputs(), cluster=Cluster.local(2), strategy="dp").ir


def test_buffer_updates_print_and_parse(bn_ir):
    graph = parse(bn_ir)
    assert {b.name: v.sbp for b, v in graph.buffer_updates.items()} == {
        "bn.running_mean": (B,), "bn.running_var": (B,), "bn.num_batches_tracked": (B,)}
    assert "  update %bn.num_batches_tracked <- %" in bn_ir
    assert str(graph) == bn_ir
    verify(graph)


def test_buffer_updated_twice_is_a_syntax_error(bn_ir):
    line = next(l for l in bn_ir.splitlines() if l.startswith("  update %bn.running_mean"))
    with pytest.raises(IRSyntaxError, match="updated twice"):
        parse(bn_ir.replace(line, line + "\n" + line))


@pytest.mark.parametrize("change, message", [
    (lambda g, buffer, value: g.buffer_updates.update({g.param_values()["bn.weight"]: value}),
     "is a param, not a buffer"),
    (lambda g, buffer, value: g.buffer_updates.update({buffer: g.param_values()["head.bias"]}),
     r"the buffer is f32\[8\] but the value is f32\[10\]"),
    (lambda g, buffer, value: g.buffer_updates.update({buffer: value.producer.input_values()[0]}),
     r"held \(P\(sum\)\) @world but the buffer \(B\) @world"),
])
def test_verifier_rejects_bad_buffer_updates(bn_ir, change, message):
    graph = parse(bn_ir)
    buffer, value = next((b, v) for b, v in graph.buffer_updates.items() if b.name == "bn.running_mean")
    change(graph, buffer, value)
    with pytest.raises(VerificationError, match=message):
        verify(graph, check_types=False)
