"""The runtime of emitted programs, one module per feature, and the selection of what a program carries.

The modules of this package (``core``, ``collectives``, ``fsdp``, ``grad_sync``, ...) are not imported
by emitted programs: they are the source the code generator copies from. A program carries only the
top-level definitions its own code reaches — the names its ``forward`` and its entry point read,
then, transitively, the names those definitions read — as Thunder prints only the symbols a trace
uses. The local kernels of :mod:`ir.kernels` are one more such source.

Each runtime module is valid Python on its own: its relative imports (``from .core import fail``) say
where a name lives and are dropped from programs, where every piece shares one namespace. Names
imported from ``.plan`` are the plan's constants and functions, which the generator writes (see
``plan.py``). Standard-library and torch imports are gathered at the top of a program, only those used.

A new runtime feature is a new module here (added to ``ORDER``) whose functions the generated code or
a training loop calls; nothing else needs to know about it.
"""
from __future__ import annotations

import ast
import builtins
import functools
import importlib.util
import symtable
import sys
from dataclasses import dataclass, field
from pathlib import Path

ORDER = ("core", "collectives", "fsdp", "kernels", "grad_sync", "loop", "training", "pipeline")
"""The order of the pieces in a program (a piece comes after those it imports from)."""
PLAN = "plan"
"""The module declaring the names the generator writes (never copied)."""
MODULE_NAMES = {"__file__", "__doc__", "__name__"}
"""Names every module has (in a program: its path, its docstring, ``"__main__"``)."""
SOURCES = {name: f"{__name__}.{name}" for name in ORDER} | {"kernels": "ir.kernels"}


class RuntimeSourceError(RuntimeError):
    """The runtime or the generated code reads a name that nothing defines (a bug of sbpc, named)."""


@dataclass(frozen=True)
class Import:
    """One imported name: ``import module [as name]`` or ``from module import member [as name]``."""

    module: str
    member: str | None
    name: str

    def line(self) -> str:
        """The statement that binds this name alone."""
        if self.member is None:
            return f"import {self.module}" + (f" as {self.name}" if self.name != self.module else "")
        return f"from {self.module} import {self.member}" + (f" as {self.name}" if self.name != self.member else "")


@dataclass(frozen=True)
class Definition:
    """One top-level statement of a piece: the names it binds, its source text, the names it reads."""

    piece: str
    names: tuple[str, ...]
    source: str
    reads: frozenset[str]
    line: int

    @property
    def is_assignment(self) -> bool:
        """A plain ``NAME = value`` (written without blank lines between neighbours)."""
        return not self.source.lstrip().startswith(("def ", "class ", "@", "#"))


