"""Multi-token stop sequences (MiniGPT-4 / XrayGPT's ``###``) in :func:`medtune.generation.generate`
and :func:`medtune.generation.beam_search`, with a tiny sentencepiece tokenizer in which ``###``
is three tokens:

- the ``minigpt4`` tokenizer stops on ``###`` as sequences (every spelling), not on single ids;
- a model that spells ``###`` stops right after it, the sequence cut from the output and the text;
- greedy and beam search stop exactly where a plain Python reference does (each row on its own
  tail), batched output equals per-sample output, and streaming never hands out a stop id.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtune.generation import beam_search, generate
from medtune.models.llm import encode_messages
from medtune.models.llm.llama2 import llama2, xraygpt_tokenizer
from medtune.testing.llm_families import _corpus, write_sentencepiece

MAX_NEW = 8


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """XrayGPT's tokenizer over a sentencepiece model that never merged '#': '###' is 3 ids."""
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    write_sentencepiece(path, corpus=[line.replace("#", "") for line in _corpus()] + ["# a #"])
    return xraygpt_tokenizer(str(path))


def test_hashes_are_a_stop_sequence_not_single_ids(tok):
    sp = tok._sp
    glued, spaced = tok._encode_text("###"), sp.EncodeAsIds("###")
    assert len(glued) == 3 and len(spaced) == 3  # '#' '#' '#' and '▁#' '#' '#'
    assert tok.stop_tokens == [tok.eos_id]  # no single id of '###' stops a row
    assert glued in tok.stop_sequences and spaced in tok.stop_sequences
    for s in tok.stop_sequences:  # each spells '###', nothing else
        assert sp.DecodeIds(sp.EncodeAsIds("a") + s).replace(" ", "") == "a###"
    # XrayGPT cuts its text at '###' (output_text.split('###')[0])
    assert tok.decode(sp.EncodeAsIds("No lesion.") + glued + sp.EncodeAsIds("junk")) == "No lesion."


class Bigram(nn.Module):
    """A decoder whose next-token logits depend on the last id only (``table[id]``): it spells
    what its table says, so a test can make it write '###' (no KV cache: nothing to set up)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def caches_are_setup(self) -> bool:
        return False

    def setup_caches(self, *args, **kwargs) -> None:
        pass

    def forward(self, tokens, mask=None, input_pos=None):
        return self.table[tokens]  # [b, s, vocab]


def test_a_model_that_writes_hashes_stops_after_them(tok):
    """Row 0 answers 'No lesion.###junk...', row 1 never writes '#': row 0 stops exactly after
    the third '#', row 1 runs to max_new_tokens; batched == per sample; nothing stops at one '#'."""
    sp = tok._sp
    answer = sp.EncodeAsIds("No lesion.") + tok._encode_text("###") + sp.EncodeAsIds("junk")
    other = sp.EncodeAsIds("clear lungs")
    table = torch.randn(tok.vocab_size, tok.vocab_size, generator=torch.Generator().manual_seed(0))
    p, _ = encode_messages(tok, [("user", ["Describe the scan."])], add_generation_prompt=True)
    prompts = [p + answer[:1], p + other[:1]]
    for chain in (answer, other):  # next id after each id of the chain ('#' -> '#' included)
        for a, b in zip(chain, chain[1:]):
            table[a, b] += 100.0
    table[other[-1], other[0]] += 100.0  # row 1 loops over its words
    model = Bigram(table).eval()
    kw = dict(pad_id=tok.pad_id, stop_tokens=tok.stop_tokens, max_new_tokens=12)
    seqs = tok.stop_sequences
    both = generate(model, prompts, stop_sequences=seqs, **kw)
    want0 = answer[1 : answer.index(tok._encode_text("###")[0])]
    assert both[0] == want0 and tok.decode(both[0]) == "No lesion."
    assert len(both[1]) == 12 and "#" not in tok.decode(both[1])
    assert [generate(model, [p], stop_sequences=seqs, **kw)[0] for p in prompts] == both
    beams = generate(model, prompts, stop_sequences=seqs, num_beams=2, **kw)
    assert beams[0] == want0
    without = generate(model, prompts[:1], **kw)[0]  # without the sequences it writes them
    assert without[len(want0) : len(want0) + 3] == tok._encode_text("###")


# ----------------------------------------------------------- exact rules on a real tiny decoder
def _cut(ids: list[int], seqs: list[list[int]], min_new: int = 0) -> list[int]:
    """The reference: the first position where a sequence ends (at min_new or later) cuts."""
    for t in range(len(ids)):
        hits = [
            len(s)
            for s in seqs
            if t >= min_new and len(s) <= t + 1 and ids[t + 1 - len(s) : t + 1] == s
        ]
        if hits:
            return ids[: t + 1 - max(hits)]
    return ids


def naive_beam(model, prompt, *, seqs, k, max_new, min_new=0, lp=1.0):
    """One prompt, Python lists, whole sequences through the model (beam_search's rules)."""
    beams, finished = [([], torch.tensor(0.0))], []
    n_cand = max(2, 1 + len(seqs)) * k
    for t in range(max_new):
        cands = []
        for ids, score in beams:
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([prompt + ids]))[0, -1].float(), -1)
            best = torch.topk(logp + score, n_cand)
            cands += [(s, ids + [int(i)]) for s, i in zip(best.values, best.indices)]
        cands = sorted(cands, key=lambda c: -float(c[0]))[:n_cand]

        def cut(ids, t=t):
            hit = [len(s) for s in seqs if len(s) <= len(ids) and ids[-len(s) :] == s]
            return max(hit) if hit and t >= min_new else 0

        for rank, (score, ids) in enumerate(cands):
            if rank < k and (cut(ids) or t + 1 == max_new):
                finished.append((float(score) / (t + 1) ** lp, ids[: len(ids) - cut(ids)]))
        finished = sorted(finished, key=lambda f: -f[0])[:k]
        beams = [(i, s) for s, i in cands if not (cut(i) or t + 1 == max_new)][:k]
        if not beams or (
            len(finished) == k and float(beams[0][1]) / (t + 1) ** lp <= finished[-1][0]
        ):
            break
    return finished[0][1]


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return llama2(vocab_size=300, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=64,
                  max_seq_len=128, intermediate_dim=128).eval()  # fmt: skip


