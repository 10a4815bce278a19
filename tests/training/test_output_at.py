"""``output_at``: logits only at target positions give the loss and gradients of full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medtune.models.llama3 import llama3_tiny
from medtune.models.medvlm import output_at


def _decoder(lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if not lora:
        return llama3_tiny(
            vocab_size=300,
            embed_dim=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_dim=64,
            max_seq_len=64,
        )
    from torchtune.models.llama3 import lora_llama3

    dec = lora_llama3(
        ["q_proj", "v_proj"],
        apply_lora_to_mlp=True,
        apply_lora_to_output=True,
        vocab_size=300,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=32,
        max_seq_len=64,
        intermediate_dim=64,
        lora_rank=4,
        lora_alpha=8,
    )
    for n, p in dec.named_parameters():
        if "lora_b" in n:
            torch.nn.init.normal_(p)  # non-zero adapters, so the output LoRA matters
    return dec


@pytest.mark.parametrize("lora", [False, True])
def test_selected_logits_give_full_loss_and_grads(lora):
    dec = _decoder(lora)
    tokens = torch.randint(0, 300, (3, 20))
    targets = torch.randint(0, 300, (3, 20))
    keep = torch.rand(3, 20) < 0.3
    keep[0, -1] = True

    full = dec(tokens)  # [b, s, vocab]
    ref = F.cross_entropy(full[keep], targets[keep], reduction="sum")
    ref_grads = torch.autograd.grad(ref, [p for p in dec.parameters() if p.requires_grad])

    with output_at(dec, keep):
        sel = dec(tokens)
    assert sel.shape == (int(keep.sum()), 300)
    loss = F.cross_entropy(sel, targets[keep], reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(
        torch.autograd.grad(loss, [p for p in dec.parameters() if p.requires_grad]), ref_grads
    ):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # the hook is gone afterwards
    assert dec(tokens).shape == (3, 20, 300)


def test_answer_loss_selected_equals_every_position():
    """The recipes' loss line (answer targets, logits at the answer positions only, the loss
    component) equals the loss over logits at every position."""
    from medtune.models.medvlm import output_at
    from medtune.training.loss import IGNORE_INDEX, AnswerCrossEntropy, answer_targets

    dec = _decoder(lora=False)
    loss_fn = AnswerCrossEntropy()
    tokens = torch.randint(0, 300, (2, 16))
    labels = torch.full((2, 16), IGNORE_INDEX)
    labels[0, 10:] = tokens[0, 10:]
    labels[1, 5:9] = tokens[1, 5:9]
    targets, keep = answer_targets(labels)
    with output_at(dec, keep):
        sel = loss_fn(dec(tokens), targets[keep])
    full = loss_fn(dec(tokens), targets)  # [b, s, vocab] with IGNORE_INDEX off-target
    assert int(keep.sum()) == 6 + 4  # the labelled positions, shifted left by one
    torch.testing.assert_close(sel, full, rtol=1e-5, atol=1e-5)
