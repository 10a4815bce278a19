"""LLaVA-Med-compatible VQA metrics: LLaVA-Med v1 ``llava/eval/run_eval.py`` after its December
2023 closed-accuracy fix, over :func:`llava_med_normalize` (its
``eval_metrics/glossary.py::normalize_word``, quirks included).

The rules, and how they sit next to medtune's own, are in :mod:`medtune.eval.vqa_metrics` (which
re-exports everything here). Standard library only.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

__all__ = [
    "LLAVA_MED_ARTICLES",
    "LLAVA_MED_CONTRACTIONS",
    "LLAVA_MED_NUMBERS",
    "LLAVA_MED_PUNCT",
    "closed_llava_med",
    "hit_llava_med",
    "llava_med_normalize",
    "recall_llava_med",
]

# ---------------------------------------------------------------------------------------------
# LLaVA-Med v1 normalization (llava/eval/eval_metrics/glossary.py::normalize_word)
# ---------------------------------------------------------------------------------------------

# The VQA evaluation's punctuation list, in its order (the period is handled separately).
LLAVA_MED_PUNCT = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)  # fmt: skip
# A period not followed by a digit. LLaVA-Med writes "(?!<=\d)(\.)(?!\d)"; its "(?!<=\d)" is a
# (mistyped) negative look-ahead for the text "<=digit", which can never match at a ".", so only
# the trailing "(?!\d)" matters.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# LLaVA-Med calls period_strip.sub("", text, re.UNICODE): the flag lands in `count` (re.UNICODE
# == 32), so at most 32 periods are deleted.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

LLAVA_MED_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
LLAVA_MED_ARTICLES = ("a", "an", "the")
# The VQA evaluation's contractions table as LLaVA-Med's glossary.py holds it (its capitalised
# keys never match lowercased text; "somebody'd" -> "somebodyd" is its own oddity, kept).
LLAVA_MED_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip


def llava_med_normalize(s: Any) -> str:
    """LLaVA-Med v1's text normalization (``.lower()`` then ``normalize_word``), quirks included.

    1. Lowercase.
    2. For each mark of :data:`LLAVA_MED_PUNCT`: if the mark stands next to a space anywhere in the
       (lowercased input) text, or the text holds a comma between two digits anywhere, every
       occurrence of the mark is deleted; otherwise every occurrence becomes a space. The test is
       made on the input text, not on the text as earlier marks left it.
    3. Periods not followed by a digit are deleted, at most 32 of them (left to right).
    4. Split on whitespace; each word through the number-word table; articles dropped; the
       contractions table applied; joined with single spaces.
    5. All commas deleted.

    Args:
        s: the text (non-strings are ``str()``-ed, ``None`` is empty).

    Returns:
        The normalized text.
    """
    if s is None:
        return ""
    text = str(s).lower()
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in LLAVA_MED_PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)
    words = []
    for word in out.lower().split():
        word = LLAVA_MED_NUMBERS.get(word, word)
        if word not in LLAVA_MED_ARTICLES:
            words.append(LLAVA_MED_CONTRACTIONS.get(word, word))
    return " ".join(words).replace(",", "")


def closed_llava_med(prediction: Any, answer: Any) -> bool:
    """``closed_accuracy_llava_med`` for one row: see :data:`RULES`."""
    pred, ans = llava_med_normalize(prediction), llava_med_normalize(answer)
    return ("yes" in pred or "no" in pred) and ans in pred


def recall_llava_med(prediction: Any, answer: Any) -> float:
    """``open_recall_llava_med`` for one row (LLaVA-Med's ``calculate_f1score`` recall).

    Words are the whitespace tokens of :func:`llava_med_normalize`. tp sums, over words in both,
    their count in the *prediction*; fn sums, over answer words absent from the prediction, their
    count in the answer. Recall is tp / (tp + fn); 0 when either side has no words or tp == 0.
    """
    pred = Counter(llava_med_normalize(prediction).split())
    ans = Counter(llava_med_normalize(answer).split())
    if not pred or not ans:
        return 0.0
    tp = sum(count for word, count in pred.items() if word in ans)
    fn = sum(count for word, count in ans.items() if word not in pred)
    if tp == 0:
        return 0.0
    return tp / (tp + fn)


def hit_llava_med(prediction: Any, answer: Any) -> bool | None:
    """``open_hit_llava_med`` for one row: normalized answer is a substring of the prediction.

    Returns:
        None when the answer is empty after :func:`llava_med_normalize` (any prediction would
        hold it): the row is not scored by this metric.
    """
    ans = llava_med_normalize(answer)
    if not ans:
        return None
    return ans in llava_med_normalize(prediction)
