r"""psMNIST-style LMUFormer: classify handwritten digits read one pixel at a time in a fixed random order.

    python -m train.main --config train/configs/lmuformer_psdigits.py --workdir /tmp/jaxformers_psdigits

The permuted-sequential MNIST protocol of the LMU and LMUFormer papers (pixels as a 1-channel sequence
under one fixed permutation, so no locality is left for the convolutions) on the embedded
scikit-learn digits: 8x8 images -> 64-step sequences, fixed 1,438 / 359 train/test split. Model:
``lmuformer_gsc`` re-sized for the task (1 input channel, width 64, LMU memory 64 with θ = 64 = the
sequence length, one block, 10 classes; 96,843 parameters); ``spiking=True`` in the overrides trains the
spiking variant. AdamW (lr 2e-3, weight decay 0.01), 50 warmup steps then cosine, 600 steps of 64.
Measured on a shared 2-core CPU: 75 s wall, test accuracy 96.38% (95.0% at step 300).
Arguments: ``steps``, ``batch``, ``spiking``, ``smoke``.
"""
from train import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, steps=600, batch=64, spiking=False)
    c = config_lib.base_config()
    c.model.name = "lmuformer_gsc"
    c.model.overrides = dict(num_classes=10, in_chans=1, embed_dim=64, theta=64.0, seq_len=64,
                             pixel_permutation_seed=0, spiking=args.spiking)
    c.task = "classification"
    c.task_args.label_smoothing = 0.0

    c.input.source = "embedded"
    c.input.dataset = "digits"
    c.input.train_pp = "value_range(0, 1)"
    c.input.eval_pp = "value_range(0, 1)"

    c.batch_size = args.batch
    c.eval_batch_size = 360 // 8 * 8
    c.num_train_steps = args.steps
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 50

    c.log_every_steps = 50
    c.eval_every_steps = 300
    c.checkpoint_every_steps = 300
    c.smoke = args.smoke
    c.smoke_overrides = {"model": {"overrides": {"embed_dim": 16, "mlp_ratio": 2.0}}}
    return c
