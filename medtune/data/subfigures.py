"""PubMed figures split into subfigures by a JSON of boxes (the brain-VLP seed's
subfigure/subcaption data): one sample per subfigure, its crop box and its subcaption.

Layout (a JSON list, or JSONL with one figure per line)::

    [
      {
        "id": "PMC5123456_fig2",               # optional; default <file stem>-<row index>
        "image": "figures/PMC5123456_fig2.jpg", # the whole figure, relative to image_root
        "caption": "Axial MRI of ...",          # optional: the figure's full caption
        "subfigures": [
          {"box": [x0, y0, x1, y1],             # pixels of the figure, x1 > x0, y1 > y0
           "subcaption": "(a) T2-weighted ...", # the text of this panel (required, non-empty)
           "label": "a"},                       # optional
          ...
        ]
      },
      ...
    ]

Each subfigure becomes ``Sample(id="<figure id>/<k>", images=[figure path], messages=[user:
instruction, assistant: subcaption])`` with ``meta["crop"] = [x0, y0, x1, y1]`` (the image
loaders of the BLIP recipes crop it, :func:`medtune.data.subfigures.load_crop`),
``meta["caption"]`` = the subcaption, ``meta["figure_caption"]``, ``meta["label"]``. Every
subfigure of a figure is its own image (its own retrieval id). A box outside the image is found
when the image is opened (the error names the sample); a malformed box when the file is read.
"""

from __future__ import annotations

from pathlib import Path

from medtune.data.errors import BadValueError, DataError, MalformedJSONError, MissingFieldError
from medtune.data.prompts import CAPTION_INSTRUCTIONS
from medtune.data.rows import SkipCounter, get_field, load_rows, optional_id, resolve_image
from medtune.data.sample import qa_sample

__all__ = ["subfigure_json", "load_crop"]


def _box(value, ectx: dict, k: int) -> list[int]:
    ok = (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
    if ok:
        x0, y0, x1, y1 = (int(round(v)) for v in value)
        if x1 > x0 >= 0 and y1 > y0 >= 0:
            return [x0, y0, x1, y1]
    raise BadValueError(
        f"subfigures[{k}].box is {value!r} (expected [x0, y0, x1, y1] pixels with x1 > x0 >= 0 "
        "and y1 > y0 >= 0)",
        **ectx,
    )


def subfigure_json(
    path: str | Path,
    image_root: str | Path | None = None,
    skip_bad_rows: bool = False,
    *,
    instruction: str = CAPTION_INSTRUCTIONS[0],
    dataset: str = "pubmed_subfigures",
):
    """Read figures and their subfigure boxes (layout in the module docstring).

    Args:
        path: the JSON / JSONL file.
        image_root: folder of relative figure paths (default: the file's folder).
        skip_bad_rows: count and skip bad figures instead of raising.
        instruction: the user turn's text.
        dataset: ``meta["dataset"]``.

    Returns:
        :class:`~medtune.data.rows.Samples`, one per subfigure, in file order.
    """
    path = Path(path)
    image_root = Path(image_root) if image_root is not None else path.parent
    rows = load_rows(path)
    counter = SkipCounter(f"subfigures {path.name}", skip_bad_rows)
    out = []
    for i, row in enumerate(rows):
        try:
            rid = optional_id(row, path, i)
            fctx = {"file": path, "index": i, "row_id": rid}
            ectx = {"file": path, "row": i, "row_id": rid}
            image = get_field(row, "image", **fctx, expected="the figure's image path")
            subs = get_field(
                row, "subfigures", **fctx, types=(list,), expected="a list of {box, subcaption}"
            )
            if not subs:
                raise MissingFieldError("field 'subfigures' is empty", **ectx)
            caption = row.get("caption")
            figure = resolve_image(image_root, image, **fctx)
            fid = str(rid) if rid is not None else f"{path.stem}-{i}"
            for k, sub in enumerate(subs):
                if not isinstance(sub, dict):
                    raise MalformedJSONError(
                        f"subfigures[{k}] is {type(sub).__name__}, expected an object", **ectx
                    )
                box = _box(sub.get("box"), ectx, k)
                text = sub.get("subcaption")
                if not isinstance(text, str) or not text.strip():
                    raise MissingFieldError(
                        f"subfigures[{k}].subcaption is {text!r} (expected a non-empty string)",
                        **ectx,
                    )
                meta = {
                    "dataset": dataset,
                    "image": image,
                    "crop": box,
                    "caption": text,
                    "figure_caption": caption,
                    "label": sub.get("label"),
                    "question": instruction,
                    "answer": text,
                }
                out.append(qa_sample(f"{fid}/{k}", [figure], instruction, text, meta))
        except DataError as e:
            counter.record(e)
    return counter.finish(out)


def load_crop(sample):
    """The RGB PIL image of a sample, cropped to ``meta["crop"]`` when it has one.

    Raises:
        BadValueError: the box reaches outside the figure (naming the sample and both sizes).
    """
    from medtune.data.images import load_image

    image = load_image(sample.images[0])
    box = sample.meta.get("crop") if isinstance(sample.meta, dict) else None
    if box is None:
        return image
    x0, y0, x1, y1 = box
    if x1 > image.width or y1 > image.height:
        raise BadValueError(
            f"sample {sample.id}: crop box {box} reaches outside its figure "
            f"({image.width} x {image.height}, {sample.images[0]})"
        )
    return image.crop((x0, y0, x1, y1))
