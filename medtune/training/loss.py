"""The answer-token loss of the training recipes, as a config component.

A recipe builds targets from the labels (:func:`answer_targets`), asks the model for logits at
the answer positions only (:func:`medtune.models.medvlm.output_at`), and calls the loss on those
rows::

    targets, keep = answer_targets(labels)                  # [b, s], [b, s]
    with output_at(decoder, keep):
        logits = model(tokens, images=images, image_counts=counts)   # [n_keep, vocab]
    loss_sum = self.loss_fn(logits, targets[keep])          # summed over answer tokens
    n_tokens = keep.sum()

The recipe divides by the number of answer tokens of the whole (global, accumulated) batch, so N
processes with batch B give the same loss and update as one process with batch N*B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def answer_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets and the positions that have one.

    Args:
        labels: [b, s] token ids, ``IGNORE_INDEX`` where there is no loss; position t predicts
            ``labels[:, t + 1]``.

    Returns:
        ``(targets [b, s], keep [b, s] bool)``: ``targets[:, t] = labels[:, t + 1]`` (the last
        position gets ``IGNORE_INDEX``), ``keep = targets != IGNORE_INDEX``.
    """
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    return targets, targets != IGNORE_INDEX


class AnswerCrossEntropy(nn.Module):
    """Summed cross-entropy over answer tokens (logits in fp32 whatever the compute dtype).

    Args:
        label_smoothing: as ``torch.nn.functional.cross_entropy``.

    Call with ``logits`` [n, vocab] (the answer positions, or [b, s, vocab] with ``targets`` [b, s]
    holding ``IGNORE_INDEX`` elsewhere) and ``targets`` of the matching shape; returns the sum [].
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 3:  # every position: [b, s, vocab] -> [b*s, vocab]
            logits, targets = logits.flatten(0, 1), targets.flatten()
        return F.cross_entropy(
            logits.float(),
            targets,
            reduction="sum",
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
        )


def answer_loss_sum(
    forward,
    decoder: nn.Module,
    labels: torch.Tensor,
    autocast: bool = False,
    select: bool = True,
    loss_fn: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipes' loss lines as one call (for benchmarks and tests that time or compare them).

    Args:
        forward: runs the model on the batch and returns its logits.
        decoder: the Llama-3 decoder inside the model (its output layer is restricted to the
            answer positions with :func:`~medtune.models.medvlm.output_at`).
        labels: [b, s] token ids, ``IGNORE_INDEX`` where there is no loss.
        autocast: run ``forward`` under bf16 autocast on the labels' device.
        select: compute logits only at the answer positions (False: at every position).
        loss_fn: the loss component (default :class:`AnswerCrossEntropy`).

    Returns:
        ``(loss_sum [], n_tokens [])``.
    """
    import contextlib

    from medtune.models.medvlm import output_at

    loss_fn = loss_fn or AnswerCrossEntropy()
    targets, keep = answer_targets(labels)
    with (
        torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=autocast),
        output_at(decoder, keep) if select else contextlib.nullcontext(),
    ):
        logits = forward()
    return loss_fn(logits, targets[keep] if logits.dim() == 2 else targets), keep.sum()
