"""Prompt templates: VQA (question -> short answer) and captions (instruction -> caption).

Readers store the raw question as the first user message. :func:`apply_template` rewrites that
message from a template; a list of templates gives train-time instruction sampling (one picked per
call with a seeded ``random.Random``). ``<image>`` markers in the original text are kept.

Import-light: no torch.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from medtune.data.sample import IMAGE_MARKER, Message, Sample

__all__ = [
    "VQA_DIRECT",
    "VQA_SHORT_ANSWER",
    "VQA_TEMPLATES",
    "CAPTION_INSTRUCTIONS",
    "apply_template",
    "format_template",
]

#: The question as is.
VQA_DIRECT = "{question}"
#: LLaVA-1.5's short-answer prompt (closed and short open answers).
VQA_SHORT_ANSWER = "{question}\nAnswer with a single word or phrase."
#: Named VQA templates, for configs (``template: short_answer``).
VQA_TEMPLATES = {"direct": VQA_DIRECT, "short_answer": VQA_SHORT_ANSWER}

#: Caption instructions; pass the list to sample one per example at train time.
CAPTION_INSTRUCTIONS = [
    "Describe the medical image.",
    "Write a caption for this figure.",
    "Provide a brief description of the image.",
    "What does this image show? Describe it concisely.",
    "Summarize the findings visible in this image.",
    "Write the figure caption for this medical image.",
]


def format_template(template: str, question: str, meta: dict) -> str:
    """``template.format(question=question, **meta)``; the question wins over a ``meta`` key.

    Raises:
        ValueError: the template names a field that neither ``question`` nor ``meta`` has, or is
            not a valid format string.
    """
    fields = {**meta, "question": question}
    try:
        return template.format_map(fields)
    except KeyError as e:
        raise ValueError(
            f"prompt template {template!r} uses field {e.args[0]!r}, which this sample lacks "
            f"(available: question, {', '.join(sorted(k for k in meta if isinstance(k, str)))})"
        ) from None
    except (ValueError, IndexError) as e:
        raise ValueError(f"bad prompt template {template!r}: {e}") from None


def apply_template(
    sample: Sample,
    template: str | Sequence[str] | None,
    rng: random.Random | None = None,
) -> Sample:
    """A copy of ``sample`` whose first user message is rendered from ``template``.

    The new text is ``template.format(question=<original first user text>, **sample.meta)``.
    If the original text held ``<image>`` markers and the rendered text holds fewer (a caption
    instruction has no ``{question}``), the missing markers are put back in front, one per line,
    so images keep their positions.

    Args:
        sample: the sample (not modified).
        template: a format string, a list of them (one is chosen: ``rng.choice`` or, with ``rng``
            None, the first), or None (the sample is returned unchanged, as a copy).
        rng: random source for train-time instruction sampling; seed it for reproducibility.

    Returns:
        A new :class:`Sample` (messages list and ``meta`` dict are copies).

    Raises:
        ValueError: no user message, an empty template list, or a template field missing.
    """
    messages = [Message(m.role, m.content) for m in sample.messages]
    out = dataclasses.replace(
        sample, images=list(sample.images), messages=messages, meta=dict(sample.meta)
    )
    if template is None:
        return out
    if not isinstance(template, str):
        choices = list(template)
        if not choices:
            raise ValueError("apply_template: empty template list")
        template = rng.choice(choices) if rng is not None else choices[0]
    if not isinstance(template, str):
        raise ValueError(
            f"apply_template: template must be a string, got {type(template).__name__}"
        )
    for m in messages:
        if m.role == "user":
            original = m.content
            text = format_template(template, original, sample.meta)
            missing = original.count(IMAGE_MARKER) - text.count(IMAGE_MARKER)
            if missing > 0:
                text = (IMAGE_MARKER + "\n") * missing + text
            m.content = text
            return out
    raise ValueError(f"apply_template: sample {sample.id!r} has no user message")
