"""Pseudo-labels and distillation on Fashion-MNIST, with CV against held-out test accuracy, and
the leaky variants that mixcls's per-fold construction prevents.

5,000 labelled training images (stratified, 5 folds), 20,000 further training images used as
unlabelled (never their labels), the official 10,000 test images held out: nothing here fits
on them. Rows, each with its CV (OOF accuracy) and test accuracy:

- baseline: `mixcls train` on the labelled rows (with --full-fit, for the leaky teacher below);
- pseudo hard / soft: `mixcls pseudo --run baseline` on the unlabelled images (fold g's labels
  from the baseline's fold-g model), then `mixcls train --pseudo … --folds-from baseline`;
- pseudo rounds 2 … --rounds (default 3): the pseudo student with the better CV (hard or soft)
  becomes the teacher of round 2, `mixcls pseudo --run STUDENT` then `mixcls train --pseudo …`
  again, with labels of the same kind; round r's student teaches round r + 1. Still no leak:
  a student's fold-g model trained on fold g's training rows and on labels from the fold-g model
  before it only, so fold g's validation rows never reached any model of that chain;
- pseudo blend rounds 2 … --rounds: the same chain with an ensemble for a teacher, as competitors
  pseudo-label with their ensemble: round r's teacher is `mixcls blend --method mean` of the two
  students of round r - 1 (round 2: hard and soft; round r > 2: pseudo_round(r-1) and
  pseudo_blend_round(r-1)). Still no leak: fold g's teacher averages the members' fold-g models;
- distill: `mixcls train --distill baseline --folds-from baseline` (fold g's targets from the
  baseline's fold-g model);
- leaky pseudo / leaky distill: the same with a teacher fitted on ALL labelled rows (the
  baseline's full-data model standing in for every fold model), which has seen every fold's
  validation rows: what a notebook does, and the CV-test gap it creates.

    python benchmarks/teachers.py --data DIR [--work runs/bench_teachers] [--preset none] [--quick]
                                  [--labelled N] [--unlabelled N] [--epochs N] [--fresh FRESH]

DIR is a folder written by `mixcls data fashion-mnist --limit 25000` (train.csv + train_images,
test.csv + test_images); nothing is downloaded. The labelled and unlabelled rows are disjoint
subsets of its train.csv (checked). Ends with
`baseline=… pseudo=… distill=… pseudo_gain_points=… max_cv_test_gap_points=… leaky_gap_points=…`
(accuracies in %; pseudo is the test accuracy of the pseudo row with the best CV, chosen by CV as a
user would, never by test; the gaps are CV minus test in points), then
`max_cv_single_test_gap_points=… leaky_single_gap_points=…`: the same gaps against the mean test
accuracy of the single fold models (column test_single), which is what a CV estimates. The test
column is the fold ensemble's (`mixcls predict`), which a user submits; it gains over its single
models, by more when the fold models disagree more, so its gap mixes that gain with any leak.

With `--fresh FRESH` (an export of all 60,000 training images: `mixcls data fashion-mnist --out
FRESH`), --fresh-rows (10,000) of FRESH's training images that are in neither of DIR's splits (by
their pixels) are scored as the test images are (columns fresh, fresh_single): images that no
model here saw, from the training split like the CV rows, where the test images come from the
official test split. The line then also gives
`max_cv_fresh_single_gap_points=… leaky_fresh_single_gap_points=…`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from fold_probs import (accuracy, check_fresh_export, cv_leads, fold_scores, fresh_rows,
                        predict_fold_fresh_probs, predict_fold_test_probs, single_accuracy)
from mixcls.data import prob_columns
from mixcls.runs import read_json
from split_files import write_split_once

FLAGS = ["--model", "mixcls_cnn_tiny", "--img-size", "28", "--batch-size",
         "128", "--lr", "3e-3", "--workers", "0", "--no-progress"]


@dataclass
class Sizes:
    labelled: int
    unlabelled: int
    epochs: int
    folds: int = 5


FULL = Sizes(labelled=5000, unlabelled=20000, epochs=10)
QUICK = Sizes(labelled=300, unlabelled=600, epochs=1)


def run(*args: str, threads: int, log: Path | None = None) -> None:
    """`python -m mixcls ARGS` with `threads` intra-op threads; SystemExit naming the log on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log, "w") if log is not None else open(os.devnull, "w") as out:
        code = subprocess.call([sys.executable, "-m", "mixcls", *args], env=env, stdout=out,
                               stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"mixcls {' '.join(args)} failed (exit {code}); see {log}")


