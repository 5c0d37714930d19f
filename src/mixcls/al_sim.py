"""Active-learning simulation on a fully labelled dataset: hide the labels, query, reveal, retrain.

Each strategy starts from the same random `start` rows of the pool (per seed); each round
trains a model on the labelled rows with the real trainer (`train.fit_fold`), measures its
accuracy on a held-out set, scores the rest of the pool and reveals the labels of the `budget`
rows `active.select` chooses. The product is a learning curve: labels used -> held-out accuracy.

Choices that keep the comparison honest:
- The held-out set never reaches training or model selection: each round's model is the one
  at the end of its `epochs` (fit_fold's last.pt), the usual protocol of active-learning
  studies. fit_fold's per-epoch validation runs on at most MONITOR_ROWS of the labelled rows,
  the only labels a real project would have; it feeds history and --patience only.
- Every strategy of one seed trains with the same seeds (round r's model starts from the same
  weights and sees the same batch order whatever chose its rows), so curves differ by the rows
  chosen, not by initialisation luck; and their round-0 models are literally shared.
- BALD needs several models' probabilities: it trains an ensemble of `bald_members` models on
  the same labelled rows with different seeds (deep-ensemble BALD, Beluch et al. 2018) rather
  than MC dropout, because the mixcls models carry at most one dropout layer before the
  classifier, too little to approximate a posterior, and a dropout model would be a different
  learner from the one the other strategies train. The accuracy on the curve is member 0's, the
  same learner as every other strategy; the ensemble's extra training and scoring is compute
  the other strategies do not get, and the timings in curve.csv show it.
- With `candidates` a round scores only a random subset of the unlabelled rows (the same for
  every strategy in round 0), as Gal et al. (2017) did to keep BALD affordable.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from mixcls.active import STRATEGIES, select
from mixcls.config import Config, ConfigError, dump_config
from mixcls.data import DataError, TrainTable, load_image_cache, load_train_table
from mixcls.runs import (RunError, atomic_save_figure, atomic_write_csv, atomic_write_json,
                         atomic_write_text, check_writable)
from mixcls.devices import amp_setup, resolve_device
from mixcls.predict import LoadedModel, load_model, predict_fold_outputs
from mixcls.run_setup import make_fold_data
from mixcls.sampling import derive_seed
from mixcls.train import fit_fold

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVE_COLUMNS = ["strategy", "seed", "round", "labels", "accuracy", "members", "train_seconds",
                 "score_seconds"]
SELECTION_COLUMNS = ["strategy", "seed", "round", "row", "image_id", "rank", "score"]
# fit_fold validates after every epoch; on all labelled rows that pass cost a third of the
# training time here, for numbers the simulation does not use (it keeps the final weights).
MONITOR_ROWS = 64
# Seed offset of the extra BALD ensemble members: far from the small seeds people pass.
MEMBER_SEED_TAG = 7919


@dataclass
class SimData:
    """The pool (labels hidden from the strategies until revealed) and the held-out set."""

    pool: TrainTable
    test_paths: list[str]
    test_labels: np.ndarray  # (M,) int
    holdout_source: str  # "test.csv" or "holdout 0.2 of train.csv"
    pool_cache: list[np.ndarray] | None = None
    test_cache: list[np.ndarray] | None = None


@dataclass
class Member:
    """A model trained on one labelled set, and its held-out accuracy (NaN for members > 0)."""

    model: torch.nn.Module
    accuracy: float
    train_seconds: float


# --- seeds -------------------------------------------------------------------------------------

def selection_seed(seed: int, step: int) -> int:
    """Seed of `select` at `step`: 0 draws the start set, r >= 1 the rows revealed for round r."""
    return derive_seed(seed, step)


def candidate_rows(unlabelled: np.ndarray, *, candidates: int | None, seed: int, step: int) -> np.ndarray:
    """The unlabelled rows a round scores: all of them, or (sorted) a random `candidates` of them.

    Scoring a random subset of the pool each round is how Gal et al. (2017) kept BALD
    affordable; the subset depends on (seed, step) only, so every strategy of a seed scores the
    same candidates in round 0.
    """
    if candidates is None or candidates >= len(unlabelled):
        return unlabelled
    rng = np.random.default_rng(derive_seed(seed, step, 1))
    return np.sort(rng.choice(unlabelled, size=candidates, replace=False))


def member_seed(seed: int, member: int) -> int:
    """Training seed of ensemble member `member`; member 0 is the learner of every strategy."""
    return seed if member == 0 else derive_seed(seed, MEMBER_SEED_TAG, member)


# --- checks and data ---------------------------------------------------------------------------

def parse_strategies(text: str | Sequence[str]) -> list[str]:
    """'random,margin' or a list -> names, checked against active.STRATEGIES, duplicates refused."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise ConfigError(f"strategy: unknown {', '.join(repr(s) for s in unknown) or 'empty list'}; "
                          f"use one or more (comma-separated) of {', '.join(sorted(STRATEGIES))}")
    if len(set(names)) != len(names):
        raise ConfigError(f"strategy: {','.join(names)} names a strategy twice")
    return names


