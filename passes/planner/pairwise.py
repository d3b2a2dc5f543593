"""Pairwise assignment problems and their exact solvers.

Intra-op SBP assignment is a discrete problem: every variable (an op, or a parameter's storage
layout) picks one *choice*; a choice has a unary cost (its compute time), and each edge (a value
flowing from a producer to a consumer) adds the cost of converting the producer's output layout
into the layout the consumer's choice reads. The total is

    sum_v unary[v][choice_v] + sum_e cost_e(key_e(src choice), key_e(dst choice)).

Edge costs depend on the choices only through *keys* (the two SBPs at the edge), which lets the
dynamic program merge choices that look the same to the rest of the graph.

Solvers:

- :func:`solve_dp`: variable elimination along the given order (a frontier dynamic program). A state is
  the keys of the *live* variables (processed, with an edge to an unprocessed one); exact whatever the
  graph shape, in time exponential only in the frontier width, which is small for layer stacks.
- :func:`solve_ilp`: the textbook integer program over the local polytope (one-hot choices, one
  pair variable per edge and key pair), solved with HiGHS (``scipy.optimize.milp``) to zero gap.
- :func:`solve_z3`: the same model as a z3 ``Optimize`` problem; exact but slow, for tiny problems.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Hashable, Sequence


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
    """The largest number of DP states held at once (0 for the other solvers)."""


# --------------------------------------------------------------------------------------------------
# Frontier dynamic program
# --------------------------------------------------------------------------------------------------


def solve_dp(problem: PairwiseProblem, max_states: int = 50_000) -> Solution:
    """Exact minimum: variables with one neighbour (parameters, chain ends) are folded into it first,
    then the rest are eliminated in index order by the frontier DP; beyond ``max_states`` states the DP
    keeps the cheapest ones (and reports ``exact=False``)."""
    problem.check()
    reduced, folds = _fold_leaves(problem)
    solution = _frontier_dp(reduced, max_states)
    assignment = solution.assignment
    for v, neighbour, best in reversed(folds):
        assignment[v] = best[assignment[neighbour]] if neighbour is not None else best[0]
    return Solution(problem.total(assignment), assignment, solution.exact, solution.states)


def _fold_leaves(problem: PairwiseProblem) -> tuple[PairwiseProblem, list]:
    """Eliminate variables with at most one incident edge (exactly: per choice of the neighbour, the leaf
    takes its best choice). Returns the remaining problem (eliminated variables keep one zero-cost
    choice) and the folds ``(variable, neighbour or None, best choice per neighbour choice)``."""
    unary = [list(costs) for costs in problem.unary]
    incident: list[set] = [set() for _ in unary]
    for k, e in enumerate(problem.edges):
        incident[e.a].add(k)
        incident[e.b].add(k)
    alive = [True] * len(unary)
    folds = []
    queue = [v for v in range(len(unary)) if len(incident[v]) <= 1]
    while queue:
        v = queue.pop()
        if not alive[v] or len(incident[v]) > 1:
            continue
        alive[v] = False
        if not incident[v]:
            best = min(range(len(unary[v])), key=lambda c: unary[v][c])
            folds.append((v, None, [best]))
            continue
        k = incident[v].pop()
        e = problem.edges[k]
        u = e.b if e.a == v else e.a
        incident[u].discard(k)
        best_for = []
        for cu in range(len(unary[u])):
            options = [(unary[v][cv] + (e.cost(cv, cu) if e.a == v else e.cost(cu, cv)), cv)
                       for cv in range(len(unary[v]))]
            cost, cv = min(options)
            unary[u][cu] += cost
            best_for.append(cv)
        folds.append((v, u, best_for))
        if len(incident[u]) <= 1:
            queue.append(u)
    kept = [v for v in range(len(unary)) if alive[v]]
    index = {v: i for i, v in enumerate(kept)}
    edges = [PairEdge(index[e.a], index[e.b], e.a_keys, e.b_keys, e.costs)
             for e in problem.edges if alive[e.a] and alive[e.b]]
    reduced = PairwiseProblem([unary[v] for v in kept], edges)
    return _Expanded(reduced, kept, len(unary)), folds


class _Expanded(PairwiseProblem):
    """The reduced problem, remembering which original variable each of its variables is."""

    def __init__(self, reduced: PairwiseProblem, kept: list, total_vars: int):
        super().__init__(reduced.unary, reduced.edges, reduced.names)
        self.kept = kept
        self.total_vars = total_vars


def _frontier_dp(problem: "_Expanded", max_states: int) -> Solution:
    """Variable elimination in index order; returns an assignment of the *original* variables (folded
    ones left at 0 for the caller to fill).

    A state is the tuple of the open edges' keys on their processed side, in the order of ``frontier``.
    Per variable, choices that show the same keys on every incident edge are merged first (only the
    cheapest can be optimal), and the closing edges' costs are computed once per distinct tuple of
    closing keys rather than once per state."""
    n = problem.num_vars
    edges = [_interned(e) for e in problem.edges]  # small-int keys: states hash fast
    incident: list[list[int]] = [[] for _ in range(n)]
    for k, e in enumerate(edges):
        incident[e.a].append(k)
        incident[e.b].append(k)
    last_var = [max(e.a, e.b) for e in edges]
    frontier: list[int] = []
    states: dict[tuple, float] = {(): 0.0}
    history: list[dict] = []
    exact, widest = True, 1
    for v in range(n):
        closing = [k for k in incident[v] if last_var[k] == v]
        opening = [k for k in incident[v] if last_var[k] != v]
        position = {k: i for i, k in enumerate(frontier)}
        closing_at = [position[k] for k in closing]
        kept_at = [i for i, k in enumerate(frontier) if last_var[k] != v]
        groups = _choice_groups(problem.unary[v], edges, v, closing, opening)
        close_cost: dict[tuple, list] = {}
        new_states: dict[tuple, float] = {}
        back: dict[tuple, tuple] = {}
        for state, base in states.items():
            kept = tuple([state[i] for i in kept_at])
            closed = tuple([state[i] for i in closing_at])
            costs = close_cost.get(closed)
            if costs is None:
                costs = close_cost[closed] = [_closing_cost(edges, v, closing, closed, side) for _, _, side, _ in groups]
            for (c, unary, _, open_keys), extra in zip(groups, costs):
                cost = base + unary + extra
                if cost == math.inf:
                    continue
                new = kept + open_keys
                if cost < new_states.get(new, math.inf):
                    new_states[new] = cost
                    back[new] = (state, c)
        if not new_states:
            raise ValueError(f"no finite-cost assignment reaches variable {problem.kept[v]}")
        if len(new_states) > max_states:
            exact = False
            best = sorted(new_states, key=new_states.get)[:max_states]
            new_states = {s: new_states[s] for s in best}
        widest = max(widest, len(new_states))
        history.append(back)
        states = new_states
        frontier = [frontier[i] for i in kept_at] + opening
    final, cost = min(states.items(), key=lambda item: item[1])
    assignment = [0] * problem.total_vars
    for v in range(n - 1, -1, -1):
        final, assignment[problem.kept[v]] = history[v][final]
    return Solution(cost, assignment, exact, widest)


def _choice_groups(unaries: list, edges: list, v: int, closing: list, opening: list) -> list[tuple]:
    """The choices of ``v`` worth trying: per distinct keys on its incident edges, the cheapest (the
    earliest on ties), as ``(choice, unary, keys on the closing edges, keys on the opening edges)``."""
    best: dict[tuple, tuple] = {}
    for c, unary in enumerate(unaries):
        if unary == math.inf:
            continue
        side = tuple(_side_key(edges[k], v, c) for k in closing)
        open_keys = tuple(_side_key(edges[k], v, c) for k in opening)
        signature = (side, open_keys)
        if signature not in best or unary < best[signature][1]:
            best[signature] = (c, unary, side, open_keys)
    return sorted(best.values())


def _closing_cost(edges: list, v: int, closing: list, closed: tuple, side: tuple) -> float:
    """The cost of the closing edges when their processed ends hold ``closed`` and ``v`` shows ``side``."""
    total = 0.0
    for k, other, mine in zip(closing, closed, side):
        e = edges[k]
        total += e.costs[other][mine] if e.b == v else e.costs[mine][other]
    return total


def _interned(edge: PairEdge) -> PairEdge:
    """The edge with its keys numbered per side and its costs as a table ``costs[a key][b key]``."""
    a_distinct = list(dict.fromkeys(edge.a_keys))
    b_distinct = list(dict.fromkeys(edge.b_keys))
    a_index = {key: i for i, key in enumerate(a_distinct)}
    b_index = {key: i for i, key in enumerate(b_distinct)}
    table = [[edge.costs[(ka, kb)] for kb in b_distinct] for ka in a_distinct]
    return PairEdge(edge.a, edge.b, [a_index[key] for key in edge.a_keys], [b_index[key] for key in edge.b_keys], table)


def _side_key(edge: PairEdge, v: int, choice: int) -> Hashable:
    return edge.a_keys[choice] if edge.a == v else edge.b_keys[choice]


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
