"""mixcls train: k-fold training from a competition folder."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from mixcls.config import Config, ConfigError, iter_options, load_config

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
                   help="launch this many processes per node with torchrun (DDP: nccl on CUDA, gloo "
                   "on CPU); with several nodes run the same command on each")
    p.add_argument("--nnodes", type=int, default=1, help="with --nproc: number of nodes")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="with --nnodes > 1: a host:port every node reaches (usually node 0's)")
    p.add_argument("--rdzv-id", default="mixcls", help="with --nnodes > 1: a job id shared by the nodes")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs only)")
    add_config_flags(p)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    run_dir, cfg = _resolve_run(args)
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc: {args.nproc} must be >= 1")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    if (args.nproc or 1) * args.nnodes > 1 and not _launched_by_torchrun():
        _check_before_launch(cfg)  # refused once here, not once per process
        return _launch_torchrun(args)
    from mixcls import distributed as dist  # torch and timm load only when training really starts
    from mixcls.train import fit_folds

    ctx = dist.init_process_group(cfg.train.device)
    try:
        fit_folds(cfg, run_dir, progress=not args.no_progress and sys.stderr.isatty(),
                  resume=bool(args.resume))
    finally:
        dist.destroy_process_group()
    if ctx.is_main:
        write_report_if_possible(run_dir)
    return 0


def write_report_if_possible(run_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """The report is a view of files already written: if it fails, the run still stands."""
    from mixcls.report import write_report

    try:
        path = write_report(run_dir)
    except Exception as exc:  # matplotlib, PIL and file errors alike must not undo a finished run
        log(f"report not written ({exc.__class__.__name__}: {exc}); retry with: mixcls report {run_dir}")
        return None
    log(f"report: {path}")
    return path


def _resolve_run(args: argparse.Namespace) -> tuple[Path, Config]:
    """The run folder and its validated config (with --resume: the run's own config.yaml)."""
    overrides = config_overrides(args)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a mixcls run folder?")
        extra = sorted(set(overrides) - RESUME_OVERRIDABLE)
        if extra or args.config or args.out:
            drop = [f"--{k.replace('_', '-')}" for k in extra] + ["--config"] * bool(args.config) \
                + ["--out"] * bool(args.out)
            raise ConfigError(f"--resume uses {run_dir}/config.yaml; drop {', '.join(drop)} "
                              f"(only {', '.join('--' + k for k in sorted(RESUME_OVERRIDABLE))} may change)")
        return run_dir, load_config(run_dir / "config.yaml", overrides)
    if not args.out:
        raise ConfigError("train needs --out RUN (a new run folder) or --resume RUN")
    cfg = load_config(args.config, overrides)
    if cfg.data.data is None and cfg.data.csv is None:
        raise ConfigError("train needs --data FOLDER (or --csv FILE --images DIR)")
    if cfg.train.folds_from is not None:
        cfg.train.folds = _shared_fold_count(cfg.train.folds_from, asked=overrides.get("folds"))
    return Path(args.out), cfg


def _shared_fold_count(run_dir: str, *, asked: Any) -> int:
    """--folds follows --folds-from RUN; an explicit --folds that differs is refused."""
    from mixcls.run_setup import count_shared_folds

    count = count_shared_folds(run_dir)
    if asked is not None and int(asked) != count:
        raise ConfigError(f"--folds {asked} with --folds-from {run_dir}, whose folds.csv holds "
                          f"{count} folds; drop --folds")
    return count


def _launched_by_torchrun() -> bool:
    """Read from the environment only, so the launcher itself never imports torch."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _check_before_launch(cfg: Config) -> None:
    if cfg.train.sync_bn:
        import torch
        from mixcls.distributed import check_distributed_options
        on_cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
        check_distributed_options(sync_bn=True, device=torch.device("cuda" if on_cuda else "cpu"),
                                  world_size=2)


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """The torchrun command line that re-runs this training once per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc or 1}"]
    if args.nnodes > 1:
        cmd += [f"--nnodes={args.nnodes}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={args.rdzv_endpoint}", f"--rdzv_id={args.rdzv_id}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "mixcls", "train", *_train_argv(args)]


def _train_argv(args: argparse.Namespace) -> list[str]:
    """`mixcls train` arguments equivalent to `args`, without the launcher's own options.

    Rebuilt from the parsed arguments rather than sys.argv, so it also holds when main() was
    called with an argument list.
    """
    argv = []
    for name in ("out", "config", "resume"):
        if getattr(args, name):
            argv += [f"--{name}", str(getattr(args, name))]
    if args.no_progress:
        argv.append("--no-progress")
    for key, value in config_overrides(args).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else flag.replace("--", "--no-", 1))
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def _launch_torchrun(args: argparse.Namespace) -> int:
    """Re-run this very command under torchrun, one process per device."""
    cmd = torchrun_command(args)
    print("launching:", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=os.environ.copy())
