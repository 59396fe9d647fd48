"""Text utilities for the BERT family: tokenisation (``tokenizers``), packing variable-length
sequences, retrieval metrics, extractive-QA decoding and Hugging Face config I/O."""
from jaxformers.text.packing import PackedBatch, pack_sequences, pad_sequences, segment_index, unpack
from jaxformers.text.metrics import entity_f1, get_entities, spearman, squad_metrics, squad_scores
from jaxformers.text.qa import Answer, char_span_to_tokens, decode_answer
from jaxformers.text.retrieval import mrr_at_k, ndcg_at_k, recall_at_k, retrieval_metrics
from jaxformers.text.tokenizer import Tokenizer

__all__ = ["Answer", "PackedBatch", "Tokenizer", "char_span_to_tokens", "decode_answer", "entity_f1", "get_entities",
           "spearman", "squad_metrics", "squad_scores", "mrr_at_k", "ndcg_at_k", "pack_sequences",
           "pad_sequences", "recall_at_k", "retrieval_metrics", "segment_index", "unpack"]
