"""`mixcls al-sim` and mixcls.al_sim: the active-learning simulation on tiny generated data.

One module-scoped simulation (5 strategies x 2 seeds x 3 trainings of mixcls_cnn_tiny at 16 px,
1 epoch) serves the checks of its files; the bookkeeping functions are checked against plain
loops on random inputs with a fresh seed (printed in failure messages).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_tiny_dataset
from mixcls.active import select
from mixcls.al_sim import (candidate_rows, labels_to_reach, load_sim_data, monitor_rows, round_epochs,
                           selection_seed, simulate, summarise_curve)
from mixcls.cli import main
from mixcls.config import load_config
from mixcls.data import ImageDataset, load_train_table
from mixcls.engine import evaluate
from mixcls.models import build_model, model_mean_std
from mixcls.predict import LoadedModel, predict_fold_outputs
from mixcls.runs import RunError
from mixcls.transforms import Normalizer, build_valid_transform

STRATEGIES = ["random", "margin", "bald", "coreset", "kmeans-margin"]
START, BUDGET, ROUNDS, SEEDS = 6, 3, 2, (42, 43)
TRAIN_FLAGS = ["--model", "mixcls_cnn_tiny", "--img-size", "16", "--epochs", "1", "--batch-size", "8",
               "--workers", "0", "--preset", "none", "--device", "cpu", "--check-images", "header"]




@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("al") / "data", n_per_class=12, size=16)


@pytest.fixture(scope="module")
def sim(tmp_path_factory, data_dir: Path, one_thread) -> dict:
    out = tmp_path_factory.mktemp("al") / "sim"
    code = main(["al-sim", "--data", str(data_dir), "--out", str(out), "--strategy", ",".join(STRATEGIES),
                 "--start", str(START), "--budget", str(BUDGET), "--rounds", str(ROUNDS),
                 "--seeds", str(len(SEEDS)), "--seed", str(SEEDS[0]), "--holdout", "0.25",
                 "--bald-members", "2", *TRAIN_FLAGS])
    assert code == 0
    cfg = load_config(None, {"data": str(data_dir), "check_images": "header"})
    return {"out": out, "curve": pd.read_csv(out / "curve.csv"),
            "selections": pd.read_csv(out / "selections.csv"),
            "summary": pd.read_csv(out / "curve_summary.csv"),
            "pool": load_sim_data(cfg, holdout=0.25).pool}


# --- the simulation's files ----------------------------------------------------------------------

def test_curve_has_one_row_per_strategy_seed_round_with_start_plus_r_budget_labels(sim):
    curve = sim["curve"]
    assert len(curve) == len(STRATEGIES) * len(SEEDS) * (ROUNDS + 1)
    for (strategy, seed), part in curve.groupby(["strategy", "seed"]):
        assert part["round"].tolist() == list(range(ROUNDS + 1)), (strategy, seed)
        assert part["labels"].tolist() == [START + r * BUDGET for r in range(ROUNDS + 1)], (strategy, seed)
        assert part["accuracy"].between(0, 1).all()
    assert set(curve["strategy"]) == set(STRATEGIES) and set(curve["seed"]) == set(SEEDS)
    assert (curve.loc[curve["strategy"] == "bald", "members"] == 2).all()
    assert (curve.loc[curve["strategy"] != "bald", "members"] == 1).all()
    assert (sim["out"] / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_is_the_mean_and_sample_std_over_seeds(sim):
    curve, summary = sim["curve"], sim["summary"]
    assert len(summary) == len(STRATEGIES) * (ROUNDS + 1)
    for row in summary.itertuples():
        values = curve.loc[(curve["strategy"] == row.strategy) & (curve["round"] == row.round), "accuracy"]
        values = values.to_numpy(dtype=np.float64)
        assert row.seeds == len(SEEDS) == len(values)
        assert row.accuracy_mean == pytest.approx(sum(values) / len(values))
        dev = sum((v - values.mean()) ** 2 for v in values) / (len(values) - 1)
        assert row.accuracy_std == pytest.approx(dev ** 0.5, abs=1e-12)


def test_round_zero_is_one_shared_learner_per_seed(sim):
    """Every strategy of a seed starts from the same rows and the same model (bald's member 0)."""
    curve, selections = sim["curve"], sim["selections"]
    for seed in SEEDS:
        first = curve[(curve["seed"] == seed) & (curve["round"] == 0)]
        assert first["accuracy"].nunique() == 1, first
        first_rows = selections[(selections["seed"] == seed) & (selections["round"] == 0)]
        starts = {s: tuple(first_rows.loc[first_rows["strategy"] == s, "row"]) for s in STRATEGIES}
        assert len(set(starts.values())) == 1 and len(starts["random"]) == START
    by_seed = [set(selections.loc[(selections["seed"] == s) & (selections["round"] == 0), "row"])
               for s in SEEDS]
    assert by_seed[0] != by_seed[1]


def test_selections_never_repeat_a_labelled_row(sim):
    selections, pool = sim["selections"], sim["pool"]
    n_pool = len(pool.frame)
    for (strategy, seed), part in selections.groupby(["strategy", "seed"]):
        sizes = part.groupby("round").size()
        assert sizes.to_dict() == {0: START, **{r: BUDGET for r in range(1, ROUNDS + 1)}}
        labelled: set[int] = set()
        for r in range(ROUNDS + 1):
            rows = part.loc[part["round"] == r].sort_values("rank")
            assert rows["rank"].tolist() == list(range(1, len(rows) + 1))
            chosen = rows["row"].tolist()
            assert not labelled & set(chosen), (strategy, seed, r, sorted(labelled & set(chosen)))
            assert len(set(chosen)) == len(chosen)
            assert all(0 <= i < n_pool for i in chosen)
            assert rows["image_id"].tolist() == pool.frame["image_id"].to_numpy()[chosen].tolist()
            labelled |= set(chosen)
        assert len(labelled) == START + ROUNDS * BUDGET


def test_random_selects_what_active_select_random_would(sim):
    """The sim's pool order is the sorted unlabelled rows; its seed at step r is selection_seed."""
    selections, n_pool = sim["selections"], len(sim["pool"].frame)
    k = sim["pool"].num_classes
    for seed in SEEDS:
        part = selections.query("strategy == 'random' and seed == @seed")
        labelled = np.zeros(0, dtype=np.int64)
        for r in range(ROUNDS + 1):
            pool_rows = np.setdiff1d(np.arange(n_pool), labelled)
            size = START if r == 0 else BUDGET
            picks, _ = select("random", probs=np.full((len(pool_rows), k), 1.0 / k), budget=size,
                              seed=selection_seed(seed, r))
            recorded = part.loc[part["round"] == r].sort_values("rank")["row"].to_numpy()
            np.testing.assert_array_equal(recorded, pool_rows[picks], err_msg=f"seed {seed} round {r}")
            labelled = np.concatenate([labelled, recorded])


def test_the_same_seed_gives_the_same_curve(sim, data_dir, tmp_path, one_thread):
    """A second run with other strategies beside it and one seed repeats the first run's rows."""
    cfg = load_config(None, {"data": str(data_dir), "model": "mixcls_cnn_tiny", "img_size": 16,
                             "epochs": 1, "batch_size": 8, "workers": 0, "preset": "none",
                             "device": "cpu", "check_images": "header"})
    simulate(cfg, strategies=["kmeans-margin", "coreset"], start=START, budget=BUDGET, rounds=ROUNDS,
             seeds=[SEEDS[1]], out_dir=tmp_path / "again", holdout=0.25, log=lambda m: None)
    again = pd.read_csv(tmp_path / "again" / "curve.csv")
    seed = SEEDS[1]
    first = sim["curve"].query("seed == @seed and strategy in ['kmeans-margin', 'coreset']")
    cols = ["strategy", "seed", "round", "labels", "accuracy"]
    key = ["strategy", "round"]
    pd.testing.assert_frame_equal(again[cols].sort_values(key).reset_index(drop=True),
                                  first[cols].sort_values(key).reset_index(drop=True))
    chosen = pd.read_csv(tmp_path / "again" / "selections.csv")
    before = sim["selections"].query("seed == @seed and strategy in ['kmeans-margin', 'coreset']")
    order = ["strategy", "round", "rank"]
    pd.testing.assert_frame_equal(chosen.sort_values(order).reset_index(drop=True)[["row", "score"]],
                                  before.sort_values(order).reset_index(drop=True)[["row", "score"]])


# --- bad arguments: a clear error, nothing written --------------------------------------------------

@pytest.mark.parametrize("change, expected", [
    ({"--budget": "0"}, "budget: 0"),
    ({"--budget": "-2"}, "budget: -2"),
    ({"--strategy": "random,typicality"}, "'typicality'"),
    ({"--strategy": "margin,margin"}, "twice"),
    ({"--start": "40"}, "--start 40"),
    ({"--rounds": "9"}, "--rounds 9"),
    ({"--seeds": "0"}, "--seeds 0"),
    ({"--rounds": "0"}, "rounds: 0"),
    ({"--candidates": "2"}, "candidates: 2"),
    ({"--min-steps": "0"}, "min steps: 0"),
])
def test_bad_arguments_name_the_value_and_write_nothing(data_dir, tmp_path, capsys, change, expected):
    argv = {"--data": str(data_dir), "--out": str(tmp_path / "out"), "--strategy": "random,margin",
            "--start": "6", "--budget": "3", "--rounds": "2", "--seeds": "1", "--holdout": "0.25"}
    argv.update(change)
    code = main(["al-sim", *[x for kv in argv.items() for x in kv], *TRAIN_FLAGS])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mixcls: error:") and expected in err, err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_with_files_is_refused(data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    cfg = load_config(None, {"data": str(data_dir)})
    with pytest.raises(RunError, match="not an empty folder"):
        simulate(cfg, strategies=["random"], start=6, budget=3, rounds=1, seeds=[0], out_dir=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# --- held-out set ------------------------------------------------------------------------------------

def test_held_out_is_test_csv_when_the_folder_has_one(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", n_per_class=4, size=16)
    test = write_tiny_dataset(tmp_path / "test", n_per_class=3, size=16, seed=5)
    (test / "train_images").rename(data / "test_images")
    (test / "train.csv").rename(data / "test.csv")
    sim_data = load_sim_data(load_config(None, {"data": str(data)}), holdout=0.5)
    assert sim_data.holdout_source == "test.csv"
    assert len(sim_data.pool.frame) == 12 and len(sim_data.test_paths) == 9
    assert all("/test_images/" in p for p in sim_data.test_paths)
    np.testing.assert_array_equal(sim_data.test_labels, np.repeat(np.arange(3), 3))


def test_held_out_split_is_stratified_and_disjoint(tmp_path):
    rng = np.random.default_rng(secrets.randbits(32))
    per_class = int(rng.integers(8, 14))
    data = write_tiny_dataset(tmp_path / "data", n_per_class=per_class, size=16)
    holdout = float(rng.choice([0.2, 0.25, 0.5]))
    sim_data = load_sim_data(load_config(None, {"data": str(data)}), holdout=holdout)
    table = load_train_table(data)
    pool_paths = set(sim_data.pool.frame["path"])
    assert not pool_paths & set(sim_data.test_paths)
    assert pool_paths | set(sim_data.test_paths) == set(table.frame["path"])
    counts = np.bincount(sim_data.test_labels, minlength=3)
    assert abs(counts - per_class * holdout).max() <= 1, (per_class, holdout, counts)
    by_path = dict(zip(table.frame["path"], table.labels))
    assert [by_path[p] for p in sim_data.pool.frame["path"]] == sim_data.pool.labels.tolist()
    assert [by_path[p] for p in sim_data.test_paths] == sim_data.test_labels.tolist()


# --- the building blocks against independent code ---------------------------------------------------

def test_fold_outputs_match_engine_evaluate_and_the_classifier(tiny_data, one_thread):
    """The simulation's pool scoring (predict_fold_outputs, plain view, probs + features)."""
    table = load_train_table(tiny_data)
    paths = table.frame["path"].tolist()[:20]
    cfg = load_config(None, {"model": "mixcls_cnn_tiny", "img_size": 16})
    torch.manual_seed(secrets.randbits(31))
    model = build_model(cfg.model, table.num_classes).eval()
    outputs = predict_fold_outputs([LoadedModel(model, cfg, table.classes, 0)], paths,
                                   device=torch.device("cpu"), views=("orig",), batch_size=7,
                                   features=True)
    probs, features = outputs.probs[0], outputs.features[0]
    mean, std = model_mean_std(model)
    dataset = ImageDataset(paths, None, build_valid_transform(16))
    expected, _ = evaluate(model, torch.utils.data.DataLoader(dataset, batch_size=5),
                           device=torch.device("cpu"), normalizer=Normalizer(mean, std))
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    logits = model.get_classifier()(torch.from_numpy(features).float())
    np.testing.assert_allclose(logits.softmax(1).detach().numpy(), probs, rtol=1e-4, atol=1e-6)
    assert features.shape == (20, model.num_features)


def test_summarise_curve_against_a_loop():
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    rows = [{"strategy": s, "seed": sd, "round": r, "labels": 10 + 5 * r, "accuracy": rng.random()}
            for s in ["margin", "random"] for sd in range(int(rng.integers(1, 5))) for r in range(4)]
    curve = pd.DataFrame(rows).sample(frac=1.0, random_state=int(rng.integers(1 << 31)))
    summary = summarise_curve(curve)
    for row in summary.itertuples():
        values = [x["accuracy"] for x in rows if x["strategy"] == row.strategy and x["round"] == row.round]
        assert row.accuracy_mean == pytest.approx(np.mean(values)), seed
        if len(values) > 1:
            assert row.accuracy_std == pytest.approx(np.std(values, ddof=1)), seed
        else:
            assert np.isnan(row.accuracy_std)
    assert summary.groupby("strategy", sort=False)["round"].apply(list).map(sorted).eq(
        summary.groupby("strategy", sort=False)["round"].apply(list)).all()


def test_labels_to_reach_is_the_first_measured_point_at_or_above_random_final():
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    labels = [20 * (r + 1) for r in range(6)]
    rows = []
    for strategy in ["random", "a", "b", "c"]:
        acc = np.sort(rng.random(6)) if strategy != "c" else np.full(6, 0.0)
        rows += [{"strategy": strategy, "round": r, "labels": n, "accuracy_mean": a, "accuracy_std": 0.0,
                  "seeds": 3} for r, (n, a) in enumerate(zip(labels, acc))]
    summary = pd.DataFrame(rows)
    reach = labels_to_reach(summary).set_index("strategy")
    target = summary.query("strategy == 'random'")["accuracy_mean"].iloc[-1]
    for strategy in ["random", "a", "b", "c"]:
        needed = None
        for n, a in zip(labels, summary.query("strategy == @strategy")["accuracy_mean"]):
            if a >= target:
                needed = n
                break
        got = reach.loc[strategy, "labels_needed"]
        if needed is None:
            assert np.isnan(got), (seed, strategy)
        else:
            assert got == needed and reach.loc[strategy, "label_fraction"] == needed / labels[-1], (seed, strategy)
    assert reach.loc["random", "labels_needed"] <= labels[-1]
    with pytest.raises(ValueError, match="no 'random' curve"):
        labels_to_reach(summary.query("strategy != 'random'"))


def test_candidate_rows_are_a_seeded_subset_of_the_unlabelled_rows():
    rng = np.random.default_rng(secrets.randbits(32))
    unlabelled = np.sort(rng.choice(1000, size=300, replace=False))
    every = candidate_rows(unlabelled, candidates=None, seed=1, step=2)
    assert every is unlabelled and candidate_rows(unlabelled, candidates=300, seed=1, step=2) is unlabelled
    some = candidate_rows(unlabelled, candidates=50, seed=1, step=2)
    assert len(some) == 50 and len(set(some)) == 50 and set(some) <= set(unlabelled)
    assert (np.diff(some) > 0).all()
    np.testing.assert_array_equal(some, candidate_rows(unlabelled, candidates=50, seed=1, step=2))
    assert not np.array_equal(some, candidate_rows(unlabelled, candidates=50, seed=1, step=3))


def test_monitor_rows_is_an_evenly_spread_subset():
    rng = np.random.default_rng(secrets.randbits(32))
    rows = np.sort(rng.choice(5000, size=int(rng.integers(1, 900)), replace=False))
    picked = monitor_rows(rows, limit=128)
    assert len(picked) == min(len(rows), 128) and len(set(picked)) == len(picked)
    assert set(picked) <= set(rows) and picked[0] == rows[0] and picked[-1] == rows[-1]


# --- a step floor per round ----------------------------------------------------------------------------

def test_round_epochs_reaches_min_steps_counted_by_a_dataloader_loop():
    """Against the batches torch's DataLoader gives with fit_fold's drop_last rule, grouped by
    accum_steps: the fewest epochs (never below `epochs`) whose optimizer steps reach min_steps."""
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    for _ in range(200):
        n_rows, batch_size = int(rng.integers(1, 300)), int(rng.integers(1, 64))
        accum, epochs, min_steps = int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(1, 400))
        loader = torch.utils.data.DataLoader(range(n_rows), batch_size=batch_size, drop_last=n_rows > batch_size)
        steps_per_epoch = sum(1 for i, _ in enumerate(loader) if (i + 1) % accum == 0 or i + 1 == len(loader))
        expected = epochs
        while expected * steps_per_epoch < min_steps:
            expected += 1
        got = round_epochs(epochs, n_rows=n_rows, batch_size=batch_size, accum_steps=accum, min_steps=min_steps)
        assert got == expected, (seed, n_rows, batch_size, accum, epochs, min_steps)
    assert round_epochs(3, n_rows=10, batch_size=4, min_steps=None) == 3


def test_min_steps_sets_the_epochs_each_round_trains(data_dir, tmp_path, monkeypatch):
    """The trainer is called with more epochs in the small first round than in later ones."""
    import mixcls.al_sim as al_sim

    seen: list[tuple[int, int]] = []

    class Stop(Exception):
        pass

    def record(cfg, data, **kwargs):  # fit_fold(cfg, FoldData, ...)
        seen.append((len(data.train_paths), cfg.train.epochs))
        raise Stop

    monkeypatch.setattr(al_sim, "fit_fold", record)
    cfg = load_config(None, {"data": str(data_dir), "check_images": "header", "batch_size": 4, "epochs": 1,
                             "model": "mixcls_cnn_tiny", "img_size": 16, "device": "cpu"})
    with pytest.raises(Stop):
        simulate(cfg, strategies=["random"], start=8, budget=3, rounds=1, seeds=[0],
                 out_dir=tmp_path / "out", holdout=0.25, min_steps=10)
    assert seen == [(8, 5)]  # 8 rows, batch 4: 2 steps per epoch, 5 epochs for 10 steps


@pytest.mark.parametrize("key", ["group_col", "train_only_col"])
def test_fold_flags_the_simulation_would_ignore_are_refused(tmp_path, key):
    from mixcls.config import ConfigError

    cfg = load_config(None, {"data": str(tmp_path), key: "plant"})
    with pytest.raises(ConfigError, match=rf"{key} 'plant': al-sim does not use it"):
        load_sim_data(cfg, holdout=0.25)
