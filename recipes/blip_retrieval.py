"""BLIP image-text retrieval fine-tuning: ITC with image-id-aware positives, momentum distillation
and a queue, ITM with hard negatives from all ranks; evaluation as BLIP's: the ITC top ``k_test``
re-ranked by ITM (salesforce/BLIP ``train_retrieval.py``, ``models/blip_retrieval.py``).

    medtune run blip_retrieval --config demo
    medtune run blip_retrieval --config pubmed_brain data_dir=/data/pubmed_brain \\
        bert_dir=/models/bert-base-uncased init_from=/models/BLIP/model_base.pth
    medtune run --nproc_per_node 8 blip_retrieval --config pubmed_brain ...
    medtune score outputs/blip_retrieval_pubmed_brain/epoch_5/retrieval.safetensors

Features (all set in the config):

- **Model** (``model``: ``medtune.models.blip.blip_model`` with no decoder, as BLIP_Retrieval):
  the ``encoder`` ViT, the BERT with cross-attention from ``bert_dir``, projections, ITM head,
  momentum copies and queues (``queue_size`` a multiple of the global batch).
- **Start** (``init_from``): a released BLIP ``model_base.pth`` / ``model_base_retrieval_coco.pth``
  (key map :mod:`medtune.models.convert.blip`: refuses leftover and missing keys by name, drops
  the decoder, resizes ``pos_embed`` to the image size) or a ``blip_pretrain`` checkpoint folder.
- **Losses** (each logged: ``loss_itc``, ``loss_itm``, their sum ``loss``): ITC against the
  momentum features of the global batch and the queue, where every caption of the same image
  (``image_id``: same image file and crop) is a positive (BLIP's ``idx``-aware ``sim_targets``),
  with momentum distillation ``alpha`` (0.4) ramped from 0 over ``alpha_warmup_epochs`` (1, as
  BLIP); ITM with one hard negative per row drawn over the whole global batch (BLIP's
  ``negative_all_rank``), captions of the same image never negatives.
- **Evaluation** after each epoch on ``val_dataset`` (and ``test_dataset`` when set), BLIP's
  ``evaluation``: ITC cosine of every distinct image and caption, each row's top ``k_test``
  (256) re-scored as ITM match logit + ITC, the rest -100, both ways
  (:func:`medtune.eval.blip_retrieval.blip_retrieval_scores`); i2t / t2i R@1/5/10 and means by
  BLIP's ``itm_eval`` rules (:func:`medtune.eval.retrieval_metrics.itm_eval`), logged as
  ``val_*`` / ``test_*``; ``epoch_k/retrieval[_test].safetensors`` (``medtune score`` re-scores
  them). Under torchrun the re-ranked rows are split over ranks. The epoch of best ``val_r_mean``
  is printed (select on validation, never on test).
- **Data**: ``dataset`` etc. are any reader of one-image caption samples (``caption_json`` with
  several captions per image, ``subfigure_json``); BLIP's ``pre_caption`` (``max_words`` 30),
  ``max_length`` 35 tokens; ``augment`` (opt-in).
- **Distributed**, **optimization** (AdamW 1e-5 / wd 0.05; ``blip_cosine_lr``: cosine per epoch
  to ``min_lr`` 0 as BLIP), **checkpoints**, **resume**, **logging** and **bad input** as
  ``blip_pretrain``.
"""

from __future__ import annotations

import sys
import time

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config

from medtune.training.blip_run import (
    BLIP_KEYS,
    alpha_at,
    blip_losses,
    blip_pairs,
    close_blip_run,
    end_step,
    restore_rng_once,
    save_blip_checkpoint,
    save_mid_epoch,
    setup_blip_run,
    start_blip_run,
)
from medtune.utils.config import cfg_get, optional_component, positive
from medtune.utils.errors import run_entry
from medtune.viz.curves import plot_run

SUPPORTS_DISTRIBUTED = True

KNOWN_KEYS = BLIP_KEYS | {"val_dataset", "test_dataset", "k_test", "eval_batch_size"}
LOSSES = ("loss", "loss_itc", "loss_itm")


