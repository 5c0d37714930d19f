"""mixcls lr-find: a learning-rate range test on the training pipeline, a picture and a value."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixcls.commands.train import add_config_flags, config_overrides
from mixcls.config import ConfigError, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    # "resolve": this command's --min-lr (where the range starts) replaces the scheduler's
    # --min-lr floor, which a range test never uses.
    p = subparsers.add_parser(
        "lr-find", help="learning-rate range test: picture of loss against lr and a suggested lr",
        description="Train a few hundred steps with the lr rising exponentially from --min-lr to "
        "--max-lr on the real pipeline (fold 0's training rows, the training transforms, model, loss, "
        "optimizer, mixing, AMP, accumulation), stop when the smoothed loss diverges, restore the "
        "model, and write a picture of the smoothed loss against lr with the suggested lr marked. "
        "Every training flag and --config work as in mixcls train.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, conflict_handler="resolve")
    p.add_argument("--config", help="YAML file whose keys mirror the training flags; flags override it")
    p.add_argument("--out", required=True, help="picture file (.png, .pdf, .svg, ...)")
    add_config_flags(p)
    group = p.add_argument_group("range test options")
    group.add_argument("--steps", type=int, default=100, help="optimizer steps of the test (>= 10)")
    group.add_argument("--min-lr", dest="range_min_lr", type=float, default=1e-7, metavar="LR",
                       help="first lr of the range (here not the scheduler's floor)")
    group.add_argument("--max-lr", dest="range_max_lr", type=float, default=10.0, metavar="LR",
                       help="last lr of the range")
    group.add_argument("--suggest", default="steepest",
                       help="steepest: steepest descent of the smoothed loss before its minimum; "
                       "min10: the lr at the minimum / 10")
    group.add_argument("--diverge-factor", type=float, default=4.0,
                       help="stop once the smoothed loss exceeds this many times its minimum")
    group.add_argument("--beta", type=float, default=0.98, help="smoothing of the loss curve (EMA)")
    p.set_defaults(func=run_lr_find)


def _check_out(out: str) -> None:
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = Path(out).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise ConfigError(f"--out {out}: unknown picture format {suffix!r}; use one of "
                          f"{', '.join(sorted(formats))}")


def run_lr_find(args: argparse.Namespace) -> int:
    from mixcls.lr_find import check_range_options, find_lr_for_config, plot_lr_find
    from mixcls.runs import atomic_save_figure

    check_range_options(min_lr=args.range_min_lr, max_lr=args.range_max_lr, steps=args.steps,
                        beta=args.beta, diverge_factor=args.diverge_factor)
    _check_out(args.out)
    cfg = load_config(args.config, config_overrides(args))
    if cfg.data.data is None and cfg.data.csv is None:
        raise ConfigError("lr-find needs --data FOLDER (or --csv FILE --images DIR)")
    result, suggestion = find_lr_for_config(
        cfg, steps=args.steps, min_lr=args.range_min_lr, max_lr=args.range_max_lr,
        rule=args.suggest, beta=args.beta, diverge_factor=args.diverge_factor)
    out = atomic_save_figure(plot_lr_find(result, suggestion), args.out)
    ending = "stopped early: the loss diverged" if result.stopped_early else "reached --max-lr"
    print(f"wrote {out}: {len(result.lrs)} steps, lr {result.lrs[0]:.2e} -> {result.lrs[-1]:.2e} ({ending})")
    print(f"suggested lr ({args.suggest}): {suggestion:.3e}")
    print(f"  train with: mixcls train --lr {suggestion:.3g} ...")
    return 0
