"""Zero-shot and linear-probe classification with a dual encoder (CLIP prompts, MAVL concept books).

Rules (each named in the output as ``rule``):

- ``prompts_softmax_over_classes``: open_clip's zero-shot classifier
  (``open_clip.build_zero_shot_classifier``: each class's prompts from ``templates`` embedded,
  L2-normalised, averaged, re-normalised); score = softmax over the classes of
  ``logit_scale * cosine`` (single-label, as open_clip's ImageNet evaluation).
- ``prompts_vs_negative_softmax``: the same class embeddings, and the embedding of the
  ``negative`` prompts (e.g. "no finding"); per class score = softmax over (class, negative) of
  ``logit_scale * cosine``, taken for the class (multi-label, each class on its own).
- ``concepts_vs_normal_softmax_mean``: a MAVL concept book ``{disease: [aspect sentences]}``; each
  aspect embedded alone and scored against the ``normal`` prompt by a 2-way softmax of
  ``logit_scale * cosine``; the disease score is the mean over its aspects.
- ``linear_probe_sigmoid``: a linear layer on the frozen L2-normalised image features, trained with
  BCE on the labelled classes of the train split; score = sigmoid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medtune.utils.errors import UserError


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], transform: dict):
        from medtune.data.images import image_transform

        self.paths, self.transform = paths, image_transform(**transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from medtune.data.images import load_image

        return self.transform(load_image(self.paths[i]))


@torch.no_grad()
def embed_images(
    model, paths: list[str], *, batch_size: int = 64, device="cpu", num_workers: int = 0
) -> torch.Tensor:
    """Args: paths: n image files. Returns: L2-normalised image features float [n, d] (CPU)."""
    loader = torch.utils.data.DataLoader(
        _Images(paths, model.transform), batch_size=batch_size, num_workers=num_workers
    )
    return torch.cat([model.encode_image(x.to(device)).float().cpu() for x in loader])


@torch.no_grad()
def prompt_embeddings(
    model, tokenizer, names: list[str], templates: list[str], device="cpu"
) -> torch.Tensor:
    """open_clip's zero-shot classifier weights. Returns: float [len(names), d], unit rows."""
    from open_clip import build_zero_shot_classifier

    for t in templates:
        if "{}" not in t:
            raise UserError(f"prompts.templates: {t!r} has no '{{}}' for the class name")
    w = build_zero_shot_classifier(
        model, tokenizer, names, templates, num_classes_per_batch=None, device=device
    )
    return w.T.float().cpu()


@torch.no_grad()
def prompt_scores(
    model,
    tokenizer,
    image_features: torch.Tensor,
    classes: list[str],
    templates: list[str],
    class_names: dict[str, str] | None = None,
    negative: list[str] | None = None,
    device="cpu",
) -> tuple[torch.Tensor, str]:
    """Args: image_features [n, d] unit rows; classes: C names (``class_names`` maps a class to the
    words put into the templates). Returns: (scores [n, C], rule)."""
    names = [(class_names or {}).get(c, c.replace("_", " ").lower()) for c in classes]
    w = prompt_embeddings(model, tokenizer, names, templates, device)
    scale = float(model.logit_scale())
    logits = scale * image_features @ w.T
    if not negative:
        return logits.softmax(1), "prompts_softmax_over_classes"
    neg = F.normalize(
        model.encode_text(tokenizer(list(negative)).to(device)).float().cpu().mean(0), dim=0
    )
    neg_logit = scale * image_features @ neg  # [n]
    pair = torch.stack([logits, neg_logit[:, None].expand_as(logits)], -1)
    return pair.softmax(-1)[..., 0], "prompts_vs_negative_softmax"


def read_concept_book(path: str | Path) -> dict[str, list[str]]:
    """A MAVL concept book: JSON ``{disease: [aspect sentence, ...]}``."""
    try:
        book = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"concept book not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(book, dict) or not all(
        isinstance(v, list) and v and all(isinstance(a, str) for a in v) for v in book.values()
    ):
        raise UserError(
            f"{path}: expected {{disease: [aspect sentences]}} with at least one aspect each"
        )
    return book


@torch.no_grad()
def concept_scores(
    model,
    tokenizer,
    image_features: torch.Tensor,
    classes: list[str],
    book: dict[str, list[str]],
    normal: str,
    device="cpu",
) -> tuple[torch.Tensor, str]:
    """MAVL's rule (module docstring). Returns: (scores [n, C], rule)."""
    missing = [c for c in classes if c not in book]
    if missing:
        raise UserError(
            f"concept book has no entry for class(es) {missing} (it has {sorted(book)})"
        )
    scale = float(model.logit_scale())
    normal_f = model.encode_text(tokenizer([normal]).to(device)).float().cpu()[0]
    out = []
    for c in classes:
        aspects = model.encode_text(tokenizer(book[c]).to(device)).float().cpu()  # [A, d]
        pos = scale * image_features @ aspects.T  # [n, A]
        neg = (scale * image_features @ normal_f)[:, None].expand_as(pos)
        out.append(torch.stack([pos, neg], -1).softmax(-1)[..., 0].mean(1))
    return torch.stack(out, 1), "concepts_vs_normal_softmax_mean"


def train_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    epochs: int = 200,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> nn.Linear:
    """Full-batch BCE training of ``Linear(d, C)``. Args: features [n, d]; labels float [n, C];
    mask bool [n, C] (False: the label is unknown and left out)."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(features.shape[1], labels.shape[1])
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = F.binary_cross_entropy_with_logits(head(features), labels, reduction="none")
        loss = (loss * mask).sum() / mask.sum().clamp(min=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def label_matrix(items: list[Any], classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``LabeledImage`` labels -> (labels float [n, C], known bool [n, C])."""
    y = torch.zeros(len(items), len(classes))
    known = torch.zeros(len(items), len(classes), dtype=torch.bool)
    for i, it in enumerate(items):
        for j, c in enumerate(classes):
            if c in it.labels:
                y[i, j], known[i, j] = float(it.labels[c]), True
    return y, known


def prediction_rows(
    items: list[Any], classes: list[str], scores: torch.Tensor, rule: str
) -> list[dict]:
    """Predictions JSONL rows: ``id, dataset, split, image, labels, scores, rule``."""
    rows = []
    for it, s in zip(items, scores.tolist()):
        rows.append({
            "id": it.id, "dataset": it.dataset, "split": it.split, "image": str(it.image),
            "labels": {c: int(it.labels[c]) for c in classes if c in it.labels},
            "scores": dict(zip(classes, s)), "rule": rule,
        })  # fmt: skip
    return rows
