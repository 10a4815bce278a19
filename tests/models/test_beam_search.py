"""``medtune.generation.beam_search``: the batched, KV-cached search equals a plain per-sample beam search
(full forward for every beam at every step, Python lists, the rules of the module docstring)
token for token; num_beams=1 is greedy; repetition penalty and min_new_tokens on the greedy path;
the settings' checks."""

from __future__ import annotations

import math

import pytest
import torch

from medtune.generation import GenerationConfig, beam_search, generate
from medtune.models.builders import medvlm
from medtune.models.encoders import open_clip_vision
from medtune.models.llama3 import llama3_tiny
from medtune.utils.errors import ConfigError

VOCAB = 512
IMG_ID = VOCAB - 256 + 4


@pytest.fixture(scope="module")
def model(tiny_assets):
    """A random MedVLM whose next-token distributions are flat enough for beams to disagree."""
    torch.manual_seed(0)
    dec = llama3_tiny(
        vocab_size=VOCAB,
        embed_dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_dim=128,
        max_seq_len=256,
    )
    enc = open_clip_vision(str(tiny_assets / "tiny_clip"))
    return medvlm(dec, enc, connector="mlp", image_token_id=IMG_ID).eval()


def _batch(model, n_images: list[int], seed: int = 0):
    """Prompts of different lengths with their placeholders, the images, the counts."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i, k in enumerate(n_images):
        p = torch.randint(0, 200, (2 + 3 * i,), generator=g).tolist()
        for _ in range(k):
            p += [IMG_ID] * model.tokens_per_image + torch.randint(
                0, 200, (2,), generator=g
            ).tolist()
        prompts.append(p)
    size = model.image_transforms["image"]["image_size"]
    images = torch.randn(sum(n_images), 3, size, size, generator=g)
    return prompts, {"image": images}, torch.tensor(n_images)


def _per_sample_images(images, counts):
    starts = torch.cumsum(counts, 0) - counts
    return [
        {"image": images["image"][int(s) : int(s) + int(c)]} if int(c) else None
        for s, c in zip(starts, counts)
    ]


def _logprobs(model, seq: list[int], images) -> torch.Tensor:
    kw = {"images": images} if images is not None else {}
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([seq]), **kw)[0, -1].float(), -1)


def naive_beam_search(model, prompt, images, *, stop, k, max_new, min_new=0, lp=1.0, rep=1.0):
    """One sample, no cache: every beam's whole sequence goes through the model at every step."""
    beams = [([], torch.tensor(0.0))]  # (generated ids, summed float32 log-prob): one beam at first
    finished = []  # (normalised score, ids including the stop token)
    n_cand = max(2, 1 + len(stop)) * k
    for t in range(max_new):
        cands = []
        for ids, score in beams:
            logp = _logprobs(model, prompt + ids, images)
            if rep != 1.0:
                seen = torch.tensor(sorted(set(prompt + ids)))
                v = logp[seen]
                logp[seen] = torch.where(v < 0, v * rep, v / rep)
            if t < min_new:
                logp[list(stop)] = -math.inf
            best = torch.topk(logp + score, n_cand)  # a beam's share of the top n_cand is in here
            cands += [(s, ids + [int(tok)]) for s, tok in zip(best.values, best.indices)]
        cands = sorted(cands, key=lambda c: -float(c[0]))[:n_cand]
        for rank, (score, ids) in enumerate(cands):
            if rank < k and (ids[-1] in stop or t + 1 == max_new):
                finished.append((float(score) / (t + 1) ** lp, ids))
        finished = sorted(finished, key=lambda f: -f[0])[:k]
        beams = [(i, s) for s, i in cands if not (i[-1] in stop or t + 1 == max_new)][:k]
        if not beams:
            break  # the last step: everything ended
        if len(finished) == k and float(beams[0][1]) / (t + 1) ** lp <= finished[-1][0]:
            break  # the best open beam cannot beat the worst finished one (HF's heuristic)
    ids = finished[0][1]
    return ids[:-1] if ids[-1] in stop else ids


