"""Command line: python -m trainers {train,resume,check,export,control}."""

from __future__ import annotations

from trainers import stop

# first thing, before the imports that take seconds: a Ctrl-C or SIGTERM during start-up stops cleanly
_CLI_SIGNAL_HANDLERS = stop.install() if __name__ == "__main__" else {}

import argparse  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from trainers import quiet_warnings, run_folder  # noqa: E402
from trainers.config import ConfigError  # noqa: E402


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
        "--config", type=Path, help="a fixed config for a run that stopped before its first checkpoint"
    )
    resume.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --config")
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
        "--best", action="store_true", help="the checkpoint at the step with the lowest validation loss"
    )
    control = commands.add_parser(
        "control", help="ask a running trainer to freeze d, sample, checkpoint or stop"
    )
    control.add_argument("run_dir", type=Path)
    control.add_argument("action", choices=["freeze", "sample", "checkpoint", "stop"])
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
    if args.command == "control":
        return _control(args.run_dir, args.action)
    if args.command == "check":  # imports neither torch nor a model library once its tables are cached
        return _check(args)
    quiet_warnings.install()  # before diffusers and transformers are imported
    if args.command == "export":
        return _export(args)
    from trainers import train as training

    try:
        return _command(args, training)
    except training.TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _check(args: argparse.Namespace) -> int:
    from trainers.checks import check_config, load_checked

    config = load_checked(args.config, args.set)
    from trainers.memory import print_check

    print_check(config, args.vram)
    problems, summary = check_config(config)
    if problems:
        raise ConfigError(problems)
    print(summary)
    note = run_folder.name_note(config.run_dir)
    if note:
        print(note)
    print(f"{args.config}: ok")
    return 0


def _command(args: argparse.Namespace, training) -> int:
    from trainers.checks import load_checked

    if args.gpus is not None:
        launched = _launch_on_gpus(args)
        if launched is not None:
            return launched
    if args.command == "train":
        config = load_checked(args.config, args.set)
        run_dir = config.run_dir

        def run() -> Path:
            return training.train(config)
    else:
        if args.set and args.config is None:
            raise ConfigError(
                ["--set: resume continues with the run's own config.toml; --set goes with --config"]
            )
        done = run_folder.finished_event(args.run_dir) if args.config is None else None
        if done is not None:
            print(f"{args.run_dir} is finished (step {done.get('step')}); nothing to resume")
            print("\n".join(run_folder.lora_usage_lines(done.get("exported", []))))
            return 0
        run_dir = args.run_dir

        def run() -> Path:
            return training.resume(args.run_dir, args.config, args.set)

    try:
        run_dir = run()
    except (ConfigError, OSError, ValueError, KeyboardInterrupt, training.TrainingError):
        raise  # main() and _run() print these in a line
    except Exception as error:  # the run failed: the traceback, then what happened and what next
        traceback.print_exc()
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        print("\n".join(run_folder.failure_lines(run_dir)), file=sys.stderr)
        return 1
    print("\n".join(run_folder.outcome_lines(run_dir)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainers.checkpoint import checkpoint_dir
    from trainers.export_run import export_checkpoint

    run_folder.require_run(args.run_dir)
    if args.best and args.checkpoint is not None:
        raise ValueError("give either --best or --checkpoint STEP, not both")
    if args.best:
        from trainers.export_run import best_checkpoint

        folder = best_checkpoint(args.run_dir)
    else:
        folder = checkpoint_dir(args.run_dir, args.checkpoint) if args.checkpoint is not None else None
    if folder is not None and not folder.is_dir():
        raise run_folder.missing_checkpoint(args.run_dir, args.checkpoint)
    print("\n".join(run_folder.lora_usage_lines(export_checkpoint(args.run_dir, folder, args.format))))
    return 0


def _control(run_dir: Path, action: str) -> int:
    """Leave a request for the running trainer; the `control` event in its events.jsonl answers it."""
    from trainers.control import ControlError, request_control

    try:
        request = request_control(run_dir, action)
    except ControlError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{action} requested ({request}); the trainer acts on it after its current step")
    return 0


def _launch_on_gpus(args: argparse.Namespace) -> int | None:
    """Check everything a run on --gpus N needs, then start N processes through accelerate (their exit
    status); None for --gpus 1, which trains in this process."""
    from trainers import distributed
    from trainers.checkpoint import list_checkpoints, saved_trainer_state
    from trainers.checks import config_problems, distributed_problems, load_checked
    from trainers.train import CONFIG_FILE

    if args.command == "train":
        config = load_checked(args.config, args.set)  # a bad config stops here, before any process starts
        trainer_args = ["train", str(args.config), *(part for o in args.set for part in ("--set", o))]
        saved = 0
    else:
        run_folder.require_run(args.run_dir)
        config_file = args.config or args.run_dir / CONFIG_FILE
        config = load_checked(config_file, args.set if args.config else [])
        trainer_args = ["resume", str(args.run_dir)]
        if args.config is not None:
            trainer_args += ["--config", str(args.config), *(part for o in args.set for part in ("--set", o))]
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
        return None
    command = distributed.launch_command(trainer_args, args.gpus, distributed.free_port())
    return distributed.run_launched(command)


if __name__ == "__main__":
    sys.exit(main())
