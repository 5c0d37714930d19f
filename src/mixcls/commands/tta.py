"""`mixcls tta --run RUN`: score TTA views x image sizes on the OOF rows; choose by nested CV."""

from __future__ import annotations

import argparse
from pathlib import Path


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tta", help="score TTA views x inference sizes on the OOF rows, choose by nested CV",
        description="Each fold's best model predicts its own validation rows again under every "
        "setting: the first 1, 2, … of the TTA views, at each image size. The table shows each "
        "setting's CV; the setting best on all rows is optimistic (it was chosen on them), so the "
        "nested CV is beside it: fold g is scored with the setting best on the other folds. "
        "--apply makes the chosen setting the run's: mixcls predict and mixcls blend use it "
        "(RUN/tta.json, RUN/tta_oof.csv).")
    p.add_argument("--run", required=True, help="a finished mixcls run folder")
    p.add_argument("--views", type=_positive_ints, default=None, metavar="N,N,…",
                   help="numbers of TTA views to score (default: every number from 1 to the "
                   "length of the view list); 1 is always scored")
    p.add_argument("--tta-views", type=_names, default=None, metavar="VIEW,VIEW,…",
                   help="the ordered view list whose first N are taken (default: the run's "
                   "tta_views); the first must be orig")
    p.add_argument("--img-sizes", type=_positive_ints, default=None, metavar="PX,PX,…",
                   help="inference image sizes to score (default: the training size only); the "
                   "training size is always scored")
    p.add_argument("--metric", default="logloss", choices=["logloss", "accuracy"],
                   help="what the choice minimises (log-loss) or maximises (accuracy)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--apply", action="store_true",
                        help="make the chosen setting the one predict and blend use")
    action.add_argument("--reset", action="store_true",
                        help="remove an applied setting (tta.json, tta_oof.csv) and score nothing")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.set_defaults(func=run_tta)


def run_tta(args: argparse.Namespace) -> int:
    from mixcls.runs import RunFolder
    from mixcls.tta import (GRID_FILE, TTA_FILE, TTA_OOF_FILE, apply_setting, choose_setting,
                            grid_table, inference_setting, make_settings, score_run_settings,
                            write_grid)

    run = RunFolder.open(args.run, require=("oof.csv",))
    if args.reset:
        removed = [name for name in (TTA_FILE, TTA_OOF_FILE) if (run.path / name).is_file()]
        for name in (TTA_FILE, TTA_OOF_FILE):  # tta.json first: without it the OOF file is unused
            (run.path / name).unlink(missing_ok=True)
        print(f"removed {', '.join(removed) or 'nothing (no setting was applied)'} from {run.path}")
        _refresh_report(run.path)
        return 0
    cfg = run.config
    tta_views = args.tta_views or list(cfg.predict.tta_views)
    settings = make_settings(args.img_sizes or [], args.views or range(1, len(tta_views) + 1),
                             tta_views, train_size=cfg.data.img_size)
    grid = score_run_settings(run.path, settings, device=args.device, batch_size=args.batch_size,
                              workers=args.workers, amp=args.amp, log=print)
    choice = choose_setting(grid.probs, grid.labels, grid.folds, metric=args.metric)
    table = grid_table(grid, choice)
    write_grid(run.path, table)
    _print_table(table)
    _print_summary(grid, choice, table)
    if args.apply:
        apply_setting(run.path, grid, choice, metric=args.metric)
        print(f"applied {settings[choice.chosen].name} ({TTA_FILE}, {TTA_OOF_FILE}): mixcls predict "
              f"and mixcls blend now use it; undo with mixcls tta --run {args.run} --reset")
    else:
        current = inference_setting(run.path)
        kept = f"the setting in {TTA_FILE}" if current.applied else "the run's config"
        print(f"wrote {Path(args.run) / GRID_FILE}; nothing applied, predict keeps {kept} "
              "(--apply to change it)")
    _refresh_report(run.path)
    return 0


def _refresh_report(run_dir: Path) -> None:
    """Rewrite report.html, whose "Test-time settings" section reads tta_grid.csv and tta.json,
    when the run has one."""
    if (run_dir / "report.html").is_file():
        from mixcls.report import write_report

        print(f"rewrote {write_report(run_dir)}")


def _print_table(table) -> None:
    print(f"{'setting':<14} {'views':<34} {'accuracy':>9} {'macro F1':>9} {'log-loss':>9} "
          f"{'nested folds':>12}")
    for row in table.itertuples():
        mark = "  <- chosen" if row.chosen else ""
        print(f"{row.setting:<14} {row.views:<34} {row.cv_accuracy:9.4f} {row.cv_macro_f1:9.4f} "
              f"{row.cv_logloss:9.4f} {row.nested_folds:12d}{mark}")


def _print_summary(grid, choice, table) -> None:
    from mixcls.blend import score_probs

    nested = score_probs(choice.nested_probs, grid.labels)
    chosen = table.iloc[choice.chosen]
    train = score_probs(grid.train_oof, grid.labels)
    first = table.iloc[0]
    print(f"oof.csv (training's pass): accuracy {train['accuracy']:.4f}, log-loss "
          f"{train['logloss']:.4f}; re-scored at {first.setting}: accuracy "
          f"{first.cv_accuracy:.4f}, log-loss {first.cv_logloss:.4f}")
    print(f"chosen {chosen.setting}: in-sample (optimistic) accuracy {chosen.cv_accuracy:.4f}, "
          f"log-loss {chosen.cv_logloss:.4f}")
    print(f"nested (each fold scored with the setting best on the others): accuracy "
          f"{nested['accuracy']:.4f}, log-loss {nested['logloss']:.4f}")
