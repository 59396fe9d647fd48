"""Segmentation building blocks shared by the mask-transformer models: the panoptic target layout,
Hungarian matching, Mask2Former's and kMaX-DeepLab's set criteria, panoptic / semantic inference and the metrics
(COCO panoptic quality, mIoU)."""
from jaxformers.segmentation.inference import (mask2former_probs, panoptic_inference, semantic_inference,
                                               upsample_masks)
from jaxformers.segmentation.kmax_loss import KMaXLossConfig, kmax_loss, kmax_match, kmax_probs
from jaxformers.segmentation.losses import Mask2FormerLossConfig, mask2former_loss
from jaxformers.segmentation.matching import hungarian_match
from jaxformers.segmentation.metrics import miou, panoptic_quality_stats, pq_summary, semantic_stats
from jaxformers.segmentation.prompted import sam_unet_loss
from jaxformers.segmentation.semantic import (ohem_cross_entropy, resize_logits, semantic_cross_entropy,
                                              semantic_prediction)
from jaxformers.segmentation.targets import VOID, check_panoptic, panoptic_targets

__all__ = ["VOID", "KMaXLossConfig", "Mask2FormerLossConfig", "check_panoptic", "hungarian_match", "kmax_loss",
           "kmax_match", "kmax_probs", "mask2former_loss",
           "mask2former_probs", "miou", "ohem_cross_entropy", "panoptic_inference", "panoptic_quality_stats",
           "panoptic_targets", "pq_summary", "resize_logits", "sam_unet_loss", "semantic_cross_entropy",
           "semantic_inference", "semantic_prediction", "semantic_stats", "upsample_masks"]
