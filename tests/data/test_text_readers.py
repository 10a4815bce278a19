"""Caption JSON, ShareGPT / LLaVA conversations, mix and prompt templates."""

from __future__ import annotations

import json
import random
import sys
from collections import Counter

import pytest
from PIL import Image

from medtune.data import (
    CAPTION_INSTRUCTIONS,
    IMAGE_MARKER,
    VQA_DIRECT,
    VQA_SHORT_ANSWER,
    DataError,
    Message,
    Sample,
    apply_template,
    caption_json,
    llava,
    mix,
    sharegpt,
)
from medtune.data.errors import MalformedJSONError, MissingFieldError, MissingImageError
from medtune.data.mix import mix_counts


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "figs"
    (d / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.jpg"):
        Image.new("RGB", (8, 8), (len(name) * 20, 0, 0)).save(d / name)
    return d


def _write(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), "utf-8")
    return path


# --------------------------------------------------------------------------------------- captions


def test_caption_json(images, tmp_path):
    f = _write(
        images / "captions.json",
        [
            {
                "image": "a.png",
                "caption": "Axial CT showing a hypodense liver lesion.",
                "pmcid": "PMC1",
            },
            {"id": 7, "image": "sub/c.jpg", "caption": "Chest X-ray.", "split": "test"},
            {"image": ["a.png", "b.png"], "caption": "Two panels."},
            {"image": str(images / "b.png"), "caption": "Absolute path."},
        ],
    )
    s = caption_json(f)
    assert [x.id for x in s] == ["captions-0", "7", "captions-2", "captions-3"]
    assert s[0].images == [str(images / "a.png")] and len(s[2].images) == 2
    assert s[0].messages == [
        Message("user", CAPTION_INSTRUCTIONS[0]),
        Message("assistant", "Axial CT showing a hypodense liver lesion."),
    ]
    assert (
        s[0].meta["pmcid"] == "PMC1"
        and s[0].meta["dataset"] == "caption"
        and s[0].meta["image"] == "a.png"
    )
    assert s[0].meta["answer"] == s[0].meta["caption"]
    # image_root other than the file's folder
    g = _write(tmp_path / "elsewhere.json", [{"image": "a.png", "caption": "x"}])
    assert caption_json(g, image_root=images)[0].images == [str(images / "a.png")]
    with pytest.raises(MissingFieldError, match=r"captions\.json row 0: missing field 'split'"):
        caption_json(f, split="test")


def test_caption_split_keyed_and_jsonl(images):
    f = _write(
        images / "roco.json",
        {
            "train": [{"image": "a.png", "text": "t1"}],
            "test": [{"image": "b.png", "caption": "t2"}],
        },
    )
    assert [x.meta["split"] for x in caption_json(f)] == ["train", "test"]
    assert [x.messages[1].content for x in caption_json(f, split="test")] == ["t2"]
    with pytest.raises(DataError, match=r"no split 'val' .*\['test', 'train'\]"):
        caption_json(f, split="val")
    j = images / "c.jsonl"
    j.write_text('{"image": "a.png", "caption": "x"}\n\n{"image": "b.png", "caption": \n')
    with pytest.raises(MalformedJSONError, match=r"c\.jsonl: malformed JSON at line 3 column"):
        caption_json(j)


def test_caption_bad_rows(images):
    f = _write(
        images / "bad.json",
        [
            {"id": "x1", "image": "a.png"},
            {"id": "x2", "image": "missing.png", "caption": "c"},
            {"id": "x3", "image": "b.png", "caption": "fine"},
            "not an object",
        ],
    )
    with pytest.raises(
        MissingFieldError,
        match=r"bad\.json row 0 \(id x1\): missing field 'caption' \(expected a caption string",
    ):
        caption_json(f)
    s = caption_json(f, skip_bad_rows=True)
    assert [x.id for x in s] == ["x3"]
    assert s.skipped == Counter({"missing field": 2, "missing image": 1})
    assert "row 1 (id x2): image not found" in str(s.errors[1])


# ---------------------------------------------------------------------------------- conversations


