"""The plan language: a parallel strategy written as text instead of a Python dict.

A plan (a ``*.sbp`` file, plan text, or statements attached to modules) parses into a
:class:`~strategy.Strategy`, and :func:`format_plan` prints any strategy back as canonical text,
so that ``parse_plan(format_plan(s)) == s``::

    mesh dp=2, tp=2
    param blocks.*.attn.qkv.weight: tp=S(0)
    activation blocks.*.mlp.fc: tp=S(2)
    stages at blocks.1
    microbatches 8
    schedule interleaved virtual_stages=2

By concern: :mod:`.parser` (``grammar.lark``, text -> strategy), :mod:`.printer` (strategy ->
text), :mod:`.model_checks` (a strategy against a captured model), :mod:`.annotations`
(``annotate()``, ``@sbp_plan``, merging). What a strategy may hold and how its values are checked
is the :mod:`strategy` package's. ``docs/dsl.md`` explains every statement. Every error is a
:class:`PlanError` that names the source, line and column and shows the line with a caret.
"""
from frontend.dsl.annotations import annotate, collect_annotations, merge_strategies, sbp_plan
from frontend.dsl.errors import PlanError, Positions, SourcePosition, error_at, located
from frontend.dsl.model_checks import validate_plan
from frontend.dsl.parser import GRAMMAR_FILE, STATEMENTS, load_plan, parse_plan, parse_plan_with_positions
from frontend.dsl.printer import format_plan

__all__ = ["GRAMMAR_FILE", "STATEMENTS", "PlanError", "Positions", "SourcePosition", "annotate",
           "collect_annotations", "error_at", "format_plan", "load_plan", "located", "merge_strategies",
           "parse_plan", "parse_plan_with_positions", "sbp_plan", "validate_plan"]
