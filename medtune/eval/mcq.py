"""Multiple-choice scoring: MedEvalKit's ``judge_multi_choice``, reproduced rule for rule.

Source: ``utils/utils.py`` of alibaba-damo-academy/MedEvalKit (commit 9b12e3b):
``judge_multi_choice``, ``parse_response``, ``extract``, ``find_most_similar_index``, and
``mathruler.grader.extract_boxed_content`` (mathruler 0.1.0), which it calls. The callers
``utils/OmniMedVQA/OmniMedVQA.py`` and ``utils/MedXpertQA/MedXpertQA.py`` first cut the reply
to its ``<answer>...</answer>`` content and pass the choices written ``"A. text"``; medtune does
both for every multiple-choice row (:data:`RULES` states each step). Standard library only.

A predictions row of ``task: mcq`` needs ``id``, ``question``, ``choices`` (option texts, A
first), ``answer`` (the letter) and ``prediction``; group keys (``dataset``, ``modality``,
``question_type``, ``subset``, ...) give per-group accuracies.

MMMU: MedEvalKit scores MMMU with MMMU's own ``parse_multi_choice_response`` (which picks a
random option when none is found); medtune scores every multiple-choice row, MMMU's included,
with ``judge_multi_choice`` (deterministic), as the issue asks.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from medtune.utils.errors import UserError

__all__ = [
    "ANSWER_PATTERNS",
    "MCQ_GROUP_FIELDS",
    "MCQ_METRIC_KEYS",
    "MCQ_PROMPT",
    "MCQ_RULES",
    "MCQError",
    "boxed_content",
    "extract_tag",
    "is_mcq_row",
    "judge_multi_choice",
    "lettered",
    "mcq_prompt",
    "mcq_row_fields",
    "most_similar_index",
    "parse_response",
    "score_mcq_row",
    "score_mcq_rows",
    "validate_mcq_row",
]

#: MedEvalKit's ``get_multiple_choice_prompt`` (``utils/question_formats.py``, English, direct).
MCQ_PROMPT = (
    "\nQuestion: {question}\nOptions: \n{options}\n"
    "Answer with the option's letter from the given choices directly."
)

#: ``parse_response``'s markers, in its order: the reply is cut after the last of each present.
ANSWER_PATTERNS = (
    "**answer**:",
    "**answer**",
    "*answer*:",
    "**answer:**",
    "answer is",
    "answer:",
    "答案:",
    "final answer",
    "final answer is",
)

MCQ_METRIC_KEYS = ("mcq_accuracy", "n_mcq", "n_mcq_no_option")

MCQ_GROUP_FIELDS = {
    "by_dataset": "dataset",
    "by_modality": "modality",
    "by_question_type": "question_type",
    "by_subset": "subset",
    "by_medical_task": "medical_task",
    "by_body_system": "body_system",
}

MCQ_RULES: dict[str, str] = {
    "mcq_choices": "the choices passed to the rule are 'A. text', 'B. text', ... (MedEvalKit's "
    "OmniMedVQA / MedXpertQA form); the prompt lists them the same way",
    "mcq_extract": "prediction -> its <answer>...</answer> contents (all blocks, space-joined) "
    "when it has any (MedEvalKit extract(hard=True)), then judge_multi_choice",
    "judge_multi_choice": "MedEvalKit utils.judge_multi_choice: lower-case; if the first "
    "'\\n\\n' block, or the part of the last block before '.', is an option letter, keep only "
    "it; parse_response ('\\boxed{}' content (mathruler: last \\boxed{, 'None' if unbalanced) "
    "when 'boxed' occurs, else <answer> contents; then cut after each of "
    + ", ".join(repr(p) for p in ANSWER_PATTERNS)
    + "); strip, drop newlines; s = text before the first '.', after the last ':'; right when "
    "s == answer letter; or s is a letter whose choice equals the answer; or s equals the "
    "choice of the answer letter; otherwise (no option named) the choice with the highest "
    "difflib.SequenceMatcher ratio to the whole parsed reply (first on ties, A when all are 0) "
    "is taken and is right when its letter is the answer",
    "mcq_accuracy": "fraction of mcq rows judge_multi_choice counts right",
    "n_mcq_no_option": "mcq rows whose reply named no option (letter or option text) and were "
    "settled by string similarity",
}


class MCQError(UserError, ValueError):
    """A multiple-choice predictions row that cannot be scored; the message names it."""


def lettered(choices: list[str]) -> list[str]:
    """``["A. text", "B. text", ...]``: how MedEvalKit passes OmniMedVQA / MedXpertQA choices."""
    return [f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices)]


def mcq_prompt(question: str, choices: list[str], template: str = MCQ_PROMPT) -> str:
    """The question with its lettered options, in MedEvalKit's wording by default."""
    return template.format(question=question, options="\n".join(lettered(choices)))


