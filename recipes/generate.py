"""Ask a trained MedVLM about images: one question from the command line, or a JSONL file of them.

    medtune run generate --config default checkpoint=outputs/run1/epoch_2 \\
        image=scans/ct_001.png question="Is there a lesion in the liver?"
    medtune run generate --config default checkpoint=outputs/run1/epoch_2 \\
        prompts=questions.jsonl output=answers.jsonl
    medtune run generate --config demo                  # the tiny demo checkpoint and image

Features (all set in the config):

- **Checkpoint**: ``checkpoint`` is a medtune checkpoint folder (``output_dir/epoch_k`` of
  ``vision_finetune``: ``config.yaml`` + ``model.safetensors``), rebuilt with
  :func:`medtune.models.loading.load_from_checkpoint` (``checkpoint_overrides`` patches its saved
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
- **Decoding** (:func:`medtune.generation.generate`, KV-cached, images at prefill only):
  ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``max_new_tokens``, ``seed`` (the sampling
  RNG), ``use_cache``. Stops at ``<|eot_id|>`` / end of text.
- DICOM images: ``window`` (``[center, width]`` or a named window) as in training.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medtune.data.errors import DataError
from medtune.data.prompts import VQA_DIRECT, VQA_SHORT_ANSWER, format_template
from medtune.data.sample import Message, Sample

SUPPORTS_DISTRIBUTED = False

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
    "batch_size",
    "window",
    "overwrite",
}


def _key(row_id: Any) -> str:
    """Ids compare as JSON (``1`` and ``"1"`` differ)."""
    return json.dumps(row_id)


class GenerateConfigError(ValueError):
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
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise GenerateConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("question"), str):
                raise GenerateConfigError(
                    f"{path}:{n}: expected an object with a 'question' string"
                )
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
        unknown = sorted(set(cfg.keys()) - KNOWN_KEYS)
        if unknown:
            raise GenerateConfigError(
                f"config key(s) not known to generate: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(KNOWN_KEYS))})"
            )
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
        self.gen = {
            "max_new_tokens": int(cfg.get("max_new_tokens", 64)),
            "temperature": float(cfg.get("temperature", 0.0)),
            "top_k": cfg.get("top_k"),
            "top_p": cfg.get("top_p"),
            "seed": int(cfg.get("seed", 0)),
            "use_cache": bool(cfg.get("use_cache", True)),
            "prompt_template": template,
            "system_prompt": cfg.get("system_prompt"),
        }
        self.model = None

    def _log(self, msg: str) -> None:
        print(f"generate: {msg}", flush=True)

    def setup(self) -> None:
        """Load the checkpoint and the prompts."""
        from medtune.data.chat import VisionChatDataset
        from medtune.models.loading import load_from_checkpoint
        from medtune.training.distributed import resolve_device

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
        self.ds = VisionChatDataset(
            [],
            self.tokenizer,
            image_token_id=self.model.image_token_id,
            tokens_per_image=self.model.tokens_per_image,
            transforms=self.model.image_transforms,
            system_prompt=cfg.get("system_prompt"),
            window=cfg.get("window"),
        )
        self.generator = torch.Generator(device=self.device).manual_seed(self.gen["seed"])

    def answer(self, rows: list[dict[str, Any]]) -> list[str]:
        """Generate answers for a batch of prompt rows.

        Args:
            rows: rows with ``question``, ``_images`` (absolute paths) and ``id``.

        Returns:
            One decoded answer per row.
        """
        from medtune.generation import generate

        samples = []
        for row in rows:
            meta = {k: v for k, v in row.items() if not k.startswith("_") and k != "question"}
            text = format_template(self.prompt_template, row["question"], meta)
            sample = Sample(str(row["id"]), list(row["_images"]), [Message("user", text)], meta)
            samples.append(self.ds.prepare(sample, 0))
        prompts = [self.ds.encode(s, add_generation_prompt=True)[0] for s in samples]
        counts = [len(s.images) for s in samples]
        images = None
        if sum(counts):
            loaded = [self.ds.load_images(s) for s in samples]
            images = {k: torch.cat([x[k] for x in loaded]).to(self.device) for k in loaded[0]}
        g = self.gen
        ids = generate(
            self.model,
            prompts,
            pad_id=self.tokenizer.pad_id,
            stop_tokens=self.tokenizer.stop_tokens,
            images=images,
            image_counts=torch.tensor(counts) if images is not None else None,
            max_new_tokens=g["max_new_tokens"],
            temperature=g["temperature"],
            top_k=g["top_k"],
            top_p=g["top_p"],
            generator=self.generator,
            use_cache=g["use_cache"],
        )
        return [self.tokenizer.decode(x).strip() for x in ids]

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
            print(answer, flush=True)
            return [answer]
        out_path = Path(cfg.get("output") or Path(cfg.output_dir) / "generations.jsonl")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        done = {} if cfg.get("overwrite", False) else self._answered(out_path)
        todo = [r for r in self.rows if _key(r["id"]) not in done]
        new: dict[str, str] = {}
        # rewrite the kept rows (drops a line a killed run left half-written), then append
        with open(out_path, "w", encoding="utf-8") as fh:
            for row in done.values():
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            for i in range(0, len(todo), self.batch_size):
                chunk = todo[i : i + self.batch_size]
                for row, ans in zip(chunk, self.answer(chunk)):
                    out = {k: v for k, v in row.items() if not k.startswith("_")}
                    out.update(
                        prediction=ans, checkpoint=str(cfg.checkpoint), generation=dict(self.gen)
                    )
                    fh.write(json.dumps(out, ensure_ascii=False) + "\n")
                    fh.flush()
                    new[_key(row["id"])] = ans
        answers = [
            new[k] if k in new else done[k]["prediction"]
            for k in (_key(r["id"]) for r in self.rows)
        ]
        kept = f", {len(done)} kept from an earlier run" if done else ""
        self._log(f"{len(new)} answers in {time.perf_counter() - t0:.1f}s{kept} -> {out_path}")
        return answers

    def _answered(self, out_path: Path) -> dict[str, dict[str, Any]]:
        """Rows of an earlier run's ``output`` for this run's prompts (resume).

        Raises:
            GenerateConfigError: the file holds answers from another checkpoint or other
                generation settings (naming the row id), so appending would mix them, or a line
                that is not JSON (naming the line).
        """
        if not out_path.is_file():
            return {}
        from medtune.eval.predictions import PredictionsError, read_predictions

        try:  # drops the half-written last line of a killed run
            rows = read_predictions(out_path, validate=False, skip_truncated_tail=True)
        except PredictionsError as e:
            raise GenerateConfigError(f"{e}; fix it or run with overwrite=true") from None
        wanted = {_key(r["id"]) for r in self.rows}
        done: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row.get("checkpoint") != str(self.cfg.checkpoint) or row.get("generation") != dict(
                self.gen
            ):
                raise GenerateConfigError(
                    f"{out_path}: id {row.get('id')!r} holds answers from another checkpoint or other "
                    f"generation settings ({row.get('checkpoint')!r}); use another output= or "
                    "overwrite=true"
                )
            if _key(row.get("id")) in wanted:
                done[_key(row["id"])] = row
        return done

    def cleanup(self) -> None:
        """Release the model."""
        self.model = None


@config.parse
def recipe_main(cfg: DictConfig) -> int:
    """Entry point: ``python recipes/generate.py --config CONFIG [key=value ...]``."""
    recipe = None
    try:
        recipe = GenerateRecipe(cfg)
        recipe.setup()
        recipe.run()
    except (FileNotFoundError, DataError, GenerateConfigError) as e:
        print(f"generate: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if recipe is not None:
            recipe.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(recipe_main())
