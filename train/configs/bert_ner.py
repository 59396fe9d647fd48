r"""Named-entity recognition (BERT token classification) on generated Turkish news sentences.

    python -m train.main --config train/configs/bert_ner.py --workdir /tmp/jaxformers_bert_ner

The NER recipe of the Turkish BERT fine-tuning study (Yildirim, arXiv 2401.17396): a BERT encoder
with a token-classification head (dropout + linear per token), cross-entropy on each word's first
sub-token, entity-level F1 by seqeval's rules. Data: ``tr_ner`` (``train/tasks_text_finetune.py``):
600 / 150 template sentences with PER / LOC / ORG spans in IOB2; test names never occur in training.
Model: ``bert_base_uncased`` shrunk to 2 layers of width 128, trained from scratch (point
``model.overrides`` at BERTurk's shapes, vocab 32000 cased, to match the paper's model size).
Measured (steps=200, a shared 2-core CPU, 36 s in all): test entity F1 0.997
(token accuracy 0.999). ``:smoke`` shrinks it to seconds. Arguments: ``steps``, ``batch``, ``layers``, ``width``.
"""
from train import config_lib, tasks_text_finetune as recipes


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, steps=400, batch=32, layers=2, width=128)
    c = recipes.recipe_config(args, head="token_classification", task="bert_token_classification", dataset="tr_ner",
                              max_len=recipes.MAX_LEN, warmup_steps=40, eval_batch_size=50,
                              num_labels=len(recipes.NER_LABELS))
    c.task_args = dict(labels=recipes.NER_LABELS)
    c.best_metric = "eval/f1"
    return c
