"""Ask a trained MedVLM about images: one question from the command line, or a JSONL file of them.

    medtune run generate --config default checkpoint=outputs/run1/epoch_2 \\
        image=scans/ct_001.png question="Is there a lesion in the liver?"
    medtune run generate --config default checkpoint=outputs/run1/epoch_2 \\
        prompts=questions.jsonl output=answers.jsonl
    medtune run generate --config demo                  # the tiny demo checkpoint and image

Features (all set in the config):

- **Checkpoint**: ``checkpoint`` is a medtune checkpoint folder (``output_dir/epoch_k`` of
  ``vision_finetune``: ``config.yaml`` + ``model.safetensors``), rebuilt with
  :func:`medtune.training.loading.load_from_checkpoint` (``checkpoint_overrides`` patches its saved
  config, e.g. a moved ``assets_dir``; ``llm_dtype``, ``device``).
- **One question**: ``image`` (PNG/JPEG/DICOM path, or a list of paths; null for text only) and
  ``question``; the answer is printed as the last line of stdout.
- **A file of questions**: ``prompts`` is a JSONL file, one object per line with ``question``,
  ``image`` (a path or a list of paths, relative to ``image_root`` or else to the JSONL file's
  folder; may be absent) and optionally ``id`` (default: the line number). Answers go to
  ``output`` (default ``${output_dir}/generations.jsonl``), one row per prompt: the input row's
  fields plus ``id``, ``prediction``, ``checkpoint`` and ``generation`` (the settings), flushed
  row by row. ``batch_size`` prompts are generated together. Running the same command again
  resumes: prompts already answered in ``output`` with the same checkpoint and settings are kept
  and skipped (answers from other settings are an error unless ``overwrite=true``).
- **Prompt**: the question goes through ``prompt_template`` (``{question}`` and any field of the
  row; ``short_answer: true`` appends LLaVA-1.5's "Answer with a single word or phrase.");
  ``system_prompt`` adds a system turn. The prompt is Llama-3 chat token ids with the image
  placeholders, never text re-encoded.
- **Decoding** through the one inference path (:func:`medtune.inference.answer` over
  :func:`medtune.generation.generate`, KV-cached, images at prefill only): ``temperature``
  (0 = greedy), ``top_k``, ``top_p``, ``max_new_tokens``, ``seed`` (sampling draws from a
  generator seeded per batch by (seed, batch number)), ``use_cache``; beam search with
  ``num_beams`` > 1 and ``length_penalty`` (HF/LAVIS rules, :mod:`medtune.generation.beam_search`);
  ``repetition_penalty`` (CTRL/HF) and ``min_new_tokens`` for either. Stops at ``<|eot_id|>`` /
  end of text.
- **Data-parallel**: ``medtune run --nproc_per_node N generate ...`` splits a prompts file's
  batches over N processes; rank 0 alone writes ``output``, equal to a 1-process run's.
- DICOM images: ``window`` (``[center, width]`` or a named window) as in training.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medtune.data.prompts import VQA_DIRECT, VQA_SHORT_ANSWER, format_template
from medtune.data.sample import Message, Sample
from medtune.eval.questions import resume_rows
from medtune.generation import GenerationConfig
from medtune.utils.config import cfg_get, check_keys
from medtune.utils.distributed import on_rank0
from medtune.utils.errors import UserError, run_entry
from medtune.utils.jsonl import JsonlError, append_jsonl, read_jsonl_numbered

SUPPORTS_DISTRIBUTED = True

KNOWN_KEYS = {
    "output_dir",
    "assets_dir",
    "checkpoint",
    "checkpoint_overrides",
    "device",
    "llm_dtype",
    "image",
    "question",
    "prompts",
    "image_root",
    "output",
    "prompt_template",
    "short_answer",
    "system_prompt",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "use_cache",
    "num_beams",
    "length_penalty",
    "repetition_penalty",
    "min_new_tokens",
    "batch_size",
    "window",
    "overwrite",
}


def _key(row_id: Any) -> str:
    """Ids compare as JSON (``1`` and ``"1"`` differ)."""
    return json.dumps(row_id)


class GenerateConfigError(UserError, ValueError):
    """A config or prompts file generate cannot work with; the message says what to change."""


def read_prompts(path: Path, image_root: Path | None = None) -> list[dict[str, Any]]:
    """Read a prompts JSONL file.

    Args:
        path: one JSON object per line with ``question``, optional ``image`` (path or list of
            paths) and optional ``id``.
        image_root: folder relative image paths are resolved against (default: the file's folder).

    Returns:
        The rows, each with ``id`` set (line number when absent) and ``_images`` (absolute paths).

    Raises:
        GenerateConfigError: naming the file and line of a bad row or a duplicate id.
    """
    root = image_root or path.parent
    rows, seen = [], set()
    try:
        numbered = read_jsonl_numbered(path, what="prompts", strict=True)
    except JsonlError as e:
        raise GenerateConfigError(str(e)) from None
    for n, row in numbered:
        if not isinstance(row.get("question"), str):
            raise GenerateConfigError(f"{path}:{n}: expected an object with a 'question' string")
        image = row.get("image")
        refs = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
            raise GenerateConfigError(f"{path}:{n}: 'image' must be a path or a list of paths")
        row.setdefault("id", n)
        if row["id"] in seen:
            raise GenerateConfigError(f"{path}:{n}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        row["_images"] = [str(Path(r) if Path(r).is_absolute() else root / r) for r in refs]
        rows.append(row)
    return rows


class GenerateRecipe:
    """Load a checkpoint and answer questions about images. See the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        check_keys(cfg, KNOWN_KEYS, "generate")
        self.cfg = cfg
        if not cfg.get("checkpoint"):
            raise GenerateConfigError(
                "generate: set checkpoint=<run>/epoch_<k> (a medtune checkpoint folder)"
            )
        if cfg.get("prompts") is None and cfg.get("question") is None:
            raise GenerateConfigError(
                "generate: give question=... (and image=...) or prompts=<file.jsonl>"
            )
        if cfg.get("prompts") is not None and cfg.get("question") is not None:
            raise GenerateConfigError("generate: give either question=... or prompts=..., not both")
        template = cfg.get("prompt_template") or VQA_DIRECT
        if cfg.get("short_answer", False):
            template = VQA_SHORT_ANSWER.replace("{question}", template)
        self.prompt_template = template
        self.batch_size = int(cfg.get("batch_size", 8))
        settings = GenerationConfig.from_config(
            {
                "max_new_tokens": cfg_get(cfg, "max_new_tokens", int, 64),
                "temperature": cfg_get(cfg, "temperature", float, 0.0),
                "top_k": cfg_get(cfg, "top_k", int, None),
                "top_p": cfg_get(cfg, "top_p", float, None),
                "seed": cfg_get(cfg, "seed", int, 0),
                "use_cache": cfg_get(cfg, "use_cache", bool, True),
                # beam search (medtune.generation.beam_search): 1 = greedy / sampling as above
                "num_beams": cfg_get(cfg, "num_beams", int, 1),
                "length_penalty": cfg_get(cfg, "length_penalty", float, 1.0),
                "repetition_penalty": cfg_get(cfg, "repetition_penalty", float, 1.0),
                "min_new_tokens": cfg_get(cfg, "min_new_tokens", int, 0),
            }
        )
        self.settings = settings
        self.gen = {  # recorded with every answer (and compared on resume)
            **settings.to_dict(),
            "prompt_template": template,
            "system_prompt": cfg_get(cfg, "system_prompt", str, None),
        }
        self.model = None
        self.rank, self.world_size = 0, 1

    def _log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"generate: {msg}", flush=True)

    def setup(self) -> None:
        """Load the checkpoint and the prompts."""
        from medtune.data.model_transform import medvlm_transform
        from medtune.training.loading import load_from_checkpoint
        from medtune.utils.distributed import init_process_group, resolve_device

        cfg = self.cfg
        if cfg.get("prompts") is not None:
            path = Path(cfg.prompts)
            if not path.is_file():
                raise FileNotFoundError(f"prompts file not found: {path}")
            root = Path(cfg.image_root) if cfg.get("image_root") else None
            self.rows = read_prompts(path, root)
        else:
            image = cfg.get("image")
            if OmegaConf.is_config(image):
                image = OmegaConf.to_container(image)
            refs = [] if image is None else [image] if isinstance(image, str) else list(image)
            self.rows = [
                {
                    "id": 0,
                    "question": str(cfg.question),
                    "image": image,
                    "_images": [str(r) for r in refs],
                }
            ]
        for row in self.rows:
            for p in row["_images"]:
                if not Path(p).is_file():
                    raise FileNotFoundError(f"image not found: {p} (prompt id {row['id']!r})")
        self.device = resolve_device(cfg.get("device", "auto"))
        self.rank, self.world_size = init_process_group(self.device, in_one_process=False)
        node = cfg.get("checkpoint_overrides")
        overrides = (
            OmegaConf.to_container(node, resolve=True)
            if OmegaConf.is_config(node)
            else dict(node or {})
        )
        self._log(f"loading {cfg.checkpoint}")
        self.model, self.tokenizer, _ = load_from_checkpoint(
            cfg.checkpoint, self.device, cfg.get("llm_dtype"), overrides
        )
        self.transform = medvlm_transform(
            self.model,
            self.tokenizer,
            system_prompt=cfg.get("system_prompt"),
            window=cfg.get("window"),
        )

    def answer(self, rows: list[dict[str, Any]], first_batch: int = 0) -> list[str]:
        """Answer prompt rows (:func:`medtune.inference.answer`; data-parallel under torchrun).

        Args:
            rows: rows with ``question``, ``_images`` (absolute paths) and ``id``.
            first_batch: the number of the rows' first batch in the whole run (batch seeds).

        Returns:
            One decoded answer per row, on every rank.
        """
        from medtune.inference import answer

        samples = []
        for row in rows:
            meta = {k: v for k, v in row.items() if not k.startswith("_") and k != "question"}
            text = format_template(self.prompt_template, row["question"], meta)
            samples.append(
                Sample(str(row["id"]), list(row["_images"]), [Message("user", text)], meta)
            )
        settings = self.settings
        out = answer(
            self.model,
            self.transform,
            samples,
            settings,
            tokenizer=self.tokenizer,
            batch_size=self.batch_size,
            device=self.device,
            first_batch=first_batch,
        )
        return [a.text for a in out]

    def run(self) -> list[str]:
        """Answer every prompt; print the single answer or write the output JSONL.

        Returns:
            The answers in prompt order.
        """
        cfg = self.cfg
        t0 = time.perf_counter()
        if cfg.get("prompts") is None:
            answer = self.answer(self.rows)[0]
            self._log(f"{time.perf_counter() - t0:.1f}s")
            if self.rank == 0:
                print(answer, flush=True)
            return [answer]
        out_path = Path(cfg.get("output") or Path(cfg.output_dir) / "generations.jsonl")
        done = self._answered_on_rank0(out_path)
        todo = [r for r in self.rows if _key(r["id"]) not in done]
        new: dict[str, str] = {}
        fh = None
        if self.rank == 0:
            # rewrite the kept rows (drops a line a killed run left half-written), then append
            out_path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(out_path, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        try:
            for row in done.values() if fh is not None else ():
                append_jsonl(fh, row)
            step = self.batch_size * self.world_size  # one batch per rank, then rank 0 writes
            for i in range(0, len(todo), step):
                chunk = todo[i : i + step]
                for row, ans in zip(chunk, self.answer(chunk, first_batch=i // self.batch_size)):
                    out = {k: v for k, v in row.items() if not k.startswith("_")}
                    out.update(
                        prediction=ans, checkpoint=str(cfg.checkpoint), generation=dict(self.gen)
                    )
                    if fh is not None:
                        append_jsonl(fh, out)
                    new[_key(row["id"])] = ans
        finally:
            if fh is not None:
                fh.close()
        answers = [
            new[k] if k in new else done[k]["prediction"]
            for k in (_key(r["id"]) for r in self.rows)
        ]
        kept = f", {len(done)} kept from an earlier run" if done else ""
        self._log(f"{len(new)} answers in {time.perf_counter() - t0:.1f}s{kept} -> {out_path}")
        return answers

    def _answered_on_rank0(self, out_path: Path) -> dict[str, dict[str, Any]]:
        """Rows of an earlier run's ``output`` for this run's prompts (resume), read on rank 0
        and given to every rank (:func:`medtune.utils.distributed.on_rank0`); the check is
        eval's (:func:`medtune.eval.questions.resume_rows`)."""
        if self.cfg.get("overwrite", False):
            return {}
        wanted = {_key(r["id"]) for r in self.rows}

        def read() -> dict[str, dict[str, Any]]:
            done = resume_rows(
                out_path,
                str(self.cfg.checkpoint),
                dict(self.gen),
                key=_key,
                validate=False,
                what="answers",
                error=GenerateConfigError,
            )
            return {k: row for k, row in done.items() if k in wanted}

        return on_rank0(read, GenerateConfigError)

    def cleanup(self) -> None:
        """Release the model and leave the process group."""
        from medtune.utils.distributed import destroy

        self.model = None
        if self.world_size > 1:
            destroy()


@config.parse
def recipe_main(cfg: DictConfig) -> int:
    """Entry point: ``python recipes/generate.py --config CONFIG [key=value ...]``."""
    recipe = GenerateRecipe(cfg)
    try:
        recipe.setup()
        recipe.run()
    finally:
        recipe.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(run_entry("generate", recipe_main))
