"""compile: per-layer torch.compile gives the eager loss and gradients (CPU, inductor)."""

from __future__ import annotations

import copy

import torch

from medtune.data.packing import attention_mask, collate_packed, pack_indices
from medtune.testing.packing import random_medvlm, synthetic_item
from medtune.training.compile import block_list, compile_model
from medtune.training.loss import answer_loss_sum


def _loss_and_grads(model, batch):
    def forward():
        return model(
            batch["tokens"],
            images=batch["images"],
            image_counts=batch["image_counts"],
            mask=attention_mask(batch, "cpu"),
            input_pos=batch["input_pos"],
        )

    model.zero_grad(set_to_none=True)
    loss, n = answer_loss_sum(forward, model.decoder, batch["labels"], autocast=False)
    (loss / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return (loss / n).detach(), grads


def test_compiled_layers_match_eager_loss_and_gradients():
    torch._dynamo.reset()
    eager = random_medvlm(width=32, layers=2, image_tokens=8, enc_depth=2)
    eager.decoder.requires_grad_(False)  # vision_finetune: the LLM is frozen, the rest trains
    items = [synthetic_item(eager, i, answer_len=3 + 4 * i, question_len=5) for i in range(5)]
    packs = pack_indices([len(x["tokens"]) for x in items], 64, shuffle=False)
    batch = collate_packed([[items[i] for i in p] for p in packs], pad_id=0, seq_len=64)
    compiled = copy.deepcopy(eager)
    names = compile_model(compiled, backend="aot_eager", verbose=False)
    assert names == [
        "decoder.layers.1",
        "decoder.layers.0",
        "encoders.image.tower.blocks.0",
        "encoders.image.tower.blocks.1",
    ]

    loss_e, grads_e = _loss_and_grads(eager, batch)
    for _ in range(2):  # the second call runs the cached graphs
        loss_c, grads_c = _loss_and_grads(compiled, batch)
        torch.testing.assert_close(loss_c, loss_e)
        assert set(grads_c) == set(grads_e) and grads_e
        for k in grads_e:
            torch.testing.assert_close(grads_c[k], grads_e[k], msg=k)
    # it ran compiled code: the layers hold their compiled forward
    assert all(getattr(compiled.get_submodule(n), "_compiled_call_impl", None) for n in names)
    torch._dynamo.reset()


def test_frozen_encoders_are_left_eager_and_blocks_are_found():
    m = random_medvlm(width=32, layers=1, image_tokens=8, enc_depth=2)
    m.encoders.requires_grad_(False)
    names = compile_model(m, backend="eager", verbose=False)
    assert names == ["decoder.layers.0"]
    assert len(block_list(m.encoders["image"])) == 2
    assert block_list(torch.nn.Linear(2, 2)) == []
    torch._dynamo.reset()
