"""Evaluate trained MedVLM checkpoints on medical VQA and caption benchmarks: one honest table.

    medtune run eval --config slake_vqa_rad \\
        checkpoints='[outputs/run1/epoch_2,outputs/run2/epoch_4]' data_dir=/data
    medtune run eval --config demo                       # the tiny demo checkpoint, synthetic SLAKE
    python recipes/eval.py --config recipes/configs/eval/slake.yaml checkpoints='[...]'

Features (all set in the config):

- **Checkpoints**: ``checkpoints`` is a list of medtune checkpoint folders (``output_dir/epoch_k``
  of ``vision_finetune``, holding ``config.yaml`` + ``model.safetensors``), or a mapping
  ``name: path``. Each is rebuilt with :func:`medtune.training.loading.load_from_checkpoint`
  (``checkpoint_overrides`` patches the saved config, e.g. a moved ``assets_dir``; ``llm_dtype``
  and ``device`` as in training). Names are derived from the paths, readable and unique
  (``runs/a/epoch_2`` -> ``a_epoch_2``). Pick checkpoints on validation, never on test.
- **Datasets**: ``datasets`` maps a name to any medtune reader ``_component_`` (default SLAKE
  English test and VQA-RAD test); split, language, answer types, modalities, ... are the reader's
  own arguments (``datasets.slake.answer_types='[CLOSED]'``); ``datasets.<name>=null`` drops one.
  ``limit`` keeps the first N samples
  of each (smoke runs). A dataset whose samples are captions (``caption_json``: a ``caption`` and
  no ``answer_type`` in ``meta``, or ``meta.task == "caption"``) is scored as captions; force it
  with ``tasks.<name>: caption`` (or ``vqa``).
- **Generation**: batched (``batch_size``), KV-cached greedy decoding through the one inference
  path (:func:`medtune.inference.answer`), ``max_new_tokens`` for VQA and
  ``caption_max_new_tokens`` for captions. Prompts are token ids in the Llama-3 chat format with
  the image placeholders; ``system_prompt`` adds a system turn.
- **Prompt modes** (``prompt_mode``):
  ``direct``: the question through ``prompt_template`` (a format string with ``{question}`` and
  any ``meta`` field; default ``"{question}"`` = ``VQA_DIRECT``); ``short_answer: true`` appends
  LLaVA-1.5's "Answer with a single word or phrase." (``VQA_SHORT_ANSWER``).
  ``describe_then_answer`` (medcap's two steps): first the model describes each image
  (``describe_prompt``, ``describe_max_new_tokens``), once per distinct image, cached in
  ``<ckpt>/<dataset>/descriptions.jsonl``; then it answers the question with that description in
  context as text. ``describe_layout: conversation`` (default) continues the chat
  (user: image + describe prompt, assistant: description, user: question);
  ``describe_layout: text`` asks without the image, the description inlined by
  ``describe_context_template`` (``{description}``, ``{question}``). Caption datasets always use
  the reader's instruction, as is.
- **Outputs** in ``output_dir``: ``<ckpt>/<dataset>/predictions.jsonl`` (DESIGN §3 schema, one row
  per question: id, dataset, split, image, question, answer, answer_type, prediction, checkpoint
  (the path), generation (every setting that shapes the output), language, modality,
  content_type, prompt, and description in describe_then_answer), ``<ckpt>/<dataset>/metrics.json``
  (:func:`medtune.eval.vqa_metrics.score_predictions`, the same JSON as ``medtune score``; captions:
  :func:`medtune.eval.caption_metrics.caption_scores`, BLEU-1..4, METEOR, ROUGE-L, CIDEr), and one
  table across all pairs, ``results.md`` and ``results.csv`` (rows: checkpoint x dataset; columns:
  n = scored questions, ``n_closed``, ``n_open`` and every named metric, as fractions), printed at
  the end, with ``checkpoints.json`` (name -> path).
- **Data-parallel**: ``medtune run --nproc_per_node N eval ...`` splits the questions over N
  processes (batch k on rank k % N; each rank loads the checkpoint) and gathers the answers;
  rank 0 alone writes files, and they equal a 1-process run's (same ids, predictions, order).
- **Question-only baseline**: ``blank_images: true`` replaces every image with a blank one.
- **Resume**: rows already in ``predictions.jsonl`` (by id) are not generated again; a truncated
  last line (a killed run) is dropped and regenerated. Rows written with other generation settings
  stop the run (``overwrite: true`` starts the pair afresh instead). Descriptions resume the same
  way. A pair whose predictions are complete loads no model.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medtune.data.prompts import VQA_DIRECT, VQA_SHORT_ANSWER
from medtune.data.sample import Sample
from medtune.eval.questions import (
    EvalConfigError,
    caption_sample,
    describe_sample,
    image_key,
    is_caption_dataset,
    prediction_row,
    question_sample,
    read_descriptions,
    resume_rows,
)
from medtune.eval.report import checkpoint_names, csv_table, markdown_table, results_table
from medtune.eval.vqa_metrics import score_predictions
from medtune.utils.errors import UserError, run_entry
from medtune.utils.jsonl import append_jsonl, write_text_atomic

SUPPORTS_DISTRIBUTED = True

KNOWN_KEYS = {
    "output_dir",
    "assets_dir",
    "data_dir",
    "checkpoints",
    "checkpoint_overrides",
    "datasets",
    "tasks",
    "limit",
    "device",
    "llm_dtype",
    "batch_size",
    "max_new_tokens",
    "caption_max_new_tokens",
    "seed",
    "prompt_mode",
    "prompt_template",
    "short_answer",
    "system_prompt",
    "describe_prompt",
    "describe_max_new_tokens",
    "describe_layout",
    "describe_context_template",
    "window",
    "blank_images",
    "overwrite",
    "caption_meteor",
}
PROMPT_MODES = ("direct", "describe_then_answer")
DESCRIBE_LAYOUTS = ("conversation", "text")
DEFAULT_DESCRIBE_PROMPT = "Describe the medical image."
DEFAULT_CONTEXT_TEMPLATE = "Image description: {description}\n\n{question}"

__all__ = ["EvalConfigError", "EvalRecipe", "checkpoint_names", "recipe_main"]


class EvalRecipe:
    """Checkpoints x datasets -> predictions JSONL, metrics JSON, one table. See the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        self.model = None
        self.rank, self.world_size = 0, 1
        unknown = sorted(set(cfg.keys()) - KNOWN_KEYS)
        if unknown:
            raise EvalConfigError(
                f"config key(s) not known to eval: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(KNOWN_KEYS))})"
            )
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.batch_size = int(cfg.get("batch_size", 8))
        self.max_new_tokens = int(cfg.get("max_new_tokens", 32))
        self.caption_max_new_tokens = int(cfg.get("caption_max_new_tokens", 128))
        self.prompt_mode = cfg.get("prompt_mode", "direct")
        if self.prompt_mode not in PROMPT_MODES:
            raise EvalConfigError(
                f"prompt_mode={self.prompt_mode!r}: expected one of {', '.join(PROMPT_MODES)}"
            )
        template = cfg.get("prompt_template") or VQA_DIRECT
        if cfg.get("short_answer", False):
            template = VQA_SHORT_ANSWER.replace("{question}", template)
        self.prompt_template = template
        self.system_prompt = cfg.get("system_prompt")
        self.describe_prompt = cfg.get("describe_prompt") or DEFAULT_DESCRIBE_PROMPT
        self.describe_max_new_tokens = int(cfg.get("describe_max_new_tokens", 64))
        self.describe_layout = cfg.get("describe_layout", "conversation")
        if self.describe_layout not in DESCRIBE_LAYOUTS:
            raise EvalConfigError(
                f"describe_layout={self.describe_layout!r}: expected one of {', '.join(DESCRIBE_LAYOUTS)}"
            )
        self.context_template = cfg.get("describe_context_template") or DEFAULT_CONTEXT_TEMPLATE
        self.seed = int(cfg.get("seed", 0))
        self.blank_images = bool(cfg.get("blank_images", False))
        self.overwrite = bool(cfg.get("overwrite", False))
        self.limit = cfg.get("limit")

    def _log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"eval: {msg}", flush=True)

    def _on_rank0(self, fn):
        """``fn()`` on rank 0, its result (or its user error) on every rank."""
        if self.world_size == 1:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None, None]
        if self.rank == 0:
            try:
                box[0] = fn()
            except UserError as e:
                box[1] = str(e)
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise EvalConfigError(box[1])
        return box[0]

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Join the process group (torchrun), resolve checkpoints and read every dataset once."""
        from medtune.training.distributed import init_distributed, resolve_device

        cfg = self.cfg
        ckpts = cfg.get("checkpoints")
        if not ckpts:
            raise EvalConfigError(
                "eval: no checkpoints given (checkpoints='[run1/epoch_2,run2/epoch_4]')"
            )
        if OmegaConf.is_dict(ckpts):
            self.checkpoints = [(str(k), str(v)) for k, v in ckpts.items()]
        else:
            paths = [str(p) for p in (ckpts if OmegaConf.is_list(ckpts) else [ckpts])]
            self.checkpoints = list(zip(checkpoint_names(paths), paths))
        for _name, path in self.checkpoints:
            if not (Path(path) / "config.yaml").is_file():
                epochs = (
                    sorted(p.name for p in Path(path).glob("epoch_*"))
                    if Path(path).is_dir()
                    else []
                )
                hint = f" (it holds {', '.join(epochs)}: name one of them)" if epochs else ""
                raise FileNotFoundError(
                    f"checkpoint {path}: no config.yaml; expected a medtune checkpoint "
                    f"folder such as output_dir/epoch_0{hint}"
                )
        self.device = resolve_device(cfg.get("device", "auto"))
        self.rank, self.world_size = init_distributed(self.device)
        tasks = dict(cfg.get("tasks") or {})
        self.datasets: dict[str, tuple[str, list[Sample]]] = {}
        for name, node in (cfg.get("datasets") or {}).items():
            if node is None or node.get("_component_") is None:
                continue  # datasets.<name>=null drops a dataset (torchtune sets its _component_ to null)
            node = OmegaConf.to_container(node, resolve=True)
            task = node.pop("task", None) or tasks.get(name)
            samples = list(config.instantiate(OmegaConf.create(node)))
            if self.limit is not None:
                samples = samples[: int(self.limit)]
            if task is None:
                task = "caption" if is_caption_dataset(samples) else "vqa"
            if task not in ("vqa", "caption"):
                raise EvalConfigError(f"datasets.{name}: task {task!r} (expected vqa or caption)")
            ids = [s.id for s in samples]
            if len(set(ids)) != len(ids):
                raise EvalConfigError(
                    f"datasets.{name}: sample ids are not unique (resume keys on them)"
                )
            self.datasets[str(name)] = (task, samples)
            self._log(f"dataset {name}: {len(samples)} samples ({task})")
        if not self.datasets:
            raise EvalConfigError("eval: no datasets")
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.world_size > 1:
            self._log(f"{self.world_size} processes: the questions are split across them")

    # ------------------------------------------------------------------ settings

    def generation_settings(self, task: str) -> dict[str, Any]:
        """Everything that shapes a prediction, stored with every row (and checked on resume)."""
        from medtune.generation import GenerationConfig

        max_new = self.caption_max_new_tokens if task == "caption" else self.max_new_tokens
        gen = GenerationConfig(max_new_tokens=max_new, temperature=0.0, seed=self.seed).to_dict()
        gen["system_prompt"] = self.system_prompt
        if self.blank_images:
            gen["blank_images"] = True
        if task == "caption":
            gen["prompt_mode"] = "caption"
            return gen
        gen["prompt_mode"] = self.prompt_mode
        gen["prompt_template"] = self.prompt_template
        if self.prompt_mode == "describe_then_answer":
            gen.update(
                describe_prompt=self.describe_prompt,
                describe_max_new_tokens=self.describe_max_new_tokens,
                describe_layout=self.describe_layout,
            )
            if self.describe_layout == "text":
                gen["describe_context_template"] = self.context_template
        return gen

    # ------------------------------------------------------------------ run

    def run(self) -> list[dict[str, Any]]:
        """Evaluate every (checkpoint, dataset) pair and write the combined table.

        Returns:
            One dict per pair: ``checkpoint``, ``path``, ``dataset``, ``task``, ``metrics``.
        """
        t0 = time.perf_counter()
        results = []
        for ckpt_name, ckpt_path in self.checkpoints:
            self.model = None
            for ds_name, (task, samples) in self.datasets.items():
                metrics = self.evaluate_pair(ckpt_name, ckpt_path, ds_name, task, samples)
                results.append(
                    {
                        "checkpoint": ckpt_name,
                        "path": ckpt_path,
                        "dataset": ds_name,
                        "task": task,
                        "metrics": metrics,
                    }
                )
            self.model = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if self.rank != 0:
            return results
        cols, values = results_table(results)
        md = markdown_table(cols, values)
        write_text_atomic(self.output_dir / "results.md", md)
        write_text_atomic(self.output_dir / "results.csv", csv_table(cols, values))
        write_text_atomic(
            self.output_dir / "checkpoints.json",
            json.dumps(dict(self.checkpoints), indent=2) + "\n",
        )
        self._log(
            f"{len(results)} checkpoint x dataset pairs in {time.perf_counter() - t0:.0f}s; wrote "
            f"{self.output_dir / 'results.md'} and results.csv"
        )
        print(md, flush=True)
        return results

    def _ensure_model(self, ckpt_path: str) -> None:
        if self.model is not None:
            return
        from medtune.data.transform import medvlm_transform
        from medtune.training.loading import load_from_checkpoint

        node = self.cfg.get("checkpoint_overrides")
        overrides = (
            OmegaConf.to_container(node, resolve=True)
            if OmegaConf.is_config(node)
            else dict(node or {})
        )
        self._log(f"loading {ckpt_path}")
        self.model, self.tokenizer, _ = load_from_checkpoint(
            ckpt_path, self.device, self.cfg.get("llm_dtype"), overrides
        )
        self.transform = medvlm_transform(
            self.model,
            self.tokenizer,
            system_prompt=self.system_prompt,
            window=self.cfg.get("window"),
            blank_images=self.blank_images,
        )

    def _answers(self, samples: list[Sample], max_new_tokens: int):
        """Answer already-templated samples (every rank; data-parallel under torchrun), yielding
        ``(chunk, texts)`` one batch per rank at a time so that rank 0 writes as it goes."""
        from medtune.generation import GenerationConfig
        from medtune.inference import answer

        settings = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, seed=self.seed)
        step = self.batch_size * self.world_size
        for i in range(0, len(samples), step):
            chunk = samples[i : i + step]
            out = answer(
                self.model,
                self.transform,
                chunk,
                settings,
                tokenizer=self.tokenizer,
                batch_size=self.batch_size,
                device=self.device,
            )
            yield chunk, [a.text for a in out]

    def _describe(self, samples: list[Sample], path: Path, checkpoint: str) -> dict[str, str]:
        """Descriptions of the samples' distinct images, cached in ``path`` (resumable)."""
        cached = self._on_rank0(
            lambda: read_descriptions(path, self.describe_prompt, self.describe_max_new_tokens)
        )
        todo: dict[str, Sample] = {}
        for s in samples:
            key = image_key(s)
            if key not in cached and key not in todo:
                todo[key] = describe_sample(key, s, self.describe_prompt)
        if todo:
            self._log(f"describing {len(todo)} image(s) ({len(cached)} cached)")
            for chunk, texts in self._answers(list(todo.values()), self.describe_max_new_tokens):
                for s, text in zip(chunk, texts):
                    k = s.id.removeprefix("describe:")
                    row = {
                        "image": k,
                        "description": text,
                        "describe_prompt": self.describe_prompt,
                        "max_new_tokens": self.describe_max_new_tokens,
                        "checkpoint": checkpoint,
                    }
                    if self.rank == 0:
                        append_jsonl(path, row)
                    cached[k] = text
        return cached

    def evaluate_pair(
        self, ckpt_name: str, ckpt_path: str, ds_name: str, task: str, samples: list[Sample]
    ) -> dict[str, Any]:
        """Generate what is missing for one (checkpoint, dataset), then score it.

        Returns:
            The metrics JSON written to ``metrics.json``.
        """
        out_dir = self.output_dir / ckpt_name / ds_name
        pred_path, desc_path = out_dir / "predictions.jsonl", out_dir / "descriptions.jsonl"
        gen = self.generation_settings(task)

        def resume() -> dict[str, dict]:
            out_dir.mkdir(parents=True, exist_ok=True)
            if self.overwrite:
                for p in (pred_path, desc_path, out_dir / "metrics.json"):
                    p.unlink(missing_ok=True)
            return resume_rows(pred_path, ckpt_path, gen)

        done = self._on_rank0(resume)
        todo = [s for s in samples if str(s.id) not in done]
        self._log(
            f"{ckpt_name} x {ds_name}: {len(todo)} to generate, {len(samples) - len(todo)} already done"
        )
        if todo:
            self._ensure_model(ckpt_path)
            descriptions = None
            if task == "vqa" and self.prompt_mode == "describe_then_answer":
                descriptions = self._describe(todo, desc_path, ckpt_path)
            descs = {
                s.id: descriptions[image_key(s)] if descriptions is not None else None for s in todo
            }
            asked = [
                caption_sample(s)
                if task == "caption"
                else question_sample(
                    s,
                    self.prompt_template,
                    descs[s.id],
                    layout=self.describe_layout,
                    describe_prompt=self.describe_prompt,
                    context_template=self.context_template,
                )
                for s in todo
            ]
            by_id = {s.id: s for s in todo}
            fh = open(pred_path, "a", encoding="utf-8") if self.rank == 0 else None  # noqa: SIM115
            try:
                for chunk, preds in self._answers(asked, gen["max_new_tokens"]):
                    for a, p in zip(chunk, preds):
                        s = by_id[a.id]
                        prompt = [m.content for m in a.messages if m.role == "user"][-1]
                        row = prediction_row(
                            s,
                            p,
                            checkpoint=ckpt_path,
                            task=task,
                            generation=gen,
                            prompt=prompt,
                            description=descs[s.id],
                        )
                        if fh is not None:
                            from medtune.eval.predictions import write_prediction

                            write_prediction(fh, row)
                        done[str(s.id)] = row
            finally:
                if fh is not None:
                    fh.close()
        wanted = {str(s.id) for s in samples}
        rows = [r for k, r in done.items() if k in wanted]
        metrics = self.score(rows, task, pred_path)
        if self.rank == 0:
            write_text_atomic(
                out_dir / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"
            )
        return metrics

    def score(self, rows: list[dict[str, Any]], task: str, pred_path: Path) -> dict[str, Any]:
        """VQA: ``medtune score``'s JSON; captions: ``caption_scores`` (+ ``predictions``)."""
        out: dict[str, Any] = {"predictions": str(pred_path)}
        if task == "caption":
            if self.rank != 0:
                return out  # only rank 0 writes metrics; the others skip the (java) scorers
            from medtune.eval.caption_metrics import score_caption_rows

            out.update(score_caption_rows(rows, meteor=bool(self.cfg.get("caption_meteor", True))))
            return out
        out.update(score_predictions(rows))
        return out

    def cleanup(self) -> None:
        """Release the model and leave the process group."""
        from medtune.training.distributed import destroy

        self.model = None
        gc.collect()
        if self.world_size > 1:
            destroy()


@config.parse
def recipe_main(cfg: DictConfig) -> int:
    """Entry point: ``python recipes/eval.py --config CONFIG [key=value ...]``."""
    recipe = EvalRecipe(cfg)
    try:
        recipe.setup()
        recipe.run()
    finally:
        recipe.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(run_entry("eval", recipe_main))
