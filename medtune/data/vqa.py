"""SLAKE and VQA-RAD readers: the public medical VQA benchmarks, as downloaded, -> ``list[Sample]``.

Each returned :class:`~medtune.data.sample.Sample` is one question::

    Sample(id, images=[<absolute image path>],
           messages=[Message("user", <raw question>), Message("assistant", <answer as str>)],
           meta={<every source field>, dataset, split, question, answer, answer_type, image,
                 language, modality, content_type})

The question is raw (no prompt template; see :mod:`medtune.data.prompts`). In ``meta`` the
normalized keys overwrite source fields of the same name: ``answer`` is a string (VQA-RAD integer
answers become ``"2"``), ``answer_type`` is stripped and upper-cased (VQA-RAD's ``"CLOSED "``).
An empty answer is kept (SLAKE has one); evaluation counts it separately.

Both readers return :class:`~medtune.data.rows.Samples` (a ``list``) whose ``skipped`` counter is
filled when ``skip_bad_rows=True``. Row errors (missing or mistyped field, unknown ``answer_type`` /
``q_lang`` / ``phrase_type``, duplicate id, missing image file) raise a
:class:`~medtune.data.errors.DataError` naming the file, row index and id unless skipped. Every row
is validated, also those the filters drop; image existence is checked only for kept rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medtune.data.errors import (
    BadValueError,
    DataError,
    MalformedJSONError,
    UnknownAnswerTypeError,
)
from medtune.data.holdout import holdout_option
from medtune.data.rows import (
    SkipCounter,
    get_field,
    load_json,
    resolve_image,
)
from medtune.data.sample import Sample, qa_sample

__all__ = ["slake", "vqa_rad", "ANSWER_TYPES", "SLAKE_SPLITS", "VQA_RAD_SPLITS"]

ANSWER_TYPES = ("OPEN", "CLOSED")
SLAKE_SPLITS = {
    "train": "train.json",
    "validation": "validation.json",
    "val": "validation.json",
    "test": "test.json",
}
SLAKE_LANGS = ("en", "zh")
VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
#: split -> the ``phrase_type`` values it holds (the OSF release's own split).
VQA_RAD_SPLITS = {"train": ("freeform", "para"), "test": ("test_freeform", "test_para")}

_ANSWER = (str, int, float)
_EXPECT_ANSWER = "a string or number"


def _norm_answer_type(value: str, **ctx: Any) -> str:
    norm = value.strip().upper()
    if norm not in ANSWER_TYPES:
        raise UnknownAnswerTypeError(
            f"unknown answer_type {value!r} (expected one of {', '.join(ANSWER_TYPES)}; "
            "surrounding whitespace and case are ignored)",
            **ctx,
        )
    return norm


def _answer_str(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip() if isinstance(value, str) else str(value)


def _casefold_set(name: str, values: Iterable[str] | str | None) -> set[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    out = {str(v).strip().casefold() for v in values}
    if not out:
        raise ValueError(f"{name} is empty; pass None to keep all")
    return out


def _answer_type_filter(answer_types: Iterable[str] | str | None) -> set[str] | None:
    wanted = _casefold_set("answer_types", answer_types)
    if wanted is None:
        return None
    bad = sorted(w for w in wanted if w.upper() not in ANSWER_TYPES)
    if bad:
        raise ValueError(f"answer_types: unknown {bad} (expected some of {list(ANSWER_TYPES)})")
    return {w.upper() for w in wanted}


def _top_level_list(data: Any, path: Path, what: str) -> list:
    if not isinstance(data, list):
        raise MalformedJSONError(
            f"top level is {type(data).__name__}, expected a list of {what}", file=path
        )
    return data


# ------------------------------------------------------------------------------------------ SLAKE


def _check_unique(sid: str, i: int, seen: dict[str, int], ctx: dict) -> None:
    """Refuse a second row with the id ``sid``; ``seen`` maps ids to their first row."""
    if sid in seen:
        raise BadValueError(f"duplicate qid (first at row {seen[sid]}; expected unique ids)", **ctx)
    seen[sid] = i


def _qa_fields(row: Any, ctx: dict, image_field: str, image_expected: str) -> tuple:
    """``(image name, question, answer, answer_type)`` of a VQA row, each checked; ``ctx``
    names the row (``file``, ``row``, ``row_id``, ``id_name``)."""
    fctx = {("index" if k == "row" else k): v for k, v in ctx.items()}
    image_name = get_field(row, image_field, **fctx, expected=image_expected)
    question = get_field(row, "question", **fctx)
    answer = get_field(row, "answer", **fctx, types=_ANSWER, expected=_EXPECT_ANSWER)
    answer_type = _norm_answer_type(
        get_field(row, "answer_type", **fctx, expected="'OPEN' or 'CLOSED'"), **ctx
    )
    return image_name, question, answer, answer_type


def _vqa_sample(
    sid: str,
    row: dict,
    image: Path,
    dataset: str,
    split: str,
    question: str,
    answer: Any,
    answer_type: str,
    image_name: str,
    **more: Any,
) -> Sample:
    """The sample of a VQA row: ``meta`` is the row with the normalized keys (module docstring)
    written over it, in the order ``dataset split question answer answer_type image`` + ``more``."""
    answer_s = _answer_str(answer)
    meta = dict(row)
    meta.update(
        dataset=dataset,
        split=split,
        question=question,
        answer=answer_s,
        answer_type=answer_type,
        image=image_name,
        **more,
    )
    return qa_sample(sid, [image], question, answer_s, meta)


def slake_root(root: str | Path) -> Path:
    """The folder holding ``train.json`` etc.: ``root`` itself or ``root/Slake1.0``."""
    root = Path(root)
    if (root / "train.json").is_file() or (root / "test.json").is_file():
        return root
    if (root / "Slake1.0").is_dir():
        return root / "Slake1.0"
    raise DataError(
        f"{root}: not a SLAKE folder (expected Slake1.0/{{train,validation,test}}.json and "
        "Slake1.0/imgs/, or those directly in this folder)",
        reason="missing file",
    )


@holdout_option
def slake(
    root: str | Path,
    split: str = "train",
    lang: str | None = "en",
    answer_types: Iterable[str] | str | None = None,
    content_types: Iterable[str] | str | None = None,
    modalities: Iterable[str] | str | None = None,
    skip_bad_rows: bool = False,
) -> list[Sample]:
    """Read one SLAKE (Slake1.0) split.

    Args:
        root: the ``Slake1.0`` folder (with ``train.json``, ``validation.json``, ``test.json`` and
            ``imgs/xmlabN/source.jpg``) or its parent.
        split: ``train``, ``validation`` (alias ``val``) or ``test``.
        lang: ``en`` (default), ``zh``, or None for both (the ``q_lang`` field).
        answer_types: keep only these (``OPEN`` / ``CLOSED``, any case); None keeps all.
        content_types: keep only these ``content_type`` values (case-insensitive), e.g.
            ``["Organ", "Position"]``.
        modalities: keep only these ``modality`` values (case-insensitive), e.g. ``["CT", "MRI"]``.
        skip_bad_rows: count and skip bad rows instead of raising.

    Returns:
        :class:`~medtune.data.rows.Samples` in file order; ``Sample.id`` is ``str(qid)``.
        ``meta`` holds every source field plus ``dataset="slake"``, ``split``, ``question``,
        ``answer``, ``answer_type``, ``image`` (``img_name``), ``language`` (``q_lang``),
        ``modality``, ``content_type``.

    Raises:
        DataError: bad folder, file or row (see the module docstring).
        ValueError: bad ``split`` / ``lang`` / filter arguments.
    """
    if split not in SLAKE_SPLITS:
        raise ValueError(f"slake: unknown split {split!r} (expected one of {sorted(SLAKE_SPLITS)})")
    if lang is not None and lang not in SLAKE_LANGS:
        raise ValueError(f"slake: unknown lang {lang!r} (expected 'en', 'zh' or None for both)")
    split = "validation" if split == "val" else split
    want_types = _answer_type_filter(answer_types)
    want_content = _casefold_set("content_types", content_types)
    want_modality = _casefold_set("modalities", modalities)

    base = slake_root(root)
    path = base / SLAKE_SPLITS[split]
    rows = _top_level_list(load_json(path), path, "SLAKE question objects")
    image_root = base / "imgs"
    counter = SkipCounter(f"slake {path.name}", skip_bad_rows)
    seen: dict[str, int] = {}
    out: list[Sample] = []
    for i, row in enumerate(rows):
        try:
            qid = get_field(
                row, "qid", file=path, index=i, types=(int, str), expected="an integer id"
            )
            ctx = {"file": path, "row": i, "row_id": qid, "id_name": "qid"}
            fctx = {"file": path, "index": i, "row_id": qid, "id_name": "qid"}
            sid = str(qid)
            _check_unique(sid, i, seen, ctx)
            img_name, question, answer, answer_type = _qa_fields(
                row, ctx, "img_name", "an image path like 'xmlab0/source.jpg'"
            )
            q_lang = get_field(row, "q_lang", **fctx, expected="'en' or 'zh'").strip()
            if q_lang not in SLAKE_LANGS:
                raise BadValueError(f"unknown q_lang {q_lang!r} (expected 'en' or 'zh')", **ctx)
            modality = get_field(row, "modality", **fctx, required=want_modality is not None)
            content = get_field(row, "content_type", **fctx, required=want_content is not None)

            if lang is not None and q_lang != lang:
                continue
            if want_types is not None and answer_type not in want_types:
                continue
            if want_modality is not None and modality.strip().casefold() not in want_modality:
                continue
            if want_content is not None and content.strip().casefold() not in want_content:
                continue

            image = resolve_image(image_root, img_name, **fctx, field="img_name")
            out.append(
                _vqa_sample(
                    sid,
                    row,
                    image,
                    "slake",
                    split,
                    question,
                    answer,
                    answer_type,
                    img_name,
                    language=q_lang,
                    modality=modality,
                    content_type=content,
                )
            )
        except DataError as e:
            counter.record(e)
    return counter.finish(out)


# ---------------------------------------------------------------------------------------- VQA-RAD


def vqa_rad_paths(root: str | Path) -> tuple[Path, Path]:
    """``(json file, image folder)`` of an OSF VQA-RAD download.

    ``root`` is the folder holding ``VQA_RAD Dataset Public.json`` and ``VQA_RAD Image Folder/``
    (or its parent, if that folder is named ``VQA_RAD``), or the JSON file itself (the image
    folder is then its sibling).
    """
    root = Path(root)
    if root.is_file():
        return root, root.parent / VQA_RAD_IMAGES
    for folder in (root, root / "VQA_RAD"):
        if (folder / VQA_RAD_JSON).is_file():
            return folder / VQA_RAD_JSON, folder / VQA_RAD_IMAGES
    raise DataError(
        f"{root}: not a VQA-RAD folder (expected '{VQA_RAD_JSON}' and '{VQA_RAD_IMAGES}/' in it)",
        reason="missing file",
    )


@holdout_option
def vqa_rad(
    root: str | Path,
    split: str = "train",
    answer_types: Iterable[str] | str | None = None,
    skip_bad_rows: bool = False,
) -> list[Sample]:
    """Read one VQA-RAD split from the OSF release.

    Splits follow the release's ``phrase_type``: ``train`` = ``freeform`` + ``para``, ``test`` =
    ``test_freeform`` + ``test_para`` (451 questions). Test images also appear in train (the
    release's design): see ``tools/check_split_leakage.py``.

    Args:
        root: the folder with ``VQA_RAD Dataset Public.json`` and ``VQA_RAD Image Folder/`` (or
            the JSON file).
        split: ``train`` or ``test``.
        answer_types: keep only these (``OPEN`` / ``CLOSED``, any case); None keeps all.
        skip_bad_rows: count and skip bad rows instead of raising.

    Returns:
        :class:`~medtune.data.rows.Samples` in file order. ``Sample.id`` is ``vqa_rad-<qid>``
        using the release's ``qid`` field (unique there), or ``vqa_rad-row<index>`` (0-based
        row in the JSON) for a row without ``qid``. ``meta`` holds every source field plus
        ``dataset="vqa_rad"``, ``split``, ``question``, ``answer`` (str), ``answer_type``
        (stripped, upper-case), ``image`` (``image_name``), ``language="en"``,
        ``content_type`` (= ``question_type``, e.g. ``PRES``) and ``organ`` (``image_organ``).

    Raises:
        DataError: bad folder, file or row (see the module docstring).
        ValueError: bad ``split`` / filter arguments.
    """
    if split not in VQA_RAD_SPLITS:
        raise ValueError(
            f"vqa_rad: unknown split {split!r} (expected one of {sorted(VQA_RAD_SPLITS)})"
        )
    want_types = _answer_type_filter(answer_types)
    path, image_root = vqa_rad_paths(root)
    rows = _top_level_list(load_json(path), path, "VQA-RAD question objects")
    all_phrases = {p for v in VQA_RAD_SPLITS.values() for p in v}
    counter = SkipCounter(f"vqa_rad {split} ({path.name})", skip_bad_rows)
    seen: dict[str, int] = {}
    out: list[Sample] = []
    for i, row in enumerate(rows):
        try:
            qid = get_field(
                row, "qid", file=path, index=i, types=(int, str), expected="an id", required=False
            )
            sid = f"vqa_rad-{qid}" if qid is not None else f"vqa_rad-row{i}"
            id_name, row_id = (
                ("qid", qid) if qid is not None else ("image_name", _peek(row, "image_name"))
            )
            ctx = {"file": path, "row": i, "row_id": row_id, "id_name": id_name}
            fctx = {"file": path, "index": i, "row_id": row_id, "id_name": id_name}
            _check_unique(sid, i, seen, ctx)
            image_name, question, answer, answer_type = _qa_fields(
                row, ctx, "image_name", "an image file name like 'synpic1234.jpg'"
            )
            phrase = get_field(
                row, "phrase_type", **fctx, expected=f"one of {sorted(all_phrases)}"
            ).strip()
            if phrase not in all_phrases:
                raise BadValueError(
                    f"unknown phrase_type {phrase!r} (expected one of {sorted(all_phrases)})", **ctx
                )
            if phrase not in VQA_RAD_SPLITS[split]:
                continue
            if want_types is not None and answer_type not in want_types:
                continue
            image = resolve_image(image_root, image_name, **fctx, field="image_name")
            qtype = row.get("question_type")
            out.append(
                _vqa_sample(
                    sid,
                    row,
                    image,
                    "vqa_rad",
                    split,
                    question,
                    answer,
                    answer_type,
                    image_name,
                    language="en",
                    content_type=qtype.strip() if isinstance(qtype, str) else qtype,
                    organ=row.get("image_organ"),
                )
            )
        except DataError as e:
            counter.record(e)
    return counter.finish(out)


def _peek(row: Any, name: str) -> Any:
    return row.get(name) if isinstance(row, dict) else None
