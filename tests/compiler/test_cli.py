"""The sbpc command line: compile, dump, and one clear error line for bad input."""
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.cli import main
from ir.parser import parse

ROOT = Path(__file__).resolve().parents[2]
GPT = f"{ROOT}/examples/gpt.py:make_model"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compiler.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_compile_dumps_ir_and_emits(tmp_path, capsys):
    assert main(["compile", GPT, "--cluster", "local:4", "--strategy", "dp", "--seq", "16",
                 "--dump-ir", "-", "--emit", str(tmp_path / "prog")]) == 0
    out = capsys.readouterr().out
    graph = parse(out)
    assert graph.meshes["world"].shape == (4,)
    assert {p.name for p in (tmp_path / "prog").iterdir()} == {"main.py", "runtime.py", "weights.pt", "launch.sh"}


def test_dump_after_and_dump_command(tmp_path, capsys):
    assert main(["compile", GPT, "--cluster", "local:2", "--seq", "16", "--dump-after", "layouts",
                 "--dump-ir", str(tmp_path / "g.ir")]) == 0
    assert capsys.readouterr().out.startswith("// IR after pass layouts")
    assert main(["dump", str(tmp_path / "g.ir")]) == 0
    assert capsys.readouterr().out == (tmp_path / "g.ir").read_text()


def test_json_strategy(capsys):
    strategy = '{"mesh": {"tp": 2}, "params": {"blocks.*.mlp.fc.weight": "S(0)"}}'
    assert main(["compile", GPT, "--cluster", "local:2", "--seq", "16", "--strategy", strategy, "--dump-ir", "-"]) == 0
    assert "%blocks.0.mlp.fc.weight: f32[256, 64] (S(0))" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    ([f"{ROOT}/tests/fixtures/bad_models.py:make_model"], "cannot capture DataDependent at"),
    ([GPT, "--cluster", "local:4", "--batch", "6"], "size 6, which does not divide evenly over 4 ranks"),
    ([f"{ROOT}/examples/missing.py:make_model"], "does not exist"),
    ([GPT.replace("make_model", "make_modle")], "no function 'make_modle'"),
    ([GPT, "--strategy", "{bad json"], "not valid JSON"),
    ([GPT, "--cluster", "nowhere:3"], "nowhere"),
])
def test_bad_input_is_one_error_line(args, message, capsys):
    assert main(["compile", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "error: " in lines[0] and message in "\n".join(lines)
    assert "Traceback" not in "\n".join(lines)


def test_the_sbpc_process_exits_2_with_one_error_line():
    """The installed command's process: exit status 2, the error on stderr, no traceback."""
    proc = run_cli("compile", GPT, "--strategy", "dpp")
    assert proc.returncode == 2
    assert "error: " in proc.stderr.strip().splitlines()[0] and "unknown strategy 'dpp'" in proc.stderr
    assert "Traceback" not in proc.stderr
