"""optax optimizers and learning-rate schedules from ``config.optimizer`` / ``config.schedule``.

AdamW, LAMB and SGD with momentum; linear warmup followed by cosine, linear, constant or multi-step decay
(PyTorch's ``MultiStepLR``: the rate times ``schedule.gamma`` at each of ``schedule.milestones``, given as
fractions of the run so one config scales to any number of steps);
global-norm clipping; weight decay only on weight matrices/kernels (never on biases, norm scales,
or parameters whose path contains a name from ``optimizer.no_decay_names``, e.g. position
embeddings and class tokens), which is the timm / DeiT convention.
"""
from __future__ import annotations

from typing import Any

import jax
import optax

__all__ = ["make_schedule", "make_optimizer", "decay_mask"]


def make_schedule(config: Any, total_steps: int) -> optax.Schedule:
    """Warmup (``schedule.warmup_steps``, or ``warmup_fraction`` of the run) then the decay."""
    s, peak = config.schedule, config.optimizer.learning_rate
    warmup = s.warmup_steps or int(round(s.warmup_fraction * total_steps))
    warmup = min(warmup, max(total_steps - 1, 0))
    end = peak * s.end_factor
    decay_steps = max(total_steps - warmup, 1)
    if s.name == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=s.end_factor)
    elif s.name == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif s.name == "constant":
        decay = optax.constant_schedule(peak)
    elif s.name == "multistep":
        if not s.milestones or any(not 0 < m < 1 for m in s.milestones):
            raise ValueError(f"schedule.milestones must be fractions of the run in (0, 1), got {s.milestones!r}")
        # Milestones count from the run's first step, warmup included (as MultiStepLR counts iterations).
        boundaries = {}
        for m in s.milestones:
            step = max(int(round(m * total_steps)) - warmup, 0)
            boundaries[step] = boundaries.get(step, 1.0) * s.gamma
        decay = optax.piecewise_constant_schedule(peak, boundaries)
    else:
        raise ValueError(f"schedule.name must be 'cosine', 'linear', 'constant' or 'multistep', got {s.name!r}")
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any, no_decay_names: tuple[str, ...] = ()) -> Any:
    """True for parameters that get weight decay: rank >= 2 and no ``no_decay_names`` in the path."""

    def one(path, leaf):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return leaf.ndim >= 2 and not any(n and n in name for n in no_decay_names)

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Clipping + the optimizer named by ``optimizer.name``, with the decay mask applied."""
    o = config.optimizer
    mask = lambda params: decay_mask(params, tuple(o.no_decay_names))  # noqa: E731
    if o.name == "adamw":
        opt = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
    elif o.name == "lamb":
        opt = optax.lamb(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
    elif o.name == "sgd":
        opt = optax.chain(optax.add_decayed_weights(o.weight_decay, mask=mask) if o.weight_decay else optax.identity(),
                          optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov))
    else:
        raise ValueError(f"optimizer.name must be 'adamw', 'lamb' or 'sgd', got {o.name!r}")
    clip = optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm and o.grad_clip_norm > 0 else optax.identity()
    return optax.chain(clip, opt)
