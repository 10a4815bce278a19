"""Open medical images (PNG / JPEG / BMP / TIFF and DICOM) as 8-bit RGB PIL images.

:func:`load_image` returns an 8-bit RGB :class:`PIL.Image.Image` for any supported file. DICOM goes
through :func:`medtune.data.dicom.dicom_to_array` (rescale, VOI LUT / window presets, MONOCHROME1,
multi-frame); grayscale is replicated to 3 channels.

Raster files with more than 8 bits per sample (16-bit PNG / TIFF, float TIFF) are scaled the same
way as DICOM (``window`` if given, else min-max) instead of being clipped by PIL.

The tensor transform lives in :mod:`medtune.data.image_transforms`; its names (``image_transform``,
``ImageTransform``, ``CLIP_MEAN``, ...) and the DICOM ones are re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medtune.data.dicom import (
    MODALITY_WINDOWS,
    NAMED_WINDOWS,
    dicom_to_array,
    is_dicom,
    minmax,
    to_uint8,
    window_values,
)
from medtune.data.errors import ImageLoadError
from medtune.data.image_transforms import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_AUGMENT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
    image_transform,
)

__all__ = [
    "ImageLoadError",
    "load_image",
    "image_transform",
    "ImageTransform",
    "is_dicom",
    "dicom_to_array",
    "MODALITY_WINDOWS",
    "NAMED_WINDOWS",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_AUGMENT",
]


def load_image(
    path: str | Path | Image.Image | np.ndarray,
    *,
    window: tuple[float, float] | str | None = None,
    frame: int | None = None,
    modality: str | None = None,
) -> Image.Image:
    """Open an image file as an 8-bit RGB PIL image.

    Args:
        path: PNG / JPEG / BMP / TIFF / GIF / WebP file, or DICOM (by extension ``.dcm`` /
            ``.dicom`` or the ``DICM`` magic at byte 128). An in-memory PIL image or array
            (``[H, W]`` grayscale, scaled like a 16-bit file unless uint8; or ``[H, W, 3]`` uint8)
            is converted the same way.
        window: ``(center, width)`` in output units of the modality LUT (HU for CT), or a name in
            :data:`NAMED_WINDOWS`. Overrides the file's own window. Ignored for 8-bit and colour
            images.
        frame: 0-based frame of a multi-frame DICOM (or page of a multi-page TIFF); default: the
            middle frame (DICOM) / the first page (TIFF).
        modality: DICOM modality used to choose a preset window when the file has none (default:
            the file's ``Modality``).

    Returns:
        An RGB ``PIL.Image.Image`` (mode ``"RGB"``, size ``(W, H)``).

    Raises:
        ImageLoadError: missing file, undecodable file, corrupt DICOM, frame out of range, bad
            window. The message names the path.
    """
    if isinstance(path, Image.Image):  # in-memory images (Sample.images may hold them)
        return (
            path
            if path.mode == "RGB"
            else _load_raster_image(path, _resolve_window(window, "<PIL image>"))
        )
    if isinstance(path, np.ndarray):
        return _array_to_rgb(path, _resolve_window(window, "<array>"))
    path = Path(path)
    win = _resolve_window(window, path)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}", reason="missing image")
    if is_dicom(path):
        arr = dicom_to_array(path, window=win, frame=frame, modality=modality)
        return Image.fromarray(arr, mode="RGB") if arr.ndim == 3 else _gray_to_rgb(arr)
    return _load_raster(path, win, frame)


def _resolve_window(window: Any, path: Any) -> tuple[float, float] | None:
    if window is None:
        return None
    if isinstance(window, str):
        if window not in NAMED_WINDOWS:
            raise ImageLoadError(
                f"{path}: unknown window name {window!r} (expected one of {sorted(NAMED_WINDOWS)} "
                "or a (center, width) pair)"
            )
        return NAMED_WINDOWS[window]
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ImageLoadError(f"{path}: window must be (center, width), got {window!r}") from None
    if not width > 0:
        raise ImageLoadError(f"{path}: window width must be > 0, got {width}")
    return center, width


def _gray_to_rgb(arr: np.ndarray) -> Image.Image:
    """[H, W] uint8 -> RGB image."""
    return Image.fromarray(arr, mode="L").convert("RGB")


def _load_raster(path: Path, window: tuple[float, float] | None, frame: int | None) -> Image.Image:
    try:
        with Image.open(path) as im:
            if frame is not None:
                n = getattr(im, "n_frames", 1)
                if not 0 <= frame < n:
                    raise ImageLoadError(f"{path}: frame {frame} out of range (file has {n})")
                im.seek(frame)
            im.load()
            return _load_raster_image(im, window)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path}", reason="missing image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(
            f"{path}: cannot decode image (expected PNG/JPEG/BMP/TIFF or DICOM): "
            f"{type(e).__name__}: {e}"
        ) from None


def _load_raster_image(im: Image.Image, window: tuple[float, float] | None) -> Image.Image:
    """A decoded PIL image of any mode -> RGB (high bit depth scaled, alpha on black)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _array_to_rgb(np.asarray(im, dtype=np.float64), window)
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite on black, the usual background for medical figures.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def _array_to_rgb(arr: np.ndarray, window: tuple[float, float] | None) -> Image.Image:
    """``[H, W]`` (uint8 as is, else window / min-max) or ``[H, W, 3]`` uint8 -> RGB image."""
    if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
    if arr.ndim != 2:
        raise ImageLoadError(
            f"<array>: expected [H, W] or [H, W, 3] uint8, got shape {arr.shape} {arr.dtype}"
        )
    if arr.dtype == np.uint8 and window is None:
        return _gray_to_rgb(np.ascontiguousarray(arr))
    values = arr.astype(np.float64)
    return _gray_to_rgb(to_uint8(window_values(values, *window) if window else minmax(values)))
