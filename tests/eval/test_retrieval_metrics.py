"""Retrieval recall: the vectorised scorer against BLIP's per-row argsort itm_eval."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtune.eval.retrieval_metrics import (
    RETRIEVAL_KEYS,
    RetrievalFileError,
    itm_eval,
    save_retrieval,
    score_retrieval_file,
)


def blip_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """salesforce/BLIP train_retrieval.py itm_eval, restated (numpy argsort per row)."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr1, tr5, tr10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1, ir5, ir10 = (100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10))
    tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    return {
        "txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean,
        "img_r1": ir1, "img_r5": ir5, "img_r10": ir10, "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
    }  # fmt: skip


def _random_case(n_images, per_image, seed, signal=1.5):
    g = torch.Generator().manual_seed(seed)
    txt2img = torch.arange(n_images).repeat_interleave(per_image)
    txt2img = txt2img[torch.randperm(txt2img.numel(), generator=g)]
    # Continuous random scores (no ties) with some signal so recalls are neither 0 nor 100.
    sim = torch.randn(n_images, txt2img.numel(), generator=g, dtype=torch.float64)
    sim[txt2img, torch.arange(txt2img.numel())] += signal
    img2txt = [torch.nonzero(txt2img == i).flatten().tolist() for i in range(n_images)]
    return sim, txt2img, img2txt


@pytest.mark.parametrize("n_images,per_image,seed", [(37, 5, 0), (64, 1, 1), (200, 3, 2)])
def test_matches_blip_without_t2i(n_images, per_image, seed):
    sim, txt2img, img2txt = _random_case(n_images, per_image, seed)
    ours = itm_eval(sim, None, txt2img)
    ref = blip_itm_eval(sim.numpy(), sim.numpy().T, txt2img.numpy(), img2txt)
    assert tuple(ours) == RETRIEVAL_KEYS
    assert ours == pytest.approx(ref, abs=1e-9)
    assert 0 < ours["txt_r1"] < 100 and 0 < ours["img_r5"] < 100  # the case exercises ranks


def test_matches_blip_with_separate_t2i_and_img2txt():
    sim, txt2img, img2txt = _random_case(50, 4, 3)
    g = torch.Generator().manual_seed(9)
    sim_t2i = sim.T + 0.7 * torch.randn(sim.T.shape, generator=g, dtype=torch.float64)
    ours = itm_eval(sim.float(), sim_t2i.float(), txt2img, img2txt)
    ref = blip_itm_eval(sim.float().numpy(), sim_t2i.float().numpy(), txt2img.numpy(), img2txt)
    assert ours == pytest.approx(ref, abs=1e-9)
    # sim_t2i is used for text -> image: it differs from the transpose's answer.
    assert ours["img_r1"] != itm_eval(sim.float(), None, txt2img)["img_r1"]


def test_hand_case():
    # 2 images, 3 texts: text 0, 1 -> image 0; text 2 -> image 1.
    sim = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    out = itm_eval(sim, None, torch.tensor([0, 0, 1]))
    # image 0: best own text (1) is first -> rank 0; image 1: own text 2 is second -> rank 1.
    assert out["txt_r1"] == 50.0 and out["txt_r5"] == 100.0
    # text 0: column [0.1, 0.8], image 0 ranks 1; text 1: rank 0; text 2: [0.5, 0.3] image 1 rank 1.
    assert out["img_r1"] == pytest.approx(100 / 3) and out["img_r5"] == 100.0
    assert out["r_mean"] == pytest.approx(((50 + 100 + 100) / 3 + (100 / 3 + 200) / 3) / 2)


def test_image_without_text_is_a_miss():
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    out = itm_eval(sim, None, torch.tensor([0, 1]))
    assert out["txt_r10"] == pytest.approx(200 / 3)  # image 2 has no text: rank 1e20, as BLIP


def test_file_round_trip(tmp_path):
    sim, txt2img, img2txt = _random_case(20, 2, 4)
    path = save_retrieval(tmp_path / "r" / "retrieval.safetensors", sim, txt2img)
    ref = blip_itm_eval(sim.float().numpy(), sim.float().numpy().T, txt2img.numpy(), img2txt)
    assert score_retrieval_file(path) == pytest.approx(ref, abs=1e-9)


def test_bad_inputs(tmp_path):
    with pytest.raises(RetrievalFileError, match="txt2img holds image indices"):
        itm_eval(torch.zeros(2, 3), None, torch.tensor([0, 1, 2]))
    with pytest.raises(RetrievalFileError, match="n_texts=3"):
        itm_eval(torch.zeros(2, 3), None, torch.tensor([0, 1]))
    with pytest.raises(RetrievalFileError, match=r"sim_t2i must be \[n_texts, n_images\]"):
        itm_eval(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1, 1]))
    with pytest.raises(RetrievalFileError, match="NaN"):
        itm_eval(torch.tensor([[float("nan")]]), None, torch.tensor([0]))
    from safetensors.torch import save_file

    save_file({"sim": torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(RetrievalFileError, match="missing tensor"):
        score_retrieval_file(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_text("not a safetensors file")
    with pytest.raises(RetrievalFileError, match="not a readable safetensors"):
        score_retrieval_file(tmp_path / "y.safetensors")
