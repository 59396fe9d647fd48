"""Shared helpers for the training tests: tiny configs, subprocess launches of the CLI."""
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "train" / "configs" / "quickstart.py")

# A 1-block, 48-wide ViT on digits, 16 examples per step, constant learning rate (so the compiled
# step does not depend on the run length and the compilation cache serves every test).
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
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    if env.get("_TRAIN_TESTS_CACHE_DIR"):
        env.update(JAX_COMPILATION_CACHE_DIR=env["_TRAIN_TESTS_CACHE_DIR"], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def run_cli(workdir, *overrides, devices: int = 8, extra=(), timeout: int = 300, wait: bool = True):
    """``python -m train.main`` with the tiny config (as a separate process)."""
    cmd = [sys.executable, "-m", "train.main", "--config", QUICKSTART, "--workdir", str(workdir), *extra,
           *[f"--config.{o}" for o in (*TINY, *overrides)]]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=cli_env(devices), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=cli_env(devices), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def compilation_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_compilation_cache")


@pytest.fixture(scope="module", autouse=True)
def _persistent_compilation_cache(compilation_cache_dir):
    """Many tests here train the same tiny model: let identical programs compile once (JAX's
    persistent cache, in a fresh directory per session), within this process and in the CLI
    subprocesses (see ``cli_env``). Switched off again after each module."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(compilation_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()
    os.environ["_TRAIN_TESTS_CACHE_DIR"] = str(compilation_cache_dir)
    yield
    os.environ.pop("_TRAIN_TESTS_CACHE_DIR", None)
    for n, v in previous.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()
