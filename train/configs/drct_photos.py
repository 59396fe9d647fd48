r"""DRCT x4 super-resolution on scikit-image photographs, through the training CLI.

    python -m train.main --config train/configs/drct_photos.py --workdir /tmp/jaxformers_drct

Data: the embedded ``sr_photos`` set (``train/super_resolution.py``): 2,000 random 64x64 crops of four
scikit-image photographs (astronaut, rocket, Hubble deep field, immunohistochemistry) with their 16x16
bicubic downsamplings for training, 100 crops of two other photographs (chelsea, coffee) held out; images
in [0, 1], as DRCT expects. Model: ``drct_x4`` shrunk for a CPU: embed 60, growth 16, two residual
dense groups of five Swin blocks (heads 6/2/4/6/2), window 8. Task ``super_resolution``: L1 loss (the
official recipe: Adam, lr 2e-4, betas (0.9, 0.99), the rate halved at 50/80/90/95 % of the run as its
MultiStepLR at 250k/400k/450k/475k of 500k iterations); evaluation reports PSNR and SSIM on Y with a
4-pixel border crop, for the model and for bicubic upsampling of the same inputs. Arguments:
``steps``, ``batch``, ``smoke``.
"""
from train import config_lib, super_resolution  # registers the task and the data set


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, steps=2000, batch=16)
    c = config_lib.base_config()
    c.model.name = "drct_x4"
    c.model.overrides = dict(embed_dim=60, gc=16, depths=(6, 6), num_heads=(6, 6), window_size=8, img_size=16,
                             drop_path_rate=0.0)
    c.task = "super_resolution"
    c.task_args = dict(scale=4)

    c.input.source = "embedded"
    c.input.dataset = "sr_photos"
    c.input.train_split = "train"
    c.input.eval_split = "test"
    c.input.train_pp = ""
    c.input.eval_pp = ""

    c.batch_size = args.batch
    c.eval_batch_size = 100
    c.num_train_steps = args.steps
    c.optimizer.name = "adamw"
    c.optimizer.weight_decay = 0.0  # Adam
    c.optimizer.learning_rate = 2e-4
    c.optimizer.b2 = 0.99
    c.schedule.name = "multistep"
    c.schedule.milestones = super_resolution.OFFICIAL_MILESTONES
    c.schedule.gamma = 0.5
    c.schedule.warmup_steps = 0

    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.best_metric = "eval/psnr"
    c.best_mode = "max"
    c.smoke = args.smoke
    c.smoke_overrides = {"model": {"overrides": {"embed_dim": 24, "gc": 8, "depths": (1,), "num_heads": (3,)}}}
    return c
