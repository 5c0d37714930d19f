"""Guards: a NaN loss, a full disk, an unwritable run folder, an unsafe checkpoint, bad config.

Each is reported as one `mixcls: error:` line (exit 2) that names the problem, before any
training where that is possible, and keeps what was good on disk.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

import mixcls.engine
import mixcls.runs
import mixcls.train
from conftest import write_tiny_dataset
from mixcls.cli import main
from mixcls.commands import train as train_command
from mixcls.config import ConfigError, load_config
from mixcls.resume import BatchLayout, check_resumable
from mixcls.run_setup import estimate_run_mb
from mixcls.runs import RunError, load_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"
BASE = ["--model", "test_resnet", "--img-size", "16", "--batch-size", "8", "--workers", "0",
        "--no-progress", "--folds", "2"]


@pytest.fixture
def data(tmp_path):
    return write_tiny_dataset(tmp_path / "data", size=16)


def _train(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), *BASE, *extra])


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """A 3-epoch run (with EMA) whose loss turns NaN at batch 1 of epoch 2; (run folder, stderr)."""
    root = tmp_path_factory.mktemp("nan")
    data = write_tiny_dataset(root / "data", size=16)
    real = mixcls.train.train_one_epoch
    epochs_started = []

    def nan_in_epoch_2(*args, loss_fn, **kwargs):
        epochs_started.append(1)
        if len(epochs_started) != 2:
            return real(*args, loss_fn=loss_fn, **kwargs)
        calls = []

        def poisoned(logits, targets):
            calls.append(1)
            loss = loss_fn(logits, targets)
            return loss * float("nan") if len(calls) == 2 else loss
        return real(*args, loss_fn=poisoned, **kwargs)

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr(mixcls.train, "train_one_epoch", nan_in_epoch_2)
        code = _train(data, root / "run", "--epochs", "3", "--ema")
    assert code == 2
    return root / "run", err.getvalue()


@pytest.mark.slow
def test_nan_loss_stops_the_fold_naming_epoch_and_batch_and_keeps_last_good_checkpoint(nan_run):
    out, err = nan_run
    last = out / "fold_0" / "last.pt"
    assert re.search(rf"^mixcls: error: fold 0, epoch 2: loss is nan at batch 1 of \d+; training "
                     rf"stopped, the last good checkpoint {re.escape(str(last))} is kept", err, re.M), err
    assert "Traceback" not in err
    ckpt = load_checkpoint(last)
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 0) and len(ckpt["history"]) == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "fold_0" / "oof.csv").exists() and not (out / "metrics.json").exists()
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_disk_estimate_covers_the_checkpoints_a_fold_really_writes(nan_run):
    """The estimate counts parameters; the files are torch.save's real output (AdamW + EMA)."""
    out, _ = nan_run
    cfg = load_config(out / "config.yaml")
    per_fold_mb = estimate_run_mb(cfg, 3, 2) - estimate_run_mb(cfg, 3, 1)
    written_mb = sum(p.stat().st_size for p in (out / "fold_0").glob("*.pt")) / 2**20
    assert 0.8 * per_fold_mb <= written_mb <= 1.25 * per_fold_mb, (written_mb, per_fold_mb)


@pytest.mark.slow
def test_weights_that_blew_up_are_never_saved(data, tmp_path, monkeypatch, capsys):
    real = mixcls.engine._optimizer_step

    def blow_up_at_first_step(model, optimizer, **kwargs):
        real(model, optimizer, **kwargs)
        if not hasattr(blow_up_at_first_step, "done"):
            blow_up_at_first_step.done = True
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))

    monkeypatch.setattr(mixcls.engine, "_optimizer_step", blow_up_at_first_step)
    out = tmp_path / "run"
    assert _train(data, out, "--epochs", "1", "--save-every-steps", "1", "--batch-size", "4") == 2
    err = capsys.readouterr().err
    assert re.search(r"^mixcls: error: fold 0, epoch 1: loss is nan at batch 1 of 4; training stopped "
                     r"before any checkpoint", err, re.M), err
    assert not (out / "fold_0" / "last.pt").exists()  # the step checkpoint after batch 0 was skipped


