"""medtune data: readers that map public benchmarks and user data into one sample type.

Readers return ``list[Sample]`` (:class:`~medtune.data.rows.Samples`, which also records rows
skipped with ``skip_bad_rows=True``):

- :func:`slake`, :func:`vqa_rad`: the medical VQA benchmarks as downloaded;
- :func:`caption_json`: ``[{image, caption}]`` figure-caption data; :func:`roco`: the ROCO release folders;
- :func:`sharegpt`, :func:`llava`: multi-turn conversations with zero or more images;
- :func:`mix`: several sources with sampling weights.

Images: :func:`load_image` (PNG/JPEG/BMP/TIFF/DICOM -> RGB PIL) and :func:`image_transform`
(-> normalized ``float32 [3, H, W]``). Prompts: :mod:`medtune.data.prompts`.

Importing this package does not import torch.
"""

from medtune.data.captions import caption_json, roco
from medtune.data.conversations import llava, sharegpt
from medtune.data.errors import (
    DataError,
    MalformedJSONError,
    MissingFieldError,
    MissingImageError,
)
from medtune.data.images import ImageLoadError, image_transform, load_image
from medtune.data.mix import drop_images, mix
from medtune.data.prompts import (
    CAPTION_INSTRUCTIONS,
    VQA_DIRECT,
    VQA_SHORT_ANSWER,
    apply_template,
)
from medtune.data.rows import (
    Samples,
)
from medtune.data.sample import IMAGE_MARKER, Message, Sample
from medtune.data.vqa import slake, vqa_rad

__all__ = [
    "IMAGE_MARKER",
    "Message",
    "Sample",
    "Samples",
    "DataError",
    "MalformedJSONError",
    "MissingFieldError",
    "MissingImageError",
    "ImageLoadError",
    "load_image",
    "image_transform",
    "slake",
    "vqa_rad",
    "caption_json",
    "roco",
    "sharegpt",
    "llava",
    "drop_images",
    "mix",
    "apply_template",
    "VQA_DIRECT",
    "VQA_SHORT_ANSWER",
    "CAPTION_INSTRUCTIONS",
]
