"""benchmarks/train_throughput.py runs on CPU at a small size and, with timm installed, compares."""
import importlib.util
import pathlib
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_throughput_benchmark_on_cpu(capsys, tmp_path):
    bench = load_benchmark()
    go = tmp_path / "go"  # --wait-for: compiles, then runs only once this file exists
    timer = threading.Timer(1.0, go.touch)
    timer.start()
    result = bench.main(["vit_tiny_patch16_224", "--batch", "8", "--steps", "2", "--warmup", "1",
                         "--override", "img_size=32", "--override", "patch_size=8", "--override", "depth=1",
                         "--override", "embed_dim=48", "--override", "num_heads=4", "--override", "num_classes=10",
                         "--wait-for", str(go)])
    timer.join()
    ours = result["ours"]
    assert ours["examples_per_sec"] > 0 and ours["flops_per_step_per_device"] > 0
    assert ours["mfu"] is None  # the CPU's peak is unknown: no MFU is invented
    text = capsys.readouterr().out
    assert f"waiting for {go}" in text and "jaxformers :" in text and "MFU n/a" in text
    if importlib.util.find_spec("timm") and importlib.util.find_spec("torch"):
        assert result["timm"]["examples_per_sec"] > 0 and result["ratio"] > 0
        assert "ratio jaxformers / timm" in text


def test_benchmark_reports_models_timm_lacks(capsys):
    pytest.importorskip("timm")
    result = load_benchmark().bench_timm("no_such_model_in_timm", {}, 2, 1, 1, "off")
    assert "timm has no model" in result["skipped"]