class BlipRetrievalRecipe:
    """BLIP retrieval fine-tuning (see the module docstring); the run's set-up and bookkeeping
    are :mod:`medtune.training.blip_run`'s, the loop is :meth:`train`."""

    def __init__(self, cfg: DictConfig) -> None:
        # BLIP's train_retrieval.py: captions of 35 tokens, alpha ramped over the first epoch
        self.run = start_blip_run(
            cfg, "blip_retrieval", KNOWN_KEYS, max_length=35, alpha_warmup_epochs=1.0
        )
        self.k_test = cfg_get(cfg, "k_test", int, 256, check=positive())
        self.eval_batch_size = cfg_get(cfg, "eval_batch_size", int, 64, check=positive())
        self.best: tuple[float, str] | None = None

    def setup(self) -> None:
        setup_blip_run(self.run, decoder=False)
        if self.run.resumed is not None:  # the best epoch so far survives a resume
            self.best = self.run.resumed.get("best")

    def save_checkpoint(self, tag: str) -> None:
        """``output_dir/<tag>/`` (every model tensor once, config) and ``recipe_state.pt``
        (with the best validation epoch so far)."""
        save_blip_checkpoint(self.run, tag, best=self.best)

    def train(self) -> None:
        """Epochs of steps; after each, BLIP's evaluation, a checkpoint and the curves."""
        run = self.run
        run.model.train()
        while run.epoch < run.epochs:
            run.sampler.set_epoch(run.epoch, skip=run.batches_done)
            run.train_set.set_epoch(run.epoch)
            t0 = time.perf_counter()
            for batch in run.loader:
                if run.batches_done >= run.n_batches:
                    break
                restore_rng_once(run)  # a resumed run: just before its first step
                alpha = alpha_at(run, run.epoch, run.batches_done)
                # captions of one image (image_id) are ITC positives, never ITM negatives
                out = blip_losses(run, batch, alpha, idx=batch["image_id"])
                out["loss"].backward()
                if run.clip is not None:
                    nn.utils.clip_grad_norm_(run.params, max_norm=run.clip)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
                run.scheduler.step()
                end_step(run, out, LOSSES, time.perf_counter() - t0, alpha)
                t0 = time.perf_counter()
                if save_mid_epoch(run):
                    self.save_checkpoint(f"step_{run.global_step}")
            tag = f"epoch_{run.epoch}"
            run.epoch += 1
            run.batches_done = 0
            self.end_of_epoch(tag)
            self.save_checkpoint(tag)
            if run.is_rank_zero:
                plot_run(run.output_dir)  # output_dir/plots/*.png, redrawn each epoch

    def end_of_epoch(self, tag: str) -> None:
        """BLIP's evaluation on the validation (and test) split after each epoch."""
        run, metrics = self.run, {}
        for split, key in (("val", "val_dataset"), ("test", "test_dataset")):
            node = optional_component(run.cfg, key)
            if node is not None:
                metrics.update(self.evaluate(node, split, tag))
        if run.is_rank_zero and metrics:
            if run.metric_logger is not None:
                run.metric_logger.log_dict(metrics, step=run.global_step)
            if "val_r_mean" in metrics and (
                self.best is None or metrics["val_r_mean"] > self.best[0]
            ):
                self.best = (metrics["val_r_mean"], tag)
            if self.best is not None:
                print(f"best val_r_mean {self.best[0]:.2f} at {self.best[1]}", flush=True)

    @torch.inference_mode()
    def evaluate(self, node, split: str, tag: str) -> dict[str, float]:
        """Re-ranked retrieval scores of one split; writes ``<tag>/retrieval[_test].safetensors``."""
        from medtune.eval.blip_retrieval import blip_retrieval_scores
        from medtune.eval.retrieval_metrics import itm_eval, save_retrieval
        from medtune.training.blip_data import ImagesOf

        run = self.run
        pairs = blip_pairs(run, node, train=False)
        rows, txt2img, img2txt = pairs.retrieval_index()
        tok = run.tokenizer(
            pairs.captions,
            padding="max_length",
            truncation=True,
            max_length=run.max_length,
            return_tensors="pt",
        )
        loader = torch.utils.data.DataLoader(
            ImagesOf(pairs, rows), batch_size=self.eval_batch_size, num_workers=run.num_workers
        )
        run.core.eval()
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.autocast):
            out = blip_retrieval_scores(
                run.core,
                loader,
                tok["input_ids"],
                tok["attention_mask"],
                k_test=self.k_test,
                device=run.device,
                rank=run.rank,
                world=run.world_size,
            )
        run.model.train()
        result = itm_eval(out["sim_i2t"], out["sim_t2i"], torch.tensor(txt2img), img2txt)
        metrics = {f"{split}_{k}": v for k, v in result.items()}
        if run.is_rank_zero:
            name = "retrieval.safetensors" if split == "val" else f"retrieval_{split}.safetensors"
            save_retrieval(
                run.output_dir / tag / name,
                out["sim_i2t"],
                txt2img,
                out["sim_t2i"],
                metadata={"rule": f"itm_logit_plus_itc_top{self.k_test}_else_-100", "split": split},
            )
            print(
                f"{tag} {split}: " + " ".join(f"{k} {v:.2f}" for k, v in result.items()),
                flush=True,
            )
        return metrics

    def cleanup(self) -> None:
        close_blip_run(self.run)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = BlipRetrievalRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_entry("blip_retrieval", recipe_main))
