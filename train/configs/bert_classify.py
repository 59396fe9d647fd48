r"""BERT sequence classification: which area of the standard library does a docstring document?

    python -m train.main --config train/configs/bert_classify.py --workdir /tmp/jaxformers_bert_cls

Data: ``stdlib_topics`` (``train/tasks_text.py``): ~1.8k first paragraphs of standard-library
docstrings labelled by 6 areas (networking, concurrency, text formats, numbers & time, files & OS,
developer tools), a fixed 85/15 split by API name. Model: ``bert_base_uncased`` shrunk to 2 layers
of width 128 with the sequence-classification head (pooler -> dropout -> classifier), trained from
scratch; the majority class is ~33%. Measured (steps=300, a shared 2-core CPU, 67 s in all):
69.7% test accuracy on the 261 held-out docstrings. ``:smoke`` shrinks it to seconds.
"""
from train import config_lib, tasks_text


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, steps=1000, batch=32, layers=2, width=128)
    tok = tasks_text.corpus_tokenizer()
    c = config_lib.base_config()
    c.model.name = "bert_base_uncased"
    c.model.overrides = dict(head="classification", num_labels=len(tasks_text.TOPICS), vocab_size=tok.vocab_size,
                             hidden_size=args.width, num_hidden_layers=args.layers,
                             num_attention_heads=max(1, args.width // 64), intermediate_size=4 * args.width,
                             max_position_embeddings=tasks_text.MAX_LEN)
    c.task = "bert_classification"
    c.task_args = dict(label_smoothing=0.1)

    c.input.source = "embedded"
    c.input.dataset = "stdlib_topics"
    c.input.train_pp = ""
    c.input.eval_pp = ""

    c.batch_size = args.batch
    c.eval_batch_size = 64
    c.num_train_steps = args.steps
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 5e-4
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "linear"
    c.schedule.warmup_steps = 100

    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.smoke = args.smoke
    c.smoke_overrides = {"model": {"overrides": {"num_hidden_layers": 1, "hidden_size": 64,
                                                 "num_attention_heads": 2, "intermediate_size": 128}}}
    return c
