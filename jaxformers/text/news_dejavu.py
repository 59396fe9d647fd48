"""News Deja Vu: entity-masked bi-encoder search for historical news that tells the same story.

Paper: "News Deja Vu: Connecting Past and Present with Semantic Search", Franklin, Silcock, Arora,
Bryan and Dell, NLP+CSS 2024, arXiv 2406.15593; code: the ``newsdejavu`` package (0.0.3: ``ner/ner.py``,
``embed/embed.py``, ``query/query.py``, ``utils/wrangling.py``).

Pipeline, as the package does it:

1. **NER** (``ner``): a token-classification model (ours: ``Bert(head="token_classification")``) tags
   each token, and tokens are grouped into words and words into entities as transformers'
   ``pipeline("ner", aggregation_strategy="max", ignore_labels=[])`` does (``pipeline_words``): a word
   takes the label of its sub-token with the highest probability ("max"); consecutive words of one type
   form a group unless a word starts with ``B-`` (``group_entities``); "O" words form groups too
   (nothing is ignored); texts are the tokenizer's decoding of the tokens (an uncased tagger
   lower-cases them; "boston ." decodes to "boston.").
2. **Masking** (``mask_entities``): every group of type PER, ORG, LOC or MISC is replaced by
   ``[MASK]`` (or by its type name with ``all_masks_same=False``); a ``.``, ``,``, ``!`` or ``?`` at the
   start of the group's text is kept before the mask, one at its end after it; the groups' texts are
   joined with single spaces. Before encoding, ``[MASK]`` / ``[SEP]`` are rewritten to the embedding
   tokenizer's own mask token and separator (" </s> </s> " when it has an end-of-sequence token,
   else " [SEP] ") (``model_text``).
3. **Embed and search**: the bi-encoder embeds the masked texts; embeddings are L2-normalised and
   searched by inner product (faiss ``IndexFlatIP``: exact; ``search`` here, top-k of ``q @ cᵀ``).
4. **Training** (``train_same_story``): the same-story bi-encoder learns from pairs of articles on the
   same story (positives) and hard negatives: for each anchor the most similar article of another
   story under the starting model (``mine_hard_negatives``); the loss is in-batch softmax over
   positives and hard negatives (sentence-transformers' ``MultipleNegativesRankingLoss``, scale 20).
   The model card names positives and hard negatives but not the loss; MNRL is our choice.

``synthetic_news`` builds the offline evaluation the project uses: story templates (a trade deal, a
flood, an election...) written several ways, modern articles (queries) and historical articles (the
corpus) about the same kinds of story with *other* people, places and organisations, plus distractor
articles that reuse the query's entities in other stories: search must find the story, not the names.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers.text.encoders import Encoder, embed, module_inputs, text_batch
from jaxformers.text.training import Fitter, batched

LABELS_TO_MASK = ("PER", "ORG", "LOC", "MISC")
PUNCTUATION = (".", ",", "!", "?")


@dataclasses.dataclass(frozen=True)
class EntityGroup:
    """One aggregated group: its type ("PER", ..., or "O") and text."""

    entity_group: str
    word: str


def _tag(label: str) -> tuple[str, str]:
    """transformers' ``get_tag``: ("B", type) / ("I", type); anything else counts as "I" of itself."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def group_entities(words: Sequence[str], labels: Sequence[str], join=" ".join) -> list[EntityGroup]:
    """Word labels -> groups (transformers' ``group_entities``): a word joins the current group when its
    type equals the group's and it does not start with ``B-``; a group's text is ``join(words)`` (the
    pipeline uses the tokenizer's ``convert_tokens_to_string``)."""
    groups: list[tuple[str, list[str]]] = []
    for word, label in zip(words, labels):
        bi, tag = _tag(label)
        if groups and tag == groups[-1][0] and bi != "B":
            groups[-1][1].append(word)
        else:
            groups.append((tag, [word]))
    return [EntityGroup(tag, join(ws)) for tag, ws in groups]


def _mask_word(word: str, mask: str) -> str:
    if word[0] in PUNCTUATION:
        return word[0] + " " + mask
    if word[-1] in PUNCTUATION:
        return mask + word[-1]
    return mask


def mask_entities(groups: Sequence[EntityGroup], labels_to_mask: Sequence[str] = LABELS_TO_MASK,
                  all_masks_same: bool = True) -> str:
    """The masked text of one document (step 2): entity groups -> ``[MASK]`` (or their type name)."""
    return " ".join(_mask_word(g.word, "[MASK]" if all_masks_same else g.entity_group)
                    if g.entity_group in labels_to_mask else g.word for g in groups)


