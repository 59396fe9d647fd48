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
    tok = recipes.recipe_tokenizer()
    c = config_lib.base_config()
    c.model.name = "bert_base_uncased"
    c.model.overrides = dict(head="token_classification", num_labels=len(recipes.NER_LABELS), vocab_size=tok.vocab_size,
                             hidden_size=args.width, num_hidden_layers=args.layers,
                             num_attention_heads=max(1, args.width // 64), intermediate_size=4 * args.width,
                             max_position_embeddings=recipes.MAX_LEN)
    c.task = "bert_token_classification"
    c.task_args = dict(labels=recipes.NER_LABELS)
    c.input.source = "embedded"
    c.input.dataset = "tr_ner"
    c.input.train_pp = c.input.eval_pp = ""
    c.batch_size = args.batch
    c.eval_batch_size = 50
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
