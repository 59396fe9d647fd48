r"""BERT masked-LM pretraining from scratch on Python's own documentation, offline, on a CPU.

    python -m train.main --config train/configs/bert_mlm.py --workdir /tmp/jaxformers_bert_mlm

Data: ``stdlib_mlm`` (``train/tasks_text.py``): ~1.6k docstring passages of the standard library
plus the Zen of Python, tokenised with a WordPiece vocabulary trained on the same corpus (~3.9k
tokens), 64 tokens per passage; BERT's dynamic 80/10/10 masking of 15% of the tokens
(``mlm_mask``). Model: the registered ``bert_base_uncased`` shrunk to 2 layers of width 128
(``head="mlm"``, tied decoder, 0.92M parameters), AdamW with warmup + linear decay. Measured
(steps=200, a 2-core CPU shared with other jobs, 90 s in all): the eval masked-token loss falls
from ln(3875) = 8.26 (uniform) to 6.10, masked-token accuracy 11.8%; the default 1000 steps go
further. ``:smoke`` shrinks it to seconds.
``:packed`` trains on packed rows instead (several passages per row with ``segment_ids``: about half
the rows for the same passages). Arguments: ``steps``, ``batch``, ``layers``, ``width``, ``packed``.
"""
from train import config_lib, tasks_text


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, steps=1000, batch=32, layers=2, width=128, packed=False)
    tok = tasks_text.corpus_tokenizer()
    c = config_lib.base_config()
    c.model.name = "bert_base_uncased"
    c.model.overrides = dict(head="mlm", vocab_size=tok.vocab_size, hidden_size=args.width,
                             num_hidden_layers=args.layers, num_attention_heads=max(1, args.width // 64),
                             intermediate_size=4 * args.width, max_position_embeddings=tasks_text.MAX_LEN)
    c.task = "bert_mlm"
    c.task_args = dict(packed=args.packed)

    c.input.source = "embedded"
    c.input.dataset = "stdlib_mlm_packed" if args.packed else "stdlib_mlm"
    c.input.train_pp = f"mlm_mask(mask_id={tok.mask_token_id}, vocab_size={tok.vocab_size})"
    c.input.eval_pp = c.input.train_pp  # the eval pipeline's fixed seed makes its masks fixed

    c.batch_size = args.batch
    c.eval_batch_size = 64
    c.num_train_steps = args.steps
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.b2 = 0.98
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "linear"
    c.schedule.warmup_steps = 100
    c.best_metric = "eval/loss"
    c.best_mode = "min"

    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.smoke = args.smoke
    c.smoke_overrides = {"model": {"overrides": {"num_hidden_layers": 1, "hidden_size": 64,
                                                 "num_attention_heads": 2, "intermediate_size": 128}}}
    return c
