r"""DuoFormer on real histology tiles: grade the DAB staining of an immunohistochemistry micrograph.

    python -m train.main --config train/configs/duoformer_histology.py --workdir /tmp/jaxformers_duoformer

Data: the embedded ``ihc_tiles`` (``train/histology_data.py``): 64 x 64 tiles of scikit-image's
immunohistochemistry photograph (colon tissue, DAB + hematoxylin), labelled weak / moderate / strong
DAB staining by the tertiles of their mean DAB optical density after colour deconvolution (labels
derived from the image, not from a pathologist); 609 training tiles from the top 384 rows, 145 test
tiles from the bottom 128 rows (no overlap); random flips. Model: ``duoformer_4scale_r50`` (scale
attention over 1 + 4 + 16 + 64 tokens plus the scale token per patch, then patch attention) shrunk to
fit a CPU: a ResNet trunk of one bottleneck per stage (widths 16 / 32 / 64 / 128) trained with the rest
(``freeze_backbone=False``: there are no pretrained weights offline; with a converted ImageNet
ResNet-50 the official default ``freeze_backbone=True`` applies), 2 blocks of width 64 and 4 heads,
2 x 2 patches of 86 tokens. AdamW (lr 1e-3, weight decay 0.05, clipping at 1.0), 30 warmup steps
then cosine, 300 steps of 32. Measured on the shared 2-core CPU: 1.6M parameters,
309 s wall, test accuracy 93.1% (majority class 55.9%); the trunk alone (``baseline=True``) 95.9% in
80 s (benchmarks/RESULTS.md). Arguments: ``steps``, ``batch``, ``smoke`` and ``baseline`` (True: the
same ResNet trunk alone, ``resnet50`` shrunk the same way with its pool + linear head, same recipe).
"""
from train import config_lib, histology_data  # noqa: F401  (registers the embedded data set)


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, steps=300, batch=32, baseline=False)
    c = config_lib.base_config()
    c.model.name = "duoformer_4scale_r50"
    c.model.overrides = dict(img_size=64, depth=2, embed_dim=64, num_heads=4, num_classes=3,
                             backbone_depth=(1, 1, 1, 1), backbone_channels=(16, 32, 64, 128), freeze_backbone=False)
    if args.baseline:
        c.model.name = "resnet50"
        c.model.overrides = dict(img_size=64, depth=(1, 1, 1, 1), channels=(16, 32, 64, 128), num_classes=3,
                                 zero_init_last=False)
    c.task = "classification"

    c.input.source = "embedded"
    c.input.dataset = "ihc_tiles"
    c.input.train_pp = "flip|value_range(-1, 1)"
    c.input.eval_pp = "value_range(-1, 1)"

    c.batch_size = args.batch
    c.eval_batch_size = 145 // 8 * 8 + 8
    c.num_train_steps = args.steps
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.grad_clip_norm = 1.0
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 30

    c.log_every_steps = 50
    c.eval_every_steps = 150
    c.checkpoint_every_steps = 150
    c.smoke = args.smoke
    if not args.baseline:
        c.smoke_overrides = {"model": {"overrides": {"depth": 1, "embed_dim": 32, "num_heads": 2}}}
    return c
