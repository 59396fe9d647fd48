"""Command line: ``python -m train.main --config train/configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]``.

``ARG`` is the config file's own argument string (e.g. ``:smoke`` or ``:epochs=10``); every
``--config.a.b=value`` (or ``--config.a.b value``) then overrides one key of the resolved config.
Running the same command on the same workdir resumes from its newest good checkpoint.

Multi-host: launched on several processes (a TPU pod slice, SLURM, or by hand), pass
``--coordinator_address host:port --num_processes N --process_id I`` (or set the standard
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables, or run under a
cluster JAX auto-detects with ``--distributed``). CPU processes talk through gloo collectives.
Every process runs the same command; process 0 writes logs.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

__all__ = ["main", "parse_args", "initialize_distributed"]


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m train.main", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="train/configs/NAME.py[:ARG]")
    parser.add_argument("--workdir", required=True, help="directory for checkpoints, logs and metrics")
    parser.add_argument("--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
    parser.add_argument("--num_processes", type=int, default=int(os.environ.get("JAX_NUM_PROCESSES", "1")))
    parser.add_argument("--process_id", type=int, default=int(os.environ.get("JAX_PROCESS_ID", "0")))
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks for input errors")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM)")
    args, rest = parser.parse_known_args(list(argv))
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            parser.error(f"unrecognized argument {item!r} (overrides look like --config.KEY=VALUE)")
        item = item[2:]
        if "=" not in item:
            if i + 1 >= len(rest):
                parser.error(f"--{item} needs a value")
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    return args, overrides


def initialize_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` when several processes are asked for (before any JAX work)."""
    import jax

    if args.num_processes > 1 or args.distributed:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if args.distributed and args.num_processes <= 1:
            jax.distributed.initialize()
        else:
            if not args.coordinator_address:
                raise SystemExit("error: --num_processes > 1 needs --coordinator_address host:port")
            jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                       num_processes=args.num_processes, process_id=args.process_id)


def main(argv: Sequence[str] | None = None) -> int:
    from train import config_lib

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = config_lib.resolve_config(args.config, overrides)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    initialize_distributed(args)

    from train.trainer import TrainingStopped, train_and_evaluate

    try:
        train_and_evaluate(config, args.workdir)
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, OSError, ImportError) as e:
        # Input errors (config, workdir, dataset, batch/mesh, checkpoint mismatch) are raised before
        # compiling, with messages written for the user; --traceback shows where.
        if args.traceback:
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
