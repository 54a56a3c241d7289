"""Command line: python -m trainers {train,resume,check,export}."""

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
    resume = commands.add_parser("resume", help="continue a run from its last checkpoint")
    resume.add_argument("run_dir", type=Path)
    resume.add_argument(
        "--config", type=Path, help="a fixed config for a run that stopped before its first checkpoint"
    )
    resume.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --config")
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
    if args.command == "check":  # imports no model library: answers in a second or two
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
    from trainers.memory import print_check  # torch: only once the config is known to be valid

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
    folder = checkpoint_dir(args.run_dir, args.checkpoint) if args.checkpoint is not None else None
    if folder is not None and not folder.is_dir():
        raise run_folder.missing_checkpoint(args.run_dir, args.checkpoint)
    print("\n".join(run_folder.lora_usage_lines(export_checkpoint(args.run_dir, folder, args.format))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
