"""The one Hugging Face door: ``jaxformers.from_pretrained`` / ``save_pretrained`` dispatch and errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers as jf
from jaxformers.hf import hf_model_types, register_hf_family
from jaxformers.models.bert import Bert
from tests.helpers import numpy_variables


def test_every_family_round_trips_through_the_door(tmp_path):
    module = Bert(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                  max_position_embeddings=12, head="mlm")
    ids = jnp.arange(8, dtype=jnp.int32).reshape(1, 8) % 40
    variables = numpy_variables(module, ids)
    path = jf.save_pretrained(module, variables, tmp_path / "bert")
    assert json.loads((path / "config.json").read_text())["model_type"] == "bert"
    again, loaded = jf.from_pretrained(path)
    assert isinstance(again, Bert) and again.head == "mlm"
    np.testing.assert_allclose(again.apply(loaded, ids), module.apply(variables, ids), atol=1e-6)
    assert {"bert", "roberta", "camembert", "xlm-roberta"} <= set(hf_model_types())


def test_unknown_model_type_and_module_are_clear_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ValueError, match="'no-such-model' has no jaxformers loader; supported model_types: .*bert"):
        jf.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        jf.from_pretrained(tmp_path / "absent")
    with pytest.raises(TypeError, match="no Hugging Face exporter for VisionTransformer; families with one: .*Bert"):
        jf.save_pretrained(jf.create_model("vit_tiny_patch16_224"), {}, tmp_path / "out")
    with pytest.raises(ValueError, match=r"\['bert'\] already have a Hugging Face loader"):
        register_hf_family("bert", module_type=Bert, load=jax.jit, save=jax.jit)