# ----------------------------------------------------------------------------- MedEvalKit's steps


def boxed_content(text: str) -> str:
    """``mathruler.grader.extract_boxed_content``: the content of the last ``\\boxed{...}``
    (braces balanced, stripped), or the string ``"None"`` when there is none or it never closes."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return "None"
    content = text[start + len("\\boxed{") :]
    depth = 0
    for i, ch in enumerate(content):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if depth == -1:
            return content[:i].strip()
    return "None"


def extract_tag(text: str, tag: str) -> str:
    """MedEvalKit ``extract(text, tag, hard=True)``: the contents of every complete
    ``<tag>...</tag>`` pair, each followed by a space, stripped; ``text`` itself when there is
    none (an unclosed tag ends the search); ``""`` for empty text."""
    if not text:
        return ""
    start_tag, end_tag = f"<{tag}>", f"</{tag}>"
    found = ""
    start = text.find(start_tag)
    while start != -1:
        end = text.find(end_tag, start + len(start_tag))
        if end == -1:
            break
        found += text[start + len(start_tag) : end] + " "
        start = text.find(start_tag, end + len(end_tag))
    found = found.strip()
    return found if found else text


def parse_response(response: str) -> str:
    """MedEvalKit ``parse_response``: lower-case; ``\\boxed{}`` content when ``"boxed"`` occurs
    (``"None"`` if no complete box), else ``<answer>`` contents; then the text after the last
    occurrence of each :data:`ANSWER_PATTERNS` marker, in that order."""
    response = response.lower()
    if "boxed" in response:
        response = boxed_content(response)
    elif "<answer>" in response:
        response = extract_tag(response, "answer")
    for pattern in ANSWER_PATTERNS:
        if pattern in response:
            response = response.split(pattern)[-1]
    return response


def most_similar_index(options: list[str], target: str) -> int:
    """MedEvalKit ``find_most_similar_index``: the first option with the highest
    ``difflib.SequenceMatcher(None, option, target).ratio()``; 0 when every ratio is 0."""
    best, best_i = 0.0, 0
    for i, option in enumerate(options):
        ratio = difflib.SequenceMatcher(None, option, target).ratio()
        if ratio > best:
            best, best_i = ratio, i
    return best_i


def judge_multi_choice(choices: list[str], answer: str, response: str) -> tuple[bool, str]:
    """MedEvalKit's ``judge_multi_choice(choices, answer, response)``, with the branch taken.

    Args:
        choices: the option strings exactly as passed to MedEvalKit's function (medtune passes
            :func:`lettered` texts).
        answer: the reference (a letter for medtune's rows).
        response: the model's reply (after :func:`extract_tag` for medtune's rows).

    Returns:
        ``(right, branch)``; ``branch`` is ``"exact"`` (the parsed reply equals the answer),
        ``"letter"`` (a letter, compared through its choice), ``"option_text"`` (a choice's text)
        or ``"similarity"`` (no option named: the most similar choice was taken).
    """
    alphas = [chr(ord("a") + i) for i in range(len(choices))]
    response = response.lower()
    blocks = response.split("\n\n")
    if blocks[0] in alphas:
        response = blocks[0]
    elif blocks[-1].split(".")[0] in alphas:
        response = blocks[-1].split(".")[0]
    response = parse_response(response)
    options = [c.lower() for c in choices]
    response = response.strip().lower().replace("\n", "")
    short = response.split(".")[0].split(":")[-1]
    answer = answer.strip().lower()
    if short == answer:
        return True, "exact"
    if short in alphas:
        return options[ord(short) - ord("a")] == answer, "letter"
    if short in options:
        ok = answer in alphas and short == options[ord(answer) - ord("a")]
        return ok, "option_text"
    i = most_similar_index(options, response)
    return alphas[i] == answer or options[i] == answer, "similarity"


# ----------------------------------------------------------------------------- rows and scores


def mcq_row_fields(sample: Any) -> dict[str, Any]:
    """What a multiple-choice predictions row adds to eval's row: ``task``, ``answer_type``
    (``"MCQ"``), ``choices`` and the group keys the sample's ``meta`` holds."""
    m = sample.meta
    out = {"task": "mcq", "answer_type": "MCQ", "choices": list(m["choices"])}
    for field in MCQ_GROUP_FIELDS.values():
        if field != "dataset" and m.get(field) is not None:
            out[field] = m[field]
    return out


def is_mcq_row(row: Mapping[str, Any]) -> bool:
    """A multiple-choice predictions row: ``task == "mcq"``."""
    return row.get("task") == "mcq"


def validate_mcq_row(row: Mapping[str, Any], where: str = "<row>") -> None:
    """Check the fields the score reads.

    Raises:
        MCQError: naming ``where`` (``file:line``) and the missing or malformed field.
    """
    for key in ("id", "choices", "answer", "prediction"):
        if key not in row:
            raise MCQError(f"{where}: mcq row lacks {key!r} (needs id, question, task: mcq, "
                           "choices, answer, prediction)")  # fmt: skip
    choices = row["choices"]
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) for c in choices)
    ):
        raise MCQError(f"{where}: 'choices' must be a list of at least two option texts")
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    if not isinstance(row["answer"], str) or row["answer"].strip().upper() not in letters:
        raise MCQError(
            f"{where}: 'answer' is {row['answer']!r} (expected one of {', '.join(letters)})"
        )
    if not isinstance(row["prediction"], str):
        raise MCQError(f"{where}: 'prediction' must be a string")