def model_text(text: str, tokenizer) -> str:
    """``[MASK]`` / ``[SEP]`` rewritten to ``tokenizer``'s tokens (``find_mask_token`` / ``find_sep_token``)."""
    specials = tokenizer.special_tokens
    roberta_style = specials.get("cls") == "<s>"
    sep = f" {specials['sep']} {specials['sep']} " if roberta_style else f" {specials['sep']} "
    return text.replace("[MASK]", specials.get("mask", "[MASK]")).replace("[SEP]", sep)


def word_labels(probs: np.ndarray, word_ids: Sequence[int | None], labels: Sequence[str]) -> list[str]:
    """aggregation_strategy="max": each word's label is that of its sub-token with the highest probability."""
    best: dict[int, tuple[float, int]] = {}
    for t, w in enumerate(word_ids):
        if w is None:
            continue
        score, label = float(probs[t].max()), int(probs[t].argmax())
        if w not in best or score > best[w][0]:
            best[w] = (score, label)
    return [labels[best[w][1]] for w in sorted(best)]


def pipeline_words(text: str, encoding, tokenizer) -> tuple[list[str], list[int | None]]:
    """Words of one encoded text as transformers' token-classification pipeline forms them
    (``gather_pre_entities`` + ``aggregate_words``): a token continues the previous word when it is a
    sub-word (WordPiece-style models: its string is longer than its text, e.g. ``##on``; other models: no
    space before it in the text); an unknown token stands for its text; a word's string is the tokenizer's
    ``convert_tokens_to_string`` of its tokens. Returns the words and each token's word index (None for
    special tokens)."""
    backend = tokenizer.backend
    join = backend.decoder.decode if backend.decoder is not None else " ".join
    prefix = getattr(backend.model, "continuing_subword_prefix", None)
    unk = backend.token_to_id(tokenizer.special_tokens["unk"]) if "unk" in tokenizer.special_tokens else None
    pieces: list[list[str]] = []
    word_ids: list[int | None] = []
    for token, token_id, (a, b), special in zip(encoding.tokens, encoding.ids, encoding.offsets,
                                                encoding.special_tokens_mask):
        if special:
            word_ids.append(None)
            continue
        ref = text[a:b]
        subword = len(token) != len(ref) if prefix else a > 0 and " " not in text[a - 1:a + 1]
        if token_id == unk:
            token, subword = ref, False
        if subword and pieces:
            pieces[-1].append(token)
        else:
            pieces.append([token])
        word_ids.append(len(pieces) - 1)
    return [join(p) for p in pieces], word_ids


def tag_words(tagger: Encoder, texts: Sequence[str], labels: Sequence[str],
              batch_size: int = 32) -> list[tuple[list[str], list[str]]]:
    """(words, word labels) of each text: the tagger's token labels aggregated per word ("max") over
    ``pipeline_words`` (texts longer than ``tagger.max_length`` tokens are truncated)."""
    from jaxformers.text.encoders import _batched

    tokenizer = tagger.tokenizer
    backend = tokenizer.backend
    enc = tokenizer.encode(list(texts), max_length=tagger.max_length, padding="max_length")
    logits = _batched(tagger, {k: np.asarray(v, np.int32) for k, v in enc.items()}, batch_size)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1))
    backend.enable_truncation(tagger.max_length)
    try:
        encodings = backend.encode_batch(list(texts))
    finally:
        backend.no_truncation()
    out = []
    for i, (text, e) in enumerate(zip(texts, encodings)):
        words, word_ids = pipeline_words(text, e, tokenizer)
        out.append((words, word_labels(probs[i], word_ids, labels)))
    return out


def ner(tagger: Encoder, texts: Sequence[str], labels: Sequence[str], batch_size: int = 32) -> list[list[EntityGroup]]:
    """Step 1 over raw texts, as ``pipeline("ner", aggregation_strategy="max", ignore_labels=[])`` does it
    with the same model and tokenizer (``tag_words``, then ``group_entities``)."""
    backend = tagger.tokenizer.backend
    join = backend.decoder.decode if backend.decoder is not None else " ".join
    return [group_entities(words, tags, join=join) for words, tags in tag_words(tagger, texts, labels, batch_size)]


