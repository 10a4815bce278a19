"""The judge loop: render prompts, reuse cached verdicts, ask the backend, retry UNPARSED."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from medtune.eval.judge.backends import JudgeBackend
from medtune.eval.judge.prompt import (
    DEFAULT_PROMPT_SHA256,
    DEFAULT_PROMPT_TEMPLATE,
    PROMPT_VERSION,
    UNPARSED,
    parse_verdict,
    prompt_sha256,
    render_prompt,
)
from medtune.eval.judge.store import VerdictStore, input_sha256, row_key
from medtune.eval.predictions import PredictionsError
from medtune.eval.vqa_metrics import answer_type_of


def _verdict_row(
    row: Mapping[str, Any],
    key: str,
    judge_name: str,
    prompt_hash: str,
    prompt: str,
    raw: str,
    verdict: str,
    attempts: int,
) -> dict[str, Any]:
    return {
        "id": row.get("id"),
        "dataset": row.get("dataset"),
        "split": row.get("split"),
        "checkpoint": row.get("checkpoint"),
        "answer_type": answer_type_of(row),
        "verdict": verdict,
        "raw": raw,
        "judge": judge_name,
        "prompt_sha256": prompt_hash,
        "prompt_version": PROMPT_VERSION if prompt_hash == DEFAULT_PROMPT_SHA256 else None,
        "key": key,
        "input_sha256": input_sha256(prompt),
        "attempts": attempts,
    }


def run_judge(
    rows: Sequence[Mapping[str, Any]],
    backend: JudgeBackend,
    store: VerdictStore,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    batch_size: int = 32,
    retry_unparsed: int = 1,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Judge every row, reusing cached verdicts; return one verdict row per input row.

    A cached verdict is reused when its (judge, prompt hash, row key) matches and the rendered
    prompt is unchanged (``input_sha256``: the prediction or answer did not change). UNPARSED
    replies are sent again ``retry_unparsed`` times, then counted as UNPARSED.

    Args:
        rows: predictions rows (the :mod:`medtune.eval.predictions` schema).
        backend: the judge.
        store: the verdict cache (verdicts are appended and flushed one by one).
        template: the prompt template.
        batch_size: prompts per ``backend.judge`` call.
        retry_unparsed: how many times an UNPARSED reply is retried.
        log: progress messages (e.g. ``print``); None for silence.

    Returns:
        The verdict rows, in the order of ``rows``.

    Raises:
        PredictionsError: two rows share a row key (see :func:`row_key`).
    """
    prompt_hash = prompt_sha256(template)
    name = backend.name
    keys = [row_key(r) for r in rows]
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            raise PredictionsError(f"duplicate predictions row (checkpoint|dataset|split|id): {k}")
        seen.add(k)
    prompts = [render_prompt(template, r) for r in rows]
    pending = []
    for i, (k, p) in enumerate(zip(keys, prompts)):
        cached = store.get(name, prompt_hash, k)
        if cached is None or cached.get("input_sha256") != input_sha256(p):
            pending.append(i)
    if log:
        log(
            f"judge {name}: {len(rows)} rows, {len(rows) - len(pending)} cached, "
            f"{len(pending)} to judge"
        )
    done = 0
    for start in range(0, len(pending), max(1, batch_size)):
        batch = pending[start : start + max(1, batch_size)]
        raws = list(backend.judge([prompts[i] for i in batch]))
        if len(raws) != len(batch):
            raise RuntimeError(f"judge {name} returned {len(raws)} replies for {len(batch)}")
        verdicts = [parse_verdict(r) for r in raws]
        attempts = [1] * len(batch)
        for _ in range(retry_unparsed):
            again = [j for j, v in enumerate(verdicts) if v == UNPARSED]
            if not again:
                break
            raws2 = backend.judge([prompts[batch[j]] for j in again])
            for j, raw in zip(again, raws2):
                raws[j], verdicts[j] = raw, parse_verdict(raw)
                attempts[j] += 1
        for j, i in enumerate(batch):
            store.append(
                _verdict_row(
                    rows[i],
                    keys[i],
                    name,
                    prompt_hash,
                    prompts[i],
                    raws[j],
                    verdicts[j],
                    attempts[j],
                )
            )
        done += len(batch)
        if log:
            log(f"judge {name}: {done}/{len(pending)} judged")
    store.compact()
    return [store.get(name, prompt_hash, k) for k in keys]  # type: ignore[misc]