def test_greedy_and_beams_stop_on_sequences_like_the_reference(decoder):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 7, 5)]
    kw = dict(pad_id=0, stop_tokens=[])
    free = generate(decoder, prompts, max_new_tokens=MAX_NEW, **kw)
    # sequences the rows write at different steps (and one nobody writes)
    seqs = [free[0][2:4], free[1][4:7], [299, 298, 297]]
    for min_new in (0, 3):
        streamed: dict[int, list[int]] = {i: [] for i in range(3)}

        def on_step(rows, ids, streamed=streamed):
            for r, i in zip(rows, ids):
                streamed[r].append(i)

        got = generate(decoder, prompts, stop_sequences=seqs, max_new_tokens=MAX_NEW,
                       min_new_tokens=min_new, on_step=on_step, **kw)  # fmt: skip
        want = [_cut(f, seqs, min_new) for f in free]
        assert got == want, min_new
        assert [streamed[i] for i in range(3)] == want  # held back, then cut: never streamed
        alone = [generate(decoder, [p], stop_sequences=seqs, max_new_tokens=MAX_NEW,
                          min_new_tokens=min_new, **kw)[0] for p in prompts]  # fmt: skip
        assert alone == want
    assert got[0] == free[0][:2] and len(got[2]) == MAX_NEW  # the cases are exercised
    beams = beam_search(decoder, prompts, stop_sequences=seqs, num_beams=3,
                        max_new_tokens=MAX_NEW, **kw)  # fmt: skip
    ref = [naive_beam(decoder, p, seqs=seqs, k=3, max_new=MAX_NEW) for p in prompts]
    assert beams == ref
    one_seq = [[t] for t in (free[0][1], free[2][3])]  # one-id sequences == those stop tokens
    assert beam_search(decoder, prompts, pad_id=0, stop_tokens=[], stop_sequences=one_seq,
                       num_beams=3, max_new_tokens=MAX_NEW) == beam_search(
        decoder, prompts, pad_id=0, stop_tokens=[s[0] for s in one_seq], num_beams=3,
        max_new_tokens=MAX_NEW)  # fmt: skip
    with pytest.raises(ValueError, match="empty stop sequence"):
        generate(decoder, prompts, stop_sequences=[[]], **kw)
