"""medtune.training.contrastive: ITC equals the symmetric InfoNCE, hard negatives, momentum queue."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medtune.training.contrastive import ContrastiveLoss, MomentumQueue, hard_negatives


def test_itc_is_symmetric_infonce():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(14.0)
    got = ContrastiveLoss().itc({"image_features": img, "text_features": txt, "logit_scale": scale})
    logits = scale * img @ txt.T
    want = (
        F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))
    ) / 2
    torch.testing.assert_close(got, want)


def test_hard_negatives_skip_positive_and_follow_similarity():
    sim = torch.zeros(4, 4)
    sim[:, 2] = 30.0  # column 2 dominates every row's softmax
    picks = hard_negatives(sim, torch.arange(4), torch.Generator().manual_seed(1))
    assert picks[2] != 2  # never the positive
    assert picks.tolist()[:2] == [2, 2] and picks[3] == 2
    again = hard_negatives(sim, torch.arange(4), torch.Generator().manual_seed(1))
    assert torch.equal(picks, again)  # the generator alone decides


class _Towers(torch.nn.Module):
    embed_dim = 4

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(3, 4)
        self.itm = None

    def forward(self, images, tokens):
        f = F.normalize(self.w(images), dim=-1)
        return {"image_features": f, "text_features": f.flip(0), "logit_scale": torch.tensor(10.0)}


def test_momentum_queue_ema_and_enqueue():
    torch.manual_seed(0)
    model = _Towers()
    q = MomentumQueue(model, queue_size=5, momentum=0.9, alpha=0.4)
    before = q.model_m.w.weight.clone()
    with torch.no_grad():
        model.w.weight.add_(1.0)
    x = torch.randn(3, 3)
    out = model(x, None)
    loss = q.loss(model, out, x, None)
    assert loss.requires_grad and torch.isfinite(loss)
    torch.testing.assert_close(q.model_m.w.weight, 0.9 * before + 0.1 * model.w.weight.detach())
    assert int(q.ptr) == 3
    m = q.model_m(x, None)
    torch.testing.assert_close(q.image_queue[:, :3], m["image_features"].T)
    q.loss(model, model(x, None), x, None)
    assert int(q.ptr) == 1  # wrapped around the 5 slots
