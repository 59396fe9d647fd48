r"""BioBERT-style extractive QA on mental-health-forum posts (the schizophrenia-symptom QA study's format).

    python -m train.main --config train/configs/biobert_qa.py --workdir /tmp/jaxformers_biobert_qa
    python -m train.main --config train/configs/biobert_qa.py:biobert --workdir ...   # BioBERT-base shapes

Interno & Ambrosini (arXiv 2310.00448) turn forum posts into a SQuAD-format set and fine-tune BERT,
DistilBERT, RoBERTa and BioBERT for extractive QA; BioBERT does best (F1 0.885), scored by F1, exact
match, precision and recall. Data: ``forum_qa`` (``train/tasks_text_finetune.py``): generated posts
naming a symptom, how long it has lasted and what it makes hard, with SQuAD-format questions and
held-out symptoms in the test split. The recipe is ``bert_qa.py``'s (start/end head, mean of the two
cross-entropies, span decoding with start <= end <= start + 29). ``:biobert`` builds BioBERT v1.1's
architecture, BERT-base cased (12 layers, width 768, 12 heads, 28,996-token vocabulary;
``BertForQuestionAnswering``: 107,721,218 parameters) at BioBERT's fine-tuning rate 5e-5; the
default is a 2-layer width-128 model that trains from scratch on a CPU in minutes. The string-level
SQuAD metrics (EM, F1, precision, recall) are ``jaxformers.text.squad_metrics``. Measured (default
size, steps=200, a shared 2-core CPU, 35 s): test exact match 0.883, span F1 0.957 (held-out symptoms).
Arguments: ``steps``, ``batch``, ``biobert``.
"""
from train import config_lib
from train.configs import bert_qa

BIOBERT = dict(vocab_size=28996, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, max_position_embeddings=512)


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, steps=400, batch=16, biobert=False)
    c = bert_qa.get_config(f"steps={args.steps},batch={args.batch},dataset=forum_qa,smoke={args.smoke}")
    if args.biobert:
        c.model.overrides.update(BIOBERT)
        c.optimizer.learning_rate = 5e-5
        c.schedule.warmup_steps = args.steps // 10
    return c
