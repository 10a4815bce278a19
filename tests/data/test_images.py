"""medtune.data.images: raster files (8- and 16-bit, RGB, RGBA, corrupt) and in-memory inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medtune.data.images import ImageLoadError, load_image

CT = get_testdata_file("CT_small.dcm")


def linear_window(x, c, w):
    """DICOM PS3.3 C.11.2.1.2 LINEAR window -> uint8, written independently of the module."""
    x = np.asarray(x, dtype=np.float64)
    y = np.where(
        x <= c - 0.5 - (w - 1) / 2,
        0.0,
        np.where(x > c - 0.5 + (w - 1) / 2, 1.0, (x - (c - 0.5)) / (w - 1) + 0.5),
    )
    return np.clip(np.rint(y * 255), 0, 255).astype(np.uint8)


def gray(img: Image.Image) -> np.ndarray:
    a = np.asarray(img)
    assert img.mode == "RGB" and a.ndim == 3 and a.shape[2] == 3
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    return a[..., 0]


def test_png_gray_to_rgb(tmp_path):
    a = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    p = tmp_path / "g.png"
    Image.fromarray(a, mode="L").save(p)
    img = load_image(p)
    assert img.size == (64, 48)
    np.testing.assert_array_equal(gray(img), a)


def test_png_16bit_minmax_and_window(tmp_path):
    a = np.linspace(1000, 5000, 32 * 32).reshape(32, 32).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    out = gray(load_image(p))
    assert out.min() == 0 and out.max() == 255  # not clipped to 255 by PIL
    np.testing.assert_array_equal(
        gray(load_image(p, window=(3000, 1001))), linear_window(a, 3000, 1001)
    )


@pytest.mark.parametrize("ext", ["jpg", "bmp", "tiff", "png"])
def test_rgb_formats(tmp_path, ext):
    a = np.zeros((20, 30, 3), np.uint8)
    a[:, :15] = (200, 30, 30)
    p = tmp_path / f"x.{ext}"
    Image.fromarray(a).save(p)
    out = np.asarray(load_image(p)).astype(int)
    assert out.shape == (20, 30, 3)
    assert np.abs(out[5, 5] - [200, 30, 30]).max() < 12 and out[5, 25].max() < 12


def test_rgba_composited(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255
    a[..., 3] = 255
    p = tmp_path / "a.png"
    Image.fromarray(a, mode="RGBA").save(p)
    assert load_image(p).mode == "RGB" and tuple(np.asarray(load_image(p))[0, 0]) == (255, 0, 0)


def test_corrupt_and_missing_raster(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ImageLoadError, match=r"broken\.png: cannot decode image"):
        load_image(bad)
    with pytest.raises(ImageLoadError, match=r"not found: .*nope\.png") as e:
        load_image(tmp_path / "nope.png")
    assert e.value.reason == "missing image"
    with pytest.raises(ImageLoadError, match="window"):
        load_image(CT, window=(40, 0))


def test_in_memory_inputs():
    a = np.linspace(-1000, 1000, 64).reshape(8, 8)
    np.testing.assert_array_equal(gray(load_image(a, window=(0, 500))), linear_window(a, 0, 500))
    assert gray(load_image(a)).max() == 255
    rgb = np.zeros((4, 5, 3), np.uint8)
    assert load_image(rgb).size == (5, 4) and load_image(Image.new("L", (3, 3))).mode == "RGB"
    with pytest.raises(ImageLoadError, match="expected"):
        load_image(np.zeros((2, 2, 2, 2)))


# -------------------------------------------------------------------------------------- transform
