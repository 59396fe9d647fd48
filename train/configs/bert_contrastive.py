r"""Bi-encoder retrieval with in-batch negatives: find an API's docstring from its name.

    python -m train.main --config train/configs/bert_contrastive.py --workdir /tmp/jaxformers_bert_retrieval

Data: ``stdlib_retrieval`` (``train/tasks_text.py``): query = a standard-library API name in words
("shutil copy tree"), positive = the first paragraph of its docstring; every other document of the
batch is a negative (symmetric InfoNCE, temperature 0.05: sentence-transformers'
MultipleNegativesRankingLoss). Model: ``bert_base_uncased`` shrunk to 2 layers of width 128 with
the sentence-embedding head (mean pooling, L2-normalised), one encoder for queries and documents.
Eval: each query ranked against all documents of its eval batch (64): MRR@10, nDCG@10,
recall@1/5/10 (random ranking: MRR@10 ~ 0.05). Measured (steps=200, from scratch, a shared
2-core CPU, 186 s in all): MRR@10 0.644, nDCG@10 0.698, recall@1/5/10 0.521 / 0.805 / 0.866 on the
261 held-out APIs. ``:smoke`` shrinks it to seconds.
"""
from train import config_lib, tasks_text


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, steps=1000, batch=64, layers=2, width=128)
    tok = tasks_text.corpus_tokenizer()
    c = config_lib.base_config()
    c.model.name = "bert_base_uncased"
    c.model.overrides = dict(head="embedding", pooling="mean", vocab_size=tok.vocab_size, hidden_size=args.width,
                             num_hidden_layers=args.layers, num_attention_heads=max(1, args.width // 64),
                             intermediate_size=4 * args.width, max_position_embeddings=tasks_text.MAX_LEN)
    c.task = "bert_contrastive"
    c.task_args = dict(temperature=0.05)

    c.input.source = "embedded"
    c.input.dataset = "stdlib_retrieval"
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
    c.best_metric = "eval/mrr@10"
    c.best_mode = "max"

    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.smoke = args.smoke
    c.smoke_overrides = {"model": {"overrides": {"num_hidden_layers": 1, "hidden_size": 64,
                                                 "num_attention_heads": 2, "intermediate_size": 128}}}
    return c
