"""Caption and report metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr.

Texts are tokenized with pycocoevalcap's Stanford PTBTokenizer (lowercased, punctuation tokens
removed), as in the COCO caption evaluation. The PTB tokenizer and METEOR run ``java`` (it must be
on ``PATH``); everything runs offline. SPICE is left out: it downloads Stanford CoreNLP.

CIDEr's idf comes from the evaluated set's own references, so it is only meaningful over a corpus
(with a single item every n-gram has idf 0 and CIDEr is 0).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from typing import Any

CAPTION_METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

CAPTION_RULES = {
    "tokenizer": "pycocoevalcap PTBTokenizer (Stanford CoreNLP 3.4.1, lowercased, punctuation "
    "tokens removed)",
    "BLEU-1": "pycocoevalcap Bleu(4), corpus-level, n=1 (closest reference length)",
    "BLEU-2": "pycocoevalcap Bleu(4), corpus-level, n=2",
    "BLEU-3": "pycocoevalcap Bleu(4), corpus-level, n=3",
    "BLEU-4": "pycocoevalcap Bleu(4), corpus-level, n=4",
    "METEOR": "pycocoevalcap Meteor (meteor-1.5.jar, -l en -norm), corpus-level",
    "ROUGE-L": "pycocoevalcap Rouge (LCS F-measure, beta 1.2), mean over items",
    "CIDEr": "pycocoevalcap Cider (CIDEr-D style, n=4, sigma 6, idf from these references), mean",
}


def _check_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "caption metrics need java on PATH (pycocoevalcap's PTBTokenizer and METEOR run it)"
        )


def _close_meteor(scorer: Any) -> None:
    proc = getattr(scorer, "meteor_p", None)
    if proc is None:
        return
    # Stop the JVM now rather than at garbage collection (pycocoevalcap's __del__ repeats these
    # steps later, harmlessly: closing a closed pipe and killing a reaped process do nothing).
    with scorer.lock:
        if proc.stdin:
            proc.stdin.close()
        proc.kill()
        proc.wait()


def caption_scores(
    references: Mapping[Any, Sequence[str] | str],
    predictions: Mapping[Any, str],
    meteor: bool = True,
    per_item: bool = False,
) -> dict[str, Any]:
    """Corpus caption metrics.

    Args:
        references: id -> list of reference captions (a single string is one reference).
        predictions: id -> predicted caption. Must hold exactly the ids of ``references``.
        meteor: compute METEOR (starts a JVM that loads its paraphrase table: several seconds).
        per_item: also return ``"per_id": {id: {metric: score}}`` (BLEU-n per item is the
            sentence-level score; CIDEr per item still uses the corpus idf).

    Returns:
        ``{"n": N, "BLEU-1": ..., "BLEU-4": ..., "METEOR": ..., "ROUGE-L": ..., "CIDEr": ...,
        "rules": {...}}`` (scores in [0, 1] except CIDEr, which is in [0, 10]).

    Raises:
        ValueError: ids differ between references and predictions, no items, or an id has no
            reference.
        RuntimeError: java is not available.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ref_ids, pred_ids = set(references), set(predictions)
    if ref_ids != pred_ids:
        missing = sorted(map(str, ref_ids - pred_ids))[:5]
        extra = sorted(map(str, pred_ids - ref_ids))[:5]
        raise ValueError(
            f"references and predictions must have the same ids; without prediction: {missing}, "
            f"without reference: {extra}"
        )
    if not ref_ids:
        raise ValueError("no captions to score")
    _check_java()

    # Internal string keys keep PTBTokenizer's bookkeeping simple whatever the id type.
    keys = {i: f"k{n}" for n, i in enumerate(references)}
    gts_raw: dict[str, list[dict[str, str]]] = {}
    res_raw: dict[str, list[dict[str, str]]] = {}
    for i, key in keys.items():
        refs = references[i]
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"id {i!r} has no reference caption")
        gts_raw[key] = [{"caption": str(r)} for r in refs]
        res_raw[key] = [{"caption": str(predictions[i])}]

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize(gts_raw)
    res = tokenizer.tokenize(res_raw)
    # PTBTokenizer drops trailing empty lines: give every missing item an empty caption.
    for key in keys.values():
        gts.setdefault(key, [""])
        res.setdefault(key, [""])
        while len(gts[key]) < len(gts_raw[key]):
            gts[key].append("")

    out: dict[str, Any] = {"n": len(keys)}
    items: dict[str, list[float] | None] = {}
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        out[f"BLEU-{n}"] = float(value)
        items[f"BLEU-{n}"] = bleu_items[n - 1]
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            value, items["METEOR"] = scorer.compute_score(gts, res)
        finally:
            _close_meteor(scorer)
        out["METEOR"] = float(value)
    else:
        out["METEOR"], items["METEOR"] = None, None
    rouge, items["ROUGE-L"] = Rouge().compute_score(gts, res)
    out["ROUGE-L"] = float(rouge)
    cider, items["CIDEr"] = Cider().compute_score(gts, res)
    out["CIDEr"] = float(cider)
    if per_item:
        # Every scorer returns its per-item list in the key order of `gts` (our insertion order).
        order = list(gts)
        index = {key: n for n, key in enumerate(order)}
        out["per_id"] = {
            i: {
                m: (None if items[m] is None else float(items[m][index[key]]))
                for m in CAPTION_METRIC_KEYS
            }
            for i, key in keys.items()
        }
    out["rules"] = dict(CAPTION_RULES)
    return out