def split_rows(data: Path, work: Path, sizes: Sizes, seed: int) -> tuple[Path, Path]:
    """labelled.csv (image_id, label) and unlabelled.csv (image_id only), disjoint, stratified."""
    table = pd.read_csv(data / "train.csv", dtype={"image_id": str})
    need = sizes.labelled + sizes.unlabelled
    if len(table) < need:
        raise SystemExit(f"{data}/train.csv has {len(table)} rows; {need} are needed "
                         f"(export with mixcls data fashion-mnist --limit {need})")
    table = table.sample(n=need, random_state=seed) if len(table) > need else table
    labelled, unlabelled = train_test_split(table, train_size=sizes.labelled, random_state=seed,
                                            stratify=table["label"])
    if set(labelled["image_id"]) & set(unlabelled["image_id"]):
        raise SystemExit("labelled and unlabelled rows overlap")
    work.mkdir(parents=True, exist_ok=True)
    lab, unl = work / "labelled.csv", work / "unlabelled.csv"
    flags = "--labelled, --unlabelled, --seed or data"
    write_split_once(lab, labelled[["image_id", "label"]], flags=flags)
    write_split_once(unl, unlabelled[["image_id"]], flags=flags)
    return lab, unl


@dataclass
class Bench:
    """What every step shares: the folders, the recipe and the machine."""

    data: Path
    work: Path
    labelled: Path
    unlabelled: Path
    sizes: Sizes
    threshold: float
    max_per_class: int | None
    device: str
    threads: int
    preset: str


def train(name: str, bench: Bench, extra: list[str]) -> Path:
    """`mixcls train` on the labelled rows into WORK/NAME, unless a finished run is there."""
    out = bench.work / name
    if not (out / "metrics.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        run("train", "--csv", str(bench.labelled), "--images", str(bench.data / "train_images"),
            "--out", str(out), "--epochs", str(bench.sizes.epochs), "--device", bench.device,
            "--preset", bench.preset, *FLAGS, *extra, threads=bench.threads,
            log=bench.work / f"{name}.log")
    return out


def leaky_teacher(baseline: Path, work: Path) -> Path:
    """The baseline with every fold model replaced by its full-data model (fitted on all rows)."""
    out = work / "leaky_teacher"
    if not out.is_dir():
        shutil.copytree(baseline, out)
        for fold_dir in out.glob("fold_*"):
            shutil.copy(baseline / "full" / "best.pt", fold_dir / "best.pt")
    return out


def mean_blend(members: list[Path], work: Path, name: str, *, threads: int) -> Path:
    """`mixcls blend --method mean` of finished runs (nothing fitted), the teacher of a round."""
    out = work / name
    if not ((out / "blend.json").is_file() and (out / "metrics.json").is_file()):
        shutil.rmtree(out, ignore_errors=True)
        run("blend", *[str(m) for m in members], "--method", "mean", "--out", str(out),
            threads=threads, log=work / f"{name}.log")
    return out


def pseudo_table(teacher: Path, name: str, bench: Bench, *, soft: bool) -> Path:
    """`mixcls pseudo --run TEACHER` on the unlabelled images into WORK/NAME.csv (cached)."""
    out = bench.work / f"{name}.csv"
    if not out.is_file():
        cap = ["--max-per-class", str(bench.max_per_class)] if bench.max_per_class else []
        run("pseudo", "--run", str(teacher), "--images", str(bench.data / "train_images"),
            "--ids", str(bench.unlabelled), "--out", str(out), "--threshold", str(bench.threshold),
            "--device", bench.device, *(["--soft"] if soft else []), *cap,
            threads=bench.threads, log=bench.work / f"{name}.log")
    return out


def pseudo_student(name: str, teacher: Path, baseline: Path, bench: Bench, *, soft: bool) -> Path:
    """TEACHER's per-fold pseudo-labels, then a student on the baseline's folds with them."""
    table = pseudo_table(teacher, f"table_{name}", bench, soft=soft)
    return train(name, bench, ["--folds-from", str(baseline), "--pseudo", str(table)])


def cv_of(run_dir: Path) -> float:
    return read_json(run_dir / "metrics.json")["cv_accuracy"]


