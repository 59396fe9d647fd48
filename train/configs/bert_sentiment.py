r"""Sentiment classification (3 classes) of generated Turkish product reviews with a BERT encoder.

    python -m train.main --config train/configs/bert_sentiment.py --workdir /tmp/jaxformers_bert_sentiment

The sentiment recipe of the Turkish BERT fine-tuning study (Yildirim, arXiv 2401.17396): BERT's
sequence-classification head (pooler -> dropout -> linear) with cross-entropy. Data: ``tr_sentiment``
(``train/tasks_text_finetune.py``): 600 / 150 reviews, olumsuz / notr / olumlu. Model:
``bert_base_uncased`` shrunk to 2 layers of width 128, from scratch. The text-classification task
of the study is the same recipe on other labels (see ``bert_classify.py`` for a 6-topic corpus).
Measured (steps=200, a shared 2-core CPU, 34 s in all): test accuracy 1.000 (the
generated reviews are easy; the recipe is the point). ``:smoke`` shrinks it to seconds. Arguments: ``steps``, ``batch``, ``layers``, ``width``.
"""
from train import config_lib, tasks_text_finetune as recipes


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, steps=300, batch=32, layers=2, width=128)
    c = recipes.recipe_config(args, head="classification", task="bert_classification", dataset="tr_sentiment",
                              max_len=recipes.MAX_LEN, warmup_steps=30, eval_batch_size=50,
                              num_labels=len(recipes.SENTIMENT_LABELS))
    c.task_args = dict(label_smoothing=0.0)
    return c
