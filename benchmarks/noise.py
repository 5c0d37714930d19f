"""Noisy labels on Fashion-MNIST: robust losses and clean-then-retrain against training on the
clean labels, and how well `mixcls noise` finds the labels we flipped on purpose.

Training labels are flipped on purpose; the official 10,000-image test set keeps its labels
and scores every model. Noise settings:
  sym20, sym40  20 % / 40 % of the rows get a uniformly drawn *other* class
  pair20        20 % of the shirts (class 6) are labelled T-shirt/top (class 0) and
                20 % of the T-shirts/tops are labelled shirt (class-pair flip)
Per setting:
  1. k-fold CE run (`mixcls train`): its OOF probabilities feed `mixcls noise` (precision and
     recall against the flipped rows); its fold-0 model is the CE entry of the loss table
     (fit_fold seeds each fold from (seed, fold), so it is the model a one-fold CE run trains).
  2. label_smoothing, bi_tempered (t1=0.8, t2=1.4), symmetric_ce, taylor_ce: fold 0 only.
  3. clean-then-retrain: `mixcls clean --policy drop` (and, budget allowing, relabel) on the
     k-fold run, then CE on the cleaned table, fold 0 only (the cleaned table carries the run's
     folds; validation keeps the given labels).
Every loss-table entry is one model trained on the same (k-1)/k of the rows and scored on the
clean test set; the reference is CE on the clean labels, same split size, also trained with
two more seeds to show how much one seed's accuracy moves by chance.

Jobs run in priority order (the clean reference, then sym20 complete, then detection and
clean-then-retrain for sym40 and pair20, then their loss rows, the reference's extra seeds and
the relabel policy); an optional job (all but the reference and sym20) whose estimated time
would overrun --budget-minutes is skipped and shown as "cut".

    nice -n 5 python benchmarks/noise.py [--quick] [--work DIR] [--budget-minutes 75]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from mixcls.cli import main as mixcls_main
from mixcls.config import load_config
from mixcls.data import load_image_cache, prob_columns
from mixcls.noise import DEFAULT_METHOD
from mixcls.predict import load_fold_models, predict_fold_outputs, predict_run
from mixcls.runs import RunFolder
from mixcls.train import fit_folds

NUM_CLASSES = 10
SHIRT, TSHIRT = 6, 0
SETTINGS = ("sym20", "sym40", "pair20")
ROBUST_LOSSES = ("label_smoothing", "bi_tempered", "symmetric_ce", "taylor_ce")
METHODS = ("ce",) + ROBUST_LOSSES + ("clean+retrain", "relabel+retrain")
# Seeds of the extra reference runs that show how far one seed's accuracy moves by chance.
SPREAD_SEEDS = (1, 2)
# Act on every suspect cleanlab flags at these noise rates (the CLI's 0.2 cap would bind at 40 %).
CLEAN_MAX_FRACTION = 0.5
# cleanlab filters compared on the same OOF probabilities; the first is `mixcls noise`'s default,
# the one the headline figures and clean-then-retrain use.
DETECTORS = (DEFAULT_METHOD, "low_normalized_margin", "prune_by_noise_rate", "both")


@dataclass
class Sizes:
    limit: int
    test_limit: int | None
    epochs: int
    folds: int
    settings: tuple[str, ...]


FULL = Sizes(limit=10_000, test_limit=None, epochs=12, folds=3, settings=SETTINGS)
QUICK = Sizes(limit=2_000, test_limit=2_000, epochs=3, folds=3, settings=("sym20",))


@dataclass
class Bench:
    """What the jobs share: data, sizes, results, and the clock of the time budget."""

    work: Path
    data: Path
    sizes: Sizes
    train_options: dict
    test_paths: list[str]
    test_labels: np.ndarray
    test_cache: list[np.ndarray]
    clean_labels: np.ndarray
    image_ids: list[str]
    budget_s: float
    started: float = field(default_factory=time.perf_counter)
    accuracy: dict = field(default_factory=dict)      # (method, setting) -> test accuracy
    detection: dict = field(default_factory=dict)     # setting -> dict of counts and scores
    flipped: dict = field(default_factory=dict)       # setting -> (N,) bool
    noisy_csv: dict = field(default_factory=dict)     # setting -> Path
    cut: list = field(default_factory=list)
    unit_seconds: list = field(default_factory=list)  # seconds per fold trained (measured)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def flip_symmetric(labels: np.ndarray, rate: float, *, num_classes: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask), both (N,): round(rate N) rows get a uniform other class."""
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.choice(len(labels), size=round(rate * len(labels)), replace=False)] = True
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, size=flipped.sum())) % num_classes
    return noisy, flipped


