"""The runtime of emitted programs, one module per feature, and the selection of what a program carries.

The modules of this package (``core``, ``collectives``, ``regather``, ``context_parallel``, ``moe``, ``fsdp``, ``grad_sync``,
``faults``, ``controls``, ``loss_scaling``, ``data``, ``checkpoint``, ``loop``, ``progress``, ``training``,
``split_backward``, ``pipeline``) are never imported by a program: they are the source the code generator copies from. A program
is two files: ``main.py`` (the plan's own code: its ``forward`` or stage functions and its entry line) and
``runtime.py`` beside it, which carries only the top-level definitions that code reaches — the names it
reads, then, transitively, the names those definitions read — as Thunder prints only the symbols a trace
uses. ``main.py`` imports the names it reads from ``runtime.py`` by name. The local kernels of
:mod:`ir.kernels` are one more such source.

Each runtime module is valid Python on its own: its relative imports (``from .core import fail``) say
where a name lives and are dropped from programs, where all pieces share the one namespace of
``runtime.py``. Names imported from ``.plan`` are the plan's constants, which the generator writes at the
top of ``runtime.py`` (see ``plan.py``); the generated functions reach the training loop as arguments of its
``main``. Standard-library and torch imports are gathered at the top of each file, only those it uses.

A new runtime feature is a new module here (named in ``ORDER``) whose functions the generated code
or a training loop calls; nothing else needs to know about it.
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

ORDER = ("core", "collectives", "regather", "context_parallel", "moe", "fsdp", "kernels", "grad_sync", "faults", "controls", "loss_scaling", "data",
         "checkpoint", "loop", "progress", "training", "split_backward", "pipeline")
"""The pieces, in the order a program shows them (a piece comes after those it imports from)."""
PLAN = "plan"
"""The module declaring the names the generator writes (never copied)."""
SOURCES = {name: f"{__name__}.{name}" for name in ORDER} | {"kernels": "ir.kernels", PLAN: f"{__name__}.{PLAN}"}
MODULE_NAMES = {"__file__", "__doc__", "__name__"}
"""Names every module has (in a program: its path, its docstring, ``"__main__"``)."""


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
        alias = "" if self.name == (self.member or self.module) else f" as {self.name}"
        if self.member is None:
            return f"import {self.module}{alias}"
        return f"from {self.module} import {self.member}{alias}"


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
    """One runtime module: its definitions by name, and where the names it imports come from."""

    name: str
    title: str
    """What the module is, for the program's section header: the first line of its docstring, up to a colon."""
    file: str
    """Its path in sbpc."""
    definitions: dict[str, Definition] = field(default_factory=dict)
    internal: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Name -> (piece, its name there), from ``from .piece import name``."""
    external: dict[str, Import] = field(default_factory=dict)

    def binds(self, name: str) -> bool:
        """Whether ``name`` is defined or imported in this module."""
        return name in self.definitions or name in self.internal or name in self.external


@dataclass
class Selection:
    """What a program carries: the runtime module's import lines, a section per piece it uses, the plan names
    they read; and what the generated code imports itself and from the runtime module."""

    imports: list[str]
    sections: list[tuple[str, str, str]]
    """(piece title, its file in sbpc, the source of the chosen definitions), in ``ORDER``."""
    plan_names: set[str]
    entry_imports: list[str] = field(default_factory=list)
    """The import lines of the generated code (modules it reads itself: ``math``, ``torch``, ...)."""
    entry_names: list[str] = field(default_factory=list)
    """The runtime names the generated code reads (``from runtime import ...``), sorted."""


def global_reads(source: str) -> tuple[set[str], set[str]]:
    """The module-level names ``source`` binds, and those it reads without binding them (in any scope)."""
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


@functools.cache
def pieces() -> dict[str, Piece]:
    """Every runtime piece (by name, in ``ORDER``), read once; the plan module is not among them."""
    package = Path(__file__).parent
    unlisted = {p.stem for p in package.glob("*.py")} - set(ORDER) - {PLAN, "__init__"}
    if unlisted:
        raise RuntimeSourceError(f"runtime module(s) {sorted(unlisted)} are not in backends/runtime ORDER; "
                                 f"add them where a program should show them")
    out = {name: _read_piece(name) for name in ORDER}
    for name, piece in out.items():
        for source, _ in piece.internal.values():
            if source != PLAN and ORDER.index(source) > ORDER.index(name):
                raise RuntimeSourceError(f"runtime piece {name} imports from {source}, which comes after it in ORDER")
    return out


@functools.cache
def plan_names() -> frozenset[str]:
    """The names the generator writes (declared in ``plan.py``)."""
    return frozenset(_read_piece(PLAN).definitions)


def _read_piece(name: str) -> Piece:
    path = Path(importlib.util.find_spec(SOURCES[name]).origin)
    source = path.read_text()
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    docstring = ast.get_docstring(tree) or name
    piece = Piece(name, docstring.splitlines()[0].split(": ")[0].rstrip("."), SOURCES[name].replace(".", "/") + ".py")
    for stmt in tree.body[1:] if ast.get_docstring(tree) else tree.body:
        if isinstance(stmt, ast.ImportFrom) and stmt.level == 1:
            piece.internal |= {a.asname or a.name: (stmt.module, a.name) for a in stmt.names}
        elif isinstance(stmt, ast.ImportFrom) and stmt.module != "__future__":
            piece.external |= {a.asname or a.name: Import(stmt.module, a.name, a.asname or a.name) for a in stmt.names}
        elif isinstance(stmt, ast.Import):
            piece.external |= {a.asname or a.name.split(".")[0]: Import(a.name if a.asname else a.name.split(".")[0],
                                                                          None, a.asname or a.name.split(".")[0])
                               for a in stmt.names}
        elif isinstance(stmt, (ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)):
            start = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])]) - 1
            bound, reads = global_reads("".join(lines[start:stmt.end_lineno]))
            while start > 0 and lines[start - 1].lstrip().startswith("#"):
                start -= 1  # the comment lines directly above belong to the definition
            definition = Definition(name, tuple(sorted(bound)), "".join(lines[start:stmt.end_lineno]).rstrip() + "\n",
                                    frozenset(reads), stmt.lineno)
            for n in bound:
                if n in piece.definitions:
                    raise RuntimeSourceError(f"{piece.file} binds {n} twice; a runtime name has one definition")
                piece.definitions[n] = definition
        elif not (isinstance(stmt, ast.ImportFrom) or _is_docstring(stmt)):
            raise RuntimeSourceError(f"{piece.file} line {stmt.lineno}: a runtime module holds only imports and "
                                     f"definitions (functions, classes, assignments), found {type(stmt).__name__}")
    return piece


def _is_docstring(stmt: ast.stmt) -> bool:
    """A bare string: the docstring of the assignment above it (not copied into programs)."""
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


class Walk:
    """The definitions, imports and plan names that some names need, transitively."""

    def __init__(self):
        self.chosen: dict[tuple[str, int], Definition] = {}
        self.imports: dict[str, Import] = {}
        self.plan_names: set[str] = set()

    def need(self, piece: Piece, name: str, reader: str) -> None:
        """``name`` as read in ``piece`` (by ``reader``, named in the error when nothing defines it)."""
        if name in piece.definitions:
            self.take(piece.definitions[name])
        elif name in piece.internal:
            source, original = piece.internal[name]
            if source == PLAN:
                self.plan_names.add(original)
            else:
                self.need(pieces()[source], original, f"{reader} (through {piece.file})")
        elif name in piece.external:
            self.imports[name] = piece.external[name]
        elif not hasattr(builtins, name) and name not in MODULE_NAMES:
            raise RuntimeSourceError(f"{reader} reads {name}, which {piece.file} neither defines nor imports")

    def take(self, definition: Definition) -> None:
        key = (definition.piece, definition.line)
        if key not in self.chosen:
            self.chosen[key] = definition
            for name in sorted(definition.reads):
                self.need(pieces()[definition.piece], name, f"{definition.piece}.{definition.names[0]}")


def select(reads: set[str], entry: str, extra_imports: dict[str, Import],
           plan_reads: set[str] = frozenset()) -> Selection:
    """The runtime a program needs. ``reads``: the names its generated code reads and does not define,
    looked up in the piece ``entry`` (its training loop), then in the one piece defining each (a name
    two pieces define must be found in ``entry``), then in ``extra_imports`` (modules the generated code
    itself uses), then among the runtime's imports. ``plan_reads``: names the plan's constants read (they
    open the runtime module: ``torch`` for a dtype)."""
    walk = Walk()
    homes: dict[str, list[Piece]] = {}
    for piece in pieces().values():
        for name in piece.definitions:
            homes.setdefault(name, []).append(piece)
    imports = {name: imp for piece in pieces().values() for name, imp in piece.external.items()} | extra_imports
    entry_imports: dict[str, Import] = {}
    entry_names: set[str] = set()
    for name in sorted(reads):
        home = pieces()[entry] if pieces()[entry].binds(name) else None
        if home is None and len(homes.get(name, [])) > 1:
            raise RuntimeSourceError(f"the generated code reads {name}, which several runtime pieces define "
                                     f"({', '.join(p.name for p in homes[name])}) and {entry} does not")
        home = home or (homes[name][0] if name in homes else None)
        if home is not None and name not in home.external:
            walk.need(home, name, "the generated code")
            entry_names.add(name)
        elif name in imports:
            entry_imports[name] = imports[name]
        elif not hasattr(builtins, name) and name not in MODULE_NAMES:
            raise RuntimeSourceError(f"the generated code reads {name}, which no runtime piece defines")
    for name in sorted(plan_reads):
        if name in imports:
            walk.imports[name] = imports[name]
        elif not hasattr(builtins, name):
            raise RuntimeSourceError(f"the plan's constants read {name}, which is no module the runtime imports")
    sections = []
    for piece in pieces().values():
        chosen = sorted((d for d in walk.chosen.values() if d.piece == piece.name), key=lambda d: d.line)
        if chosen:
            sections.append((piece.title, piece.file, _join(chosen)))
    return Selection(_import_lines(walk.imports.values()), sections, walk.plan_names,
                     _import_lines(entry_imports.values()), sorted(entry_names))


def _join(definitions: list[Definition]) -> str:
    """Definitions' source, one blank line apart (consecutive assignments on consecutive lines); a
    program's sections are two blank lines apart."""
    out = definitions[0].source
    for before, after in zip(definitions, definitions[1:]):
        out += ("" if before.is_assignment and after.is_assignment else "\n") + after.source
    return out


def _import_lines(imports) -> list[str]:
    """Import statements: the standard library's, a blank line, the others; ``from`` imports of one
    module merged."""
    lines = {imp.line() for imp in imports if imp.member is None}
    members: dict[str, set[str]] = {}
    for imp in imports:
        if imp.member is not None:
            members.setdefault(imp.module, set()).add(imp.line().split(" import ", 1)[1])
    lines |= {f"from {module} import {', '.join(sorted(names))}" for module, names in members.items()}

    def third_party(line: str) -> bool:
        return line.split()[1].split(".")[0] not in sys.stdlib_module_names

    ordered = sorted(lines, key=lambda line: (third_party(line), line.split()[1], line.startswith("from")))
    stdlib = [line for line in ordered if not third_party(line)]
    rest = [line for line in ordered if third_party(line)]
    return stdlib + ([""] if stdlib and rest else []) + rest
