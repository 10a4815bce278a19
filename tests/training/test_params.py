"""Trainable parts: unused encoder heads stay frozen, NF4 shows as nf4, FSDP2 units return no views."""

from __future__ import annotations

import pytest
import torch

from medtune.models.builders import tiny_medvlm
from medtune.training.params import parameter_table, set_trainable


def test_unused_pooled_projection_is_not_trained(tiny_assets):
    """With patch tokens the open_clip tower's ``proj`` never gets a gradient: it must not count
    as trainable; every parameter that does count receives a gradient."""
    model = tiny_medvlm(str(tiny_assets))
    set_trainable(model, {"encoder": "full", "connector": "full", "llm": "frozen"})
    enc = model.encoders["image"]
    assert enc.unused_parameters() == {"tower.proj"}
    assert not enc.tower.proj.requires_grad
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.endswith("tower.proj") for n in trainable)
    n_tok = model.tokens_per_image
    tokens = torch.full((2, n_tok + 3), 5)
    tokens[:, 1 : 1 + n_tok] = model.image_token_id
    images = {"image": torch.randn(2, 3, 32, 32)}
    model(tokens, images=images, image_counts=torch.tensor([1, 1])).sum().backward()
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert no_grad == []
    table = parameter_table(model, {"encoder": "full"})
    enc_row = next(line for line in table.splitlines() if line.startswith("encoder"))
    n_all = sum(p.numel() for p in enc.parameters())
    n_tr = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    assert n_tr == n_all - enc.tower.proj.numel() and f"{n_tr:,}" in enc_row


def test_pooled_output_trains_the_projection(tiny_assets):
    model = tiny_medvlm(str(tiny_assets), output="pooled")
    set_trainable(model, {"encoder": "full", "connector": "full"})
    assert model.encoders["image"].unused_parameters() == set()
    assert model.encoders["image"].tower.proj.requires_grad


def test_parameter_table_names_nf4_weights():
    pytest.importorskip("torchao")
    from torchtune.modules.peft import LoRALinear

    layer = LoRALinear(256, 256, rank=4, alpha=8.0, quantize_base=True)
    row = parameter_table(layer).splitlines()[2]  # header, rule, the "llm" row
    assert row.startswith("llm") and "nf4" in row and "float32" in row


@pytest.mark.parametrize(
    "connector", ["linear", "mlp", "pooled_unfold", "learned_queries", "resampler"]
)
@pytest.mark.parametrize("output", ["patch", "pooled"])
def test_encoder_and_connector_outputs_are_not_views(tiny_assets, connector, output):
    """FSDP2 wraps each encoder and connector; a view among their outputs lets an in-place op drop
    the unit's pre-backward hook (all-gather skipped, wrong gradients). Inside a MedVLM none
    returns one (its forward hooks give them outputs of their own)."""
    kwargs = {"num_tokens": 4} if connector in ("pooled_unfold",) else None
    model = tiny_medvlm(
        str(tiny_assets), connector=connector, output=output, connector_kwargs=kwargs
    )
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    feats = model.encoders["image"](images)
    assert not feats._is_view()
    assert not model.connectors["image"](feats)._is_view()
