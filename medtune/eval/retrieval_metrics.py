"""Image-text retrieval recall, with BLIP's ``itm_eval`` rules and keys.

BLIP (``salesforce/BLIP`` ``train_retrieval.py::itm_eval``) ranks by a per-row ``argsort``:

- image -> text: the rank of image ``i`` is the best (smallest) rank, in row ``i`` of ``sim_i2t``,
  among the texts that belong to image ``i`` (``img2txt[i]``); an image with no text keeps rank
  1e20, a miss that stays in the denominator;
- text -> image: the rank of text ``j`` is the rank of its image ``txt2img[j]`` in row ``j`` of
  ``sim_t2i`` (the transpose of ``sim_i2t`` when no ITM re-ranking made them differ);
- ``R@K`` = 100 * (fraction of rows with rank < K), for K = 1, 5, 10; ``*_r_mean`` the mean of the
  three; ``r_mean`` the mean of ``txt_r_mean`` and ``img_r_mean``. ``txt_*`` is image -> text.

Here a rank is the number of candidates scored strictly higher than the target, computed with one
comparison per matrix entry instead of a sort: the same number as BLIP's argsort when no scores tie
(with ties BLIP's order depends on numpy's unstable sort; this rule counts a tie in the target's
favour).

The file ``retrieval.safetensors`` holds ``sim_i2t`` float ``[n_images, n_texts]``, ``txt2img`` int64
``[n_texts]`` and optionally ``sim_t2i`` float ``[n_texts, n_images]``
(:func:`save_retrieval`, :func:`score_retrieval_file`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from medtune.utils.errors import UserError

__all__ = [
    "RETRIEVAL_KEYS",
    "RetrievalFileError",
    "itm_eval",
    "retrieval_ranks",
    "save_retrieval",
    "load_retrieval",
    "score_retrieval_file",
]

#: BLIP's itm_eval keys, in its order.
RETRIEVAL_KEYS = (
    "txt_r1",
    "txt_r5",
    "txt_r10",
    "txt_r_mean",
    "img_r1",
    "img_r5",
    "img_r10",
    "img_r_mean",
    "r_mean",
)

# Rows compared per block: bounds the boolean temporary to block x n_candidates.
_BLOCK = 1024


class RetrievalFileError(UserError, ValueError):
    """A retrieval file or matrix is not what the scorer expects; the message says what."""


def _img2txt_pairs(
    img2txt: Sequence[Sequence[int]] | None, txt2img: torch.Tensor, n_images: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, text index) pairs of the ground truth, as two int64 vectors."""
    if img2txt is None:
        return txt2img, torch.arange(txt2img.numel(), device=txt2img.device)
    if len(img2txt) != n_images:
        raise RetrievalFileError(f"img2txt has {len(img2txt)} entries, sim_i2t has {n_images} rows")
    rows = [i for i, texts in enumerate(img2txt) for _ in texts]
    cols = [int(t) for texts in img2txt for t in texts]
    dev = txt2img.device
    return torch.tensor(rows, dtype=torch.long, device=dev), torch.tensor(
        cols, dtype=torch.long, device=dev
    )


