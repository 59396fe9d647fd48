r"""MP3 pretraining on digits: a ViT without position embeddings learns where each patch of a digit goes.

    python -m train.main --config train/configs/mp3_digits.py --workdir /tmp/jaxformers_mp3

Data: the embedded scikit-learn digits upsampled to 32x32 (fixed 1,438 / 359 split; labels unused).
Model: ``mp3_vit_small_patch16_224`` shrunk to 32x32 images with 4x4 patches (64 positions), width 64,
4 blocks of 4 heads; 75% of the patches hidden from the keys and values during training. Task
``position_prediction`` (``train/tasks_positions.py``): cross-entropy over the 64 positions, metric the
fraction of patches placed exactly (chance 1/64). Fine-tuning then goes through
``jaxformers.models.mp3.to_vit`` (encoder weights + a new position table and head). Arguments:
``steps``, ``batch``, ``smoke``.
"""
from train import config_lib, tasks_positions  # noqa: F401  (registers the task)


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, steps=1000, batch=64)
    c = config_lib.base_config()
    c.model.name = "mp3_vit_small_patch16_224"
    c.model.overrides = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                             masking_ratio=0.75, num_classes=0)  # 0: position logits, not digit classes
    c.task = "position_prediction"
    c.task_args = {}

    c.input.source = "embedded"
    c.input.dataset = "digits"
    c.input.train_pp = "resize(32)|to_rgb|value_range(-1, 1)"
    c.input.eval_pp = "resize(32)|to_rgb|value_range(-1, 1)"

    c.batch_size = args.batch
    c.eval_batch_size = 360 // 8 * 8
    c.num_train_steps = args.steps
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.05
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 100

    c.log_every_steps = 100
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.smoke = args.smoke
    c.smoke_overrides = {"model": {"overrides": {"depth": 1, "embed_dim": 32}}}
    return c
