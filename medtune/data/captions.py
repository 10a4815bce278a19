"""Caption readers: JSON ``[{image, caption}, ...]`` (PubMed figure-caption style, ROCO exports)
and the ROCO release folders (:func:`roco`).

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
    MissingImageError,
)
from medtune.data.holdout import holdout_option
from medtune.data.prompts import CAPTION_INSTRUCTIONS
from medtune.data.rows import (
    SkipCounter,
    get_field,
    load_json,
    load_rows,
    optional_id,
    resolve_image,
)
from medtune.data.sample import Sample, qa_sample

__all__ = ["caption_json", "roco", "IMAGE_KEYS", "CAPTION_KEYS"]

#: Accepted names of the image field, in order of preference.
IMAGE_KEYS = ("image", "image_path", "file_name")
#: Accepted names of the caption field.
CAPTION_KEYS = ("caption", "text")


def _pick(row: dict, keys: tuple[str, ...]) -> str:
    for k in keys:
        if isinstance(row, dict) and k in row:
            return k
    return keys[0]


@holdout_option
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
        :class:`~medtune.data.rows.Samples`. ``id``: the row's ``id`` or ``<file stem>-<row
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
            rid = optional_id(row, path, i)
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
            sid = str(rid) if rid is not None else f"{path.stem}-{i}"
            out.append(qa_sample(sid, images, instruction, caption, meta))
        except DataError as e:
            counter.record(e)
    return counter.finish(out)


ROCO_SUBSETS = ("radiology", "non-radiology")


def _roco_table(path: Path, n_cols: int) -> dict[str, tuple[int, list[str]]]:
    """``ROCO_id<TAB>...`` lines -> id -> (line index, the other columns)."""
    if not path.is_file():
        raise DataError(
            f"file not found: {path} (expected the ROCO release layout "
            "data/<split>/<subset>/{captions.txt,dlinks.txt})",
            reason="missing file",
        )
    out: dict[str, tuple[int, list[str]]] = {}
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) < n_cols or not cols[0].strip():
                raise MalformedJSONError(
                    f"expected {n_cols} tab-separated columns starting with a ROCO id, got {len(cols)}",
                    file=path,
                    row=i,
                )
            rid = cols[0].strip()
            if rid in out:
                raise DataError(
                    f"duplicate id (first at line {out[rid][0]})", file=path, row=i, row_id=rid
                )
            out[rid] = (i, cols[1:])
    return out


@holdout_option
def roco(
    root: str | Path,
    split: str = "train",
    subset: str = "radiology",
    image_dir: str = "images",
    skip_bad_rows: bool = False,
    *,
    instruction: str = CAPTION_INSTRUCTIONS[0],
) -> list[Sample]:
    """Read ROCO as released (github.com/razorx89/roco-dataset, images fetched by its
    ``scripts/fetch.py``).

    Layout::

        root/data/<split>/<subset>/captions.txt   ROCO_00020<TAB> caption
        root/data/<split>/<subset>/dlinks.txt     ROCO_00020<TAB>wget ... PMC1234567.tar.gz ...<TAB>image.jpg
        root/data/<split>/<subset>/images/PMC1234567_image.jpg

    ``root`` may also be the ``data/`` folder itself. Captions are stripped (the release puts a
    space after the tab).

    Args:
        root: the clone of the ROCO repository (or its ``data/`` folder).
        split: ``train``, ``validation`` or ``test``.
        subset: ``radiology`` or ``non-radiology``.
        image_dir: the image sub-folder ``fetch.py`` wrote (its ``--subdir``, default ``images``).
        skip_bad_rows: count and skip rows without a download link or image instead of raising.
        instruction: the user turn's text (sample other instructions with a template list).

    Returns:
        :class:`~medtune.data.rows.Samples` in ``captions.txt`` order; ``id`` is the ROCO id;
        ``meta`` holds ``dataset="roco"``, ``split``, ``subset``, ``image`` (relative to the
        subset folder), ``pmc_id``, ``caption``, ``question`` (the instruction), ``answer`` (the
        caption) and ``task="caption"``.
    """
    root = Path(root)
    if subset not in ROCO_SUBSETS:
        raise DataError(f"roco: unknown subset {subset!r} (expected one of {ROCO_SUBSETS})")
    base = root / "data" if (root / "data").is_dir() else root
    folder = base / split / subset
    if not folder.is_dir():
        raise DataError(
            f"roco: no folder {folder} (expected {root}/data/<split>/<subset>/ with split "
            "train, validation or test)",
            reason="missing file",
        )
    captions_file, links_file = folder / "captions.txt", folder / "dlinks.txt"
    captions = _roco_table(captions_file, 2)
    links = _roco_table(links_file, 3)
    counter = SkipCounter(f"roco {split}/{subset}", skip_bad_rows)
    out: list[Sample] = []
    for rid, (line, cols) in captions.items():
        try:
            caption = cols[0].strip()
            if not caption:
                raise MissingFieldError("empty caption", file=captions_file, row=line, row_id=rid)
            if rid not in links:
                raise MissingImageError(
                    f"no download link for this id in {links_file}",
                    file=captions_file,
                    row=line,
                    row_id=rid,
                )
            link_line, link_cols = links[rid]
            archive = next((w for w in link_cols[0].split() if w.endswith(".tar.gz")), None)
            if archive is None:
                raise MalformedJSONError(
                    "expected a PMC .tar.gz link in the second column",
                    file=links_file,
                    row=link_line,
                    row_id=rid,
                )
            pmc_id = archive.rsplit("/", 1)[-1][: -len(".tar.gz")]
            rel = f"{image_dir}/{pmc_id}_{link_cols[-1].strip()}"
            image = resolve_image(folder, rel, file=links_file, index=link_line, row_id=rid)
            meta = {
                "dataset": "roco",
                "split": split,
                "subset": subset,
                "image": rel,
                "pmc_id": pmc_id,
                "caption": caption,
                "question": instruction,
                "answer": caption,
                "task": "caption",
            }
            out.append(qa_sample(rid, [image], instruction, caption, meta))
        except DataError as e:
            counter.record(e)
    return counter.finish(out)
