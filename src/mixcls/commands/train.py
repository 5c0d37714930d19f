"""mixcls train: k-fold training from a competition folder."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from mixcls import distributed as dist
from mixcls.config import ConfigError, iter_options, load_config

# With --resume the run's own config.yaml decides; only where and how fast may change.
RESUME_OVERRIDABLE = {"device", "workers"}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config key (img_size -> --img-size); defaults stay None so YAML values hold."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, section, f in iter_options():
        group = groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        flag = "--" + key.replace("_", "-")
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if str(f.type).startswith("bool"):
            group.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(flag, dest=key, default=None, choices=choices, help=help_text,
                               metavar=key.upper() if not choices else None)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key, _, _ in iter_options() if getattr(args, key, None) is not None}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train k folds and write a run folder",
        description="Train stratified k folds of a timm model; writes RUN/config.yaml, classes.json, "
        "folds.csv, fold_K/{best,last}.pt, fold_K/history.csv, oof.csv, metrics.json, report.html.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--config", help="YAML file whose keys mirror these flags; flags override it")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run (its config.yaml decides)")
    p.add_argument("--nproc", type=int, default=None,
                   help="launch this many processes with torchrun (DDP: nccl on CUDA, gloo on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs only)")
    add_config_flags(p)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and not dist.launched_by_torchrun():
        return _launch_torchrun(args.nproc)
    overrides = config_overrides(args)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a mixcls run folder?")
        extra = sorted(set(overrides) - RESUME_OVERRIDABLE)
        if extra or args.config:
            raise ConfigError(f"--resume uses {run_dir}/config.yaml; drop "
                              f"{', '.join('--' + k.replace('_', '-') for k in extra) or '--config'}")
        cfg = load_config(run_dir / "config.yaml", overrides)
    else:
        if not args.out:
            raise ConfigError("train needs --out RUN (a new run folder) or --resume RUN")
        run_dir = Path(args.out)
        cfg = load_config(args.config, overrides)
        if cfg.data.data is None and cfg.data.csv is None:
            raise ConfigError("train needs --data FOLDER (or --csv FILE --images DIR)")
    from mixcls.train import fit_folds  # torch and timm load only when training really starts

    dist.init_process_group(cfg.train.device)
    try:
        fit_folds(cfg, run_dir, progress=not args.no_progress and sys.stderr.isatty(),
                  resume=bool(args.resume))
    finally:
        dist.destroy_process_group()
    return 0


def _launch_torchrun(nproc: int) -> int:
    """Re-run this very command under torchrun, one process per device."""
    argv = sys.argv[1:]
    cleaned, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if token == "--nproc":
            skip = True
            continue
        if token.startswith("--nproc="):
            continue
        cleaned.append(token)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mixcls"] + cleaned
    print("launching:", " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd, env=os.environ.copy())
