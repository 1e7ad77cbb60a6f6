"""Every image mode that occurs in medical sets comes out as 8-bit RGB, with the picture preserved."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stllava_med.data.vqa import ImageError, load_image, to_rgb


def _gradient(size=(32, 24)) -> np.ndarray:
    w, h = size
    return np.tile(np.linspace(0, 1, w), (h, 1))


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr", "RGB"])
def test_plain_modes_become_rgb(tmp_path, mode):
    base = Image.fromarray((_gradient() * 255).astype(np.uint8), mode="L").convert(mode)
    path = tmp_path / f"img_{mode}.{'jpg' if mode in ('CMYK', 'YCbCr') else 'png'}"
    base.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == base.size
    arr = np.asarray(out)
    if mode != "1":  # left-to-right gradient survives the conversion
        assert arr[:, -1].mean() > arr[:, 0].mean() + 100


def test_16_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    values = (_gradient() * 4000 + 1000).astype(np.uint16)  # DICOM-like range, far above 255
    path = tmp_path / "ct16.png"
    Image.fromarray(values).save(path)  # I;16
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.min() == 0 and out.max() == 255  # the full range is used
    # a plain convert("RGB") would clip every pixel to 255
    assert (out[..., 0] == 255).mean() < 0.1


def test_32_bit_modes(tmp_path):
    for mode, values in (("I", (_gradient() * 70000).astype(np.int32)), ("F", _gradient().astype(np.float32) * 3.5)):
        out = to_rgb(Image.fromarray(values, mode=mode))
        arr = np.asarray(out)
        assert out.mode == "RGB" and arr.max() == 255 and arr.min() == 0


def test_constant_16_bit_image_does_not_divide_by_zero():
    out = np.asarray(to_rgb(Image.fromarray(np.full((8, 8), 1234, dtype=np.uint16))))
    assert out.shape == (8, 8, 3) and (out == 0).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_composited_on_black(tmp_path, mode):
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, :5, 3] = 255  # left half opaque, right half transparent
    img = Image.fromarray(rgba, mode="RGBA").convert(mode)
    path = tmp_path / f"t_{mode}.png"
    img.save(path)
    out = np.asarray(load_image(path))
    assert out[:, :5].mean() > 150 and out[:, 5:].max() == 0


def test_palette_with_and_without_transparency(tmp_path):
    plain = Image.fromarray((_gradient() * 255).astype(np.uint8), mode="L").convert("P")
    plain.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").mode == "RGB"
    keyed = Image.new("P", (6, 6), 0)
    keyed.putpalette([0, 0, 0, 250, 250, 250] + [0] * 762)
    keyed.paste(1, (0, 0, 3, 6))
    keyed.info["transparency"] = 1  # index 1 is transparent
    keyed.save(tmp_path / "pt.png", transparency=1)
    out = np.asarray(load_image(tmp_path / "pt.png"))
    assert out.max() == 0  # transparent white over black stays black


def test_missing_and_corrupt_images_name_record_and_path(tmp_path):
    with pytest.raises(ImageError, match=r"record 'q7'.*not found.*nope\.jpg"):
        load_image(tmp_path / "nope.jpg", record_id="q7")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageError, match=r"record 'q8'.*cannot read image.*bad\.jpg"):
        load_image(bad, record_id="q8")
