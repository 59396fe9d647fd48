"""The OFB search runner end to end on its smoke config: host training, search, compression until every
block has settled, export, fine-tuning, and the files a user reloads the subnet from."""
import json

import jax
import numpy as np

import jaxformers as jf
from train import ofb_search


def test_smoke_search_writes_a_reloadable_subnet_under_the_host(tmp_path):
    assert ofb_search.main(["--config", "train/configs/ofb_search.py:smoke", "--workdir", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = lines[-1]["summary"]
    assert len(lines) - 1 == 6  # max_search_steps of the smoke config, one line each
    assert summary["searched_gflops"] < summary["host_gflops"] and summary["subnet_params"] < summary["host_params"]
    assert 0.0 <= summary["subnet_accuracy"] <= 1.0
    model, variables = ofb_search.load_subnet(str(tmp_path))
    assert jf.count_params(model) == summary["subnet_params"]
    x = np.zeros((2, model.img_size, model.img_size, 3), np.float32)
    logits = jax.jit(model.apply)(variables, x)
    assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()