def flip_pair(labels: np.ndarray, rate: float, *, a: int, b: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask): round(rate n_a) rows of class a become b, and vice versa."""
    noisy, flipped = labels.copy(), np.zeros(len(labels), dtype=bool)
    for src, dst in ((a, b), (b, a)):
        rows = np.flatnonzero(labels == src)
        chosen = rng.choice(rows, size=round(rate * len(rows)), replace=False)
        noisy[chosen], flipped[chosen] = dst, True
    return noisy, flipped


def make_noisy_labels(setting: str, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, SETTINGS.index(setting)])
    if setting == "pair20":
        return flip_pair(labels, 0.2, a=SHIRT, b=TSHIRT, rng=rng)
    rate = {"sym20": 0.2, "sym40": 0.4}[setting]
    return flip_symmetric(labels, rate, num_classes=NUM_CLASSES, rng=rng)


def export_data(work: Path, sizes: Sizes, source: str) -> Path:
    """`mixcls data fashion-mnist` into work/, reused when already there."""
    out = work / f"fmnist_{sizes.limit}_{sizes.test_limit or 'all'}"
    if not (out / "test.csv").is_file():
        argv = ["data", "fashion-mnist", "--from", source, "--out", str(out), "--limit", str(sizes.limit)]
        if sizes.test_limit:
            argv += ["--test-limit", str(sizes.test_limit)]
        with contextlib.redirect_stdout(sys.stderr):
            code = mixcls_main(argv)
        if code != 0:
            raise SystemExit("export of Fashion-MNIST failed")
    return out


def train_run(bench: Bench, csv: Path, out: Path, *, loss: str, train_folds: list[int] | None,
              seed: int | None = None) -> Path:
    """`mixcls train` (through fit_folds) on `csv`; fold 0 only or all folds."""
    overrides = dict(bench.train_options, csv=str(csv), images=str(bench.data / "train_images"),
                     loss=loss, folds=bench.sizes.folds, epochs=bench.sizes.epochs)
    if seed is not None:
        overrides["seed"] = seed
    if train_folds is not None:
        overrides["train_folds"] = train_folds
    if loss == "bi_tempered":
        overrides.update(t1=0.8, t2=1.4)
    cfg = load_config(None, overrides)
    fit_folds(cfg, out, progress=False, log=lambda msg: log(f"  [{out.name}] {msg}"))
    return out


def predict_test(bench: Bench, run_dir: Path, *, fold: int = 0, n: int | None = None) -> np.ndarray:
    """(n, K) probabilities of the run's fold `fold` model on the first n clean test images.

    The library's predict_run would decode the 10,000 test PNGs again for each of ~20 models;
    here they are decoded once (bench.test_cache) and fed to the library's predict_fold_outputs
    (the same transform and `evaluate`). job_reference checks once that both agree.
    """
    classes = RunFolder(run_dir).classes
    if classes != [str(k) for k in range(NUM_CLASSES)]:
        raise SystemExit(f"{run_dir}: classes {classes}; expected the digits 0..9 of the noisy CSVs")
    models = [m for m in load_fold_models(run_dir, torch.device("cpu")) if m.fold == fold]
    if len(models) != 1:
        raise SystemExit(f"{run_dir}: no fold {fold} checkpoint")
    n = len(bench.test_paths) if n is None else n
    outputs = predict_fold_outputs(models, bench.test_paths[:n], device=torch.device("cpu"),
                                   views=("orig",), batch_size=512, cache=bench.test_cache[:n])
    return outputs.probs[0]


def clean_test_accuracy(bench: Bench, run_dir: Path, *, fold: int = 0) -> float:
    """Accuracy of the run's fold `fold` model on the clean test set."""
    return float((predict_test(bench, run_dir, fold=fold).argmax(1) == bench.test_labels).mean())


