"""The loop end to end on the tiny digits config: outputs, learning, NaN guard, preemption, bad input."""
import json
import os
import pathlib
import signal
import threading
import time

import jax
import numpy as np
import pytest

from train import trainer
from train.checkpoint import CheckpointMismatchError


def read_jsonl(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_smoke_run_writes_everything_and_resumes(tiny_config, tmp_path, capsys):
    config = tiny_config("num_train_steps=6", "checkpoint_every_steps=3", "eval_every_steps=3", "log_every_steps=2")
    out = trainer.train_and_evaluate(config, tmp_path)
    assert out["step"] == 6 and 0.0 <= out["eval/accuracy"] <= 1.0
    assert "Final test accuracy" in capsys.readouterr().out
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/accuracy", "throughput/examples_per_sec"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [3, 6]
    assert json.loads((tmp_path / "config.json").read_text())["num_train_steps"] == 6
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea_mod.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [3, 6]
    # Same command again: nothing left to train, resumes at the end and re-evaluates.
    again = trainer.train_and_evaluate(config, tmp_path)
    assert again["step"] == 6 and again["eval/accuracy"] == pytest.approx(out["eval/accuracy"])
    assert "Resuming from checkpoint at step 6" in capsys.readouterr().out
    np.testing.assert_array_equal(jax.device_get(again["state"]["params"]["head"]["kernel"]),
                                  jax.device_get(out["state"]["params"]["head"]["kernel"]))


def test_nan_gradient_is_skipped_and_reported(tiny_config, tmp_path, capsys):
    config = tiny_config("num_train_steps=5", "debug.nan_grad_step=2", "debug.nan_grad_param='blocks_0/mlp/fc1'",
                         "checkpoint_every_steps=100", "eval_every_steps=100")
    out = trainer.train_and_evaluate(config, tmp_path)
    text = capsys.readouterr().out
    assert "step 2: non-finite gradient in blocks_0/mlp/fc1" in text and "update skipped (1 in a row)" in text
    assert "step 1:" not in text and "step 3:" not in text
    assert out["step"] == 5
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(jax.device_get(out["state"]["params"])))
    assert int(out["state"]["nonfinite_streak"]) == 0  # finite steps after it reset the streak
    streaks = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "nonfinite/streak" in r]
    assert [r["step"] for r in streaks] == [2]


def test_too_many_nonfinite_steps_stop_without_saving_them(tiny_config, tmp_path, capsys):
    config = tiny_config("num_train_steps=6", "debug.nan_grad_step=1", "debug.nan_grad_count=10",
                         "max_nonfinite_steps=3", "checkpoint_every_steps=1", "eval_every_steps=100")
    with pytest.raises(trainer.TrainingStopped, match="3 non-finite steps in a row"):
        trainer.train_and_evaluate(config, tmp_path)
    text = capsys.readouterr().out
    assert "step 1: non-finite gradient" in text and "(3 in a row)" in text
    # Every checkpoint written holds finite parameters (the skipped updates never touched them).
    from train.checkpoint import Checkpointer

    steps = Checkpointer(tmp_path / "checkpoints").all_steps()
    assert steps and max(steps) <= 4


def test_sigterm_saves_and_exits_cleanly_then_resumes(tiny_config, tmp_path, capsys):
    config = tiny_config("num_train_steps=400", "checkpoint_every_steps=1000", "eval_every_steps=1000",
                         "log_every_steps=1")
    metrics = tmp_path / "metrics.jsonl"

    def send_sigterm_once_training():
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_sigterm_once_training, daemon=True).start()
    out = trainer.train_and_evaluate(config, tmp_path)
    assert out.get("preempted") and 2 <= out["step"] < 400
    assert "SIGTERM: saved a checkpoint at step" in capsys.readouterr().out
    from train.checkpoint import Checkpointer

    assert Checkpointer(tmp_path / "checkpoints").latest_step() == out["step"]
    resumed = trainer.train_and_evaluate(tiny_config("num_train_steps=" + str(out["step"] + 2),
                                                     "checkpoint_every_steps=1000", "eval_every_steps=1000"), tmp_path)
    assert resumed["step"] == out["step"] + 2


