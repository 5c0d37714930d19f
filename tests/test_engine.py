import numpy as np
import pytest
import torch
from torch import nn

from mixcls.config import ConfigError
from mixcls.engine import NonFiniteLossError, evaluate, group_size, should_step, train_one_epoch
from mixcls.devices import amp_setup


def _ce(logits, soft):
    return -(soft * logits.float().log_softmax(1)).sum(1).mean()


def _net(seed):
    torch.manual_seed(seed)  # no batch norm: a batch of 32 and 4 x 8 see the same maths
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 5))


@pytest.mark.parametrize("n, accum", [(7, 3), (8, 4), (5, 1), (3, 8)])
def test_should_step_matches_a_slow_reference(n, accum):
    steps = [i for i in range(n) if should_step(i, n, accum)]
    expected = sorted({min(g * accum + accum - 1, n - 1) for g in range(-(-n // accum))})
    assert steps == expected
    for i in range(n):  # every micro-batch belongs to a group whose size it knows
        group = [j for j in range(n) if j // accum == i // accum]
        assert group_size(i, n, accum) == len(group)


def test_accumulating_4_micro_batches_of_8_equals_one_batch_of_32():
    seed = int(np.random.default_rng().integers(1e6))
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 5, (32,), generator=gen)
    deltas = []
    for batches, accum in (([(x, y)], 1), ([(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)], 4)):
        model = _net(seed)
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # new = old - grad: the delta is the gradient
        stats = train_one_epoch(model, batches, opt, loss_fn=_ce, device=torch.device("cpu"),
                                num_classes=5, accum_steps=accum, progress=False)
        assert stats.steps == 1
        deltas.append([b - p.detach() for b, p in zip(before, model.parameters())])
    for a, b in zip(*deltas):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_short_last_group_is_averaged_over_its_own_size():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 3, 8, 8, generator=gen), torch.randint(0, 5, (24,), generator=gen)
    ref, acc = _net(1), _net(1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=1.0)
    train_one_epoch(ref, [(x[:16], y[:16]), (x[16:], y[16:])], opt_ref, loss_fn=_ce,
                    device=torch.device("cpu"), num_classes=5, progress=False)
    opt = torch.optim.SGD(acc.parameters(), lr=1.0)  # groups: [0,1] then the short [2]
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    stats = train_one_epoch(acc, batches, opt, loss_fn=_ce, device=torch.device("cpu"), num_classes=5,
                            accum_steps=2, progress=False)
    assert stats.steps == 2
    for a, b in zip(ref.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_trains_on_cpu():
    model = _net(0)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen))
               for _ in range(3)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    dtype, scaler = amp_setup("bf16", torch.device("cpu"))
    stats = train_one_epoch(model, batches, opt, loss_fn=_ce, device=torch.device("cpu"), num_classes=5,
                            amp_dtype=dtype, scaler=scaler, progress=False)
    assert dtype is torch.bfloat16 and scaler is None and np.isfinite(stats.loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_on_cpu_is_refused_with_a_reason():
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        amp_setup("fp16", torch.device("cpu"))


def test_nan_loss_names_the_batch():
    batches = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))] * 3
    calls = []

    def loss_fn(logits, soft):
        calls.append(1)
        return _ce(logits, soft) * (float("nan") if len(calls) == 2 else 1.0)

    with pytest.raises(NonFiniteLossError, match="batch 1 of 3"):
        train_one_epoch(_net(0), batches, torch.optim.SGD(_net(0).parameters(), lr=0.1),
                        loss_fn=loss_fn, device=torch.device("cpu"), num_classes=5, progress=False)


