"""The trackers researchers use, as ``metric_logger`` components of the demo run, all offline.

``medtune run vision_finetune --config demo`` runs (2 steps, a scalar logged each step) with
torchtune's DiskLogger, TensorBoardLogger, WandBLogger (offline) and MLFlowLogger (a local file
store); each tracker's files are read back with that tracker's own reader (TensorBoard's event
accumulator, W&B's transaction-log records, MLflow's client) and the scalars must equal the
DiskLogger run's (same seed: the same run). The resolved config is logged once; only rank 0 logs.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medtune._cli.main import main
from medtune.training.trackers import build_metric_logger, group_lrs
from medtune.viz.curves import read_run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

LOGGERS = "torchtune.training.metric_logging."


def _run(assets, out: Path, *overrides: str) -> None:
    argv = [
        "run", "vision_finetune", "--config", "demo", f"assets_dir={assets}",
        f"output_dir={out}", "epochs=1", "max_steps_per_epoch=2", "batch_size=4",
        "log_every_n_steps=1", "seed=3", *overrides,
    ]  # fmt: skip
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    assert status in (0, None)


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory):
    """The DiskLogger run: {key: {step: value}} from its log file."""
    out = tmp_path_factory.mktemp("disk")
    _run(tiny_assets, out)
    series = read_run(out).series
    assert sorted(series["loss"]) == [1, 2] and "lr" in series
    # the demo's two parameter groups (lr.encoder 1e-3, lr.connector 2e-3 under one schedule)
    assert series["lr_connector"][2] == pytest.approx(2 * series["lr_encoder"][2])
    return out, series


def _assert_same(got: dict[str, dict[int, float]], ref: dict[str, dict[int, float]], rel=0.0):
    for key in ("loss", "lr", "lr_encoder", "lr_connector"):  # lr per parameter group too
        assert sorted(got[key]) == sorted(ref[key]), key
        for step, v in ref[key].items():
            assert got[key][step] == pytest.approx(v, rel=rel, abs=0), (key, step)


def _resolved_config_file(out: Path) -> dict:
    text = (out / "torchtune_config.yaml").read_text()
    assert "${" not in text  # resolved, not the template
    cfg = OmegaConf.to_container(OmegaConf.create(text))
    assert cfg["output_dir"] == str(out)
    return cfg


def test_disk_logger_logs_the_resolved_config(reference):
    out, _ = reference
    assert _resolved_config_file(out)["metric_logger"]["log_dir"] == f"{out}/logs"


def test_tensorboard_round_trip(tiny_assets, reference, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard (dev extra) missing")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    _run(tiny_assets, tmp_path, f"metric_logger._component_={LOGGERS}TensorBoardLogger")
    runs = list((tmp_path / "logs").glob("run_0_*"))
    assert len(runs) == 1 and not list((tmp_path / "logs").glob("run_1_*"))  # rank 0 only
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    got = {
        tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
        for tag in acc.Tags()["tensors"]
    }
    _assert_same(got, reference[1], rel=1e-6)  # TensorBoard stores float32
    _resolved_config_file(tmp_path)


def _wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (``run-*.wandb``, LevelDB log format:
    a 7-byte file header, 32 KiB blocks of chunks ``crc32 u32 | length u16 | type u8 | data``
    with type 1 full, 2 first, 3 middle, 4 last), as W&B's own datastore reads it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_round_trip(tiny_assets, reference, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb (dev extra) missing")
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")  # belt and braces: no network, no login
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(
        tiny_assets,
        tmp_path,
        f"metric_logger._component_={LOGGERS}WandBLogger",
        "+metric_logger.project=medtune-test",
        "+metric_logger.mode=offline",
    )
    files = list((tmp_path / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = _wandb_records(files[0])
    got: dict[str, dict[int, float]] = {}
    configs = []
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            # W&B writes a key as `key` or as `nested_key` parts
            items = {_key(i): json.loads(i.value_json) for i in rec.history.item}
            for k, v in items.items():
                if not k.startswith("_") and k != "global_step":
                    got.setdefault(k, {})[int(items["global_step"])] = float(v)
        elif kind == "config":
            configs.append({_key(i): json.loads(i.value_json) for i in rec.config.update})
    _assert_same(got, reference[1])
    with_cfg = [c for c in configs if "output_dir" in c]
    assert len(with_cfg) == 1 and with_cfg[0]["output_dir"] == str(tmp_path)  # once, resolved
    assert with_cfg[0]["metric_logger"]["log_dir"] == f"{tmp_path}/logs"


def test_mlflow_file_store_round_trip(tiny_assets, reference, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow-skinny (dev extra) missing")
    import mlflow

    # MLflow >= 3.18 keeps the file store only on request
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _run(
        tiny_assets,
        tmp_path,
        f"metric_logger._component_={LOGGERS}MLFlowLogger",
        "~metric_logger.log_dir",
        f"+metric_logger.tracking_uri={uri}",
        "+metric_logger.experiment_name=medtune-test",
    )
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("medtune-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    got = {
        k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
        for k in run.data.metrics
    }
    _assert_same(got, reference[1])
    assert run.data.params["output_dir"] == str(tmp_path)
    assert run.data.params["metric_logger.tracking_uri"] == uri


def test_only_rank_zero_builds_a_logger(tmp_path):
    cfg = OmegaConf.create(
        {
            "output_dir": str(tmp_path),
            "metric_logger": {
                "_component_": f"{LOGGERS}DiskLogger",
                "log_dir": "${output_dir}/logs",
            },
        }
    )
    assert build_metric_logger(cfg, is_rank_zero=False) is None
    assert not (tmp_path / "logs").exists() and not (tmp_path / "torchtune_config.yaml").exists()
    logger = build_metric_logger(cfg, is_rank_zero=True)
    logger.close()
    assert len(list((tmp_path / "logs").glob("*.txt"))) == 1
    assert _resolved_config_file(tmp_path)["metric_logger"]["log_dir"] == f"{tmp_path}/logs"
    assert build_metric_logger(OmegaConf.create({"metric_logger": None}), True) is None


def test_group_lrs_names_each_group():
    import torch

    w = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.SGD(
        [{"params": [w[0]], "lr": 0.1, "name": "encoder"}, {"params": [w[1]], "lr": 0.2}], lr=1
    )
    assert group_lrs(opt) == {"lr_encoder": 0.1, "lr_group1": 0.2}
    assert group_lrs(torch.optim.SGD([w[2]], lr=0.3)) == {}
