"""The fine-tuning loop's pieces (:mod:`medtune.training.loop`) on a one-layer model, one process:
the update is on the mean over the answer tokens of the accumulated batch, and between the
micro-batches come the mid-epoch checkpoints, and at each epoch's end validation, the epoch
checkpoint and the curves hook, from a resumed position on."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from medtune.training.loop import StepMeter, backward_and_step, train_batches
from medtune.training.run import Run


def _run(tmp_path: Path, **kw) -> Run:
    settings = dict(
        name="t",
        cfg=OmegaConf.create({}),
        device=torch.device("cpu"),
        distributed=False,
        rank=0,
        world_size=1,
        output_dir=tmp_path,
        seed=0,
        batch_size=2,
        epochs=1,
        accum=1,
        max_steps_per_epoch=None,
        log_every=1,
        save_every=None,
        clip=None,
    )
    settings.update(kw)
    return Run(**settings)


def test_accumulated_step_is_on_the_mean_over_all_answer_tokens(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    w0 = model.weight.detach().clone()
    run = _run(tmp_path, accum=2)
    run.model = model
    run.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    run.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: 1.0)
    run.meter = StepMeter(run)
    run.meter.pbar = tqdm(disable=True)
    # two micro-batches of 3 and 1 answer tokens: per-token losses x . w, summed per batch
    xa, xb = torch.randn(3, 3), torch.randn(1, 3)
    assert not backward_and_step(run, model(xa).sum(), torch.tensor(3))
    assert run.global_step == 0 and run.batches_done == 1
    assert backward_and_step(run, model(xb).sum(), torch.tensor(1))
    # mean over the 4 tokens, not the mean of the two batch means
    want_grad = torch.cat([xa, xb]).mean(0, keepdim=True)
    torch.testing.assert_close(model.weight.detach(), w0 - want_grad)
    torch.testing.assert_close(
        torch.tensor(run.loss_history[0]), (torch.cat([xa, xb]) @ w0.T).mean()
    )
    assert run.global_step == 1 and run.meter.stepped and float(run.meter.tokens) == 0


class _Data:
    def __init__(self, n: int) -> None:
        self.calls: list[tuple] = []
        self.train_ds = SimpleNamespace(set_epoch=lambda e: self.calls.append(("ds", e)))
        self.sampler = SimpleNamespace(
            set_epoch=lambda e, skip=0: self.calls.append(("sampler", e, skip))
        )
        self.batches = [{"i": i} for i in range(n)]
        self.train_loader = self  # iterated each epoch from the sampler's position
        self.val_loader = None
        self.skip = 0

    def __iter__(self):
        skip = self.calls[-1][2]
        return iter(self.batches[skip:])


def test_train_batches_resumes_mid_epoch_and_saves_between_steps(tmp_path):
    model = torch.nn.Linear(2, 1)
    run = _run(tmp_path, epochs=2, save_every=1)
    run.model, run.data = model, _Data(n=5)
    run.steps_per_epoch = 3  # 3 of the loader's 5 batches per epoch
    run.epoch, run.batches_done, run.global_step = 0, 1, 1  # resumed one step into epoch 0
    saved, plotted, seen = [], [], []

    def fake_step(batch):  # what the recipe does between two batches: one step per batch
        seen.append((run.epoch, batch["i"]))
        run.batches_done += 1
        run.global_step += 1
        run.loss_history.append(0.0)
        run.meter.stepped = True

    for batch in train_batches(run, None, saved.append, plotted.append):
        fake_step(batch)
    assert ("sampler", 0, 1) in run.data.calls and ("sampler", 1, 0) in run.data.calls
    assert seen == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    # a step checkpoint after each step but an epoch's last; the epoch checkpoint, then the curves
    assert saved == ["step_2", "epoch_0", "step_4", "step_5", "epoch_1"]
    assert plotted == [tmp_path, tmp_path]
    assert run.epoch == 2 and run.batches_done == 0
