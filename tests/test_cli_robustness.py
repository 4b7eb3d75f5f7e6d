"""Bad input never gives a traceback: one message, a documented exit code (docs/cli.md)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantoracle import demo
from quantoracle._version import __version__
from quantoracle.cli import COMMANDS, EXIT_CODES, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def python(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture
def tiny_demo(monkeypatch):
    monkeypatch.setattr(demo.ToyConfig, "for_device", classmethod(
        lambda cls, device: cls(layers=1, experts=8, hidden=32, intermediate=16, top_k=2, tokens=4)))


def test_every_argument_has_help_and_the_top_level_help_is_plain_text(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and set(a.choices) >= {"resolve", "demo"})
    assert list(subparsers.choices) == [c.__name__.rsplit(".", 1)[1] for c in COMMANDS]
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"quantoracle {name} {action.option_strings or action.dest} has no help"
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "``" not in out and ":mod:" not in out
    assert all(f"  {code} " in out for code in EXIT_CODES)  # the exit codes are documented
    code, out, _ = run(capsys, "resolve", "--help")
    assert "(default: bfloat16)" in out and "(default: weight_only)" in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"quantoracle {__version__}"
    assert __version__[0].isdigit()


def test_python_dash_m_runs_the_cli():
    done = python("-m", "quantoracle", "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"quantoracle {__version__}"


def test_usage_errors_are_one_line_and_json_under_json(capsys):
    code, out, err = run(capsys, "matrix", "--device", "tpu")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "--device 'tpu'" in err and "sm90" in err and "cuda" in err
    code, out, err = run(capsys, "matrix", "--device", "tpu", "--json")
    assert code == 2 and err == ""
    assert json.loads(out)["error"]["type"] == "UsageError"
    code, out, err = run(capsys, "resolve", "/nonexistent/checkpoint", "--device", "sm90", "--json")
    error = json.loads(out)["error"]
    assert code == 2 and "/nonexistent/checkpoint" in error["message"] and error["type"]
    code, _, err = run(capsys, "bench", "--rounds", "0")
    assert code == 2 and "--rounds" in err


def test_demo_device_must_be_a_torch_device_of_this_machine(capsys):
    code, out, err = run(capsys, "demo", "--device", "tpu")
    assert code == 2 and "'tpu'" in err and "cpu, cuda or cuda:N" in err and "Traceback" not in err


@needs_no_gpu
def test_gpu_only_paths_say_they_need_a_cuda_gpu(capsys):
    code, _, err = run(capsys, "demo", "--device", "cuda")
    assert code == 2 and "needs a CUDA GPU" in err
    code, _, err = run(capsys, "matrix", "--device", "cuda:0")
    assert code == 2 and "needs a CUDA GPU" in err
    for script in ("benchmarks/bench_gemm.py", "benchmarks/bench_parallel.py"):
        done = python(script)
        assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_plot_names_matplotlib_when_missing():
    done = python("benchmarks/plot.py", "results.json")
    assert done.returncode == 2 and "pip install matplotlib" in done.stderr and "Traceback" not in done.stderr


def test_resolve_and_matrix_say_which_device_they_used(capsys):
    code, out, _ = run(capsys, "matrix", "--device", "sm90")
    assert "device sm90 (--device sm90)" in out
    code, out, _ = run(capsys, "matrix")
    assert "this machine" in out.splitlines()[0]
    code, out, _ = run(capsys, "matrix", "--json", "--device", "cpu")
    data = json.loads(out)
    assert data["device_source"] == "--device cpu" and data["quantoracle"] == __version__
    assert data["backends"]["reference"]["distribution"] == "quantoracle"


def test_demo_out_into_a_missing_directory_is_created(tiny_demo, tmp_path, capsys):
    out = tmp_path / "new" / "dir" / "demo.json"
    code, stdout, _ = run(capsys, "demo", "--out", out)
    assert code == 0 and json.loads(out.read_text())["variants"]
    assert f"wrote {out}" in stdout and "median of 5" in stdout


def test_demo_out_that_cannot_be_written_fails_before_the_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "demo", "--out", blocker / "demo.json")
    assert code == 2 and str(blocker) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_broken_pipe_exits_quietly():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write, like `| head` after its lines
    try:
        done = subprocess.run([sys.executable, "-m", "quantoracle", "backends", "--json"], cwd=ROOT,
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == ""
