"""The one internal sample type that every reader maps into (DESIGN §3, "Sample schema").

A :class:`Sample` holds image references, chat messages and metadata. Readers (SLAKE, VQA-RAD,
captions, ShareGPT/LLaVA conversations, DICOM folders) return lists of samples; the tokenizing
dataset (:mod:`medtune.data.chat`) turns one into token ids, labels and image tensors.

Image positions: a message's text may hold :data:`IMAGE_MARKER` (``"<image>"``, the LLaVA
convention) once per image, in image order. A sample whose messages hold no marker gets all of its
images at the start of the first user turn. The marker is text-level only: the tokenizer never sees
it, it becomes N placeholder *ids* (see :mod:`medtune.models.llama3`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

IMAGE_MARKER = "<image>"

Role = Literal["system", "user", "assistant"]


@dataclass
class Message:
    """One chat turn. ``content`` is plain text, possibly with :data:`IMAGE_MARKER`."""

    role: Role
    content: str


@dataclass
class Sample:
    """One training or evaluation example.

    Attributes:
        id: unique id within its dataset (e.g. SLAKE ``qid`` as a string).
        images: image references in order: a path (``str``/``Path``) or an in-memory array/PIL image.
        messages: the conversation; assistant turns are the training targets.
        meta: everything else the source row carried (dataset, split, answer_type, q_lang,
            modality, content_type, question, answer, ...). Kept for evaluation break-downs.
    """

    id: str
    images: list[Any] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def image_paths(self) -> list[str]:
        """The images that are file paths, as strings."""
        return [str(i) for i in self.images if isinstance(i, (str, Path))]