def test_sharegpt_multi_turn_and_images(images):
    f = _write(
        images / "conv.json",
        [
            {
                "id": "c1",
                "image": "a.png",
                "conversations": [
                    {"from": "system", "value": "You are a radiologist."},
                    {"from": "human", "value": "<image>\nWhat is shown?"},
                    {"from": "gpt", "value": "A liver."},
                    {"from": "human", "value": "Any lesion?"},
                    {"from": "gpt", "value": "Yes."},
                ],
            },
            {
                "id": 2,
                "images": ["a.png", "sub/c.jpg"],
                "conversations": [
                    {"from": "human", "value": "Compare <image> with <image>."},
                    {"from": "gpt", "value": "Same."},
                ],
            },
            {
                "conversations": [
                    {"from": "human", "value": "Text only?"},
                    {"from": "gpt", "value": "Yes."},
                ],
                "source": "pubmed",
            },
            {
                "id": "m",
                "image": "b.png",
                "messages": [
                    {"role": "user", "content": "Describe."},
                    {"role": "assistant", "content": "Dark."},
                ],
            },
        ],
    )
    s = sharegpt(f)
    assert [x.id for x in s] == ["c1", "2", "conv-2", "m"]
    assert [m.role for m in s[0].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert s[0].messages[1].content.startswith(IMAGE_MARKER)  # markers kept
    assert s[1].images == [str(images / "a.png"), str(images / "sub" / "c.jpg")]
    assert (
        s[2].images == [] and s[2].meta["source"] == "pubmed" and s[2].meta["dataset"] == "sharegpt"
    )
    assert s[3].messages == [Message("user", "Describe."), Message("assistant", "Dark.")]
    assert llava(f)[0].meta["dataset"] == "llava"


@pytest.mark.parametrize(
    "row, match",
    [
        (
            {
                "id": "r",
                "image": "a.png",
                "conversations": [
                    {"from": "human", "value": "<image> <image> x"},
                    {"from": "gpt", "value": "y"},
                ],
            },
            r"row 0 \(id r\): 2 <image> marker\(s\) in the text for 1 image\(s\)",
        ),
        (
            {"id": "r", "conversations": [{"from": "doctor", "value": "x"}]},
            r"row 0 \(id r\): conversations\[0\]: unknown role 'doctor'",
        ),
        (
            {"id": "r", "conversations": [{"from": "human"}]},
            r"row 0 \(id r\): conversations\[0\]: missing field 'value' \(expected a string\)",
        ),
        ({"id": "r", "conversations": []}, r"row 0 \(id r\): field 'conversations' is empty"),
        (
            {"id": "r", "image": "nope.png", "conversations": [{"from": "human", "value": "x"}]},
            r"row 0 \(id r\): image not found: .*nope\.png",
        ),
        ({"id": "r"}, r"row 0 \(id r\): missing field 'conversations'"),
        (
            {"id": "r", "conversations": [{"from": "gpt", "value": "x"}]},
            r"row 0 \(id r\): conversations has no human turn",
        ),
    ],
)
def test_sharegpt_bad_rows(images, row, match):
    f = _write(images / "bad.json", [row])
    with pytest.raises(DataError, match=r"bad\.json " + match):
        sharegpt(f)
    out = sharegpt(f, skip_bad_rows=True)
    assert len(out) == 0 and out.num_skipped == 1


def test_llava_question_file(images):
    f = images / "qa.jsonl"
    f.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "question_id": 11,
                    "image": "a.png",
                    "text": "What organ?",
                    "gpt4_answer": "Liver",
                    "type": "open",
                },
                {"question_id": 12, "image": "b.png", "text": "Is it normal?"},
            ]
        )
    )
    s = llava(f)
    assert [x.id for x in s] == ["11", "12"]
    assert s[0].messages == [Message("user", "What organ?"), Message("assistant", "Liver")]
    assert s[1].messages == [Message("user", "Is it normal?")] and s[0].meta["type"] == "open"
    with pytest.raises(MissingImageError):
        llava(f, image_root=images / "sub")


# -------------------------------------------------------------------------------------------- mix


