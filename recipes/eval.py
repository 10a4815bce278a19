"""Evaluate trained MedVLM checkpoints on medical VQA and caption benchmarks: one honest table.

    medtune run eval --config slake_vqa_rad \\
        checkpoints='[outputs/run1/epoch_2,outputs/run2/epoch_4]' data_dir=/data
    medtune run eval --config demo                       # the tiny demo checkpoint, synthetic SLAKE
    python recipes/eval.py --config recipes/configs/eval/slake.yaml checkpoints='[...]'

Features (all set in the config):

- **Checkpoints**: ``checkpoints`` is a list of medtune checkpoint folders (``output_dir/epoch_k``
  of ``vision_finetune``, holding ``config.yaml`` + ``model.safetensors``), or a mapping
  ``name: path``. Each is rebuilt with :func:`medtune.models.loading.load_from_checkpoint`
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
- **Generation**: batched (``batch_size``), KV-cached greedy decoding
  (:func:`medtune.generation.generate`), ``max_new_tokens`` for VQA and
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
- **Resume**: rows already in ``predictions.jsonl`` (by id) are not generated again; a truncated
  last line (a killed run) is dropped and regenerated. Rows written with other generation settings
  stop the run (``overwrite: true`` starts the pair afresh instead). Descriptions resume the same
  way. A pair whose predictions are complete loads no model.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medtune.data.errors import DataError
from medtune.data.prompts import VQA_DIRECT, VQA_SHORT_ANSWER, apply_template, format_template
from medtune.data.sample import Message, Sample
from medtune.eval.caption_metrics import CAPTION_METRIC_KEYS
from medtune.eval.predictions import PredictionsError, read_predictions, write_prediction
from medtune.eval.vqa_metrics import METRIC_KEYS, score_predictions

SUPPORTS_DISTRIBUTED = False

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
    "overwrite",
    "caption_meteor",
}
PROMPT_MODES = ("direct", "describe_then_answer")
DESCRIBE_LAYOUTS = ("conversation", "text")
CAPTION_METRICS = CAPTION_METRIC_KEYS
DEFAULT_DESCRIBE_PROMPT = "Describe the medical image."
DEFAULT_CONTEXT_TEMPLATE = "Image description: {description}\n\n{question}"


class EvalConfigError(ValueError):
    """A config or output folder that eval cannot work with; the message says what to change."""


# ---------------------------------------------------------------------------------------- helpers


def checkpoint_names(paths: list[str]) -> list[str]:
    """Readable, unique names for checkpoint folders.

    The last two path components joined by ``_`` (``runs/run1/epoch_2`` -> ``run1_epoch_2``); more
    components are used while names collide, then a numeric suffix.

    Args:
        paths: checkpoint folder paths.

    Returns:
        One name per path, in order.
    """
    parts = [
        [re.sub(r"[^A-Za-z0-9._-]+", "-", p) for p in Path(os.path.abspath(x)).parts[1:]]
        or ["root"]
        for x in paths
    ]

    def name(i: int, k: int) -> str:
        return "_".join(parts[i][-k:])

    depth = [min(2, len(p)) for p in parts]
    while True:
        names = [name(i, depth[i]) for i in range(len(paths))]
        clash = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clash and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_jsonl_resumable(path: Path) -> list[dict]:
    """Rows of a JSONL cache, dropping a truncated last line (and rewriting the file without it)."""
    if not path.is_file():
        return []
    raw = path.read_text(encoding="utf-8")
    rows = []
    lines = raw.splitlines(keepends=True)
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) and not line.endswith("\n"):
                break
            raise EvalConfigError(f"{path}:{n}: not valid JSON") from None
    if raw and not raw.endswith("\n"):
        _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def _load_predictions_resumable(path: Path) -> list[dict]:
    """Valid predictions already written; a truncated last line is dropped from the file."""
    if not path.is_file():
        return []
    rows = read_predictions(path, skip_truncated_tail=True)
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def _image_key(sample: Sample) -> str:
    """Cache key of a sample's image(s): the dataset-relative path(s) when known."""
    ref = sample.meta.get("image")
    if isinstance(ref, str) and ref:
        return ref
    if isinstance(ref, list) and ref:
        return "|".join(map(str, ref))
    return "|".join(map(str, sample.images))


