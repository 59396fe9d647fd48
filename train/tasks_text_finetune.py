"""Fine-tuning recipes for BERT-family encoders: token classification (NER), sentence classification
(sentiment) and extractive QA, on small generated offline data sets.

The two papers these recipes follow: the Turkish BERT fine-tuning study (Yildirim, arXiv
2401.17396: NER, sentiment, QA and text classification with BERTurk) and the schizophrenia-forum QA
study (Interno & Ambrosini, arXiv 2310.00448: SQuAD-format QA from forum posts, BioBERT best, scored
by F1 / exact match / precision / recall). Their data are not redistributable or not released, so
the project generates stand-ins of the same format, deterministically (numpy PCG64, fixed seeds):

- ``tr_ner``: Turkish news-style sentences from templates over person, place and organisation names
  with word-level IOB2 tags (PER, LOC, ORG); test sentences are new draws (other name combinations;
  a model trained from scratch on 600 sentences does not tag names it has never seen, so the name
  pools are shared between the splits).
- ``tr_sentiment``: Turkish product reviews, 3 classes (olumsuz / notr / olumlu).
- ``tr_qa``: Turkish SQuAD-format paragraphs about generated people (birth place, year, employer,
  sibling) with questions and character-offset answers (new combinations of facts in test).
- ``forum_qa``: English mental-health-forum-style posts (symptom, duration, what it affects) with
  SQuAD-format questions: the schizophrenia-QA study's format (``biobert_qa`` config).

One WordPiece vocabulary is learnt on all of the generated text (``recipe_tokenizer``, the
reproducible ``tasks_text.wordpiece_vocab``). Registered here:

- tasks ``bert_token_classification`` (loss: cross-entropy over labelled sub-tokens, -100 elsewhere;
  eval: token accuracy and entity-level precision / recall / F1 by seqeval's rules over each word's
  first sub-token, ``jaxformers.text.metrics``) and ``bert_qa`` (loss: mean of start and end
  cross-entropy; eval: exact start / end / span accuracy and SQuAD token F1 of the best span with
  start <= end <= start + max_answer_tokens - 1, computed on token ids inside jit);
- the embedded datasets above (``input.source="embedded"``).

Record fields (all int32): ``input_ids`` / ``attention_mask`` / ``token_type_ids`` (MAX_LEN,; QA_MAX_LEN for QA),
plus ``labels`` (MAX_LEN,) for NER, ``label`` () for sentiment, ``start_positions`` /
``end_positions`` () for QA (token indices of the answer's first and last sub-token).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers.text import Tokenizer, char_span_to_tokens
from jaxformers.text.metrics import entity_counts_jnp, tag_codes
from train import input_pipeline, tasks_text
from train.input_pipeline import Field
from train.tasks import Task, register_task
from train.tasks_text import SequenceClassificationTask, _text_fields

MAX_LEN = 48  # NER and sentiment records
QA_MAX_LEN = 96  # question + paragraph
IGNORE = -100
NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG")
SENTIMENT_LABELS = ("olumsuz", "notr", "olumlu")

FIRST = ("Ahmet", "Mehmet", "Ayşe", "Fatma", "Mustafa", "Zeynep", "Emre", "Elif", "Can", "Deniz", "Burak", "Selin",
         "Hakan", "Merve", "Kerem", "Derya", "Oğuz", "Gizem", "Murat", "Ece", "Serkan", "Pınar", "Tolga", "Aslı")
LAST = ("Yılmaz", "Kaya", "Demir", "Şahin", "Çelik", "Yıldız", "Aydın", "Öztürk", "Arslan", "Doğan", "Kılıç",
        "Aslan", "Koç", "Kurt", "Özdemir", "Erdoğan", "Polat", "Aksoy", "Güneş", "Tekin")
PLACES = ("Ankara", "İstanbul", "İzmir", "Bursa", "Antalya", "Trabzon", "Konya", "Eskişehir", "Kars", "Mardin",
          "Samsun", "Edirne", "Malatya", "Sinop", "Rize", "Van", "Muğla", "Çanakkale", "Kayseri", "Aydın")
ORGS = ("Türk Telekom", "Koç Holding", "Garanti Bankası", "Anadolu Ajansı", "Boğaziçi Üniversitesi",
        "Türk Hava Yolları", "Arçelik", "Tübitak", "Ziraat Bankası", "Orta Doğu Teknik Üniversitesi", "Aselsan",
        "Petrol Ofisi", "Vakıf Katılım", "Hacettepe Hastanesi", "Türkiye Radyo Televizyon", "Sabancı Holding")
NER_TEMPLATES = (
    "{PER} dün {LOC} şehrinde {ORG} toplantısına katıldı .",
    "{ORG} , {LOC} ofisini {PER} yönetiminde açtı .",
    "{PER} ve {PER} geçen hafta {LOC} yolculuğuna çıktı .",
    "{LOC} belediyesi {ORG} ile yeni bir anlaşma imzaladı .",
    "{PER} , {ORG} şirketinde mühendis olarak çalışıyor .",
    "Bu yaz {LOC} ile {LOC} arasında yeni tren seferleri başlıyor .",
    "Gazeteci {PER} , {ORG} hakkındaki haberi {LOC} bürosundan yazdı .",
    "{ORG} yöneticisi {PER} açıklama yaptı .",
)
PRODUCTS = ("telefon", "kulaklık", "ayakkabı", "kitap", "bilgisayar", "çanta", "saat", "kamera", "klavye", "mont")
SENTIMENT_WORDS = (
    ("berbat", "çok kötü", "bozuk geldi", "kalitesiz", "hiç beğenmedim", "param boşa gitti", "iade ettim"),
    ("idare eder", "fena değil", "ortalama", "beklediğim gibi", "ne iyi ne kötü", "fiyatına göre normal"),
    ("harika", "mükemmel", "çok güzel", "kaliteli", "çok beğendim", "herkese tavsiye ederim", "hızlı geldi"),
)
SENTIMENT_TEMPLATES = ("bu {P} {W} .", "aldığım {P} {W} , {W2} .", "{P} için yorumum : {W} .",
                       "kargo hızlıydı ama {P} {W} .", "{W} bir {P} , {W2} .")
QA_TEMPLATE = ("{PER} {YEAR} yılında {LOC} şehrinde doğdu . Üniversiteyi bitirdikten sonra {ORG} kurumunda "
               "çalışmaya başladı . Kardeşi {PER2} ise {LOC2} şehrinde yaşıyor .")
QA_QUESTIONS = (("{PER} nerede doğdu ?", "LOC"), ("{PER} hangi yılda doğdu ?", "YEAR"),
                ("{PER} hangi kurumda çalışıyor ?", "ORG"), ("{PER} kimin kardeşi ?", "PER2"),
                ("{PER2} nerede yaşıyor ?", "LOC2"))
SYMPTOMS = ("hearing voices", "paranoid thoughts", "trouble sleeping", "racing thoughts", "feeling watched",
            "losing motivation", "seeing shadows", "confused speech", "social withdrawal", "memory problems")
DURATIONS = ("two weeks", "three months", "about a year", "several days", "six months", "a long time",
             "four years", "since last winter")
ACTIVITIES = ("go to work", "sleep at night", "talk to my family", "concentrate on reading", "leave the house",
              "cook dinner", "keep my job", "meet friends", "study for exams", "drive my car")
FORUM_TEMPLATE = ("I have been struggling with {S} for {D} . My doctor changed my medication but it still makes it "
                  "hard to {A} . Does anyone else deal with {S2} ?")
FORUM_QUESTIONS = (("What symptom is the user struggling with ?", "S"), ("How long has it lasted ?", "D"),
                   ("What is hard for the user to do ?", "A"), ("What does the user ask others about ?", "S2"))


def _split_pool(pool, split: str, test_every: int = 4):
    """Names for one split: every ``test_every``-th entry is held out for the test split."""
    return [x for i, x in enumerate(pool) if (i % test_every == test_every - 1) == (split == "test")]


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"generated text datasets have splits ('train', 'test'), got {split!r}")


def ner_sentences(split: str, n: int | None = None) -> list[tuple[list[str], list[str]]]:
    """(words, IOB2 tags) sentences of ``tr_ner`` (train 600, test 150)."""
    _check_split(split)
    n = n or (600 if split == "train" else 150)
    rng = np.random.Generator(np.random.PCG64(11 if split == "train" else 12))
    first, last, places, orgs = FIRST, LAST, PLACES, ORGS
    out = []
    for _ in range(n):
        words, tags = [], []
        for piece in NER_TEMPLATES[rng.integers(len(NER_TEMPLATES))].split():
            if piece.startswith("{") and piece.endswith("}"):
                kind = piece[1:-1]
                if kind == "PER":
                    name = [first[rng.integers(len(first))]] + ([last[rng.integers(len(last))]]
                                                                if rng.random() < 0.7 else [])
                else:
                    pool = places if kind == "LOC" else orgs
                    name = pool[rng.integers(len(pool))].split()
                words += name
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
            else:
                words.append(piece)
                tags.append("O")
        out.append((words, tags))
    return out


def sentiment_reviews(split: str, n: int | None = None) -> list[tuple[str, int]]:
    """(review, label) pairs of ``tr_sentiment`` (train 600, test 150; labels ``SENTIMENT_LABELS``)."""
    _check_split(split)
    n = n or (600 if split == "train" else 150)
    rng = np.random.Generator(np.random.PCG64(21 if split == "train" else 22))
    out = []
    for _ in range(n):
        label = int(rng.integers(3))
        words = SENTIMENT_WORDS[label]
        text = SENTIMENT_TEMPLATES[rng.integers(len(SENTIMENT_TEMPLATES))].format(
            P=PRODUCTS[rng.integers(len(PRODUCTS))], W=words[rng.integers(len(words))],
            W2=words[rng.integers(len(words))])
        out.append((text, label))
    return out


def _fill(template: str, values: dict[str, str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """``template`` with ``{KEY}`` replaced, and the character span of each key's first occurrence."""
    text, spans, i = "", {}, 0
    while i < len(template):
        if template[i] == "{":
            j = template.index("}", i)
            key = template[i + 1:j]
            spans.setdefault(key, (len(text), len(text) + len(values[key])))
            text += values[key]
            i = j + 1
        else:
            text += template[i]
            i += 1
    return text, spans


