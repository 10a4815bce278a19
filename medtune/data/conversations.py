"""Conversation readers: ShareGPT and LLaVA layouts -> multi-turn ``Sample`` s.

ShareGPT / LLaVA training JSON (a list, or JSONL)::

    {"id": "...", "image": "a.jpg" | ["a.jpg", "b.jpg"] (or "images": [...]) | absent,
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ..."},
                       {"from": "gpt", "value": "..."}, ...]}

``from``: ``human`` / ``user`` -> user, ``gpt`` / ``assistant`` -> assistant, ``system`` ->
system. ``messages: [{role, content}]`` is accepted in place of ``conversations``. ``<image>``
markers stay in the text: a sample whose text holds markers must hold exactly one per image; one
without markers gets its images at the start of the first user turn (see
:mod:`medtune.data.sample`). A ``meta`` object in a row (written by
``tools/convert_to_sharegpt.py``) is merged into ``Sample.meta``.

LLaVA(-Med) question files (JSONL with ``question_id``, ``image``, ``text`` and optionally
``answer`` / ``gpt4_answer``) are read by :func:`llava` as one user turn (plus the answer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.data.errors import (
    BadValueError,
    DataError,
    MissingFieldError,
)
from medtune.data.holdout import holdout_option
from medtune.data.rows import (
    SkipCounter,
    get_field,
    load_rows,
    optional_id,
    resolve_image,
)
from medtune.data.sample import IMAGE_MARKER, Message, Sample

__all__ = ["sharegpt", "llava", "ROLE_MAP"]

#: Source role names -> :class:`Message` roles.
ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def _images(row: dict, image_root: Path, fctx: dict) -> tuple[list[str], Any]:
    key = "images" if "images" in row else "image"
    value = row.get(key)
    if value is None:
        return [], None
    names = value if isinstance(value, list) else [value]
    if not all(isinstance(n, str) and n for n in names):
        raise MissingFieldError(
            f"field {key!r} is {value!r:.60} (expected an image path or a list of paths)",
            file=fctx["file"],
            row=fctx["index"],
            row_id=fctx["row_id"],
        )
    return [resolve_image(image_root, n, **fctx, field=key) for n in names], value


def _turns(row: dict, fctx: dict) -> list[Message]:
    key = "conversations" if "conversations" in row or "messages" not in row else "messages"
    conv = get_field(
        row,
        key,
        **fctx,
        types=(list,),
        expected="a list of turns like {'from': 'human', 'value': '...'}",
    )
    if not conv:
        raise MissingFieldError(
            f"field {key!r} is empty (expected at least one turn)",
            file=fctx["file"],
            row=fctx["index"],
            row_id=fctx["row_id"],
        )
    messages = []
    for t, turn in enumerate(conv):
        where = f"{key}[{t}]"
        if not isinstance(turn, dict):
            raise MissingFieldError(
                f"{where} is {type(turn).__name__} (expected an object with 'from' and 'value')",
                file=fctx["file"],
                row=fctx["index"],
                row_id=fctx["row_id"],
            )
        rk, vk = ("from", "value") if "from" in turn or "role" not in turn else ("role", "content")
        role = turn.get(rk)
        text = turn.get(vk)
        if not isinstance(role, str):
            raise MissingFieldError(
                f"{where}: missing field {rk!r} (expected human, gpt or system)",
                file=fctx["file"],
                row=fctx["index"],
                row_id=fctx["row_id"],
            )
        if role.strip().lower() not in ROLE_MAP:
            raise BadValueError(
                f"{where}: unknown role {role!r} (expected one of {sorted(ROLE_MAP)})",
                file=fctx["file"],
                row=fctx["index"],
                row_id=fctx["row_id"],
            )
        if not isinstance(text, str):
            raise MissingFieldError(
                f"{where}: missing field {vk!r} (expected a string)",
                file=fctx["file"],
                row=fctx["index"],
                row_id=fctx["row_id"],
            )
        mapped = ROLE_MAP[role.strip().lower()]
        if mapped == "system" and t != 0:
            raise BadValueError(
                f"{where}: a system turn is only allowed first",
                file=fctx["file"],
                row=fctx["index"],
                row_id=fctx["row_id"],
            )
        messages.append(Message(mapped, text))
    if not any(m.role == "user" for m in messages):
        raise BadValueError(
            f"{key} has no human turn (expected at least one)",
            file=fctx["file"],
            row=fctx["index"],
            row_id=fctx["row_id"],
        )
    return messages


def _check_markers(messages: list[Message], n_images: int, fctx: dict) -> None:
    n = sum(m.content.count(IMAGE_MARKER) for m in messages)
    if n and n != n_images:
        raise BadValueError(
            f"{n} {IMAGE_MARKER} marker(s) in the text for {n_images} image(s) "
            f"(expected one marker per image, or none)",
            file=fctx["file"],
            row=fctx["index"],
            row_id=fctx["row_id"],
        )
    if any(m.role != "user" and IMAGE_MARKER in m.content for m in messages):
        raise BadValueError(
            f"{IMAGE_MARKER} marker outside a human turn (expected only in human turns)",
            file=fctx["file"],
            row=fctx["index"],
            row_id=fctx["row_id"],
        )


def _read(path, image_root, skip_bad_rows, dataset, parse_row) -> list[Sample]:
    path = Path(path)
    image_root = Path(image_root) if image_root is not None else path.parent
    rows = load_rows(path)
    counter = SkipCounter(f"{dataset} {path.name}", skip_bad_rows)
    out: list[Sample] = []
    for i, row in enumerate(rows):
        try:
            out.append(parse_row(row, i, path, image_root, dataset))
        except DataError as e:
            counter.record(e)
    return counter.finish(out)


def _row_id(rid: Any, path: Path, i: int) -> str:
    """The sample id: the row's own id as a string, else ``<file stem>-<row index>``."""
    return str(rid) if rid is not None else f"{path.stem}-{i}"