def test_run_folder_below_a_regular_file_is_refused_before_training(data, tmp_path, no_training, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert _train(data, blocker / "run", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mixcls: error: run folder {blocker / 'run'} is not writable")
    assert blocker.read_text() == "not a folder"


def test_full_disk_is_refused_before_training_and_leaves_no_folder(data, tmp_path, monkeypatch,
                                                                   no_training, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(mixcls.runs.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    out = tmp_path / "deep" / "run"
    assert _train(data, out, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert re.search(r"^mixcls: error: run folder .*run: only 1 MiB free on its disk, the run needs "
                     r"about \d+ MiB", err), err
    assert not (tmp_path / "deep").exists()  # the folders it made for the check are gone again


class Payload:
    """An object whose unpickling would run code: os.mkdir(marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_checkpoint_holding_code_is_refused_by_load_checkpoint_and_predict(data, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    run = tmp_path / "run"
    (run / "fold_0").mkdir(parents=True)
    (run / "classes.json").write_text('["0", "1", "2"]')
    torch.save({"model": {"w": torch.zeros(1)}, "config": {}, "payload": Payload(marker)},
               run / "fold_0" / "best.pt")
    with pytest.raises(RunError, match="cannot be loaded safely"):
        load_checkpoint(run / "fold_0" / "best.pt")
    assert main(["predict", "--run", str(run), "--images", str(data / "train_images"),
                 "--out", str(tmp_path / "sub.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mixcls: error: checkpoint {run / 'fold_0' / 'best.pt'} cannot be loaded safely")
    assert not marker.exists() and not (tmp_path / "sub.csv").exists()
    torch.load(run / "fold_0" / "best.pt", weights_only=False)  # the payload is real: unsafe load runs it
    assert marker.is_dir()


def test_every_torch_load_in_src_is_weights_only():
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "load" and getattr(node.func.value, "id", None) == "torch":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                           for k in node.keywords)
                calls.append((f"{path.name}:{node.lineno}", safe))
    assert calls, "no torch.load found: the scan is broken"
    assert all(safe for _, safe in calls), calls


@pytest.mark.parametrize("values, words", [
    ({"save_every_steps": 0}, ["save_every_steps", "0", ">= 1"]),
    ({"patience": 0}, ["patience", ">= 1"]),
    ({"grad_clip": "inf"}, ["grad_clip", "finite"]),
    ({"grad_clip": -1}, ["grad_clip", "> 0"]),
    ({"lr": "inf"}, ["lr", "finite"]),
    ({"lr": "nan"}, ["lr"]),
    ({"lr": 1e300}, ["lr", "float32"]),
    ({"momentum": 1.0}, ["momentum", "[0, 1)"]),
    ({"weight_decay": -0.1}, ["weight_decay", ">= 0"]),
    ({"drop_rate": 1.0}, ["drop_rate", "[0, 1)"]),
    ({"warmup_epochs": 20, "epochs": 5}, ["warmup_epochs", "epochs=5"]),
    ({"mix_off_epochs": 9, "epochs": 3}, ["mix_off_epochs", "epochs=3"]),
    ({"seed": -1}, ["seed", "[0, 4294967295]"]),
    ({"seed": 2**32}, ["seed"]),
    ({"device": "gpu"}, ["device", "auto, cpu, cuda, cuda:N"]),
    ({"device": "cuda:x"}, ["device", "cuda:N"]),
    ({"max_memory_mb": 0}, ["max_memory_mb", "> 0"]),
    ({"effective_batch": 0}, ["effective_batch", ">= 1"]),
    ({"mix_max_soft": 0.7}, ["mix_max_soft", "[0, 0.5]"]),
    ({"taylor_order": 0}, ["taylor_order", ">= 1"]),
])
def test_bad_config_values_name_the_key_and_the_allowed_values(values, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, values)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_good_edge_values_pass():
    cfg = load_config(None, {"momentum": 0, "drop_rate": 0, "warmup_epochs": 5, "epochs": 5,
                             "seed": 2**32 - 1, "device": "cuda:1", "mix_max_soft": 0.5,
                             "save_every_steps": 1, "patience": 1})
    assert cfg.train.device == "cuda:1" and cfg.train.seed == 2**32 - 1


def test_bad_flag_on_the_command_line_writes_nothing(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data, out, "--save-every-steps", "0") == 2
    assert "save_every_steps: 0 is not allowed" in capsys.readouterr().err
    assert not out.exists()


def test_sync_bn_on_cpu_and_multi_node_without_endpoint_are_refused_before_launch(
        data, tmp_path, monkeypatch, capsys):
    def no_launch(*args, **kwargs):
        raise AssertionError("torchrun was launched")
    monkeypatch.setattr(train_command.subprocess, "call", no_launch)
    out = tmp_path / "run"
    assert _train(data, out, "--nproc", "2", "--sync-bn", "--device", "cpu") == 2
    assert "sync_bn: SyncBatchNorm needs CUDA" in capsys.readouterr().err
    assert _train(data, out, "--nproc", "2", "--nnodes", "2") == 2
    assert "--nnodes > 1 needs --rdzv-endpoint" in capsys.readouterr().err
    assert not out.exists()


def test_multi_node_command_uses_the_c10d_rendezvous(data, tmp_path):
    parser = __import__("argparse").ArgumentParser()
    train_command.register(parser.add_subparsers())
    args = parser.parse_args(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--nproc", "8",
                              "--nnodes", "2", "--rdzv-endpoint", "node0:29500", "--epochs", "3",
                              "--ema", "--no-channels-last", "--train-folds", "0,2"])
    cmd = train_command.torchrun_command(args)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" not in cmd
    assert {"--nproc_per_node=8", "--nnodes=2", "--rdzv_backend=c10d",
            "--rdzv_endpoint=node0:29500"} <= set(cmd)
    tail = cmd[cmd.index("mixcls") + 1:]
    assert tail[0] == "train" and "--nproc" not in tail and "--nnodes" not in tail
    again = parser.parse_args(tail)  # the children parse to the same training options
    assert train_command.config_overrides(again) == train_command.config_overrides(args)
    assert again.out == args.out


def test_a_mid_epoch_checkpoint_is_not_continued_by_another_world_size():
    cfg = load_config(None, {"batch_size": 8})
    ckpt = {"fold": 0, "epoch": 1, "batch": 3, "world_size": 2, "batch_size": 8, "accum_steps": 1}
    layout = BatchLayout(world_size=1, batch_size=cfg.train.batch_size, accum_steps=cfg.train.accum_steps)
    with pytest.raises(ConfigError, match=r"middle of epoch 2 \(world_size was 2, is 1\)"):
        check_resumable(ckpt, fold=0, layout=layout)
    check_resumable(dict(ckpt, batch=0), fold=0, layout=layout)  # an epoch end is fine


def test_a_step_with_non_finite_gradients_is_skipped_and_counted():
    """The loss stays finite; one group's gradient is infinite (as CPU bf16 kernels sometimes
    produce): that step leaves the weights as they were, the next one trains again."""
    torch.manual_seed(int(np.random.default_rng().integers(2**31)))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(3)]
    calls = []

    def poison_second_backward(grad):
        calls.append(1)
        return grad * float("inf") if len(calls) == 2 else grad

    model[1].weight.register_hook(poison_second_backward)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    snapshots = []
    stats = mixcls.engine.train_one_epoch(
        model, batches, optimizer, loss_fn=lambda logits, soft: -(soft * logits.log_softmax(1)).sum(1).mean(),
        device=torch.device("cpu"), num_classes=3, progress=False,
        on_step=lambda i, s: snapshots.append([p.detach().clone() for p in model.parameters()]))
    assert (stats.steps, stats.skipped_steps) == (3, 1)
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))  # step 2 skipped
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))  # step 3 trained
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_an_epoch_whose_every_step_is_skipped_stops_the_fold(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mixcls.engine, "_optimizer_step", lambda model, optimizer, **kwargs: False)
    out = tmp_path / "run"
    assert _train(data, out, "--epochs", "1", "--batch-size", "4") == 2
    err = capsys.readouterr().err
    assert re.search(r"^mixcls: error: fold 0, epoch 1: every optimizer step \(4\) had NaN or infinite "
                     r"gradients; training stopped before any checkpoint", err, re.M), err
