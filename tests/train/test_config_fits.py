"""Configs wired as ``python -m train.main`` wires them, for those no CLI run in the tests covers: the config
(smoke and full) resolves, and its model, task and input pipeline fit together: one training-mode loss on a
real batch traces with the task's loss terms (``jax.eval_shape``: nothing compiles).

- ``mask2former_shapes``: the loss falling on the generated scenes is ``tests/models/test_mask2former.py``'s
  training test. A 10-step CLI run of the smoke config (loss below 0.75x its first value, PQ and mIoU
  reported) took about 2 minutes on 2 cores, mostly compiling the sharded step over 8 simulated devices:
  over the CI budget, so it is not repeated here.
- ``drct_photos``: training above bicubic is ``benchmarks/drct_sr.py`` / notebook 13; here also its
  learning rate, the official MultiStepLR at fractions of the run."""
import jax
import numpy as np
import pytest

pytest.importorskip("grain")

import jaxformers as jf  # noqa: E402
from train import config_lib, input_pipeline, optim, tasks  # noqa: E402


@pytest.mark.parametrize("name", ["mask2former_shapes", "drct_photos"])
@pytest.mark.parametrize("arg", ["smoke", ""])
def test_config_fits_model_task_and_data(name, arg):
    spec = f"train/configs/{name}.py"
    config = config_lib.resolve_config(f"{spec}:{arg}" if arg else spec, [])
    model = jf.create_model(config.model.name, **config.model.overrides)
    task = tasks.get_task(config.task, **config.task_args)
    source, _ = input_pipeline.open_source(config.input, config.input.train_split)
    it = input_pipeline.TrainIterator(source, config.input.train_pp, fields=task.fields,
                                      global_batch=2, seed=0, num_threads=1)
    batch = next(it)
    inputs = task.model_inputs(batch)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))

    def loss(v):  # as train/steps.py's loss_fn calls the model and the task
        mutable = list(set(v) - {"params"})
        outputs = task.apply_model(model, v, *inputs, train=True, rngs={"dropout": jax.random.key(1)},
                                   **({"mutable": mutable} if mutable else {}))
        outputs = outputs[0] if mutable else outputs
        extra = {"rng": jax.random.key(2)} if getattr(task, "loss_uses_rng", False) else {}
        return task.loss(outputs, batch, **extra)

    value, metrics = jax.eval_shape(loss, variables)
    assert value.shape == () and np.issubdtype(value.dtype, np.floating)
    assert isinstance(metrics, dict) and (metrics or name != "mask2former_shapes"), "the panoptic loss terms"


def test_drct_photos_rate_halves_at_the_official_fractions():
    config = config_lib.resolve_config("train/configs/drct_photos.py:steps=1000", [])
    rate = optim.make_schedule(config, config.num_train_steps)
    got = [float(rate(i)) for i in (0, 499, 500, 799, 800, 900, 950, 999)]
    np.testing.assert_allclose(got, [2e-4, 2e-4, 1e-4, 1e-4, 5e-5, 2.5e-5, 1.25e-5, 1.25e-5], rtol=1e-6)
