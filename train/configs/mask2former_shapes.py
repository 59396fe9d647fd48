r"""Mask2Former (Swin-T layout, shrunk) on the generated panoptic scenes, through the training CLI.

    python -m train.main --config train/configs/mask2former_shapes.py --workdir /tmp/jaxformers_m2f

Data: the embedded ``panoptic_shapes`` set (``train/seg_data.py``: 4,000 train / 500 val generated
64x64 scenes, 3 thing + 3 stuff classes, crowd and void), flipped (masks move with the image) and
scaled to [-1, 1]. Model: ``mask2former_swin_tiny_coco_panoptic`` shrunk for a CPU: a Swin with
widths 32-256 and one block per stage (windows of 2 at 64 px), pixel decoder / queries 64 wide,
3 deformable encoder layers, 4 decoder layers, 16 queries. Task ``panoptic_segmentation``
(``train/tasks_seg.py``): Hungarian matching, point-sampled mask + dice losses, class loss with
no-object weight 0.1, deep supervision; evaluation reports PQ / SQ / RQ (all, things, stuff) and
mIoU on the val split. Arguments: ``steps``, ``batch``, ``smoke``.
"""
from train import config_lib, tasks_seg  # noqa: F401  (registers the task and the data set)
from train.seg_data import NUM_CLASSES, THING_IDS


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, steps=2000, batch=16)
    c = config_lib.base_config()
    c.model.name = "mask2former_swin_tiny_coco_panoptic"
    c.model.overrides = dict(
        num_classes=NUM_CLASSES, img_size=64, feature_size=64, mask_feature_size=64, hidden_dim=64,
        encoder_layers=3, encoder_ffn_dim=128, decoder_layers=4, num_heads=4, dim_feedforward=128, num_queries=16,
        backbone_overrides=dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=2,
                                drop_path_rate=0.0))
    c.task = "panoptic_segmentation"
    c.task_args = dict(num_classes=NUM_CLASSES, thing_classes=list(THING_IDS), criterion="mask2former",
                       criterion_args=dict(num_points=256))

    c.input.source = "embedded"
    c.input.dataset = "panoptic_shapes"
    c.input.train_split = "train"
    c.input.eval_split = "val"
    c.input.train_pp = "flip|value_range(-1, 1)"
    c.input.eval_pp = "value_range(-1, 1)"

    c.batch_size = args.batch
    c.eval_batch_size = 100
    c.num_train_steps = args.steps
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.grad_clip_norm = 1.0
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 50

    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.best_metric = "eval/PQ"
    c.best_mode = "max"
    c.smoke = args.smoke
    c.smoke_overrides = {"model": {"overrides": {"encoder_layers": 1, "decoder_layers": 2, "num_queries": 8}},
                         "task_args": {"criterion_args": {"num_points": 64}}}
    return c