def is_caption_row(row: Mapping[str, Any]) -> bool:
    """A predictions row of a caption dataset (``task: caption``, as ``eval`` writes them)."""
    return (
        row.get("task") == "caption" or str(row.get("answer_type", "")).strip().upper() == "CAPTION"
    )


def validate_caption_row(row: Any, where: str = "<row>") -> Mapping[str, Any]:
    """Check the fields caption scoring reads: ``id`` (str or int), ``answer`` (a reference string
    or a non-empty list of them), ``prediction`` (str).

    Raises:
        ValueError: naming ``where`` and the field.
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: a row must be a JSON object")
    for key in ("id", "answer", "prediction"):
        if key not in row:
            raise ValueError(f"{where}: missing key {key!r}")
    if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
        raise ValueError(f"{where}: 'id' must be a string or integer")
    ans = row["answer"]
    if not (
        isinstance(ans, str)
        or (isinstance(ans, list) and ans and all(isinstance(a, str) for a in ans))
    ):
        raise ValueError(
            f"{where}: 'answer' must be the reference text or a non-empty list of references"
        )
    if not isinstance(row["prediction"], str):
        raise ValueError(f"{where}: 'prediction' must be a string")
    return row


def score_caption_rows(
    rows: Sequence[Mapping[str, Any]], meteor: bool = True, per_item: bool = False
) -> dict[str, Any]:
    """Caption metrics of predictions rows: ``answer`` is the reference (a list is several
    references), ``prediction`` the generated caption.

    Args:
        rows: predictions rows (checked with :func:`validate_caption_row`).
        meteor: compute METEOR.
        per_item: also return ``"per_id": {id: {metric: score}}`` (per-report scores, see
            :func:`caption_scores`).

    Returns:
        ``{"n", "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "rules", "checkpoints"}``
        (plus ``per_id``); with no rows every metric is None.

    Raises:
        ValueError: a row lacks a field, or two rows share an id.
    """
    if not rows:
        return {
            "n": 0,
            **dict.fromkeys(CAPTION_METRIC_KEYS),
            "rules": dict(CAPTION_RULES),
            "checkpoints": [],
            **({"per_id": {}} if per_item else {}),
        }
    refs: dict[Any, list[str]] = {}
    preds: dict[Any, str] = {}
    for n, r in enumerate(rows):
        validate_caption_row(r, f"row {n}")
        if r["id"] in refs:
            raise ValueError(f"row {n}: id {r['id']!r} appears twice")
        ans = r["answer"]
        refs[r["id"]] = list(ans) if isinstance(ans, list) else [ans]
        preds[r["id"]] = r["prediction"]
    out = caption_scores(refs, preds, meteor=meteor, per_item=per_item)
    out["checkpoints"] = sorted({str(r.get("checkpoint", "")) for r in rows})
    return out
