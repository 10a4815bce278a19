"""medtune.inference.answer: the one inference path (order, batching, streaming hook, progress)."""

from __future__ import annotations

import pytest
import torch

from medtune.data.model_transform import medvlm_transform
from medtune.data.sample import Message, Sample
from medtune.generation import GenerationConfig, generate
from medtune.inference import Answer, answer

QUESTIONS = ["hi", "is this a scan of the chest", "left or right", "a", "the liver", "no"]


@pytest.fixture(scope="module")
def llm(tiny_assets):
    from medtune.models.llama3 import llama3_tiny, llama3_tokenizer

    tok = llama3_tokenizer(str(tiny_assets / "llama3_tiny" / "original" / "tokenizer.model"))
    torch.manual_seed(0)
    model = llama3_tiny(vocab_size=tok.vocab_size).eval()
    return model, tok


def _samples():
    return [Sample(f"q{i}", [], [Message("user", q)], {}) for i, q in enumerate(QUESTIONS)]


def test_answers_equal_generate_in_order(llm):
    model, tok = llm
    tf = medvlm_transform(model, tok)
    settings = GenerationConfig(max_new_tokens=5)
    out = answer(model, tf, _samples(), settings, tokenizer=tok, batch_size=4)
    assert [a.id for a in out] == [f"q{i}" for i in range(len(QUESTIONS))]
    prompts = [tf(s, inference=True)["tokens"] for s in _samples()]
    want = generate(
        model, prompts, pad_id=tok.pad_id, stop_tokens=tok.stop_tokens, max_new_tokens=5
    )
    for a, ids, p in zip(out, want, prompts):
        assert isinstance(a, Answer) and a.token_ids == ids and a.prompt_tokens == len(p)
        assert a.text == tok.decode(ids).strip()
        assert a.finish_reason == ("length" if len(ids) == 5 else "stop")
    # batch size does not change the answers
    one = answer(model, tf, _samples(), settings, tokenizer=tok, batch_size=1)
    assert [a.token_ids for a in one] == [a.token_ids for a in out]


def test_on_tokens_streams_every_token_with_its_position(llm):
    model, tok = llm
    tf = medvlm_transform(model, tok)
    streamed: dict[int, list[int]] = {}

    def on_tokens(indices, ids):
        assert len(indices) == len(ids)
        for i, t in zip(indices, ids):
            streamed.setdefault(i, []).append(t)

    out = answer(model, tf, _samples(), GenerationConfig(max_new_tokens=4), tokenizer=tok,
                 batch_size=4, on_tokens=on_tokens)  # fmt: skip
    assert {i: streamed.get(i, []) for i in range(len(out))} == {
        i: a.token_ids for i, a in enumerate(out)
    }


def test_sampling_is_seeded_per_batch(llm):
    model, tok = llm
    tf = medvlm_transform(model, tok)
    s = GenerationConfig(max_new_tokens=6, temperature=1.5, seed=3)
    a = answer(model, tf, _samples(), s, tokenizer=tok, batch_size=2)
    torch.manual_seed(99)  # the global RNG plays no part
    b = answer(model, tf, _samples(), s, tokenizer=tok, batch_size=2)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    # in pieces of one batch, with first_batch: the same answers as one call
    pieces = [
        x
        for k in range(3)
        for x in answer(
            model, tf, _samples()[2 * k : 2 * k + 2], s, tokenizer=tok, batch_size=2, first_batch=k
        )  # fmt: skip
    ]
    assert [x.token_ids for x in pieces] == [x.token_ids for x in a]
    c = answer(model, tf, _samples(), GenerationConfig(max_new_tokens=6, temperature=1.5, seed=4),
               tokenizer=tok, batch_size=2)  # fmt: skip
    assert [x.token_ids for x in c] != [x.token_ids for x in a]


def test_progress_bar_shows_unless_tqdm_disable(llm, capsys):
    import os

    model, tok = llm
    answer(model, medvlm_transform(model, tok), _samples()[:1], GenerationConfig(max_new_tokens=2),
           tokenizer=tok, progress=True)  # fmt: skip
    # tqdm reads TQDM_* when imported: this process shows a bar unless the suite runs with it set
    assert ("answer:" in capsys.readouterr().err) == (not os.environ.get("TQDM_DISABLE"))


def test_progress_bar_honours_tqdm_disable(llm, capsys, monkeypatch):
    """Recipes pass ``progress=True``; ``TQDM_DISABLE=1`` still turns the bar off.

    tqdm reads ``TQDM_*`` once, when ``tqdm.std`` is imported (its ``envwrap`` binds them into
    ``tqdm.__init__`` as defaults): here that step is redone with the variable set, which is what
    a process started with it gets, and undone after the test."""
    import tqdm.std
    from tqdm.utils import envwrap

    init = vars(tqdm.std.tqdm)["__init__"]  # the partialmethod envwrap made at import
    monkeypatch.setenv("TQDM_DISABLE", "1")
    rewrapped = envwrap("tqdm", is_method=True)(init.func)
    assert rewrapped.keywords.get("disable") is True  # the variable is read as tqdm reads it
    monkeypatch.setattr(tqdm.std.tqdm, "__init__", rewrapped)
    model, tok = llm
    answer(model, medvlm_transform(model, tok), _samples()[:1], GenerationConfig(max_new_tokens=2),
           tokenizer=tok, progress=True)  # fmt: skip
    assert "answer:" not in capsys.readouterr().err
