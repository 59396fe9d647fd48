"""Mask2Former on the ResNet-50 backbone: parameter counts of the COCO panoptic and ADE20K semantic
configs, the model's outputs on a tiny ResNet."""
from __future__ import annotations

import jax

import jaxformers as jf
from tests.helpers import image

# transformers' Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=ResNetConfig(depths=[3, 4, 6, 3],
# hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck", out_features=stage1..4), num_labels=133)), run on
# CPU (transformers 5): 44,036,998 parameters, of which the backbone's 23,508,032 (timm resnet50 without fc).
HF_R50_COCO = 44_036_998


def test_param_counts_equal_transformers():
    assert jf.count_params("mask2former_r50_coco_panoptic") == HF_R50_COCO
    # ADE20K: 150 classes instead of 133, so the class Linear(256 -> C + 1) has 17 more outputs.
    assert jf.count_params("mask2former_r50_ade20k_semantic") == HF_R50_COCO + 17 * 257
    info = jf.model_info("mask2former_r50_ade20k_semantic")
    assert (info.task, info.metric, info.input_size) == ("semantic segmentation", "mIoU", (512, 512, 3))


def test_outputs_on_a_tiny_resnet():
    model = jf.create_model("mask2former_r50_coco_panoptic", num_classes=6, feature_size=32, mask_feature_size=32,
                            hidden_dim=32, encoder_layers=1, encoder_ffn_dim=64, decoder_layers=2, num_heads=2,
                            dim_feedforward=64, num_queries=4,
                            backbone_overrides=dict(depth=(1, 1, 1, 1), channels=(8, 8, 16, 16)))
    x = image(2, 64)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(model.apply, variables, x)
    assert out["class_queries_logits"].shape == (2, 4, 7) and out["masks_queries_logits"].shape == (2, 4, 16, 16)
    assert "batch_stats" in variables  # the ResNet's BatchNorm statistics
