"""The op-rule registry: for each IR op, its SBP signatures and how a rank computes its shard.

Rules are written for one mesh axis (:class:`Signature`: one SBP per tensor input and output) and
expanded mechanically to N-D meshes by :func:`nd_signatures`. An op without a rule still compiles:
it runs on broadcast inputs (see :func:`rule_for`).

Rules read a node's arguments by schema name with :func:`ir.ops.schema.arg` (schema defaults filled
in), never by position, and one rule function serves ops of one argument convention: the tests check
every name a rule reads against the schema of every op it is registered for.
"""
from ir.ops.registry import (OpRule, Signature, LocalCall, RULES, register, rule_for, nd_signatures,
                             local_call, known_ops)
from ir.ops import elementwise, shape_ops, nn_ops, reductions, comm  # noqa: F401  (registers rules)
from ir.ops import pipeline_ops  # noqa: F401  (registers the pipeline transfer op)
from ir.ops import attention  # noqa: F401  (registers ring attention)
from ir.ops import moe  # noqa: F401  (registers expert parallelism's dispatch, experts' matmul and combine)

__all__ = ["OpRule", "Signature", "LocalCall", "RULES", "register", "rule_for", "nd_signatures",
           "local_call", "known_ops"]
