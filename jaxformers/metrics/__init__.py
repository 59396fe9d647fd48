"""Evaluation metrics that are not tied to one model: captioning scores (``jaxformers.metrics.captioning``)."""
from jaxformers.metrics.captioning import bleu, box_iou_3d, cider_d, dense_caption_scores, meteor, rouge_l

__all__ = ["bleu", "cider_d", "rouge_l", "meteor", "dense_caption_scores", "box_iou_3d"]
