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
    c = recipes.recipe_config(args, head="qa", task="bert_qa", dataset=args.dataset, max_len=recipes.QA_MAX_LEN,
                              warmup_steps=40, eval_batch_size=40)
    c.task_args = dict(max_answer_tokens=30)
    c.best_metric = "eval/f1"
    return c