def score_mcq_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """``{"right": bool, "branch": str}`` of one mcq row (:data:`MCQ_RULES`)."""
    reply = extract_tag(row["prediction"], "answer")
    right, branch = judge_multi_choice(lettered(row["choices"]), row["answer"], reply)
    return {"right": right, "branch": branch}


def _block(scored: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(scored)
    return {
        "mcq_accuracy": sum(s["right"] for s in scored) / n if n else None,
        "n_mcq": n,
        "n_mcq_no_option": sum(s["branch"] == "similarity" for s in scored),
    }


def score_mcq_rows(rows: Iterable[Mapping[str, Any]], where: str = "<rows>") -> dict[str, Any]:
    """Multiple-choice metrics of predictions rows.

    Returns:
        ``mcq_accuracy``, ``n_mcq``, ``n_mcq_no_option``, ``n_mcq_by_branch``, one
        ``by_<group>`` object per :data:`MCQ_GROUP_FIELDS` key present in any row
        (``{value: {mcq_accuracy, n_mcq, n_mcq_no_option}}``) and ``rules``.

    Raises:
        MCQError: a row that is not a well-formed mcq row (names its position).
    """
    rows = list(rows)
    scored = []
    for i, r in enumerate(rows):
        validate_mcq_row(r, f"{where} row {i}")
        scored.append(score_mcq_row(r))
    out = _block(scored)
    branches: dict[str, int] = defaultdict(int)
    for s in scored:
        branches[s["branch"]] += 1
    out["n_mcq_by_branch"] = dict(sorted(branches.items()))
    for key, field in MCQ_GROUP_FIELDS.items():
        groups: dict[str, list] = defaultdict(list)
        for r, s in zip(rows, scored):
            if r.get(field) is not None:
                groups[str(r[field])].append(s)
        if groups:
            out[key] = {g: _block(v) for g, v in sorted(groups.items())}
    out["rules"] = dict(MCQ_RULES)
    return out
