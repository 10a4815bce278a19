"""The judge's prompt and its strict parser.

:data:`DEFAULT_PROMPT_TEMPLATE` is versioned by :data:`PROMPT_VERSION`; :func:`prompt_sha256` of
the template is stored with every verdict; :func:`parse_verdict` accepts only RIGHT or WRONG as
the first word (anything else is UNPARSED, never right).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

RIGHT, WRONG, UNPARSED = "RIGHT", "WRONG", "UNPARSED"
VERDICTS = (RIGHT, WRONG, UNPARSED)

PROMPT_VERSION = "medtune-vqa-judge-v1"
# One user turn, in the form medcap used with Llama-3-70B-Instruct: question, our answer, the
# correct answer, and a request for one word. Fields: {question}, {prediction}, {answer}.
DEFAULT_PROMPT_TEMPLATE = (
    "You are checking answers to questions about medical images.\n"
    "\n"
    "Question: {question}\n"
    "Our answer: {prediction}\n"
    "Correct answer: {answer}\n"
    "\n"
    "Does our answer mean the same as the correct answer? Reply with only one word: RIGHT if it "
    "does, WRONG if it does not."
)


def prompt_sha256(template: str) -> str:
    """SHA-256 (hex) of the prompt template's UTF-8 text; stored with every verdict."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


DEFAULT_PROMPT_SHA256 = prompt_sha256(DEFAULT_PROMPT_TEMPLATE)


def render_prompt(template: str, row: Mapping[str, Any]) -> str:
    """Fill the template's ``{question}``, ``{prediction}`` and ``{answer}`` from a row.

    Other row fields are available by name too (``{dataset}``, ``{answer_type}``, ...).

    Args:
        template: a ``str.format`` template.
        row: a predictions row.

    Returns:
        The judge prompt (one user turn).

    Raises:
        KeyError: the template names a field the row lacks.
    """
    fields = {k: ("" if v is None else v) for k, v in row.items()}
    for key in ("question", "prediction", "answer"):
        fields[key] = str(fields.get(key, ""))
    return template.format_map(fields)


_EDGE_NON_ALNUM = re.compile(r"^[\W_]+|[\W_]+$")


def parse_verdict(text: str | None) -> str:
    """Strict verdict parser: the first word, case-insensitive, punctuation stripped.

    ``"Right."`` -> RIGHT; ``"WRONG - the right answer is X"`` -> WRONG; ``"RIGHT\\nWRONG"`` ->
    RIGHT; ``"not right"``, ``""``, ``"RIGHT/WRONG"`` -> UNPARSED. Anything else is UNPARSED,
    never RIGHT.

    Args:
        text: the judge's raw reply.

    Returns:
        ``"RIGHT"``, ``"WRONG"`` or ``"UNPARSED"``.
    """
    if not text:
        return UNPARSED
    words = text.split()
    if not words:
        return UNPARSED
    word = _EDGE_NON_ALNUM.sub("", words[0]).upper()
    return word if word in (RIGHT, WRONG) else UNPARSED
