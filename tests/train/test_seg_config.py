"""``train/configs/mask2former_shapes.py`` through ``python -m train.main``'s function: a smoke-size
Mask2Former trains on the generated panoptic scenes (loss falls) and evaluates PQ / mIoU."""
import json

import numpy as np
import pytest

pytest.importorskip("grain")

from train import input_pipeline  # noqa: E402
from train import main as cli  # noqa: E402
from train.seg_data import PanopticShapes  # noqa: E402

CONFIG = "train/configs/mask2former_shapes.py"


def test_mask2former_shapes_config_trains_through_the_cli(tmp_path, monkeypatch):
    # the full val split is 500 scenes; 16 keep the evaluation within the test budget
    monkeypatch.setitem(input_pipeline.EMBEDDED, "panoptic_shapes",
                        (lambda split: PanopticShapes(split, num_examples=16 if split == "val" else None), 6))
    rc = cli.main(["--config", f"{CONFIG}:smoke", "--workdir", str(tmp_path), "--config.num_train_steps=10",
                   "--config.log_every_steps=2", "--config.eval_every_steps=10", "--config.checkpoint_every_steps=10",
                   "--config.eval_batch_size=16", "--config.schedule.name=constant", "--config.progress_bar=False",
                   "--config.optimizer.learning_rate=2e-3"])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/PQ" in r]
    assert len(losses) == 5 and np.isfinite(losses).all() and losses[-1] < 0.75 * losses[0], losses
    assert 0.0 <= evals[-1]["eval/PQ"] <= 100.0 and 0.0 <= evals[-1]["eval/mIoU"] <= 100.0, evals[-1]
