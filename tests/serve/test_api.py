"""The OpenAI-compatible API, driven by the official ``openai`` client against a real server."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai import OpenAI

from medtune.data.sample import IMAGE_MARKER, Message, Sample
from medtune.generation import GenerationConfig
from medtune.inference import answer
from medtune.serve import create_app

from .conftest import image_message, running


def client(url: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def ask(c: OpenAI, url: str, question: str, **kw):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    return c.chat.completions.create(
        model="tiny-medvlm", messages=image_message(url, question), **kw
    )


def streamed(c: OpenAI, url: str, question: str, **kw) -> tuple[str, list]:
    chunks = list(ask(c, url, question, stream=True, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return text, chunks


def test_answer_equals_the_inference_path_streaming_and_not(vlm_server, engine, scans, vlm):
    url, _ = vlm_server
    c = client(url)
    r = ask(c, scans[0], "Which side is the lesion on?", max_tokens=6)
    # the same sample through medtune.inference.answer directly
    sample = Sample("x", [], [Message("user", IMAGE_MARKER + "Which side is the lesion on?")])
    from medtune.serve.images import decode_image

    sample.images.append(decode_image(scans[0], "p", max_pixels=1 << 24))
    want = answer(
        vlm,
        engine.transform,
        [sample],
        GenerationConfig(max_new_tokens=6),
        tokenizer=engine.tokenizer,
    )[0]
    assert r.choices[0].message.content == engine.decode(want.token_ids)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == want.prompt_tokens + len(want.token_ids)
    assert r.model == "tiny-medvlm" and r.object == "chat.completion"

    text, chunks = streamed(
        c, scans[0], "Which side is the lesion on?", stream_options={"include_usage": True}
    )
    assert text == r.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) >= 2
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_raw_sse_ends_with_done(vlm_server, scans):
    url, _ = vlm_server
    body = {"messages": image_message(scans[1], "What?"), "max_tokens": 3, "stream": True}
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [e for e in resp.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}


def test_concurrent_clients_are_batched_and_answer_as_alone(vlm_server, scans):
    url, app = vlm_server
    c = client(url)
    questions = [(s, f"Question {i}: which side?", 3 + i % 4) for i, s in enumerate(scans)]
    alone = [ask(c, s, q, max_tokens=n).choices[0].message.content for s, q, n in questions]
    assert len(set(alone)) > 1  # different inputs, different answers: the comparison can fail

    before = len(app.state.batcher.batch_sizes)
    barrier = threading.Barrier(len(questions))

    def one(i: int) -> str:
        s, q, n = questions[i]
        barrier.wait()
        if i % 2:  # half of them streamed
            return streamed(c, s, q, max_tokens=n)[0]
        return ask(c, s, q, max_tokens=n).choices[0].message.content

    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(one, range(len(questions))))
    assert together == alone
    sizes = app.state.batcher.batch_sizes[before:]
    assert sum(sizes) == len(questions)
    assert max(sizes) > 1, sizes  # at least one generation held several requests


def test_stop_strings_and_max_tokens(vlm_server, scans):
    url, _ = vlm_server
    c = client(url)
    full = ask(c, scans[2], "Describe.", max_tokens=10)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 10
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text[: text.find(stop)]
    r = ask(c, scans[2], "Describe.", max_tokens=10, stop=[stop])
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    assert streamed(c, scans[2], "Describe.", max_tokens=10, stop=stop)[0] == cut
    short = ask(c, scans[2], "Describe.", max_tokens=4)
    assert short.usage.completion_tokens == 4 and text.startswith(short.choices[0].message.content)


def test_seeded_sampling_is_reproducible(vlm_server, scans):
    url, _ = vlm_server
    c = client(url)
    a = ask(c, scans[3], "Q?", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = ask(c, scans[3], "Q?", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content
    other = ask(c, scans[3], "Q?", max_tokens=8, temperature=1.0, top_p=0.9, seed=8)
    greedy = ask(c, scans[3], "Q?", max_tokens=8)
    assert other.choices[0].message.content != a.choices[0].message.content  # it does sample
    assert greedy.choices[0].message.content != a.choices[0].message.content


def test_models_and_health(vlm_server):
    url, _ = vlm_server
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["tiny-medvlm"]
    with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ok" and health["images"] is True
    assert "lung" in health["dicom_windows"]


def test_dicom_data_url(vlm_server, ct_dicom):
    url, _ = vlm_server
    c = client(url)
    dicom = "data:application/dicom;base64," + base64.b64encode(ct_dicom.read_bytes()).decode()
    plain = ask(c, dicom, "Which organ?", max_tokens=4)
    assert plain.usage.completion_tokens == 4
    lung = ask(c, dicom, "Which organ?", max_tokens=4, extra_body={"window": "lung"})
    assert lung.usage.prompt_tokens == plain.usage.prompt_tokens


def test_api_key(engine, scans):
    app = create_app(engine, api_key="s3cret", max_wait_ms=0)
    with running(app) as url:
        with pytest.raises(openai.AuthenticationError) as e:
            client(url, "wrong").models.list()
        assert e.value.status_code == 401
        assert e.value.body["code"] == "invalid_api_key"
        req = urllib.request.Request(f"{url}/v1/chat/completions", b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e2:
            urllib.request.urlopen(req, timeout=10)
        assert e2.value.code == 401
        assert json.loads(e2.value.read())["error"]["type"] == "invalid_request_error"
        r = ask(client(url, "s3cret"), scans[0], "Q?", max_tokens=2)
        assert r.usage.completion_tokens == 2
        with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:  # open without a key
            assert resp.status == 200


def test_full_queue_answers_503_at_once_and_recovers(engine, scans):
    """max_queue=1, one at a time: while a batch runs (held at a gate) and one request waits, a
    third gets 503 at once; after the gate opens the first two finish."""
    gate, entered = threading.Event(), threading.Event()

    class Gated:
        def __getattr__(self, name):
            return getattr(engine, name)

        def answer(self, *args, **kwargs):
            entered.set()
            assert gate.wait(60)
            return engine.answer(*args, **kwargs)

    app = create_app(Gated(), max_batch_size=1, max_wait_ms=0, max_queue=1)
    with running(app) as url, ThreadPoolExecutor(2) as pool:
        c = client(url)
        first = pool.submit(ask, c, scans[0], "Q1?", max_tokens=2)
        assert entered.wait(30)
        second = pool.submit(ask, c, scans[1], "Q2?", max_tokens=2)
        for _ in range(200):  # until the second request is queued
            if app.state.batcher.waiting == 1:
                break
            threading.Event().wait(0.02)
        assert app.state.batcher.waiting == 1
        with pytest.raises(openai.APIStatusError) as e:
            ask(c, scans[2], "Q3?", max_tokens=2)
        assert e.value.status_code == 503
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.body["code"] == "server_busy"
        gate.set()
        assert first.result(60).usage.completion_tokens == 2
        assert second.result(60).usage.completion_tokens == 2
        assert ask(c, scans[2], "Q3?", max_tokens=2).usage.completion_tokens == 2