def _src(name, n):
    return [Sample(id=f"{name}{i}", meta={"dataset": name}) for i in range(n)]


def test_mix_sizes_and_determinism():
    a, b = _src("a", 100), _src("b", 10)
    assert mix_counts([100, 10], [1, 1]) == [55, 55]
    assert mix_counts([100, 10], [2, 1], size=10) == [7, 3]
    assert mix_counts([100, 10], None) == [100, 10]
    m = mix([a, b], [1, 1], seed=3)
    c = Counter(s.meta["dataset"] for s in m)
    assert len(m) == 110 and c == {"a": 55, "b": 55}
    ids_b = Counter(s.id for s in m if s.meta["dataset"] == "b")
    assert set(ids_b.values()) <= {5, 6} and sum(ids_b.values()) == 55  # 5 whole copies + 5 extra
    assert len({s.id for s in m if s.meta["dataset"] == "a"}) == 55  # subset without replacement
    assert [s.id for s in m] == [s.id for s in mix([a, b], [1, 1], seed=3)]
    assert [s.id for s in m] != [s.id for s in mix([a, b], [1, 1], seed=4)]
    plain = mix([a, b])
    assert sorted(s.id for s in plain) == sorted(s.id for s in a + b)
    assert Counter(s.meta["dataset"] for s in mix([a, b], [1, 0])) == {"a": 110}


def test_mix_errors():
    with pytest.raises(ValueError, match="2 weights for 3 sources"):
        mix([[], [], []], [1, 1])
    with pytest.raises(ValueError, match="source 1 is empty"):
        mix([_src("a", 2), []], [1, 1])
    with pytest.raises(ValueError, match="not all 0"):
        mix([_src("a", 2)], [0])


# ---------------------------------------------------------------------------------------- prompts


def test_apply_template_vqa():
    s = Sample(
        id="1",
        images=["x.png"],
        messages=[Message("user", "Is there a lesion?"), Message("assistant", "yes")],
        meta={"question": "Is there a lesion?", "modality": "CT"},
    )
    out = apply_template(s, VQA_SHORT_ANSWER)
    assert out.messages[0].content == "Is there a lesion?\nAnswer with a single word or phrase."
    assert s.messages[0].content == "Is there a lesion?"  # original untouched
    assert out.messages[1] == s.messages[1] and out.meta == s.meta and out.images == s.images
    assert apply_template(s, VQA_DIRECT).messages[0].content == "Is there a lesion?"
    assert (
        apply_template(s, "[{modality}] {question}").messages[0].content
        == "[CT] Is there a lesion?"
    )
    assert apply_template(s, None).messages == s.messages
    with pytest.raises(ValueError, match="uses field 'organ'"):
        apply_template(s, "{organ}: {question}")


def test_apply_template_sampling_keeps_markers():
    s = Sample(
        id="c",
        images=["a", "b"],
        messages=[
            Message("system", "sys"),
            Message("user", "<image>\n<image>\nDescribe."),
            Message("assistant", "cap"),
        ],
    )
    first = apply_template(s, CAPTION_INSTRUCTIONS)
    assert first.messages[1].content == "<image>\n<image>\n" + CAPTION_INSTRUCTIONS[0]
    assert first.messages[0].content == "sys"
    rng1, rng2 = random.Random(5), random.Random(5)
    seq1 = [apply_template(s, CAPTION_INSTRUCTIONS, rng1).messages[1].content for _ in range(20)]
    seq2 = [apply_template(s, CAPTION_INSTRUCTIONS, rng2).messages[1].content for _ in range(20)]
    assert seq1 == seq2 and len(set(seq1)) > 2
    assert all(t.count(IMAGE_MARKER) == 2 for t in seq1)
    vqa = apply_template(s, VQA_SHORT_ANSWER).messages[1].content
    assert vqa.count(IMAGE_MARKER) == 2 and vqa.endswith("phrase.")


def test_light_imports():
    import subprocess

    code = (
        "import sys, medtune.data, medtune.data.errors, medtune.data.prompts, medtune.data.sample; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