@dataclass
class Piece:
    """One runtime module: its definitions by name, and where its imported names come from."""

    name: str
    title: str
    definitions: dict[str, Definition] = field(default_factory=dict)
    internal: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Name -> (piece, name there) for ``from .piece import name``."""
    external: dict[str, Import] = field(default_factory=dict)


@dataclass
class Selection:
    """What a program carries: import lines, one section per piece it uses, the plan names those read."""

    imports: list[str]
    sections: list[tuple[str, str, str]]
    """(piece title, its file in sbpc, source of the chosen definitions), in ``ORDER``."""
    plan_names: set[str]


def global_reads(source: str) -> tuple[set[str], set[str]]:
    """The module-level names ``source`` binds, and those it reads without binding them (any scope)."""
    top = symtable.symtable(source, "<runtime>", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_local()}
    reads = {s.get_name() for s in top.get_symbols() if s.is_referenced() and not s.is_local()}

    def visit(table: symtable.SymbolTable) -> None:
        for s in table.get_symbols():
            if s.is_global() and (s.is_referenced() or s.is_assigned()):
                reads.add(s.get_name())
        for child in table.get_children():
            visit(child)

    for child in top.get_children():
        visit(child)
    return bound, reads - bound


def _first_line(stmt: ast.stmt) -> int:
    """The 0-based index of a statement's first line (its first decorator's, if any)."""
    return min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])]) - 1


def _with_comments_above(lines: list[str], start: int, end: int) -> str:
    """Lines ``start:end`` with the comment lines directly above them."""
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return "".join(lines[start:end]).rstrip() + "\n"


def _read_piece(name: str, module_name: str) -> Piece:
    source = Path(importlib.util.find_spec(module_name).origin).read_text()
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    piece = Piece(name, (ast.get_docstring(tree) or name).splitlines()[0].split(": ")[0].rstrip("."))
    body = tree.body[1:] if ast.get_docstring(tree) else tree.body
    for stmt in body:
        if isinstance(stmt, ast.ImportFrom) and stmt.level == 1:
            for alias in stmt.names:
                piece.internal[alias.asname or alias.name] = (stmt.module, alias.name)
        elif isinstance(stmt, ast.ImportFrom) and stmt.module != "__future__":
            for alias in stmt.names:
                piece.external[alias.asname or alias.name] = Import(stmt.module, alias.name, alias.asname or alias.name)
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                local = alias.asname or alias.name.split(".")[0]
                piece.external[local] = Import(alias.name if alias.asname else local, None, local)
        elif isinstance(stmt, (ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)):
            start = _first_line(stmt)
            bound, reads = global_reads("".join(lines[start:stmt.end_lineno]))
            definition = Definition(name, tuple(sorted(bound)), _with_comments_above(lines, start, stmt.end_lineno),
                                    frozenset(reads), stmt.lineno)
            for n in bound:
                if n in piece.definitions:
                    raise RuntimeSourceError(f"{module_name} binds {n} twice; a runtime name has one definition")
                piece.definitions[n] = definition
        elif not isinstance(stmt, ast.ImportFrom):
            raise RuntimeSourceError(f"{module_name} line {stmt.lineno}: a runtime module holds only imports and "
                                f"definitions (functions, classes, assignments), found {type(stmt).__name__}")
    return piece


@functools.cache
def pieces() -> dict[str, Piece]:
    """Every runtime piece, read once (by name, in ``ORDER``)."""
    out = {name: _read_piece(name, module) for name, module in SOURCES.items()}
    for name, piece in out.items():
        for source, _ in piece.internal.values():
            if source != PLAN and ORDER.index(source) > ORDER.index(name):
                raise RuntimeSourceError(f"runtime piece {name} imports from {source}, which comes after it in ORDER")
    return {name: out[name] for name in ORDER}


class Walk:
    """The transitive closure of the definitions some names need."""

    def __init__(self):
        self.chosen: dict[int, Definition] = {}
        self.imports: dict[str, Import] = {}
        self.plan_names: set[str] = set()

    def need(self, piece: Piece, name: str, reader: str) -> None:
        """``name`` as read inside ``piece`` (by ``reader``, for the error message)."""
        if name in piece.definitions:
            self.take(piece.definitions[name])
        elif name in piece.internal:
            source, original = piece.internal[name]
            if source == PLAN:
                self.plan_names.add(original)
            else:
                self.need(pieces()[source], original, f"{reader} (through {piece.name})")
        elif name in piece.external:
            self.imports[name] = piece.external[name]
        elif not hasattr(builtins, name) and name not in MODULE_NAMES:
            raise RuntimeSourceError(f"{reader} reads {name}, which runtime piece {piece.name} neither defines nor imports")

    def take(self, definition: Definition) -> None:
        if id(definition) in self.chosen:
            return
        self.chosen[id(definition)] = definition
        piece = pieces()[definition.piece]
        for name in sorted(definition.reads):
            self.need(piece, name, f"runtime {definition.piece}.{definition.names[0]}")


def select(reads: set[str], entry: str, extra_imports: dict[str, Import]) -> Selection:
    """The runtime a program needs: ``reads`` are the names its generated code reads and does not
    define, looked up in the piece ``entry`` (its training loop), then in every piece (each name must
    have one home), then in ``extra_imports`` (modules the generated code itself uses)."""
    walk = Walk()
    homes = _homes()
    for name in sorted(reads):
        entry_piece = pieces()[entry]
        if name in entry_piece.definitions or name in entry_piece.internal or name in entry_piece.external:
            walk.need(entry_piece, name, "the generated code")
        elif len(homes.get(name, [])) == 1:
            walk.need(homes[name][0], name, "the generated code")
        elif name in homes:
            raise RuntimeSourceError(f"the generated code reads {name}, defined in several runtime pieces "
                                f"({', '.join(p.name for p in homes[name])}) but not in {entry}")
        elif name in extra_imports:
            walk.imports[name] = extra_imports[name]
        elif name in _external_imports():
            walk.imports[name] = _external_imports()[name]
        elif not hasattr(builtins, name) and name not in MODULE_NAMES:
            raise RuntimeSourceError(f"the generated code reads {name}, which no runtime piece defines")
    sections = []
    for piece in pieces().values():
        chosen = sorted((d for d in walk.chosen.values() if d.piece == piece.name), key=lambda d: d.line)
        if chosen:
            sections.append((piece.title, SOURCES[piece.name].replace(".", "/") + ".py", _join(chosen)))
    return Selection(_import_lines(walk.imports.values()), sections, walk.plan_names)


def _homes() -> dict[str, list[Piece]]:
    """Name -> the pieces that define it."""
    homes: dict[str, list[Piece]] = {}
    for piece in pieces().values():
        for name in piece.definitions:
            homes.setdefault(name, []).append(piece)
    return homes


def _external_imports() -> dict[str, Import]:
    return {name: imp for piece in pieces().values() for name, imp in piece.external.items()}


def _join(definitions: list[Definition]) -> str:
    """Definitions' source, one blank line apart (consecutive assignments on consecutive lines): a
    program's sections are two blank lines apart."""
    out = definitions[0].source
    for before, after in zip(definitions, definitions[1:]):
        out += ("" if before.is_assignment and after.is_assignment else "\n") + after.source
    return out


def _import_lines(imports) -> list[str]:
    """Import statements, standard library first, then the rest; ``from`` imports of a module merged."""
    plain = sorted({imp.line() for imp in imports if imp.member is None})
    members: dict[str, list[str]] = {}
    for imp in imports:
        if imp.member is not None:
            members.setdefault(imp.module, []).append(imp.line().split(" import ", 1)[1])
    merged = [f"from {module} import {', '.join(sorted(set(names)))}" for module, names in members.items()]

    def key(line: str) -> tuple:
        module = line.split()[1]
        return (module.split(".")[0] not in sys.stdlib_module_names, module, line.startswith("from"))

    lines = sorted(plain + merged, key=key)
    stdlib = [line for line in lines if not key(line)[0]]
    rest = [line for line in lines if key(line)[0]]
    return stdlib + ([""] if stdlib and rest else []) + rest