def qa_examples(name: str, split: str, n: int | None = None) -> list[dict]:
    """SQuAD-format examples ``{"question", "context", "answers": [text], "answer_start": int}`` of
    ``tr_qa`` or ``forum_qa`` (train 500, test 120)."""
    _check_split(split)
    n = n or (500 if split == "train" else 120)
    rng = np.random.Generator(np.random.PCG64((31 if name == "tr_qa" else 41) + (split == "test")))
    pick = lambda pool: pool[rng.integers(len(pool))]  # noqa: E731
    out = []
    for _ in range(n):
        if name == "tr_qa":
            values = {"PER": f"{pick(FIRST)} {pick(LAST)}", "PER2": f"{pick(FIRST)} {pick(LAST)}",
                      "YEAR": str(int(rng.integers(1940, 2005))), "LOC": pick(PLACES), "LOC2": pick(PLACES),
                      "ORG": pick(ORGS)}
            template, questions = QA_TEMPLATE, QA_QUESTIONS
        elif name == "forum_qa":
            symptoms = _split_pool(SYMPTOMS, split, test_every=3)
            values = {"S": pick(symptoms), "S2": pick(symptoms), "D": pick(DURATIONS), "A": pick(ACTIVITIES)}
            template, questions = FORUM_TEMPLATE, FORUM_QUESTIONS
        else:
            raise ValueError(f"no generated QA dataset {name!r}; expected 'tr_qa' or 'forum_qa'")
        context, spans = _fill(template, values)
        question, key = questions[rng.integers(len(questions))]
        start, end = spans[key]
        out.append({"question": question.format(**values), "context": context, "answers": [context[start:end]],
                    "answer_start": start})
    return out


