"""The `mixcls` command: subcommands only. Each builds a config or reads a run and calls the library."""

from __future__ import annotations

import argparse
import importlib
import sys

from mixcls import __version__

# One module per command group under mixcls.commands, each with register(subparsers).
COMMAND_MODULES = ["train", "predict", "demo", "data", "show_mix", "noise", "active", "explain", "report",
                   "lr_find", "runs", "blend", "pseudo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixcls", description="Competition-grade image classification: k-fold timm training, "
        "mixup/cutmix/fmix, TTA ensembles, noisy labels and active learning.")
    parser.add_argument("--version", action="version", version=f"mixcls {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        # A listed module that is missing is a broken install, not an optional command: fail.
        importlib.import_module(f"mixcls.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; bad input is reported as one line and exit code 2, never a traceback.

    Every ValueError (our DataError, ConfigError, … derive from it), our RuntimeErrors (RunError,
    TrainingStopped) and OSErrors (disk full, permission denied) are the user's to fix; any other
    exception is a bug and keeps its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:
        print(f"mixcls: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not getattr(exc, "user_facing", False):
            raise
        print(f"mixcls: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixcls: interrupted", file=sys.stderr)
        return 130
