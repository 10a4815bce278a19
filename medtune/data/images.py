"""Open medical images (PNG / JPEG / BMP / TIFF and DICOM) and turn them into encoder inputs.

:func:`load_image` returns an 8-bit RGB :class:`PIL.Image.Image` for any supported file; DICOM goes
through pydicom with the display pipeline a radiology viewer would apply:

1. decode one frame (multi-frame: the middle one unless ``frame`` is given);
2. modality LUT: ``RescaleSlope`` / ``RescaleIntercept`` (or a Modality LUT Sequence), so CT values
   are Hounsfield units; enhanced multi-frame files are read from the functional groups;
3. VOI: an explicit ``window=(center, width)`` argument wins; else the file's VOI LUT Sequence or
   ``WindowCenter`` / ``WindowWidth`` (first value; ``VOILUTFunction`` LINEAR, LINEAR_EXACT or
   SIGMOID); else a preset for the modality from :data:`MODALITY_WINDOWS` (CT: soft tissue
   40/400; edit the dict or pass ``window`` to override); else min-max over the frame;
4. ``MONOCHROME1`` is inverted (so bone is bright, as in MONOCHROME2);
5. grayscale is replicated to 3 channels. Colour DICOM (RGB, YBR, PALETTE COLOR) is returned as RGB.

Raster files with more than 8 bits per sample (16-bit PNG / TIFF, float TIFF) are scaled the same
way (``window`` if given, else min-max) instead of being clipped by PIL.

:func:`image_transform` builds the tensor transform: resize (``squash`` / ``crop`` / ``pad``),
optional training augmentation (off unless ``train=True``; never a horizontal flip unless asked,
because left and right matter in medical images), scaling to [0, 1] and mean/std normalization.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medtune.data.errors import DataError

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

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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


class ImageLoadError(DataError):
    """An image could not be opened or decoded. The message names the path and what failed.

    A :class:`~medtune.data.errors.DataError`, hence a :class:`ValueError`.
    """

    reason = "unreadable image"


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
    return _gray_to_rgb(_to_uint8(_window(values, *window) if window else _minmax(values)))


def _minmax(arr: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the array's finite min and max; a constant image becomes 0."""
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros_like(arr, dtype=np.float64)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float64)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0)


