"""MedVLM: placeholder scatter, clear errors, and KV-cache decoding with images at prefill."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtune.models.builders import medvlm, tiny_medvlm
from medtune.models.connectors import LinearConnector, MLPConnector
from medtune.models.llama3 import llama3_tiny
from medtune.models.medvlm import ImageTokenError, MedVLM


@pytest.fixture(scope="module")
def model(tiny_assets):
    torch.manual_seed(0)
    return tiny_medvlm(str(tiny_assets)).eval()


def _batch(model: MedVLM, n_images: list[int], seed: int = 0, text_len: int = 5):
    """Token rows with each sample's placeholders in two groups (one before, one after some text),
    right-padded; distinct random images."""
    g = torch.Generator().manual_seed(seed)
    n_tok, img_id = model.tokens_per_image, model.image_token_id
    rows = []
    for k in n_images:
        row = torch.randint(0, img_id, (text_len,), generator=g).tolist()  # ordinary text ids
        for j in range(k):
            row += [img_id] * n_tok + torch.randint(0, img_id, (2 + j,), generator=g).tolist()
        rows.append(row)
    s = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), s, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    size = model.image_transforms["image"]["image_size"]
    images = torch.randn(sum(n_images), 3, size, size, generator=g)
    return tokens, images, torch.tensor(n_images)


def test_placeholder_scatter_puts_each_image_at_its_samples_positions(model):
    tokens, images, counts = _batch(model, [0, 1, 2])
    with torch.no_grad():
        h = model.embed(tokens, {"image": images}, counts)
        per_image = model.encode_images(images)  # [3, N, d], in batch order
        text = model.decoder.tok_embeddings(tokens.masked_fill(tokens == model.image_token_id, 0))
    n = model.tokens_per_image
    assert per_image.shape == (3, n, model.embed_dim)
    # the images' embeddings differ from each other, so a misplacement would show
    assert not torch.allclose(per_image[0], per_image[1]) and not torch.allclose(
        per_image[1], per_image[2]
    )
    img_i = 0
    for b in range(tokens.shape[0]):
        pos = (tokens[b] == model.image_token_id).nonzero().flatten()
        assert len(pos) == counts[b] * n
        for j in range(int(counts[b])):
            torch.testing.assert_close(
                h[b, pos[j * n : (j + 1) * n]], per_image[img_i], rtol=0, atol=0
            )
            img_i += 1
        other = tokens[b] != model.image_token_id
        torch.testing.assert_close(h[b, other], text[b, other], rtol=0, atol=0)
    assert img_i == 3

    # the logits of a sample depend only on its own images
    with torch.no_grad():
        logits = model(tokens, images={"image": images}, image_counts=counts)
        swapped = images.clone()
        swapped[[0, 1]] = images[[1, 0]]  # swap sample 1's image with sample 2's first image
        logits2 = model(tokens, images={"image": swapped}, image_counts=counts)
        # sample 0 (text only) as a batch of its own gives the same logits
        alone = model(tokens[:1])
    torch.testing.assert_close(logits[0], logits2[0])
    assert not torch.allclose(logits[1], logits2[1])
    assert not torch.allclose(logits[2], logits2[2])
    torch.testing.assert_close(alone[0], logits[0], rtol=1e-5, atol=1e-5)


def test_wrong_placeholder_counts_raise_image_token_error(model):
    tokens, images, counts = _batch(model, [0, 1, 2])
    n = model.tokens_per_image
    with pytest.raises(
        ImageTokenError,
        match=rf"sample 0 holds 0 image placeholders but has 1 image\(s\) x {n} tokens",
    ):
        model(tokens, images={"image": images}, image_counts=torch.tensor([1, 0, 2]))
    # one placeholder short in sample 2
    bad = tokens.clone()
    pos = (bad[2] == model.image_token_id).nonzero().flatten()
    bad[2, pos[-1]] = 7
    with pytest.raises(ImageTokenError, match=rf"sample 2 holds {2 * n - 1} image placeholders"):
        model(bad, images={"image": images}, image_counts=counts)
    with pytest.raises(
        ImageTokenError, match=rf"{3 * n - 1} image placeholders but 3 image\(s\) x {n} tokens"
    ):
        model(bad, images={"image": images})
    with pytest.raises(ImageTokenError, match="no images were given"):
        model(tokens)
    assert issubclass(ImageTokenError, ValueError)


def test_width_mismatches_name_the_parts(model):
    enc = model.encoders["image"]
    dec = llama3_tiny(vocab_size=model.decoder.tok_embeddings.num_embeddings, embed_dim=64)
    with pytest.raises(
        ValueError,
        match=rf"connector 'image' expects 10-d input but encoder output is {enc.out_dim}-d",
    ):
        MedVLM(
            dec,
            {"image": enc},
            {"image": LinearConnector(10, 64)},
            image_token_id=model.image_token_id,
        )
    with pytest.raises(
        ValueError, match="connector 'image' outputs 32-d tokens but the LLM embedding is 64-d"
    ):
        MedVLM(
            dec,
            {"image": enc},
            {"image": MLPConnector(enc.out_dim, 32)},
            image_token_id=model.image_token_id,
        )
    with pytest.raises(ValueError, match="one connector per encoder"):
        MedVLM(
            dec,
            {"image": enc},
            {"other": LinearConnector(enc.out_dim, 64)},
            image_token_id=model.image_token_id,
        )
    with pytest.raises(ValueError, match="outside the decoder's vocabulary"):
        MedVLM(
            dec, {"image": enc}, {"image": LinearConnector(enc.out_dim, 64)}, image_token_id=10**6
        )


def test_two_encoders_sequence_and_channel_fusion(model):
    enc = model.encoders["image"]
    dec = llama3_tiny(vocab_size=model.decoder.tok_embeddings.num_embeddings, embed_dim=64)
    seq = medvlm(
        dec,
        {"a": enc, "b": enc},
        connector={"a": "linear", "b": "pooled_unfold"},
        connector_kwargs={"b": {"num_tokens": 3}},
        image_token_id=model.image_token_id,
    )
    assert seq.tokens_per_image == enc.num_tokens + 3
    size = enc.transform["image_size"]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = seq.encode_images({"a": x, "b": x})
    assert out.shape == (2, enc.num_tokens + 3, 64)
    ch = medvlm(
        dec,
        {"a": enc, "b": enc},
        connector="mlp",
        fuse="channel",
        image_token_id=model.image_token_id,
    )
    assert (
        ch.connectors["fused"].in_dim == 2 * enc.out_dim and ch.tokens_per_image == enc.num_tokens
    )
    with pytest.raises(ValueError, match="pass images as a dict"):
        ch.encode_images(x)


def test_kv_cache_prefill_with_images_then_decode_matches_full_recompute(tiny_assets):
    torch.manual_seed(0)
    model = tiny_medvlm(str(tiny_assets)).eval()  # its own instance: the caches stay set up
    tokens, images, counts = _batch(model, [1, 2], seed=3)
    b, s = tokens.shape
    steps = 4
    nxt = torch.randint(0, model.image_token_id, (b, steps))
    full_tokens = torch.cat([tokens, nxt], dim=1)
    total = s + steps
    with torch.no_grad():
        ref = model(
            full_tokens, images={"image": images}, image_counts=counts
        )  # no cache, full causal
        model.setup_caches(b, torch.float32, decoder_max_seq_len=total + 3)
        assert model.caches_are_enabled()
        cache_len = total + 3
        causal = (
            torch.tril(torch.ones(total, cache_len, dtype=torch.bool))
            .unsqueeze(0)
            .expand(b, -1, -1)
        )
        pos = torch.arange(total).unsqueeze(0).expand(b, -1)
        pre = model(
            tokens,
            images={"image": images},
            image_counts=counts,
            mask=causal[:, :s],
            input_pos=pos[:, :s],
        )
        torch.testing.assert_close(pre, ref[:, :s], rtol=1e-4, atol=1e-4)
        for t in range(steps):  # decode steps carry no images
            cur = s + t
            step = model(
                full_tokens[:, cur : cur + 1],
                mask=causal[:, cur : cur + 1],
                input_pos=pos[:, cur : cur + 1],
            )
            torch.testing.assert_close(step[:, 0], ref[:, cur], rtol=1e-4, atol=1e-4)
        # a decode step that (wrongly) holds placeholders without images fails loudly
        with pytest.raises(ImageTokenError):
            model(
                torch.full((b, 1), model.image_token_id),
                mask=causal[:, s : s + 1],
                input_pos=pos[:, s : s + 1],
            )
        # after reset_caches, a new prefill gives the same logits again
        model.reset_caches()
        again = model(
            tokens,
            images={"image": images},
            image_counts=counts,
            mask=causal[:, :s],
            input_pos=pos[:, :s],
        )
        torch.testing.assert_close(again, pre, rtol=0, atol=0)


def test_image_embeddings_carry_gradients_to_encoder_and_connector(model):
    m = model
    tokens, images, counts = _batch(m, [1, 1])
    m.train()
    try:
        logits = m(tokens, images={"image": images}, image_counts=counts)
        logits.sum().backward()
        tower = m.encoders["image"].tower
        # patch tokens come from the transformer; the pooled head (ln_post, proj) is unused
        used = [
            p.grad for n, p in tower.named_parameters() if not n.startswith(("ln_post", "proj"))
        ]
        conn_grads = [p.grad for p in m.connectors.parameters()]
        assert used and all(g is not None and g.abs().sum() > 0 for g in used)
        assert all(g is not None and g.abs().sum() > 0 for g in conn_grads)
    finally:
        m.zero_grad(set_to_none=True)
        m.eval()


def test_passthrough_embedding_keeps_decoder_state_dict(model):
    assert isinstance(model.decoder.tok_embeddings, nn.Embedding)
    assert "tok_embeddings.weight" in model.decoder.state_dict()
