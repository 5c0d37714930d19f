"""The demo pipeline (`mixcls demo`, digits): accuracy per fold, CV and held-out, and wall time.

Runs `mixcls demo` in a fresh Python process, as a user's `mixcls demo` runs, so the wall time
counts the interpreter start, the imports, the digits export (when --cache is empty), k-fold
training and the held-out prediction. The child sets torch's thread count (--threads) before
anything else and reports the count it ran with. Afterwards the run's metrics.json and
config.yaml give the figures; the load average at start and end says how busy the machine was.

    nice -n 5 .venv/bin/python benchmarks/demo.py --out /tmp/bench_demo --cache /tmp/digits
    nice -n 10 .venv/bin/python benchmarks/demo.py --epochs 1 --folds 2      # quick check
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from mixcls.commands.demo import DEMO_SETTINGS, default_cache
from mixcls.runs import RunError, RunFolder

_THREADS_MARK = "MIXCLS_BENCH_TORCH_THREADS "
# The child: set torch's threads before mixcls imports anything, say how many, then run the CLI.
_CHILD_CODE = (
    "import sys, torch\n"
    "threads = int(sys.argv[1])\n"
    "if threads > 0: torch.set_num_threads(threads)\n"
    f"print({_THREADS_MARK!r} + str(torch.get_num_threads()), flush=True)\n"
    "from mixcls.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None,
                   help="run folder (must be new or empty; default: a temporary folder, removed after)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that already has files")
    p.add_argument("--cache", default=None, help=f"digits cache folder (default {default_cache()})")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"passed to mixcls demo (default {DEMO_SETTINGS['epochs']})")
    p.add_argument("--folds", type=int, default=None,
                   help=f"passed to mixcls demo (default {DEMO_SETTINGS['folds']})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags and an --out holding files, before any work."""
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit(f"--epochs: {args.epochs} must be >= 1")
    if args.folds is not None and args.folds < 2:
        raise SystemExit(f"--folds: {args.folds} must be >= 2")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads: {args.threads} must be >= 1")
    if args.out is None or args.overwrite:
        return
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out} is a file, not a folder; pass another --out")
    if out.is_dir() and any(out.iterdir()):
        raise SystemExit(f"--out {out} already has files; pass another --out or --overwrite "
                         "to replace it")


def demo_argv(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The `mixcls demo` command line for run_dir with the passthrough flags."""
    argv = ["demo", "--out", str(run_dir)]
    for flag, value in (("--cache", args.cache), ("--epochs", args.epochs), ("--folds", args.folds)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--overwrite"] if args.overwrite else [])


def run_child(argv: list[str], threads: int | None) -> tuple[int, float]:
    """Run the CLI in a fresh process, echoing its output; (torch threads it used, wall seconds)."""
    cmd = [sys.executable, "-c", _CHILD_CODE, str(threads or 0), *argv]
    used = None
    start = time.perf_counter()
    # stderr (progress, errors) goes straight through; stdout is read to catch the thread count.
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if line.startswith(_THREADS_MARK):
                used = int(line[len(_THREADS_MARK):])
            else:
                print(line, end="", flush=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"mixcls {' '.join(argv)} failed with exit code {proc.returncode}")
    if used is None:
        raise SystemExit("the demo process did not report its torch thread count")
    return used, seconds


def read_run(run_dir: Path) -> dict:
    """The figures of a finished demo run: metrics.json, the TTA views, images per fold."""
    try:
        run = RunFolder.open(run_dir, require=("metrics.json", "oof.csv"))
        metrics, tta_views = run.metrics, list(run.config.predict.tta_views or [])
    except (RunError, ValueError) as exc:  # ValueError: DataError, ConfigError
        raise SystemExit(f"the demo did not finish: {exc}") from None
    need = ["cv_accuracy", "fold_accuracy", "rows", "folds_trained", "seconds",
            "holdout_accuracy", "holdout_rows", "holdout_tta"]
    missing = [key for key in need if key not in metrics]
    if missing:
        raise SystemExit(f"{run.path / 'metrics.json'}: no {', '.join(missing)}")
    oof = run.read_oof()
    return dict(metrics, tta_views=tta_views,
                fold_rows={str(k): int(n) for k, n in oof["fold"].value_counts().items()})


def print_table(run: dict, *, threads: int, wall_seconds: float,
                load: tuple[float, float], cache_was_ready: bool) -> None:
    """One row per fold, then the run's figures."""
    print(f"\n{'measure':<28} {'value':>12}")
    print("-" * 41)
    for fold, accuracy in sorted(run["fold_accuracy"].items(), key=lambda kv: int(kv[0])):
        label = f"fold {fold} accuracy ({run['fold_rows'].get(fold, 0)} img)"
        print(f"{label:<28} {accuracy:>12.4f}")
    views = ",".join(run["tta_views"][:run["holdout_tta"]])
    rows = [("CV accuracy", f"{run['cv_accuracy']:.4f}"),
            ("held-out accuracy", f"{run['holdout_accuracy']:.4f}"),
            ("rows (train, CV)", run["rows"]), ("held-out rows", run["holdout_rows"]),
            ("folds", len(run["folds_trained"])), ("TTA views", f"{run['holdout_tta']} ({views})"),
            ("wall seconds (whole CLI)", f"{wall_seconds:.1f}"),
            ("training seconds (fit_folds)", f"{run['seconds']:.1f}"),
            ("torch threads", threads), ("digits cache", "reused" if cache_was_ready else "exported"),
            ("load average 1 min, start", f"{load[0]:.2f}"), ("load average 1 min, end", f"{load[1]:.2f}")]
    for name, value in rows:
        print(f"{name:<28} {value!s:>12}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    cache_was_ready = (Path(args.cache) if args.cache else default_cache()).joinpath("done.json").is_file()
    with tempfile.TemporaryDirectory(prefix="mixcls_bench_demo_") as tmp:
        run_dir = Path(args.out) if args.out else Path(tmp) / "run"
        load_start = os.getloadavg()[0]
        threads, wall_seconds = run_child(demo_argv(args, run_dir), args.threads)
        load_end = os.getloadavg()[0]
        run = read_run(run_dir)
        print_table(run, threads=threads, wall_seconds=wall_seconds,
                    load=(load_start, load_end), cache_was_ready=cache_was_ready)
    print(f"cv_accuracy={run['cv_accuracy']:.4f} holdout_accuracy={run['holdout_accuracy']:.4f} "
          f"wall_seconds={wall_seconds:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
