"""The ViT-ResNAS search runner end to end on its smoke config: supernet warm-up and training,
evolutionary search within the MAC budget scored on held-out digits, the searched network with its
inherited weights fine-tuned, and the files a user reloads it from."""
import json

import jax
import numpy as np

import jaxformers as jf
from jaxformers.models.vit_resnas import count_macs, parse_network_def
from train import vit_resnas_search


def test_smoke_search_writes_a_reloadable_network_within_the_budget(tmp_path):
    assert vit_resnas_search.main(["--config", "train/configs/vit_resnas_search.py:smoke",
                                   "--workdir", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary, candidates = lines[-1]["summary"], lines[:-1]
    assert 1 <= len(candidates) <= min(10, summary["candidates"])
    scores = [c["val_accuracy"] for c in candidates]
    assert scores == sorted(scores, reverse=True) and scores[0] == summary["best_val_accuracy"]
    assert all(c["macs"] <= summary["macs_budget"] < summary["supernet_macs"] for c in candidates)
    assert summary["searched_macs"] == candidates[0]["macs"]
    assert summary["searched_params"] < summary["supernet_params"]
    for key in ("supernet_full_width_accuracy", "inherited_accuracy", "finetuned_accuracy"):
        assert 0.0 <= summary[key] <= 1.0
    model, variables = vit_resnas_search.load_subnet(str(tmp_path))
    assert parse_network_def(model.network_def) == parse_network_def(summary["network_def"])
    assert count_macs(model.network_def, 56) == summary["searched_macs"]
    assert jf.count_params(model) == summary["searched_params"]
    logits = jax.jit(model.apply)(variables, np.zeros((2, 56, 56, 3), np.float32))
    assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()