def find_flipped(bench: Bench, setting: str, run_dir: Path) -> dict:
    """`mixcls noise --method M` on the run for every M of DETECTORS: precision and recall of
    its suspects against the flipped rows. The default method's figures are the top-level keys."""
    flipped = set(np.asarray(bench.image_ids)[bench.flipped[setting]])
    by_method = {}
    for method in DETECTORS:
        suspects_csv = bench.work / f"suspects_{setting}_{method}.csv"
        with contextlib.redirect_stdout(sys.stderr):
            code = mixcls_main(["noise", "--run", str(run_dir), "--out", str(suspects_csv), "--method", method])
        if code != 0:
            raise SystemExit(f"mixcls noise --method {method} failed on {run_dir}")
        flagged = set(pd.read_csv(suspects_csv, dtype={"image_id": str})["image_id"])
        hits = len(flagged & flipped)
        by_method[method] = {"flagged": len(flagged), "hits": hits,
                             "precision": hits / len(flagged) if flagged else float("nan"),
                             "recall": hits / len(flipped)}
    run = RunFolder.open(run_dir)
    probs = run.read_oof()[prob_columns(NUM_CLASSES)].to_numpy()
    return {"flipped": len(flipped), **by_method[DEFAULT_METHOD], "methods": by_method,
            "cv_accuracy": run.metrics["cv_accuracy"],
            "oof_true_accuracy": float((probs.argmax(1) == bench.clean_labels).mean())}


def job_reference(bench: Bench) -> None:
    csv = bench.work / "labels_clean.csv"
    pd.DataFrame({"image_id": bench.image_ids, "label": bench.clean_labels}).to_csv(csv, index=False)
    run = train_run(bench, csv, bench.work / "run_clean_ce", loss="ce", train_folds=[0])
    bench.accuracy[("ce", "clean")] = clean_test_accuracy(bench, run)
    # Once: the library's predictor (a one-fold run: its "ensemble" is fold 0) agrees with ours.
    library = predict_run(run, bench.test_paths[:512], device="cpu", batch_size=256)
    ours = predict_test(bench, run, n=512)
    if not np.allclose(library, ours, atol=1e-5):
        raise SystemExit(f"test scoring disagrees with predict_run by {np.abs(library - ours).max():.2e}")


def job_kfold(bench: Bench, setting: str) -> None:
    """Noisy labels, k-fold CE: detection scores and the CE entry (fold 0)."""
    noisy, flipped = make_noisy_labels(setting, bench.clean_labels, seed=0)
    bench.flipped[setting] = flipped
    csv = bench.work / f"labels_{setting}.csv"
    pd.DataFrame({"image_id": bench.image_ids, "label": noisy}).to_csv(csv, index=False)
    bench.noisy_csv[setting] = csv
    run = train_run(bench, csv, bench.work / f"run_{setting}_kfold_ce", loss="ce", train_folds=None)
    bench.accuracy[("ce", setting)] = clean_test_accuracy(bench, run, fold=0)
    bench.detection[setting] = find_flipped(bench, setting, run)


def job_clean_retrain(bench: Bench, setting: str, policy: str) -> None:
    """`mixcls clean --policy drop|relabel` on the k-fold run, then CE on the cleaned table."""
    run = bench.work / f"run_{setting}_kfold_ce"
    cleaned = bench.work / f"clean_{setting}_{policy}.csv"
    with contextlib.redirect_stdout(sys.stderr):
        code = mixcls_main(["clean", "--run", str(run), "--policy", policy, "--out", str(cleaned),
                            "--max-fraction", str(CLEAN_MAX_FRACTION)])
    if code != 0:
        raise SystemExit(f"mixcls clean failed on {run}")
    table = pd.read_csv(cleaned, dtype={"image_id": str, "label": str, "label_given": str})
    if policy == "drop":
        acted = set(table["image_id"][table["keep"] == 0])
        flipped = set(np.asarray(bench.image_ids)[bench.flipped[setting]])
        bench.detection[setting].update(dropped=len(acted), dropped_flipped=len(acted & flipped))
    else:
        changed = (table["label"] != table["label_given"]).to_numpy()
        truly = table["label"].to_numpy(dtype=np.int64) == bench.clean_labels
        bench.detection[setting].update(relabelled=int(changed.sum()),
                                        relabelled_right=int((changed & truly).sum()))
    retrained = train_run(bench, cleaned, bench.work / f"run_{setting}_{policy}_retrain", loss="ce",
                          train_folds=[0])
    name = "clean+retrain" if policy == "drop" else "relabel+retrain"
    bench.accuracy[(name, setting)] = clean_test_accuracy(bench, retrained)


def job_seed_spread(bench: Bench, seed: int) -> None:
    """The clean reference again with another seed (other folds and initial weights)."""
    csv = bench.work / "labels_clean.csv"
    run = train_run(bench, csv, bench.work / f"run_clean_ce_seed{seed}", loss="ce", train_folds=[0],
                    seed=seed)
    bench.accuracy[("ce", f"clean_seed{seed}")] = clean_test_accuracy(bench, run)


def job_loss(bench: Bench, setting: str, loss: str) -> None:
    run = train_run(bench, bench.noisy_csv[setting], bench.work / f"run_{setting}_{loss}", loss=loss,
                    train_folds=[0])
    bench.accuracy[(loss, setting)] = clean_test_accuracy(bench, run)


