"""The pieces of the fine-tuning recipes' training loop, as plain functions.

The loop itself stays in each recipe file (``medtune cp`` hands it over to edit); what every loop
did identically in the five recipe files that preceded ``vision_finetune``, ``full_finetune`` and
``lora_finetune`` lives here:

- :func:`train_batches`: every micro-batch of every epoch from the saved position on (a resumed
  run skips what it already trained on); between them, mid-epoch checkpoints, and at each epoch's
  end validation, the epoch line, the epoch checkpoint and the curves;
- :func:`answer_logits`: the forward pass, logits only at the answer positions;
- :func:`backward_and_step`: the backward pass, gradient accumulation and the update on the mean
  over the answer tokens of the global batch (summed per rank, divided by the all-reduced token count, so N processes
  with batch B train as one process with batch N*B), logging;
- :func:`validation_loss`: the validation loss with the recipe's own loss step.

A recipe's loop is then::

    for batch in train_batches(run, self._loss_step, self.save_checkpoint, plot_run):
        loss, n_tok = self._loss_step(batch)
        backward_and_step(run, loss, n_tok)

litgpt's ``finetune/lora.py`` ``fit`` is the model: one loop for 1..N processes, the collectives
no-ops on one; torchtune's ``lora_finetune_single_device.train`` the order of what happens per
step (scale, clip, step, schedule, log, checkpoint).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torchtune import training
from tqdm import tqdm

from medtune.data.packing import attention_mask
from medtune.models.medvlm import output_at
from medtune.training import checkpointing as ckpt
from medtune.training.loss import answer_targets
from medtune.training.run import Run
from medtune.training.setup import decoder_of, is_vlm
from medtune.training.trackers import group_lrs
from medtune.utils.distributed import all_reduce_sum
from medtune.utils.errors import ConfigError


class StepMeter:
    """What the micro-batches since the last optimizer step summed up: answer-token loss and
    count, the time they took; the epoch's progress bar (rank 0; ``TQDM_DISABLE=1`` hides it)."""

    def __init__(self, run: Run) -> None:
        self.params = [p for p in run.model.parameters() if p.requires_grad]
        self.loss = torch.zeros((), device=run.device)  # summed loss over answer tokens
        self.tokens = torch.zeros((), device=run.device, dtype=torch.long)
        self.t0 = time.perf_counter()
        self.pbar: tqdm | None = None
        self.stepped = False  # an optimizer step was taken since the last batch was handed out

    def reset(self) -> None:
        self.loss.zero_()
        self.tokens.zero_()
        self.t0 = time.perf_counter()


def train_batches(
    run: Run,
    loss_step: Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]],
    save_checkpoint: Callable[[str], None],
    on_epoch_end: Callable[[Any], Any],
) -> Iterator[dict[str, Any]]:
    """Yield the micro-batches of every epoch; between them, what the loop does besides its step.

    Each epoch re-seeds the dataset (augmentation, sampled templates) and the sampler, skips the
    micro-batches a resumed run already trained on, stops after ``run.steps_per_epoch *
    run.accum`` of them and shows a progress bar. After a step that :func:`backward_and_step` took,
    a ``step_{n}`` checkpoint is written when ``save_every_n_steps`` says so (not at an epoch's
    last step). At each epoch's end: validation (with the recipe's ``loss_step``), the epoch
    line, the ``epoch_{k}`` checkpoint, then ``on_epoch_end(output_dir)`` on rank 0 (the
    recipes pass :func:`medtune.viz.curves.plot_run`, which this layer may not import).

    Args:
        run: the set-up run (model, data, optimizer, position).
        loss_step: the recipe's ``batch -> (summed loss, answer tokens)``, for validation.
        save_checkpoint: the recipe's ``save_checkpoint(tag)``.
        on_epoch_end: called on rank 0 with ``run.output_dir`` after each epoch's checkpoint.
    """
    run.model.train()
    run.meter = meter = StepMeter(run)
    while run.epoch < run.epochs:
        run.data.train_ds.set_epoch(run.epoch)
        run.data.sampler.set_epoch(run.epoch, skip=run.batches_done)
        n_batches = run.steps_per_epoch * run.accum
        meter.pbar = tqdm(
            total=run.steps_per_epoch,
            initial=run.batches_done // run.accum,
            desc=f"epoch {run.epoch}",
            leave=False,
            **({} if run.is_rank_zero else {"disable": True}),  # rank 0: TQDM_DISABLE decides
        )
        meter.reset()
        for batch in run.data.train_loader:
            if run.batches_done >= n_batches:
                break
            yield batch
            if meter.stepped and (tag := step_checkpoint_due(run)):
                save_checkpoint(tag)
            meter.stepped = False
        meter.pbar.close()
        save_checkpoint(end_epoch(run, loss_step))
        if run.is_rank_zero:
            on_epoch_end(run.output_dir)