def check_settings(*, strategies: Sequence[str], start: int, budget: int, rounds: int,
                   seeds: Sequence[int], bald_members: int, holdout: float,
                   candidates: int | None = None) -> None:
    """Raise ConfigError naming the first bad setting (the pool size is checked later)."""
    parse_strategies(strategies)
    for name, value, low in (("start", start, 1), ("budget", budget, 1), ("rounds", rounds, 1),
                             ("seeds", len(seeds), 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"{name}: {value!r} must be an integer >= {low}")
    bad_seeds = [s for s in seeds if not isinstance(s, (int, np.integer)) or s < 0]
    if bad_seeds:
        raise ConfigError(f"seeds: {bad_seeds} must be integers >= 0")
    if "bald" in strategies and bald_members < 2:
        raise ConfigError(f"bald_members: {bald_members} must be >= 2 (BALD measures disagreement)")
    if candidates is not None and candidates < budget:
        raise ConfigError(f"candidates: {candidates} must be at least the budget {budget} (or all)")
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"holdout: {holdout} must be in (0, 1)")


def load_sim_data(cfg: Config, *, holdout: float, split_seed: int = 0) -> SimData:
    """The training table as the pool and a held-out set: DATA/test.csv + DATA/test_images when
    the data folder has them (`mixcls data` writes them), else a stratified `holdout` fraction
    of the training table (split by `split_seed`, the same for every simulation seed)."""
    for key, value in (("group_col", cfg.data.group_col), ("train_only_col", cfg.data.train_only_col)):
        if value is not None:  # the simulation draws its own labelled sets; it would ignore them
            raise ConfigError(f"{key} {value!r}: al-sim does not use it (it labels rows of one "
                              "pool and retrains from scratch); drop the flag")
    table = load_train_table(cfg.data.data, csv=cfg.data.csv, images=cfg.data.images,
                             id_col=cfg.data.id_col, label_col=cfg.data.label_col,
                             check_images=cfg.data.check_images)
    folder = Path(cfg.data.data) if cfg.data.data is not None else None
    if folder is not None and (folder / "test.csv").is_file() and (folder / "test_images").is_dir():
        test = load_train_table(folder, csv=folder / "test.csv", images=folder / "test_images",
                                id_col=cfg.data.id_col, label_col=cfg.data.label_col,
                                check_images=cfg.data.check_images, classes=table.classes)
        return SimData(table, test.frame["path"].tolist(), test.labels, "test.csv")
    from sklearn.model_selection import train_test_split

    counts = np.bincount(table.labels, minlength=table.num_classes)
    if counts[counts > 0].min() < 2:
        raise DataError(f"{table.csv_path or table.images_dir}: a stratified holdout needs every class "
                        f"at least twice; counts {counts.tolist()} (or give DATA/test.csv)")
    pool_rows, test_rows = train_test_split(np.arange(len(table.frame)), test_size=holdout,
                                            stratify=table.labels, random_state=split_seed)
    pool_rows, test_rows = np.sort(pool_rows), np.sort(test_rows)
    soft = table.soft_targets[pool_rows] if table.soft_targets is not None else None
    pool = TrainTable(frame=table.frame.iloc[pool_rows].reset_index(drop=True), classes=table.classes,
                      images_dir=table.images_dir, csv_path=table.csv_path,
                      integer_labels=table.integer_labels, soft_targets=soft)
    return SimData(pool, table.frame["path"].to_numpy()[test_rows].tolist(), table.labels[test_rows],
                   f"holdout {holdout:g} of the training table ({len(test_rows)} rows)")


