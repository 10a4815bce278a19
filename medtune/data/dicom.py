"""DICOM to display values with pydicom: the pipeline a radiology viewer applies.

:func:`dicom_to_array` decodes one frame and maps it to 8-bit display values:

1. decode one frame (multi-frame: the middle one unless ``frame`` is given);
2. modality LUT: ``RescaleSlope`` / ``RescaleIntercept`` (or a Modality LUT Sequence), so CT values
   are Hounsfield units; enhanced multi-frame files are read from the functional groups;
3. VOI: an explicit ``window=(center, width)`` argument wins; else the file's VOI LUT Sequence or
   ``WindowCenter`` / ``WindowWidth`` (first value; ``VOILUTFunction`` LINEAR, LINEAR_EXACT or
   SIGMOID); else a preset for the modality from :data:`MODALITY_WINDOWS` (CT: soft tissue
   40/400; edit the dict or pass ``window`` to override); else min-max over the frame;
4. ``MONOCHROME1`` is inverted (so bone is bright, as in MONOCHROME2).

Colour DICOM (RGB, YBR, PALETTE COLOR) is returned as RGB. The windowing helpers here
(:func:`window_values`, :func:`minmax`, :func:`to_uint8`) also scale high-bit-depth raster files
(:mod:`medtune.data.images`). pydicom is imported on first use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medtune.data.errors import ImageLoadError

__all__ = [
    "MODALITY_WINDOWS",
    "NAMED_WINDOWS",
    "dicom_to_array",
    "is_dicom",
    "minmax",
    "to_uint8",
    "window_values",
]

#: Common (center, width) windows, usable by name: ``load_image(p, window="lung")``.
NAMED_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (60.0, 160.0),
    "mediastinum": (50.0, 350.0),
}

#: Window used for a DICOM whose file carries none, by (upper-case) Modality. Edit to override;
#: modalities not listed fall back to min-max.
MODALITY_WINDOWS: dict[str, tuple[float, float]] = {
    "CT": NAMED_WINDOWS["soft_tissue"],
}

_DICOM_EXTS = {".dcm", ".dicom"}


def is_dicom(path: str | Path) -> bool:
    """True for ``.dcm`` / ``.dicom`` files and for any file with ``DICM`` at byte 128."""
    path = Path(path)
    if path.suffix.lower() in _DICOM_EXTS:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def minmax(arr: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the array's finite min and max; a constant image becomes 0."""
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros_like(arr, dtype=np.float64)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float64)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def window_values(
    arr: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1].

    LINEAR: ``((x - (c - 0.5)) / (w - 1) + 0.5)`` clipped (width >= 1); LINEAR_EXACT:
    ``(x - c) / w + 0.5`` clipped; SIGMOID: ``1 / (1 + exp(-4 (x - c) / w))``.
    """
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / width))
    if function == "LINEAR_EXACT" or width <= 1:
        return np.clip((arr - center) / width + 0.5, 0.0, 1.0)
    return np.clip((arr - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.nan_to_num(x) * 255.0), 0, 255).astype(np.uint8)


def _first(value: Any) -> Any:
    """First item of a multi-valued DICOM element, or the value itself."""
    if value is None:
        return None
    try:
        if not isinstance(value, (str, bytes)) and len(value) > 0:
            return value[0]
    except TypeError:
        pass
    return value


def _frame_attr(ds: Any, index: int, seq: str, name: str) -> Any:
    """An attribute at top level, else in the enhanced per-frame or shared functional groups."""
    if name in ds and ds[name].value not in (None, ""):
        return ds[name].value
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        if groups not in ds:
            continue
        items = ds[groups].value
        if not items:
            continue
        item = items[min(index, len(items) - 1)] if groups.startswith("PerFrame") else items[0]
        if seq in item and item[seq].value:
            inner = item[seq].value[0]
            if name in inner and inner[name].value not in (None, ""):
                return inner[name].value
    return None


def dicom_to_array(
    path: str | Path,
    *,
    window: tuple[float, float] | None = None,
    frame: int | None = None,
    modality: str | None = None,
) -> np.ndarray:
    """Decode one DICOM frame to display values.

    Args:
        path: the DICOM file.
        window: explicit ``(center, width)``; see :func:`load_image` for the precedence.
        frame: 0-based frame index; default the middle frame.
        modality: modality for the preset window (default the file's ``Modality``).

    Returns:
        ``uint8`` array ``[H, W]`` (grayscale) or ``[H, W, 3]`` (colour).

    Raises:
        ImageLoadError: not a readable DICOM, no pixel data, frame out of range.
    """
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    path = Path(path)
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as e:  # pydicom raises many types for corrupt files
        raise ImageLoadError(f"{path}: cannot read DICOM ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageLoadError(f"{path}: DICOM has no pixel data (expected an image object)")
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n_frames = 1
    index = n_frames // 2 if frame is None else int(frame)
    if not 0 <= index < n_frames:
        raise ImageLoadError(f"{path}: frame {frame} out of range (file has {n_frames} frames)")
    try:
        from pydicom.pixels import pixel_array

        arr = pixel_array(ds, index=index) if n_frames > 1 else ds.pixel_array
    except Exception as e:
        raise ImageLoadError(
            f"{path}: cannot decode DICOM pixel data ({type(e).__name__}: {e})"
        ) from None
    if (
        n_frames > 1
        and arr.ndim >= 3
        and arr.shape[0] == n_frames
        and ds.get("SamplesPerPixel", 1) == 1
    ):
        arr = arr[index]  # a decoder that ignored `index`

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as e:
            raise ImageLoadError(
                f"{path}: bad palette colour LUT ({type(e).__name__}: {e})"
            ) from None
        return _colorto_uint8(rgb, 16 if rgb.dtype.itemsize > 1 else 8)
    if arr.ndim == 3:  # RGB / YBR (pydicom converts YBR to RGB by default)
        return _colorto_uint8(arr, int(ds.get("BitsStored", 8) or 8))

    def display(raw: np.ndarray) -> np.ndarray:
        """Raw stored values -> uint8 display values (steps 2-4 of the module docstring)."""
        values = _modality_lut(ds, raw, index, apply_modality_lut)
        if window is not None:
            out = window_values(values, *window)
        else:
            out = _file_voi(ds, values, index)
            if out is None:
                mod = (modality or str(ds.get("Modality", "") or "")).strip().upper()
                preset = MODALITY_WINDOWS.get(mod)
                out = window_values(values, *preset) if preset else minmax(values)
        if photometric == "MONOCHROME1":
            out = 1.0 - out
        return to_uint8(out)

    if np.issubdtype(arr.dtype, np.integer) and arr.size and "ModalityLUTSequence" not in ds:
        # Fast path: integer pixels under a linear rescale. Run the pipeline once per distinct
        # stored value in [min, max] and look the frame up in that table: same float64 math, and
        # the min-max fallback sees the same extremes (a linear map's are at the endpoints).
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo < 1 << 20:
            table = display(np.arange(lo, hi + 1, dtype=np.int64))
            return table[np.subtract(arr, lo, dtype=np.int64) if lo else arr]
    return display(arr)


def _colorto_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    scale = float(2**bits - 1) if bits > 0 else float(arr.max() or 1)
    return to_uint8(arr.astype(np.float64) / scale)


def _modality_lut(ds: Any, arr: np.ndarray, index: int, apply_modality_lut: Callable) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float64)
    slope = _frame_attr(ds, index, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _frame_attr(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
    values = arr.astype(np.float64)
    if slope is not None and float(slope) != 1.0:
        values = values * float(slope)
    if intercept is not None and float(intercept) != 0.0:
        values = values + float(intercept)
    return values


def _file_voi(ds: Any, values: np.ndarray, index: int) -> np.ndarray | None:
    """The file's own VOI transform scaled to [0, 1], or None when it has none."""
    if "VOILUTSequence" in ds and ds.VOILUTSequence:
        item = ds.VOILUTSequence[0]
        try:
            entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
            lut = np.asarray(item.LUTData, dtype=np.float64).ravel()
            entries = entries or 65536  # PS3.3 C.11.2.1.1: 0 means 2**16 entries
            lut = lut[:entries]
            idx = np.clip(np.rint(values) - first_mapped, 0, len(lut) - 1).astype(np.int64)
            hi = float(2**bits - 1) if 0 < bits <= 16 else float(lut.max() or 1)
            return np.clip(lut[idx] / hi, 0.0, 1.0)
        except Exception:
            pass  # malformed LUT: fall through to the window attributes
    center = _first(_frame_attr(ds, index, "FrameVOILUTSequence", "WindowCenter"))
    width = _first(_frame_attr(ds, index, "FrameVOILUTSequence", "WindowWidth"))
    if center is None or width is None:
        return None
    try:
        center, width = float(center), float(width)
    except (TypeError, ValueError):
        return None
    if not width > 0 or not math.isfinite(center):
        return None
    function = _frame_attr(ds, index, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR"
    return window_values(values, center, width, str(function))
