"""MedEvalKit's VQA accuracy (closed by its yes/no rule, open by exact match), under its own names.

Sources (alibaba-damo-academy/MedEvalKit, commit 9b12e3b): ``utils/utils.py``
(``judge_judgement``, ``judge_close_end_vqa``, ``judge_open_end_vqa``, ``calculate_f1``,
``parse_response``) and the ``cal_metrics`` of ``utils/PATH_VQA/PATH_VQA.py``,
``utils/VQA_RAD/VQA_RAD.py`` and ``utils/SLAKE/SLAKE.py``. Every reply is first cut to its last
``\\boxed{}`` content, else to its ``<answer>`` contents. Then, per dataset:

- PathVQA / VQA-RAD (and any dataset not named ``slake*``): answer and reply lower-cased and
  stripped; an answer ``yes`` / ``no`` is closed and scored by ``judge_judgement`` (after
  ``parse_response`` and deleting newlines and periods, the reply holds exactly one of the
  substrings ``yes`` / ``no`` and holds the answer); any other answer is open and right when
  ``parse_response(reply) == answer`` (``em``).
- SLAKE: ``answer_type`` decides; OPEN rows by ``em`` (answer lower-cased, not stripped);
  CLOSED rows whose raw answer is ``yes`` / ``no`` by ``judge_judgement``, the others by
  ``judge_close_end_vqa`` (the parsed reply without newlines and periods equals the answer).

``accuracy_medevalkit`` is MedEvalKit's "total metrics" acc (right / all rows);
``closed_accuracy_medevalkit`` and ``open_accuracy_medevalkit`` its "close" / "open" acc.
``open_token_f1_medevalkit`` is the set-of-words F1 of ``calculate_f1`` (note: MedEvalKit unpacks
that function's ``(f1, precision, recall)`` as ``precision, recall, f1``, so its own "f1" column
holds the recall; medtune reports the F1 under this name, 0 for an empty side). No model judge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from medtune.eval.mcq import boxed_content, extract_tag, parse_response

__all__ = [
    "MEDEVALKIT_VQA_KEYS",
    "MEDEVALKIT_VQA_RULES",
    "judge_close_end_vqa",
    "judge_judgement",
    "medevalkit_vqa_row",
    "score_medevalkit_vqa",
]

MEDEVALKIT_VQA_KEYS = (
    "accuracy_medevalkit",
    "closed_accuracy_medevalkit",
    "open_accuracy_medevalkit",
    "open_token_f1_medevalkit",
)

MEDEVALKIT_VQA_RULES = {
    "accuracy_medevalkit": "MedEvalKit cal_metrics 'total metrics' acc: right / rows, closed "
    "rows by judge_judgement (yes/no) or judge_close_end_vqa (SLAKE's other CLOSED rows), open "
    "rows by exact match of parse_response(reply) and the lower-cased answer",
    "closed_accuracy_medevalkit": "its 'close' acc. Closed = answer yes/no after lower/strip "
    "(PathVQA, VQA-RAD, any non-SLAKE set) or answer_type CLOSED (SLAKE); judge_judgement: "
    "parse_response(reply) without newlines and periods holds exactly one of 'yes'/'no' as a "
    "substring and holds the answer",
    "open_accuracy_medevalkit": "its 'open' acc (em): parse_response(reply) == answer.lower()",
    "open_token_f1_medevalkit": "calculate_f1 on sets of whitespace words (lower-cased) of "
    "parse_response(reply) and answer; 0 when a side is empty or nothing is shared (MedEvalKit's "
    "own 'f1' key holds the recall, its unpacking swaps them)",
    "medevalkit_reply": "every reply first cut to its last \\boxed{} content (mathruler), else "
    "to its <answer> contents",
}

_YES_NO = ("yes", "no")


def _reply(prediction: str) -> str:
    boxed = boxed_content(prediction)
    if boxed != "None":
        return boxed
    if "<answer>" in prediction:
        return extract_tag(prediction, "answer")
    return prediction


def judge_judgement(answer: str, response: str) -> bool:
    """MedEvalKit ``judge_judgement``: exactly one of ``yes`` / ``no`` in the parsed reply (as
    substrings: "not" and "know" hold "no") and the answer in it."""
    answer = answer.lower()
    response = parse_response(response).replace("\n", "").replace(".", "")
    if ("yes" in response) ^ ("no" in response):
        return answer in response
    return False


def judge_close_end_vqa(answer: str, response: str) -> bool:
    """MedEvalKit ``judge_close_end_vqa``: the parsed reply, without newlines and periods,
    equals the lower-cased answer."""
    return parse_response(response).replace("\n", "").replace(".", "") == answer.lower()


def _set_f1(response: str, answer: str) -> float:
    pred, ref = set(response.lower().split()), set(answer.lower().split())
    common = pred & ref
    if not pred or not ref or not common:
        return 0.0
    p, r = len(common) / len(pred), len(common) / len(ref)
    return 2 * p * r / (p + r)


def medevalkit_vqa_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """``{"closed": bool, "right": bool, "f1": float | None}`` of one VQA row (module rules)."""
    answer = str(row["answer"])
    reply = _reply(str(row["prediction"]))
    if str(row.get("dataset", "")).lower().startswith("slake"):
        if str(row.get("answer_type", "")).strip().upper() == "OPEN":
            parsed = parse_response(reply)
            return {
                "closed": False,
                "right": parsed == answer.lower(),
                "f1": _set_f1(parsed, answer),
            }
        right = (
            judge_judgement(answer, reply)
            if answer in _YES_NO
            else judge_close_end_vqa(answer, reply)
        )
        return {"closed": True, "right": right, "f1": None}
    answer, reply = answer.lower().strip(), reply.lower().strip()
    if answer in _YES_NO:
        return {"closed": True, "right": judge_judgement(answer, reply), "f1": None}
    parsed = parse_response(reply)
    return {"closed": False, "right": parsed == answer, "f1": _set_f1(parsed, answer)}


def score_medevalkit_vqa(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """MedEvalKit's VQA accuracies over predictions rows (``answer``, ``prediction``,
    ``dataset``, ``answer_type``).

    Returns:
        :data:`MEDEVALKIT_VQA_KEYS` (None where a block is empty), ``n_closed_medevalkit``,
        ``n_open_medevalkit`` and ``rules_medevalkit``.
    """
    scored = [medevalkit_vqa_row(r) for r in rows]
    closed = [s for s in scored if s["closed"]]
    opened = [s for s in scored if not s["closed"]]

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    return {
        "accuracy_medevalkit": mean([s["right"] for s in scored]),
        "closed_accuracy_medevalkit": mean([s["right"] for s in closed]),
        "open_accuracy_medevalkit": mean([s["right"] for s in opened]),
        "open_token_f1_medevalkit": mean([s["f1"] for s in opened]),
        "n_closed_medevalkit": len(closed),
        "n_open_medevalkit": len(opened),
        "rules_medevalkit": dict(MEDEVALKIT_VQA_RULES),
    }
