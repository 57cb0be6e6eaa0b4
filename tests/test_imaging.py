"""Image decoding and preprocessing, against torchvision's reference transforms where one exists."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import encode, photo
from vision.core.errors import ConfigurationError, InvalidImage
from vision.media.imaging import PRESETS, DecodeLimits, Preset, decode_image, get_preset, load_image, preprocess, to_rgb


def torchvision_reference(img: Image.Image, mean, std) -> np.ndarray:
    tf = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )
    return tf(img).numpy()


@pytest.mark.parametrize("name", ["coffee.png", "chelsea.png", "motorcycle_left.png"])
def test_torchvision_preset_matches_torchvision_transforms(name):
    img = photo(name)
    ours = preprocess(img, PRESETS["torchvision"])
    ref = torchvision_reference(img, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
    # Resampling only the crop box can round a rare pixel to the neighbouring 8-bit level: at most one gray
    # level (1/255/std ≈ 0.0175 in normalised units), and almost everywhere exactly equal.
    diff = np.abs(ours - ref)
    assert diff.max() <= 1.01 / (255 * 0.224) and diff.mean() < 1e-4


def test_mlimages_preset_is_minus_one_to_one_rgb():
    img = photo("coffee.png")
    ours = preprocess(img, get_preset("mlimages"))
    crop = np.asarray(transforms.CenterCrop(224)(transforms.Resize(256)(img)), dtype=np.float32)
    expected = ((crop / 255.0) - 0.5) * 2.0
    np.testing.assert_allclose(ours, expected.transpose(2, 0, 1), atol=1e-5)
    assert ours.min() >= -1.0 and ours.max() <= 1.0
    # RGB order: the red-dominant coffee cup region has a larger channel 0 than channel 2 on average.
    assert ours[0].mean() > ours[2].mean()


def test_bgr_channel_order_swaps_channels():
    img = photo("coffee.png")
    rgb = Preset("x", 256, 224, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    bgr = Preset("x", 256, 224, (0.3, 0.2, 0.1), (0.6, 0.5, 0.4), channel_order="BGR")
    np.testing.assert_allclose(preprocess(img, bgr), preprocess(img, rgb)[::-1], atol=1e-6)


def test_bad_preset_is_refused():
    with pytest.raises(ConfigurationError):
        Preset("bad", 200, 224, (0, 0, 0), (1, 1, 1))
    with pytest.raises(ConfigurationError, match="known"):
        get_preset("nope")


def test_exif_orientation_gives_upright_pixels():
    upright = photo("coffee.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; display = rotate 90° clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    decoded = decode_image(encode(stored, "PNG", exif=exif))
    assert decoded.size == upright.size
    assert np.array_equal(np.asarray(decoded), np.asarray(upright))


@pytest.mark.parametrize(
    "mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"]
)
def test_every_mode_becomes_rgb(mode):
    base = photo("chelsea.png").resize((64, 48))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    elif mode == "I":
        img = base.convert("L").convert("I")
    else:
        img = base.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (64, 48)
    arr = np.asarray(out)
    assert arr.std() > 5, "conversion flattened the image"
    if mode in ("I;16", "I", "F"):
        # High bit depth is scaled to 8 bits, not clipped: values match the 8-bit grayscale.
        np.testing.assert_allclose(arr[..., 0], np.asarray(base.convert("L")), atol=1)


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    assert np.asarray(to_rgb(img)).min() == 255


def test_jpeg_draft_decode_is_used_for_big_photos_and_stays_accurate():
    big = photo("coffee.png").resize((4000, 3000), Image.Resampling.BICUBIC)  # 12 MP
    data = encode(big, "JPEG", quality=90)
    drafted = decode_image(data, min_target_side=256)
    assert min(drafted.size) >= 256 and drafted.size[0] <= 1000  # DCT-domain downscale happened
    preset = PRESETS["torchvision"]
    full = preprocess(decode_image(data), preset)
    fast = load_image(data, preset)
    assert np.abs(full - fast).mean() < 0.05  # normalised units; the pictures are the same


def test_decode_limits():
    data = encode(photo("coffee.png"), "PNG")
    with pytest.raises(InvalidImage, match="byte limit"):
        decode_image(data, DecodeLimits(max_bytes=1000))
    with pytest.raises(InvalidImage, match="pixel limit"):
        decode_image(data, DecodeLimits(max_pixels=1000))
    with pytest.raises(InvalidImage, match="at least 8"):
        decode_image(encode(Image.new("RGB", (7, 100)), "PNG"))


def test_invalid_image_error_names_index_and_id():
    err = InvalidImage("broken").at(3, "cat.jpg")
    assert str(err) == "image 3 (id 'cat.jpg'): broken" and err.status == "INVALID_ARGUMENT"


def test_gif_first_frame():
    frames = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(decode_image(data))[..., 0].mean() > 200


def test_12mp_jpeg_decode_and_preprocess_is_fast_enough_to_measure():
    """Not a timing assertion (machines are noisy): reports the number docs/benchmarks.md quotes."""
    big = photo("coffee.png").resize((4000, 3000), Image.Resampling.BICUBIC)
    data = encode(big, "JPEG", quality=90)
    preset = PRESETS["torchvision"]
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        load_image(data, preset)
        timings.append(time.perf_counter() - started)
    print(f"12-MP JPEG decode+preprocess median {1000 * sorted(timings)[2]:.1f} ms")
    assert torch.from_numpy(load_image(data, preset)).shape == (3, 224, 224)


def test_extreme_aspect_ratio_costs_only_the_crop():
    """An 8×1,000,000 PNG is 8 MP (under the limit) but would be 32,000,000×256 if resized whole."""
    ramp = (np.arange(1_000_000) % 251).astype(np.uint8)
    strip = Image.fromarray(np.broadcast_to(ramp[None, :, None], (8, 1_000_000, 3)).copy())
    data = encode(strip, "PNG", compress_level=1)
    started = time.perf_counter()
    out = load_image(data, PRESETS["torchvision"])
    assert out.shape == (3, 224, 224) and np.isfinite(out).all()
    assert time.perf_counter() - started < 20  # generous: guards against the whole-image resize (minutes / OOM)


@pytest.mark.parametrize("size", [(8, 8), (300, 256), (256, 256), (640, 427), (97, 1301)])
def test_crop_only_resize_equals_resize_then_crop(size):
    img = photo("astronaut.png").resize(size, Image.Resampling.BICUBIC)
    ref = transforms.CenterCrop(224)(transforms.Resize(256)(img))
    from vision.media.imaging import resize_center_crop

    ours = resize_center_crop(img, 256, 224)
    assert np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(ref, dtype=np.int16)).max() <= 1
