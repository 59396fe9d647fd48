r"""P2AT inference throughput: jaxformers (jit) against the official PyTorch model in the same run.

    python benchmarks/p2at_speed.py                          # p2at_s, batch 1, 256 x 512, CPU
    python benchmarks/p2at_speed.py --variant p2at_m --size 512 1024 --batch 2

Real-time segmentation is P2AT's claim ("P2AT: Pyramid Pooling Axial Transformer for Real-time
Semantic Segmentation", arXiv 2310.15025). The official model (mohamedac29/P2AT ``models/P2AT.py``,
inference build ``is_train=False``, random weights, ``eval()`` under ``torch.inference_mode``) is
looked up in ``$JAXFORMERS_EXT/P2AT`` (default /work/ext/P2AT: fetch the repository there; it needs
torchvision and torchsummary). Its state dict goes through ``convert_official_p2at``, so both run
the same weights; the script checks that their logits agree, then times them in turns (medians of
``--repeats`` runs each, after two warm-up calls each, the first of which compiles the XLA program). Torch uses as many intra-op
threads as XLA's CPU client sees cores (``--threads`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np


def _interleaved_medians(fns, repeats: int) -> list[float]:
    """Median seconds per call of each of ``fns``, timed in turns (A, B, A, B, ...) after two warm-up
    calls each, so that load from other processes on a shared machine hits both alike."""
    for fn in fns:
        fn()
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="p2at_s", choices=["p2at_s", "p2at_m", "p2at_l"])
    p.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()

    import torch

    import jaxformers as jf

    ext = pathlib.Path(os.environ.get("JAXFORMERS_EXT", "/work/ext")) / "P2AT"
    if not (ext / "models" / "P2AT.py").exists():
        sys.exit(f"the official P2AT code is not at {ext}: fetch mohamedac29/P2AT there")
    sys.path.insert(0, str(ext))
    from models.P2AT import P2AT as OfficialP2AT  # noqa: E402

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = {"p2at_s": "resnet18", "p2at_m": "resnet34", "p2at_l": "resnet50"}[args.variant]
    ref = OfficialP2AT(backbone, pretrained=False, num_classes=args.classes, is_train=False).eval()
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "p2at.pth"
        torch.save(ref.state_dict(), path)
        variables = jf.load_pretrained(args.variant, path, num_classes=args.classes)
    model = jf.create_model(args.variant, num_classes=args.classes)
    h, w = args.size
    x = np.random.default_rng(0).standard_normal((args.batch, h, w, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    xj = jax.device_put(x)
    forward = jax.jit(model.apply)

    with torch.inference_mode():
        ref_out = ref(xt).numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(forward(variables, xj))
    rel_err = float(np.abs(ours - ref_out).max() / np.abs(ref_out).max())

    def run_torch():
        with torch.inference_mode():
            ref(xt)

    t_jax, t_torch = _interleaved_medians([lambda: forward(variables, xj).block_until_ready(), run_torch],
                                          args.repeats)
    result = {"variant": args.variant, "batch": args.batch, "size": [h, w], "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "torch": torch.__version__, "torch_threads": args.threads,
              "jaxformers_img_per_s": round(args.batch / t_jax, 3), "official_img_per_s": round(args.batch / t_torch, 3),
              "speedup": round(t_torch / t_jax, 3), "max_rel_diff": rel_err}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
