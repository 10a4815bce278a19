"""The judge's summary: judged accuracy overall and per group, agreement with the strict rule
(percent and Cohen's kappa), and its markdown rendering."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from medtune.eval.judge.prompt import (
    DEFAULT_PROMPT_TEMPLATE,
    PROMPT_VERSION,
    RIGHT,
    UNPARSED,
    VERDICTS,
    WRONG,
    prompt_sha256,
)
from medtune.eval.vqa_metrics import answer_type_of, closed_strict, normalize


def cohen_kappa(pairs: Iterable[tuple[bool, bool]]) -> dict[str, Any]:
    """Agreement of two binary raters.

    Args:
        pairs: (rater A says right, rater B says right) per item.

    Returns:
        ``n``, ``agreement_percent`` (100 * observed agreement), ``cohen_kappa`` ((po - pe) /
        (1 - pe); None when pe == 1, i.e. both raters constant and equal, or n == 0) and the four
        cell counts ``both_right``, ``both_wrong``, ``a_right_b_wrong``, ``a_wrong_b_right``.
    """
    cells = {"both_right": 0, "both_wrong": 0, "a_right_b_wrong": 0, "a_wrong_b_right": 0}
    for a, b in pairs:
        if a and b:
            cells["both_right"] += 1
        elif not a and not b:
            cells["both_wrong"] += 1
        elif a:
            cells["a_right_b_wrong"] += 1
        else:
            cells["a_wrong_b_right"] += 1
    n = sum(cells.values())
    out: dict[str, Any] = {"n": n, "agreement_percent": None, "cohen_kappa": None}
    if n:
        po = (cells["both_right"] + cells["both_wrong"]) / n
        pa = (cells["both_right"] + cells["a_right_b_wrong"]) / n
        pb = (cells["both_right"] + cells["a_wrong_b_right"]) / n
        pe = pa * pb + (1 - pa) * (1 - pb)
        out["agreement_percent"] = 100.0 * po
        out["cohen_kappa"] = None if pe >= 1.0 else (po - pe) / (1 - pe)
    out.update(cells)
    return out


def _block(pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> dict[str, Any]:
    counts = dict.fromkeys(VERDICTS, 0)
    agree = []
    for row, verdict in pairs:
        v = verdict["verdict"]
        counts[v] += 1
        if v != UNPARSED and answer_type_of(row) == "CLOSED" and normalize(row.get("answer")):
            agree.append((v == RIGHT, closed_strict(row.get("prediction"), row.get("answer"))))
    judged = counts[RIGHT] + counts[WRONG]
    kappa = cohen_kappa(agree)
    return {
        "n": len(pairs),
        "judged_accuracy": counts[RIGHT] / judged if judged else None,
        "n_right": counts[RIGHT],
        "n_wrong": counts[WRONG],
        "n_unparsed": counts[UNPARSED],
        "agreement_with_closed_accuracy_strict": {
            "n": kappa["n"],
            "agreement_percent": kappa["agreement_percent"],
            "cohen_kappa": kappa["cohen_kappa"],
            "both_right": kappa["both_right"],
            "both_wrong": kappa["both_wrong"],
            "judge_right_strict_wrong": kappa["a_right_b_wrong"],
            "judge_wrong_strict_right": kappa["a_wrong_b_right"],
        },
    }


SUMMARY_RULES = {
    "judged_accuracy": "n_right / (n_right + n_wrong); UNPARSED verdicts are excluded from the "
    "denominator and never counted as right",
    "verdict": "first word of the judge's reply, case-insensitive, punctuation stripped: RIGHT or "
    "WRONG; anything else UNPARSED (retried once)",
    "agreement_with_closed_accuracy_strict": "CLOSED rows with a non-empty answer and a RIGHT/WRONG "
    "verdict: percent agreement and Cohen's kappa between the judge and closed_accuracy_strict",
}


def summarize(
    rows: Sequence[Mapping[str, Any]],
    verdicts: Sequence[Mapping[str, Any]],
    judge_name: str,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    predictions_files: Sequence[str] = (),
) -> dict[str, Any]:
    """``summary.json`` content: overall, per dataset, per answer type and per checkpoint.

    Args:
        rows: predictions rows.
        verdicts: their verdict rows (same order), from :func:`run_judge`.
        judge_name: the backend's name.
        template: the prompt template used.
        predictions_files: input files, recorded for provenance.

    Returns:
        A JSON-able dict (see :data:`SUMMARY_RULES`).
    """
    pairs = list(zip(rows, verdicts))
    out: dict[str, Any] = {
        "judge": judge_name,
        "prompt_sha256": prompt_sha256(template),
        "prompt_version": PROMPT_VERSION if template == DEFAULT_PROMPT_TEMPLATE else None,
        "predictions": list(predictions_files),
    }
    out.update(_block(pairs))
    for key, get in (
        ("by_dataset", lambda r: str(r.get("dataset"))),
        ("by_answer_type", lambda r: answer_type_of(r) or "UNKNOWN"),
        ("by_checkpoint", lambda r: str(r.get("checkpoint"))),
    ):
        groups: dict[str, list] = {}
        for row, v in pairs:
            groups.setdefault(get(row), []).append((row, v))
        out[key] = {g: _block(groups[g]) for g in sorted(groups)}
    out["rules"] = dict(SUMMARY_RULES)
    return out


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{100 * x:.1f}" if pct else f"{x:.3f}"
    return str(x)


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """A markdown rendering of :func:`summarize`'s output (one table, all groups)."""
    lines = [
        "# VQA judge summary",
        "",
        f"- judge: `{summary['judge']}`",
        f"- prompt sha256: `{summary['prompt_sha256']}`"
        + (f" ({summary['prompt_version']})" if summary.get("prompt_version") else ""),
        f"- predictions: {', '.join(f'`{p}`' for p in summary.get('predictions', [])) or '-'}",
        "",
        "judged accuracy = RIGHT / (RIGHT + WRONG), in percent; agreement and Cohen's kappa are "
        "with `closed_accuracy_strict` on CLOSED rows.",
        "",
        "| group | n | right | wrong | unparsed | judged accuracy (%) | agreement (%) | kappa |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def line(label: str, b: Mapping[str, Any]) -> str:
        agr = b["agreement_with_closed_accuracy_strict"]
        pct = agr["agreement_percent"]
        return (
            f"| {label} | {b['n']} | {b['n_right']} | {b['n_wrong']} | {b['n_unparsed']} | "
            f"{_fmt(b['judged_accuracy'], pct=True)} | {'-' if pct is None else f'{pct:.1f}'} | "
            f"{_fmt(agr['cohen_kappa'])} |"
        )

    lines.append(line("all", summary))
    for key, label in (
        ("by_dataset", "dataset"),
        ("by_answer_type", "answer type"),
        ("by_checkpoint", "checkpoint"),
    ):
        for group, block in summary.get(key, {}).items():
            lines.append(line(f"{label}: {group}", block))
    return "\n".join(lines) + "\n"
