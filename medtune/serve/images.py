"""Images sent in a request as ``data:`` URLs -> 8-bit RGB PIL images, as the readers load them.

Accepted: ``data:image/png;base64,...``, ``data:image/jpeg;base64,...`` and
``data:application/dicom;base64,...``. Anything else (an ``http(s)://`` URL, a ``file:`` URL, a
path) is refused with HTTP 400: the server reads images only from the request body.

DICOM goes through the same pipeline as the readers (:func:`medtune.data.images.load_image`:
rescale, the file's VOI window or the request's ``window``, modality presets, MONOCHROME1).
``load_image`` takes a path, so the bytes are written to a private temporary file that this
process creates and removes; no client-supplied name is ever opened.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
from typing import Any

from PIL import Image

from medtune.data.errors import DataError
from medtune.data.images import load_image
from medtune.serve.protocol import bad

RASTER_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
DICOM_TYPES = {"application/dicom", "image/dicom"}


def split_data_url(url: str, param: str) -> tuple[str, bytes]:
    """``data:<type>[;k=v];base64,<payload>`` -> ``(media type, bytes)``.

    Raises:
        APIError: not a base64 ``data:`` URL, or a payload that is not base64.
    """
    if not url.startswith("data:"):
        raise bad(
            f"{param}: only data: URLs are accepted (data:image/png;base64,..., image/jpeg or "
            "application/dicom); the server fetches no URL and reads no path",
            param,
            "invalid_image_url",
        )
    head, sep, payload = url[5:].partition(",")
    fields = head.split(";")
    if not sep or "base64" not in fields[1:]:
        raise bad(f"{param}: expected a base64 data URL (data:<type>;base64,...)", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{param}: the data URL payload is not valid base64", param) from None
    if not data:
        raise bad(f"{param}: the image is empty", param, "invalid_image")
    return fields[0].strip().lower(), data


def decode_image(url: str, param: str, window: Any = None, *, max_pixels: int) -> Image.Image:
    """Decode one ``image_url`` into an RGB PIL image.

    Args:
        url: the data URL.
        param: the request field, for error messages (``messages[0].content[1].image_url``).
        window: DICOM window name or ``(center, width)``; None: the file's own / modality preset.
        max_pixels: refuse larger images before decoding their pixels.

    Returns:
        An RGB image.

    Raises:
        APIError: HTTP 400 naming ``param`` for an unsupported type or undecodable bytes.
    """
    media, data = split_data_url(url, param)
    if media in DICOM_TYPES:
        return _dicom(data, param, window, max_pixels)
    if media not in RASTER_TYPES:
        raise bad(
            f"{param}: unsupported image type {media!r} (expected image/png, image/jpeg or "
            "application/dicom)",
            param,
            "invalid_image",
        )
    try:
        with Image.open(io.BytesIO(data), formats=[RASTER_TYPES[media]]) as im:
            if im.width * im.height > max_pixels:
                raise bad(
                    f"{param}: image is {im.width}x{im.height}, more than {max_pixels} pixels",
                    param,
                    "image_too_large",
                )
            im.load()
            return load_image(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, DataError) as e:
        raise bad(
            f"{param}: cannot decode the {media} image ({type(e).__name__}: {e})",
            param,
            "invalid_image",
        ) from None


def _dicom(data: bytes, param: str, window: Any, max_pixels: int) -> Image.Image:
    fd, tmp = tempfile.mkstemp(prefix="medtune-serve-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            image = load_image(tmp, window=window)
        except DataError as e:
            msg = str(e).replace(tmp, "<upload>")
            raise bad(
                f"{param}: cannot decode the DICOM image ({msg})", param, "invalid_image"
            ) from None
        if image.width * image.height > max_pixels:
            raise bad(
                f"{param}: image is {image.width}x{image.height}, more than {max_pixels} pixels",
                param,
                "image_too_large",
            )
        return image
    finally:
        os.unlink(tmp)
