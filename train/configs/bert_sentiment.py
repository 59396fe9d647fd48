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
    tok = recipes.recipe_tokenizer()
    c = config_lib.base_config()
    c.model.name = "bert_base_uncased"
    c.model.overrides = dict(head="classification", num_labels=len(recipes.SENTIMENT_LABELS), vocab_size=tok.vocab_size,
                             hidden_size=args.width, num_hidden_layers=args.layers,
                             num_attention_heads=max(1, args.width // 64), intermediate_size=4 * args.width,
                             max_position_embeddings=recipes.MAX_LEN)
    c.task = "bert_classification"
    c.task_args = dict(label_smoothing=0.0)
    c.input.source = "embedded"
    c.input.dataset = "tr_sentiment"
    c.input.train_pp = c.input.eval_pp = ""
    c.batch_size = args.batch
    c.eval_batch_size = 50
    c.num_train_steps = args.steps
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "linear"
    c.schedule.warmup_steps = 30
    c.log_every_steps = 50
    c.eval_every_steps = 150
    c.checkpoint_every_steps = 300
    c.smoke = args.smoke
    c.smoke_overrides = {"model": {"overrides": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                                 "intermediate_size": 64}}}
    return c
