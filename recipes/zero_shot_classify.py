"""Zero-shot classification (prompts or a MAVL concept book), linear probes and retrieval with a dual encoder.

    medtune run zero_shot_classify --config demo
    medtune run zero_shot_classify --config chestxray14_prompts data_dir=/data/ChestX-ray14 \\
        model.path=/models/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 model.text_model_dir=/models/BiomedBERT
    medtune run zero_shot_classify --config chexpert_concepts concepts.book=mavl_concepts.json ...
    medtune score outputs/zero_shot_classify_demo/predictions.jsonl

Features (all set in the config):

- **Model**: any dual-encoder ``_component_`` (``medtune.models.dual_encoder.open_clip_dual_encoder``:
  BiomedCLIP or any open_clip folder, e.g. the ``open_clip/`` export of ``contrastive_pretrain``);
  ``checkpoint`` loads a ``contrastive_pretrain`` checkpoint folder (``epoch_k/``) into it.
- **mode: prompts**: per class, ``prompts.templates`` (``"a chest x-ray showing {}."``) filled with
  ``prompts.class_names`` (default: the class name in lower case), embedded, L2-normalised,
  averaged and re-normalised, as open_clip's zero-shot classifier; with ``prompts.negative``
  (e.g. ``["no finding"]``) each class is scored against the negative prompt by a 2-way softmax
  (multi-label), else by a softmax over the classes.
- **mode: concepts**: a MAVL concept book JSON ``{disease: [aspect sentences]}``
  (``concepts.book``); each aspect against ``concepts.normal`` by a 2-way softmax, averaged per disease.
- **mode: mavl**: a MAVL model (``medtune.models.mavl.mavl_model``; ``checkpoint`` is a
  ``mavl_pretrain`` folder ``epoch_k/`` or MAVL's released ``.pth``, read through
  ``medtune.models.convert.mavl``); per class, the present-probability of the MAVL entity it maps to
  (``mavl.class_map`` overrides MAVL's per-dataset maps in ``medtune.eval.mavl_zero_shot``), as
  MAVL's ``Zero-shot_classification/test.py`` (``mavl.mode: feature``; ``mavl.mode: text`` scores
  from the global concept similarities, as MAVL's COVIDx config). No tokenizer is needed.
  COVIDx (``covidx_mavl``) and PadChest (``padchest_mavl``, MAVL's seen classes) read the
  downloaded files through ``medtune.data.covidx_padchest``.
  ``mavl.grounding`` (``thresholds``, ``concepts``, ``overlays``): zero-shot grounding as MAVL's
  ``Zero-shot_grounding/test.py`` on the positive images of items with boxes (RSNA) or run-length
  masks (SIIM-ACR) (``medtune.data.mavl_splits``): pointing game, IoU and Dice per threshold
  (``medtune.eval.grounding``) in ``grounding.json``; ``overlays: n`` writes n PNGs per class.
- **mode: linear_probe**: a linear head on frozen image features, trained on ``train_dataset``
  (``probe.epochs``, ``probe.lr``, ``probe.weight_decay``); saved in ``output_dir/linear_probe/``.
- **mode: retrieval**: ``dataset`` is an image-caption reader; writes ``retrieval.safetensors``
  (BLIP's rules; ITM re-ranking of the top ``retrieval.k_test`` when the model has an ITM head).
- **Data**: ChestX-ray14 / CheXpert (``uncertain: ones | zeros | ignore``) / RSNA Pneumonia /
  SIIM-ACR readers in ``medtune.data.classification``; ``classes`` picks the classes scored
  (default: all the reader labels). ``val_dataset`` (optional) is predicted too, so ``metrics.json``
  holds F1 and accuracy at validation-chosen thresholds besides MAVL's test-chosen ones.
- **Output**: ``output_dir/predictions.jsonl`` (one row per image: ``id, dataset, split, image,
  labels {class: 0|1}, scores {class: float}, rule``), ``val_predictions.jsonl``, ``metrics.json``
  (``medtune score`` prints the same); the rule used is in every row and in ``metrics.json``.
- **Bad input** stops with one ``zero_shot_classify: error:`` line naming the file, row or key.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medtune.eval import zero_shot as zs
from medtune.utils.config import (
    cfg_get,
    check_keys,
    non_negative,
    one_of,
    optional_component,
    positive,
)
from medtune.utils.distributed import resolve_device
from medtune.utils.errors import ConfigError, UserError, run_entry

SUPPORTS_DISTRIBUTED = False

MODES = ("prompts", "concepts", "linear_probe", "retrieval", "mavl")
KNOWN_KEYS = {
    "output_dir", "assets_dir", "data_dir", "model", "tokenizer", "checkpoint", "mode", "dataset",
    "val_dataset", "train_dataset", "classes", "prompts", "concepts", "probe", "retrieval",
    "batch_size", "num_workers", "device", "seed", "mavl", "books_dir", "text_model_dir",
}  # fmt: skip


class ZeroShotClassifyRecipe:
    """See the module docstring."""

    name = "zero_shot_classify"

    def __init__(self, cfg: DictConfig) -> None:
        check_keys(cfg, KNOWN_KEYS, self.name)
        self.cfg = cfg
        self.output_dir = Path(cfg_get(cfg, "output_dir", str))
        self.mode = cfg_get(cfg, "mode", str, check=one_of(*MODES))
        self.device = resolve_device(cfg_get(cfg, "device", str, "auto"))
        self.batch_size = cfg_get(cfg, "batch_size", int, 64, check=positive())
        self.num_workers = cfg_get(cfg, "num_workers", int, 0, check=non_negative())
        self.seed = cfg_get(cfg, "seed", int, 0)

    def setup(self) -> None:
        torch.manual_seed(self.seed)
        self.model = config.instantiate(self.cfg.model)
        if self.mode == "mavl":
            return self._setup_mavl()
        if not hasattr(self.model, "encode_image"):
            raise ConfigError("model: expected a medtune.models.dual_encoder.DualEncoder builder")
        ck = cfg_get(self.cfg, "checkpoint", str, None)
        if ck:
            from medtune.training.checkpointing import read_trained

            sd = read_trained(ck, "checkpoint")
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
            if unexpected or [k for k in missing if not k.startswith("itm.")]:
                raise UserError(
                    f"checkpoint: {ck} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
        self.model.to(self.device).eval()
        self.tokenizer = config.instantiate(self.cfg.tokenizer, self.model)
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def _setup_mavl(self) -> None:
        if not hasattr(self.model, "presence"):
            raise ConfigError("model: mode mavl expects a medtune.models.mavl.mavl_model builder")
        ck = cfg_get(self.cfg, "checkpoint", str, None)
        if ck and ck.endswith((".pth", ".pt", ".bin")):
            from medtune.models.convert.mavl import load_released_mavl

            load_released_mavl(self.model, ck)
        elif ck:
            from medtune.training.checkpointing import read_trained

            missing, unexpected = self.model.load_state_dict(
                read_trained(ck, "checkpoint"), strict=False
            )
            if missing or unexpected:
                raise UserError(f"checkpoint: {ck} does not match the model "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")  # fmt: skip
        self.model.to(self.device).eval()
        self.tokenizer = None
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def _classes(self, items) -> list[str]:
        classes = cfg_get(self.cfg, "classes", list, None)
        if classes:
            known = {c for it in items for c in it.labels}
            bad = [c for c in classes if c not in known]
            if bad:
                raise ConfigError(
                    f"classes: {bad} are not labels of the dataset (it has {sorted(known)})"
                )
            return list(classes)
        seen: dict[str, None] = {}
        for it in items:
            seen.update(dict.fromkeys(it.labels))
        return list(seen)

    def _scores(self, items, classes: list[str]) -> tuple[torch.Tensor, str]:
        if self.mode == "mavl":
            from medtune.eval import mavl_zero_shot as mz

            mode = cfg_get(self.cfg, "mavl.mode", str, "feature", check=one_of(*mz.RULES))
            scores = mz.mavl_scores(
                self.model, items, classes, cfg_get(self.cfg, "mavl.class_map", dict, None),
                batch_size=self.batch_size, device=self.device, num_workers=self.num_workers, mode=mode,
            )  # fmt: skip
            return scores, mz.RULES[mode]
        feats = zs.embed_images(self.model, [str(it.image) for it in items], batch_size=self.batch_size,
                                device=self.device, num_workers=self.num_workers)  # fmt: skip
        cfg = self.cfg
        if self.mode == "prompts":
            templates = cfg_get(cfg, "prompts.templates", list)
            return zs.prompt_scores(
                self.model, self.tokenizer, feats, classes, templates,
                class_names=cfg_get(cfg, "prompts.class_names", dict, None),
                negative=cfg_get(cfg, "prompts.negative", list, None), device=self.device,
            )  # fmt: skip
        if self.mode == "concepts":
            book = zs.read_concept_book(cfg_get(cfg, "concepts.book", str))
            normal = cfg_get(cfg, "concepts.normal", str, "normal")
            return zs.concept_scores(
                self.model, self.tokenizer, feats, classes, book, normal, self.device
            )
        return torch.sigmoid(self.probe(feats)).detach(), "linear_probe_sigmoid"

    def _train_probe(self, classes: list[str]) -> None:
        if not self.cfg.get("train_dataset"):
            raise ConfigError(
                "train_dataset: mode linear_probe needs a train split to fit the head"
            )
        items = config.instantiate(self.cfg.train_dataset)
        feats = zs.embed_images(self.model, [str(it.image) for it in items], batch_size=self.batch_size,
                                device=self.device, num_workers=self.num_workers)  # fmt: skip
        y, known = zs.label_matrix(items, classes)
        self.probe = zs.train_linear_probe(
            feats, y, known,
            epochs=cfg_get(self.cfg, "probe.epochs", int, 200, check=positive()),
            lr=cfg_get(self.cfg, "probe.lr", float, 1e-2, check=positive()),
            weight_decay=cfg_get(self.cfg, "probe.weight_decay", float, 1e-4, check=non_negative()),
            seed=self.seed,
        )  # fmt: skip
        from medtune.training.checkpointing import save_trained

        sd = {k: v.detach().contiguous() for k, v in self.probe.state_dict().items()}
        save_trained(
            sd, self.output_dir / "linear_probe", OmegaConf.to_yaml(self.cfg, resolve=True)
        )
        (self.output_dir / "linear_probe" / "classes.json").write_text(json.dumps(classes))

    def train(self) -> dict:
        """Predict (and for a linear probe, fit first); write predictions and metrics."""
        from medtune.utils.jsonl import write_jsonl_atomic, write_text_atomic

        if self.mode == "retrieval":
            return self._retrieval()
        from medtune.eval.classification_metrics import score_classification_rows

        items = config.instantiate(self.cfg.dataset)
        if not items:
            raise UserError("dataset: no images")
        classes = self._classes(items)
        if self.mode == "linear_probe":
            self._train_probe(classes)
        scores, rule = self._scores(items, classes)
        rows = zs.prediction_rows(items, classes, scores, rule)
        write_jsonl_atomic(self.output_dir / "predictions.jsonl", rows)
        val_rows = None
        if optional_component(self.cfg, "val_dataset") is not None:  # val_dataset=null: off
            val = config.instantiate(self.cfg.val_dataset)
            vs, _ = self._scores(val, classes)
            val_rows = zs.prediction_rows(val, classes, vs, rule)
            write_jsonl_atomic(self.output_dir / "val_predictions.jsonl", val_rows)
        metrics = score_classification_rows(rows, val_rows)
        metrics["rule"] = rule
        write_text_atomic(self.output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        print(f"{rule}: auroc_macro {metrics['auroc_macro']} | f1_max_mavl {metrics['f1_max_mavl']} "
              f"| {len(rows)} images, {len(classes)} classes -> {self.output_dir / 'predictions.jsonl'}")  # fmt: skip
        if self.mode == "mavl" and self.cfg.get("mavl", {}).get("grounding"):
            self._grounding(items, classes)
        return metrics

    def _grounding(self, items, classes: list[str]) -> None:
        """MAVL zero-shot grounding of each class on its positive images -> ``grounding.json``."""
        from medtune.eval.grounding import MAVL_THRESHOLDS
        from medtune.eval.mavl_zero_shot import mavl_grounding
        from medtune.utils.jsonl import write_text_atomic

        g = self.cfg.mavl.grounding
        thresholds = cfg_get(self.cfg, "mavl.grounding.thresholds", list, None) or list(
            MAVL_THRESHOLDS
        )
        results = {}
        for c in classes:
            results[c] = mavl_grounding(
                self.model, items, c, cfg_get(self.cfg, "mavl.class_map", dict, None),
                thresholds=thresholds, concepts=g.get("concepts"),
                overlay_dir=self.output_dir / "overlays" / c,
                max_overlays=cfg_get(self.cfg, "mavl.grounding.overlays", int, 0, check=non_negative()),
                batch_size=self.batch_size, device=self.device,
            )  # fmt: skip
            r = results[c]
            print(f"grounding {c} ({r['entity']}): {r['n']} positive images | pointing_game "
                  f"{r['pointing_game']} | dice {r.get('dice_best_test_threshold_mavl')} iou "
                  f"{r.get('iou_best_test_threshold_mavl')} at th {r.get('best_test_threshold_mavl')} "
                  "(MAVL's rule: threshold chosen on this set)")  # fmt: skip
        write_text_atomic(self.output_dir / "grounding.json", json.dumps(results, indent=2) + "\n")

    def _retrieval(self) -> dict:
        from medtune.eval.retrieval_metrics import itm_eval, save_retrieval
        from medtune.eval.retrieval_scores import retrieval_scores
        from medtune.utils.jsonl import write_text_atomic

        samples = config.instantiate(self.cfg.dataset)
        sims = retrieval_scores(
            self.model, self.tokenizer, samples, batch_size=self.batch_size, device=self.device,
            k_test=cfg_get(self.cfg, "retrieval.k_test", int, 128, check=positive()),
            num_workers=self.num_workers,
        )  # fmt: skip
        save_retrieval(self.output_dir / "retrieval.safetensors", sims["sim_i2t"], sims["txt2img"],
                       sims.get("sim_t2i"), metadata={"rule": sims["rule"]})  # fmt: skip
        metrics = itm_eval(sims["sim_i2t"], sims.get("sim_t2i"), sims["txt2img"])
        write_text_atomic(
            self.output_dir / "metrics.json",
            json.dumps({**metrics, "rule": sims["rule"]}, indent=2) + "\n",
        )
        print("retrieval | " + " | ".join(f"{k}:{v:.2f}" for k, v in metrics.items()))
        return metrics

    def cleanup(self) -> None:
        pass


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = ZeroShotClassifyRecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_entry("zero_shot_classify", recipe_main))