def train_rows(bench: Bench, *, rounds: int, distill_weight: float) -> dict[str, Path]:
    """Every row's run folder, in the table's order (each trained unless already finished).

    Round r >= 2 of the plain chain is taught by round r - 1's student (round 1: hard or soft,
    whichever has the better CV, and the chain keeps that kind of label); round r of the blend
    chain by the mean blend of the two students of round r - 1.
    """
    baseline = train("baseline", bench, ["--folds", str(bench.sizes.folds), "--full-fit"])
    runs = {"baseline": baseline}
    for kind in ("hard", "soft"):
        runs[f"pseudo_{kind}"] = pseudo_student(f"pseudo_{kind}", baseline, baseline, bench,
                                                soft=kind == "soft")
    soft = cv_of(runs["pseudo_soft"]) > cv_of(runs["pseudo_hard"])
    student = "pseudo_soft" if soft else "pseudo_hard"
    for r in range(2, rounds + 1):
        runs[f"pseudo_round{r}"] = pseudo_student(f"pseudo_round{r}", runs[student], baseline,
                                                  bench, soft=soft)
        student = f"pseudo_round{r}"
    previous = ["pseudo_hard", "pseudo_soft"]
    for r in range(2, rounds + 1):
        teacher = mean_blend([runs[p] for p in previous], bench.work, f"teacher_blend_round{r}",
                             threads=bench.threads)
        name = f"pseudo_blend_round{r}"
        runs[name] = pseudo_student(name, teacher, baseline, bench, soft=soft)
        previous = [f"pseudo_round{r}", name]
    def distill_from(teacher: Path) -> list[str]:
        return ["--folds-from", str(baseline), "--distill", str(teacher),
                "--distill-weight", str(distill_weight)]

    runs["distill"] = train("distill", bench, distill_from(baseline))
    leaky = leaky_teacher(baseline, bench.work)  # one leaky pseudo row shows the gap
    runs["leaky_pseudo_hard"] = pseudo_student("leaky_pseudo_hard", leaky, baseline, bench,
                                               soft=False)
    runs["leaky_distill"] = train("leaky_distill", bench, distill_from(leaky))
    return runs


def test_accuracies(run_dir: Path, data: Path, work: Path, *, device: str,
                   threads: int) -> tuple[float, float, float]:
    """(fold ensemble, mean single fold model, |fold mean - predict| max) test accuracy of a run.

    The ensemble is the run's own `mixcls predict` (what a user submits); the single models are
    what its CV estimates (each OOF row is scored by one fold model), so their mean test accuracy
    is the figure to hold a CV against for a leak, apart from the ensemble's own gain. The last
    value checks that the two agree: predict's probabilities are the mean of the fold models'.
    """
    out = work / f"test_{run_dir.name}.csv"
    if not out.is_file():
        run("predict", "--run", str(run_dir), "--images", str(data / "test_images"), "--ids",
            str(data / "test.csv"), "--with-probs", "--out", str(out), "--device", device,
            threads=threads)
    probs = pd.read_csv(out)
    k = sum(c.startswith("prob_") for c in probs.columns)
    ensemble = probs[prob_columns(k)].to_numpy()
    folds = predict_fold_test_probs(run_dir, data, work / f"test_folds_{run_dir.name}.npy",
                                    device=device)
    labels = pd.read_csv(data / "test.csv")["label"].to_numpy()
    return accuracy(ensemble, labels), single_accuracy(folds, labels), \
        float(np.abs(folds.mean(0) - ensemble).max())


def score_rows(runs: dict[str, Path], bench: Bench, fresh_export: Path | None,
               fresh: Path | None) -> tuple[pd.DataFrame, float]:
    """The table (one row per run: CV, test, test_single, pseudo rows, and with FRESH the fresh
    columns) and the largest |mixcls predict − mean of the fold models| over the runs."""
    rows, agree = [], 0.0
    torch.set_num_threads(bench.threads)  # the single fold models are predicted in this process
    fresh_labels = pd.read_csv(fresh)["label"].to_numpy() if fresh is not None else None
    for name, run_dir in runs.items():
        metrics = read_json(run_dir / "metrics.json")
        used = sum(v["rows"] for v in metrics.get("pseudo", {}).get("folds", {}).values())
        test, single, diff = test_accuracies(run_dir, bench.data, bench.work, device=bench.device,
                                             threads=bench.threads)
        agree = max(agree, diff)
        row = {"row": name, "cv": 100 * metrics["cv_accuracy"], "test": 100 * test,
               "test_single": 100 * single,
               "pseudo_rows_per_fold": used / bench.sizes.folds if used else 0}
        if fresh is not None:
            scores = fold_scores(predict_fold_fresh_probs(run_dir, fresh_export, fresh, bench.work,
                                                          device=bench.device), fresh_labels)
            row.update(fresh=100 * scores["ensemble"], fresh_single=100 * scores["single"])
        rows.append(row)
    table = pd.DataFrame(rows)
    table["cv_minus_test"] = table["cv"] - table["test"]
    table["cv_minus_test_single"] = table["cv"] - table["test_single"]
    if fresh is not None:
        table["cv_minus_fresh_single"] = table["cv"] - table["fresh_single"]
    return table, agree


