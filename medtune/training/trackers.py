"""The metric logger of a training run: torchtune's trackers as ``metric_logger`` components.

Any torchtune metric logger is a ``metric_logger`` ``_component_`` of a training config:

- ``torchtune.training.metric_logging.DiskLogger`` (the default; ``log_dir: ${output_dir}/logs``;
  :func:`medtune.viz.curves.plot_run` draws its curves);
- ``TensorBoardLogger`` (``log_dir``; ``tensorboard --logdir output_dir/logs``);
- ``WandBLogger`` (``project``, ``log_dir``, and ``mode: offline`` for no network; ``wandb sync``
  uploads later);
- ``MLFlowLogger`` (``tracking_uri: file://...`` for a local store, ``experiment_name``;
  MLflow >= 3.18 refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE=true`` is set, or use
  ``sqlite:///mlflow.db`` with the full ``mlflow`` package).

:func:`build_metric_logger` builds it on rank 0 only (the other ranks get ``None``: one process
logs, whatever the tracker) and logs the resolved config once, as torchtune's recipes do
(``self._metric_logger.log_config(cfg)`` in their ``setup``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["build_metric_logger", "group_lrs", "log_resolved_config"]


def log_resolved_config(logger: Any, cfg: DictConfig) -> None:
    """Log ``cfg`` with every interpolation resolved (``${output_dir}/logs`` as the real path).

    Args:
        logger: a torchtune metric logger (``log_config``: DiskLogger and TensorBoardLogger write
            ``output_dir/torchtune_config.yaml``, W&B and MLflow also record it as the run's
            config / params).
        cfg: the run's config.
    """
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    logger.log_config(resolved)


def build_metric_logger(cfg: DictConfig, is_rank_zero: bool) -> Any | None:
    """Instantiate ``cfg.metric_logger`` on rank 0 and log the resolved config once.

    Args:
        cfg: the run's config (``metric_logger`` may be absent or null: no logger).
        is_rank_zero: whether this process is rank 0.

    Returns:
        The logger on rank 0, else ``None``.
    """
    from torchtune import config

    if not is_rank_zero or not cfg.get("metric_logger"):
        return None
    logger = config.instantiate(cfg.metric_logger)
    log_resolved_config(logger, cfg)
    return logger


def group_lrs(optimizer: Any) -> dict[str, float]:
    """The learning rate of each named parameter group, as ``{"lr_<name>": lr}``.

    medtune's groups carry a ``name`` (``encoder``, ``connector``, ``llm``:
    :func:`medtune.training.optim.param_groups`); unnamed groups are ``lr_group<i>``. With one
    group nothing is returned (the ``lr`` metric already is it). Not ``lr/<name>``: MLflow's
    file store keeps ``lr`` as a file and cannot add ``lr/encoder`` under it.
    :mod:`medtune.viz.curves` draws every ``lr_...`` key on the learning-rate figure.
    """
    groups = optimizer.param_groups
    if len(groups) < 2:
        return {}
    return {f"lr_{g.get('name') or f'group{i}'}": float(g["lr"]) for i, g in enumerate(groups)}
