"""What ``eval`` asks per question and what it records: prompts, predictions rows, resume checks.

The recipe (``recipes/eval.py``) orchestrates; the logic is here, as plain functions:

- :func:`question_sample`: a benchmark sample -> the sample to answer (the question through the
  prompt template; in ``describe_then_answer`` with the image's description in context);
- :func:`caption_sample`, :func:`describe_sample`: the caption and description prompts;
- :func:`prediction_row`: one row of the predictions JSONL (:mod:`medtune.eval.predictions` schema);
- :func:`resume_rows`: rows an earlier run already wrote, refused when made otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from medtune.data.prompts import apply_template, format_template
from medtune.data.sample import Message, Sample
from medtune.eval.predictions import SCORED_KEYS, validate_row
from medtune.utils.errors import UserError
from medtune.utils.jsonl import JsonlError, read_jsonl, read_jsonl_numbered

__all__ = [
    "EvalConfigError",
    "caption_sample",
    "describe_sample",
    "image_key",
    "is_caption_dataset",
    "prediction_row",
    "question_sample",
    "read_descriptions",
    "resume_rows",
]


class EvalConfigError(UserError, ValueError):
    """A config or output folder that eval cannot work with; the message says what to change."""


def image_key(sample: Sample) -> str:
    """Cache key of a sample's image(s): the dataset-relative path(s) when known."""
    ref = sample.meta.get("image")
    if isinstance(ref, str) and ref:
        return ref
    if isinstance(ref, list) and ref:
        return "|".join(map(str, ref))
    return "|".join(map(str, sample.images))


def is_caption_dataset(samples: list[Sample]) -> bool:
    """Caption data: ``meta.task == "caption"``, or a ``caption`` and no ``answer_type``."""
    if not samples:
        return False
    m = samples[0].meta
    return m.get("task") == "caption" or ("caption" in m and "answer_type" not in m)


def caption_sample(s: Sample) -> Sample:
    """The reader's own instruction, as is (assistant turns dropped)."""
    return Sample(
        s.id, list(s.images), [m for m in s.messages if m.role != "assistant"], dict(s.meta)
    )


def describe_sample(key: str, s: Sample, describe_prompt: str) -> Sample:
    """The request to describe ``s``'s image(s) (``describe_then_answer``, step one)."""
    return Sample(
        f"describe:{key}", list(s.images), [Message("user", describe_prompt)], dict(s.meta)
    )


def question_sample(
    s: Sample,
    template: str,
    description: str | None = None,
    *,
    layout: str = "conversation",
    describe_prompt: str = "",
    context_template: str = "",
) -> Sample:
    """The sample to answer: the templated question, and the description in describe_then_answer.

    Args:
        s: a benchmark sample.
        template: the prompt template (``{question}`` and any ``meta`` field).
        description: the image's description (describe_then_answer), or None.
        layout: ``conversation`` (user: image + describe prompt, assistant: description, user:
            question) or ``text`` (no image; the description inlined by ``context_template``).
        describe_prompt: the first user turn in the conversation layout.
        context_template: ``{description}`` and ``{question}``, for the text layout.
    """
    asked = apply_template(s, template)
    user = next(m.content for m in asked.messages if m.role == "user")
    if description is None:
        return Sample(s.id, list(s.images), [Message("user", user)], dict(s.meta))
    if layout == "text":
        text = format_template(context_template, user, {**s.meta, "description": description})
        return Sample(s.id, [], [Message("user", text)], dict(s.meta))
    return Sample(
        s.id,
        list(s.images),
        [
            Message("user", describe_prompt),
            Message("assistant", description),
            Message("user", user),
        ],
        dict(s.meta),
    )


def prediction_row(
    s: Sample,
    prediction: str,
    *,
    checkpoint: str,
    task: str,
    generation: dict[str, Any],
    prompt: str,
    description: str | None = None,
) -> dict[str, Any]:
    """One predictions row (:mod:`medtune.eval.predictions` schema) for a benchmark sample and its answer."""
    m = s.meta
    image = m.get("image")
    if not isinstance(image, (str, list)):
        image = [str(i) for i in s.image_paths] if len(s.image_paths) != 1 else s.image_paths[0]
    row = {
        "id": s.id,
        "dataset": str(m.get("dataset", "")),
        "split": str(m.get("split") or ""),
        "image": image,
        "question": str(m.get("question", "")),
        "answer": m.get("answer", ""),
        "answer_type": "CAPTION" if task == "caption" else str(m.get("answer_type", "")),
        "prediction": prediction,
        "checkpoint": checkpoint,
        "generation": generation,
    }
    for key in ("language", "modality", "content_type"):
        if m.get(key) is not None:
            row[key] = m[key]
    if task == "caption":
        row["task"] = "caption"
    row["prompt"] = prompt
    if description is not None:
        row["description"] = description
    return row


def resume_rows(
    path: Path,
    checkpoint: str,
    generation: dict[str, Any],
    *,
    key: Callable[[Any], str] = str,
    validate: bool = True,
    what: str = "predictions",
    error: type[UserError] = EvalConfigError,
) -> dict[str, dict]:
    """Rows an earlier run wrote to ``path``, by ``key(id)`` (a torn last line is cut off).

    The one resume check of ``eval`` (predictions) and ``generate`` (answers): every row must
    have been made by the same checkpoint (compared as resolved paths) with the same generation
    settings, or appending would mix two runs in one file.

    Args:
        path: the earlier output (absent: nothing done yet).
        checkpoint: this run's checkpoint, as the rows record it.
        generation: this run's generation settings, as the rows record them.
        key: row id -> dict key (``generate`` compares ids as JSON: ``1`` and ``"1"`` differ).
        validate: check each row against the predictions schema (``eval``'s rows).
        what: what the rows are, for messages.
        error: the error class to raise.

    Raises:
        error: a row made by another checkpoint or with other generation settings (naming its
            id), or a line that is not JSON (naming the line).
    """
    if not path.is_file():
        return {}
    try:  # a torn last line (a killed run) is cut from the file
        numbered = read_jsonl_numbered(path, what=what, repair=True)
    except JsonlError as e:
        raise error(f"{e}; fix it or run with overwrite=true") from None
    done: dict[str, dict] = {}
    for n, r in numbered:
        if validate:
            validate_row(r, path, n, required=SCORED_KEYS)
        ckpt = r.get("checkpoint")
        same_ckpt = isinstance(ckpt, str) and (
            ckpt == checkpoint or Path(ckpt).resolve() == Path(checkpoint).resolve()
        )
        if r.get("generation") != generation or not same_ckpt:
            raise error(
                f"{path}: id {r.get('id')!r} holds answers from another checkpoint or other "
                f"generation settings ({ckpt} with {r.get('generation')}; this run: {checkpoint} "
                f"with {generation}); use another output or overwrite=true"
            )
        done.setdefault(key(r["id"]), r)
    return done


def read_descriptions(path: Path, describe_prompt: str, max_new_tokens: int) -> dict[str, str]:
    """Image key -> description cached in ``path`` (a torn last line is cut off).

    Raises:
        EvalConfigError: descriptions made with another prompt or length.
    """
    if not path.is_file():
        return {}
    cached: dict[str, str] = {}
    for r in read_jsonl(path, repair=True, what="descriptions"):
        if r.get("describe_prompt") != describe_prompt or r.get("max_new_tokens") != max_new_tokens:
            raise EvalConfigError(
                f"{path}: descriptions made with other settings; use another output_dir "
                "or overwrite=true"
            )
        cached.setdefault(r["image"], r["description"])
    return cached