@dataclass
class Job:
    name: str
    folds_trained: int
    run: Callable[[Bench], None]
    required: bool  # required jobs ignore the budget
    needs: str | None = None  # name of the job whose run folder or CSV this one uses


def plan_jobs(sizes: Sizes) -> list[Job]:
    """Every job in priority order: the reference, sym20 complete, then the other settings'
    detection and clean-then-retrain, then their robust-loss rows."""
    jobs = [Job("reference: ce on clean labels", 1, job_reference, True)]
    for setting in sizes.settings:
        required = setting == "sym20"
        kfold = f"{setting}: k-fold ce + mixcls noise"
        jobs.append(Job(kfold, sizes.folds, lambda b, s=setting: job_kfold(b, s), required))
        jobs.append(Job(f"{setting}: clean (drop) + retrain ce", 1,
                        lambda b, s=setting: job_clean_retrain(b, s, "drop"), required, kfold))
        if required:
            jobs += [Job(f"{setting}: {loss}", 1, lambda b, s=setting, l=loss: job_loss(b, s, l), True, kfold)
                     for loss in ROBUST_LOSSES]
    for setting in sizes.settings:
        if setting != "sym20":
            jobs += [Job(f"{setting}: {loss}", 1, lambda b, s=setting, l=loss: job_loss(b, s, l), False,
                         f"{setting}: k-fold ce + mixcls noise") for loss in ROBUST_LOSSES]
    jobs += [Job(f"reference again, seed {seed}", 1, lambda b, s=seed: job_seed_spread(b, s), False)
             for seed in SPREAD_SEEDS]
    jobs += [Job(f"{setting}: clean (relabel) + retrain ce", 1,
                 lambda b, s=setting: job_clean_retrain(b, s, "relabel"), False,
                 f"{setting}: k-fold ce + mixcls noise") for setting in sizes.settings]
    return jobs


def run_jobs(bench: Bench, jobs: list[Job]) -> None:
    """Run the jobs in order; skip an optional one whose estimated time would overrun the budget
    (estimate: folds it trains x the mean measured seconds per trained fold so far)."""
    done: set[str] = set()
    for job in jobs:
        elapsed = time.perf_counter() - bench.started
        estimate = job.folds_trained * float(np.mean(bench.unit_seconds)) if bench.unit_seconds else 0.0
        if job.needs is not None and job.needs not in done:
            bench.cut.append(job.name)
            continue
        if not job.required and elapsed + estimate > bench.budget_s:
            bench.cut.append(job.name)
            log(f"cut (budget): {job.name} (~{estimate:.0f} s; {elapsed:.0f} s used)")
            continue
        log(f"job: {job.name}")
        start = time.perf_counter()
        job.run(bench)
        seconds = time.perf_counter() - start
        bench.unit_seconds.append(seconds / job.folds_trained)
        done.add(job.name)
        log(f"job done in {seconds:.0f} s: {job.name} (total {time.perf_counter() - bench.started:.0f} s)")


TITLES = {"clean+retrain": "clean (drop) + retrain ce", "relabel+retrain": "clean (relabel) + retrain ce"}


