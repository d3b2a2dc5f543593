"""The pass manager: named passes in order, the verifier after each, IR dumps between them."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from ir.core import Graph
from ir.verifier import VerificationError, verify

PassFn = Callable[[Graph, "PassContext"], None]
PASSES: dict[str, PassFn] = {}


def register_pass(name: str):
    """Decorator: make a pass available by name."""
    def wrap(fn: PassFn) -> PassFn:
        PASSES[name] = fn
        fn.pass_name = name
        return fn
    return wrap


@dataclass
class PassContext:
    """What passes share: the strategy being applied, the device count, and options."""

    strategy: dict
    world_size: int
    train: bool = True
    options: dict = field(default_factory=dict)
    cluster: Any = None


class PassFailed(RuntimeError):
    """A pass raised or left an invalid graph; the message names it and the passes before it."""


def run_passes(graph: Graph, names: list[str], ctx: PassContext, *, dump_after: str | list[str] | None = None,
               dump_to: TextIO | None = None, verify_each: bool = True) -> Graph:
    """Run the passes ``names`` in order over ``graph`` (in place), verifying after each one."""
    wanted = _dump_set(dump_after, names)
    for i, name in enumerate(names):
        if name not in PASSES:
            raise PassFailed(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
        try:
            PASSES[name](graph, ctx)
            if verify_each:
                verify(graph)
        except (VerificationError, ValueError, KeyError, TypeError) as err:
            before = ", ".join(names[:i]) or "none"
            raise PassFailed(f"pass {name!r} failed (after passes: {before}): {err}") from err
        if name in wanted or "all" in wanted:
            (dump_to or sys.stdout).write(f"// IR after pass {name}\n{graph}")
    return graph


def _dump_set(dump_after, names) -> set[str]:
    if not dump_after:
        return set()
    wanted = {dump_after} if isinstance(dump_after, str) else set(dump_after)
    unknown = wanted - set(names) - {"all"}
    if unknown:
        raise PassFailed(f"--dump-after names {sorted(unknown)}, which are not in this pipeline: {', '.join(names)}")
    return wanted
