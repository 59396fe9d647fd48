"""Tokenisation for BERT-family models, over the Rust ``tokenizers`` library.

``Tokenizer.from_pretrained(dir)`` reads a Hugging Face directory: ``tokenizer.json`` when present,
else ``vocab.txt`` (BERT WordPiece, lower-casing from ``tokenizer_config.json``) or ``vocab.json`` +
``merges.txt`` (RoBERTa byte-level BPE). ``encode`` returns numpy arrays ready for ``Bert``:
``input_ids``, ``attention_mask``, ``token_type_ids``, and optionally character ``offsets`` and
``sequence_ids`` (which text each token came from; QA answer decoding uses both).
Padding and truncation baked into a ``tokenizer.json`` are ignored: each call states its own.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Literal, Sequence

import numpy as np

Padding = Literal["longest", "max_length", False]


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - exercised only without the dependency
        raise ImportError("jaxformers.text.Tokenizer needs the `tokenizers` package: pip install tokenizers") from e
    return tokenizers


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special tokens BERT-family models need."""

    def __init__(self, backend: Any, *, model_max_length: int = 512):
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        self.model_max_length = model_max_length
        vocab = backend.get_vocab()
        roberta = "<s>" in vocab and "[CLS]" not in vocab
        names = (dict(cls="<s>", sep="</s>", pad="<pad>", mask="<mask>", unk="<unk>") if roberta else
                 dict(cls="[CLS]", sep="[SEP]", pad="[PAD]", mask="[MASK]", unk="[UNK]"))
        self.special_tokens = {k: v for k, v in names.items() if v in vocab}
        for key in ("cls", "sep", "pad"):
            if key not in self.special_tokens:
                raise ValueError(f"the vocabulary has no {names[key]!r} token; not a BERT/RoBERTa tokenizer")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a HF model directory (tokenizer.json, vocab.txt or vocab.json + merges.txt)."""
        tk = _require_tokenizers()
        d = pathlib.Path(path)
        cfg = {}
        if (d / "tokenizer_config.json").is_file():
            cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        max_len = cfg.get("model_max_length", 512)
        max_len = 512 if not isinstance(max_len, int) or max_len > 1_000_000 else max_len
        if (d / "tokenizer.json").is_file():
            return cls(tk.Tokenizer.from_file(os.fspath(d / "tokenizer.json")), model_max_length=max_len)
        if (d / "vocab.txt").is_file():
            return cls.from_vocab(d / "vocab.txt", lowercase=cfg.get("do_lower_case", True), model_max_length=max_len)
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            from tokenizers import processors
            from tokenizers.implementations import ByteLevelBPETokenizer

            bpe = ByteLevelBPETokenizer(os.fspath(d / "vocab.json"), os.fspath(d / "merges.txt"),
                                        add_prefix_space=cfg.get("add_prefix_space", False), trim_offsets=True)
            backend = bpe._tokenizer
            vocab = backend.get_vocab()
            backend.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]))
            return cls(backend, model_max_length=max_len)
        raise FileNotFoundError(f"no tokenizer.json, vocab.txt or vocab.json + merges.txt in {os.fspath(d)!r}")

    @classmethod
    def from_vocab(cls, vocab: str | os.PathLike | Sequence[str], *, lowercase: bool = True,
                   model_max_length: int = 512) -> "Tokenizer":
        """BERT WordPiece from a ``vocab.txt`` path or a list of tokens (which must hold the specials)."""
        _require_tokenizers()
        from tokenizers.implementations import BertWordPieceTokenizer

        if not isinstance(vocab, (str, os.PathLike)):
            vocab = {tok: i for i, tok in enumerate(vocab)}
        else:
            vocab = os.fspath(vocab)
        wp = BertWordPieceTokenizer(vocab, lowercase=lowercase, strip_accents=None if lowercase else False)
        return cls(wp._tokenizer, model_max_length=model_max_length)

    def save(self, path: str | os.PathLike) -> None:
        """Writes ``tokenizer.json`` (+ a minimal ``tokenizer_config.json``) into directory ``path``."""
        d = pathlib.Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(os.fspath(d / "tokenizer.json"))
        cfg = {"model_max_length": self.model_max_length,
               **{f"{k}_token": v for k, v in self.special_tokens.items()}}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, kind: str) -> int:
        """Id of a special token: "cls", "sep", "pad", "mask" or "unk"."""
        if kind not in self.special_tokens:
            raise KeyError(f"this tokenizer has no {kind!r} token (has {sorted(self.special_tokens)})")
        return self.backend.token_to_id(self.special_tokens[kind])

    @property
    def pad_token_id(self) -> int:
        return self.token_id("pad")

    @property
    def mask_token_id(self) -> int:
        return self.token_id("mask")

    # ------------------------------------------------------------------ encode / decode
    def encode(
        self,
        texts: str | Sequence[str],
        text_pairs: Sequence[str] | None = None,
        *,
        max_length: int | None = None,
        padding: Padding = "longest",
        truncation: bool = True,
        return_offsets: bool = False,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Token ids (B, L) int32 with ``attention_mask`` and ``token_type_ids``.

        ``text_pairs`` makes [CLS] a [SEP] b [SEP] pairs (cross-encoders, QA, NSP). ``max_length``
        defaults to the model's ``model_max_length``; ``padding="max_length"`` pads to it,
        ``"longest"`` to the longest in the batch, ``False`` returns ragged lists. With
        ``return_offsets``: ``offsets`` (B, L, 2) character spans and ``sequence_ids`` (B, L):
        0 / 1 for tokens of the first / second text, -1 for special and padding tokens.
        """
        if isinstance(texts, str):
            texts = [texts]
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError(f"text_pairs has {len(text_pairs)} entries but texts has {len(texts)}")
        max_length = max_length or self.model_max_length
        if truncation:
            self.backend.enable_truncation(max_length)
        else:
            self.backend.no_truncation()
        inputs = list(texts) if text_pairs is None else list(zip(texts, text_pairs))
        encodings = self.backend.encode_batch(inputs)
        if not truncation and any(len(e.ids) > max_length for e in encodings):
            raise ValueError(f"a text encodes to more than max_length={max_length} tokens; pass truncation=True")
        fields = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        if return_offsets:
            fields["offsets"] = [e.offsets for e in encodings]
            fields["sequence_ids"] = [[-1 if s is None else s for s in e.sequence_ids] for e in encodings]
        if padding is False:
            return fields
        length = max_length if padding == "max_length" else max(len(x) for x in fields["input_ids"])
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0, "offsets": (0, 0),
                      "sequence_ids": -1}
        out = {}
        for name, rows in fields.items():
            padded = [list(r) + [pad_values[name]] * (length - len(r)) for r in rows]
            out[name] = np.asarray(padded, dtype=np.int32)
        return out

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                   skip_special_tokens=skip_special_tokens)

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of ``text`` without special tokens."""
        return self.backend.encode(text, add_special_tokens=False).tokens

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        return self.encode(*args, **kwargs)