def _is_caption_dataset(samples: list[Sample]) -> bool:
    if not samples:
        return False
    m = samples[0].meta
    return m.get("task") == "caption" or ("caption" in m and "answer_type" not in m)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def results_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the combined table.

    Args:
        rows: one dict per (checkpoint, dataset) with ``checkpoint``, ``dataset``, ``task`` and
            ``metrics`` (the metrics JSON).

    Returns:
        ``(columns, values)``: ``checkpoint, dataset, n, ...`` then the VQA metrics (when any VQA
        dataset is present) and the caption metrics (when any caption dataset is present).
    """
    has_vqa = any(r["task"] == "vqa" for r in rows)
    has_cap = any(r["task"] == "caption" for r in rows)
    cols = ["checkpoint", "dataset", "n"]
    if has_vqa:
        cols += ["n_closed", "n_open", *METRIC_KEYS]
    if has_cap:
        cols += list(CAPTION_METRICS)
    out = []
    for r in rows:
        m = r["metrics"]
        vals: dict[str, Any] = {"checkpoint": r["checkpoint"], "dataset": r["dataset"]}
        if r["task"] == "vqa":
            vals["n"] = m["n_closed"] + m["n_open"]
        else:
            vals["n"] = m.get("n")
        vals.update({k: m.get(k) for k in cols if k in m and k not in vals})
        out.append([vals.get(c) for c in cols])
    return cols, out


def markdown_table(cols: list[str], values: list[list[Any]]) -> str:
    """A GitHub markdown table (floats with 4 decimals, missing values empty)."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in values]
    return "\n".join(lines) + "\n"


