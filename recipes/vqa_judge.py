"""LLM-judged VQA accuracy over saved predictions, with any OpenAI-compatible server or a local Llama-3.

    medtune run vqa_judge --config openai_compatible \\
        predictions='[runs/eval/ckpt1/slake.jsonl,runs/eval/ckpt1/vqa_rad.jsonl]' \\
        judge.base_url=http://127.0.0.1:8000/v1 judge.model=meta-llama/Meta-Llama-3-70B-Instruct
    python recipes/vqa_judge.py --config recipes/configs/vqa_judge/openai_compatible.yaml ...

Features (all set in the config):

- **Input**: ``predictions``, one or more predictions JSONL files, written by ``eval`` or by
  another system: each row needs only ``id``, ``question``, ``answer``, ``answer_type`` and
  ``prediction`` (``dataset`` defaults to ``unknown``; other fields are carried through; errors
  name file and line). Rows of several files are judged together; a row is identified by
  ``checkpoint|dataset|split|id``.
- **Prompt**: by default one user turn asking for only RIGHT or WRONG given the question, our
  answer and the correct answer (the form medcap used; :data:`medtune.eval.judge.PROMPT_VERSION`).
  ``prompt.template`` replaces it (``str.format`` fields ``{question}``, ``{prediction}``,
  ``{answer}`` and any other row field). The template's SHA-256 is stored with every verdict.
- **Parser**: the verdict is the first word of the reply, case-insensitive, punctuation stripped:
  RIGHT or WRONG. Anything else is UNPARSED: retried ``retry_unparsed`` times (default once), then
  counted as UNPARSED, never as right.
- **Backends** (``judge._component_``):
  ``medtune.eval.judge.OpenAIJudge``: any OpenAI-compatible ``/v1/chat/completions`` server (vLLM,
  a hosted model): ``judge.base_url``, ``judge.model``, the API key read from the environment
  variable named by ``judge.api_key_env`` (null for no auth), temperature 0, ``concurrency``
  requests in flight, ``timeout_s`` per request, and up to ``max_retries`` retries with exponential
  backoff on 429, 5xx, connection errors, timeouts and malformed replies.
  ``medtune.eval.judge.build_local_judge``: a local torchtune Llama-3 Instruct (Meta or HF
  checkpoint through a torchtune checkpointer) through medtune's batched, KV-cached greedy
  generation; ``judge.quantize: nf4`` holds the decoder's linears in NF4 (torchao), so 70B fits one
  80 GB GPU. Another family's Instruct model judges through the config alone: its tokenizer
  ``_component_`` (e.g. ``medtune.models.llm.qwen2_5.qwen2_5_tokenizer``), ``judge.model:
  {_component_: medtune.models.llm.llm_from_hf_config, config_path: .../config.json}`` and the
  checkpointer's ``model_type`` (``LLAMA2``, ``MISTRAL``, ``QWEN2``). Under ``medtune run --nproc_per_node N`` (config ``llama3_70b_sharded``) the decoder
  is sharded with FSDP2 over the N processes (NCCL on CUDA, one GPU each; gloo on CPU), built on
  the meta device and filled from the checkpoint read by rank 0 only. Rank 0 runs the judge loop
  and broadcasts each batch of prompts; the other ranks run the same batches (FSDP needs every
  rank in every forward) and, at every decode step, take rank 0's greedy tokens, so all ranks
  stop together. Only rank 0 reads or writes ``verdicts.jsonl`` and the summaries.
- **Resumable**: ``output_dir/verdicts.jsonl`` is an append-only cache keyed by (judge name,
  prompt hash, row), flushed after every verdict. A killed run started again judges only what is
  missing: no verdict lost, none duplicated. A row whose prediction changed is judged again.
  Another judge or template in the same ``output_dir`` adds its own verdicts beside the others.
- **Output** in ``output_dir``: ``verdicts.jsonl`` (one row per prediction: ``id``, ``dataset``,
  ``answer_type``, ``verdict``, ``raw``, ``judge``, ``prompt_sha256``, ...), ``summary.json``
  (``judged_accuracy`` = RIGHT / (RIGHT + WRONG), ``n_right``, ``n_wrong``, ``n_unparsed``, the same
  per dataset, answer type and checkpoint, and agreement (percent, Cohen's kappa) with
  ``closed_accuracy_strict`` on CLOSED rows) and ``summary.md`` (the same as a markdown table).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config

from medtune.eval.judge import (
    DEFAULT_PROMPT_TEMPLATE,
    JudgeConfigError,
    OpenAIJudge,
    VerdictStore,
    run_judge,
    summarize,
    summary_markdown,
)
from medtune.eval.predictions import read_predictions
from medtune.utils.config import cfg_get, check_keys, non_negative, positive
from medtune.utils.errors import run_entry
from medtune.utils.jsonl import write_text_atomic

KNOWN_KEYS = {
    "output_dir",
    "predictions",
    "judge",
    "prompt",
    "batch_size",
    "retry_unparsed",
    "verdicts_file",
    "summary_file",
    "summary_markdown",
    "model_dir",  # interpolated into the judge's paths by the shipped configs
}
"""The top-level keys this recipe reads; any other is refused with a close-match hint."""

# The local judge runs sharded under torchrun (llama3_70b_sharded); the openai backend refuses it.
SUPPORTS_DISTRIBUTED = True


class VQAJudgeRecipe:
    """Judge predictions JSONL files with an LLM; see the module docstring for the features.

    Args:
        cfg: the resolved config.
    """

    def __init__(self, cfg: DictConfig):
        check_keys(cfg, KNOWN_KEYS, "vqa_judge")
        self.cfg = cfg
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.output_dir = Path(cfg.output_dir)
        self.rows: list[dict[str, Any]] = []
        self.files: list[str] = []

    def _log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"vqa_judge: {msg}", flush=True)

    def setup(self) -> None:
        """Read and validate the predictions, build the judge backend."""
        cfg = self.cfg
        files = cfg.predictions
        if isinstance(files, str):
            files = [files]
        elif isinstance(files, ListConfig):
            files = list(files)
        if not files:
            raise JudgeConfigError("predictions is empty: give predictions='[path/to/preds.jsonl]'")
        self.files = [str(f) for f in files]
        for f in self.files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"predictions file not found: {f}")
            self.rows.extend(read_predictions(f))
        self.template = cfg.get("prompt", {}).get("template") or DEFAULT_PROMPT_TEMPLATE
        self.backend = config.instantiate(cfg.judge)
        if self.world_size > 1 and isinstance(self.backend, OpenAIJudge):
            raise JudgeConfigError(
                "the openai judge backend runs in one process: drop --nproc_per_node"
            )
        self._log(
            f"{len(self.rows)} predictions from {len(self.files)} file(s); "
            f"judge {self.backend.name}"
        )
        shards = getattr(self.backend, "generate_texts", None)
        if self.world_size > 1 and getattr(shards, "total_numel", 0):
            print(
                f"vqa_judge: rank {self.rank}/{self.world_size} holds {shards.local_numel:,} of "
                f"{shards.total_numel:,} judge parameters (FSDP2 shards)",
                flush=True,
            )

    def run(self) -> dict[str, Any]:
        """Judge every row (reusing cached verdicts), then write the summaries.

        Returns:
            The summary dict (also written to ``summary.json``); ``{}`` on ranks other than 0.
        """
        cfg = self.cfg
        verdicts_path = Path(
            cfg_get(cfg, "verdicts_file", str, None) or self.output_dir / "verdicts.jsonl"
        )
        if self.rank != 0:
            # Sharded local judge: this rank only takes part in rank 0's generate calls; it never
            # opens verdicts.jsonl or writes a summary.
            n = self.backend.follow()
            print(f"vqa_judge: rank {self.rank}: followed {n} batch(es) of rank 0", flush=True)
            return {}
        with VerdictStore(verdicts_path) as store:
            verdicts = run_judge(
                self.rows,
                self.backend,
                store,
                template=self.template,
                batch_size=cfg_get(cfg, "batch_size", int, 32, check=positive()),
                retry_unparsed=cfg_get(cfg, "retry_unparsed", int, 1, check=non_negative()),
                log=self._log,
            )
        summary = summarize(
            self.rows, verdicts, self.backend.name, self.template, predictions_files=self.files
        )
        summary["config"] = OmegaConf.to_container(cfg, resolve=True)
        summary_path = Path(
            cfg_get(cfg, "summary_file", str, None) or self.output_dir / "summary.json"
        )
        markdown_path = Path(
            cfg_get(cfg, "summary_markdown", str, None) or self.output_dir / "summary.md"
        )
        write_text_atomic(summary_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        markdown = summary_markdown(summary)
        write_text_atomic(markdown_path, markdown)
        self._log(f"wrote {verdicts_path}, {summary_path}, {markdown_path}")
        print(markdown, flush=True)
        return summary

    def cleanup(self) -> None:
        """Release the backend: nothing for HTTP; the sharded local judge stops its followers
        (rank 0), meets them at a barrier and destroys the process group."""
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()


@config.parse
def recipe_main(cfg: DictConfig) -> int:
    """Entry point: ``python recipes/vqa_judge.py --config CONFIG [key=value ...]``."""
    recipe = VQAJudgeRecipe(cfg)
    try:
        recipe.setup()
        recipe.run()
    finally:
        if hasattr(recipe, "backend"):
            recipe.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(run_entry("vqa_judge", recipe_main))
