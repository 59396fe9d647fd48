"""Text tasks for ``train/``: BERT masked-LM pretraining, sequence classification and bi-encoder
contrastive retrieval, on an embedded offline English corpus.

Importing this module (the ``bert_*`` configs do) registers

- tasks ``bert_mlm``, ``bert_classification``, ``bert_contrastive`` (``config.task``);
- embedded datasets (``config.input.dataset`` with ``input.source="embedded"``):
  ``stdlib_mlm`` (docstring passages), ``stdlib_mlm_packed`` (the same passages packed several to a
  row with ``segment_ids``, see ``load_mlm_packed``), ``stdlib_topics`` (passages labelled by the stdlib area they
  document: 6 classes) and ``stdlib_retrieval`` (query = an API's name in words, e.g. "shutil copy
  tree", positive document = its docstring);
- the preprocessing op ``mlm_mask(...)`` (BERT's 80/10/10 dynamic masking, per-example RNG).

The corpus is the documentation that ships with Python itself: the docstrings of ~90 standard
library modules and the Zen of Python (no download; identical for a given Python version). The
tokenizer is a WordPiece vocabulary learnt on that corpus (``corpus_tokenizer()``, by the
reproducible ``wordpiece_vocab``; encoding runs in the ``tokenizers`` library), so a model can be
pretrained from scratch fully offline, with the same ids in every process and after a resume.

Records are typed named fields (see ``train/input_pipeline.py``): a text example is
``input_ids``, ``attention_mask`` (1 = token, 0 = padding) and ``token_type_ids``, int32 (MAX_LEN,),
plus ``label`` int32 () for topics; masked-LM adds ``labels`` int32 (MAX_LEN,) (target ids, -1
elsewhere); a retrieval example is ``query_input_ids`` / ``query_attention_mask`` (QUERY_LEN,) and
``doc_input_ids`` / ``doc_attention_mask`` (MAX_LEN,). Ids stay integers end to end.
"""
from __future__ import annotations

import codecs
import collections
import contextlib
import functools
import heapq
import inspect
import io
import json
import re
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers.text import Tokenizer
from jaxformers.text.retrieval import mrr_at_k, ndcg_at_k, recall_at_k
from train import input_pipeline, preprocess
from train.input_pipeline import Field
from train.tasks import Batch, ClassificationTask, Task, register_task