def csv_table(cols: list[str], values: list[list[Any]]) -> str:
    """The same table as CSV (full precision, missing values empty)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for row in values:
        w.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- recipe


class EvalRecipe:
    """Checkpoints x datasets -> predictions JSONL, metrics JSON, one table. See the module docstring."""

    def __init__(self, cfg: DictConfig) -> None:
        self.model = None
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
        self.overwrite = bool(cfg.get("overwrite", False))
        self.limit = cfg.get("limit")

    def _log(self, msg: str) -> None:
        print(f"eval: {msg}", flush=True)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Resolve checkpoints and read every dataset once."""
        from medtune.training.distributed import resolve_device

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
                task = "caption" if _is_caption_dataset(samples) else "vqa"
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
        self.output_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ settings

    def generation_settings(self, task: str) -> dict[str, Any]:
        """Everything that shapes a prediction, stored with every row (and checked on resume)."""
        from medtune.generation import GenerationConfig

        max_new = self.caption_max_new_tokens if task == "caption" else self.max_new_tokens
        gen = GenerationConfig(max_new_tokens=max_new, temperature=0.0, seed=self.seed).to_dict()
        gen["system_prompt"] = self.system_prompt
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
        cols, values = results_table(results)
        md = markdown_table(cols, values)
        _write_atomic(self.output_dir / "results.md", md)
        _write_atomic(self.output_dir / "results.csv", csv_table(cols, values))
        _write_atomic(
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
        from medtune.data.chat import VisionChatDataset
        from medtune.models.loading import load_from_checkpoint

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
        self.ds = VisionChatDataset(
            [],
            self.tokenizer,
            image_token_id=self.model.image_token_id,
            tokens_per_image=self.model.tokens_per_image,
            transforms=self.model.image_transforms,
            system_prompt=self.system_prompt,
            window=self.cfg.get("window"),
        )

    def _generate(self, samples: list[Sample], max_new_tokens: int) -> list[str]:
        """Greedy answers for already-templated samples (last turn: the user's)."""
        from medtune.generation import generate

        out: list[str] = []
        for i in range(0, len(samples), self.batch_size):
            chunk = [self.ds.prepare(s, 0) for s in samples[i : i + self.batch_size]]
            prompts = [self.ds.encode(s, add_generation_prompt=True)[0] for s in chunk]
            counts = [len(s.images) for s in chunk]
            images = None
            if sum(counts):
                loaded = [self.ds.load_images(s) for s in chunk]
                images = {k: torch.cat([x[k] for x in loaded]).to(self.device) for k in loaded[0]}
            ids = generate(
                self.model,
                prompts,
                pad_id=self.tokenizer.pad_id,
                stop_tokens=self.tokenizer.stop_tokens,
                images=images,
                image_counts=torch.tensor(counts) if images is not None else None,
                max_new_tokens=max_new_tokens,
            )
            out += [self.tokenizer.decode(x).strip() for x in ids]
        return out

    def _describe(self, samples: list[Sample], path: Path, gen: dict[str, Any]) -> dict[str, str]:
        """Descriptions of the samples' distinct images, cached in ``path`` (resumable)."""
        cached = {}
        for r in _read_jsonl_resumable(path):
            if (
                r.get("describe_prompt") != self.describe_prompt
                or r.get("max_new_tokens") != self.describe_max_new_tokens
            ):
                raise EvalConfigError(
                    f"{path}: descriptions made with other settings; use another output_dir "
                    "or overwrite=true"
                )
            cached.setdefault(r["image"], r["description"])
        todo: dict[str, Sample] = {}
        for s in samples:
            key = _image_key(s)
            if key not in cached and key not in todo:
                todo[key] = Sample(
                    f"describe:{key}",
                    list(s.images),
                    [Message("user", self.describe_prompt)],
                    dict(s.meta),
                )
        if todo:
            self._log(f"describing {len(todo)} image(s) ({len(cached)} cached)")
            with open(path, "a", encoding="utf-8") as fh:
                keys = list(todo)
                for i in range(0, len(keys), self.batch_size):
                    part = keys[i : i + self.batch_size]
                    texts = self._generate([todo[k] for k in part], self.describe_max_new_tokens)
                    for k, text in zip(part, texts):
                        row = {
                            "image": k,
                            "description": text,
                            "describe_prompt": self.describe_prompt,
                            "max_new_tokens": self.describe_max_new_tokens,
                            "checkpoint": gen["checkpoint"],
                        }
                        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                        fh.flush()
                        cached[k] = text
        return cached

    def _question_sample(self, s: Sample, description: str | None) -> Sample:
        """The sample to generate from: templated question, and the description in describe_then_answer."""
        asked = apply_template(s, self.prompt_template)
        user = next(m.content for m in asked.messages if m.role == "user")
        if description is None:
            return Sample(s.id, list(s.images), [Message("user", user)], dict(s.meta))
        if self.describe_layout == "text":
            text = format_template(
                self.context_template, user, {**s.meta, "description": description}
            )
            return Sample(s.id, [], [Message("user", text)], dict(s.meta))
        return Sample(
            s.id,
            list(s.images),
            [
                Message("user", self.describe_prompt),
                Message("assistant", description),
                Message("user", user),
            ],
            dict(s.meta),
        )

    def _row(
        self,
        s: Sample,
        prediction: str,
        ckpt_path: str,
        task: str,
        gen: dict,
        prompt: str,
        description: str | None,
    ) -> dict[str, Any]:
        m = s.meta
        image = m.get("image")
        if not isinstance(image, (str, list)):
            image = [str(i) for i in s.image_paths] if len(s.image_paths) != 1 else s.image_paths[0]
        row = {
            "id": s.id,
            "dataset": str(m.get("dataset", "")),
            "split": str(m.get("split") or ""),
            "image": image,
            "question": str(m.get("question", "")),
            "answer": m.get("answer", ""),
            "answer_type": "CAPTION" if task == "caption" else str(m.get("answer_type", "")),
            "prediction": prediction,
            "checkpoint": ckpt_path,
            "generation": gen,
        }
        for key in ("language", "modality", "content_type"):
            if m.get(key) is not None:
                row[key] = m[key]
        if task == "caption":
            row["task"] = "caption"
        row["prompt"] = prompt
        if description is not None:
            row["description"] = description
        return row

    def evaluate_pair(
        self, ckpt_name: str, ckpt_path: str, ds_name: str, task: str, samples: list[Sample]
    ) -> dict[str, Any]:
        """Generate what is missing for one (checkpoint, dataset), then score it.

        Returns:
            The metrics JSON written to ``metrics.json``.
        """
        out_dir = self.output_dir / ckpt_name / ds_name
        out_dir.mkdir(parents=True, exist_ok=True)
        pred_path, desc_path = out_dir / "predictions.jsonl", out_dir / "descriptions.jsonl"
        gen = self.generation_settings(task)
        if self.overwrite:
            for p in (pred_path, desc_path, out_dir / "metrics.json"):
                p.unlink(missing_ok=True)
        done = {}
        for r in _load_predictions_resumable(pred_path):
            same_ckpt = (
                r["checkpoint"] == ckpt_path
                or Path(r["checkpoint"]).resolve() == Path(ckpt_path).resolve()
            )
            if r["generation"] != gen or not same_ckpt:
                raise EvalConfigError(
                    f"{pred_path}: rows were written by checkpoint {r['checkpoint']} with generation "
                    f"{r['generation']}, not {ckpt_path} with {gen}: use another output_dir or "
                    "overwrite=true"
                )
            done.setdefault(str(r["id"]), r)
        todo = [s for s in samples if str(s.id) not in done]
        self._log(
            f"{ckpt_name} x {ds_name}: {len(todo)} to generate, {len(samples) - len(todo)} already done"
        )
        if todo:
            self._ensure_model(ckpt_path)
            descriptions = None
            if task == "vqa" and self.prompt_mode == "describe_then_answer":
                descriptions = self._describe(todo, desc_path, {**gen, "checkpoint": ckpt_path})
            max_new = gen["max_new_tokens"]
            with open(pred_path, "a", encoding="utf-8") as fh:
                for i in range(0, len(todo), self.batch_size):
                    chunk = todo[i : i + self.batch_size]
                    if task == "caption":
                        asked = [
                            Sample(
                                s.id,
                                list(s.images),
                                [m for m in s.messages if m.role != "assistant"],
                                dict(s.meta),
                            )
                            for s in chunk
                        ]
                        descs = [None] * len(chunk)
                    else:
                        descs = [
                            descriptions[_image_key(s)] if descriptions is not None else None
                            for s in chunk
                        ]
                        asked = [self._question_sample(s, d) for s, d in zip(chunk, descs)]
                    preds = self._generate(asked, max_new)
                    for s, a, p, d in zip(chunk, asked, preds, descs):
                        prompt = [m.content for m in a.messages if m.role == "user"][-1]
                        row = self._row(s, p, ckpt_path, task, gen, prompt, d)
                        write_prediction(fh, row)
                        done[str(s.id)] = row
        wanted = {str(s.id) for s in samples}
        rows = [r for k, r in done.items() if k in wanted]
        metrics = self.score(rows, task, pred_path)
        _write_atomic(
            out_dir / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"
        )
        return metrics

    def score(self, rows: list[dict[str, Any]], task: str, pred_path: Path) -> dict[str, Any]:
        """VQA: ``medtune score``'s JSON; captions: ``caption_scores`` (+ ``predictions``)."""
        out: dict[str, Any] = {"predictions": str(pred_path)}
        if task == "caption":
            from medtune.eval.caption_metrics import score_caption_rows

            out.update(score_caption_rows(rows, meteor=bool(self.cfg.get("caption_meteor", True))))
            return out
        out.update(score_predictions(rows))
        return out

    def cleanup(self) -> None:
        """Release the model."""
        self.model = None
        gc.collect()


@config.parse
def recipe_main(cfg: DictConfig) -> int:
    """Entry point: ``python recipes/eval.py --config CONFIG [key=value ...]``."""
    recipe = None
    try:
        recipe = EvalRecipe(cfg)
        recipe.setup()
        recipe.run()
    except (PredictionsError, FileNotFoundError, DataError, EvalConfigError) as e:
        print(f"eval: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if recipe is not None:
            recipe.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(recipe_main())