def batch_images(run: Run, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The batch's images on the device, or None for a batch without any (the encoders are
    skipped). Under FSDP every rank must run the (sharded) encoders or none may.

    Raises:
        ConfigError: this rank has no images while another rank has some.
    """
    n_img = int(batch["image_counts"].sum())
    if run.world_size > 1:
        ranks_with = int(all_reduce_sum(torch.tensor(int(n_img > 0), device=run.device)))
        if 0 < ranks_with < run.world_size and n_img == 0:
            raise ConfigError(
                f"dataset: rank {run.rank} got a batch without images while other ranks have "
                "images; mix text-only and image samples within each batch"
            )
    if n_img == 0:
        return None
    return {k: v.to(run.device) for k, v in batch["images"].items()}


def answer_logits(
    run: Run, batch: dict[str, Any], autocast: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass of a MedVLM (or a bare Llama-3 on text-only samples).

    Args:
        run: the run (its model, device, ranks).
        batch: a collated batch (``tokens`` [b, s], ``labels`` [b, s], ``images``,
            ``image_counts``; packed rows add ``input_pos`` and the block-diagonal mask).
        autocast: run under bf16 autocast.

    Returns:
        ``(logits [n, vocab], targets [b, s], keep [b, s])``: logits only at the ``n`` answer
        positions (``keep``), next-token targets.

    Raises:
        ConfigError: a bare Llama-3 is given samples with images.
    """
    model = run.model
    tokens = batch["tokens"].to(run.device)  # [b, s]
    targets, keep = answer_targets(batch["labels"].to(run.device))  # [b, s], [b, s]
    inputs: dict[str, Any] = {}
    if "input_pos" in batch:  # packed rows: block-diagonal causal mask, positions per sample
        inputs["mask"] = attention_mask(batch, run.device)
        inputs["input_pos"] = batch["input_pos"].to(run.device)
    if is_vlm(model):
        inputs["images"] = batch_images(run, batch)  # encoders -> [n_img, 3, H, W]
        inputs["image_counts"] = batch["image_counts"]
    elif int(batch["image_counts"].sum()):
        raise ConfigError(
            f"dataset: samples {batch['ids']} hold images but the model is a text-only Llama-3 "
            "(use medtune.data.drop_images, or a MedVLM builder)"
        )
    with (
        torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=autocast),
        output_at(decoder_of(model)[0], keep),  # logits only where there is a target
    ):
        return model(tokens, **inputs), targets, keep


def backward_and_step(run: Run, loss: torch.Tensor, n_tok: torch.Tensor) -> bool:
    """Backward of one micro-batch's loss; the optimizer step once ``accum`` micro-batches are in.

    The update is on the mean loss over the answer tokens of the global (accumulated) batch: the
    gradients hold the summed loss of this rank's tokens and FSDP averages them over ranks, so
    they are scaled by ``world_size / global tokens``. Then clipping (``clip_grad_norm``), the
    optimizer and schedule steps, the step's loss appended to ``run.loss_history`` and logged
    every ``log_every_n_steps`` (loss, lr, tokens/s per device, grad norm).

    Args:
        run: the run.
        loss: the micro-batch's summed loss over its answer tokens (``[]``).
        n_tok: its number of answer tokens (``[]``).

    Returns:
        Whether a step was taken.
    """
    loss.backward()
    meter = run.meter
    meter.loss += loss.detach()
    meter.tokens += n_tok
    run.batches_done += 1
    if run.batches_done % run.accum:
        return False  # gradient accumulation: no update yet
    glob_tok = all_reduce_sum(meter.tokens.clone()).clamp(min=1)
    step_loss = float(all_reduce_sum(meter.loss.clone()) / glob_tok)
    training.scale_grads(run.model, run.world_size / glob_tok)
    grad_norm = None
    if run.clip is not None:
        grad_norm = ckpt.full_tensor(nn.utils.clip_grad_norm_(meter.params, max_norm=run.clip))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.lr_scheduler.step()
    run.global_step += 1
    run.loss_history.append(step_loss)
    if run.is_rank_zero and run.global_step % run.log_every == 0:
        lr = run.optimizer.param_groups[0]["lr"]
        metrics = {
            "loss": step_loss,
            "lr": lr,
            "tokens_per_second_per_gpu": float(meter.tokens) / (time.perf_counter() - meter.t0),
        }
        metrics.update(group_lrs(run.optimizer))  # lr_encoder, lr_connector, ... (2+ groups)
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if run.metric_logger is not None:
            run.metric_logger.log_dict(metrics, step=run.global_step)
        tqdm.write(f"step {run.global_step} epoch {run.epoch} loss {step_loss:.4f} lr {lr:.2e}")
    meter.pbar.update(1)
    meter.reset()
    meter.stepped = True
    return True


def step_checkpoint_due(run: Run) -> str | None:
    """The tag of a mid-epoch checkpoint (``save_every_n_steps``) due now, else None (none is
    written at the epoch's last step: the epoch checkpoint follows)."""
    if (
        run.save_every
        and run.global_step % run.save_every == 0
        and run.batches_done < run.steps_per_epoch * run.accum
    ):
        return f"step_{run.global_step}"
    return None


@torch.no_grad()
def validation_loss(
    run: Run, loss_step: Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """Mean loss over every answer token of the validation set (all ranks), with the recipe's
    own ``loss_step(batch) -> (loss_sum, n_tokens)``."""
    model = run.model
    model.eval()
    tot = torch.zeros((), device=run.device)
    n = torch.zeros((), device=run.device, dtype=torch.long)
    for batch in run.data.val_loader:
        loss, k = loss_step(batch)
        tot += loss.detach()
        n += k
    model.train()
    return float(all_reduce_sum(tot) / all_reduce_sum(n).clamp(min=1))


def end_epoch(
    run: Run, loss_step: Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]
) -> str:
    """Validate (when there is a validation set), print the epoch's line, move to the next epoch.

    Returns:
        The tag of the epoch's checkpoint (``epoch_{k}``).
    """
    last = run.loss_history[-1] if run.loss_history else math.nan
    msg = f"epoch {run.epoch} done: train loss {last:.4f}"
    if run.data.val_loader is not None:
        val = validation_loss(run, loss_step)
        msg += f", validation loss {val:.4f}"
        if run.metric_logger is not None:
            run.metric_logger.log_dict({"val_loss": val}, step=run.global_step)
    if run.is_rank_zero:
        print(msg, flush=True)
    run.epoch += 1
    run.batches_done = 0
    return f"epoch_{run.epoch - 1}"