def check_pool_size(data: SimData, *, start: int, budget: int, rounds: int) -> None:
    n = len(data.pool.frame)
    need = start + rounds * budget
    if start > n or need > n:
        raise DataError(f"the pool has {n} images ({data.holdout_source} held out), but --start {start} "
                        f"+ --rounds {rounds} x --budget {budget} = {need} labels are asked for")


# --- one model: train, load, forward --------------------------------------------------------------

def _quiet(message: str) -> None:
    """fit_fold's per-epoch lines would drown the simulation's per-round ones."""


@dataclass
class _Run:
    """What every round of a simulation reads: config, data, device and the shared round-0 models."""

    cfg: Config
    data: SimData
    device: torch.device
    amp_dtype: torch.dtype | None
    batch_size: int
    workdir: Path
    bald_members: int
    shared: dict[tuple[int, int], Member]
    min_steps: int | None = None
    shared_outputs: dict[int, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)

    def pool_outputs(self, member: int, trained: Member, pool_rows: np.ndarray, *,
                     round_index: int) -> tuple[np.ndarray, np.ndarray]:
        """probs and features of the unlabelled rows; round 0's are shared by every strategy
        of a seed (same rows, same model), so they are computed once, features included."""
        if round_index == 0 and member in self.shared_outputs:
            return self.shared_outputs[member]
        outputs = self.forward(trained.model, pool_rows, features=True)
        if round_index == 0:
            self.shared_outputs[member] = outputs
        return outputs

    def forward(self, model: torch.nn.Module, rows: np.ndarray | None, *, test: bool = False,
                features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        if test:
            paths, cache = self.data.test_paths, self.data.test_cache
        else:
            all_paths = self.data.pool.frame["path"].tolist()
            paths = [all_paths[i] for i in rows]
            cache = [self.data.pool_cache[i] for i in rows] if self.data.pool_cache is not None else None
        # The plain view only (no TTA); probs and features of one pass over the images.
        outputs = predict_fold_outputs([LoadedModel(model, self.cfg, self.data.pool.classes, 0)], paths,
                                       device=self.device, views=("orig",), batch_size=self.batch_size,
                                       workers=self.cfg.data.workers, amp_dtype=self.amp_dtype,
                                       features=features, cache=cache)
        probs = outputs.probs[0].astype(np.float64)
        return probs, (outputs.features[0].astype(np.float64) if features else None)


def monitor_rows(rows: np.ndarray, *, limit: int = MONITOR_ROWS) -> np.ndarray:
    """At most `limit` of the labelled `rows`, evenly spaced: fit_fold's validation rows."""
    if len(rows) <= limit:
        return rows
    return rows[np.linspace(0, len(rows) - 1, limit).round().astype(np.int64)]


def round_epochs(epochs: int, *, n_rows: int, batch_size: int, accum_steps: int = 1,
                 min_steps: int | None = None) -> int:
    """Epochs one round trains: `epochs`, raised until the round makes at least `min_steps`
    optimizer steps. A fixed epoch count gives the first rounds (a few hundred labels) a few dozen
    steps and an under-trained model, whose uncertainty says little; a step floor trains every
    round to a similar point, as active-learning studies that train to convergence do.
    """
    if not min_steps:
        return epochs
    batches = n_rows // batch_size if n_rows > batch_size else 1  # fit_fold drops a short last batch
    steps_per_epoch = -(-batches // accum_steps)
    return max(epochs, -(-min_steps // steps_per_epoch))


def train_member(run: _Run, rows: np.ndarray, *, seed: int, round_index: int, member: int) -> Member:
    """Train on pool rows `rows` with the real trainer and keep the final weights (last.pt);
    member 0 is also scored on the held-out set, which training never sees."""
    if round_index == 0 and (seed, member) in run.shared:
        return run.shared[(seed, member)]
    cfg = copy.deepcopy(run.cfg)
    cfg.train.seed = member_seed(seed, member)
    cfg.train.epochs = round_epochs(cfg.train.epochs, n_rows=len(rows), batch_size=cfg.train.batch_size,
                                    accum_steps=cfg.train.accum_steps, min_steps=run.min_steps)
    fold_dir = Path(tempfile.mkdtemp(prefix="member_", dir=run.workdir))
    started = time.perf_counter()
    try:
        data = make_fold_data(run.data.pool, rows, monitor_rows(rows), cache=run.data.pool_cache)
        fit_fold(cfg, data, fold=round_index, fold_dir=fold_dir, device=run.device, progress=False,
                 resume=False, log=_quiet)
        model = load_model(fold_dir / "last.pt", run.device).model  # the final weights, not the best
    finally:
        shutil.rmtree(fold_dir, ignore_errors=True)
    seconds = time.perf_counter() - started
    accuracy = float("nan")
    if member == 0:
        probs, _ = run.forward(model, None, test=True)
        accuracy = float((probs.argmax(1) == run.data.test_labels).mean())
    trained = Member(model, accuracy, seconds)
    if round_index == 0:
        run.shared[(seed, member)] = trained  # every strategy of this seed starts from these rows
    return trained


def strategy_inputs(run: _Run, strategy: str, members: list[Member], *, pool_rows: np.ndarray,
                    labelled: np.ndarray, round_index: int) -> dict[str, np.ndarray]:
    """The keyword arguments `active.select` needs for `strategy` on the unlabelled `pool_rows`."""
    needs = STRATEGIES[strategy].needs
    if not needs:  # random reads no model output; uniform probs only tell select the pool size
        k = run.data.pool.num_classes
        return {"probs": np.full((len(pool_rows), k), 1.0 / k)}
    if "fold_probs" in needs:
        return {"fold_probs": np.stack([run.pool_outputs(i, m, pool_rows, round_index=round_index)[0]
                                        for i, m in enumerate(members)])}
    probs, features = run.pool_outputs(0, members[0], pool_rows, round_index=round_index)
    inputs = {"probs": probs} if "probs" in needs else {}
    if "features" in needs:
        inputs["features"] = features
    if strategy == "coreset":
        # k-center greedy covers what the labelled rows do not: it starts from their features.
        inputs["labelled_features"] = run.forward(members[0].model, labelled, features=True)[1]
    return inputs


# --- the simulation ------------------------------------------------------------------------------

def _selection_rows(strategy: str, seed: int, round_index: int, rows: np.ndarray,
                    scores: np.ndarray, image_ids: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"strategy": strategy, "seed": seed, "round": round_index, "row": rows,
                         "image_id": image_ids[rows], "rank": np.arange(1, len(rows) + 1),
                         "score": scores}, columns=SELECTION_COLUMNS)


def start_rows(n_pool: int, *, start: int, seed: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The start set: `select("random")` on the whole pool with selection_seed(seed, 0).

    Returns (rows (start,) in pick order, their random scores); the same for every strategy.
    """
    uniform = np.full((n_pool, num_classes), 1.0 / num_classes)
    rows, scores = select("random", probs=uniform, budget=start, seed=selection_seed(seed, 0))
    return rows, scores[rows]


def run_strategy(run: _Run, strategy: str, *, seed: int, start: int, budget: int, rounds: int,
                 candidates: int | None = None,
                 log: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One learning curve: rounds + 1 trainings on start + r * budget labels, r = 0 … rounds.

    Returns (curve rows: CURVE_COLUMNS; selections: SELECTION_COLUMNS, round 0 = the start set,
    round r = the rows revealed before the r-th retraining, `row` indexing the pool table).
    """
    n_pool = len(run.data.pool.frame)
    image_ids = run.data.pool.frame["image_id"].to_numpy()
    members = run.bald_members if strategy == "bald" else 1
    first, first_scores = start_rows(n_pool, start=start, seed=seed, num_classes=run.data.pool.num_classes)
    selections = [_selection_rows(strategy, seed, 0, first, first_scores, image_ids)]
    labelled, curve = np.sort(first), []
    for round_index in range(rounds + 1):
        trained = [train_member(run, labelled, seed=seed, round_index=round_index, member=m)
                   for m in range(members)]
        started = time.perf_counter()
        if round_index < rounds:
            pool_rows = candidate_rows(np.setdiff1d(np.arange(n_pool), labelled),  # sorted
                                       candidates=candidates, seed=seed, step=round_index + 1)
            inputs = strategy_inputs(run, strategy, trained, pool_rows=pool_rows, labelled=labelled,
                                     round_index=round_index)
            picks, scores = select(strategy, budget=budget, seed=selection_seed(seed, round_index + 1),
                                   **inputs)
            selections.append(_selection_rows(strategy, seed, round_index + 1, pool_rows[picks],
                                              scores[picks], image_ids))
        score_seconds = time.perf_counter() - started
        curve.append({"strategy": strategy, "seed": seed, "round": round_index, "labels": len(labelled),
                      "accuracy": trained[0].accuracy, "members": members,
                      "train_seconds": sum(m.train_seconds for m in trained),
                      "score_seconds": score_seconds})
        log(f"{strategy} seed {seed} round {round_index}: {len(labelled)} labels, held-out accuracy "
            f"{trained[0].accuracy:.4f} (train {curve[-1]['train_seconds']:.1f} s, "
            f"score + select {score_seconds:.1f} s)")
        if round_index < rounds:
            labelled = np.sort(np.concatenate([labelled, pool_rows[picks]]))
    return pd.DataFrame(curve, columns=CURVE_COLUMNS), pd.concat(selections, ignore_index=True)


def summarise_curve(curve: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof 1; empty with one seed) of the held-out accuracy over seeds.

    Columns: strategy, round, labels, accuracy_mean, accuracy_std, seeds; strategies in their
    order of appearance.
    """
    grouped = curve.groupby(["strategy", "round", "labels"], sort=False)["accuracy"]
    summary = grouped.agg(accuracy_mean="mean", accuracy_std="std", seeds="count").reset_index()
    order = {name: i for i, name in enumerate(curve["strategy"].drop_duplicates())}
    return summary.sort_values(["strategy", "round"], key=lambda s: s.map(order) if s.name == "strategy"
                               else s, kind="stable").reset_index(drop=True)


def labels_to_reach(summary: pd.DataFrame, *, reference: str = "random") -> pd.DataFrame:
    """Labels each strategy needs to reach the reference's mean accuracy at its largest budget.

    `labels_needed` is the first measured label count whose mean accuracy is >= that target (so
    its resolution is one round's budget; NaN when never reached); `label_fraction` divides it by
    the reference's label count. Columns: strategy, target, reference_labels, labels_needed,
    label_fraction, final_accuracy.
    """
    ref = summary[summary["strategy"] == reference].sort_values("labels")
    if ref.empty:
        raise ValueError(f"labels_to_reach: the summary has no {reference!r} curve")
    target, ref_labels = float(ref["accuracy_mean"].iloc[-1]), int(ref["labels"].iloc[-1])
    rows = []
    for strategy, part in summary.groupby("strategy", sort=False):
        part = part.sort_values("labels")
        reached = part.loc[part["accuracy_mean"] >= target, "labels"]
        needed = float(reached.iloc[0]) if len(reached) else float("nan")
        rows.append({"strategy": strategy, "target": target, "reference_labels": ref_labels,
                     "labels_needed": needed, "label_fraction": needed / ref_labels,
                     "final_accuracy": float(part["accuracy_mean"].iloc[-1])})
    return pd.DataFrame(rows)


def plot_curve(summary: pd.DataFrame, *, title: str = "active learning") -> "Figure":
    """Held-out accuracy against labels used: mean over seeds, a band of ± one std."""
    from matplotlib.figure import Figure  # local: matplotlib loads only when a picture is drawn

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    for strategy, part in summary.groupby("strategy", sort=False):
        x, mean = part["labels"].to_numpy(), part["accuracy_mean"].to_numpy()
        std = part["accuracy_std"].fillna(0.0).to_numpy()
        line, = ax.plot(x, mean, marker="o", markersize=3.5, label=strategy)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    if "random" in set(summary["strategy"]):
        target = summary[summary["strategy"] == "random"].sort_values("labels")["accuracy_mean"].iloc[-1]
        ax.axhline(target, color="grey", linestyle=":", linewidth=1,
                   label=f"random at its full budget ({target:.3f})")
    seeds = int(summary["seeds"].max())
    ax.set(xlabel="labels used", ylabel="held-out accuracy",
           title=f"{title} (mean ± std over {seeds} seed{'s' if seeds != 1 else ''})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def write_curve(out_dir: Path, curve: pd.DataFrame, selections: pd.DataFrame, *, title: str) -> pd.DataFrame:
    """curve.csv, curve_summary.csv, selections.csv and curve.png (all atomic); returns the summary."""
    summary = summarise_curve(curve)
    atomic_write_csv(out_dir / "curve.csv", curve)
    atomic_write_csv(out_dir / "curve_summary.csv", summary)
    atomic_write_csv(out_dir / "selections.csv", selections)
    atomic_save_figure(plot_curve(summary, title=title), out_dir / "curve.png")
    return summary


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RunError(f"--out {out_dir}: exists and is not an empty folder (choose a new one)")


def simulate(cfg: Config, *, strategies: Sequence[str], start: int, budget: int, rounds: int,
             seeds: Sequence[int], out_dir: str | Path, holdout: float = 0.2, bald_members: int = 3,
             candidates: int | None = None, batch_size: int = 1024, min_steps: int | None = None,
             log: Callable[[str], None] = print) -> pd.DataFrame:
    """Run every strategy for every seed; write out_dir/{config.yaml, settings.json, curve.csv,
    curve_summary.csv, selections.csv, curve.png} (rewritten after each curve, so a long run can
    be watched). Every check runs before anything is written. Returns the summary table.
    """
    strategies, out_dir = parse_strategies(strategies), Path(out_dir)
    check_settings(strategies=strategies, start=start, budget=budget, rounds=rounds, seeds=seeds,
                   bald_members=bald_members, holdout=holdout, candidates=candidates)
    if batch_size < 1:
        raise ConfigError(f"score batch size: {batch_size} must be >= 1")
    if min_steps is not None and min_steps < 1:
        raise ConfigError(f"min steps: {min_steps} must be >= 1 (or left out)")
    if cfg.train.batch_size == "auto":
        raise ConfigError("batch_size: al-sim needs a number (auto sizing is done by mixcls train)")
    _check_out_dir(out_dir)
    device = resolve_device(cfg.train.device)
    amp_dtype, _ = amp_setup(cfg.train.amp, device)
    data = load_sim_data(cfg, holdout=holdout)
    check_pool_size(data, start=start, budget=budget, rounds=rounds)
    check_writable(out_dir)
    data.pool_cache = load_image_cache(data.pool.frame["path"].tolist(), mode=cfg.data.cache_images)
    data.test_cache = load_image_cache(data.test_paths, mode=cfg.data.cache_images)
    atomic_write_text(out_dir / "config.yaml", dump_config(cfg))
    atomic_write_json(out_dir / "settings.json", {
        "strategies": strategies, "start": start, "budget": budget, "rounds": rounds,
        "seeds": list(seeds), "bald_members": bald_members, "candidates": candidates, "min_steps": min_steps, "held_out": data.holdout_source,
        "pool_size": len(data.pool.frame), "held_out_size": len(data.test_paths)})
    log(f"pool {len(data.pool.frame)} images, held out {len(data.test_paths)} ({data.holdout_source}); "
        f"{len(strategies)} strategies x {len(seeds)} seeds x {rounds + 1} trainings")
    curves, selections = [], []
    title = f"{cfg.model.name}, {cfg.train.epochs} epochs, {Path(str(cfg.data.data or cfg.data.csv)).name}"
    with tempfile.TemporaryDirectory(prefix="mixcls_al_sim_") as workdir:
        for seed in seeds:
            run = _Run(cfg, data, device, amp_dtype, batch_size, Path(workdir), bald_members, {}, min_steps)
            for strategy in strategies:
                curve, chosen = run_strategy(run, strategy, seed=seed, start=start, budget=budget,
                                             rounds=rounds, candidates=candidates, log=log)
                curves.append(curve)
                selections.append(chosen)
                summary = write_curve(out_dir, pd.concat(curves, ignore_index=True),
                                      pd.concat(selections, ignore_index=True), title=title)
    return summary