def test_checkpoint_of_another_model_is_refused_before_compiling(tiny_config, tmp_path, monkeypatch):
    trainer.train_and_evaluate(tiny_config("num_train_steps=2", "eval_every_steps=100"), tmp_path)
    compiled = []
    monkeypatch.setattr(trainer.steps, "make_train_step", lambda *a, **k: compiled.append(1))
    with pytest.raises(CheckpointMismatchError, match=r"blocks_0/attn/qkv/kernel: checkpoint shape \(48, 3, 4, 12\)"):
        trainer.train_and_evaluate(tiny_config("num_train_steps=2", "model.overrides.embed_dim=32"), tmp_path)
    with pytest.raises(CheckpointMismatchError, match="model 'vit_tiny_patch16_224'.*'vit_small_patch16_224'"):
        trainer.train_and_evaluate(tiny_config("num_train_steps=2", "model.name='vit_small_patch16_224'"), tmp_path)
    assert not compiled


@pytest.mark.parametrize("override, error, match", [
    ("batch_size=12", ValueError, r"batch_size=12 is not divisible by the 8 devices"),
    ("accumulation_steps=3", ValueError, r"accumulation_steps=3"),
    ("input.dataset='digitz'", ValueError, "no embedded dataset 'digitz'"),
    ("model.overrides.depht=2", TypeError, r"unknown override\(s\) \['depht'\]"),
    ("task='segmentation'", ValueError, "unknown task 'segmentation'"),
    ("optimizer.name='adam_w'", ValueError, "optimizer.name must be"),
    ("input.train_pp='resize(32)|flipp'", ValueError, "did you mean 'flip'"),
])
def test_bad_input_fails_before_compiling(tiny_config, tmp_path, monkeypatch, override, error, match):
    monkeypatch.setattr(trainer.steps, "state_spec", lambda *a, **k: pytest.fail("got as far as the model state"))
    if "model.overrides" in override or "optimizer" in override:
        monkeypatch.undo()
        monkeypatch.setattr(trainer.steps, "make_train_step", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(error, match=match):
        trainer.train_and_evaluate(tiny_config(override), tmp_path)


def test_unknown_tfds_dataset_is_a_clear_error(tiny_config, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match="knows no dataset 'imagenet2021'.*'imagenet2012'"):
        trainer.train_and_evaluate(tiny_config("input.source='tfds'", "input.dataset='imagenet2021'"), tmp_path)


def test_workdir_that_is_a_file(tiny_config, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        trainer.train_and_evaluate(tiny_config(), target)
    from train.main import main

    assert main(["--config", str(pathlib.Path(trainer.__file__).parent / "configs" / "quickstart.py"),
                 "--workdir", str(target / "sub"), "--config.smoke=True"]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.slow
def test_digits_are_really_learned_from_the_command_line(cli, tmp_path):
    """A shortened quick start through the CLI (2 blocks, 400 steps of 64, no augmentation, one
    device) must clearly learn: the loss falls and test accuracy > 80% (the full quick start
    reaches >= 95%)."""
    proc = cli.run(tmp_path, "num_train_steps=400", "batch_size=64", "eval_batch_size=120",
                   "model.overrides.depth=2", "model.overrides.embed_dim=64", "schedule.name='cosine'",
                   "schedule.warmup_steps=30", "optimizer.learning_rate=2e-3", "optimizer.weight_decay=0.0",
                   "task_args.label_smoothing=0.0", "input.train_pp='resize(32)|to_rgb|value_range(-1, 1)'",
                   "log_every_steps=50", "eval_every_steps=200", "checkpoint_every_steps=400", devices=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    accuracy = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert len(losses) == 8 and losses[-1] < 0.3 * losses[0], losses
    assert accuracy[-1] > 0.8, accuracy
    assert f"Final test accuracy: {accuracy[-1]:.4f}" in proc.stdout