def retrieval_ranks(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor | None,
    txt2img: torch.Tensor,
    img2txt: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the ground truth, image -> text and text -> image.

    Args:
        sim_i2t: ``[n_images, n_texts]`` image-to-text scores.
        sim_t2i: ``[n_texts, n_images]`` text-to-image scores, or None for ``sim_i2t.T``.
        txt2img: ``[n_texts]`` int64, each text's image index.
        img2txt: each image's text indices (BLIP's ``img2txt``); None derives it from ``txt2img``.

    Returns:
        ``(i2t_rank [n_images], t2i_rank [n_texts])`` as float64 (an image without a text has rank
        1e20, as in BLIP).
    """
    n_images, n_texts = sim_i2t.shape
    txt2img = txt2img.to(device=sim_i2t.device, dtype=torch.long)
    pair_img, pair_txt = _img2txt_pairs(img2txt, txt2img, n_images)
    # Best-scored true text per image: rank = #texts scored strictly above it.
    best = torch.full((n_images,), float("-inf"), dtype=sim_i2t.dtype, device=sim_i2t.device)
    best = best.scatter_reduce(0, pair_img, sim_i2t[pair_img, pair_txt], reduce="amax")
    i2t = torch.empty(n_images, dtype=torch.float64, device=sim_i2t.device)
    for s in range(0, n_images, _BLOCK):
        block = sim_i2t[s : s + _BLOCK]
        i2t[s : s + _BLOCK] = (block > best[s : s + _BLOCK, None]).sum(1).double()
    has_text = torch.zeros(n_images, dtype=torch.bool, device=sim_i2t.device)
    has_text[pair_img] = True
    i2t[~has_text] = 1e20

    t2i = torch.empty(n_texts, dtype=torch.float64, device=sim_i2t.device)
    text_idx = torch.arange(n_texts, device=sim_i2t.device)
    if sim_t2i is None:
        # Columns of sim_i2t, compared in blocks without materialising the transpose.
        target = sim_i2t[txt2img, text_idx]
        for s in range(0, n_texts, _BLOCK):
            block = sim_i2t[:, s : s + _BLOCK]
            t2i[s : s + _BLOCK] = (block > target[None, s : s + _BLOCK]).sum(0).double()
    else:
        target = sim_t2i[text_idx, txt2img]
        for s in range(0, n_texts, _BLOCK):
            block = sim_t2i[s : s + _BLOCK]
            t2i[s : s + _BLOCK] = (block > target[s : s + _BLOCK, None]).sum(1).double()
    return i2t, t2i


def _recall(ranks: torch.Tensor, k: int) -> float:
    return 100.0 * float((ranks < k).sum()) / ranks.numel()


@torch.no_grad()
def itm_eval(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor | None,
    txt2img: torch.Tensor | Sequence[int],
    img2txt: Sequence[Sequence[int]] | None = None,
) -> dict[str, float]:
    """Recall at 1/5/10 both ways, BLIP's ``itm_eval`` keys and rules, vectorised.

    Args:
        sim_i2t: ``[n_images, n_texts]`` float scores (numpy arrays are accepted).
        sim_t2i: ``[n_texts, n_images]`` or None (then ``sim_i2t.T``).
        txt2img: ``[n_texts]`` each text's image index.
        img2txt: each image's text indices; None derives it from ``txt2img``.

    Returns:
        ``{"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
        "img_r_mean", "r_mean"}`` in percent (``txt_*``: image -> text).

    Raises:
        RetrievalFileError: shapes disagree, an index is out of range, or a score is NaN.
    """
    sim_i2t = torch.as_tensor(sim_i2t)
    sim_t2i = None if sim_t2i is None else torch.as_tensor(sim_t2i)
    txt2img = torch.as_tensor(txt2img)
    _check(sim_i2t, sim_t2i, txt2img)
    i2t, t2i = retrieval_ranks(sim_i2t, sim_t2i, txt2img, img2txt)
    tr = [_recall(i2t, k) for k in (1, 5, 10)]
    ir = [_recall(t2i, k) for k in (1, 5, 10)]
    tr_mean, ir_mean = sum(tr) / 3, sum(ir) / 3
    return {
        "txt_r1": tr[0],
        "txt_r5": tr[1],
        "txt_r10": tr[2],
        "txt_r_mean": tr_mean,
        "img_r1": ir[0],
        "img_r5": ir[1],
        "img_r10": ir[2],
        "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
    }


def _check(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor | None, txt2img: torch.Tensor) -> None:
    if sim_i2t.ndim != 2 or not sim_i2t.is_floating_point():
        raise RetrievalFileError(
            f"sim_i2t must be a float [n_images, n_texts] matrix, got {sim_i2t.dtype} "
            f"{list(sim_i2t.shape)}"
        )
    n_images, n_texts = sim_i2t.shape
    if n_images == 0 or n_texts == 0:
        raise RetrievalFileError(f"sim_i2t is empty ({list(sim_i2t.shape)})")
    if txt2img.ndim != 1 or txt2img.numel() != n_texts or txt2img.is_floating_point():
        raise RetrievalFileError(
            f"txt2img must be an integer vector of n_texts={n_texts} image indices, got "
            f"{txt2img.dtype} {list(txt2img.shape)}"
        )
    if int(txt2img.min()) < 0 or int(txt2img.max()) >= n_images:
        raise RetrievalFileError(
            f"txt2img holds image indices in [{int(txt2img.min())}, {int(txt2img.max())}], "
            f"expected [0, {n_images - 1}]"
        )
    if torch.isnan(sim_i2t).any():
        raise RetrievalFileError("sim_i2t holds NaN scores")
    if sim_t2i is not None:
        if sim_t2i.ndim != 2 or tuple(sim_t2i.shape) != (n_texts, n_images):
            raise RetrievalFileError(
                f"sim_t2i must be [n_texts, n_images] = [{n_texts}, {n_images}], got "
                f"{list(sim_t2i.shape)}"
            )
        if not sim_t2i.is_floating_point() or torch.isnan(sim_t2i).any():
            raise RetrievalFileError("sim_t2i must be a float matrix without NaN")


def save_retrieval(
    path: str | Path,
    sim_i2t: torch.Tensor,
    txt2img: torch.Tensor | Sequence[int],
    sim_t2i: torch.Tensor | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``retrieval.safetensors`` (checked as :func:`itm_eval` checks it).

    Args:
        path: the file to write (parent folders are created).
        sim_i2t: ``[n_images, n_texts]`` float scores.
        txt2img: ``[n_texts]`` each text's image index (stored as int64).
        sim_t2i: ``[n_texts, n_images]``, only where ITM re-ranking makes it differ from the transpose.
        metadata: string key/values stored in the safetensors header (checkpoint, dataset, ...).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    tensors = {
        "sim_i2t": torch.as_tensor(sim_i2t).detach().float().cpu().contiguous(),
        "txt2img": torch.as_tensor(txt2img).detach().to(torch.int64).cpu().contiguous(),
    }
    if sim_t2i is not None:
        tensors["sim_t2i"] = torch.as_tensor(sim_t2i).detach().float().cpu().contiguous()
    _check(tensors["sim_i2t"], tensors.get("sim_t2i"), tensors["txt2img"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    return path


def load_retrieval(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a retrieval file: ``{"sim_i2t", "txt2img"[, "sim_t2i"]}``.

    Raises:
        RetrievalFileError: not a safetensors file, or a tensor missing / unexpected.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise RetrievalFileError(f"{path}: not a readable safetensors file ({e})") from None
    missing = [k for k in ("sim_i2t", "txt2img") if k not in tensors]
    if missing:
        raise RetrievalFileError(
            f"{path}: missing tensor(s) {', '.join(missing)} (expected sim_i2t [n_images, n_texts], "
            f"txt2img [n_texts] and optionally sim_t2i [n_texts, n_images]; found {sorted(tensors)})"
        )
    extra = sorted(set(tensors) - {"sim_i2t", "txt2img", "sim_t2i"})
    if extra:
        raise RetrievalFileError(f"{path}: unexpected tensor(s) {', '.join(extra)}")
    return tensors


def score_retrieval_file(path: str | Path) -> dict[str, float]:
    """:func:`itm_eval` of a ``retrieval.safetensors`` file.

    Raises:
        RetrievalFileError: naming the file and what is wrong.
    """
    t = load_retrieval(path)
    try:
        return itm_eval(t["sim_i2t"], t.get("sim_t2i"), t["txt2img"])
    except RetrievalFileError as e:
        raise RetrievalFileError(f"{path}: {e}") from None
