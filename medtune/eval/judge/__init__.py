"""LLM-as-judge for VQA predictions.

Pieces, each usable alone:

- :mod:`~medtune.eval.judge.prompt`: :data:`DEFAULT_PROMPT_TEMPLATE` (versioned by
  :data:`PROMPT_VERSION`), :func:`render_prompt`, :func:`prompt_sha256` (stored with every
  verdict) and the strict parser :func:`parse_verdict` (first word RIGHT or WRONG, else UNPARSED);
- :mod:`~medtune.eval.judge.backends`: the interface (:class:`JudgeBackend`: ``name`` and
  ``judge(prompts) -> raw texts``) and :class:`LocalJudge` (a local Llama-3 through
  :func:`medtune.inference.answer`; :func:`build_local_judge` is its config entry point);
  :mod:`~medtune.eval.judge.sharded`: the same model sharded with FSDP2 under torchrun;
  :mod:`~medtune.eval.judge.http`: :class:`OpenAIJudge`, any OpenAI-compatible server;
- :mod:`~medtune.eval.judge.store`: :class:`VerdictStore`, an append-only ``verdicts.jsonl`` keyed
  by (judge name, prompt hash, row key), flushed per verdict, so a killed run resumes with no
  verdict lost or duplicated;
- :mod:`~medtune.eval.judge.loop`: :func:`run_judge`;
- :mod:`~medtune.eval.judge.summary`: :func:`summarize`, :func:`cohen_kappa` and
  :func:`summary_markdown`.

No torch at import time.
"""

from __future__ import annotations

from medtune.eval.judge.backends import (
    JudgeBackend,
    LocalJudge,
    build_local_generate_fn,
    build_local_judge,
)
from medtune.eval.judge.http import JudgeConfigError, JudgeHTTPError, OpenAIJudge
from medtune.eval.judge.loop import run_judge
from medtune.eval.judge.prompt import (
    DEFAULT_PROMPT_SHA256,
    DEFAULT_PROMPT_TEMPLATE,
    PROMPT_VERSION,
    RIGHT,
    UNPARSED,
    VERDICTS,
    WRONG,
    parse_verdict,
    prompt_sha256,
    render_prompt,
)
from medtune.eval.judge.sharded import ShardedGenerate, build_sharded_generate_fn
from medtune.eval.judge.store import VerdictsFileError, VerdictStore, row_key
from medtune.eval.judge.summary import SUMMARY_RULES, cohen_kappa, summarize, summary_markdown

__all__ = [
    "DEFAULT_PROMPT_SHA256",
    "DEFAULT_PROMPT_TEMPLATE",
    "PROMPT_VERSION",
    "RIGHT",
    "SUMMARY_RULES",
    "UNPARSED",
    "VERDICTS",
    "WRONG",
    "JudgeBackend",
    "JudgeConfigError",
    "JudgeHTTPError",
    "LocalJudge",
    "OpenAIJudge",
    "ShardedGenerate",
    "VerdictStore",
    "VerdictsFileError",
    "build_local_generate_fn",
    "build_local_judge",
    "build_sharded_generate_fn",
    "cohen_kappa",
    "parse_verdict",
    "prompt_sha256",
    "render_prompt",
    "row_key",
    "run_judge",
    "summarize",
    "summary_markdown",
]
