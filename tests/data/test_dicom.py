"""medtune.data.dicom through load_image: pydicom's real files (rescale, VOI LUT, windows,
MONOCHROME1, multi-frame, colour, corrupt files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medtune.data.dicom import MODALITY_WINDOWS, is_dicom
from medtune.data.errors import DataError
from medtune.data.images import ImageLoadError, load_image

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
RTDOSE = get_testdata_file("rtdose.dcm")  # real multi-frame file (15 frames)


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


def test_ct_rescale_and_modality_preset():
    ds = pydicom.dcmread(CT)
    assert float(ds.RescaleIntercept) == -1024 and "WindowCenter" not in ds
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    out = gray(load_image(CT))
    assert out.shape == (128, 128)
    c, w = MODALITY_WINDOWS["CT"]
    np.testing.assert_array_equal(out, linear_window(hu, c, w))


def test_ct_explicit_window_and_named_window():
    ds = pydicom.dcmread(CT)
    hu = ds.pixel_array.astype(np.float64) - 1024
    np.testing.assert_array_equal(
        gray(load_image(CT, window=(100, 1000))), linear_window(hu, 100, 1000)
    )
    np.testing.assert_array_equal(
        gray(load_image(CT, window="lung")), linear_window(hu, -600, 1500)
    )
    # A pixel exactly at the window centre maps to mid-grey.
    assert gray(load_image(CT, window=(float(hu[64, 64]), 401)))[64, 64] in (127, 128)


def test_modality_argument_overrides_preset():
    # modality="MR" has no preset -> min-max over the HU values.
    ds = pydicom.dcmread(CT)
    hu = ds.pixel_array.astype(np.float64) - 1024
    expect = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(gray(load_image(CT, modality="MR")), expect)


def test_rescale_slope_applied(tmp_path):
    ds = pydicom.dcmread(CT)
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -2048
    p = tmp_path / "ct_slope.dcm"
    ds.save_as(p)
    hu = ds.pixel_array.astype(np.float64) * 2 - 2048
    np.testing.assert_array_equal(gray(load_image(p, window=(0, 2000))), linear_window(hu, 0, 2000))


def test_mr_uses_file_window():
    ds = pydicom.dcmread(MR)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    out = gray(load_image(MR))
    np.testing.assert_array_equal(out, linear_window(ds.pixel_array, c, w))
    # An explicit window beats the file's.
    np.testing.assert_array_equal(
        gray(load_image(MR, window=(1000, 500))), linear_window(ds.pixel_array, 1000, 500)
    )


def test_voi_lut_sequence(tmp_path):
    ds = pydicom.dcmread(MR)
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "US", [256, 0, 8])
    item.add_new("LUTData", "US", [255 - i for i in range(256)])  # an inverting LUT
    ds.VOILUTSequence = pydicom.Sequence([item])
    p = tmp_path / "mr_lut.dcm"
    ds.save_as(p)
    raw = np.clip(ds.pixel_array, 0, 255)
    np.testing.assert_array_equal(gray(load_image(p)), (255 - raw).astype(np.uint8))


def test_monochrome1_inverted(tmp_path):
    ds = pydicom.dcmread(MR)
    ds.PhotometricInterpretation = "MONOCHROME1"
    p = tmp_path / "mr_mono1.dcm"
    ds.save_as(p)
    normal, inverted = gray(load_image(MR)).astype(int), gray(load_image(p)).astype(int)
    assert np.abs(inverted - (255 - normal)).max() <= 1
    assert inverted.mean() > 255 - normal.mean() - 1


def test_multiframe_middle_frame_default(tmp_path):
    ds = pydicom.dcmread(CT)
    base = ds.pixel_array
    frames = np.stack([base, base + 100, base + 200]).astype(base.dtype)  # HU offsets per frame
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    p = tmp_path / "ct_3frames.dcm"
    ds.save_as(p)
    hu = frames.astype(np.float64) - 1024
    np.testing.assert_array_equal(
        gray(load_image(p, window=(0, 3000))), linear_window(hu[1], 0, 3000)
    )
    np.testing.assert_array_equal(
        gray(load_image(p, window=(0, 3000), frame=2)), linear_window(hu[2], 0, 3000)
    )
    with pytest.raises(ImageLoadError, match=r"ct_3frames\.dcm.*frame 3 out of range \(file has 3"):
        load_image(p, frame=3)


def test_real_multiframe_rtdose():
    ds = pydicom.dcmread(RTDOSE)
    assert int(ds.NumberOfFrames) == 15
    mid, first = gray(load_image(RTDOSE)), gray(load_image(RTDOSE, frame=0))
    assert mid.shape == (10, 10)
    arr = ds.pixel_array[7].astype(np.float64)  # middle of 15; no rescale or window in the file
    expect = np.rint((arr - arr.min()) / (arr.max() - arr.min()) * 255)
    np.testing.assert_array_equal(mid, expect.astype(np.uint8))
    assert not np.array_equal(mid, first)


def test_dicom_detected_by_magic_without_extension(tmp_path):
    p = tmp_path / "scan_0001"
    shutil.copy(CT, p)
    assert is_dicom(p) and is_dicom(CT)
    np.testing.assert_array_equal(np.asarray(load_image(p)), np.asarray(load_image(CT)))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupt_dicom_names_path(tmp_path):
    data = Path(CT).read_bytes()
    p = tmp_path / "truncated.dcm"
    p.write_bytes(data[: len(data) - 20000])  # pixel data cut short
    with pytest.raises(ImageLoadError, match=r"truncated\.dcm.*(cannot|pixel)") as e:
        load_image(p)
    assert isinstance(e.value, DataError) and isinstance(e.value, ValueError)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 50)
    with pytest.raises(ImageLoadError, match=r"junk\.dcm"):
        load_image(junk)


def test_real_colour_dicom():
    img = load_image(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    assert img.mode == "RGB" and img.size == (100, 100)
    assert len(set(np.asarray(img).reshape(-1, 3)[:, 0].tolist())) > 1
