"""Clinical efficacy of chest X-ray reports: CheXbert labels and F1, as RadEval's F1CheXbert.

The labeler is CheXbert (Smit et al. 2020, ``stanfordmlgroup/CheXbert`` ``src/models/bert_labeler.py``):
a BERT-base encoder, dropout 0.1 on the [CLS] state and 14 linear heads, 13 with 4 classes
(0 blank, 1 positive, 2 negative, 3 uncertain) and the last ("No Finding") with 2 (0 blank,
1 positive). Each report is labelled by the argmax of each head; as in RadEval's ``F1CheXbert``
(``mode="rrg"``) and the ``f1chexbert`` package, positive and uncertain count as 1, blank and
negative as 0. Generated and reference reports are labelled alike and compared with sklearn's
``classification_report`` over the 14 observations and over the 5 (Cardiomegaly, Edema,
Consolidation, Atelectasis, Pleural Effusion); micro, macro and weighted F1 are reported under
RadEval's names (``f1chexbert_all_micro_f1``, ``f1chexbert_5_macro_f1``, ...).

Nothing is downloaded. Point it at local files:

- a checkpoint: the released ``chexbert.pth`` (``{"model_state_dict": {"module.bert...": ...}}``),
  or a folder holding it, optionally with a BERT ``config.json`` (default: bert-base-uncased's
  shape, which is what the release was trained from);
- a tokenizer folder with bert-base-uncased's ``vocab.txt`` (default: the checkpoint folder).

The ``f1chexbert`` package (PyPI 0.0.2) implements the same rule but fetches
``bert-base-uncased`` and the checkpoint from the Hugging Face Hub at construction, so medtune
keeps its own loader and uses only torch, transformers and scikit-learn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtune.data.classification import CHEXPERT_OBSERVATIONS
from medtune.utils.errors import UserError

__all__ = [
    "CONDITIONS",
    "TOP5",
    "CheXbertLabeler",
    "load_chexbert",
    "label_reports",
    "chexbert_f1",
    "score_reports_chexbert",
]

#: The 14 observations in the heads' order (CheXbert ``src/constants.py``).
CONDITIONS = (*CHEXPERT_OBSERVATIONS, "No Finding")
TOP5 = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
CHECKPOINT_NAME = "chexbert.pth"
MAX_LENGTH = 512  # BERT's position limit; longer reports are truncated (as RadEval)

CHEXBERT_RULES = {
    "labels": "CheXbert argmax per head; positive (1) and uncertain (3) -> 1, blank (0) and "
    "negative (2) -> 0 (RadEval F1CheXbert mode 'rrg')",
    "f1": "sklearn classification_report over reports (multi-label), zero_division 0; 'all' = "
    "14 observations, '5' = Cardiomegaly, Edema, Consolidation, Atelectasis, Pleural Effusion",
}


class CheXbertLabeler(nn.Module):
    """BERT + 14 linear heads, with CheXbert's module names (``bert``, ``linear_heads``).

    Args:
        config: a ``transformers.BertConfig`` (bert-base-uncased for the released checkpoint).
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(config)
        self.dropout = nn.Dropout(0.1)
        hidden = config.hidden_size
        heads = [nn.Linear(hidden, 4) for _ in range(len(CONDITIONS) - 1)]
        self.linear_heads = nn.ModuleList([*heads, nn.Linear(hidden, 2)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Head logits.

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]`` 1 for tokens, 0 for padding.

        Returns:
            14 tensors: 13 of ``[B, 4]`` and the last ``[B, 2]``.
        """
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        cls = self.dropout(hidden[:, 0])
        return [head(cls) for head in self.linear_heads]


def _checkpoint_file(checkpoint: Path) -> Path:
    path = checkpoint / CHECKPOINT_NAME if checkpoint.is_dir() else checkpoint
    if not path.is_file():
        raise UserError(
            f"CheXbert checkpoint not found: {path} (expected the released {CHECKPOINT_NAME}, or a "
            "folder holding it)"
        )
    return path


def load_chexbert(
    checkpoint: str | Path, tokenizer: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[CheXbertLabeler, Any]:
    """Build the labeler from local files (no download) and load the checkpoint strictly.

    Args:
        checkpoint: ``chexbert.pth`` or a folder holding it (and optionally ``config.json``).
        tokenizer: a folder with ``vocab.txt`` (bert-base-uncased's); default: the checkpoint's
            folder.
        device: where the model runs.

    Returns:
        ``(model in eval mode, tokenizer)``.

    Raises:
        UserError: a file is missing, or the state dict does not fit the model (names up to five
            missing / unexpected keys).
    """
    from transformers import BertConfig, BertTokenizerFast

    checkpoint = Path(checkpoint)
    path = _checkpoint_file(checkpoint)
    folder = path.parent
    config_file = folder / "config.json"
    config = BertConfig.from_json_file(str(config_file)) if config_file.is_file() else BertConfig()
    tok_dir = Path(tokenizer) if tokenizer is not None else folder
    if not (tok_dir / "vocab.txt").is_file():
        raise UserError(
            f"CheXbert tokenizer: no vocab.txt in {tok_dir} (expected a bert-base-uncased "
            "tokenizer folder)"
        )
    tok = BertTokenizerFast.from_pretrained(str(tok_dir), local_files_only=True)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types; the message is what matters
        raise UserError(f"{path}: cannot read the CheXbert checkpoint ({e})") from None
    state = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict (or {{'model_state_dict': ...}})")
    # Saved from nn.DataParallel ("module."); old transformers also stored position_ids.
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
    state.pop("bert.embeddings.position_ids", None)
    model = CheXbertLabeler(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{path}: not a CheXbert state dict for this BERT config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    return model.to(device).eval(), tok


@torch.no_grad()
def label_reports(
    model: CheXbertLabeler, tokenizer: Any, reports: Sequence[str], batch_size: int = 16
) -> list[list[int]]:
    """CheXbert labels of each report, positive/uncertain -> 1 (RadEval's ``rrg`` mode).

    Args:
        model: the labeler.
        tokenizer: its BERT tokenizer.
        reports: report texts (whitespace is normalised; an empty report is [CLS] [SEP]).
        batch_size: reports per forward pass.

    Returns:
        One list of 14 ints (0/1) per report, in :data:`CONDITIONS` order.
    """
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for s in range(0, len(reports), batch_size):
        batch = [" ".join(str(r).split()) for r in reports[s : s + batch_size]]
        enc = tokenizer(
            batch, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        logits = model(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        classes = torch.stack([h.argmax(dim=1) for h in logits], dim=1)  # [B, 14]
        out.extend(((classes == 1) | (classes == 3)).int().tolist())
    return out


def chexbert_f1(hyp_labels: Sequence[Sequence[int]], ref_labels: Sequence[Sequence[int]]) -> dict:
    """F1 of generated vs reference labels (RadEval ``F1CheXbert`` keys).

    Args:
        hyp_labels: ``[n_reports][14]`` 0/1 labels of the generated reports.
        ref_labels: the same for the references.

    Returns:
        ``{"n", "f1chexbert_{all,5}_{micro,macro,weighted}_f1", "f1chexbert_per_class": {name:
        f1}, "rules"}``.
    """
    import numpy as np
    from sklearn.metrics import classification_report

    if len(hyp_labels) != len(ref_labels) or not len(ref_labels):
        raise UserError(
            f"CheXbert F1 needs as many generated as reference reports (got {len(hyp_labels)} "
            f"and {len(ref_labels)}), at least one"
        )
    hyp, ref = np.asarray(hyp_labels, dtype=int), np.asarray(ref_labels, dtype=int)
    idx5 = [CONDITIONS.index(c) for c in TOP5]
    cr = classification_report(
        ref, hyp, target_names=list(CONDITIONS), output_dict=True, zero_division=0
    )
    cr5 = classification_report(
        ref[:, idx5], hyp[:, idx5], target_names=list(TOP5), output_dict=True, zero_division=0
    )
    out: dict[str, Any] = {"n": int(len(ref))}
    for name, rep in (("all", cr), ("5", cr5)):
        for avg in ("micro", "macro", "weighted"):
            out[f"f1chexbert_{name}_{avg}_f1"] = float(rep[f"{avg} avg"]["f1-score"])
    out["f1chexbert_per_class"] = {c: float(cr[c]["f1-score"]) for c in CONDITIONS}
    out["rules"] = dict(CHEXBERT_RULES)
    return out


def score_reports_chexbert(
    predictions: Sequence[str],
    references: Sequence[str],
    checkpoint: str | Path,
    tokenizer: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
) -> dict:
    """Label generated and reference reports with a local CheXbert and return :func:`chexbert_f1`."""
    model, tok = load_chexbert(checkpoint, tokenizer, device=device)
    hyp = label_reports(model, tok, list(predictions), batch_size)
    ref = label_reports(model, tok, list(references), batch_size)
    return chexbert_f1(hyp, ref)
