"""Caption JSON reader: ``[{image, caption}, ...]`` (PubMed figure-caption style, ROCO exports).

Each row becomes ``Sample(id, images=[abs path], messages=[user: instruction, assistant: caption])``.
The user turn holds a default instruction (``CAPTION_INSTRUCTIONS[0]``); apply a template list
with :func:`medtune.data.prompts.apply_template` for train-time instruction sampling.
"""

from __future__ import annotations

from pathlib import Path

from medtune.data.errors import (
    DataError,
    MalformedJSONError,
    MissingFieldError,
    SkipCounter,
    get_field,
    load_json,
    load_rows,
    resolve_image,
)
from medtune.data.prompts import CAPTION_INSTRUCTIONS
from medtune.data.sample import Message, Sample

__all__ = ["caption_json", "IMAGE_KEYS", "CAPTION_KEYS"]

#: Accepted names of the image field, in order of preference.
IMAGE_KEYS = ("image", "image_path", "file_name")
#: Accepted names of the caption field.
CAPTION_KEYS = ("caption", "text")


def _pick(row: dict, keys: tuple[str, ...]) -> str:
    for k in keys:
        if isinstance(row, dict) and k in row:
            return k
    return keys[0]


def caption_json(
    path: str | Path,
    image_root: str | Path | None = None,
    split: str | None = None,
    skip_bad_rows: bool = False,
    *,
    instruction: str = CAPTION_INSTRUCTIONS[0],
    dataset: str = "caption",
) -> list[Sample]:
    """Read image-caption pairs.

    Layouts: a JSON list of rows (or JSONL, one row per line), or a JSON object mapping split
    names to such lists (``{"train": [...], "test": [...]}``). A row has an image (``image``,
    ``image_path`` or ``file_name``: a path string, or a list of them for multi-panel figures) and
    a caption (``caption`` or ``text``); ``id`` and ``split`` are optional; other fields are
    kept in ``meta``.

    Args:
        path: the JSON / JSONL file.
        image_root: folder that relative image paths are relative to (default: the JSON file's
            folder). Absolute paths are used as they are.
        split: keep only this split: the key of a split-keyed object, or the rows whose ``split``
            field equals it (rows without one are an error). None keeps all.
        skip_bad_rows: count and skip bad rows instead of raising.
        instruction: the user turn's text.
        dataset: ``meta["dataset"]`` unless the row has its own ``dataset`` field.

    Returns:
        :class:`~medtune.data.errors.Samples`. ``id``: the row's ``id`` or ``<file stem>-<row
        index>``. ``meta``: the row's fields plus ``dataset``, ``split``, ``image`` (as
        written), ``caption``, ``question`` (the instruction) and ``answer`` (the caption).
    """
    path = Path(path)
    image_root = Path(image_root) if image_root is not None else path.parent
    if path.suffix.lower() == ".json":
        data = load_json(path)
    else:
        data = load_rows(path)
    split_keyed = isinstance(data, dict)
    if split_keyed:
        if split is not None:
            if split not in data:
                raise DataError(
                    f"no split {split!r} in this file (it has {sorted(data)})", file=path
                )
            data = data[split]
            if not isinstance(data, list):
                raise MalformedJSONError(f"split {split!r} is not a list of rows", file=path)
        else:
            data = [
                dict(r, split=k) if isinstance(r, dict) and "split" not in r else r
                for k, rows in data.items()
                if isinstance(rows, list)
                for r in rows
            ]
    elif not isinstance(data, list):
        raise MalformedJSONError(
            f"top level is {type(data).__name__}, expected a list of rows", file=path
        )

    counter = SkipCounter(f"caption {path.name}", skip_bad_rows)
    out: list[Sample] = []
    for i, row in enumerate(data):
        try:
            rid = get_field(
                row,
                "id",
                file=path,
                index=i,
                types=(str, int),
                expected="a string or integer id",
                required=False,
            )
            fctx = {"file": path, "index": i, "row_id": rid}
            image_key = _pick(row, IMAGE_KEYS)
            image = get_field(
                row,
                image_key,
                **fctx,
                types=(str, list),
                expected=f"an image path (one of fields {', '.join(IMAGE_KEYS)})",
            )
            caption = get_field(
                row,
                _pick(row, CAPTION_KEYS),
                **fctx,
                expected=f"a caption string (field {' or '.join(CAPTION_KEYS)})",
            )
            row_split = row.get("split", split if split_keyed else None)
            if split is not None and not split_keyed:
                row_split = get_field(
                    row, "split", **fctx, expected=f"a split name such as {split!r}"
                )
                if row_split != split:
                    continue
            names = image if isinstance(image, list) else [image]
            if not names or not all(isinstance(n, str) and n for n in names):
                raise MissingFieldError(
                    f"field {image_key!r} must be a path or a non-empty list of paths",
                    file=path,
                    row=i,
                    row_id=rid,
                )
            images = [resolve_image(image_root, n, **fctx, field=image_key) for n in names]
            meta = dict(row)
            meta.setdefault("dataset", dataset)
            meta.update(
                split=row_split, image=image, caption=caption, question=instruction, answer=caption
            )
            out.append(
                Sample(
                    id=str(rid) if rid is not None else f"{path.stem}-{i}",
                    images=images,
                    messages=[Message("user", instruction), Message("assistant", caption)],
                    meta=meta,
                )
            )
        except DataError as e:
            counter.record(e)
    return counter.finish(out)