def print_tables(bench: Bench) -> None:
    columns = ("clean",) + bench.sizes.settings
    n_train = len(bench.image_ids) * (bench.sizes.folds - 1) // bench.sizes.folds
    print(f"test accuracy (%) on the clean Fashion-MNIST test set ({len(bench.test_labels)} images); "
          f"each model: fold 0 of {bench.sizes.folds} folds, ~{n_train} training images, "
          f"{bench.sizes.epochs} epochs, seed 42")
    print(f"{'method':<30}" + "".join(f"{c:>9}" for c in columns))
    rows = [("clean labels (ce)", "ce", ("clean",))]
    rows += [(TITLES.get(m, m), m, bench.sizes.settings) for m in METHODS]
    for title, method, cols in rows:
        cells = []
        for c in columns:
            if c not in cols:
                cells.append("")
            elif (method, c) in bench.accuracy:
                cells.append(f"{100 * bench.accuracy[(method, c)]:.2f}")
            else:
                cells.append("cut")
        print(f"{title:<30}" + "".join(f"{v:>9}" for v in cells))
    extra = [("ce", f"clean_seed{seed}") for seed in SPREAD_SEEDS]
    spread = [bench.accuracy[("ce", "clean")]] + [bench.accuracy[k] for k in extra if k in bench.accuracy]
    if len(spread) > 1:
        print(f"clean labels (ce) with seeds 42, {', '.join(map(str, SPREAD_SEEDS[:len(spread) - 1]))}: "
              f"{' / '.join(f'{100 * a:.2f}' for a in spread)} "
              f"(range {100 * (max(spread) - min(spread)):.2f} points: what one seed moves by chance)")
    print()
    print(f"noise detection: `mixcls noise` (default --method {DEFAULT_METHOD}) on the {bench.sizes.folds}-fold "
          f"CE run's OOF (cv_acc: OOF accuracy against the noisy labels, true_acc: against the true "
          f"ones); `mixcls clean --max-fraction {CLEAN_MAX_FRACTION}`: drop excludes, relabel relabels the rows")
    print(f"{'setting':<8}{'flipped':>9}{'flagged':>9}{'precision':>11}{'recall':>8}{'cv_acc':>8}{'true_acc':>9}"
          f"{'dropped':>9}{'(flipped)':>11}{'relabelled':>12}{'(to true)':>11}")
    for setting in bench.sizes.settings:
        d = bench.detection.get(setting)
        if d is None:
            print(f"{setting:<8}{'cut':>9}")
            continue
        print(f"{setting:<8}{d['flipped']:>9}{d['flagged']:>9}{d['precision']:>11.3f}{d['recall']:>8.3f}"
              f"{d['cv_accuracy']:>8.3f}{d['oof_true_accuracy']:>9.3f}{d.get('dropped', '-'):>9}"
              f"{d.get('dropped_flipped', '-'):>11}{d.get('relabelled', '-'):>12}{d.get('relabelled_right', '-'):>11}")
    print()
    print("every `mixcls noise --method` on the same OOF probabilities: flagged / precision / recall")
    print(f"{'method':<24}" + "".join(f"{s:>24}" for s in bench.sizes.settings))
    for method in DETECTORS:
        cells = []
        for setting in bench.sizes.settings:
            m = bench.detection.get(setting, {}).get("methods", {}).get(method)
            cells.append("cut" if m is None else f"{m['flagged']} / {m['precision']:.3f} / {m['recall']:.3f}")
        print(f"{method:<24}" + "".join(f"{c:>24}" for c in cells))
    if bench.cut:
        print(f"cut by the time budget: {'; '.join(bench.cut)}")


def summary_line(bench: Bench) -> str:
    d = bench.detection["sym20"]
    best = max(bench.accuracy[(m, "sym20")] for m in METHODS if (m, "sym20") in bench.accuracy)
    gap = 100 * (bench.accuracy[("ce", "clean")] - best)
    return f"precision_sym20={d['precision']:.3f} recall_sym20={d['recall']:.3f} best_gap_sym20={gap:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2,000 training and 2,000 test images, 3 epochs, sym20 only")
    parser.add_argument("--work", help="folder for the data and the runs (default: a new temporary one)")
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--budget-minutes", type=float, default=75.0,
                        help="skip optional jobs (beyond the reference and sym20) that would overrun this")
    parser.add_argument("--model", default="mixcls_cnn_tiny")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 because on 2 shared, busy cores two threads spin-wait "
                             "(measured here: a 28 px batch of 64 took 4x longer with 2 threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="noise_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"work folder {work}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    data = export_data(work, sizes, args.source)
    train = pd.read_csv(data / "train.csv", dtype={"image_id": str})
    test = pd.read_csv(data / "test.csv", dtype={"image_id": str})
    test_paths = [str(data / "test_images" / i) for i in test["image_id"]]
    bench = Bench(
        work=work, data=data, sizes=sizes,
        train_options=dict(model=args.model, img_size=28, batch_size=128, lr=3e-3, preset="none",
                           workers=0, cache_images="yes", check_images="header", device="cpu",
                           amp="none", seed=42),
        test_paths=test_paths, test_labels=test["label"].to_numpy(dtype=np.int64),
        test_cache=load_image_cache(test_paths, mode="yes"),
        clean_labels=train["label"].to_numpy(dtype=np.int64), image_ids=train["image_id"].tolist(),
        budget_s=60 * args.budget_minutes)
    run_jobs(bench, plan_jobs(sizes))
    minutes = (time.perf_counter() - bench.started) / 60
    print(f"model {args.model}, 28 px, batch 128, AdamW lr 3e-3 cosine, preset none, fp32, "
          f"{torch.get_num_threads()} torch thread(s); {minutes:.1f} min wall, load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print_tables(bench)
    print(summary_line(bench))
    return 0


if __name__ == "__main__":
    sys.exit(main())
