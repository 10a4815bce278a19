"""The ``openai`` judge backend against a scripted OpenAI-compatible server on 127.0.0.1."""

import time

import pytest

from medtune.eval.judge import VerdictStore, run_judge
from medtune.eval.judge.http import JudgeHTTPError, OpenAIJudge

FAST = {"backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5.0}


def make(server, **kw):
    args = {**FAST, **kw}
    return OpenAIJudge(server.base_url, "test-judge", **args)


def test_scripted_answers_and_request_shape(judge_server):
    judge_server.script = [("ok", "RIGHT"), ("ok", "  wrong.")]
    j = make(judge_server, concurrency=1)
    assert j.judge(["p1", "p2"]) == ["RIGHT", "  wrong."]
    req = judge_server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["model"] == "test-judge"
    assert req["body"]["temperature"] == 0.0
    assert req["body"]["messages"] == [{"role": "user", "content": "p1"}]
    assert req["auth"] is None
    assert j.name == "openai:test-judge"


def test_api_key_from_env(judge_server, monkeypatch):
    monkeypatch.setenv("MEDTUNE_TEST_KEY", "sk-test")
    j = make(judge_server, api_key_env="MEDTUNE_TEST_KEY")
    j.judge(["p"])
    assert judge_server.requests[0]["auth"] == "Bearer sk-test"
    monkeypatch.delenv("MEDTUNE_TEST_KEY")
    with pytest.raises(ValueError, match="MEDTUNE_TEST_KEY"):
        make(judge_server, api_key_env="MEDTUNE_TEST_KEY")


def test_retries_429_and_5xx(judge_server):
    judge_server.script = [("status", 429, 0), ("status", 500), ("status", 503), ("ok", "RIGHT")]
    j = make(judge_server, max_retries=5)
    assert j.judge(["p"]) == ["RIGHT"]
    assert judge_server.n_requests == 4


def test_retry_after_is_honoured_but_capped(judge_server):
    sleeps = []
    judge_server.script = [("status", 429, 100), ("ok", "RIGHT")]
    j = make(judge_server, sleep=sleeps.append, max_backoff_s=0.5)
    assert j.judge(["p"]) == ["RIGHT"]
    # Retry-After 100 s capped at max_backoff_s 0.5 (plus at most 10% jitter)
    assert len(sleeps) == 1 and 0.5 <= sleeps[0] <= 0.55


def test_exponential_backoff_is_bounded(judge_server):
    sleeps = []
    judge_server.script = [("status", 500)] * 4
    j = make(judge_server, sleep=sleeps.append, max_retries=3, backoff_s=1.0, max_backoff_s=3.0)
    with pytest.raises(JudgeHTTPError, match="after 4 tries.*HTTP 500"):
        j.judge(["p"])
    assert judge_server.n_requests == 4
    # delays 1, 2, min(4, 3) = 3 seconds, each plus up to 10% jitter
    assert [round(s) for s in sleeps] == [1, 2, 3]


def test_malformed_json_is_retried_then_fails_clearly(judge_server):
    judge_server.script = [("malformed",), ("nochoices",), ("ok", "WRONG")]
    assert make(judge_server).judge(["p"]) == ["WRONG"]
    judge_server.script = [("malformed",)] * 3
    with pytest.raises(JudgeHTTPError, match="after 3 tries; last error: malformed reply"):
        make(judge_server, max_retries=2).judge(["p"])


def test_slow_reply_times_out_then_retry_succeeds(judge_server):
    judge_server.script = [("sleep", 3.0, "RIGHT"), ("ok", "WRONG")]
    j = make(judge_server, timeout_s=0.3)
    t0 = time.monotonic()
    assert j.judge(["p"]) == ["WRONG"]
    assert time.monotonic() - t0 < 2.5  # did not wait for the slow reply
    assert judge_server.n_requests == 2


def test_dropped_connection_is_retried(judge_server):
    judge_server.script = [("drop",), ("ok", "RIGHT")]
    assert make(judge_server).judge(["p"]) == ["RIGHT"]


def test_client_error_fails_at_once(judge_server):
    judge_server.script = [("status", 400)]
    with pytest.raises(JudgeHTTPError, match="HTTP 400"):
        make(judge_server).judge(["p"])
    assert judge_server.n_requests == 1


def test_connection_refused_fails_after_retries():
    j = OpenAIJudge("http://127.0.0.1:9/v1", "m", max_retries=1, **FAST)
    with pytest.raises(JudgeHTTPError, match="after 2 tries"):
        j.judge(["p"])


def test_concurrency_keeps_order(judge_server):
    judge_server.reply_fn = lambda prompt: prompt.upper()
    prompts = [f"p{i}" for i in range(20)]
    assert make(judge_server, concurrency=6).judge(prompts) == [p.upper() for p in prompts]
    assert judge_server.n_requests == 20


def test_base_url_forms(judge_server):
    j = OpenAIJudge(judge_server.base_url + "/chat/completions/", "m", **FAST)
    assert j.url == judge_server.base_url + "/chat/completions"
    assert j.judge(["Our answer: a\nCorrect answer: a"]) == ["RIGHT"]


def test_run_judge_over_http_with_misbehaving_server(judge_server, tmp_path, pred_rows):
    # a 429, a 500, a malformed reply and an unparsable verdict, then the default replies
    judge_server.script = [("status", 429), ("status", 500), ("malformed",), ("ok", "Perhaps")]
    backend = make(judge_server, concurrency=1)
    with VerdictStore(tmp_path / "v.jsonl") as store:
        verdicts = run_judge(pred_rows, backend, store, batch_size=3)
    # row 0 got "Perhaps" (UNPARSED) then, retried once, RIGHT from the default reply
    assert verdicts[0]["verdict"] == "RIGHT" and verdicts[0]["attempts"] == 2
    expected = ["RIGHT" if r["answer"] == r["prediction"] else "WRONG" for r in pred_rows]
    assert [v["verdict"] for v in verdicts] == expected
    # 10 replies + 3 failed tries + 1 retry of the UNPARSED one
    assert judge_server.n_requests == 14
