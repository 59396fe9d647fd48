"""jaxformers' functional training loop: configs, input pipelines, pure sharded steps, checkpoints.

    python -m train.main --config train/configs/quickstart.py --workdir /tmp/quickstart

See ``train.trainer.train_and_evaluate`` (the loop), ``train.steps`` (``init_state``,
``train_step``, ``eval_step``), ``train.input_pipeline``, ``train.checkpoint`` and ``train.tasks``.
Nothing heavy is imported here, so ``import train`` is cheap.
"""