MAX_LEN = 64
QUERY_LEN = 16
VOCAB_SIZE = 4096
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# stdlib areas (the classification labels) and the modules whose docstrings document them.
TOPICS: dict[str, tuple[str, ...]] = {
    "networking": ("email.message", "email.utils", "email.parser", "http.client", "http.server", "http.cookies",
                   "urllib.parse", "urllib.request", "smtplib", "imaplib", "poplib", "ftplib", "socket",
                   "socketserver", "mailbox", "mimetypes", "html.parser", "ipaddress", "xmlrpc.client"),
    "concurrency": ("asyncio.events", "asyncio.tasks", "asyncio.streams", "asyncio.locks", "asyncio.queues",
                    "asyncio.futures", "threading", "multiprocessing.pool", "multiprocessing.managers",
                    "concurrent.futures._base", "concurrent.futures.thread", "queue", "selectors", "subprocess",
                    "sched"),
    "text_formats": ("json", "json.decoder", "json.encoder", "csv", "re", "string", "textwrap", "difflib",
                     "xml.dom.minidom", "xml.etree.ElementTree", "configparser", "plistlib", "pickle", "base64",
                     "tokenize", "html", "shlex", "pprint"),
    "numbers_time": ("decimal", "fractions", "statistics", "random", "numbers", "operator", "heapq", "bisect",
                     "datetime", "calendar", "zoneinfo", "time", "math", "cmath"),
    "files_os": ("os", "pathlib", "shutil", "tempfile", "glob", "fnmatch", "zipfile", "tarfile", "gzip", "io",
                 "fileinput", "filecmp", "stat", "lzma", "bz2", "shelve"),
    "dev_tools": ("unittest.case", "unittest.mock", "doctest", "traceback", "inspect", "ast", "trace", "timeit",
                  "logging", "warnings", "argparse", "optparse", "pdb", "dis", "contextlib", "functools",
                  "dataclasses", "typing", "abc", "enum", "weakref", "copy"),
}


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _split_name(qualname: str) -> str:
    """``"shutil.copytree"`` -> ``"shutil copytree"``; ``"ThreadPoolExecutor.submit"`` -> ``"thread pool executor submit"``."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", qualname.replace(".", " ").replace("_", " "))
    return _clean(words.lower())


def _collect_stdlib_docs(topics: dict[str, tuple[str, ...]]) -> list[tuple[str, str, str]]:
    """The corpus as the running interpreter sees it. Self-contained: ``stdlib_docs`` runs its
    source in a fresh, isolated interpreter."""
    import contextlib
    import importlib
    import inspect
    import io
    import re

    seen: set[str] = set()
    out = []
    for topic, modules in topics.items():
        for mod_name in modules:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    mod = importlib.import_module(mod_name)
            except Exception:  # noqa: BLE001 - a module missing on this platform is simply skipped
                continue
            items = [(mod_name, mod)]
            for name, obj in sorted(vars(mod).items()):
                if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                    continue
                items.append((f"{mod_name}.{name}", obj))
                if inspect.isclass(obj):
                    items += [(f"{mod_name}.{name}.{m}", f) for m, f in sorted(vars(obj).items())
                              if not m.startswith("_") and callable(f)]
            for qualname, obj in items:
                doc = inspect.getdoc(obj) or ""
                para = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()
                if len(para) < 40 or para in seen:
                    continue
                seen.add(para)
                out.append((topic, qualname, para))
    return sorted(out, key=lambda t: t[1])


@functools.lru_cache(maxsize=None)
def stdlib_docs() -> tuple[tuple[str, str, str], ...]:
    """(topic, qualified name, first docstring paragraph) for the public API of ``TOPICS``' modules,
    sorted by name; paragraphs shorter than 40 characters and duplicates are dropped.

    Collected in a fresh isolated interpreter (``python -I``, ~0.5 s): what this process imported
    or patched (torch replaces ``inspect.getfile``, for one) must not change the corpus, whose
    examples and vocabulary have to be the same in every process of a run and after a resume."""
    code = (inspect.getsource(_collect_stdlib_docs)
            + "\nimport json, sys\nprint(json.dumps(_collect_stdlib_docs(json.load(sys.stdin))))\n")
    proc = subprocess.run([sys.executable, "-I", "-c", code], input=json.dumps(TOPICS), capture_output=True,
                          text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"collecting the standard-library docstrings failed:\n{proc.stderr[-2000:]}")
    return tuple(tuple(item) for item in json.loads(proc.stdout.splitlines()[-1]))


def zen_of_python() -> str:
    """The Zen of Python (``this``), decoded without printing it."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def wordpiece_vocab(texts: list[str], vocab_size: int, min_frequency: int = 2) -> list[str]:
    """A WordPiece vocabulary learnt by merging the most frequent adjacent pieces (the algorithm of
    ``tokenizers``' ``WordPieceTrainer``: BERT-normalised, lower-cased words split into characters,
    word-internal ones prefixed ``##``; merges stop at ``vocab_size`` or below ``min_frequency``).

    Written out because ``tokenizers``' trainer is not reproducible across processes (its ties
    follow hash-map order, so ~700 ids move between runs): the ids must be the same in every
    process of a run and after a resume. Here ties go to the alphabetically first pair."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = collections.Counter(word for text in texts
                                 for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    words = [[w[0]] + ["##" + c for c in w[1:]] for w in sorted(counts)]
    freqs = [counts[w] for w in sorted(counts)]
    vocab = list(SPECIALS) + sorted({piece for w in words for piece in w} - set(SPECIALS))
    known = set(vocab)
    pair_counts: collections.Counter = collections.Counter()
    holders: dict[tuple[str, str], set[int]] = collections.defaultdict(set)  # pair -> words that (may) hold it
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            holders[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -count:
            continue  # a stale entry: the pair's count changed since it was pushed
        if -count < min_frequency:
            break
        first, second = pair
        merged = first + second[2:]  # the second piece is always a "##" continuation
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        touched = set()
        for i in sorted(holders.pop(pair)):
            old, f = words[i], freqs[i]
            new, j = [], 0
            while j < len(old):
                if j + 1 < len(old) and old[j] == first and old[j + 1] == second:
                    new.append(merged)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            if len(new) == len(old):
                continue
            for p in zip(old, old[1:]):
                pair_counts[p] -= f
                touched.add(p)
            for p in zip(new, new[1:]):
                pair_counts[p] += f
                holders[p].add(i)
                touched.add(p)
            words[i] = new
        for p in sorted(touched):
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
    return vocab


@functools.lru_cache(maxsize=None)
def corpus_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A lower-cased BERT WordPiece tokenizer learnt on the corpus (``wordpiece_vocab``; the same
    ids in every process for a given Python version, ~1 s)."""
    from tokenizers import Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers, processors

    texts = [d for _, _, d in stdlib_docs()] + [_split_name(n) for _, n, _ in stdlib_docs()] + [zen_of_python()]
    vocab = wordpiece_vocab(texts, vocab_size)
    backend = Backend(models.WordPiece({piece: i for i, piece in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.BertProcessing(("[SEP]", vocab.index("[SEP]")), ("[CLS]", vocab.index("[CLS]")))
    return Tokenizer(backend, model_max_length=MAX_LEN)


def _is_test(name: str, fraction: float = 0.15) -> bool:
    """A fixed, order-independent split by the CRC of the qualified name."""
    return zlib.crc32(name.encode()) % 1000 < fraction * 1000


def _encode(texts: list[str], max_len: int, prefix: str = "") -> dict[str, np.ndarray]:
    """``{prefix + "input_ids", prefix + "attention_mask", prefix + "token_type_ids"}``, int32 (N, max_len)."""
    enc = corpus_tokenizer().encode(texts, max_length=max_len, padding="max_length")
    return {prefix + k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _split_docs(split: str):
    if split not in ("train", "test"):
        raise ValueError(f"text datasets have splits ('train', 'test'), got {split!r}")
    return [d for d in stdlib_docs() if _is_test(d[1]) == (split == "test")]


@functools.lru_cache(maxsize=None)
def load_mlm(split: str) -> dict[str, np.ndarray]:
    """Docstring passages (+ the Zen of Python in train): ``input_ids`` / ``attention_mask`` /
    ``token_type_ids`` int32 (N, MAX_LEN)."""
    texts = [d for _, _, d in _split_docs(split)]
    if split == "train":
        texts += [line for line in zen_of_python().splitlines()[2:] if line]
    return _encode(texts, MAX_LEN)


@functools.lru_cache(maxsize=None)
def load_topics(split: str) -> dict[str, np.ndarray]:
    """Docstring passages as in ``load_mlm`` plus ``label`` int32 (N,): their area (``TOPICS``' 6)."""
    docs = _split_docs(split)
    names = list(TOPICS)
    labels = np.array([names.index(t) for t, _, _ in docs], np.int32)
    return {**_encode([d for _, _, d in docs], MAX_LEN), "label": labels}


@functools.lru_cache(maxsize=None)
def load_retrieval(split: str) -> dict[str, np.ndarray]:
    """``query_input_ids`` / ``query_attention_mask`` int32 (N, QUERY_LEN) (the API name in words) and
    ``doc_input_ids`` / ``doc_attention_mask`` int32 (N, MAX_LEN) (its docstring paragraph)."""
    docs = _split_docs(split)
    queries = _encode([_split_name(n) for _, n, _ in docs], QUERY_LEN, "query_")
    documents = _encode([d for _, _, d in docs], MAX_LEN, "doc_")
    return {k: v for k, v in {**queries, **documents}.items() if not k.endswith("token_type_ids")}


@functools.lru_cache(maxsize=None)
def load_mlm_packed(split: str) -> dict[str, np.ndarray]:
    """The ``load_mlm`` passages unpadded, packed into rows of MAX_LEN tokens (first-fit decreasing,
    ``jaxformers.text.pack_sequences``): ``input_ids``, ``segment_ids`` (1..S per row, 0 = padding)
    and ``token_type_ids``, int32 (R, MAX_LEN). Attention stays within each passage and positions
    restart per passage (``Bert(segment_ids=...)``), so no compute goes to padding."""
    from jaxformers.text import pack_sequences

    padded = load_mlm(split)
    lengths = padded["attention_mask"].sum(1)
    packed = pack_sequences([ids[:n] for ids, n in zip(padded["input_ids"], lengths)], MAX_LEN,
                            pad_id=corpus_tokenizer().pad_token_id)
    return {"input_ids": packed.input_ids, "segment_ids": packed.segment_ids, "token_type_ids": packed.token_type_ids}


input_pipeline.EMBEDDED.setdefault("stdlib_mlm", (load_mlm, 0))
input_pipeline.EMBEDDED.setdefault("stdlib_mlm_packed", (load_mlm_packed, 0))
input_pipeline.EMBEDDED.setdefault("stdlib_topics", (load_topics, len(TOPICS)))
input_pipeline.EMBEDDED.setdefault("stdlib_retrieval", (load_retrieval, 0))


def mlm_mask(mask_id: int, vocab_size: int, rate: float = 0.15, num_special: int = len(SPECIALS)):
    """BERT's dynamic masking of one example's ``input_ids``: ``rate`` of the real tokens (ids >=
    ``num_special``) become targets; of those 80% -> [MASK], 10% -> a random token, 10% unchanged.
    Adds ``labels`` (the target ids, -1 elsewhere) of the ids' dtype; ids stay integers."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"mlm_mask: rate must be in (0, 1), got {rate}")

    def op(ex, rng):
        if "input_ids" not in ex:
            raise ValueError(f"mlm_mask: the example has no 'input_ids' (its fields: {sorted(ex)})")
        ids = np.array(ex["input_ids"])  # a copy: the source's arrays are never written
        if not np.issubdtype(ids.dtype, np.signedinteger):
            raise ValueError(f"mlm_mask: input_ids must be signed integers, got {ids.dtype}")
        candidates = np.flatnonzero(ids.reshape(-1) >= num_special)
        flat, labels = ids.reshape(-1), np.full(ids.size, -1, ids.dtype)
        if candidates.size:
            chosen = candidates[rng.random(candidates.size) < rate]
            if chosen.size == 0:
                chosen = rng.choice(candidates, 1)
            labels[chosen] = flat[chosen]
            roll = rng.random(chosen.size)
            flat[chosen[roll < 0.8]] = mask_id
            rand = chosen[(roll >= 0.8) & (roll < 0.9)]
            flat[rand] = rng.integers(num_special, vocab_size, rand.size)
        return {**ex, "input_ids": flat.reshape(ids.shape), "labels": labels.reshape(ids.shape)}

    return op


preprocess.PP_OPS.setdefault("mlm_mask", mlm_mask)

TOKENS = (None,)  # per-example shape of a token field: the sequence length comes from the data


def _text_fields(prefix: str = "", token_type_ids: bool = True) -> dict[str, Field]:
    names = ("input_ids", "attention_mask") + (("token_type_ids",) if token_type_ids else ())
    return {prefix + n: Field("int32", TOKENS) for n in names}


@register_task("bert_mlm")
class MaskedLMTask(Task):
    """Masked-LM: ``Bert(head="mlm")`` on ``input_ids`` / ``attention_mask`` / ``token_type_ids``;
    logits vs ``labels`` (target ids, -1 = not a target). ``packed=True`` reads packed rows
    (``segment_ids`` instead of ``attention_mask``: the ``stdlib_mlm_packed`` dataset)."""

    def __init__(self, packed: bool = False):
        self.packed = bool(packed)
        mask = {"segment_ids": Field("int32", TOKENS)} if self.packed else {"attention_mask": Field("int32", TOKENS)}
        self.fields = {"input_ids": Field("int32", TOKENS), **mask, "token_type_ids": Field("int32", TOKENS),
                       "labels": Field("int32", TOKENS)}

    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        if self.packed:  # Bert(input_ids, attention_mask, token_type_ids, position_ids, segment_ids)
            return batch["input_ids"], None, batch["token_type_ids"], None, batch["segment_ids"]
        return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]

    def _token_terms(self, logits, labels):
        target = labels >= 0
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.maximum(labels, 0))
        correct = (jnp.argmax(logits, -1) == labels) & target
        return jnp.where(target, ce, 0.0), correct.astype(jnp.float32), target.astype(jnp.float32)

    def loss(self, outputs, batch):
        ce, correct, target = self._token_terms(outputs, batch["labels"])
        n = jnp.maximum(target.sum(), 1.0)
        return ce.sum() / n, {"mlm_accuracy": correct.sum() / n}

    def eval_sums(self, outputs, batch):
        ce, correct, target = self._token_terms(outputs, batch["labels"])
        w = target * batch["mask"].astype(jnp.float32)[:, None]
        return {"loss": (ce * w).sum(), "mlm_accuracy": (correct * w).sum(), "count": w.sum()}

    def predict(self, outputs):
        return jnp.argmax(outputs, -1)


@register_task("bert_classification")
class SequenceClassificationTask(ClassificationTask):
    """``Bert(head="classification")`` on ``input_ids`` / ``attention_mask`` / ``token_type_ids``,
    cross-entropy against ``label`` (int32 class ids)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__(label_smoothing=label_smoothing)
        self.fields = {**_text_fields(), "label": Field("int32", ())}

    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


@register_task("bert_contrastive")
class ContrastiveTask(Task):
    """Bi-encoder with in-batch negatives (InfoNCE / MultipleNegativesRankingLoss).

    Each example holds a query (``query_input_ids`` / ``query_attention_mask``) and its positive
    document (``doc_input_ids`` / ``doc_attention_mask``); ``Bert(head="embedding")`` embeds both in
    one call (the shorter side padded to the longer), and every other document of the (global)
    batch is a negative. Eval ranks each query against all documents of its eval batch: MRR@10,
    nDCG@10, recall@1/5/10 (padding rows excluded)."""

    def __init__(self, temperature: float = 0.05, symmetric: bool = True, k: int = 10):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.symmetric, self.k = float(temperature), bool(symmetric), k
        self.fields = {**_text_fields("query_", token_type_ids=False), **_text_fields("doc_", token_type_ids=False)}

    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        q_ids, q_mask, d_ids, d_mask = (batch[k] for k in ("query_input_ids", "query_attention_mask",
                                                           "doc_input_ids", "doc_attention_mask"))
        length = max(q_ids.shape[1], d_ids.shape[1])
        pad = lambda x: jnp.pad(x, ((0, 0), (0, length - x.shape[1])))  # noqa: E731 - zeros: [PAD] / masked out
        rows = lambda q, d: jnp.stack([pad(q), pad(d)], axis=1).reshape(-1, length)  # noqa: E731
        return rows(q_ids, d_ids), rows(q_mask, d_mask)  # rows: query 0, document 0, query 1, ...
    @staticmethod
    def _pairs(outputs):
        emb = outputs.astype(jnp.float32).reshape(-1, 2, outputs.shape[-1])
        return emb[:, 0], emb[:, 1]

    def loss(self, outputs, batch):
        q, d = self._pairs(outputs)
        scores = q @ d.T / self.temperature
        labels = jnp.arange(q.shape[0])
        loss = optax.softmax_cross_entropy_with_integer_labels(scores, labels).mean()
        if self.symmetric:
            loss = 0.5 * (loss + optax.softmax_cross_entropy_with_integer_labels(scores.T, labels).mean())
        return loss, {"in_batch_accuracy": jnp.mean(jnp.argmax(scores, -1) == labels)}

    def eval_sums(self, outputs, batch):
        q, d = self._pairs(outputs)
        mask = batch["mask"].astype(jnp.float32)
        scores = jnp.where(mask[None, :] > 0, q @ d.T, -jnp.inf)
        relevance = jnp.eye(q.shape[0], dtype=jnp.float32) * mask[None, :]
        ce = optax.softmax_cross_entropy_with_integer_labels(jnp.where(jnp.isfinite(scores), scores / self.temperature,
                                                                       -1e9), jnp.arange(q.shape[0]))
        per_query = {"loss": ce, f"mrr@{self.k}": mrr_at_k(scores, relevance, self.k, reduce=False),
                     f"ndcg@{self.k}": ndcg_at_k(scores, relevance, self.k, reduce=False),
                     **{f"recall@{r}": recall_at_k(scores, relevance, r, reduce=False) for r in (1, 5, 10)}}
        return {**{k: (v * mask).sum() for k, v in per_query.items()}, "count": mask.sum()}

    def predict(self, outputs):
        q, d = self._pairs(outputs)
        return jnp.argmax(q @ d.T, -1)