def test_evaluate_averages_views_and_never_trains():
    model = _net(0)
    x = torch.randn(6, 3, 8, 8)
    loader = [(x, torch.zeros(6, dtype=torch.long))]
    probs, loss = evaluate(model, loader, device=torch.device("cpu"), loss_fn=_ce, num_classes=5,
                           tta_views=("orig", "hflip"))
    with torch.no_grad():
        expected = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
    np.testing.assert_allclose(probs, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not model.training and loss > 0


def test_evaluate_features_are_the_plain_view_in_the_same_pass():
    """features=True: the probabilities do not change, and the features are those of the
    unflipped images whatever the TTA views (checked against the model's own layers)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Linear(4, 5)

    class Split(nn.Module):  # timm's forward_features / forward_head(pre_logits) split
        num_features = 4

        def __init__(self):
            super().__init__()
            self.body, self.head = model, head

        def forward_features(self, x):
            return self.body(x)

        def forward_head(self, x, pre_logits=False):
            return x if pre_logits else self.head(x)

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    net = Split()
    x = torch.randn(7, 3, 8, 8)
    loader = [(x[:4], torch.zeros(4, dtype=torch.long)), (x[4:], torch.zeros(3, dtype=torch.long))]
    with torch.no_grad():
        plain = model(x).numpy()
    for views in [("orig",), ("hflip", "orig"), ("hflip", "vflip")]:
        probs, loss, features = evaluate(net, loader, device=torch.device("cpu"), tta_views=views,
                                         features=True)
        expected, none = evaluate(net, loader, device=torch.device("cpu"), tta_views=views)
        np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(features, plain, rtol=1e-5, atol=1e-6)
        assert loss is None and none is None and features.shape == (7, 4)


def _slow_reference_epoch(model, batches, optimizer, accum):
    """The loop as it was: every micro-batch reads its loss and accuracy on the host."""
    loss_sum, correct, n = 0.0, 0, len(batches)
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(batches):
        soft = torch.nn.functional.one_hot(y, 5).float()
        logits = model(x)
        loss = _ce(logits, soft)
        (loss / group_size(i, n, accum)).backward()
        loss_sum += loss.item() * x.shape[0]
        correct += int((logits.argmax(1) == soft.argmax(1)).sum().item())
        if should_step(i, n, accum):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return loss_sum, correct


@pytest.mark.parametrize("accum", [1, 3])
def test_epoch_loss_and_accuracy_equal_a_per_batch_host_reference(accum):
    seed = int(np.random.default_rng().integers(1e6))
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(int(b), 3, 8, 8, generator=gen), torch.randint(0, 5, (int(b),), generator=gen))
               for b in torch.randint(3, 9, (7,), generator=gen)]
    ref = _net(seed)
    loss_sum, correct = _slow_reference_epoch(ref, batches, torch.optim.SGD(ref.parameters(), lr=0.1), accum)
    model = _net(seed)
    stats = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=_ce,
                            device=torch.device("cpu"), num_classes=5, accum_steps=accum, progress=False)
    assert stats.loss_sum == loss_sum and stats.correct == correct  # bit-equal, not close
    assert stats.images == sum(len(y) for _, y in batches)
    assert stats.loss == loss_sum / stats.images and stats.accuracy == correct / stats.images
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))


def test_the_sums_are_read_from_the_device_once_per_epoch_not_per_batch(monkeypatch):
    import mixcls.engine
    reads = []
    real = mixcls.engine._DeviceSums.read_into
    monkeypatch.setattr(mixcls.engine, "READ_SECONDS", 1e9)
    monkeypatch.setattr(mixcls.engine._DeviceSums, "read_into",
                        lambda self, stats: (reads.append(len(self.pending)), real(self, stats)))
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))) for _ in range(12)]
    model = _net(0)
    seen = []
    stats = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=_ce,
                            device=torch.device("cpu"), num_classes=5, progress=False,
                            on_step=lambda i, s: seen.append(s.steps))
    assert reads == [12] and seen == list(range(1, 13)) and stats.images == 48
    # a callback that needs the sums settles them itself, and gets the exact values so far
    partial = []
    train_one_epoch(_net(0), batches, torch.optim.SGD(_net(0).parameters(), lr=0.1), loss_fn=_ce,
                    device=torch.device("cpu"), num_classes=5, progress=False,
                    on_step=lambda i, s: partial.append(s.settle().loss_sum) if i == 5 else None)
    assert len(partial) == 1 and partial[0] > 0


def test_uint8_batches_with_a_normalizer_train_as_the_same_batches_normalised_before():
    from mixcls.transforms import Normalizer
    gen = torch.Generator().manual_seed(5)
    raw = [(torch.randint(0, 256, (6, 3, 8, 8), generator=gen, dtype=torch.uint8),
            torch.randint(0, 5, (6,), generator=gen)) for _ in range(4)]
    normalizer = Normalizer((0.3, 0.5, 0.7), (0.2, 0.3, 0.25))
    outcomes = []
    for batches, norm in ((raw, normalizer), ([(normalizer(x), y) for x, y in raw], None)):
        model = _net(2)
        stats = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=_ce,
                                device=torch.device("cpu"), num_classes=5, normalizer=norm, progress=False)
        probs, _ = evaluate(model, batches, device=torch.device("cpu"), normalizer=norm)
        outcomes.append((stats.loss_sum, probs, [p.detach().clone() for p in model.parameters()]))
    (a_loss, a_probs, a_w), (b_loss, b_probs, b_w) = outcomes
    assert a_loss == b_loss and np.array_equal(a_probs, b_probs)
    assert all(torch.equal(x, y) for x, y in zip(a_w, b_w))
    with pytest.raises(TypeError, match="uint8 images need a Normalizer"):
        evaluate(_net(0), raw, device=torch.device("cpu"))


def test_colour_on_device_trains_as_the_batches_coloured_and_normalised_before():
    """--colour-on-device: the training step shifts the colours of the uint8 batch with the
    step's generator, then normalises; the same as feeding batches coloured and normalised
    beforehand from a generator in the same state. Evaluation never shifts colours."""
    from mixcls.transforms import Normalizer, build_device_colour
    gen = torch.Generator().manual_seed(6)
    raw = [(torch.randint(0, 256, (6, 3, 8, 8), generator=gen, dtype=torch.uint8),
            torch.randint(0, 5, (6,), generator=gen)) for _ in range(4)]
    normalizer, colour = Normalizer((0.3, 0.5, 0.7), (0.2, 0.3, 0.25)), build_device_colour("cassava")
    before = torch.Generator().manual_seed(9)
    coloured = [(normalizer.from_255(colour(x, before)), y) for x, y in raw]
    assert not torch.allclose(coloured[0][0], normalizer(raw[0][0]))
    outcomes = []
    for batches, kwargs in ((raw, dict(normalizer=normalizer, device_augment=colour,
                                       generator=torch.Generator().manual_seed(9))),
                            (coloured, {})):
        model = _net(3)
        stats = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=_ce,
                                device=torch.device("cpu"), num_classes=5, progress=False, **kwargs)
        outcomes.append((stats.loss_sum, [p.detach().clone() for p in model.parameters()]))
    (a_loss, a_w), (b_loss, b_w) = outcomes
    assert a_loss == b_loss and all(torch.equal(x, y) for x, y in zip(a_w, b_w))


# ---------------------------------------------------------------- row weights (--pseudo-weight)

def _one_step_delta(batches):
    """The SGD(lr=1) step of one epoch over `batches` on _net(5): the gradient, per parameter."""
    from mixcls.losses import CrossEntropy

    model = _net(5)
    before = [p.detach().clone() for p in model.parameters()]
    train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=1.0), loss_fn=CrossEntropy(),
                    device=torch.device("cpu"), num_classes=5, progress=False)
    return [b - p.detach() for b, p in zip(before, model.parameters())]


def test_row_weights_count_a_row_as_often_as_its_weight():
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1e6)))
    x, y = torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 5, (6,), generator=gen)
    weights = torch.tensor([1.0, 2.0, 0.0, 1.0, 3.0, 1.0])
    # Weight 0 drops the row, weight 2 (3) counts it twice (three times): the same gradient.
    repeats = torch.repeat_interleave(torch.arange(6), weights.long())
    expected = _one_step_delta([(x[repeats], y[repeats])])
    got = _one_step_delta([(x, y, weights)])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plain = _one_step_delta([(x, y)])  # the weights did something
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(got, plain))


def test_mixed_rows_take_their_weights_mixed_with_the_same_lambda_and_partner():
    from mixcls.engine import prepare_batch
    from mixcls.mix import Mixer

    gen = torch.Generator().manual_seed(4)
    images, labels = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 5, (8,), generator=gen)
    weights = torch.rand(8, generator=gen) + 0.5
    for method in ("mixup", "cutmix"):
        mixer = Mixer(method, alpha=1.0, mode="sample" if method == "mixup" else "batch", num_classes=5)
        plan = mixer.sample_plan(8, 16, 16, torch.Generator().manual_seed(9))
        lam = plan.masks.float().mean(dim=(1, 2, 3)).expand(8)
        _, soft, mixed = prepare_batch(images, labels, device=torch.device("cpu"), num_classes=5,
                                       mixer=mixer, generator=torch.Generator().manual_seed(9),
                                       weights=weights)
        _, soft_alone, none = prepare_batch(images, labels, device=torch.device("cpu"), num_classes=5,
                                            mixer=mixer, generator=torch.Generator().manual_seed(9))
        assert none is None
        torch.testing.assert_close(soft, soft_alone)  # the weights change no target
        torch.testing.assert_close(mixed, lam * weights + (1 - lam) * weights[plan.perm])
        assert not torch.allclose(mixed, weights)
