"""The ``sbpc`` command line: compile, dump, explain, calibrate.

Every failure the user can fix is printed as one ``error: ...`` line (exit status 2), never a
traceback; ``SBPC_TRACEBACK=1`` shows the traceback for bug reports.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, RuntimeError, ImportError, NotImplementedError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sbpc`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except Exception as err:  # one line for the user; SBPC_TRACEBACK=1 for the full story
        if os.environ.get("SBPC_TRACEBACK") == "1":
            raise
        prefix = "" if isinstance(err, USER_ERRORS) else f"internal error ({type(err).__name__}; rerun with SBPC_TRACEBACK=1): "
        text = one_line(err)
        print(text if text.startswith("error: ") or ": error: " in text.split("\n")[0] else f"error: {prefix}{text}",
              file=sys.stderr)
        return 2


def one_line(err: BaseException) -> str:
    """The message of an exception, without the chain of causes; multi-line messages kept."""
    text = str(err) or type(err).__name__
    if isinstance(err, KeyError) and text.startswith("'"):
        text = text.strip("'")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="sbpc", description="Compile PyTorch models into distributed programs.")
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="compile a model; dump its IR, emit a torchrun program")
    _model_args(comp)
    comp.add_argument("--dump-ir", metavar="PATH", help="write the final IR to PATH ('-' for stdout)")
    comp.add_argument("--dump-after", metavar="PASS", action="append", help="print the IR after this pass ('all' for every pass)")
    comp.add_argument("--passes", metavar="PIPELINE", help="the pass pipeline as text, e.g. "
                      "'decompose,layouts,propagate,boxing,grad_sync{bucket_bytes=1048576}' (default: the one the "
                      "strategy needs)")
    comp.add_argument("--emit", metavar="DIR", help="write a standalone torchrun program into DIR")
    comp.add_argument("--print-plan", action="store_true", help="print the plan as DSL text")
    comp.set_defaults(run=cmd_compile)
    dump = sub.add_parser("dump", help="parse, verify and print an IR file")
    dump.add_argument("file", help="an IR text file ('-' for stdin)")
    dump.set_defaults(run=cmd_dump)
    expl = sub.add_parser("explain", help="why this plan: layouts, degrees, alternatives")
    _model_args(expl)
    expl.set_defaults(run=cmd_explain)
    cal = sub.add_parser("calibrate", help="measure this machine and write a cluster spec")
    cal.add_argument("--world-size", type=int, default=2)
    cal.add_argument("--out", default="cluster.yaml", help="where to write the cluster YAML")
    cal.add_argument("--quick", action="store_true")
    cal.add_argument("--sessions", type=int, default=1, help="measure this many times and keep the medians")
    cal.set_defaults(run=cmd_calibrate)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="FILE.py:FACTORY (a function returning an nn.Module) or FILE.onnx")
    p.add_argument("--cluster", default="local:1", help="local:N, dgx-a100:N, dgx-h100:N, or a cluster YAML")
    p.add_argument("--strategy", default="dp", help="dp, fsdp, auto, a JSON strategy dict, or DSL text")
    p.add_argument("--plan", metavar="FILE", help="a *.sbp plan file (overrides --strategy)")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--batch", type=int, default=None, help="example batch size (default: the model file's)")
    p.add_argument("--seq", type=int, default=None, help="example sequence length (default: the model file's)")
    p.add_argument("--optimizer", default="SGD", help="SGD, Adam or AdamW for emitted programs")
    p.add_argument("--lr", type=float, default=0.1)


def load_model(spec: str, batch: int | None, seq: int | None) -> tuple[Any, tuple]:
    """A model and example inputs from ``FILE.py:FACTORY`` (with ``example_inputs`` beside it) or an ONNX file."""
    if spec.endswith(".onnx"):
        return spec, onnx_example_inputs(spec, batch)
    path, _, factory = spec.partition(":")
    if not factory or not path.endswith(".py"):
        raise ValueError(f"expected MODEL as FILE.py:FACTORY or FILE.onnx, found {spec!r}")
    if not Path(path).exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    module = _import_file(path)
    if not hasattr(module, factory):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ValueError(f"{path} has no function {factory!r}; it has {', '.join(names)}")
    model = getattr(module, factory)()
    if not hasattr(module, "example_inputs"):
        raise ValueError(f"{path} must define example_inputs(batch=..., seq=...) returning the model's inputs")
    kwargs = {k: v for k, v in (("batch", batch), ("seq", seq)) if v is not None}
    return model, tuple(module.example_inputs(**kwargs))


def _import_file(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(Path(path).resolve().parent))
    spec.loader.exec_module(module)
    return module


def onnx_example_inputs(path: str, batch: int | None) -> tuple:
    """Random inputs matching an ONNX model's declared input types (symbolic dims become ``batch`` or 8)."""
    import numpy as np
    import onnx
    import torch
    from onnx import helper
    model = onnx.load(path, load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    out = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (batch or 8) for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        array = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
        out.append(torch.from_numpy(array))
    return tuple(out)


def parse_strategy(text: str) -> Any:
    """``--strategy``: a shorthand, JSON for a dict, or DSL text."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ValueError(f"--strategy is not valid JSON at line {err.lineno}:{err.colno}: {err.msg}") from None
    return text


def compile_from_args(args):
    """Compile the model named on the command line."""
    from compiler.api import compile
    model, inputs = load_model(args.model, args.batch, args.seq)
    strategy = args.plan if getattr(args, "plan", None) else parse_strategy(args.strategy)
    if getattr(args, "plan", None) and not Path(args.plan).exists():
        raise FileNotFoundError(f"plan file {args.plan} does not exist")
    optimizer = (args.optimizer, {"lr": args.lr})
    dump_after = getattr(args, "dump_after", None)
    return compile(model, inputs, cluster=args.cluster, strategy=strategy, optimizer=optimizer, mode=args.mode,
                   dump_after=dump_after, passes=getattr(args, "passes", None))


def cmd_compile(args) -> int:
    plan = compile_from_args(args)
    if args.dump_ir:
        _write(args.dump_ir, plan.ir)
    if args.print_plan:
        print(plan.to_dsl())
    if args.emit:
        path = plan.emit(args.emit)
        n = plan.cluster.world_size
        print(f"wrote {path} and runtime.py, weights.pt, launch.sh beside it in {path.parent}; run: "
              f"torchrun --standalone --nproc-per-node {n} {path} --steps 5 (or {path.parent / 'launch.sh'} --steps 5)",
              file=sys.stderr)
    return 0


def cmd_dump(args) -> int:
    from ir.parser import parse
    from ir.verifier import verify
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    graph = parse(text)
    verify(graph)
    sys.stdout.write(str(graph))
    return 0


def cmd_explain(args) -> int:
    plan = compile_from_args(args)
    print(plan.explain())
    return 0


def cmd_calibrate(args) -> int:
    from cost.calibrate import calibrate
    calibrate(world_size=args.world_size, out_path=args.out, quick=args.quick, sessions=args.sessions)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
