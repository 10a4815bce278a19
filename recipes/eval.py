"""Evaluate MedVLM checkpoints and baseline VLMs on medical VQA, multiple-choice, caption and report
benchmarks: one table.

    medtune run eval --config slake_vqa_rad \\
        checkpoints='[outputs/run1/epoch_2,outputs/run2/epoch_4]' data_dir=/data
    medtune run eval --config mimic_cxr_report checkpoints='[...]' data_dir=/data/mimic-cxr-jpg \\
        chexbert_dir=/models/chexbert chexbert_tokenizer_dir=/models/bert-base-uncased
    medtune run eval --config demo                       # the tiny demo checkpoint, synthetic SLAKE
    medtune run eval --config med_vqa_suite data_dir=/data \\
        checkpoints='{tuned: outputs/run/epoch_2, qwen2_vl: {model: hf, path: /models/Qwen2-VL-7B-Instruct}}'
    medtune run eval --config demo_backends              # medtune x hf x openai on tiny models
    python recipes/eval.py --config recipes/configs/eval/slake.yaml checkpoints='[...]'

Features (all set in the config):

- **Checkpoints**: ``checkpoints`` is a list of medtune checkpoint folders (``output_dir/epoch_k``
  of ``vision_finetune``, holding ``config.yaml`` + ``model.safetensors``), or a mapping
  ``name: path``. Each is rebuilt with :func:`medtune.training.loading.load_from_checkpoint`
  (``checkpoint_overrides`` patches the saved config, e.g. a moved ``assets_dir``; ``llm_dtype``
  and ``device`` as in training). Names are derived from the paths, readable and unique
  (``runs/a/epoch_2`` -> ``a_epoch_2``). Pick checkpoints on validation, never on test.
- **Baselines** (:mod:`medtune.eval.backends`): in the mapping form an entry may be
  ``{model: hf, path: DIR}``: any transformers image-text-to-text folder (``AutoProcessor`` +
  ``AutoModelForImageTextToText``, its chat template, batched ``generate``, bf16 on CUDA;
  ``dtype``, ``batch_size``, ``trust_remote_code``), data-parallel under torchrun as medtune
  checkpoints are; or ``{model: openai, base_url: http://host:port/v1, name: MODEL}``: any
  OpenAI-compatible server (vLLM, SGLang, ``medtune serve``): images as PNG data URLs,
  ``concurrency`` requests in flight, retries with backoff on dropped connections and 5xx
  (``max_retries``, ``backoff_s``, ``timeout_s``, ``api_key_env``); rows are appended as they
  come, so a failed run resumes where it stopped. ``checkpoints.<name>=null`` drops an entry.
  Rows record the backend's identity as ``checkpoint`` (the path, or ``openai:<name>@<url>``).
- **Datasets**: ``datasets`` maps a name to any medtune reader ``_component_`` (default SLAKE
  English test and VQA-RAD test); split, language, answer types, modalities, ... are the reader's
  own arguments (``datasets.slake.answer_types='[CLOSED]'``); ``datasets.<name>=null`` drops one.
  ``limit`` keeps the first N samples
  of each (smoke runs). A dataset whose samples are captions (``caption_json``: a ``caption`` and
  no ``answer_type`` in ``meta``, or ``meta.task == "caption"``, as the report readers
  ``medtune.data.report_readers.openi | mimic_cxr | xraygpt`` and ``roco`` set it) is scored as
  captions; force it with ``tasks.<name>: caption`` (or ``vqa``). Multiple-choice readers
  (:mod:`medtune.data.benchmarks`: PMC-VQA, OmniMedVQA, MedXpertQA MM, MMMU health; ``meta.task ==
  "mcq"``) are asked with MedEvalKit's prompt (the question, the options lettered ``A. text``, "Answer
  with the option's letter from the given choices directly."; ``mcq_prompt_template`` with
  ``{question}`` and ``{options}`` replaces it) and scored by MedEvalKit's ``judge_multi_choice``
  (:mod:`medtune.eval.mcq`: ``mcq_accuracy``, ``n_mcq``, ``n_mcq_no_option``, per-group
  accuracies). VQA metrics.json adds MedEvalKit's accuracies (``accuracy_medevalkit``,
  ``closed_accuracy_medevalkit``, ``open_accuracy_medevalkit``; :mod:`medtune.eval.medevalkit_vqa`).
- **Generation**: batched (``batch_size``), KV-cached, through the one inference path
  (:func:`medtune.inference.answer`). ``generation`` is a block of
  :class:`medtune.generation.GenerationConfig` fields (``max_new_tokens`` (default 32),
  ``min_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``num_beams``,
  ``length_penalty``, ``repetition_penalty``, ...; an unknown key is named) for VQA;
  ``caption_generation`` is merged over it for caption datasets (``max_new_tokens`` default 128;
  LAVIS scores captions with 3-5 beams: ``caption_generation.num_beams=3``). Prompts are token ids
  in the Llama-3 chat format with the image placeholders; ``system_prompt`` adds a system turn.
- **Prompt modes** (``prompt_mode``):
  ``direct``: the question through ``prompt_template`` (a format string with ``{question}`` and
  any ``meta`` field; default ``"{question}"`` = ``VQA_DIRECT``); ``short_answer: true`` appends
  LLaVA-1.5's "Answer with a single word or phrase." (``VQA_SHORT_ANSWER``).
  ``describe_then_answer`` (medcap's two steps): first the model describes each image
  (``describe_prompt``, ``describe_max_new_tokens``; greedy, whatever ``generation`` says, so
  that the cache stays valid), once per distinct image, cached in
  ``<ckpt>/<dataset>/descriptions.jsonl``; then it answers the question with that description in
  context as text. ``describe_layout: conversation`` (default) continues the chat
  (user: image + describe prompt, assistant: description, user: question);
  ``describe_layout: text`` asks without the image, the description inlined by
  ``describe_context_template`` (``{description}``, ``{question}``). Caption datasets always use
  the reader's instruction, as is.
- **Outputs** in ``output_dir``: ``<ckpt>/<dataset>/predictions.jsonl`` (the :mod:`medtune.eval.predictions` schema, one row
  per question: id, dataset, split, image, question, answer, answer_type, prediction, checkpoint
  (the path), generation (every setting that shapes the output), language, modality,
  content_type, prompt, and description in describe_then_answer), ``<ckpt>/<dataset>/metrics.json``
  (:func:`medtune.eval.vqa_metrics.score_predictions`, the same JSON as ``medtune score``; captions:
  :func:`medtune.eval.caption_metrics.score_caption_rows`, BLEU-1..4, METEOR, ROUGE-L, CIDEr, the
  same JSON as ``medtune score``), for captions ``<ckpt>/<dataset>/per_row.jsonl`` (the
  per-report scores, the file ``medtune score --per-row`` writes), and one table across all
  pairs, ``results.md``, ``results.csv`` and ``results.json`` (rows: checkpoint x dataset;
  columns: checkpoint, model (backend), dataset, task, n = scored questions, ``n_closed``,
  ``n_open`` and every named metric, as fractions), the per-group table (answer type, modality,
  question type, subset, ...) under it and in ``results_groups.csv`` (:mod:`medtune.eval.results`),
  printed at the end,
  with ``checkpoints.json`` (name -> path); ``charts/<metric>.png`` (a grouped bar chart per
  metric, checkpoints x datasets, values on the bars) and ``<ckpt>/<dataset>/report.html`` (every
  question with its thumbnail, reference, prediction and per-metric marks; filters, search, side
  by side with another checkpoint; static, offline), by :mod:`medtune.viz.eval_outputs`.
- **Clinical efficacy** (chest X-ray reports): ``chexbert_dir`` names a local CheXbert labeler
  (``chexbert.pth``, optionally its BERT ``config.json``) and ``chexbert_tokenizer_dir`` its
  bert-base-uncased tokenizer folder (``vocab.txt``; default: ``chexbert_dir``). Every caption
  dataset is then also scored with :mod:`medtune.eval.chexbert` (RadEval's F1CheXbert: positive
  and uncertain count as positive; the first reference when a row lists several):
  ``metrics.json["chexbert"]`` (what ``medtune score --chexbert`` adds) and the table's
  ``f1chexbert_{all,5}_{micro,macro}_f1`` columns (14 observations; the 5 of CheXpert's
  competition). Default null: no CheXbert. Nothing is downloaded.
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
from medtune.data.sample import Message, Sample
from medtune.eval.backends import build_backend, parse_spec
from medtune.eval.mcq import MCQ_PROMPT, mcq_prompt, mcq_row_fields, score_mcq_rows
from medtune.eval.medevalkit_vqa import score_medevalkit_vqa
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
from medtune.eval.report import checkpoint_names
from medtune.eval.results import write_results
from medtune.eval.vqa_metrics import score_predictions
from medtune.utils.config import cfg_get, check_keys, positive
from medtune.utils.distributed import on_rank0
from medtune.utils.errors import run_entry
from medtune.utils.jsonl import append_jsonl, write_jsonl_atomic, write_text_atomic

SUPPORTS_DISTRIBUTED = True

KNOWN_KEYS = {
    "output_dir",
    "assets_dir",
    "data_dir",
    "model_dir",  # a model folder the checkpoints interpolate (eval/slake_llava_med)
    "checkpoints",
    "checkpoint_overrides",
    "datasets",
    "tasks",
    "limit",
    "device",
    "llm_dtype",
    "batch_size",
    "generation",
    "caption_generation",
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
    "chexbert_dir",
    "chexbert_tokenizer_dir",
    "mcq_prompt_template",
}
PROMPT_MODES = ("direct", "describe_then_answer")
DESCRIBE_LAYOUTS = ("conversation", "text")
DEFAULT_DESCRIBE_PROMPT = "Describe the medical image."
DEFAULT_CONTEXT_TEMPLATE = "Image description: {description}\n\n{question}"
DEFAULT_MAX_NEW_TOKENS = {"generation": 32, "caption_generation": 128}
__all__ = ["EvalConfigError", "EvalRecipe", "checkpoint_names", "generation_configs", "recipe_main"]


def _block(cfg: DictConfig, key: str) -> dict[str, Any]:
    node = cfg.get(key)
    if node is None:
        return {}
    if not OmegaConf.is_dict(node):
        raise EvalConfigError(
            f"{key}: expected a mapping of medtune.generation.GenerationConfig fields, got {node!r}"
        )
    return OmegaConf.to_container(node, resolve=True)


def generation_configs(cfg: DictConfig):
    """The VQA and caption :class:`~medtune.generation.GenerationConfig` of an eval config.

    ``caption_generation`` is merged over ``generation``; each block's ``max_new_tokens`` defaults
    to :data:`DEFAULT_MAX_NEW_TOKENS`.

    Returns:
        ``{"vqa": GenerationConfig, "caption": GenerationConfig}``.

    Raises:
        EvalConfigError: a block that is not a mapping, an unknown field or a bad value, naming
            the block and the field (``caption_generation.num_beams: expected ...``).
    """
    from medtune.generation import GenerationConfig
    from medtune.utils.errors import ConfigError

    blocks = {k: _block(cfg, k) for k in DEFAULT_MAX_NEW_TOKENS}
    vqa = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS["generation"], **blocks["generation"]}
    caption = {
        **vqa,
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS["caption_generation"],
        **blocks["caption_generation"],
    }
    out = {}
    for task, block, fields in (
        ("vqa", "generation", vqa),
        ("caption", "caption_generation", caption),
    ):
        try:
            out[task] = GenerationConfig.from_config(fields)
        except ConfigError as e:
            # GenerationConfig names its keys "generation.<key>": name the block they came from
            msg = str(e)
            if block != "generation" and msg.startswith("generation."):
                msg = f"{block}.{msg.removeprefix('generation.')} (merged over generation)"
            raise EvalConfigError(msg) from None
    return out


class EvalRecipe:
    """Checkpoints x datasets -> predictions JSONL, metrics JSON, one table. See the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        self.backend = None
        self.rank, self.world_size = 0, 1
        check_keys(cfg, KNOWN_KEYS, "eval")
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.batch_size = cfg_get(cfg, "batch_size", int, 8, check=positive())
        self.gen_configs = generation_configs(cfg)
        self.gen_configs["mcq"] = self.gen_configs["vqa"]  # one decoding block for questions
        self.mcq_template = cfg.get("mcq_prompt_template") or MCQ_PROMPT
        self.prompt_mode = cfg_get(cfg, "prompt_mode", str, "direct")
        if self.prompt_mode not in PROMPT_MODES:
            raise EvalConfigError(
                f"prompt_mode={self.prompt_mode!r}: expected one of {', '.join(PROMPT_MODES)}"
            )
        template = cfg.get("prompt_template") or VQA_DIRECT
        if cfg_get(cfg, "short_answer", bool, False):
            template = VQA_SHORT_ANSWER.replace("{question}", template)
        self.prompt_template = template
        self.system_prompt = cfg_get(cfg, "system_prompt", str, None)
        self.describe_prompt = cfg.get("describe_prompt") or DEFAULT_DESCRIBE_PROMPT
        self.describe_max_new_tokens = cfg_get(
            cfg, "describe_max_new_tokens", int, 64, check=positive()
        )
        self.describe_layout = cfg_get(cfg, "describe_layout", str, "conversation")
        if self.describe_layout not in DESCRIBE_LAYOUTS:
            raise EvalConfigError(
                f"describe_layout={self.describe_layout!r}: expected one of {', '.join(DESCRIBE_LAYOUTS)}"
            )
        self.context_template = cfg.get("describe_context_template") or DEFAULT_CONTEXT_TEMPLATE
        self.blank_images = cfg_get(cfg, "blank_images", bool, False)
        self.overwrite = cfg_get(cfg, "overwrite", bool, False)
        self.limit = cfg_get(cfg, "limit", int, None, check=positive())
        self.chexbert_dir = cfg.get("chexbert_dir")
        self.chexbert_tokenizer_dir = cfg.get("chexbert_tokenizer_dir")
        if self.chexbert_tokenizer_dir is not None and self.chexbert_dir is None:
            raise EvalConfigError("chexbert_tokenizer_dir is set but chexbert_dir is not")
        self.chexbert = None  # (labeler, tokenizer), loaded on rank 0 in setup

    def _log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"eval: {msg}", flush=True)

    def _on_rank0(self, fn):
        """``fn()`` on rank 0, its result (or its user error) on every rank."""
        return on_rank0(fn, EvalConfigError)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Join the process group (torchrun), resolve checkpoints and read every dataset once."""
        from medtune.utils.distributed import init_process_group, resolve_device

        cfg = self.cfg
        ckpts = cfg.get("checkpoints")
        if not ckpts:
            raise EvalConfigError(
                "eval: no checkpoints given (checkpoints='[run1/epoch_2,run2/epoch_4]')"
            )
        if OmegaConf.is_dict(ckpts):
            entries = [
                (str(k), OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v)
                for k, v in ckpts.items()
                if v is not None  # checkpoints.<name>=null drops one
            ]
        else:
            paths = [str(p) for p in (ckpts if OmegaConf.is_list(ckpts) else [ckpts])]
            entries = list(zip(checkpoint_names(paths), paths))
        # name -> backend spec (medtune.eval.backends.parse_spec); (name, identity) pairs
        self.specs = {name: parse_spec(name, value) for name, value in entries}
        self.checkpoints = [(name, spec["identity"]) for name, spec in self.specs.items()]
        for name, path in self.checkpoints:
            if self.specs[name]["model"] == "hf" and not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(
                    f"checkpoints.{name}: {path} holds no config.json (model: hf expects a "
                    "transformers model folder)"
                )
            if self.specs[name]["model"] != "medtune":
                continue
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
        self.rank, self.world_size = init_process_group(self.device, in_one_process=False)
        tasks = dict(cfg.get("tasks") or {})
        self.datasets: dict[str, tuple[str, list[Sample]]] = {}
        for name, node in (cfg.get("datasets") or {}).items():
            if node is None or node.get("_component_") is None:
                continue  # datasets.<name>=null drops a dataset (torchtune sets its _component_ to null)
            node = OmegaConf.to_container(node, resolve=True)
            task = node.pop("task", None) or tasks.get(name)
            samples = config.instantiate(OmegaConf.create(node))
            dropped = dict(getattr(samples, "dropped", None) or {})  # report readers count them
            samples = list(samples)
            if self.limit is not None:
                samples = samples[: int(self.limit)]
            if task is None and samples and samples[0].meta.get("task") == "mcq":
                task = "mcq"  # the multiple-choice readers (medtune.data.benchmarks)
            if task is None:
                task = "caption" if is_caption_dataset(samples) else "vqa"
            if task not in ("vqa", "caption", "mcq"):
                raise EvalConfigError(
                    f"datasets.{name}: task {task!r} (expected vqa, mcq or caption)"
                )
            ids = [s.id for s in samples]
            if len(set(ids)) != len(ids):
                raise EvalConfigError(
                    f"datasets.{name}: sample ids are not unique (resume keys on them)"
                )
            self.datasets[str(name)] = (task, samples)
            why = "; not samples: " + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()))
            self._log(f"dataset {name}: {len(samples)} samples ({task}){why if dropped else ''}")
        if not self.datasets:
            raise EvalConfigError("eval: no datasets")
        if self.chexbert_dir is not None:
            if not any(task == "caption" for task, _ in self.datasets.values()):
                raise EvalConfigError(
                    "chexbert_dir is set but no dataset is a caption / report dataset"
                )
            self._on_rank0(self._load_chexbert)  # fail now, not after hours of generation
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.world_size > 1:
            self._log(f"{self.world_size} processes: the questions are split across them")

    def _load_chexbert(self) -> None:
        from medtune.eval.chexbert import load_chexbert

        self.chexbert = load_chexbert(
            self.chexbert_dir, self.chexbert_tokenizer_dir, device=self.device
        )
        self._log(f"CheXbert labeler: {self.chexbert_dir}")

    # ------------------------------------------------------------------ settings

    def generation_settings(self, task: str) -> dict[str, Any]:
        """Everything that shapes a prediction, stored with every row (and checked on resume)."""
        gen = self.gen_configs[task].to_dict()
        gen["system_prompt"] = self.system_prompt
        if self.blank_images:
            gen["blank_images"] = True
        if task == "caption":
            gen["prompt_mode"] = "caption"
            return gen
        if task == "mcq":
            gen["prompt_mode"] = "mcq"
            gen["prompt_template"] = self.mcq_template
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
            self._release()
            for ds_name, (task, samples) in self.datasets.items():
                metrics = self.evaluate_pair(ckpt_name, ckpt_path, ds_name, task, samples)
                results.append(
                    {
                        "checkpoint": ckpt_name,
                        "model": self.specs[ckpt_name]["model"],
                        "path": ckpt_path,
                        "dataset": ds_name,
                        "task": task,
                        "metrics": metrics,
                    }
                )
            self._release()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if self.rank != 0:
            return results
        md = write_results(self.output_dir, results, dict(self.checkpoints))
        write_text_atomic(
            self.output_dir / "checkpoints.json",
            json.dumps(dict(self.checkpoints), indent=2) + "\n",
        )
        self._log(
            f"{len(results)} checkpoint x dataset pairs in {time.perf_counter() - t0:.0f}s; wrote "
            f"{self.output_dir / 'results.md'} and results.csv"
        )
        print(md, flush=True)
        # charts/<metric>.png and <ckpt>/<dataset>/report.html (thumbnails from the samples' files)
        from medtune.viz.eval_outputs import write_eval_figures

        images = {d: {str(s.id): s.image_paths for s in ss} for d, (_, ss) in self.datasets.items()}
        figures = write_eval_figures(self.output_dir, images=images)
        self._log(f"wrote {len(figures)} charts and report pages ({self.output_dir / 'charts'})")
        return results

    def _release(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend = None

    def _ensure_model(self, ckpt_name: str) -> None:
        """Build the pair's answer backend (:mod:`medtune.eval.backends`) once per checkpoint."""
        if self.backend is not None:
            return
        node = self.cfg.get("checkpoint_overrides")
        overrides = (
            OmegaConf.to_container(node, resolve=True)
            if OmegaConf.is_config(node)
            else dict(node or {})
        )
        spec = self.specs[ckpt_name]
        self._log(f"loading {spec['identity']} (model: {spec['model']})")
        self.backend = build_backend(
            spec,
            device=self.device,
            batch_size=self.batch_size,
            system_prompt=self.system_prompt,
            window=self.cfg.get("window"),
            blank_images=self.blank_images,
            llm_dtype=self.cfg.get("llm_dtype"),
            checkpoint_overrides=overrides,
        )

    def _answers(self, samples: list[Sample], settings):
        """Answer already-templated samples with ``settings`` (a ``GenerationConfig``) through the
        backend (every rank; data-parallel under torchrun for medtune and hf), yielding
        ``(chunk, texts)`` one chunk of ``batch_size * world_size`` at a time so that rank 0
        writes as it goes."""
        step = self.batch_size * self.world_size
        for i in range(0, len(samples), step):
            chunk = samples[i : i + step]
            yield chunk, self.backend.answer(chunk, settings)

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
            from medtune.generation import GenerationConfig

            self._log(f"describing {len(todo)} image(s) ({len(cached)} cached)")
            # greedy, as the cache (keyed on prompt and length only) assumes
            settings = GenerationConfig.from_config(
                {
                    "max_new_tokens": self.describe_max_new_tokens,
                    "temperature": 0.0,
                    "seed": self.gen_configs["vqa"].seed,
                }
            )
            for chunk, texts in self._answers(list(todo.values()), settings):
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
                for p in (
                    pred_path,
                    desc_path,
                    out_dir / "metrics.json",
                    out_dir / "per_row.jsonl",
                ):
                    p.unlink(missing_ok=True)
            return resume_rows(pred_path, ckpt_path, gen)

        done = self._on_rank0(resume)
        todo = [s for s in samples if str(s.id) not in done]
        self._log(
            f"{ckpt_name} x {ds_name}: {len(todo)} to generate, {len(samples) - len(todo)} already done"
        )
        if todo:
            self._ensure_model(ckpt_name)
            descriptions = None
            if task == "vqa" and self.prompt_mode == "describe_then_answer":
                descriptions = self._describe(todo, desc_path, ckpt_path)
            descs = {
                s.id: descriptions[image_key(s)] if descriptions is not None else None for s in todo
            }
            asked = [
                caption_sample(s)
                if task == "caption"
                else Sample(
                    s.id,
                    list(s.images),
                    [
                        Message(
                            "user",
                            mcq_prompt(s.meta["question"], s.meta["choices"], self.mcq_template),
                        )
                    ],
                    dict(s.meta),
                )
                if task == "mcq"
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
                for chunk, preds in self._answers(asked, self.gen_configs[task]):
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
                        if task == "mcq":
                            row.update(mcq_row_fields(s))
                        if fh is not None:
                            from medtune.eval.predictions import write_prediction

                            write_prediction(fh, row)
                        done[str(s.id)] = row
            finally:
                if fh is not None:
                    fh.close()
        wanted = {str(s.id) for s in samples}
        rows = [r for k, r in done.items() if k in wanted]
        metrics, per_row = self.score(rows, task, pred_path)
        if self.rank == 0:
            if per_row is not None:
                write_jsonl_atomic(out_dir / "per_row.jsonl", per_row)
            write_text_atomic(
                out_dir / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"
            )
        return metrics

    def score(
        self, rows: list[dict[str, Any]], task: str, pred_path: Path
    ) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
        """The metrics JSON (``medtune score``'s) and, for captions, the per-row scores.

        Returns:
            ``(metrics, per_row)``: VQA: ``score_predictions`` and None; captions:
            ``score_caption_rows`` (+ ``chexbert`` with a labeler) and one dict per row
            (``id``, ``dataset``, ``split`` and each caption metric, as ``--per-row`` writes).
        """
        out: dict[str, Any] = {"predictions": str(pred_path)}
        if task == "mcq":
            out.update(score_mcq_rows(rows, str(pred_path)))
            return out, None
        if task != "caption":
            out.update(score_predictions(rows))
            out.update(score_medevalkit_vqa(rows))
            return out, None
        if self.rank != 0:
            return out, None  # only rank 0 writes metrics; the others skip the (java) scorers
        from medtune.eval.caption_metrics import score_caption_rows

        meteor = cfg_get(self.cfg, "caption_meteor", bool, True)
        scores = score_caption_rows(rows, meteor=meteor, per_item=True)
        per_id = scores.pop("per_id")
        out.update(scores)
        if self.chexbert is not None and rows:
            from medtune.eval.chexbert import chexbert_f1, label_reports

            model, tok = self.chexbert
            # one reference per report (CheXbert compares label vectors): the first of a list
            refs = [r["answer"][0] if isinstance(r["answer"], list) else r["answer"] for r in rows]
            out["chexbert"] = chexbert_f1(
                label_reports(model, tok, [r["prediction"] for r in rows]),
                label_reports(model, tok, refs),
            )
        per_row = [
            {"id": r["id"], "dataset": r.get("dataset"), "split": r.get("split"), **per_id[r["id"]]}
            for r in rows
        ]
        return out, per_row

    def cleanup(self) -> None:
        """Release the model and leave the process group."""
        from medtune.utils.distributed import destroy

        self._release()
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
