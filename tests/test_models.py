"""Every registered architecture builds, loads weights saved here, and runs; bad weights fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vision.core.errors import ConfigurationError
from vision.models import EMBEDDING, LOGITS, create_model, get_architecture, list_architectures, register_model, with_outputs
from vision.models.weights import read_state_dict

ARCHS = list_architectures()


def test_registry_has_the_served_architectures():
    assert {"resnet50", "resnet101", "resnext50_32x4d", "efficientnet_lite0"} <= set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_loads_saved_state_dict_and_classifies(arch, tmp_path):
    torch.manual_seed(0)
    source = get_architecture(arch).builder(num_classes=7).eval()
    path = tmp_path / f"{arch}.pt"
    torch.save(source.state_dict(), path)
    loaded = create_model(arch, num_classes=7, weights=path)
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        out = loaded(x)
        ref = source(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert torch.equal(out, ref), "weights were not loaded"


def test_registry_checkpoint_with_module_prefix_loads(tmp_path):
    source = get_architecture("resnet50").builder(num_classes=3)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state, "epoch": 3, "arch": "resnet50"}, path)
    loaded = create_model("resnet50", num_classes=3, weights=path)
    assert torch.equal(loaded.fc.weight, source.fc.weight)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a readable torch file"),
        (b"\x00" * 100 + b"garbage", "not a readable torch file"),
        ("truncated", "not a readable torch file"),
        ("tensor-not-dict", "holds no state dict"),
        ("wrong-classes", "wrong shape"),
        ("other-arch", "missing keys"),
    ],
)
def test_bad_weights_fail_clearly(tmp_path, content, message):
    path = tmp_path / "w.pt"
    if content == "truncated":
        torch.save(get_architecture("resnet50").builder(num_classes=3).state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "tensor-not-dict":
        torch.save(torch.zeros(3), path)
    elif content == "wrong-classes":
        torch.save(get_architecture("resnet50").builder(num_classes=5).state_dict(), path)
    elif content == "other-arch":
        torch.save(get_architecture("efficientnet_lite0").builder(num_classes=3).state_dict(), path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigurationError, match=message) as info:
        create_model("resnet50", num_classes=3, weights=path)
    assert str(path) in str(info.value)


def test_missing_weights_file(tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        create_model("resnet50", weights=tmp_path / "nope.pt")


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(ConfigurationError, match="resnet50"):
        get_architecture("vgg99")


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet50", taps=lambda net, signature: net)(lambda *, num_classes: None)


def test_bundled_efficientnet_weights_are_the_real_imagenet_ones():
    from conftest import photo
    from vision.media.imaging import PRESETS, preprocess

    model = create_model("efficientnet_lite0")
    x = torch.from_numpy(np.stack([preprocess(photo("coffee.png"), PRESETS["torchvision"])]))
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == 967 and float(probs[967]) > 0.8
    assert len(read_state_dict(get_architecture("efficientnet_lite0").defaults.bundled_weights())) == 296


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_classes", [5, 0])
def test_every_architecture_computes_its_declared_signature(arch, num_classes):
    """Every registered model exposes logits (unless it is a pure feature extractor), the pooled embedding
    and its declared feature maps, with the shapes its signature promises for any input size."""
    module = create_model(arch, num_classes=num_classes, pretrained=False)
    signature = get_architecture(arch).signature(num_classes)
    assert (LOGITS in signature.outputs) == (num_classes > 0) and EMBEDDING in signature.outputs
    assert signature.layers, "every architecture declares feature maps for Features and DELF"
    tapped = with_outputs(arch, module, num_classes)
    x = torch.randn(1, 3, 97, 130)
    with torch.inference_mode():
        outputs = dict(zip(signature.outputs, tapped(x), strict=True))
        if num_classes:
            torch.testing.assert_close(outputs[LOGITS], module(x))  # the taps change nothing
    for name, value in outputs.items():
        assert signature.check(name, tuple(value.shape), 97, 130) is None
        assert torch.isfinite(value).all()


def test_random_initialisation_is_seeded():
    a = create_model("resnet50", num_classes=3, pretrained=False)
    b = create_model("resnet50", num_classes=3, pretrained=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_imagenet_names_are_torchvisions_public_metadata():
    from torchvision.models import ResNet50_Weights

    from vision.labels.names import imagenet_names

    assert imagenet_names() == tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
