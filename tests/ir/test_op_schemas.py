"""Every op rule is checked against its op's schema: real overloads, and only arguments the op has.

Rules read arguments by schema name (:func:`ir.ops.schema.arg`), never by position: the same
argument sits at different positions in different ops (``unbind(self, dim)`` vs ``split(self,
split_size, dim)``), and a rule shared by both read the wrong one. These tests read the rules' source:
every argument name a rule (or a helper it calls) reads must be in the schema of every op the rule is
registered for, so one rule serves one argument convention.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import types
from functools import lru_cache

import pytest
import transformers.integrations.moe  # noqa: F401  (registers the custom op that sbpc has rules for)

from ir.core import Graph
from ir.ops import RULES
from ir.ops.registry import SHAPE_ARGS, default_local
from ir.ops.schema import SchemaError, arg, parameter_names, schema_of, with_arg
from ir.types import TensorType

TORCH_OPS = sorted(op for op in RULES if not op.startswith("comm."))
"""ATen ops, and the custom ops (``torch.library``) sbpc has rules for: transformers' MoE grouped matmul."""
ARG_READERS = {"arg": 1, "dim_arg": 1, "with_arg": 1}
"""Functions of :mod:`ir.ops.schema` that read an argument, and the position of its name."""
NAMES_FROM_TABLES = {default_local: "reads the argument SHAPE_ARGS names (test_shape_arguments_are_in_their_schemas)"}
"""Rule helpers that read an argument named by a table rather than a literal: the table is checked instead."""


def test_registered_names_are_torch_overloads_or_collectives():
    """Rules are for ATen and registered custom ops, collectives, and sbpc's context-parallel and expert-parallel
    ops (which declare a schema)."""
    custom = [op for op in TORCH_OPS if not op.startswith(("aten.", "cp.", "moe."))]
    assert custom == ["transformers.grouped_mm_fallback.default"], f"rules for unexpected namespaces: {custom}"
    for op in TORCH_OPS:
        schema_of(op)  # raises SchemaError naming the op when it is no real overload


def test_unknown_overload_is_named():
    with pytest.raises(SchemaError, match=r"aten\.unbind\.nope names no ATen overload"):
        schema_of("aten.unbind.nope")


@lru_cache(maxsize=None)
def _source_tree(fn: types.FunctionType) -> ast.AST:
    assert fn.__name__ != "<lambda>", f"a lambda in {fn.__module__}: rule functions are named, so they can be checked"
    return ast.parse(textwrap.dedent(inspect.getsource(fn)))


def _rule_functions(fn, seen: set) -> None:
    """``fn`` and every function of ``ir.ops`` it calls, transitively (lambdas and closures included)."""
    if not isinstance(fn, types.FunctionType) or fn in seen or not fn.__module__.startswith("ir.ops"):
        return
    seen.add(fn)
    for node in ast.walk(_source_tree(fn)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            _rule_functions(fn.__globals__.get(node.id), seen)


def _reads(fn) -> tuple[set[str], list[str]]:
    """The argument names ``fn`` reads through :mod:`ir.ops.schema`, and its raw ``.args`` / ``.kwargs``
    indexing (which the rules must not do)."""
    names, raw = set(), []
    if fn in NAMES_FROM_TABLES or fn.__module__ == "ir.ops.schema":
        return names, raw
    for node in ast.walk(_source_tree(fn)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ARG_READERS:
            name = node.args[ARG_READERS[node.func.id]]
            assert isinstance(name, ast.Constant) and isinstance(name.value, str), (
                f"{fn.__qualname__} reads an argument whose name is not a literal: {ast.unparse(node)}")
            names.add(name.value)
        reads_raw = (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
                     and node.value.attr in ("args", "kwargs"))
        reads_raw |= (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                      and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "kwargs")
        if reads_raw:
            raw.append(ast.unparse(node))
    return names, raw


@pytest.mark.parametrize("op", TORCH_OPS)
def test_rules_read_only_arguments_of_their_op(op: str):
    """Every argument a rule, its local call or their helpers read exists in the op's schema; nothing
    indexes the node's positional arguments."""
    rule = RULES[op]
    functions: set = set()
    for fn in (rule.signatures, rule.local):
        _rule_functions(fn, functions)
    schema = parameter_names(op)
    for fn in functions:
        names, raw = _reads(fn)
        unknown = sorted(names - set(schema))
        assert not unknown, (f"{fn.__module__}.{fn.__qualname__} (a rule of {op}) reads {unknown}, which "
                             f"{schema_of(op)} does not have: register it for ops of one argument convention")
        assert not raw, (f"{fn.__module__}.{fn.__qualname__} (a rule of {op}) indexes node arguments by hand: "
                         f"{raw}; read them with ir.ops.schema.arg(node, name)")


def test_shape_arguments_are_in_their_schemas():
    for op, name in SHAPE_ARGS.items():
        assert name in parameter_names(op), f"SHAPE_ARGS names {name!r} for {op}: {schema_of(op)}"


def _node(op: str, args: list, kwargs: dict | None = None):
    g = Graph(name="t")
    x = g.add_input("x", TensorType.of((4, 6), "f32"))
    args = [x if a == "x" else a for a in args]
    return g.create_node(op, args, kwargs or {}, [TensorType.of((4,), "f32")], ["y"])


def test_arg_reads_positional_keyword_and_default():
    assert arg(_node("aten.unbind.int", ["x", 1]), "dim") == 1
    assert arg(_node("aten.unbind.int", ["x"], {"dim": -1}), "dim") == -1
    assert arg(_node("aten.split.Tensor", ["x", 2]), "dim") == 0
    assert arg(_node("aten.split.Tensor", ["x", 2, 1]), "dim") == 1
    assert arg(_node("aten.var.correction", ["x", [1]], {"keepdim": True}), "keepdim") is True
    assert arg(_node("aten.amax.default", ["x"]), "dim") == []


def test_arg_errors_name_the_op_and_the_argument():
    node = _node("aten.unbind.int", ["x", 1])
    with pytest.raises(SchemaError, match=r"aten\.unbind\.int has no argument 'split_size'"):
        arg(node, "split_size")
    with pytest.raises(SchemaError, match=r"lacks its required argument 'dims'"):
        arg(_node("aten.permute.default", ["x"]), "dims")


def test_with_arg_replaces_where_the_argument_is():
    node = _node("aten.split.Tensor", ["x", 2, 1])
    assert with_arg(node, "dim", 0)[0][2] == 0
    args, kwargs = with_arg(_node("aten.split.Tensor", ["x", 2]), "dim", 1)
    assert len(args) == 2 and kwargs == {"dim": 1}
