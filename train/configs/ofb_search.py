r"""OFB (Once for Both) search: compress a trained DeiT toward a FLOPs target, export the subnet.

    python -m train.ofb_search --config train/configs/ofb_search.py --workdir /tmp/ofb
    python -m train.ofb_search --config train/configs/ofb_search.py:smoke --workdir /tmp/ofb_smoke

The official recipe (HankYe/Once-for-Both ``exp_sh/run_exp.sh``, DeiT-S on ImageNet): 100 search
epochs, 20 of warm-up (w_p 0.99 -> 0.1), AdamW weights (blr 2.5e-4 at batch 1024) and AdamW
architecture logits (betas 0.5/0.999, weight decay 1e-3), loss weights 0.5 / 0.5 / 0.5 and FLOPs 5,
compression threshold 0.2 about three times per epoch, then 300 fine-tuning epochs. Here the same
search on the embedded digits (a host DeiT-T shrunk to 32x32 trained first for ``host_steps``, or
loaded from ``ofb.host_checkpoint``), with the FLOPs target as a fraction of the host's.
Arguments: ``smoke``, ``target`` (fraction of the host's FLOPs), ``epochs``.
"""
from train import config_lib


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False, target=0.5, epochs=40)
    c = config_lib.base_config()
    c.model.name = "deit_tiny_patch16_224"
    c.model.overrides = dict(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4, num_classes=10)
    c.input.source = "embedded"
    c.input.dataset = "digits"
    c.batch_size = 128
    c.seed = 0
    c.ofb = dict(
        host_checkpoint="",            # a timm-format state dict of the host; empty: train it first
        host_steps=1200,
        target_fraction=args.target,   # FLOPs target / host FLOPs (official get_flops formula)
        epochs=args.epochs,
        warmup_epochs=max(args.epochs // 5, 1),   # official 20 of 100
        lr=5e-4, lr_arch=2e-2, thresh=0.2,
        w_head=0.5, w_mlp=0.5, w_embed=0.5, w_flops=5.0, label_smoothing=0.1,
        finetune_steps=600,
        max_search_steps=0,            # 0: epochs x steps per epoch
    )
    c.smoke = args.smoke
    if args.smoke:
        c.model.overrides = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10)
        c.ofb.update(host_steps=10, epochs=1, warmup_epochs=1, finetune_steps=4, max_search_steps=6)
        c.batch_size = 64
    return c
