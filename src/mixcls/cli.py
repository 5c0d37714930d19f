"""The `mixcls` command: subcommands only. Each builds a config or reads a run and calls the library."""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import threading

from mixcls import __version__
from mixcls.heap import keep_freed_memory

# The module under mixcls.commands that registers each command. A run imports only the module of
# its command (all of them for --help, a mistyped command or none), so `mixcls runs` or `mixcls
# blend --help` does not wait for torch, matplotlib and scikit-learn to import, and `mixcls train`
# imports matplotlib only when it writes the report.
COMMANDS = {"train": "train", "predict": "predict", "demo": "demo", "data": "data",
            "show-mix": "show_mix", "noise": "noise", "clean": "noise", "select": "active",
            "review": "active", "merge": "active", "al-sim": "active", "explain": "explain",
            "report": "report", "lr-find": "lr_find", "runs": "runs", "blend": "blend",
            "pseudo": "pseudo", "duplicates": "duplicates", "tta": "tta",
            "export": "export"}
COMMAND_MODULES = list(dict.fromkeys(COMMANDS.values()))  # one per command group, in order


def chosen_command(argv: list[str]) -> str | None:
    """The command named by `argv` (its first word that is not an option), if it is one of ours."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with `argv` naming one, of that command's group only."""
    parser = argparse.ArgumentParser(
        prog="mixcls", description="Competition-grade image classification: k-fold timm training, "
        "mixup/cutmix/fmix, TTA ensembles, noisy labels and active learning.")
    parser.add_argument("--version", action="version", version=f"mixcls {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    command = chosen_command(argv) if argv is not None else None
    for name in [COMMANDS[command]] if command is not None else COMMAND_MODULES:
        # A listed module that is missing is a broken install, not an optional command: fail.
        importlib.import_module(f"mixcls.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; bad input is reported as one line and exit code 2, never a traceback.

    Every ValueError (our DataError, ConfigError, … derive from it), our RuntimeErrors (RunError,
    TrainingStopped) and OSErrors (disk full, permission denied) are the user's to fix; any other
    exception is a bug and keeps its traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    # albumentations asks PyPI for a newer version when imported: 0.2 s here, and up to its
    # timeout on a machine without internet (a competition's notebook); a run needs no answer.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    keep_freed_memory()  # the whole process: decode, augmentation and the CPU steps (mixcls.heap)
    args = build_parser(argv).parse_args(argv)
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


def run() -> None:
    """The `mixcls` console script and `python -m mixcls`: main(), then a prompt exit.

    A normal exit tears the interpreter down, freeing every object of torch, timm, pandas and
    matplotlib one by one: about 1.5 s after `import torch` alone on our 2-core machine, 3-4 s
    after a training run, memory the OS takes back at once anyway. So after main returns, the
    exit handlers run (logging, multiprocessing, tqdm), threads that are not daemons are joined,
    the standard streams are flushed, and the process ends with os._exit. Every file a command
    writes is closed before main returns (atomic writes), so nothing is left to the teardown.
    An exception escaping main (a bug) takes the normal path, traceback and all.
    """
    code = main()
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # the handlers a normal exit runs; os._exit skips them otherwise
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to write to
            pass
    os._exit(code)