def _window(arr: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
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


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.nan_to_num(x) * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------- DICOM


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
        return _color_to_uint8(rgb, 16 if rgb.dtype.itemsize > 1 else 8)
    if arr.ndim == 3:  # RGB / YBR (pydicom converts YBR to RGB by default)
        return _color_to_uint8(arr, int(ds.get("BitsStored", 8) or 8))

    def display(raw: np.ndarray) -> np.ndarray:
        """Raw stored values -> uint8 display values (steps 2-4 of the module docstring)."""
        values = _modality_lut(ds, raw, index, apply_modality_lut)
        if window is not None:
            out = _window(values, *window)
        else:
            out = _file_voi(ds, values, index)
            if out is None:
                mod = (modality or str(ds.get("Modality", "") or "")).strip().upper()
                preset = MODALITY_WINDOWS.get(mod)
                out = _window(values, *preset) if preset else _minmax(values)
        if photometric == "MONOCHROME1":
            out = 1.0 - out
        return _to_uint8(out)

    if np.issubdtype(arr.dtype, np.integer) and arr.size and "ModalityLUTSequence" not in ds:
        # Fast path: integer pixels under a linear rescale. Run the pipeline once per distinct
        # stored value in [min, max] and look the frame up in that table: same float64 math, and
        # the min-max fallback sees the same extremes (a linear map's are at the endpoints).
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo < 1 << 20:
            table = display(np.arange(lo, hi + 1, dtype=np.int64))
            return table[np.subtract(arr, lo, dtype=np.int64) if lo else arr]
    return display(arr)


def _color_to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    scale = float(2**bits - 1) if bits > 0 else float(arr.max() or 1)
    return _to_uint8(arr.astype(np.float64) / scale)


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
    return _window(values, center, width, str(function))


# ------------------------------------------------------------------------------------- transform

#: Default augmentation for ``train=True``; keys of ``augment`` override these. Set one to 0 /
#: None / False to turn it off.
DEFAULT_AUGMENT: dict[str, Any] = {
    "crop_scale": (0.9, 1.0),  # random resized crop: area fraction kept
    "crop_ratio": (0.95, 1.05),  # and aspect-ratio range
    "rotation": 5.0,  # degrees, uniform in [-r, r]
    "brightness": 0.1,  # factor in [1 - b, 1 + b]
    "contrast": 0.1,  # factor in [1 - c, 1 + c]
    "hflip": 0.0,  # probability of a horizontal flip: off (left/right matters)
}

_INTERP = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
_RESIZE_MODES = ("squash", "crop", "pad")


class ImageTransform:
    """PIL RGB image -> normalized ``float32`` tensor ``[3, H, W]``. Built by :func:`image_transform`.

    A class (not a closure) so that it pickles into DataLoader workers. Randomness (``train=True``)
    draws from torch's global generator, which DataLoader seeds per worker.

    Attributes:
        size: ``(H, W)`` of the output.
        mean, std: per-channel normalization.
        train: whether augmentation is applied.
        augment: the effective augmentation settings (``DEFAULT_AUGMENT`` merged with overrides).
    """

    def __init__(
        self,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        train: bool,
        augment: dict[str, Any],
        interpolation: str,
        resize_mode: str,
    ) -> None:
        self.size = size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.train = train
        self.augment = augment
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self._resample = _INTERP[interpolation]
        levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
        self._lut = np.stack(
            [(levels - np.float32(m)) / np.float32(sd) for m, sd in zip(self.mean, self.std)]
        )

    def __repr__(self) -> str:
        return (
            f"ImageTransform(size={self.size}, resize_mode={self.resize_mode!r}, "
            f"interpolation={self.interpolation!r}, train={self.train}, augment={self.augment})"
        )

    def resize(self, image: Image.Image) -> Image.Image:
        """Deterministic geometry: ``squash`` (ignore aspect), ``crop`` (shorter side, center
        crop, as CLIP) or ``pad`` (longer side, pad with the mean colour, as LLaVA)."""
        h, w = self.size
        image = image.convert("RGB") if image.mode != "RGB" else image
        if self.resize_mode == "squash":
            return image.resize((w, h), self._resample)
        iw, ih = image.size
        if self.resize_mode == "crop":
            scale = max(w / iw, h / ih)
            nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
            image = image.resize((nw, nh), self._resample)
            left, top = (nw - w) // 2, (nh - h) // 2
            return image.crop((left, top, left + w, top + h))
        scale = min(w / iw, h / ih)
        nw, nh = max(1, round(iw * scale)), max(1, round(ih * scale))
        image = image.resize((nw, nh), self._resample)
        fill = tuple(int(round(m * 255)) for m in self.mean)
        canvas = Image.new("RGB", (w, h), fill)
        canvas.paste(image, ((w - nw) // 2, (h - nh) // 2))
        return canvas

    def __call__(self, image: Image.Image):
        """Args: image: PIL image (any mode). Returns: ``float32`` tensor ``[3, H, W]``."""
        import torch

        image = self.resize(image)
        pixels = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
        if not self.train:
            # Normalization as a per-channel lookup table: one gather, no float temporaries.
            out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
            for c in range(3):
                np.take(self._lut[c], pixels[..., c], out=out[c])
            return torch.from_numpy(out)
        x = (
            torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
            .to(torch.float32)
            .div_(255.0)
        )
        x = self._augment(x)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std

    def _augment(self, x):
        """Random crop / rotation / brightness-contrast on ``x`` ``[3, H, W]`` in [0, 1]."""
        import torch
        from torchvision.transforms import InterpolationMode, v2
        from torchvision.transforms import functional as F

        a = self.augment
        interp = {
            "nearest": InterpolationMode.NEAREST,
            "bilinear": InterpolationMode.BILINEAR,
        }.get(self.interpolation, InterpolationMode.BICUBIC)
        if a.get("crop_scale"):
            scale = tuple(a["crop_scale"])
            ratio = tuple(a.get("crop_ratio") or (1.0, 1.0))
            i, j, h, w = v2.RandomResizedCrop.get_params(x, scale=list(scale), ratio=list(ratio))
            x = F.resized_crop(x, i, j, h, w, list(self.size), interpolation=interp, antialias=True)
        if a.get("rotation"):
            deg = float(a["rotation"])
            angle = float(torch.empty(1).uniform_(-deg, deg))
            x = F.rotate(x, angle, interpolation=InterpolationMode.BILINEAR, fill=[0.0, 0.0, 0.0])
        if a.get("brightness"):
            b = float(a["brightness"])
            x = F.adjust_brightness(x, float(torch.empty(1).uniform_(1 - b, 1 + b)))
        if a.get("contrast"):
            c = float(a["contrast"])
            x = F.adjust_contrast(x, float(torch.empty(1).uniform_(1 - c, 1 + c)))
        if a.get("hflip") and float(torch.rand(1)) < float(a["hflip"]):
            x = F.hflip(x)
        return x.clamp_(0.0, 1.0)


def image_transform(
    image_size: int | tuple[int, int],
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    train: bool = False,
    augment: dict[str, Any] | None = None,
    interpolation: str = "bicubic",
    resize_mode: str = "squash",
) -> Callable[[Image.Image], Any]:
    """Build the encoder's image transform.

    Args:
        image_size: output side, or ``(H, W)``.
        mean: per-channel mean (3 values), applied after scaling to [0, 1].
        std: per-channel std (3 values).
        train: apply random augmentation. Off by default; with ``train=False`` the transform is
            deterministic and ``augment`` is ignored (so one config block serves train and eval).
        augment: overrides of :data:`DEFAULT_AUGMENT` (``crop_scale``, ``crop_ratio``,
            ``rotation``, ``brightness``, ``contrast``, ``hflip``); a falsy value turns one off.
        interpolation: ``bicubic`` (default), ``bilinear``, ``nearest``, ``lanczos`` or ``box``.
        resize_mode: ``squash`` (resize to ``(H, W)`` ignoring aspect), ``crop`` (shorter side to
            size, center crop) or ``pad`` (longer side to size, pad with the mean colour).

    Returns:
        A picklable callable: PIL image -> ``float32`` tensor ``[3, H, W]``, normalized.

    Raises:
        ValueError: unknown interpolation, resize mode or augmentation key; bad mean/std length.
    """
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = (int(image_size[0]), int(image_size[1]))
    if min(size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    if interpolation not in _INTERP:
        raise ValueError(
            f"unknown interpolation {interpolation!r} (expected one of {sorted(_INTERP)})"
        )
    if resize_mode not in _RESIZE_MODES:
        raise ValueError(f"unknown resize_mode {resize_mode!r} (expected one of {_RESIZE_MODES})")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {list(mean)} and {list(std)}")
    if any(float(s) <= 0 for s in std):
        raise ValueError(f"std must be positive, got {list(std)}")
    augment = dict(augment or {})
    unknown = set(augment) - set(DEFAULT_AUGMENT)
    if unknown:
        raise ValueError(
            f"unknown augmentation key(s) {sorted(unknown)} (expected some of {sorted(DEFAULT_AUGMENT)})"
        )
    effective = {**DEFAULT_AUGMENT, **augment}
    return ImageTransform(
        size,
        mean,
        std,
        train=train,
        augment=effective,
        interpolation=interpolation,
        resize_mode=resize_mode,
    )
