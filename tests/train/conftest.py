"""Shared helpers for the training tests: tiny configs, subprocess launches of the CLI."""
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from tests.helpers import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "train" / "configs" / "quickstart.py")

# A 1-block, 48-wide ViT on digits, 16 examples per step, constant learning rate (so the compiled
# step does not depend on the run length and the compilation cache (tests/conftest.py, inherited by
# the CLI subprocesses) serves every test).
TINY = ["smoke=True", "progress_bar=False", "schedule.name='constant'", "schedule.warmup_steps=0"]


@pytest.fixture
def tiny_config():
    """``tiny_config("num_train_steps=8", ...)`` -> the quick-start config in smoke size."""
    from train import config_lib

    def make(*overrides):
        return config_lib.resolve_config(QUICKSTART, [*TINY, *overrides])

    return make


@pytest.fixture
def cli():
    """Launch the CLI in a subprocess: ``cli.run(workdir, "key=value", ...)``, ``cli.free_port()``."""

    class Cli:
        run = staticmethod(run_cli)
        free_port = staticmethod(free_port)
        env = staticmethod(cli_env)
        quickstart = QUICKSTART
        root = ROOT

    return Cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cli_env(devices: int = 8) -> dict:
    env = dict(os.environ)
    env.update(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_cli(workdir, *overrides, devices: int = 8, extra=(), timeout: int = 300, wait: bool = True):
    """``python -m train.main`` with the tiny config (as a separate process)."""
    cmd = [sys.executable, "-m", "train.main", "--config", QUICKSTART, "--workdir", str(workdir), *extra,
           *[f"--config.{o}" for o in (*TINY, *overrides)]]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=cli_env(devices), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=cli_env(devices), capture_output=True, text=True, timeout=timeout)
