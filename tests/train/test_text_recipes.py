"""The text fine-tuning recipes (NER, sentiment, QA, BioBERT-style QA): their generated data, their
losses and metrics, that each trains on its data, and one config end to end through the trainer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("grain")
pytest.importorskip("tokenizers")

import jaxformers as jf  # noqa: E402
from train import config_lib, tasks, trainer  # noqa: E402
from train import tasks_text_finetune as recipes  # noqa: E402
from tests.helpers import fast_jit, numpy_variables  # noqa: E402

CONFIGS = ("bert_ner", "bert_sentiment", "bert_qa", "biobert_qa")


def test_generated_data_is_consistent():
    tok = recipes.recipe_tokenizer()
    words, tags = recipes.ner_sentences("train", 5)[0]
    assert len(words) == len(tags) and set(tags) <= set(recipes.NER_LABELS)
    assert recipes.ner_sentences("test", 5) == recipes.ner_sentences("test", 5)  # deterministic
    ner = recipes.load_ner("train")
    first = ner["labels"][0][ner["labels"][0] != recipes.IGNORE]
    assert [recipes.NER_LABELS[i] for i in first] == recipes.ner_sentences("train")[0][1]  # one tag per word
    for name in ("tr_qa", "forum_qa"):
        examples, data = recipes.qa_examples(name, "test"), recipes.load_qa(name, "test")
        for i in range(0, len(examples), 17):  # the token span decodes to the answer text
            span = data["input_ids"][i][data["start_positions"][i]:data["end_positions"][i] + 1]
            assert tok.decode(span) == tok.decode(tok.encode(examples[i]["answers"][0])["input_ids"][0][1:-1])
    for name, (load, classes) in [(n, jf_embedded(n)) for n in ("tr_ner", "tr_sentiment", "tr_qa", "forum_qa")]:
        arrays = load("train")
        assert all(a.dtype == np.int32 for a in arrays.values()), name
    assert sorted(set(recipes.load_sentiment("train")["label"].tolist())) == [0, 1, 2]


def jf_embedded(name):
    from train import input_pipeline

    return input_pipeline.EMBEDDED[name]


def test_qa_span_decoding_and_answer_outside_context():
    start = jnp.asarray([[0.0, 5.0, 2.0, 0.0, 9.0]])
    end = jnp.asarray([[0.0, 0.0, 4.0, 8.0, 0.0]])
    allowed = jnp.asarray([[False, True, True, True, True]])
    s, e = recipes.best_spans(start, end, allowed, max_answer_tokens=3)
    assert (int(s[0]), int(e[0])) == (1, 3)  # token 4 starts best but no end follows it
    s, e = recipes.best_spans(start, end, allowed, max_answer_tokens=2)
    assert (int(s[0]), int(e[0])) == (2, 3)
    bad = dict(recipes.qa_examples("tr_qa", "train", 1)[0], answer_start=500)
    with pytest.raises(ValueError, match=r"answer span \[500, .*\) is outside the encoded context"):
        recipes.encode_qa([bad], recipes.recipe_tokenizer())


@pytest.mark.parametrize("name", CONFIGS[:3])
def test_recipe_loss_falls(name):
    """Each recipe's smoke model, data and task (``biobert_qa`` is ``bert_qa`` on other data): 40 Adam steps on one fixed batch of its training data
    (the loss must fall below half its start), then eval sums (and entity F1) on test data."""
    config = config_lib.resolve_config(f"train/configs/{name}.py", ["smoke=True"])
    model = jf.create_model(config.model.name, **dict(config.model.overrides))
    task = tasks.get_task(config.task, **dict(config.task_args))
    load, _ = jf_embedded(config.input.dataset)
    batch = {k: jnp.asarray(v[:32]) for k, v in load("train").items()}
    params = numpy_variables(model, *task.model_inputs(batch))["params"]
    tx = optax.adam(3e-3)

    def step(params, opt_state):
        def loss(p):
            return task.loss(model.apply({"params": p}, *task.model_inputs(batch)), batch)[0]

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value

    step, opt_state, losses = fast_jit(step), tx.init(params), []
    for _ in range(40):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0], losses
    test = {k: jnp.asarray(v[:16]) for k, v in load("test").items()}
    sums = task.eval_sums(model.apply({"params": params}, *task.model_inputs(test)), {**test, "mask": jnp.ones(16)})
    means = task.finish_eval({k: float(v) / 16 for k, v in sums.items() if k != "count"})
    assert float(sums["count"]) == 16 and all(np.isfinite(v) for v in means.values())
    if name == "bert_ner":
        assert 0.0 <= means["f1"] <= 1.0 and means["entities_true"] > 1.0


def test_trainer_eval_applies_finish_eval(monkeypatch):
    """The trainer's eval divides the summed metrics by the example count, then the task's finish_eval
    adds the ratios of sums: entity F1 = 2 correct / (true + predicted) over the whole eval set."""
    monkeypatch.setattr(trainer.input_pipeline, "eval_batches", lambda *a, **k: iter([{"x": 0}, {"x": 1}]))
    monkeypatch.setattr(trainer.steps, "to_global", lambda batch, mesh, size: batch)
    sums = [{"entities_true": 3.0, "entities_pred": 4.0, "entities_correct": 2.0, "count": 2.0},
            {"entities_true": 5.0, "entities_pred": 2.0, "entities_correct": 2.0, "count": 2.0}]
    config = config_lib.resolve_config("train/configs/bert_ner.py", ["smoke=True"])
    task = tasks.get_task(config.task, **dict(config.task_args))
    out = trainer._evaluate(lambda params, stats, batch: sums[batch["x"]], {"params": None}, config, None, {},
                            None, use_ema=False, finish=task.finish_eval)
    assert out["eval/entities_true"] == 2.0 and out["eval/precision"] == pytest.approx(4 / 6)
    assert out["eval/recall"] == pytest.approx(4 / 8) and out["eval/f1"] == pytest.approx(2 * 4 / 14)


def test_configs_resolve_and_biobert_shapes_count_bert_for_question_answering():
    """Every recipe config builds its data fields; ``:biobert`` is BioBERT-base's BertForQuestionAnswering
    (vocab 28996: BERT-base's 109,482,240 - pooler 590,592 - 1,526 x 768 rows + qa_outputs 1,538)."""
    from train import input_pipeline

    for name in CONFIGS:
        config = config_lib.resolve_config(f"train/configs/{name}.py", ["smoke=True"])
        task = tasks.get_task(config.task, **dict(config.task_args))
        source, _ = input_pipeline.open_source(config.input, "test")
        input_pipeline.resolve_fields(task.fields, source, config.input.eval_pp)
    config = config_lib.resolve_config("train/configs/biobert_qa.py:biobert", [])
    assert jf.count_params(config.model.name, **dict(config.model.overrides)) == 107_721_218


def test_packed_mlm_pipeline_fields():
    """Packed masked-LM rows through the typed pipeline: int32 ids, segment ids and labels, no float
    slot, and fewer rows than the padded layout for the same passages."""
    from train import input_pipeline, tasks_text

    padded, packed = tasks_text.load_mlm("test"), tasks_text.load_mlm_packed("test")
    assert packed["input_ids"].shape[0] < 0.75 * padded["input_ids"].shape[0]
    assert (packed["segment_ids"] > 0).sum() == padded["attention_mask"].sum()  # every token, once
    config = config_lib.resolve_config("train/configs/bert_mlm.py:packed", ["smoke=True"])
    task = tasks.get_task(config.task, **dict(config.task_args))
    source, _ = input_pipeline.open_source(config.input, "test")
    fields = input_pipeline.resolve_fields(task.fields, source, config.input.train_pp)
    assert {k: (f.dtype.name, f.shape) for k, f in fields.items()} == {
        k: ("int32", (tasks_text.MAX_LEN,)) for k in ("input_ids", "segment_ids", "token_type_ids", "labels")}
    ids, mask, types, positions, segments = task.model_inputs({k: source[0][k][None] for k in source[0]} | {
        "labels": np.zeros((1, tasks_text.MAX_LEN), np.int32)})
    assert mask is None and positions is None and segments.shape == ids.shape
