"""--compile: a compiled timm test_resnet trains to the loss of the eager one, its
checkpoints hold the bare module's keys, and the compile time is reported apart."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from conftest import write_tiny_dataset
from mixcls.cli import main
from mixcls.models import find_compiler
from mixcls.runs import load_checkpoint

NO_COMPILER = find_compiler(torch.device("cpu"))
pytestmark = pytest.mark.skipif(NO_COMPILER is not None, reason=NO_COMPILER or "")

# 36 images, 2 folds: 18 to train in 2 batches of 9 (one shape, one compile) and 18 to validate
# in one batch of 18.
FLAGS = ["--model", "test_resnet", "--img-size", "16", "--batch-size", "9", "--workers", "0",
         "--no-progress", "--folds", "2", "--train-folds", "0", "--epochs", "1", "--device", "cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("both", [[], ["--sam", "sam"]], ids=["plain", "sam"])
def test_compiled_training_matches_eager_and_saves_bare_keys(tmp_path, both):
    # --sam: the compiled model runs again at weights moved in place, between its passes
    data = write_tiny_dataset(tmp_path / "data", size=16)
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        assert main(["train", "--data", str(data), "--out", str(out), *FLAGS, *both, *extra]) == 0
        runs[name] = out
    eager, compiled = (pd.read_csv(runs[n] / "fold_0" / "history.csv") for n in ("eager", "compiled"))
    # inductor fuses and reorders float32 arithmetic: close, not bit-equal
    assert compiled["train_loss"].iloc[0] == pytest.approx(eager["train_loss"].iloc[0], rel=1e-4)
    assert compiled["valid_loss"].iloc[0] == pytest.approx(eager["valid_loss"].iloc[0], rel=1e-3)
    assert eager["compile_seconds"].iloc[0] == 0.0
    if not both:  # the first case compiles; dynamo's cache serves the later ones in this process
        assert compiled["compile_seconds"].iloc[0] > 0.5
    for name in ("best.pt", "last.pt"):
        keys = set(load_checkpoint(runs["compiled"] / "fold_0" / name)["model"])
        assert keys == set(load_checkpoint(runs["eager"] / "fold_0" / name)["model"])
        assert not any("_orig_mod" in k for k in keys)
    metrics = json.loads((runs["compiled"] / "metrics.json").read_text())
    assert metrics.get("compile_seconds", 0.0) == pytest.approx(compiled["compile_seconds"].sum())
    assert "compile_seconds" not in json.loads((runs["eager"] / "metrics.json").read_text())
