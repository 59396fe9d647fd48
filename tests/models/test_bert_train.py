"""The BERT configs of train/ run through the shared trainer; the MLM loss falls on the embedded corpus."""
import math

import numpy as np
import pytest

pytest.importorskip("grain")
pytest.importorskip("tokenizers")

from train import config_lib, trainer  # noqa: E402


def _run(name, tmp_path, *overrides):
    config = config_lib.resolve_config(f"train/configs/{name}.py", ["smoke=True", "progress_bar=False",
                                                                   "async_checkpointing=False", *overrides])
    return trainer.train_and_evaluate(config, tmp_path / name)


def test_mlm_pretraining_loss_falls(tmp_path, monkeypatch):
    monkeypatch.chdir(config_lib.pathlib.Path(__file__).resolve().parents[2])
    from train import tasks_text

    vocab = tasks_text.corpus_tokenizer().vocab_size
    out = _run("bert_mlm", tmp_path, "num_train_steps=24", "log_every_steps=4", "eval_every_steps=1000",
               "checkpoint_every_steps=1000", "optimizer.learning_rate=0.003", "schedule.warmup_steps=4")
    losses = [row["train/loss"] for row in out["history"] if "train/loss" in row]
    assert losses[0] > math.log(vocab) - 0.5  # starts near uniform over the vocabulary
    assert np.mean(losses[-2:]) < losses[0] - 1.0, losses
    assert out["eval/loss"] < math.log(vocab) - 1.0 and 0 <= out["eval/mlm_accuracy"] <= 1


@pytest.mark.slow
def test_classification_and_contrastive_configs_run(tmp_path, monkeypatch):
    monkeypatch.chdir(config_lib.pathlib.Path(__file__).resolve().parents[2])
    out = _run("bert_classify", tmp_path, "num_train_steps=2", "eval_every_steps=1000")
    assert 0.0 <= out["eval/accuracy"] <= 1.0 and np.isfinite(out["eval/loss"])
    out = _run("bert_contrastive", tmp_path, "num_train_steps=2", "eval_every_steps=1000")
    for key in ("eval/mrr@10", "eval/ndcg@10", "eval/recall@1", "eval/recall@5", "eval/recall@10"):
        assert 0.0 < out[key] <= 1.0, (key, out[key])
    assert out["eval/recall@1"] <= out["eval/recall@5"] <= out["eval/recall@10"]
    assert out["eval/mrr@10"] >= out["eval/recall@1"]


def test_text_data_that_misses_a_task_field_fails_before_compiling(tmp_path, monkeypatch):
    """Sequence classification pointed at the (unlabelled) masked-LM corpus: the missing ``label``
    field is named, with the fields the data has, before the model state is even built."""
    monkeypatch.chdir(config_lib.pathlib.Path(__file__).resolve().parents[2])
    monkeypatch.setattr(trainer.steps, "state_spec", lambda *a, **k: pytest.fail("got as far as the model state"))
    with pytest.raises(ValueError, match=r"config.task='bert_classification': field 'label': the task expects int32 "
                                         r"\(\) but input.dataset 'stdlib_mlm' split 'train' after pp '' has no field "
                                         r"'label' \(its fields: \['attention_mask', 'input_ids', 'token_type_ids'\]\)"):
        _run("bert_classify", tmp_path, "input.dataset='stdlib_mlm'")


def test_corpus_tokenizer_is_the_same_in_every_process(monkeypatch):
    """The corpus and its vocabulary are built at start-up by every process (and again on resume),
    so examples and ids must not depend on the process: not on what it imported or patched, nor on
    its hash seed. Two fresh interpreters agree with this (pytest) one."""
    import hashlib
    import inspect
    import json
    import os
    import subprocess
    import sys

    from train import tasks_text

    monkeypatch.setattr(inspect, "getfile", lambda obj: "patched")  # as torch does
    assert tasks_text.stdlib_docs.__wrapped__() == tasks_text.stdlib_docs()
    monkeypatch.undo()

    code = ("import hashlib, json; from train import tasks_text; "
            "print(hashlib.md5(json.dumps(tasks_text.corpus_tokenizer().backend.get_vocab(), sort_keys=True)"
            ".encode()).hexdigest())")
    root = config_lib.pathlib.Path(__file__).resolve().parents[2]
    vocab = tasks_text.corpus_tokenizer().backend.get_vocab()
    here = hashlib.md5(json.dumps(vocab, sort_keys=True).encode()).hexdigest()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == here
    # The merges themselves (worked by hand): the alphabet, then the most frequent adjacent pair
    # first, ties to the alphabetically first: (##o, ##w) and (l, ##o) both occur 5 times.
    vocab = tasks_text.wordpiece_vocab(["low lower lowest", "low low newest newest"], vocab_size=20)
    assert vocab[:len(tasks_text.SPECIALS)] == list(tasks_text.SPECIALS)
    assert vocab[len(tasks_text.SPECIALS):] == ["##e", "##o", "##r", "##s", "##t", "##w", "l", "n",
                                                "##ow", "low", "##es", "##est", "##ew", "##ewest", "newest"]