def search(queries: np.ndarray, corpus: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of L2-normalised embeddings: (scores, indices) (Q, k) (faiss IndexFlatIP)."""
    q = queries / np.linalg.norm(queries, axis=-1, keepdims=True)
    c = corpus / np.linalg.norm(corpus, axis=-1, keepdims=True)
    scores, index = jax.lax.top_k(jnp.asarray(q @ c.T), min(k, len(c)))
    return np.asarray(scores), np.asarray(index)


def mine_hard_negatives(anchors: np.ndarray, pool: np.ndarray, anchor_story: Sequence[int],
                        pool_story: Sequence[int]) -> np.ndarray:
    """For each anchor, the index of the most similar pool article of another story."""
    a = anchors / np.linalg.norm(anchors, axis=-1, keepdims=True)
    p = pool / np.linalg.norm(pool, axis=-1, keepdims=True)
    sims = a @ p.T
    sims[np.asarray(anchor_story)[:, None] == np.asarray(pool_story)[None, :]] = -np.inf
    return sims.argmax(1)


def mnrl_loss(anchor: jax.Array, positive: jax.Array, negative: jax.Array | None = None, scale: float = 20.0) -> jax.Array:
    """MultipleNegativesRankingLoss: CE over scale x cos(anchor_i, [positives; negatives]) with target i."""
    norm = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    candidates = positive if negative is None else jnp.concatenate([positive, negative])
    scores = scale * norm(anchor.astype(jnp.float32)) @ norm(candidates.astype(jnp.float32)).T
    return optax.softmax_cross_entropy_with_integer_labels(scores, jnp.arange(anchor.shape[0])).mean()


def train_same_story(init: Encoder, anchors: Sequence[str], positives: Sequence[str], negatives: Sequence[str] | None,
                     *, epochs: int = 1, batch_size: int = 32, learning_rate: float = 2e-5, warmup_fraction: float = 0.1,
                     seed: int = 0, compiler_options: dict | None = None) -> tuple[Encoder, list[float]]:
    """Step 4: the bi-encoder on (anchor, positive[, hard negative]) triplets with ``mnrl_loss``."""
    tok, n = init.tokenizer, init.max_length
    data = {**text_batch(tok, anchors, n, "a_"), **text_batch(tok, positives, n, "p_")}
    if negatives is not None:
        data.update(text_batch(tok, negatives, n, "n_"))
    batches = batched(data, min(batch_size, len(anchors)), epochs=epochs, seed=seed)

    def loss(params, batch, key):
        def emb(prefix, k):
            args, kwargs = module_inputs(init.module, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                                         batch[prefix + "token_type_ids"])
            return init.module.apply({"params": params}, *args, **kwargs, train=True, rngs={"dropout": k})

        keys = jax.random.split(key, 3)
        neg = emb("n_", keys[2]) if "n_input_ids" in batch else None
        return mnrl_loss(emb("a_", keys[0]), emb("p_", keys[1]), neg)

    fitter = Fitter(loss, init.params, learning_rate=learning_rate, total_steps=len(batches),
                    warmup_steps=int(warmup_fraction * len(batches)), seed=seed, compiler_options=compiler_options)
    losses = fitter.run(batches)
    return init.replace(params=fitter.params), losses


# ----------------------------------------------------------------------------- generated news

PEOPLE = ("John Miller", "Mary Brown", "Robert Hayes", "Helen Clark", "James Porter", "Alice Morgan", "George Reed",
          "Ruth Collins", "Frank Walsh", "Edith Shaw", "Henry Ford", "Clara Young", "Walter Price", "Irene Lane",
          "Arthur Bell", "Grace Turner", "Samuel Cole", "Lillian Hart", "Thomas Grant", "Martha Webb")
PLACES = ("Chicago", "Boston", "New Orleans", "Denver", "Omaha", "Atlanta", "Seattle", "Detroit", "Memphis",
          "Richmond", "Portland", "Tulsa", "Albany", "Savannah", "Spokane", "Toledo")
ORGS = ("the Red Cross", "Union Pacific", "the Senate", "General Motors", "the Farmers Union", "the Navy",
        "Standard Oil", "the Federal Reserve", "the City Council", "the Steel Workers Union", "the Supreme Court",
        "Western Electric")
STORIES = (
    ("{PER} of {ORG} signed a trade agreement in {LOC} on Tuesday .",
     "In {LOC} , {ORG} and {PER} agreed to a new trade deal ."),
    ("Flood waters forced thousands from their homes in {LOC} , {PER} of {ORG} said .",
     "The river overflowed in {LOC} and {ORG} helped families escape the flood , according to {PER} ."),
    ("Workers of {ORG} went on strike in {LOC} demanding higher wages , led by {PER} .",
     "{PER} led a walkout at {ORG} in {LOC} as employees asked for better pay ."),
    ("{PER} won the mayoral election in {LOC} with the support of {ORG} .",
     "Voters in {LOC} elected {PER} as mayor after {ORG} endorsed the campaign ."),
    ("A fire destroyed a warehouse of {ORG} in {LOC} , {PER} reported .",
     "Flames consumed the {ORG} storage building in {LOC} overnight , {PER} told reporters ."),
    ("{ORG} opened a new hospital in {LOC} , {PER} announced .",
     "{PER} cut the ribbon as {ORG} unveiled a medical center in {LOC} ."),
    ("{PER} was arrested in {LOC} for stealing funds from {ORG} .",
     "Police in {LOC} detained {PER} , accused of embezzling money from {ORG} ."),
    ("An earthquake shook {LOC} and {ORG} sent rescue teams , {PER} said .",
     "{PER} said {ORG} dispatched rescuers after the ground trembled in {LOC} ."),
    ("{ORG} announced that {PER} will build a railroad line to {LOC} .",
     "A railway to {LOC} will be constructed by {PER} , {ORG} confirmed ."),
    ("Drought ruined the wheat harvest near {LOC} , {PER} of {ORG} warned .",
     "{PER} of {ORG} warned that dry weather destroyed crops around {LOC} ."),
    ("{PER} broke the swimming record in {LOC} at a meet organized by {ORG} .",
     "At the {ORG} competition in {LOC} , {PER} set a new swimming record ."),
    ("{ORG} raised taxes in {LOC} despite protests led by {PER} .",
     "{PER} led protests as {ORG} increased taxes in {LOC} ."),
)


def _fill(template: str, values: dict[str, str]) -> tuple[list[str], list[str]]:
    """Words and IOB2 tags of a template filled with entity values."""
    words, tags = [], []
    for piece in template.split():
        if piece in ("{PER}", "{ORG}", "{LOC}"):
            kind = piece[1:-1]
            name = values[kind].split()
            words += name
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
        else:
            words.append(piece)
            tags.append("O")
    return words, tags


def _entities(rng, avoid: tuple[str, ...] = ()) -> dict[str, str]:
    pick = lambda pool: [x for x in pool if x not in avoid][rng.integers(len([x for x in pool if x not in avoid]))]  # noqa: E731
    return {"PER": pick(PEOPLE), "ORG": pick(ORGS), "LOC": pick(PLACES)}


def synthetic_news(seed: int = 0, train_stories: int = 8, queries_per_story: int = 6,
                   distractors_per_query: int = 3, ner_sentences: int = 400) -> dict[str, Any]:
    """The generated set: ``ner`` (words, tags) for tagger training; ``train`` same-story pairs (anchor,
    positive, story id) on the first ``train_stories`` story kinds; an evaluation on the others:
    ``queries`` (modern articles), ``corpus`` (one historical article per story kind with other entities,
    plus, for each query, other story kinds told with the query's own entities), ``relevance`` (Q, C):
    1 where the corpus article tells the query's kind of story."""
    rng = np.random.Generator(np.random.PCG64(seed))
    ner_data = []
    for _ in range(ner_sentences):
        story = STORIES[rng.integers(len(STORIES))]
        ner_data.append(_fill(story[rng.integers(2)], _entities(rng)))
    train = []
    for s in range(train_stories):
        for _ in range(queries_per_story * 4):
            a, b = _entities(rng), _entities(rng)
            version = int(rng.integers(2))
            train.append((" ".join(_fill(STORIES[s][version], a)[0]), " ".join(_fill(STORIES[s][1 - version], b)[0]), s))
    eval_stories = list(range(train_stories, len(STORIES)))
    corpus, corpus_story, queries, query_story = [], [], [], []
    for s in eval_stories:
        corpus.append(" ".join(_fill(STORIES[s][1], _entities(rng))[0]))
        corpus_story.append(s)
    for s in eval_stories:
        for _ in range(queries_per_story):
            values = _entities(rng)
            queries.append(" ".join(_fill(STORIES[s][0], values)[0]))
            query_story.append(s)
            others = [o for o in eval_stories if o != s]
            for o in rng.permutation(others)[:distractors_per_query]:
                corpus.append(" ".join(_fill(STORIES[int(o)][1], values)[0]))  # the query's names, another story
                corpus_story.append(int(o))
    relevance = (np.asarray(query_story)[:, None] == np.asarray(corpus_story)[None, :]).astype(np.float32)
    return {"ner": ner_data, "train": train, "queries": queries, "corpus": corpus, "relevance": relevance,
            "query_story": query_story, "corpus_story": corpus_story}