@functools.lru_cache(maxsize=None)
def recipe_tokenizer(vocab_size: int = 1500) -> Tokenizer:
    """A lower-cased WordPiece tokenizer learnt on all the generated recipe text (reproducible)."""
    texts = [" ".join(w) for w, _ in ner_sentences("train")] + [t for t, _ in sentiment_reviews("train")]
    texts += [e["context"] + " " + e["question"] for name in ("tr_qa", "forum_qa") for e in qa_examples(name, "train")]
    texts += 2 * list(FIRST + LAST + PLACES + ORGS + SYMPTOMS)  # every name of both splits is a known word
    vocab = tasks_text.wordpiece_vocab(texts, vocab_size)
    return Tokenizer.from_vocab(vocab, model_max_length=QA_MAX_LEN)


def recipe_config(args, *, head: str, task: str, dataset: str, max_len: int, warmup_steps: int,
                  eval_batch_size: int, **head_fields):
    """The shared half of the study's recipe configs (``train/configs/bert_{ner,sentiment,qa}.py``):
    ``bert_base_uncased`` shrunk to ``args.layers`` x ``args.width`` with the recipe tokenizer's vocabulary,
    trained from scratch on the embedded ``dataset``; AdamW 1e-3 (weight decay 0.01), linear schedule
    with ``warmup_steps``, ``args.steps`` steps of ``args.batch``, evaluated twice; ``:smoke`` runs one
    layer of width 32."""
    from train import config_lib

    c = config_lib.base_config()
    c.model.name = "bert_base_uncased"
    c.model.overrides = dict(head=head, vocab_size=recipe_tokenizer().vocab_size, hidden_size=args.width,
                             num_hidden_layers=args.layers, num_attention_heads=max(1, args.width // 64),
                             intermediate_size=4 * args.width, max_position_embeddings=max_len, **head_fields)
    c.task = task
    c.input.source = "embedded"
    c.input.dataset = dataset
    c.input.train_pp = c.input.eval_pp = ""
    c.batch_size = args.batch
    c.eval_batch_size = eval_batch_size
    c.num_train_steps = args.steps
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "linear"
    c.schedule.warmup_steps = warmup_steps
    c.log_every_steps = 50
    c.eval_every_steps = max(1, args.steps // 2)
    c.checkpoint_every_steps = args.steps
    c.smoke = args.smoke
    c.smoke_overrides = {"model": {"overrides": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                                 "intermediate_size": 64}}}
    return c


def encode_tagged(words_and_tags, tokenizer: Tokenizer, labels=NER_LABELS, max_len: int = MAX_LEN
                  ) -> dict[str, np.ndarray]:
    """Token-classification records: each word's first sub-token carries its tag id, the other
    sub-tokens and special tokens ``IGNORE`` (-100), as in Hugging Face's token-classification recipe."""
    backend = tokenizer.backend
    backend.enable_truncation(max_len)
    encodings = backend.encode_batch([w for w, _ in words_and_tags], is_pretokenized=True)
    backend.no_truncation()
    out = {k: np.zeros((len(encodings), max_len), np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    out["input_ids"][:] = tokenizer.pad_token_id
    out["labels"] = np.full((len(encodings), max_len), IGNORE, np.int32)
    for i, (enc, (_, tags)) in enumerate(zip(encodings, words_and_tags)):
        n = len(enc.ids)
        out["input_ids"][i, :n], out["attention_mask"][i, :n] = enc.ids, 1
        previous = None
        for t, word in enumerate(enc.word_ids):
            if word is not None and word != previous:
                out["labels"][i, t] = labels.index(tags[word])
            previous = word
    return out


def encode_qa(examples, tokenizer: Tokenizer, max_len: int = QA_MAX_LEN) -> dict[str, np.ndarray]:
    """QA records: [CLS] question [SEP] context [SEP] and the answer's token span (``char_span_to_tokens``:
    an answer outside the encoded context is an error naming it)."""
    enc = tokenizer.encode([e["question"] for e in examples], [e["context"] for e in examples], max_length=max_len,
                           padding="max_length", return_offsets=True)
    starts, ends = [], []
    for i, e in enumerate(examples):
        s, t = char_span_to_tokens(enc["offsets"][i], enc["sequence_ids"][i], e["answer_start"],
                                   e["answer_start"] + len(e["answers"][0]))
        starts.append(s)
        ends.append(t)
    out = {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    return {**out, "start_positions": np.asarray(starts, np.int32), "end_positions": np.asarray(ends, np.int32)}


@functools.lru_cache(maxsize=None)
def load_ner(split: str) -> dict[str, np.ndarray]:
    return encode_tagged(ner_sentences(split), recipe_tokenizer())


@functools.lru_cache(maxsize=None)
def load_sentiment(split: str) -> dict[str, np.ndarray]:
    reviews = sentiment_reviews(split)
    enc = recipe_tokenizer().encode([t for t, _ in reviews], max_length=MAX_LEN, padding="max_length")
    return {**{k: np.asarray(v, np.int32) for k, v in enc.items()},
            "label": np.asarray([y for _, y in reviews], np.int32)}


def load_qa(name: str, split: str) -> dict[str, np.ndarray]:
    return encode_qa(qa_examples(name, split), recipe_tokenizer())


input_pipeline.EMBEDDED.setdefault("tr_ner", (load_ner, len(NER_LABELS)))
input_pipeline.EMBEDDED.setdefault("tr_sentiment", (load_sentiment, len(SENTIMENT_LABELS)))
input_pipeline.EMBEDDED.setdefault("tr_qa", (functools.lru_cache(maxsize=None)(functools.partial(load_qa, "tr_qa")), 0))
input_pipeline.EMBEDDED.setdefault("forum_qa", (functools.lru_cache(maxsize=None)(functools.partial(load_qa,
                                                                                                      "forum_qa")), 0))

TOKENS = (None,)


@register_task("bert_token_classification")
class TokenClassificationTask(Task):
    """``Bert(head="token_classification")``: cross-entropy over tokens whose ``labels`` are not -100.
    Eval: ``token_accuracy`` and entity-level ``precision`` / ``recall`` / ``f1`` (seqeval's chunking
    over each word's first sub-token; ``finish_eval`` turns the summed counts into the ratios).
    ``labels``: the tag names in label-id order (IOB/IOBES)."""

    def __init__(self, labels=NER_LABELS):
        self.labels = tuple(labels)
        self.prefix_of, self.type_of = (tuple(int(x) for x in a) for a in tag_codes(self.labels))
        self.fields = {**_text_fields(), "labels": Field("int32", TOKENS)}

    def model_inputs(self, batch):
        return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]

    def _terms(self, logits, labels):
        keep = labels != IGNORE
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(keep, labels, 0))
        return jnp.where(keep, ce, 0.0), keep

    def loss(self, outputs, batch):
        ce, keep = self._terms(outputs, batch["labels"])
        n = jnp.maximum(keep.sum(), 1)
        accuracy = ((jnp.argmax(outputs, -1) == batch["labels"]) & keep).sum() / n
        return ce.sum() / n, {"token_accuracy": accuracy}

    def eval_sums(self, outputs, batch):
        labels, w = batch["labels"], batch["mask"].astype(jnp.float32)
        ce, keep = self._terms(outputs, labels)
        pred = jnp.argmax(outputs, -1)
        n_true, n_pred, n_correct = entity_counts_jnp(labels, pred, self.prefix_of, self.type_of, keep)
        tokens = keep.sum(1).astype(jnp.float32)
        return {"loss": (ce.sum(1) / jnp.maximum(tokens, 1) * w).sum(),
                "token_accuracy": (((pred == labels) & keep).sum(1) / jnp.maximum(tokens, 1) * w).sum(),
                "entities_true": (n_true * w).sum(), "entities_pred": (n_pred * w).sum(),
                "entities_correct": (n_correct * w).sum(), "count": w.sum()}

    def finish_eval(self, means):
        c, t, p = means["entities_correct"], means["entities_true"], means["entities_pred"]
        precision, recall = (c / p if p else 0.0), (c / t if t else 0.0)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {**means, "precision": precision, "recall": recall, "f1": f1}

    def predict(self, outputs):
        return jnp.argmax(outputs, -1)


def best_spans(start_logits: jax.Array, end_logits: jax.Array, allowed: jax.Array, max_answer_tokens: int):
    """(start, end) maximising start + end logit over start <= end < start + max_answer_tokens with both
    tokens ``allowed`` (the context): jit-friendly span decoding (B, L) -> (B,), (B,)."""
    length = start_logits.shape[1]
    i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    ok = (j >= i) & (j - i < max_answer_tokens)
    scores = start_logits[:, :, None] + end_logits[:, None, :]
    ok = ok[None] & allowed[:, :, None] & allowed[:, None, :]
    flat = jnp.argmax(jnp.where(ok, scores, -jnp.inf).reshape(scores.shape[0], -1), axis=1)
    return flat // length, flat % length


@register_task("bert_qa")
class QuestionAnsweringTask(Task):
    """``Bert(head="qa")``: mean of the start and end cross-entropies (HF's
    ``BertForQuestionAnswering`` loss). Eval: ``start_accuracy`` / ``end_accuracy`` / ``exact_match``
    (span equal) and SQuAD token ``f1`` of the decoded span (``best_spans``: inside the context,
    start <= end, at most ``max_answer_tokens``) against the gold span, on token positions."""

    def __init__(self, max_answer_tokens: int = 30):
        if max_answer_tokens < 1:
            raise ValueError(f"max_answer_tokens must be >= 1, got {max_answer_tokens}")
        self.max_answer_tokens = int(max_answer_tokens)
        self.fields = {**_text_fields(), "start_positions": Field("int32", ()), "end_positions": Field("int32", ())}

    def model_inputs(self, batch):
        return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]

    def _ce(self, outputs, batch):
        ce = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)  # noqa: E731
        return 0.5 * (ce(outputs["start_logits"], batch["start_positions"])
                      + ce(outputs["end_logits"], batch["end_positions"]))

    def loss(self, outputs, batch):
        start = jnp.argmax(outputs["start_logits"], -1) == batch["start_positions"]
        return self._ce(outputs, batch).mean(), {"start_accuracy": start.mean()}

    def eval_sums(self, outputs, batch):
        w = batch["mask"].astype(jnp.float32)
        last = batch["attention_mask"].sum(1, keepdims=True) - 1  # the closing [SEP]
        context = (batch["token_type_ids"] == 1) & (batch["attention_mask"] == 1)
        context = context & (jnp.arange(context.shape[1])[None, :] != last)
        s, e = best_spans(outputs["start_logits"].astype(jnp.float32), outputs["end_logits"].astype(jnp.float32),
                          context, self.max_answer_tokens)
        gs, ge = batch["start_positions"], batch["end_positions"]
        overlap = jnp.maximum(jnp.minimum(e, ge) - jnp.maximum(s, gs) + 1, 0).astype(jnp.float32)
        precision, recall = overlap / (e - s + 1), overlap / (ge - gs + 1)
        f1 = jnp.where(overlap > 0, 2 * precision * recall / jnp.maximum(precision + recall, 1e-9), 0.0)
        return {"loss": (self._ce(outputs, batch) * w).sum(), "start_accuracy": ((s == gs) * w).sum(),
                "end_accuracy": ((e == ge) * w).sum(), "exact_match": (((s == gs) & (e == ge)) * w).sum(),
                "f1": (f1 * w).sum(), "count": w.sum()}

    def predict(self, outputs):
        return jnp.stack([jnp.argmax(outputs["start_logits"], -1), jnp.argmax(outputs["end_logits"], -1)], -1)


__all__ = ["QuestionAnsweringTask", "SequenceClassificationTask", "TokenClassificationTask", "best_spans",
           "encode_qa", "encode_tagged", "ner_sentences", "qa_examples", "recipe_tokenizer", "sentiment_reviews"]
