"""medtune.utils.config: typed config reads (cfg_get and its checks) and the unknown-key check."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from medtune.utils.config import cfg_get, check_keys, in_range, one_of, positive, unknown_keys
from medtune.utils.errors import ConfigError


def test_cfg_get_converts_and_names_the_key():
    cfg = OmegaConf.create(
        {"batch_size": "abc", "lr": "1e-4", "n": 3, "flag": True, "opt": {"lr": -0.1}}
    )
    assert cfg_get(cfg, "lr", float) == pytest.approx(1e-4)
    assert cfg_get(cfg, "n", int) == 3
    assert cfg_get(cfg, "missing", int, 7) == 7
    with pytest.raises(ConfigError, match=r"^batch_size: expected an integer, got 'abc'$"):
        cfg_get(cfg, "batch_size", int)
    with pytest.raises(ConfigError, match=r"^flag: expected an integer, got True$"):
        cfg_get(cfg, "flag", int)
    with pytest.raises(ConfigError, match=r"^epochs: missing \(expected an integer\)$"):
        cfg_get(cfg, "epochs", int)
    with pytest.raises(ConfigError, match=r"^opt\.lr: must be > 0, got -0\.1$"):
        cfg_get(cfg, "opt.lr", float, check=positive())
    with pytest.raises(ConfigError, match=r"^opt\.lr: must satisfy v >= 0, got -0\.1$"):
        cfg_get(cfg, "opt.lr", float, check=lambda v: v >= 0)
    with pytest.raises(ConfigError, match=r"^n: must be in \[0, 1\], got 3$"):
        cfg_get(cfg, "n", int, check=in_range(0, 1))
    with pytest.raises(ConfigError, match=r"^n: must be one of 1, 2, got 3$"):
        cfg_get(cfg, "n", int, check=one_of(1, 2))


def test_unknown_keys_name_the_key_with_a_close_match():
    cfg = OmegaConf.create({"epochz": 1, "batch_size": 2})
    assert unknown_keys(cfg, {"epochs", "batch_size"}) == [("epochz", " (did you mean 'epochs'?)")]
    with pytest.raises(ConfigError, match=r"^config key\(s\) not known to demo: epochz \(did you"):
        check_keys(cfg, {"epochs", "batch_size"}, "demo")
    check_keys(cfg, {"epochz", "batch_size"}, "demo")  # all known: no error
