"""The one internal sample type that every reader maps into.

A :class:`Sample` holds image references, chat messages and metadata. Readers (SLAKE, VQA-RAD,
captions, ShareGPT/LLaVA conversations, DICOM folders) return lists of samples; the tokenizing
dataset (:mod:`medtune.data.model_transform`) turns one into token ids, labels and image tensors.

Image positions: a message's text may hold :data:`IMAGE_MARKER` (``"<image>"``, the LLaVA
convention) once per image, in image order. A sample whose messages hold no marker gets all of its
images at the start of the first user turn. The marker is text-level only: the tokenizer never sees
it, it becomes N placeholder *ids* (see :mod:`medtune.models.llama3`).
"""

from __future__ import annotations

from collections.abc import Sequence
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


def qa_sample(id: str, images: list[Any], question: str, answer: str, meta: dict) -> Sample:
    """One question and its answer over ``images``: a user turn and the assistant turn that is its
    target (how every VQA, caption and report reader shapes a row)."""
    return Sample(
        id=id,
        images=images,
        messages=[Message("user", question), Message("assistant", answer)],
        meta=meta,
    )


def require_answers(samples: Sequence[Sample], what: str = "training") -> None:
    """Refuse samples without an assistant turn where answers are the targets (training and
    validation loss): such a sample has no label to learn from and would pass silently.

    Readers accept them (a prompt without an answer is what ``generate`` and ``eval`` take); the
    check is made where samples become training data (``VisionChatDataset``).

    Raises:
        NoAnswerError: names the first such sample (id and dataset) and how many there are.
    """
    from medtune.data.errors import NoAnswerError

    bad = [s for s in samples if not any(m.role == "assistant" for m in s.messages)]
    if not bad:
        return
    first = bad[0]
    dataset = first.meta.get("dataset")
    where = f"sample id {first.id!r}" + (f" of dataset {dataset!r}" if dataset else "")
    more = f" ({len(bad)} of {len(samples)} samples)" if len(bad) > 1 else ""
    raise NoAnswerError(
        f"{where}: {what} conversation has no assistant turn{more}; expected at least one "
        "gpt/assistant turn to learn from (prompts without answers are for generate / eval)"
    )
