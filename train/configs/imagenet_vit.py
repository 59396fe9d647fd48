r"""ImageNet-1k from a prepared TFDS directory with the DeiT recipe (no distillation), any registered model.

    python -m train.main --config train/configs/imagenet_vit.py:model=vit_small_patch16_224 \
        --workdir /ckpt/deit_s --config.input.data_dir=/data/tensorflow_datasets

Prepare the data once (needs tensorflow and the manually downloaded ImageNet archives):
``tfds build imagenet2012 --file_format=array_record --data_dir=/data/tensorflow_datasets``;
training reads it with ``tfds.data_source`` + grain, without TensorFlow.

Recipe (DeiT, Touvron et al. 2021, Table 9): AdamW, lr 5e-4 x batch/512, weight decay 0.05,
5 warmup epochs then cosine, 300 epochs, label smoothing 0.1, stochastic depth 0.1, random-resized
crop + flip, EMA of weights (0.99996), bf16 compute with float32 master weights.
Deviations: RandAugment, mixup/cutmix and random erasing are not implemented yet, so expect a
lower top-1 than DeiT's (79.8% for ViT-S) until they are.
Arguments: ``model``, ``batch``, ``epochs``, ``image``, ``smoke``.
"""
from train import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, model="vit_small_patch16_224", batch=1024, epochs=300, image=224, smoke=False)
    c = config_lib.base_config()
    c.model.name = args.model
    c.model.overrides = {"drop_path_rate": 0.1, "num_classes": 1000}
    c.task = "classification"
    c.task_args.label_smoothing = 0.1

    c.input.source = "tfds"
    c.input.dataset = "imagenet2012"
    c.input.train_split = "train"
    c.input.eval_split = "validation"
    c.input.train_pp = f"decode|random_resized_crop({args.image})|flip|normalize"
    c.input.eval_pp = f"decode|resize_small({int(args.image / 0.875)})|center_crop({args.image})|normalize"
    c.input.num_threads = 16
    c.input.prefetch = 4

    c.batch_size = args.batch
    c.eval_batch_size = 1024
    c.num_epochs = float(args.epochs)
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 5e-4 * args.batch / 512
    c.optimizer.weight_decay = 0.05
    c.optimizer.grad_clip_norm = 0.0
    c.schedule.name = "cosine"
    c.schedule.warmup_fraction = 5 / args.epochs
    c.schedule.end_factor = 1e-5 / 5e-4
    c.ema_decay = 0.99996
    c.compute_dtype = "bfloat16"

    c.log_every_steps = 100
    c.eval_every_steps = 1251  # ~ one epoch at batch 1024
    c.checkpoint_every_steps = 1251
    c.keep_checkpoints = 3
    c.best_metric = "eval_ema/accuracy"
    c.smoke = args.smoke
    c.smoke_overrides = {
        "model": {"overrides": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 4}},
        "input": {"train_pp": "decode|random_resized_crop(32)|flip|normalize",
                  "eval_pp": "decode|resize_small(36)|center_crop(32)|normalize", "num_threads": 1},
        "compute_dtype": "float32", "ema_decay": 0.9, "num_train_steps": 4,
    }
    return c
