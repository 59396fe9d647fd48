"""``train/configs/mask2former_shapes.py`` wired as ``python -m train.main`` wires it: the config (smoke and
full) resolves, and its model, task and input pipeline fit together: one training-mode loss on a real
batch of the generated scenes traces with the task's loss terms. The loss falling on these scenes is
``tests/models/test_mask2former.py``'s training test. A 10-step CLI run of the smoke config (loss below
0.75x its first value, PQ and mIoU reported) took about 2 minutes on 2 cores, mostly compiling the
sharded step over 8 simulated devices: over the CI budget, so it is not repeated here."""
import jax
import numpy as np
import pytest

pytest.importorskip("grain")

import jaxformers as jf  # noqa: E402
from train import config_lib, input_pipeline, tasks  # noqa: E402

CONFIG = "train/configs/mask2former_shapes.py"


@pytest.mark.parametrize("arg", ["smoke", ""])
def test_mask2former_shapes_config_fits_model_task_and_data(arg):
    config = config_lib.resolve_config(f"{CONFIG}:{arg}" if arg else CONFIG, [])
    model = jf.create_model(config.model.name, **config.model.overrides)
    task = tasks.get_task(config.task, **config.task_args)
    source, _ = input_pipeline.EMBEDDED[config.input.dataset]
    it = input_pipeline.TrainIterator(source(config.input.train_split), config.input.train_pp, fields=task.fields,
                                      global_batch=2, seed=0, num_threads=1)
    batch = next(it)
    inputs = task.model_inputs(batch)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))

    def loss(v):
        outputs = model.apply(v, *inputs, train=True, rngs={"dropout": jax.random.key(1)},
                              mutable=list(set(v) - {"params"}) or False)
        outputs = outputs[0] if isinstance(outputs, tuple) else outputs
        return task.loss(outputs, batch, jax.random.key(2))

    value, metrics = jax.eval_shape(loss, variables)
    assert value.shape == () and np.issubdtype(value.dtype, np.floating)
    assert metrics, "the panoptic task reports its loss terms"
