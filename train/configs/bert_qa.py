r"""Extractive question answering (SQuAD format) with a BERT encoder, on generated Turkish paragraphs.

    python -m train.main --config train/configs/bert_qa.py --workdir /tmp/jaxformers_bert_qa

The QA recipe of the Turkish BERT fine-tuning study (Yildirim, arXiv 2401.17396): [CLS] question
[SEP] context [SEP] through BERT, a linear start/end head (``head="qa"``), loss = mean of the start
and end cross-entropies; eval decodes the best span inside the context with start <= end and at most
``max_answer_tokens`` tokens and reports exact match and token F1 of the span. Data: ``tr_qa``
(``train/tasks_text_finetune.py``): 500 / 120 paragraphs about generated people with questions on
birth place, year, employer, sibling. ``input.dataset='forum_qa'`` switches to the forum-post data
(see ``biobert_qa.py``). Measured (steps=200, a shared 2-core CPU, 62 s in all): test exact match 0.983, span F1 0.990.
``:smoke`` shrinks it to seconds. Arguments: ``steps``, ``batch``,
``layers``, ``width``.
"""
from train import config_lib, tasks_text_finetune as recipes


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, steps=400, batch=32, layers=2, width=128, dataset="tr_qa")
    tok = recipes.recipe_tokenizer()
    c = config_lib.base_config()
    c.model.name = "bert_base_uncased"
    c.model.overrides = dict(head="qa", vocab_size=tok.vocab_size, hidden_size=args.width,
                             num_hidden_layers=args.layers, num_attention_heads=max(1, args.width // 64),
                             intermediate_size=4 * args.width, max_position_embeddings=recipes.QA_MAX_LEN)
    c.task = "bert_qa"
    c.task_args = dict(max_answer_tokens=30)
    c.input.source = "embedded"
    c.input.dataset = args.dataset
    c.input.train_pp = c.input.eval_pp = ""
    c.batch_size = args.batch
    c.eval_batch_size = 40
    c.num_train_steps = args.steps
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "linear"
    c.schedule.warmup_steps = 40
    c.best_metric = "eval/f1"
    c.log_every_steps = 50
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 400
    c.smoke = args.smoke
    c.smoke_overrides = {"model": {"overrides": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                                 "intermediate_size": 64}}}
    return c
