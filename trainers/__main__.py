"""Command line: python -m trainers {train,resume,check,export}."""

from __future__ import annotations

from trainers import stop

# first thing, before the imports that take seconds: a Ctrl-C or SIGTERM during start-up stops cleanly
_CLI_SIGNAL_HANDLERS = stop.install() if __name__ == "__main__" else {}

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from trainers.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers", description="LoRA training with ppsf_optim")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="start a run from a TOML config")
    train.add_argument("config", type=Path)
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    train.add_argument(
        "--gpus", type=int, metavar="N", help="train on N GPUs of this machine (accelerate, one process each)"
    )
    resume = commands.add_parser("resume", help="continue a run from its last checkpoint")
    resume.add_argument("run_dir", type=Path)
    resume.add_argument(
        "--gpus", type=int, metavar="N", help="continue on N GPUs of this machine (any N, see the README)"
    )
    check = commands.add_parser("check", help="validate a config and its dataset without loading a model")
    check.add_argument("config", type=Path)
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--vram", type=float, metavar="GB", help="card memory to check the estimate against")
    export = commands.add_parser("export", help="write the eval-mode LoRA of a run's checkpoint")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--checkpoint", type=int, help="checkpoint step (default: the newest)")
    export.add_argument(
        "--format", choices=["kohya", "diffusers"], action="append", help="default: the config's"
    )
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ConfigError as error:
        print("config problems:\n  " + "\n  ".join(error.problems), file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:  # a missing file, a full disk before the run began, ...
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from trainers import train as training

    try:
        return _command(args, training)
    except training.TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _command(args: argparse.Namespace, training) -> int:
    if args.command == "check":
        config = load_config(args.config, args.set)
        from trainers.memory import print_check

        print_check(config, args.vram)
        problems, summary = training.check(config)
        if problems:
            raise ConfigError(problems)
        print(summary)
        print(f"{args.config}: ok")
        return 0
    if args.command in ("train", "resume") and args.gpus is not None:
        return _launch_on_gpus(args, training)
    if args.command == "train":
        run_dir = training.train(load_config(args.config, args.set))
        print(f"run folder: {run_dir}")
        return 0
    if args.command == "resume":
        run_dir = training.resume(args.run_dir)
        print(f"run folder: {run_dir}")
        return 0
    from trainers.checkpoint import checkpoint_dir
    from trainers.export_run import export_checkpoint

    folder = checkpoint_dir(args.run_dir, args.checkpoint) if args.checkpoint is not None else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no checkpoint folder {folder}")
    for path in export_checkpoint(args.run_dir, folder, args.format):
        print(path)
    return 0


def _launch_on_gpus(args: argparse.Namespace, training) -> int:
    """Check everything a run on --gpus N needs, then start N processes through accelerate."""
    from trainers import distributed
    from trainers.checkpoint import list_checkpoints, saved_trainer_state
    from trainers.checks import config_problems, distributed_problems
    from trainers.train import CONFIG_FILE

    if args.command == "train":
        config = load_config(args.config, args.set)  # a bad config stops here, before any process starts
        trainer_args = ["train", str(args.config), *(part for o in args.set for part in ("--set", o))]
        saved = 0
    else:
        config = load_config(args.run_dir / CONFIG_FILE)
        trainer_args = ["resume", str(args.run_dir)]
        checkpoints = list_checkpoints(args.run_dir)
        saved = saved_trainer_state(checkpoints[-1][1]).micro_batches_per_step if checkpoints else 0
    accumulation = config.training.gradient_accumulation
    micro_batches, _ = distributed.micro_batches_per_step(saved, accumulation, args.gpus)
    problems = distributed.gpu_problems(args.gpus)
    problems += distributed_problems(config, args.gpus, micro_batches)
    problems += config_problems(config)
    if problems:
        raise ConfigError(problems)
    if args.gpus == 1:  # one process needs no launcher
        run_dir = training.train(config) if args.command == "train" else training.resume(args.run_dir)
        print(f"run folder: {run_dir}")
        return 0
    command = distributed.launch_command(trainer_args, args.gpus, distributed.free_port())
    return distributed.run_launched(command)


if __name__ == "__main__":
    sys.exit(main())
