"""VQA metrics over a predictions JSONL.

Every number has a name that says its rule, and :data:`RULES` states each rule in one line.
Standard library only: ``medtune score`` runs without torch.

medtune's own metrics use :func:`normalize` / :func:`tokens`:

- ``closed_accuracy_strict``: CLOSED rows; right when ``normalize(pred) == normalize(answer)``, or
  when the answer is ``yes``/``no`` and the first token of the prediction equals it.
- ``open_exact_match``: OPEN rows; ``tokens(pred) == tokens(answer)``.
- ``open_token_f1``: OPEN rows; SQuAD-style F1 on token multisets, averaged.

:func:`tokens` splits on whitespace and makes every CJK character its own token (the rule of the
CMRC 2018 and DuReader F1 scripts): SLAKE has over 1,000 Chinese test questions, written without
spaces, on which whitespace tokens would turn F1 into exact match.

LLaVA-Med-compatible metrics (:mod:`medtune.eval.llava_med_metrics`, re-exported here; LLaVA-Med
v1 ``llava/eval/run_eval.py`` after its December 2023 closed-accuracy fix) use :func:`llava_med_normalize`, a re-implementation of its
``eval_metrics/glossary.py::normalize_word`` with its quirks:

- ``closed_accuracy_llava_med``: CLOSED rows, all in the denominator; right when the normalized
  prediction holds ``yes`` or ``no`` as a substring and holds the normalized answer as a substring.
- ``open_recall_llava_med``: OPEN rows; word-count recall of ``calculate_f1score``, averaged.
- ``open_hit_llava_med``: OPEN rows; the normalized answer is a substring of the normalized
  prediction. Rows whose answer is empty after :func:`llava_med_normalize` (``"A"``, ``"the"``)
  would be a hit for any prediction: they are skipped and counted in
  ``n_skipped_empty_answer_llava_med``.

``closed_accuracy_llava_med`` is LLaVA-Med's rule as published: a closed answer that is not
yes/no (about 15% of SLAKE's) and every Chinese 是/否 answer score 0 unless the prediction also
holds "yes" or "no" (:data:`LLAVA_MED_CLOSED_NOTE`); ``n_closed_not_yes_no`` per block (and the
``by_language`` breakdown) shows how many rows that rule cannot credit.

Rows whose answer is empty after :func:`normalize` are not scored; they are counted in
``n_skipped_empty_answer``. A row's answer type is its ``answer_type`` stripped and upper-cased;
rows that are neither CLOSED nor OPEN are counted in ``n_skipped_other_answer_type``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

# re-exported: the LLaVA-Med rules' documented home is this module
from medtune.eval.llava_med_metrics import (
    LLAVA_MED_ARTICLES,  # noqa: F401
    LLAVA_MED_CONTRACTIONS,  # noqa: F401
    LLAVA_MED_NUMBERS,  # noqa: F401
    LLAVA_MED_PUNCT,  # noqa: F401
    closed_llava_med,
    hit_llava_med,
    llava_med_normalize,  # noqa: F401
    recall_llava_med,
)

#: The one line shown under every table that puts closed_accuracy_llava_med next to the strict rule.
LLAVA_MED_CLOSED_NOTE = (
    "closed_accuracy_llava_med is LLaVA-Med's rule: right only when the prediction holds 'yes' or "
    "'no' and the answer, so closed answers that are not yes/no, and Chinese 是/否 answers, score 0 "
    "(n_closed_not_yes_no counts them; see by_language); closed_accuracy_strict scores them."
)

METRIC_KEYS = (
    "closed_accuracy_strict",
    "closed_accuracy_llava_med",
    "open_exact_match",
    "open_token_f1",
    "open_recall_llava_med",
    "open_hit_llava_med",
)

RULES: dict[str, str] = {
    "normalize": "lowercase; every char that is not a letter, digit or whitespace -> space; "
    "whitespace collapsed; stripped",
    "tokens": "cjk_char_tokens: normalize(s) split on whitespace, every CJK character (Han, kana, "
    "Hangul) its own token, as the CMRC 2018 / DuReader F1 scripts tokenize Chinese",
    "llava_med_normalize": "lowercase, then LLaVA-Med v1 glossary.normalize_word (VQA-v2 answer "
    "normalization as LLaVA-Med applies it: punctuation deleted or spaced, periods not before a "
    "digit deleted (at most 32), number words -> digits, articles dropped, contractions, commas "
    "deleted)",
    "closed_accuracy_strict": "CLOSED rows: normalize(pred) == normalize(answer), or answer is "
    "yes/no and the first token of pred equals it; mean over CLOSED rows",
    "closed_accuracy_llava_med": "CLOSED rows (all in the denominator): llava_med_normalize(pred) "
    "holds 'yes' or 'no' as a substring and holds llava_med_normalize(answer) as a substring. "
    + LLAVA_MED_CLOSED_NOTE,
    "open_exact_match": "OPEN rows: tokens(pred) == tokens(answer); mean over OPEN rows",
    "open_token_f1": "OPEN rows: SQuAD-style F1 on token multisets of tokens(pred), tokens(answer) "
    "(0 when nothing is shared); mean over OPEN rows",
    "open_recall_llava_med": "OPEN rows: LLaVA-Med calculate_f1score recall on llava_med_normalize "
    "words: tp = sum of pred counts of shared words, fn = sum of answer counts of answer words absent "
    "from pred, tp/(tp+fn), 0 if either side is empty or tp == 0; mean over OPEN rows",
    "open_hit_llava_med": "OPEN rows whose llava_med_normalize(answer) is not empty: it is a "
    "substring of llava_med_normalize(pred); mean over those rows",
    "n_skipped_empty_answer": "rows whose answer is empty after normalize(); not scored",
    "n_skipped_empty_answer_llava_med": "OPEN rows whose answer is empty after "
    "llava_med_normalize() (e.g. 'A', 'the'); not scored by open_hit_llava_med",
    "n_closed_not_yes_no": "CLOSED rows whose normalized answer is not yes/no (closed_accuracy_llava_med "
    "can only credit them when the prediction also holds 'yes' or 'no')",
    "n_skipped_other_answer_type": "rows whose answer_type (stripped, upper-cased) is neither "
    "CLOSED nor OPEN; not scored",
}

BREAKDOWN_FIELDS = {
    "by_dataset": "dataset",
    "by_answer_type": "answer_type",
    "by_language": "language",
    "by_modality": "modality",
    "by_content_type": "content_type",
}

# ---------------------------------------------------------------------------------------------
# medtune's normalization
# ---------------------------------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[^\w\s]|_")


def normalize(s: Any) -> str:
    """medtune's answer normalization.

    Lowercase; every character that is not a letter, digit or whitespace becomes a space;
    whitespace collapsed; stripped. Non-strings (VQA-RAD has integer answers) are ``str()``-ed;
    ``None`` is the empty string.

    Args:
        s: the text.

    Returns:
        The normalized text.
    """
    if s is None:
        return ""
    text = str(s).lower()
    # \w is letters, digits and underscore (Unicode-aware); the underscore is not a letter.
    text = _NON_ALNUM.sub(" ", text)
    return " ".join(text.split())


# Han (with extensions A and compatibility), kana, Hangul: written without spaces between words.
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])")


def tokens(s: Any) -> list[str]:
    """Tokens of :func:`normalize`: whitespace-split, every CJK character its own token.

    The CMRC 2018 / DuReader F1 rule for Chinese; text without CJK characters gives
    ``normalize(s).split()``. ``tokens("左肺 nodule")`` -> ``["左", "肺", "nodule"]``.
    """
    return _CJK.sub(r" \1 ", normalize(s)).split()


def answer_type_of(row: Mapping[str, Any]) -> str:
    """The row's answer type, stripped and upper-cased (``CLOSED``, ``OPEN`` or other)."""
    return str(row.get("answer_type") or "").strip().upper()


