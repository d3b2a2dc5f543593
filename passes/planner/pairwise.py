"""Pairwise assignment problems and their exact solvers.

Intra-op SBP assignment is a discrete problem: every variable (an op, or a parameter's storage
layout) picks one *choice*; a choice has a unary cost (its compute time), and each edge (a value
flowing from a producer to a consumer) adds the cost of converting the producer's output layout
into the layout the consumer's choice reads. The total is

    sum_v unary[v][choice_v] + sum_e cost_e(key_e(src choice), key_e(dst choice)).

Edge costs depend on the choices only through *keys* (the two SBPs at the edge), which lets the
solvers merge choices that look the same to the rest of the graph.

Solvers:

- :func:`solve_dp`: variable elimination (a dynamic program over cost tables), smallest table first;
  exact whatever the graph shape, in time exponential only in the graph's elimination width, which is
  small for layer stacks (a transformer block: a few variables at a time).
- :func:`solve_ilp`: the textbook integer program over the local polytope (one-hot choices, one
  pair variable per edge and key pair), solved with HiGHS (``scipy.optimize.milp``) to zero gap.
- :func:`solve_z3`: the same model as a z3 ``Optimize`` problem; exact but slow, for tiny problems.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Hashable, Sequence

LOG = logging.getLogger("sbpc.planner")


@dataclass
class PairEdge:
    """An edge between variables ``a`` and ``b``: ``costs[(a_keys[ca], b_keys[cb])]`` for choices (ca, cb)."""

    a: int
    b: int
    a_keys: Sequence[Hashable]
    b_keys: Sequence[Hashable]
    costs: dict

    def cost(self, choice_a: int, choice_b: int) -> float:
        """The edge cost when ``a`` takes ``choice_a`` and ``b`` takes ``choice_b``."""
        return self.costs[(self.a_keys[choice_a], self.b_keys[choice_b])]


@dataclass
class PairwiseProblem:
    """Variables with unary costs per choice, and edges with costs per pair of keys."""

    unary: list
    """``unary[v][c]``: the cost of variable ``v`` taking choice ``c``."""
    edges: list = field(default_factory=list)
    """:class:`PairEdge` s."""
    names: list | None = None
    """Optional variable names, for messages."""

    @property
    def num_vars(self) -> int:
        """The number of variables."""
        return len(self.unary)

    def total(self, assignment: Sequence[int]) -> float:
        """The objective of a full assignment (one choice index per variable)."""
        value = sum(self.unary[v][c] for v, c in enumerate(assignment))
        return value + sum(e.cost(assignment[e.a], assignment[e.b]) for e in self.edges)

    def check(self) -> None:
        """Raise ValueError when a variable has no choice or an edge misses a key pair."""
        for v, costs in enumerate(self.unary):
            if not costs:
                name = self.names[v] if self.names else f"variable {v}"
                raise ValueError(f"{name} has no admissible choice (every layout was ruled out)")
        for e in self.edges:
            for ka in set(e.a_keys):
                for kb in set(e.b_keys):
                    if (ka, kb) not in e.costs:
                        raise ValueError(f"edge {e.a}->{e.b} has no cost for keys {ka} -> {kb}")


@dataclass
class Solution:
    """An assignment, its objective, and whether the solver proved it optimal."""

    cost: float
    assignment: list
    exact: bool = True
    states: int = 0
    """The largest cost table the elimination built (0 for the other solvers)."""


# --------------------------------------------------------------------------------------------------
# Variable elimination
# --------------------------------------------------------------------------------------------------


def solve_dp(problem: PairwiseProblem, max_table: int = 4_000_000) -> Solution:
    """Exact minimum by variable elimination (bucket elimination over cost tables).

    Choices of a variable that show the same keys on every incident edge are merged first (only the
    cheapest can be optimal). Then variables are eliminated greedily, always the one whose table (its
    choices times those of its current neighbours) is smallest: a chain of views, a leaf parameter or
    an op whose inputs have all been eliminated costs a handful of entries, whatever the graph order,
    so values that many ops read (masks, rotary tables) no longer keep a wide frontier open.
    Eliminating ``v`` replaces its factors by one over its neighbours: per neighbour choices, the cost
    of ``v``'s best choice. When the next table would exceed ``max_table`` entries the problem is solved
    by :func:`solve_ilp` instead (logged)."""
    problem.check()
    incident: list[list[PairEdge]] = [[] for _ in range(problem.num_vars)]
    for e in problem.edges:
        incident[e.a].append(e)
        if e.b != e.a:
            incident[e.b].append(e)
    domains = [_distinct_choices(problem.unary[v], incident[v], v) for v in range(problem.num_vars)]
    factors = _factors(problem, domains)
    order, tables, widest = _elimination_order(factors, [len(d) for d in domains], max_table)
    if order is None:
        LOG.warning("layout problem too wide for variable elimination (a table of more than %d entries); "
                    "solving it as an integer program", max_table)
        return solve_ilp(problem)
    reduced = [0] * problem.num_vars
    for v, scope, best in reversed(tables):
        reduced[v] = int(best[tuple(reduced[u] for u in scope)])
    assignment = [domains[v][c] for v, c in enumerate(reduced)]
    total = problem.total(assignment)
    if total == math.inf:
        raise ValueError("no finite-cost assignment: every combination of layouts needs an impossible conversion")
    return Solution(total, assignment, True, widest)


def _distinct_choices(unary: list, incident: list, v: int) -> list[int]:
    """The choices of ``v`` worth keeping: per distinct keys on its ``incident`` edges, the cheapest (the
    earliest on ties)."""
    best: dict[tuple, int] = {}
    for c, cost in enumerate(unary):
        signature = tuple((e.a_keys[c] if e.a == v else None, e.b_keys[c] if e.b == v else None) for e in incident)
        if signature not in best or cost < unary[best[signature]]:
            best[signature] = c
    return sorted(best.values())


def _factors(problem: PairwiseProblem, domains: list) -> list[tuple[tuple, "np.ndarray"]]:
    """Cost tables over the kept choices: one per variable, one per pair of variables with edges."""
    import numpy as np
    factors = [((v,), np.array([problem.unary[v][c] for c in domain], dtype=float)) for v, domain in enumerate(domains)]
    pairs: dict[tuple[int, int], "np.ndarray"] = {}
    for e in problem.edges:
        table = np.array([[e.costs[(e.a_keys[ca], e.b_keys[cb])] for cb in domains[e.b]] for ca in domains[e.a]],
                         dtype=float).reshape(len(domains[e.a]), len(domains[e.b]))
        if e.a == e.b:  # a variable reading its own output: only the diagonal happens
            factors[e.a] = ((e.a,), factors[e.a][1] + np.diagonal(table))
            continue
        key, table = ((e.a, e.b), table) if e.a < e.b else ((e.b, e.a), table.T)
        pairs[key] = pairs[key] + table if key in pairs else table
    return factors + list(pairs.items())


def _elimination_order(factors: list, sizes: list[int], max_table: int):
    """Eliminate every variable, smallest table first; returns (order, per variable (v, scope, argmin
    table over its scope), largest table) or (None, None, 0) when a table would exceed ``max_table``."""
    import heapq

    import numpy as np
    live = {k: f for k, f in enumerate(factors)}
    of_var: list[set] = [set() for _ in sizes]
    adjacent: list[set] = [set() for _ in sizes]
    for k, (scope, _) in live.items():
        for u in scope:
            of_var[u].add(k)
            adjacent[u].update(w for w in scope if w != u)

    def weight(v: int) -> int:
        """The size of v's table, or ``max_table + 1`` for any larger (a value many ops read would
        otherwise multiply out to a huge integer that is never used)."""
        size = sizes[v]
        for u in adjacent[v]:
            size *= sizes[u]
            if size > max_table:
                return max_table + 1
        return size

    current = [weight(v) for v in range(len(sizes))]
    heap = [(w, v) for v, w in enumerate(current)]
    heapq.heapify(heap)
    eliminated = [False] * len(sizes)
    tables, widest, next_key = [], 1, len(factors)
    while heap:
        size, v = heapq.heappop(heap)
        if eliminated[v] or size != current[v]:
            continue  # a stale entry: v was eliminated or its neighbourhood changed
        if size > max_table:
            return None, None, 0
        eliminated[v] = True
        scope = tuple(sorted(adjacent[v]))
        widest = max(widest, size)
        axes = scope + (v,)
        total = np.zeros([sizes[u] for u in axes])
        for k in of_var[v]:
            f_scope, table = live.pop(k)
            perm = sorted(range(len(f_scope)), key=lambda i: axes.index(f_scope[i]))
            shape = [sizes[u] if u in f_scope else 1 for u in axes]
            total = total + table.transpose(perm).reshape(shape)
            for u in f_scope:
                if u != v:
                    of_var[u].discard(k)
        of_var[v].clear()
        live[next_key] = (scope, np.min(total, axis=-1))
        for u in scope:
            of_var[u].add(next_key)
            adjacent[u].discard(v)
            adjacent[u].update(w for w in scope if w != u)
            current[u] = weight(u)
            heapq.heappush(heap, (current[u], u))
        next_key += 1
        tables.append((v, scope, np.argmin(total, axis=-1)))
    return [t[0] for t in tables], tables, widest


# --------------------------------------------------------------------------------------------------
# Exact solvers
# --------------------------------------------------------------------------------------------------


def _pair_tables(problem: PairwiseProblem) -> list[tuple[PairEdge, list, list]]:
    """Per edge: its distinct keys on each side (the ILP's pair variables range over these)."""
    return [(e, sorted(set(e.a_keys), key=repr), sorted(set(e.b_keys), key=repr)) for e in problem.edges]


def solve_ilp(problem: PairwiseProblem, time_limit_s: float = 60.0) -> Solution:
    """Exact minimum as an integer program (HiGHS through ``scipy.optimize.milp``, zero gap)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    problem.check()
    offsets, width = [], 0
    for costs in problem.unary:
        offsets.append(width)
        width += len(costs)
    tables = _pair_tables(problem)
    pair_offsets = []
    for e, a_keys, b_keys in tables:
        pair_offsets.append(width)
        width += len(a_keys) * len(b_keys)
    objective = np.zeros(width)
    big = _finite_ceiling(problem)
    scale = _objective_scale(problem)  # HiGHS tolerances are absolute: bring the costs to order one
    rows = problem.num_vars + sum(len(a) + len(b) for _, a, b in tables)
    matrix = lil_matrix((rows, width))
    lower, upper = np.zeros(rows), np.zeros(rows)
    for v, costs in enumerate(problem.unary):
        for c, cost in enumerate(costs):
            objective[offsets[v] + c] = min(cost, big) * scale
            matrix[v, offsets[v] + c] = 1
        lower[v] = upper[v] = 1
    row = problem.num_vars
    for (e, a_keys, b_keys), base in zip(tables, pair_offsets):
        for i, ka in enumerate(a_keys):
            for j, kb in enumerate(b_keys):
                objective[base + i * len(b_keys) + j] = min(e.costs[(ka, kb)], big) * scale
        # Marginals: the pair variables of key ka sum to the choices of a with key ka (same for b).
        for i, ka in enumerate(a_keys):
            for j in range(len(b_keys)):
                matrix[row, base + i * len(b_keys) + j] = 1
            for c, key in enumerate(e.a_keys):
                if key == ka:
                    matrix[row, offsets[e.a] + c] = -1
            row += 1
        for j, kb in enumerate(b_keys):
            for i in range(len(a_keys)):
                matrix[row, base + i * len(b_keys) + j] = 1
            for c, key in enumerate(e.b_keys):
                if key == kb:
                    matrix[row, offsets[e.b] + c] = -1
            row += 1
    integrality = np.zeros(width)
    integrality[:pair_offsets[0] if pair_offsets else width] = 1
    result = milp(objective, constraints=LinearConstraint(matrix.tocsr(), lower, upper), integrality=integrality,
                  bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0, "time_limit": time_limit_s})
    if result.x is None:
        raise RuntimeError(f"the ILP solver found no solution: {result.message}")
    assignment = [int(np.argmax(result.x[offsets[v]:offsets[v] + len(c)])) for v, c in enumerate(problem.unary)]
    return Solution(problem.total(assignment), assignment, result.status == 0)


def _finite_ceiling(problem: PairwiseProblem) -> float:
    """A cost standing for infinity (impossible conversions): more than any finite assignment costs."""
    finite = [c for costs in problem.unary for c in costs if math.isfinite(c)]
    finite += [c for e in problem.edges for c in e.costs.values() if math.isfinite(c)]
    return 1.0 + 2.0 * sum(abs(c) for c in finite)


def _objective_scale(problem: PairwiseProblem) -> float:
    """A factor making the smallest positive cost about 1 (costs are seconds, often around 1e-9); costs
    more than nine orders of magnitude under the largest are not resolved."""
    positive = [c for costs in problem.unary for c in costs if 0 < c < math.inf]
    positive += [c for e in problem.edges for c in e.costs.values() if 0 < c < math.inf]
    return 1.0 / max(min(positive), 1e-9 * max(positive), 1e-200) if positive else 1.0


def solve_z3(problem: PairwiseProblem, timeout_ms: int = 60_000) -> Solution:
    """Exact minimum with z3 ``Optimize`` (exact rational costs); practical for a dozen variables."""
    import z3

    problem.check()
    optimizer = z3.Optimize()
    optimizer.set("timeout", timeout_ms)
    big = _finite_ceiling(problem)
    choice = [z3.Int(f"v{v}") for v in range(problem.num_vars)]
    terms = []
    for v, costs in enumerate(problem.unary):
        optimizer.add(choice[v] >= 0, choice[v] < len(costs))
        terms.append(_select(choice[v], [(c, min(cost, big)) for c, cost in enumerate(costs)]))
    for e in problem.edges:
        pairs = [(ca, cb) for ca in range(len(problem.unary[e.a])) for cb in range(len(problem.unary[e.b]))]
        terms.append(z3.Sum([z3.If(z3.And(choice[e.a] == ca, choice[e.b] == cb), _real(min(e.cost(ca, cb), big)), 0)
                             for ca, cb in pairs if e.cost(ca, cb) != 0] or [z3.RealVal(0)]))
    optimizer.minimize(z3.Sum(terms))
    if optimizer.check() != z3.sat:
        raise RuntimeError("z3 found no assignment (timeout or infeasible)")
    model = optimizer.model()
    assignment = [model.eval(c, model_completion=True).as_long() for c in choice]
    return Solution(problem.total(assignment), assignment, True)


def _real(value: float):
    import z3
    return z3.RealVal(Fraction(value))


def _select(var, options: list[tuple[int, float]]):
    import z3
    return z3.Sum([z3.If(var == c, _real(cost), 0) for c, cost in options if cost != 0] or [z3.RealVal(0)])
