"""Text utilities for the BERT family: tokenisation (``tokenizers``), packing variable-length
sequences, retrieval metrics, extractive-QA decoding and Hugging Face config I/O."""
from jaxformers.text.packing import PackedBatch, pack_sequences, pad_sequences, segment_index, unpack
from jaxformers.text.qa import Answer, decode_answer
from jaxformers.text.retrieval import mrr_at_k, ndcg_at_k, recall_at_k, retrieval_metrics
from jaxformers.text.tokenizer import Tokenizer

__all__ = ["Answer", "PackedBatch", "Tokenizer", "decode_answer", "mrr_at_k", "ndcg_at_k", "pack_sequences",
           "pad_sequences", "recall_at_k", "retrieval_metrics", "segment_index", "unpack"]
