"""ITM hard negatives drawn reproducibly: one column per row with probability proportional to a
weight matrix, as BLIP's and LAVIS's ``torch.multinomial(weights[b], 1)`` (salesforce/BLIP
``models/blip_pretrain.py`` / ``blip_retrieval.py``, LAVIS ``blip2_qformer.py`` ``forward``),
by inverse CDF with one generator seeded alike on every rank.

The rows and columns are visited in the order of stable sample keys (dataset indices), so the
draw of a sample depends neither on its rank nor on its position in the gathered batch: N ranks x
batch b draw what one process with batch N*b draws. The weights are the caller's (BLIP
pretraining: ``softmax + 1e-4`` with the diagonal at 0; BLIP retrieval: ``softmax`` with every
caption of the same image at 0; BLIP-2's Q-Former: as BLIP pretraining).
"""

from __future__ import annotations

import torch

from medtune.utils.errors import UserError


@torch.no_grad()
def draw_negatives(
    weights: torch.Tensor,
    generator: torch.Generator | None,
    keys: torch.Tensor | None = None,
    what: str = "ITM",
) -> torch.Tensor:
    """One column per row with probability proportional to ``weights``.

    Args:
        weights: ``[M, M]`` non-negative, zero at each row's positives (the whole global batch).
        generator: CPU generator, the same state on every rank; None: the global RNG.
        keys: ``[M]`` dataset indices; rows and columns are visited in key order.
        what: named in the error.

    Returns:
        ``[M]`` int64 column per row (never a zero-weight column), on ``weights``' device.

    Raises:
        UserError: a row has no admissible negative (every sample of the global batch has the
            same image id).
    """
    m = weights.shape[0]
    w = weights.detach().float().cpu()
    order = torch.argsort(keys.cpu(), stable=True) if keys is not None else torch.arange(m)
    w = w[order][:, order]
    cdf = w.cumsum(dim=1)
    if bool((cdf[:, -1] <= 0).any()):
        raise UserError(
            f"{what}: a sample has no negative in its global batch (all its samples share one "
            "image id): use a larger batch_size or shuffle"
        )
    cdf = cdf / cdf[:, -1:]
    u = torch.rand(m, 1, generator=generator, dtype=cdf.dtype)
    # side="right": the first column whose cdf exceeds u; a zero-weight column never does
    pick = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=m - 1)
    out = torch.empty(m, dtype=torch.long)
    out[order] = order[pick]
    return out.to(weights.device)
