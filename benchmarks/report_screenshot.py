"""Build a run report and photograph it in headless Chromium (docs/report.png).

Without --run, it makes a demo-sized run first: `mixcls demo` on scikit-learn's digits (5 folds,
held-out accuracy, fmix mixing by default) followed by `mixcls noise` writing RUN/suspects.csv
and RUN/suspects.png, so that every section of the report has something to show. It then times
`write_report` and the Chromium screenshot and prints what the page holds.

    python benchmarks/report_screenshot.py                      # demo run, docs/report.png
    python benchmarks/report_screenshot.py --run runs/exp1 --png /tmp/exp1.png

Needs a Chromium or Chrome binary (Debian: apt-get install chromium; elsewhere pass --chromium
google-chrome or the browser's full path).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mixcls.cli import main as mixcls
from mixcls.report import screenshot_report, write_report

REPO = Path(__file__).resolve().parents[1]


def build_demo_run(out: Path, *, epochs: int, folds: int, mix: str, model: str) -> Path:
    """`mixcls demo` then `mixcls noise` into `out`; their console output is kept quiet."""
    with contextlib.redirect_stdout(io.StringIO()):
        code = mixcls(["demo", "--out", str(out), "--epochs", str(epochs), "--folds", str(folds),
                       "--mix", mix, "--model", model, "--overwrite"])
        if code == 0:
            code = mixcls(["noise", "--run", str(out), "--out", str(out / "suspects.csv"),
                           "--gallery", str(out / "suspects.png")])
    if code != 0:
        sys.exit(f"building the demo run failed with exit code {code}")
    return out


def describe_page(path: Path) -> dict[str, float]:
    page = path.read_text()
    return {"report_kib": path.stat().st_size / 1024, "images": page.count("<img "),
            "sections": page.count("<section ")}


def ink_share(png: Path) -> float:
    """Share of pixels darker than light grey: 0 for a blank screenshot."""
    with Image.open(png) as image:
        grey = np.asarray(image.convert("L"))
    return float((grey < 200).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="existing run folder (default: build a demo run)")
    parser.add_argument("--out", help="where to build the demo run (default: a temporary folder)")
    parser.add_argument("--png", default=str(REPO / "docs" / "report.png"), help="screenshot file")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--mix", default="fmix")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--chromium", default="chromium",
                        help="browser binary: chromium, chromium-browser, google-chrome or a path")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mixcls-report-") as tmp:
        started = time.perf_counter()
        if args.run:
            run, train_s = Path(args.run), 0.0
        else:
            run = build_demo_run(Path(args.out or Path(tmp) / "demo"), epochs=args.epochs,
                                 folds=args.folds, mix=args.mix, model=args.model)
            train_s = time.perf_counter() - started
        t0 = time.perf_counter()
        html_path = write_report(run)
        report_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        png = screenshot_report(html_path, args.png, width=args.width, height=args.height,
                                chromium=args.chromium)
        shot_s = time.perf_counter() - t0
        page = describe_page(html_path)
        metrics = json.loads((run / "metrics.json").read_text())
        ink = ink_share(png)

    demo = f"demo digits, {args.model}, {args.folds} folds x {args.epochs} epochs, mix {args.mix}"
    holdout = metrics.get("holdout_accuracy")
    rows = [("run", str(run) if args.run else demo), ("cv_accuracy", f"{metrics['cv_accuracy']:.4f}"),
            ("holdout_accuracy", f"{holdout:.4f}" if holdout is not None else "—"),
            ("train + noise seconds", f"{train_s:.1f}"), ("write_report seconds", f"{report_s:.2f}"),
            ("screenshot seconds", f"{shot_s:.2f}"), ("report KiB", f"{page['report_kib']:.0f}"),
            ("embedded images", str(page["images"])), ("sections", str(page["sections"])),
            ("screenshot", f"{png} ({args.width}x{args.height}, {ink:.1%} ink)")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    summary = {"report_s": f"{report_s:.2f}", "screenshot_s": f"{shot_s:.2f}",
               "report_kib": f"{page['report_kib']:.0f}", "images": page["images"],
               "sections": page["sections"], "cv_accuracy": f"{metrics['cv_accuracy']:.4f}",
               "ink": f"{ink:.3f}"}
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