def closed_strict(prediction: Any, answer: Any) -> bool:
    """``closed_accuracy_strict`` for one row: see :data:`RULES`."""
    pred, ans = normalize(prediction), normalize(answer)
    if pred == ans:
        return True
    if ans in ("yes", "no"):
        pred_tokens = pred.split()
        return bool(pred_tokens) and pred_tokens[0] == ans
    return False


def open_exact(prediction: Any, answer: Any) -> bool:
    """``open_exact_match`` for one row: equal :func:`tokens` (so spacing between CJK characters
    does not matter; for other text, equal normalized strings)."""
    return tokens(prediction) == tokens(answer)


def token_f1(prediction: Any, answer: Any) -> float:
    """SQuAD-style F1 on token multisets (``open_token_f1`` for one row).

    Returns:
        2PR/(P+R) with P = shared/len(pred tokens), R = shared/len(answer tokens), where shared is
        the size of the multiset intersection; 0.0 when nothing is shared.
    """
    pred_toks, ans_toks = tokens(prediction), tokens(answer)
    shared = sum((Counter(pred_toks) & Counter(ans_toks)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(pred_toks)
    recall = shared / len(ans_toks)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def score_row(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """Per-row scores, or ``None`` when the row is not scored.

    Args:
        row: a predictions row (needs ``answer``, ``prediction``, ``answer_type``).

    Returns:
        ``{"answer_type": "CLOSED", "closed_accuracy_strict": 1.0, ...}`` with the metrics that
        apply to the row's answer type, or ``None`` when the answer is empty after
        :func:`normalize` or the answer type is neither CLOSED nor OPEN.
    """
    answer, prediction = row.get("answer"), row.get("prediction")
    if not normalize(answer):
        return None
    kind = answer_type_of(row)
    if kind == "CLOSED":
        return {
            "answer_type": kind,
            "closed_accuracy_strict": float(closed_strict(prediction, answer)),
            "closed_accuracy_llava_med": float(closed_llava_med(prediction, answer)),
        }
    if kind == "OPEN":
        out = {
            "answer_type": kind,
            "open_exact_match": float(open_exact(prediction, answer)),
            "open_token_f1": token_f1(prediction, answer),
            "open_recall_llava_med": recall_llava_med(prediction, answer),
        }
        hit = hit_llava_med(prediction, answer)
        if hit is not None:  # absent: skipped by open_hit_llava_med (empty LLaVA-Med answer)
            out["open_hit_llava_med"] = float(hit)
        return out
    return None


def _aggregate(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    n_closed = n_open = n_empty = n_other = n_closed_other = 0
    sums = dict.fromkeys(METRIC_KEYS, 0.0)
    counts = dict.fromkeys(METRIC_KEYS, 0)
    for row in rows:
        if not normalize(row.get("answer")):
            n_empty += 1
            continue
        scores = score_row(row)
        if scores is None:
            n_other += 1
            continue
        if scores["answer_type"] == "CLOSED":
            n_closed += 1
            n_closed_other += normalize(row.get("answer")) not in ("yes", "no")
        else:
            n_open += 1
        for key in METRIC_KEYS:
            if key in scores:
                sums[key] += scores[key]
                counts[key] += 1
    out: dict[str, Any] = {
        "n_rows": len(rows),
        "n_closed": n_closed,
        "n_open": n_open,
        "n_skipped_empty_answer": n_empty,
        "n_skipped_other_answer_type": n_other,
        "n_skipped_empty_answer_llava_med": n_open - counts["open_hit_llava_med"],
        "n_closed_not_yes_no": n_closed_other,
    }
    for key in METRIC_KEYS:
        out[key] = sums[key] / counts[key] if counts[key] else None
    return out


def _group_value(row: Mapping[str, Any], field: str) -> str | None:
    if field == "answer_type":
        return answer_type_of(row) or None
    value = row.get(field)
    if value is None and field == "language":
        value = row.get("q_lang")  # SLAKE's own name for it
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value)


def score_predictions(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """All metrics over predictions rows, with breakdowns.

    Args:
        rows: predictions rows (the :mod:`medtune.eval.predictions` schema).

    Returns:
        A JSON-able dict: ``n_rows``, ``n_closed``, ``n_open``, ``n_skipped_empty_answer``,
        ``n_skipped_other_answer_type``, each metric of :data:`METRIC_KEYS` (``None`` when its
        denominator is 0), ``by_dataset`` / ``by_answer_type`` / ``by_language`` /
        ``by_modality`` / ``by_content_type`` (present only when some row has that field; each
        maps a value to the same block; ``language`` falls back to SLAKE's ``q_lang``), ``checkpoints`` (distinct ``checkpoint`` values) and
        ``rules`` (one line per metric).
    """
    rows = list(rows)
    result = _aggregate(rows)
    for key, field in BREAKDOWN_FIELDS.items():
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for row in rows:
            value = _group_value(row, field)
            if value is not None:
                groups.setdefault(value, []).append(row)
        if groups:
            result[key] = {value: _aggregate(groups[value]) for value in sorted(groups)}
    checkpoints = sorted({str(r["checkpoint"]) for r in rows if r.get("checkpoint") is not None})
    result["checkpoints"] = checkpoints
    result["rules"] = dict(RULES)
    return result