def headline(table: pd.DataFrame) -> tuple[str, str]:
    """(the row CV chooses among the pseudo rows, the final `name=value` line) of the table."""
    by = table.set_index("row")
    leaky = [r for r in by.index if r.startswith("leaky")]
    honest = by.drop(index=leaky)
    chosen = by.loc[[r for r in by.index if r.startswith("pseudo")], "cv"].idxmax()
    pseudo, base = by.loc[chosen, "test"], by.loc["baseline", "test"]
    figures = {"baseline": base, "pseudo": pseudo, "distill": by.loc["distill", "test"],
               "pseudo_gain_points": pseudo - base}
    gaps = (("max_cv_test_gap_points", "leaky_gap_points", "cv_minus_test"),
            ("max_cv_single_test_gap_points", "leaky_single_gap_points", "cv_minus_test_single"),
            ("max_cv_fresh_single_gap_points", "leaky_fresh_single_gap_points",
             "cv_minus_fresh_single"))
    for honest_name, leaky_name, column in gaps:
        if column in by.columns:
            figures[honest_name] = honest[column].abs().max()
            figures[leaky_name] = by.loc[leaky, column].max()
    return chosen, " ".join(f"{k}={v:.2f}" for k, v in figures.items())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="mixcls data fashion-mnist --limit 25000 output")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_teachers"))
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK.labelled} labelled, {QUICK.unlabelled} unlabelled, 1 epoch (a smoke run)")
    parser.add_argument("--labelled", type=int, default=None,
                        help=f"labelled rows (default {FULL.labelled}, --quick {QUICK.labelled})")
    parser.add_argument("--unlabelled", type=int, default=None,
                        help=f"unlabelled rows (default {FULL.unlabelled}, --quick {QUICK.unlabelled})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"default {FULL.epochs}, --quick {QUICK.epochs}")
    parser.add_argument("--threshold", type=float, default=0.9, help="pseudo-label confidence threshold")
    parser.add_argument("--max-per-class", type=int, default=None,
                        help="pseudo rows kept per class per fold (the most confident; default: all that pass)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="pseudo-label rounds (round r >= 2 is taught by round r-1's student)")
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--preset", default="none",
                        help="every run's training augmentation (the teachers predict without it)")
    parser.add_argument("--fresh", type=Path, default=None,
                        help="a `mixcls data fashion-mnist` export with more training images (all "
                             "60,000: no --limit); --fresh-rows of them that are in neither of DATA's "
                             "splits (by their pixels) are scored like the test images")
    parser.add_argument("--fresh-rows", type=int, default=10000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for flag in ("rounds", "labelled", "unlabelled", "epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"--{flag} must be at least 1, got {value}")
    for name in ("train.csv", "train_images", "test.csv", "test_images"):
        if not (args.data / name).exists():
            raise SystemExit(f"{args.data / name} does not exist; export with mixcls data fashion-mnist")
    check_fresh_export(args.fresh)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    sizes = Sizes(args.labelled or base.labelled, args.unlabelled or base.unlabelled,
                  args.epochs or base.epochs, base.folds)
    labelled, unlabelled = split_rows(args.data, args.work, sizes, args.seed)
    fresh = (fresh_rows(args.data, args.fresh, args.work, args.fresh_rows, args.seed)
             if args.fresh else None)
    bench = Bench(args.data, args.work, labelled, unlabelled, sizes, args.threshold,
                  args.max_per_class, args.device, args.threads, args.preset)
    runs = train_rows(bench, rounds=args.rounds, distill_weight=args.distill_weight)
    table, agree = score_rows(runs, bench, args.fresh, fresh)
    print(f"Fashion-MNIST: {sizes.labelled} labelled ({sizes.folds} folds), {sizes.unlabelled} "
          f"unlabelled, {len(pd.read_csv(args.data / 'test.csv'))} test images; mixcls_cnn_tiny "
          f"28 px, preset {args.preset}, {sizes.epochs} epochs, threshold {args.threshold}, "
          + (f"at most {args.max_per_class} pseudo rows per class per fold" if args.max_per_class
             else "every passing pseudo row") + f", distill weight {args.distill_weight}")
    if fresh is not None:
        print(f"fresh: {len(pd.read_csv(fresh))} images of {args.fresh}/train.csv in neither split "
              f"of {args.data} (by their pixels), scored like the test images")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    chosen, line = headline(table)
    print(f"pseudo row chosen by CV: {chosen}; mixcls predict vs the mean of its fold models' "
          f"probabilities: max |diff| {agree:.2e}")
    others = {n: d for n, d in runs.items() if n != chosen and not n.startswith("leaky")}
    print(f"CV of each other per-fold row minus {chosen}'s, paired on the OOF rows:")
    print(cv_leads(runs[chosen], others).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
