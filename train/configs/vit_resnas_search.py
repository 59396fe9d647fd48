r"""ViT-ResNAS search on the embedded digits: supernet training, evolutionary search within a MAC budget,
the searched network fine-tuned with its inherited weights (``train/vit_resnas_search.py``).

    python -m train.vit_resnas_search --config train/configs/vit_resnas_search.py --workdir /tmp/resnas
    python -m train.vit_resnas_search --config train/configs/vit_resnas_search.py:smoke --workdir /tmp/resnas_smoke

The official recipe (yilunliao/vit-search ``scripts/vit-sr-nas/super_net/tiny.sh``, ``evo_search.py``): the
``sr_tiny_mh`` supernet trained 300 epochs on ImageNet with 4 examples per sampled architecture and a
warm-up on the widest choices, then 20 search iterations over a population of 500 (75 parents, 75
mutations and 75 crossovers per iteration, mutation probability 0.3) under a MAC budget. Here the
two-stage ``digits`` supernet (56 px: 4x4 then 2x2 tokens) and a smaller search.
Arguments: ``smoke``, ``budget`` (fraction of the supernet's MACs).
"""
from train import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, budget=0.7)
    c = config_lib.base_config()
    c.model.name = "vit_resnas_tiny"
    c.input.source = "embedded"
    c.input.dataset = "digits"
    c.img_size = 56
    c.batch_size = 64
    c.seed = 0
    c.search = dict(
        space="digits",
        example_per_arch=4,          # official: 4 examples share one sampled architecture
        warmup_steps=100, warmup_choices=1,
        supernet_steps=1500, lr=2e-3,
        val_examples=256,            # held out of the training split to score candidates
        macs_fraction=args.budget,
        iterations=5, population=50, parents=10, mutations=10, crossovers=10, mutate_prob=0.3,
        finetune_steps=300,
    )
    c.smoke = args.smoke
    if args.smoke:
        c.batch_size = 16
        c.search.update(warmup_steps=2, supernet_steps=4, val_examples=32, iterations=1, population=4, parents=2,
                        mutations=2, crossovers=2, finetune_steps=0)  # fine-tuning: the same fit as the supernet
    return c
