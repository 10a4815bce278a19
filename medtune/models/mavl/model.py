"""The MAVL model: concept queries decoded against image patches, per-entity presence, location
embeddings and a global concept-image similarity.

Followed: ``Pretrain/models/model_MAVL.py`` (``MAVL.__init__`` / ``forward``) and
``Zero-shot_classification/models/model_MAVL.py`` (inference outputs) of HieuPhan33/CVPR2024_MAVL.
Differences, on purpose: the losses live in :mod:`medtune.models.mavl.losses` (the module returns
outputs only); the books are non-persistent buffers filled by the builder (MAVL keeps them as plain
attributes, so neither is in a checkpoint); MAVL's ``Dropout2d`` on the ``[Q, B, d]`` decoder output
drops whole concept rows (PyTorch reads a 3-D input as one unbatched ``(C, H, W)`` image), which
:meth:`MAVL._drop_concepts` does explicitly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medtune.models.mavl.backbone import MAVLImageEncoder, ResNetTrunk
from medtune.models.mavl.books import ANATOMY, ENTITIES
from medtune.models.mavl.decoder import QueryDecoder, QueryDecoderLayer


class MAVL(nn.Module):
    """Multi-aspect vision-language matching.

    Args:
        image: the image encoder (patch grid + global feature, both ``d_model`` wide).
        entities: entity names (MAVL's 75, plus any added for zero-shot, e.g. ``covid19``).
        n_concepts: K, concepts per entity (the description + the aspects; MAVL: 1 + 8 = 9).
        d_model: decoder width (256); heads: decoder heads (4); num_layers: decoder layers (4).
        text_width: width of the book embeddings (768 for BERT-base).
        dim_feedforward: decoder FFN width (1024); dropout: decoder and concept dropout (0.1).
        global_concept_idx: concepts used by the global contrastive term (default: all K).

    Buffers (non-persistent, set by :meth:`set_books`): ``anatomy_book [52, text_width]`` and
    ``concept_book [E * K, text_width]`` (row ``e * K + k``).
    """

    def __init__(
        self,
        image: MAVLImageEncoder,
        entities: list[str] | tuple[str, ...] = ENTITIES,
        n_concepts: int = 9,
        *,
        d_model: int = 256,
        heads: int = 4,
        num_layers: int = 4,
        text_width: int = 768,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        self_attention: bool = True,
        global_concept_idx: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.entities = list(entities)
        self.n_entities, self.n_concepts, self.d_model = len(self.entities), n_concepts, d_model
        self.text_width = text_width
        self.global_concept_idx = list(global_concept_idx or range(n_concepts))
        self.concept_dropout = dropout
        self.image = image
        self.query_proj = nn.Linear(text_width, d_model)
        layer = QueryDecoderLayer(d_model, heads, dim_feedforward, dropout, self_attention)
        self.decoder = QueryDecoder(layer, num_layers, d_model)
        self.location_emb = nn.Conv1d(
            d_model, text_width, kernel_size=n_concepts, stride=n_concepts
        )
        self.classifier = nn.Linear(d_model * n_concepts, 2)
        self.temp = nn.Parameter(torch.full((len(self.global_concept_idx),), math.log(1 / 0.07)))
        self.register_buffer(
            "anatomy_book", torch.zeros(len(ANATOMY) + 1, text_width), persistent=False
        )
        self.register_buffer(
            "concept_book", torch.zeros(self.n_entities * n_concepts, text_width), persistent=False
        )
        self.apply(_init_weights)

    def set_books(self, anatomy: torch.Tensor, concepts: torch.Tensor) -> None:
        """Args: anatomy ``[52, T]``; concepts ``[E * K, T]`` (see :func:`books.encode_books`)."""
        if tuple(anatomy.shape) != tuple(self.anatomy_book.shape) or tuple(concepts.shape) != tuple(
            self.concept_book.shape
        ):
            raise ValueError(
                f"books of shape {tuple(anatomy.shape)} / {tuple(concepts.shape)}, the model has "
                f"{tuple(self.anatomy_book.shape)} / {tuple(self.concept_book.shape)}"
            )
        self.anatomy_book.copy_(anatomy)
        self.concept_book.copy_(concepts)

    def _drop_concepts(self, x: torch.Tensor) -> torch.Tensor:
        """MAVL's ``Dropout2d`` on ``[Q, B, d]``: each concept row is dropped for the whole batch."""
        if not self.training or self.concept_dropout == 0:
            return x
        keep = torch.empty(x.shape[0], 1, 1, device=x.device, dtype=x.dtype)
        keep.bernoulli_(1 - self.concept_dropout)
        return x * keep / (1 - self.concept_dropout)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Args: images ``[B, 3, H, W]``.

        Returns dict:
            ``logits`` ``[B, E, 2]`` (absent / present), ``location`` ``[B, E, T]`` (location
            embeddings, scored against the anatomy book), ``global_logits`` ``[B, E * K]`` (cosine
            of the global image feature and each projected concept), ``attn`` list per decoder
            layer of ``[B, E * K, P]`` (head-averaged cross-attention over the ``P = s * s``
            patches), ``grid`` s.
        """
        b = images.shape[0]
        patches, pooled = self.image(images)  # [B, d, s, s], [B, d]
        grid = patches.shape[-1]
        memory = patches.flatten(2).permute(2, 0, 1)  # [P, B, d]
        queries = self.query_proj(self.concept_book)  # [E*K, d]
        feats, attn = self.decoder(queries.unsqueeze(1).expand(-1, b, -1), memory)
        out = self._drop_concepts(feats).permute(1, 2, 0)  # [B, d, E*K]
        location = self.location_emb(out).permute(0, 2, 1)  # [B, E, T]
        grouped = out.permute(0, 2, 1).reshape(b, self.n_entities, self.n_concepts * self.d_model)
        glob = F.normalize(pooled, dim=-1) @ F.normalize(queries, dim=-1).T
        return {"logits": self.classifier(grouped), "location": location,
                "global_logits": glob, "attn": attn, "grid": grid}  # fmt: skip

    @torch.no_grad()
    def presence(self, images: torch.Tensor, mode: str = "feature") -> torch.Tensor:
        """Zero-shot scores as MAVL's ``Zero-shot_classification/test.py``. Returns ``[B, E]``.

        ``mode: feature``: softmax over the (absent, present) logits, the present probability.
        ``mode: text``: from the global image-concept cosines ``c[b, e, k]``: per concept k, a
        2-way softmax of (``c`` of the ``normal`` entity, ``c`` of entity e), averaged over the
        two "normal" entities (``normal``, ``clear``: MAVL's ``normal_idx in [0, 1]``) and then
        over the K concepts (no temperature, as MAVL)."""
        out = self.forward(images)
        if mode == "feature":
            return out["logits"].float().softmax(-1)[..., 1]
        if mode != "text":
            raise ValueError(f"mavl.mode: expected feature or text, got {mode!r}")
        c = out["global_logits"].float().view(images.shape[0], self.n_entities, self.n_concepts)
        probs = []
        for name in ("normal", "clear"):
            i = self.entities.index(name)
            probs.append(torch.stack([c[:, i : i + 1].expand_as(c), c], -1).softmax(-1)[..., 1])
        return torch.stack(probs).mean(0).mean(-1)


def _init_weights(m: nn.Module) -> None:
    """MAVL's ``_init_weights``: BERT-style N(0, 0.02) for linear and attention input weights."""
    if isinstance(m, nn.Linear):
        m.weight.data.normal_(mean=0.0, std=0.02)
    elif isinstance(m, nn.MultiheadAttention):
        m.in_proj_weight.data.normal_(mean=0.0, std=0.02)
        m.out_proj.weight.data.normal_(mean=0.0, std=0.02)


def build_mavl(
    *,
    backbone: str = "resnet",
    vision=None,
    entities: list[str] | tuple[str, ...] = ENTITIES,
    n_concepts: int = 9,
    text_width: int = 768,
    block: str = "bottleneck",
    blocks: list[int] | tuple[int, ...] = (3, 4, 6),
    width: int = 64,
    image_size: int = 224,
    pool_heads: int = 8,
    d_model: int = 256,
    heads: int = 4,
    num_layers: int = 4,
    dim_feedforward: int = 1024,
    dropout: float = 0.1,
    global_concept_idx: list[int] | None = None,
) -> MAVL:
    """The MAVL module of given sizes, books empty (for ``meta`` builds and loading into).
    Defaults are ``Pretrain/configs/MAVL_resnet.yaml``'s (ResNet-50, d_model 256, N 4, H 4).

    ``backbone``: ``resnet`` (``block``, ``blocks``, ``width``, ``image_size``, ``pool_heads``) or
    ``vit``: ``vision`` is a patch-output ViT :class:`~medtune.models.encoders.VisionEncoder` or a
    ``{_component_: ..., **kwargs}`` mapping building one (:mod:`medtune.models.mavl.vit`; the
    ResNet arguments are then unused)."""
    if backbone == "resnet":
        if vision is not None:
            raise ValueError("model.vision is for backbone: vit (backbone is resnet)")
        trunk = ResNetTrunk(block, tuple(blocks), width)
        image = MAVLImageEncoder(trunk, d_model, image_size, pool_heads)
    elif backbone == "vit":
        from medtune.models.mavl.vit import MAVLViTImageEncoder, instantiate_vision

        if vision is None:
            raise ValueError(
                "model.vision: backbone vit needs a ViT tower (_component_ + arguments)"
            )
        image = MAVLViTImageEncoder(instantiate_vision(vision), d_model)
    else:
        raise ValueError(f"model.backbone: expected resnet or vit, got {backbone!r}")
    return MAVL(image, entities, n_concepts, d_model=d_model, heads=heads, num_layers=num_layers,
                text_width=text_width, dim_feedforward=dim_feedforward, dropout=dropout,
                global_concept_idx=global_concept_idx)  # fmt: skip


def mavl_model(
    text_model_dir: str,
    disease_book: str,
    concept_book: str,
    *,
    extra_entities: list[str] | tuple[str, ...] = (),
    trunk_checkpoint: str | None = None,
    released_checkpoint: str | None = None,
    book_max_length: int = 128,
    **sizes,
) -> MAVL:
    """Build MAVL with its books encoded by the frozen text encoder in ``text_model_dir``.

    Args:
        text_model_dir: local HF BERT folder (Bio_ClinicalBERT for the real model).
        disease_book: ``observation explanation.json`` ``{entity: description}``.
        concept_book: ``{entity: [aspect sentences]}`` (MAVL's ``gpt4_mimic.json``).
        extra_entities: entities beyond MAVL's 75 (zero-shot on unseen classes, e.g. ``covid19``);
            each needs a description and aspects in the books.
        trunk_checkpoint: torchvision ResNet weights (``resnet50-*.pth``) for the trunk
            (MAVL's ``pretrained: True``); ``layer4`` and ``fc`` are left out. ResNet only: a
            ViT tower loads its weights through its own builder (``vision.path`` ...).
        released_checkpoint: a MAVL ``.pth`` (``{"model": ...}``, ``module.`` prefixes), loaded
            through :mod:`medtune.models.convert.mavl`.
        book_max_length: tokenizer truncation for the books.
        **sizes: :func:`build_mavl` arguments (backbone, widths, layers, dropout).
    """
    from medtune.models.mavl.books import encode_books, read_concept_book

    entities = list(ENTITIES) + [e for e in extra_entities if e not in ENTITIES]
    k = len(read_concept_book(concept_book, entities[:1])[0]) + 1
    books = encode_books(
        text_model_dir, disease_book, concept_book, entities, max_length=book_max_length
    )
    model = build_mavl(
        entities=entities, n_concepts=k, text_width=books["anatomy"].shape[1], **sizes
    )
    model.set_books(books["anatomy"], books["concepts"])
    if trunk_checkpoint:
        if not hasattr(model.image, "trunk"):
            raise ValueError(
                "model.trunk_checkpoint: a ResNet file; with backbone vit the "
                "tower's builder loads its weights (e.g. vision.path)"
            )
        load_trunk(model, trunk_checkpoint)
    if released_checkpoint:
        from medtune.models.convert.mavl import load_released_mavl

        load_released_mavl(model, released_checkpoint)
    return model


def load_trunk(model: MAVL, path: str | Path) -> None:
    """torchvision ResNet weights into the trunk (``layer4.*`` and ``fc.*`` dropped: MAVL cuts them)."""
    from medtune.models.convert import apply_key_map, read_foreign_checkpoint

    sd = read_foreign_checkpoint(path)
    target = {k: v.shape for k, v in model.image.trunk.state_dict().items()}
    sd = apply_key_map(sd, lambda k: k, target, source=f"torchvision ResNet {path}",
                       ignore=lambda k: k.startswith(("layer4.", "fc.")))  # fmt: skip
    model.image.trunk.load_state_dict(sd)