def _conversation_row(row: Any, i: int, path: Path, image_root: Path, dataset: str) -> Sample:
    rid = optional_id(row, path, i)
    fctx = {"file": path, "index": i, "row_id": rid}
    messages = _turns(row, fctx)
    images, written = _images(row, image_root, fctx)
    _check_markers(messages, len(images), fctx)
    meta = {k: v for k, v in row.items() if k not in ("conversations", "messages", "meta", "id")}
    meta.setdefault("dataset", dataset)
    if written is not None:
        meta["image"] = written
    extra = row.get("meta")
    if isinstance(extra, dict):
        meta.update(extra)
    return Sample(id=_row_id(rid, path, i), images=images, messages=messages, meta=meta)


@holdout_option
def sharegpt(
    path: str | Path,
    image_root: str | Path | None = None,
    skip_bad_rows: bool = False,
) -> list[Sample]:
    """Read ShareGPT-style conversations (JSON list or JSONL).

    Args:
        path: the file.
        image_root: folder relative image paths resolve against (default: the file's folder).
        skip_bad_rows: count and skip bad rows instead of raising.

    Returns:
        :class:`~medtune.data.rows.Samples`. ``id``: the row's ``id`` (as str) or ``<file
        stem>-<row index>``; ids are not required to be unique. ``images``: absolute paths.
        ``meta``: the row's other fields, ``dataset="sharegpt"`` unless given, ``image`` as
        written, then the row's ``meta`` object merged in.
    """
    return _read(path, image_root, skip_bad_rows, "sharegpt", _conversation_row)


def _llava_row(row: Any, i: int, path: Path, image_root: Path, dataset: str) -> Sample:
    if not (
        isinstance(row, dict)
        and "text" in row
        and "conversations" not in row
        and "messages" not in row
    ):
        return _conversation_row(row, i, path, image_root, dataset)
    # LLaVA(-Med) question file row.
    rid = get_field(
        row,
        "question_id",
        file=path,
        index=i,
        types=(str, int),
        expected="a question id",
        required=False,
    )
    fctx = {"file": path, "index": i, "row_id": rid, "id_name": "question_id"}
    question = get_field(row, "text", **fctx, expected="the question text")
    images, written = _images(row, image_root, {k: fctx[k] for k in ("file", "index", "row_id")})
    messages = [Message("user", question)]
    answer = next(
        (row[k] for k in ("answer", "gpt4_answer") if isinstance(row.get(k), (str, int, float))),
        None,
    )
    if answer is not None:
        messages.append(Message("assistant", str(answer)))
    _check_markers(messages, len(images), {k: fctx[k] for k in ("file", "index", "row_id")})
    meta = dict(row)
    meta.setdefault("dataset", dataset)
    meta.update(question=question, image=written)
    if answer is not None:
        meta["answer"] = str(answer)
    return Sample(id=_row_id(rid, path, i), images=images, messages=messages, meta=meta)


@holdout_option
def llava(
    path: str | Path,
    image_root: str | Path | None = None,
    skip_bad_rows: bool = False,
) -> list[Sample]:
    """Read LLaVA / LLaVA-Med data: instruction JSON (``conversations``) or question JSONL.

    Instruction rows are read exactly as :func:`sharegpt` reads them (``dataset="llava"``).
    Question-file rows (``question_id``, ``image``, ``text``, optional ``answer`` or
    ``gpt4_answer``) become a user turn with the question and, when present, an assistant turn
    with the answer; ``id`` is ``question_id``.

    Args:
        path: the JSON / JSONL file.
        image_root: folder relative image paths resolve against (default: the file's folder).
        skip_bad_rows: count and skip bad rows instead of raising.

    Returns:
        :class:`~medtune.data.rows.Samples`.
    """
    return _read(path, image_root, skip_bad_rows, "llava", _llava_row)
