"""The DELF model and the receptive-field facts every declared layer carries.

Receptive fields are derived from each architecture's graph (vision.models.receptive) and checked three
ways: the issue's numbers for torchvision ResNet-50 layer3 (267, 16, 133), the declarations in the zoo for
every registered layer, and the gradient of one cell with respect to the input of a linearised copy of the
model (max-pooling as average pooling, activations as identities), whose non-zero extent is exactly the
receptive box.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from vision.models import EMBEDDING, create_model, get_architecture, list_architectures, with_outputs
from vision.models.delf import AttentionHead, Delf, ResNetTrunk, attention_pool, load_backbone
from vision.models.receptive import ReceptiveField, UnsupportedGraph, architecture_receptive_fields, receptive_fields
from vision.models.signature import ATTENTION, FeatureLayer

ARCHS = list_architectures()


def _linearised(module: nn.Module) -> nn.Module:
    """Same receptive fields, linear: every input pixel inside a cell's box then has a non-zero gradient."""
    module = copy.deepcopy(module).eval()
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.MaxPool2d):
                setattr(child, attr, nn.AvgPool2d(sub.kernel_size, sub.stride, sub.padding, count_include_pad=True))
            elif isinstance(sub, (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish)):
                setattr(child, attr, nn.Identity())
    return module


def _empirical(arch: str, layer: str, column: int, width: int) -> ReceptiveField:
    """Receptive field along x of `layer` from gradients: the box of cell `column` and its neighbour's."""
    num_classes = 0 if get_architecture(arch).defaults.num_classes == 0 else 1000
    module = _linearised(with_outputs(arch, create_model(arch, num_classes=num_classes, pretrained=False), num_classes))
    names = get_architecture(arch).signature(num_classes).outputs
    boxes = []
    for cell in (column, column + 1):
        x = torch.randn(1, 3, 32, width, requires_grad=True)
        out = dict(zip(names, module(x), strict=True))[layer]
        out[0, :, 1, cell].sum().backward()
        touched = np.flatnonzero(x.grad[0].abs().sum(dim=(0, 1)).numpy() > 0)
        boxes.append((int(touched[0]), int(touched[-1])))
    (lo, hi), (next_lo, _) = boxes
    assert lo > 0 and hi < width - 1, "the box must lie inside the probe"
    stride = next_lo - lo
    return ReceptiveField(size=hi - lo + 1, stride=stride, padding=stride * column - lo)


def test_resnet50_layer3_receptive_field_is_267_16_133():
    expected = ReceptiveField(size=267, stride=16, padding=133)
    assert architecture_receptive_fields("resnet50")["layer3"] == expected
    assert _empirical("resnet50", "layer3", column=25, width=704) == expected
    declared = get_architecture("resnet50").defaults.layers[0]
    assert (declared.name, declared.receptive_field, declared.stride, declared.padding) == ("layer3", 267, 16, 133)
    # Cell 0's receptive box is [-133, 133]: its keypoint sits on the image's first pixel.
    assert declared.centre(0) == 0 and declared.centre(np.arange(3)).tolist() == [0, 16, 32]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_declared_layer_carries_its_derived_receptive_field(arch):
    derived = architecture_receptive_fields(arch)
    for layer in get_architecture(arch).defaults.layers:
        assert layer.receptive_field, f"{arch} {layer.name}: no receptive field declared"
        assert ReceptiveField(layer.receptive_field, layer.stride, layer.padding) == derived[layer.name], (
            f"{arch} {layer.name}: declared {layer}, derived {derived[layer.name]}"
        )


def test_derivation_agrees_with_gradients_on_efficientnet():
    assert _empirical("efficientnet_lite0", "blocks.4", 30, 832) == architecture_receptive_fields("efficientnet_lite0")["blocks.4"]


def test_attention_cells_see_what_their_layer3_cells_see():
    # DELF's trunk is torchvision's ResNet-50 up to layer3 (checked by gradients above); the head is 1x1.
    derived = architecture_receptive_fields("delf_resnet50")
    assert derived[ATTENTION] == derived["layer3"] == ReceptiveField(267, 16, 133)