def _repeating_batch(model, n_images, seed, n_new=3):
    """A batch whose rows start with their own greedy continuation: the model copies such ids,
    so the repetition penalty has something to act on."""
    prompts, images, counts = _batch(model, n_images, seed)
    kw = dict(pad_id=0, stop_tokens=[], images=images, image_counts=counts)
    first = generate(model, prompts, max_new_tokens=n_new, **kw)
    return [f + p for f, p in zip(first, prompts)], images, counts


# ``off``: the settings whose reset to the default changes this case's output (so each is exercised)
CASES = [
    dict(k=2, lp=1.0, rep=1.0, min_new=0, off=()),
    dict(k=4, lp=1.0, rep=1.0, min_new=2, off=("min_new",)),
    dict(k=3, lp=0.0, rep=1.3, min_new=0, off=("rep",)),
    dict(k=4, lp=-1.0, rep=1.0, min_new=1, off=("lp", "min_new")),
]
DEFAULT = dict(lp=1.0, rep=1.0, min_new=0)
MAX_NEW = 5


@pytest.fixture(scope="module")
def batch(model):
    """Rows of different lengths (1, 0 and 2 images) and three stop tokens the beams like to say."""
    prompts, images, counts = _repeating_batch(model, [1, 0, 2], seed=0)
    free = generate(
        model,
        prompts,
        pad_id=0,
        stop_tokens=[],
        images=images,
        image_counts=counts,
        max_new_tokens=MAX_NEW,
        num_beams=4,
    )
    return prompts, images, counts, [free[0][1], free[1][1], free[2][2]]


def _search(model, batch, case, **kw):
    prompts, images, counts, stop = batch
    return beam_search(
        model,
        prompts,
        pad_id=0,
        stop_tokens=stop,
        images=images,
        image_counts=counts,
        num_beams=case["k"],
        max_new_tokens=MAX_NEW,
        min_new_tokens=case["min_new"],
        length_penalty=case["lp"],
        repetition_penalty=case["rep"],
        **kw,
    )


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "k{k}-lp{lp}-rep{rep}-min{min_new}".format(**c)
)
def test_batched_cached_beam_search_equals_naive_per_sample(model, batch, case):
    prompts, images, counts, stop = batch
    out = _search(model, batch, case)
    per = _per_sample_images(images, counts)
    naive = [
        naive_beam_search(
            model,
            p,
            im,
            stop=set(stop),
            k=case["k"],
            max_new=MAX_NEW,
            min_new=case["min_new"],
            lp=case["lp"],
            rep=case["rep"],
        )
        for p, im in zip(prompts, per)
    ]
    assert out == naive
    assert len({tuple(o) for o in out}) == len(out)  # rows differ: a mix-up between rows would show
    assert all(len(o) >= case["min_new"] for o in out)
    assert _search(model, batch, case, use_cache=False) == out
    for key in case["off"]:  # the setting is exercised: back at its default the result changes
        assert _search(model, batch, {**case, key: DEFAULT[key]}) != out
    # the model is left without caches: a plain forward afterwards works
    assert model(torch.tensor([prompts[1][:4]])).shape == (1, 4, VOCAB)


def test_some_beams_stop_early(model, batch):
    """The stop tokens of ``batch`` end hypotheses before max_new_tokens (so stopping is tested)."""
    out = _search(model, batch, CASES[0])
    assert any(len(o) < MAX_NEW for o in out)


def test_beam_search_differs_from_greedy(model):
    """Guard against a search that degenerates to greedy (the equality test would still pass)."""
    prompts, images, counts = _batch(model, [1, 1, 0, 0], seed=2)
    kw = dict(pad_id=0, stop_tokens=[], images=images, image_counts=counts, max_new_tokens=8)
    assert generate(model, prompts, num_beams=4, **kw) != generate(model, prompts, **kw)


def test_one_beam_is_greedy(model):
    prompts, images, counts = _batch(model, [2, 0, 1], seed=3)
    kw = dict(pad_id=0, images=images, image_counts=counts, max_new_tokens=7)
    free = generate(model, prompts, stop_tokens=[], **kw)
    stop = [free[0][3], free[2][1]]
    greedy = generate(model, prompts, stop_tokens=stop, **kw)
    assert any(len(g) < 7 for g in greedy)  # some rows stopped early
    assert generate(model, prompts, stop_tokens=stop, num_beams=1, **kw) == greedy
    # the search itself at one beam and no length preference is greedy too
    one = beam_search(model, prompts, stop_tokens=stop, num_beams=1, length_penalty=0.0, **kw)
    assert one == greedy


