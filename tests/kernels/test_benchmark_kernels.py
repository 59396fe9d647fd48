"""benchmarks/kernels.py runs on CPU at small sizes (interpret mode) and its --check compares every
kernel with its reference; the prepared device session script is valid bash."""
import importlib.util
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_kernel_benchmark_small_with_check(capsys):
    _load("kernels").main(["--small", "--only", "dense,packed", "--repeats", "1", "--check"])
    text = capsys.readouterr().out
    assert "dense fwd" in text and "packed BERT attention fwd" in text and "vs xla" in text
    assert text.count("check ") == 2 and "MISMATCH" not in text and "failed" not in text


def test_device_session_script_is_valid_bash():
    script = ROOT / "benchmarks" / "device_session.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for target in ("kernels.py --only window,packed", "kernels.py --only bra", "train_throughput.py"):
        assert target in text
