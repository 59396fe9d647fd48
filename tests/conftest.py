"""Test setup: 8 simulated CPU devices for mesh tests, XLA's fastest compilation, float32 matmuls at full precision, one JAX
persistent compilation cache shared by every xdist worker (and the CLI subprocesses they start)
within a run, and the test time per folder and of the slowest files at the end of the run (the CI budget: README,
"Contributing")."""
import collections
import importlib.metadata
import os
import tempfile

# XLA's cheapest CPU compilation for every program of the run, notebooks and CLI subprocesses included (the
# options of tests.helpers.FAST_COMPILE as flags): the same numbers, and a tiny test model mostly compiles.
# jaxlib 0.10's CPU backend still has its older LLVM IR emitters for fused loops, which compile in about half
# the time of the MLIR fusion emitters (the only ones from jaxlib 0.11, where the flag is gone), and codegen
# in one piece instead of split over threads costs less CPU on a 2-core runner (a tiny P2AT train step:
# 11.3 s -> 4.1 s compile; two model test files: 178 s -> 108 s).
_FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2]) < (0, 11):
    _FAST_COMPILE_FLAGS += " --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + _FAST_COMPILE_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The controller creates the directory before it starts the workers, which inherit the variable;
# a worker (or a plain run) that finds it set joins it. Programs that compile in under 0.2 s are
# not worth a disk round trip.
CACHE_ENV = "JAXFORMERS_TEST_COMPILATION_CACHE"


def pytest_configure(config):
    if not os.environ.get(CACHE_ENV):
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="jaxformers-jit-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=os.environ[CACHE_ENV], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_collection_modifyitems(config, items):
    """Files in the order an xdist run with ``--dist loadfile`` (the Makefile's: a file's module
    fixtures are built once, not once per worker) should hand them out: the notebooks first (the
    longest file), then the larger test files before the smaller, so that the workers finish together
    instead of one running a long file alone at the end. A file's own tests keep their order."""
    def cost(item):
        path = item.path
        return (not item.nodeid.startswith("tests/test_notebooks.py"), -path.stat().st_size, str(path))

    items.sort(key=cost)


def pytest_terminal_summary(terminalreporter):
    """Seconds of test time (setup + call + teardown, summed over workers) per test folder, and the 30
    test files that take the most (a model family's file against its budget)."""
    folders: dict[str, float] = collections.Counter()
    files: dict[str, float] = collections.Counter()
    for reports in terminalreporter.stats.values():
        for report in reports:
            if hasattr(report, "duration") and getattr(report, "nodeid", ""):
                path = report.nodeid.split("::")[0]
                folders[os.path.dirname(path) or path] += report.duration
                files[path] += report.duration
    if folders:
        terminalreporter.write_sep("=", "test time per folder (seconds, all workers)")
        for folder, seconds in sorted(folders.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{seconds:9.1f}  {folder}")
        terminalreporter.write_line(f"{sum(folders.values()):9.1f}  total")
        terminalreporter.write_sep("=", "slowest 30 test files (seconds, all workers)")
        for path, seconds in sorted(files.items(), key=lambda kv: -kv[1])[:30]:
            terminalreporter.write_line(f"{seconds:9.1f}  {path}")