def _naive_greedy(dec, prompt, n_new, *, rep=1.0, stop=(), min_new=0):
    """Greedy with HF's logits processors on the raw logits: repetition penalty, min_new_tokens."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for t in range(n_new):
            logits = dec(torch.tensor([seq]))[0, -1].float()
            for tok in set(seq):
                v = logits[tok]
                logits[tok] = v * rep if v < 0 else v / rep
            if t < min_new:
                logits[list(stop)] = -math.inf
            nxt = int(logits.argmax())
            if nxt in stop:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def test_greedy_repetition_penalty_and_min_new_tokens(model):
    dec = model.decoder
    base = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]
    first = generate(dec, base, pad_id=0, stop_tokens=[], max_new_tokens=4)
    prompts = [f + p for f, p in zip(first, base)]  # the model copies these: repeats to penalize
    plain = generate(dec, prompts, pad_id=0, stop_tokens=[], max_new_tokens=6)
    got = generate(dec, prompts, pad_id=0, stop_tokens=[], max_new_tokens=6, repetition_penalty=1.5)
    assert got == [_naive_greedy(dec, p, 6, rep=1.5) for p in prompts]
    assert got != plain
    stop = [plain[0][0], plain[1][0]]  # each row's first greedy token ends it at once ...
    assert generate(dec, prompts, pad_id=0, stop_tokens=stop, max_new_tokens=6) == [[], []]
    held = generate(dec, prompts, pad_id=0, stop_tokens=stop, max_new_tokens=6, min_new_tokens=3)
    assert held == [_naive_greedy(dec, p, 6, stop=stop, min_new=3) for p in prompts]
    assert all(len(h) >= 3 for h in held)  # ... unless min_new_tokens holds it back


def test_plain_decoder_beam_search_equals_naive(model):
    dec = model.decoder
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15]]
    out = generate(dec, prompts, pad_id=0, stop_tokens=[7], max_new_tokens=5, num_beams=3)
    assert out == [naive_beam_search(dec, p, None, stop={7}, k=3, max_new=5) for p in prompts]


def test_on_step_reports_the_beam_outputs(model):
    prompts, images, counts = _batch(model, [1, 0], seed=4)
    seen: dict[int, list[int]] = {0: [], 1: []}

    def on_step(rows, ids):
        for r, i in zip(rows, ids):
            seen[r].append(i)

    out = generate(
        model,
        prompts,
        pad_id=0,
        stop_tokens=[],
        images=images,
        image_counts=counts,
        max_new_tokens=5,
        num_beams=2,
        on_step=on_step,
    )
    assert [seen[0], seen[1]] == out


def test_generation_config_checks_and_kwargs():
    cfg = GenerationConfig.from_config(
        {"num_beams": 4, "length_penalty": 0.6, "max_new_tokens": 30}
    )
    assert (cfg.num_beams, cfg.length_penalty, cfg.max_new_tokens) == (4, 0.6, 30)
    assert GenerationConfig().num_beams == 1 and GenerationConfig().repetition_penalty == 1.0
    with pytest.raises(ConfigError, match=r"^generation\.beams: unknown key"):
        GenerationConfig.from_config({"beams": 4})
    with pytest.raises(ConfigError, match=r"^generation\.num_beams: expected an integer >= 1"):
        GenerationConfig(num_beams=0)
    with pytest.raises(ConfigError, match=r"^generation\.num_beams: expected an integer, got 'x'"):
        GenerationConfig(num_beams="x")
    with pytest.raises(ConfigError, match=r"^generation\.min_new_tokens"):
        GenerationConfig(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ConfigError, match=r"^generation\.repetition_penalty"):
        GenerationConfig(repetition_penalty=0)
    with pytest.raises(ConfigError, match=r"^generation\.num_beams: expected 1 when sampling"):
        GenerationConfig(num_beams=3, temperature=0.7)
