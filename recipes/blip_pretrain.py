"""BLIP pretraining: ITC with momentum distillation and a queue, ITM through the image-grounded text
encoder, LM through the image-grounded text decoder (salesforce/BLIP ``pretrain.py``,
``models/blip_pretrain.py``; the brain-abnormality VLP seed's pipeline).

    medtune run blip_pretrain --config demo
    medtune run blip_pretrain --config pubmed_brain data_dir=/data/pubmed_brain \\
        bert_dir=/models/bert-base-uncased vit_checkpoint=/models/deit_base_patch16_224.pth
    medtune run --nproc_per_node 8 blip_pretrain --config pubmed_brain ...
    medtune run blip_retrieval --config pubmed_brain init_from=outputs/blip_pretrain_pubmed_brain/epoch_19

Features (all set in the config):

- **Model** (``model``: ``medtune.models.blip.blip_model``): the ``encoder`` ViT (any timm ViT
  through ``medtune.models.encoders.timm_vision``, e.g. ViT-B/16 from DeiT weights as BLIP, or
  BiomedCLIP's tower through ``biomedclip_vision``), a BERT with cross-attention in every layer
  and a decoder sharing all but its self-attention, both from the local HF BERT folder
  ``bert_dir`` (bert-base-uncased as BLIP, PubMedBERT, BiomedCLIP's text tower), 256-d
  projections, momentum copies (``momentum`` 0.995) and queues (``queue_size``, a multiple of the
  global batch). ``tokenizer``: that folder's BERT tokenizer with ``[DEC]`` and ``[ENC]``.
  ``init_from``: start from a released BLIP ``model_base.pth`` (key map
  :mod:`medtune.models.convert.blip`) or a medtune BLIP checkpoint folder.
- **Losses** (each logged: ``loss_itc``, ``loss_itm``, ``loss_lm``, and their sum ``loss``):
  ITC against the momentum features of the global batch and the queue with momentum
  distillation, ``alpha`` (0.4) ramped linearly from 0 over ``alpha_warmup_epochs`` (BLIP's
  ``pretrain.py`` ramps over 2 epochs, its ``train_retrieval.py`` over 1); ITM with one hard
  negative text per image and image per text drawn from the similarities of the whole global
  batch; LM with label smoothing 0.1 over the caption tokens.
- **Distributed** (``medtune run --nproc_per_node N``; gloo on CPU, NCCL on CUDA): the model is
  wrapped in DDP; features are gathered across ranks (with gradient where the loss needs it), the
  hard negatives are drawn with a generator seeded by ``(seed, step)`` in dataset-index order, the
  LM loss is the mean over the global batch's tokens: N ranks x ``batch_size`` give the losses and
  update of one process with batch N x ``batch_size``.
- **Data**: ``dataset``: any reader of one-image caption samples (``medtune.data.caption_json`` for
  BLIP's ``[{image, caption}]`` files, ``medtune.data.subfigures.subfigure_json`` for PubMed
  figures split into subfigures by boxes); captions cleaned as BLIP's ``pre_caption``
  (``max_words`` 30) and padded to ``max_length`` (30) tokens; ``augment`` (opt-in, seeded per
  item).
- **Optimization**: AdamW (BLIP: lr 3e-4, weight decay 0.05), ``lr_scheduler``
  (``medtune.training.blip_schedules.blip_pretrain_lr``: warm-up from ``warmup_lr`` over
  ``warmup_steps`` in epoch 0, then ``lr_decay_rate ** epoch`` down to ``min_lr``),
  ``clip_grad_norm``, ``autocast`` (bf16 on CUDA), ``max_steps_per_epoch``.
- **Checkpoints**: ``output_dir/epoch_{k}/model.safetensors`` (every tensor once, momentum copies
  and queues included, BLIP's names) + ``config.yaml``; ``save_every_n_steps`` adds
  ``step_{n}/``; ``output_dir/recipe_state.pt`` (optimizer, scheduler, step, data position, every
  RNG). ``resume_from_checkpoint=True`` continues a killed run bit for bit.
- **Logging**: stdout and ``metric_logger`` (DiskLogger); curves in ``output_dir/plots/``.
- **Bad input** stops with one ``blip_pretrain: error:`` line naming the file, row or key.
"""

from __future__ import annotations

import sys
import time

from omegaconf import DictConfig
from torch import nn
from torchtune import config

from medtune.training.blip_run import (
    BLIP_KEYS,
    alpha_at,
    blip_losses,
    close_blip_run,
    end_step,
    restore_rng_once,
    save_blip_checkpoint,
    save_mid_epoch,
    setup_blip_run,
    start_blip_run,
)
from medtune.utils.errors import run_entry
from medtune.viz.curves import plot_run

SUPPORTS_DISTRIBUTED = True

KNOWN_KEYS = BLIP_KEYS
LOSSES = ("loss", "loss_itc", "loss_itm", "loss_lm")


class BlipPretrainRecipe:
    """BLIP pretraining (see the module docstring); the run's set-up and bookkeeping are
    :mod:`medtune.training.blip_run`'s, the loop is :meth:`train`."""

    def __init__(self, cfg: DictConfig) -> None:
        # BLIP's pretrain.py: captions of 30 tokens, alpha ramped over 2 epochs
        self.run = start_blip_run(
            cfg, "blip_pretrain", KNOWN_KEYS, max_length=30, alpha_warmup_epochs=2.0
        )

    def setup(self) -> None:
        setup_blip_run(self.run, decoder=True)

    def save_checkpoint(self, tag: str) -> None:
        """``output_dir/<tag>/`` (every model tensor once, config) and ``recipe_state.pt``."""
        save_blip_checkpoint(self.run, tag)

    def train(self) -> None:
        """Epochs of steps; a checkpoint (and the curves) after each epoch (no evaluation, as
        BLIP's ``pretrain.py``)."""
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
                out = blip_losses(run, batch, alpha, idx=None)  # each pair its own positive
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
            self.save_checkpoint(tag)
            if run.is_rank_zero:
                plot_run(run.output_dir)  # output_dir/plots/*.png, redrawn each epoch

    def cleanup(self) -> None:
        close_blip_run(self.run)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = BlipPretrainRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(run_entry("blip_pretrain", recipe_main))
