"""A training conversation without an assistant turn is refused where samples become training
data (VisionChatDataset); readers still accept prompts without answers (generate / eval)."""

from __future__ import annotations

import json

import pytest

from medtune.data import Message, Sample, sharegpt
from medtune.data.errors import NoAnswerError
from medtune.data.model_transform import VisionChatDataset
from medtune.data.sample import require_answers
from medtune.utils.errors import UserError


def _rows(path, with_answer):
    rows = [
        {
            "id": "a",
            "conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "x"}],
        },
        {"id": "b", "conversations": [{"from": "human", "value": "q2"}]},
        {
            "id": "c",
            "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q3"}],
        },
    ]
    if with_answer:
        rows = rows[:1]
    path.write_text(json.dumps(rows))
    return path


def test_reader_accepts_prompts_without_answers(tmp_path):
    samples = sharegpt(_rows(tmp_path / "p.json", with_answer=False))
    assert [s.id for s in samples] == ["a", "b", "c"]
    assert [m.role for m in samples[1].messages] == ["user"]


def test_training_dataset_refuses_a_conversation_without_assistant_turn(tmp_path):
    samples = sharegpt(_rows(tmp_path / "p.json", with_answer=False))
    with pytest.raises(NoAnswerError) as e:
        VisionChatDataset(samples, transform=None, train=True)
    assert str(e.value).startswith(
        "sample id 'b' of dataset 'sharegpt': training conversation has no assistant turn "
        "(2 of 3 samples)"
    )
    assert isinstance(e.value, UserError) and e.value.reason == "no answer"
    with pytest.raises(NoAnswerError):  # validation loss needs answers too
        VisionChatDataset(samples, transform=None, train=False)
    ok = sharegpt(_rows(tmp_path / "ok.json", with_answer=True))
    assert len(VisionChatDataset(ok, transform=None, train=True)) == 1


def test_require_answers_accepts_an_empty_answer_turn():
    # SLAKE has a row whose answer is empty: the assistant turn is there (evaluation counts it).
    require_answers([Sample("1", messages=[Message("user", "q"), Message("assistant", "")])])
    with pytest.raises(NoAnswerError, match=r"^sample id '2': training conversation"):
        require_answers([Sample("2", messages=[Message("user", "q")])])
