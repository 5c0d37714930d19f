"""--sam sam|asam: the ascent against pytorch_optimizer's SAM and a formula in numpy, a whole
trainer step against pytorch_optimizer's closure step, accumulation, GradScaler, BatchNorm, the
checks of the options and a run through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_optimizer import SAM
from torch import nn

from mixcls.cli import main
from mixcls.config import DEFAULT_SAM_RHO, SAM_MODES, Config, ConfigError, validate
from mixcls.engine import train_one_epoch
from mixcls.sam import Sharpness, climb, come_back, sharpness_settings

CPU = torch.device("cpu")


def _ce(logits, soft):
    return -(soft * logits.float().log_softmax(1)).sum(1).mean()


def _net(seed: int, *, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if batchnorm else [])
    return nn.Sequential(*layers, nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5))


def _batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def _with_random_grads(seed: int) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((3, 4), (7,), (2, 2, 3))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_ascent_is_the_formula_and_pytorch_optimizers_first_step(adaptive):
    params = _with_random_grads(0)
    w = [p.detach().numpy().copy() for p in params]
    g = [p.grad.numpy().copy() for p in params]
    t = [np.abs(x) if adaptive else np.ones_like(x) for x in w]
    norm = np.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    expected = [wi + 0.3 * ti ** 2 * gi / norm for wi, ti, gi in zip(w, t, g)]

    moved = climb(params, Sharpness(rho=0.3, adaptive=adaptive))
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-5, atol=1e-6)

    reference = _with_random_grads(0)
    SAM(reference, torch.optim.SGD, rho=0.3, adaptive=adaptive, lr=0.1).first_step()
    for p, q in zip(params, reference):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)

    come_back(moved)
    for p, wi in zip(params, w):
        assert np.array_equal(p.detach().numpy(), wi)  # bit for bit, not w + e - e


def test_a_loss_scale_cancels_and_a_non_finite_gradient_moves_nothing():
    plain, scaled = _with_random_grads(1), _with_random_grads(1)
    for p in scaled:
        p.grad *= 2.0 ** 14  # what GradScaler leaves in .grad before unscale_
    climb(plain, Sharpness(0.05, adaptive=False))
    climb(scaled, Sharpness(0.05, adaptive=False))
    for p, q in zip(plain, scaled):
        torch.testing.assert_close(p.detach(), q.detach())

    broken = _with_random_grads(2)
    before = [p.detach().clone() for p in broken]
    broken[1].grad[3] = float("inf")
    climb(broken, Sharpness(0.05, adaptive=True))
    assert all(torch.equal(p.detach(), b) for p, b in zip(broken, before))


def test_parameters_without_a_gradient_stay_where_they_are():
    params = _with_random_grads(3)
    params[0].grad = None  # a frozen layer (--freeze-epochs)
    before = params[0].detach().clone()
    moved = climb(params, Sharpness(0.5, adaptive=False))
    assert torch.equal(params[0].detach(), before) and len(moved) == 2


@pytest.mark.parametrize("mode", ["sam", "asam"])
def test_a_trainer_step_is_pytorch_optimizers_closure_step(mode):
    x, y = _batch(4)
    sharpness = sharpness_settings(mode, 0.1 if mode == "sam" else 1.0)
    ours = _net(5)
    opt = torch.optim.SGD(ours.parameters(), lr=0.5, momentum=0.9)
    stats = train_one_epoch(ours, [(x, y)], opt, loss_fn=_ce, device=CPU, num_classes=5,
                            sharpness=sharpness, progress=False)

    theirs = _net(5)
    sam = SAM(theirs.parameters(), torch.optim.SGD, rho=sharpness.rho, adaptive=sharpness.adaptive,
              lr=0.5, momentum=0.9)
    soft = nn.functional.one_hot(y, 5).float()

    def closure():
        sam.zero_grad()
        loss = _ce(theirs(x), soft)
        loss.backward()
        return loss

    first = closure()
    sam.step(closure)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert stats.loss == pytest.approx(first.item(), rel=1e-6)  # the loss at w, not at w + e

    plain = _net(5)
    train_one_epoch(plain, [(x, y)], torch.optim.SGD(plain.parameters(), lr=0.5, momentum=0.9),
                    loss_fn=_ce, device=CPU, num_classes=5, progress=False)
    assert any(not torch.allclose(p, q) for p, q in zip(ours.parameters(), plain.parameters()))


def test_accumulated_micro_batches_take_the_step_of_their_whole_batch():
    x, y = _batch(6, n=16)
    results = []
    for batches, accum in (([(x, y)], 1), ([(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)], 4)):
        model = _net(7)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        stats = train_one_epoch(model, batches, opt, loss_fn=_ce, device=CPU, num_classes=5,
                                accum_steps=accum, sharpness=Sharpness(0.2, adaptive=True),
                                progress=False)
        assert stats.steps == 1
        results.append([p.detach() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_scaler_gives_the_unscaled_step_and_skips_an_overflow():
    x, y = _batch(8)
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)):
        model = _net(9)
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        train_one_epoch(model, [(x, y)], opt, loss_fn=_ce, device=CPU, num_classes=5,
                        scaler=scaler, sharpness=Sharpness(0.05, adaptive=False), progress=False)
        runs.append([p.detach() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    model = _net(9)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    overflowing = lambda logits, soft: _ce(logits, soft) * 1e38  # noqa: E731 - inf once scaled
    train_one_epoch(model, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.3),
                    loss_fn=overflowing, device=CPU, num_classes=5, scaler=scaler,
                    sharpness=Sharpness(0.05, adaptive=False), progress=False)
    assert scaler.get_scale() < 2.0 ** 12  # GradScaler saw the overflow and skipped the step
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_batchnorm_statistics_take_the_first_pass_only():
    x, y = _batch(10)
    stats = []
    for sharpness in (None, Sharpness(0.05, adaptive=False)):
        model = _net(11, batchnorm=True)
        train_one_epoch(model, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=_ce,
                        device=CPU, num_classes=5, sharpness=sharpness, progress=False)
        bn = model[1]
        stats.append((bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)))
    assert torch.equal(stats[0][0], stats[1][0]) and torch.equal(stats[0][1], stats[1][1])
    assert stats[0][2] == stats[1][2] == 1


def test_the_modes_and_radii_are_checked():
    assert set(DEFAULT_SAM_RHO) | {"none"} == set(SAM_MODES)
    assert sharpness_settings("none", None) is None
    assert sharpness_settings("asam", None) == Sharpness(2.0, adaptive=True)
    assert sharpness_settings("sam", 0.1) == Sharpness(0.1, adaptive=False)
    cfg = Config()
    cfg.optim.sam_rho = 0.1
    with pytest.raises(ConfigError, match="sam_rho: it sets the radius of --sam"):
        validate(cfg)
    cfg.optim.sam = "sam"
    validate(cfg)
    for bad in (0.0, -1.0, float("nan"), 1e3):
        cfg.optim.sam_rho = bad
        with pytest.raises(ConfigError, match="sam_rho"):
            validate(cfg)
    cfg.optim.sam, cfg.optim.sam_rho = "gsam", None
    with pytest.raises(ConfigError, match="sam: 'gsam' is not one of none, sam, asam"):
        validate(cfg)


def test_train_with_sam_through_the_cli(tiny_data, tmp_path, capsys):
    from mixcls.run_table import run_row

    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(out), "--model", "test_resnet",
                 "--img-size", "16", "--batch-size", "8", "--accum-steps", "2", "--folds", "2",
                 "--epochs", "1", "--sam", "asam", "--workers", "0", "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert "asam rho=2: two passes per step" in log
    assert "sharpness-aware minimization" in (out / "report.html").read_text()
    assert run_row(out)["optimizer"] == "adamw, asam rho=2"