def test_an_op_of_unknown_effect_is_refused_not_guessed():
    class Upsampling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (nn.functional.interpolate(self.conv(x), scale_factor=2.0),)

    with pytest.raises(UnsupportedGraph, match="interpolate"):
        receptive_fields(Upsampling(), ("up",))


def test_feature_layer_stays_constructible_with_three_arguments():
    layer = FeatureLayer("x", 8, 16)
    assert (layer.receptive_field, layer.padding) == (0, 0)


# --------------------------------------------------------------------------------------
# The DELF module
# --------------------------------------------------------------------------------------


def test_attention_head_is_the_papers():
    head = AttentionHead()
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1024, 512, (1, 1)), (512, 1, (1, 1))]
    assert any(isinstance(m, nn.BatchNorm2d) and m.num_features == 512 for m in head.modules())
    scores = head.eval()(torch.randn(2, 1024, 5, 7) * 10)
    assert scores.shape == (2, 1, 5, 7) and (scores >= 0).all()  # softplus


def test_delf_outputs_layer3_attention_and_attention_pooled_embedding():
    model = create_model("delf_resnet50", pretrained=False)
    assert isinstance(model, Delf) and model.classifier is None
    signature = get_architecture("delf_resnet50").signature(0)
    assert signature.outputs == (EMBEDDING, ATTENTION, "layer3")
    tapped = with_outputs("delf_resnet50", model, 0)
    x = torch.randn(1, 3, 100, 133)
    with torch.inference_mode():
        outputs = dict(zip(signature.outputs, tapped(x), strict=True))
        features, scores = model.local_features(x)
        torch.testing.assert_close(outputs[EMBEDDING], model(x))
        # The embedding is the mean of score-weighted, L2-normalised features (the reference's `feat`).
        manual = (features / features.norm(dim=1, keepdim=True) * scores).mean(dim=(2, 3))
        torch.testing.assert_close(outputs[EMBEDDING], manual)
    assert outputs["layer3"].shape == (1, 1024, 7, 9) and outputs[ATTENTION].shape == (1, 1, 7, 9)
    assert attention_pool(features, scores).shape == (1, 1024)


def test_backbone_starts_from_a_torchvision_resnet50_state_dict():
    import torchvision

    torch.manual_seed(3)
    reference = torchvision.models.resnet50(weights=None).eval()
    model = Delf(num_classes=4)
    assert load_backbone(model, reference.state_dict()) == len(model.backbone.state_dict())
    x = torch.randn(1, 3, 64, 64)
    trunk = ResNetTrunk(reference)
    with torch.inference_mode():
        torch.testing.assert_close(model.backbone.eval()(x), trunk(x))
    with pytest.raises(ValueError, match="lacks"):
        load_backbone(model, {k: v for k, v in reference.state_dict().items() if not k.startswith("layer3")})


def test_delf_preset_is_minus_128_over_128():
    from vision.media.imaging import get_preset

    preset = get_preset(get_architecture("delf_resnet50").defaults.preset)
    pixels = np.array([[[0, 128, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(preset.normalise(pixels).ravel(), [(0 - 128) / 128, 0.0, (255 - 128) / 128], atol=1e-6)


def test_delf_exports_to_onnx_with_dynamic_height_and_width(tmp_path):
    import onnxruntime as ort

    from vision.models.export import export_onnx

    signature = get_architecture("delf_resnet50").signature(0)
    module = with_outputs("delf_resnet50", create_model("delf_resnet50", pretrained=False), 0)
    exported = export_onnx(module, tmp_path / "delf.onnx", signature=signature)
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    for height, width in ((97, 130), (160, 48)):
        x = np.random.default_rng(height).standard_normal((1, 3, height, width)).astype(np.float32)
        got = dict(zip(signature.outputs, session.run(list(signature.outputs), {"images": x}), strict=True))
        with torch.inference_mode():
            want = dict(zip(signature.outputs, module(torch.from_numpy(x)), strict=True))
        for name in (ATTENTION, "layer3"):
            assert got[name].shape == (1, *signature.output_shape(name, height, width))
            scale = max(1.0, float(want[name].abs().max()))
            assert np.abs(got[name] - want[name].numpy()).max() / scale <= 1e-4
