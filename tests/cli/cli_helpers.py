"""Helpers for the CLI tests: a fake recipes root, and in-process and subprocess runners."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medtune._cli.main import main

# A recipe the way medtune's recipes are written: torchtune's config.parse entry point. It dumps
# the config it received (resolved) to cfg.out_file, and returns cfg.exit_code.
PARSE_RECIPE = textwrap.dedent(
    '''\
    """Demo recipe for the CLI tests: writes the config it receives to cfg.out_file."""
    import json
    import sys

    from omegaconf import DictConfig, OmegaConf
    from torchtune import config

    SUPPORTS_DISTRIBUTED = False


    @config.parse
    def recipe_main(cfg: DictConfig) -> int:
        with open(cfg.out_file, "w") as f:
            json.dump(OmegaConf.to_container(cfg, resolve=True), f)
        return cfg.get("exit_code", 0)


    if __name__ == "__main__":
        sys.exit(recipe_main())
    '''
)

TINY_YAML = textwrap.dedent(
    """\
    # Config for demo_recipe: medtune run demo_recipe --config tiny
    out_file: received.json
    lr: 0.1
    drop: 1
    optimizer:
      _component_: torch.optim.SGD
      lr: ${lr}
    layers: [1, 2, 3]
    exit_code: 0
    """
)

# The same contract without torchtune (whose import takes seconds), for subprocess runs: parses
# ``--config PATH key=value ...`` like torchtune's config.parse does.
LIGHT_RECIPE = textwrap.dedent(
    '''\
    """Light recipe for the CLI tests (no torchtune import): writes its config to cfg.out_file."""
    import json
    import sys

    from omegaconf import OmegaConf

    SUPPORTS_DISTRIBUTED = False


    def main(argv):
        assert argv[0] == "--config", argv
        cfg = OmegaConf.merge(OmegaConf.load(argv[1]), OmegaConf.from_dotlist(argv[2:]))
        with open(cfg.out_file, "w") as f:
            json.dump(OmegaConf.to_container(cfg, resolve=True), f)
        return cfg.get("exit_code", 0)


    if __name__ == "__main__":
        sys.exit(main(sys.argv[1:]))
    '''
)

# A distributed recipe (no torchtune import, to keep each rank quick): gloo all_reduce over ranks.
DIST_RECIPE = textwrap.dedent(
    '''\
    """Distributed probe: every rank all-reduces (rank + 1) * scale and writes rank<RANK>.txt."""
    import json
    import os
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    import cwd_helper  # lives in the directory medtune was started from

    SUPPORTS_DISTRIBUTED = True


    def main(argv):
        assert argv[0] == "--config", argv
        cfg = OmegaConf.merge(OmegaConf.load(argv[1]), OmegaConf.from_dotlist(argv[2:]))
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        t = torch.tensor([float(rank + 1) * cfg.scale])
        dist.all_reduce(t)
        out = {"rank": rank, "world_size": world, "sum": t.item(), "helper": cwd_helper.VALUE}
        Path(cfg.out_dir, f"rank{os.environ['RANK']}.txt").write_text(json.dumps(out))
        dist.destroy_process_group()
        return 0


    if __name__ == "__main__":
        sys.exit(main(sys.argv[1:]))
    '''
)


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, creating parents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def build_recipes_root(root: Path) -> Path:
    """Create a small recipes folder with the layout medtune expects."""
    write(root / "demo_recipe.py", PARSE_RECIPE)
    write(root / "configs" / "demo_recipe" / "tiny.yaml", TINY_YAML)
    write(root / "configs" / "demo_recipe" / "other.yaml", "out_file: other.json\nx: 1\n")
    write(root / "light_recipe.py", LIGHT_RECIPE)
    write(root / "configs" / "light_recipe" / "tiny.yaml", TINY_YAML.replace("lr: 0.1", "lr: 0.3"))
    write(root / "dist_recipe.py", DIST_RECIPE)
    write(root / "configs" / "dist_recipe" / "dist.yaml", "out_dir: .\nscale: 1.0\n")
    # A recipe without SUPPORTS_DISTRIBUTED and a config name shared with demo_recipe.
    write(root / "plain_recipe.py", PARSE_RECIPE.replace("SUPPORTS_DISTRIBUTED = False\n", ""))
    write(root / "configs" / "plain_recipe" / "tiny.yaml", "out_file: plain.json\n")
    write(root / "configs" / "plain_recipe" / "nested" / "deep.yaml", "out_file: deep.json\n")
    write(root / "no_configs.py", '"""A recipe without configs."""\n')
    write(root / "_private_helper.py", "X = 1\n")  # not a recipe
    write(root / "configs" / "ghost" / "x.yaml", "a: 1\n")  # configs without a recipe script
    return root


def console_script() -> list[str]:
    """The installed ``medtune`` console script, or ``python -m medtune._cli.main``."""
    script = Path(sys.executable).parent / "medtune"
    return [str(script)] if script.exists() else [sys.executable, "-m", "medtune._cli.main"]


def run_cli(*args: str, cwd: Path, env: dict | None = None, module: bool = False, timeout=120):
    """Run the real CLI in a subprocess and return the CompletedProcess (text mode)."""
    cmd = [sys.executable, "-m", "medtune._cli.main"] if module else console_script()
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run :func:`main` in-process; return (status, stdout, stderr)."""
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def assert_user_error(status: int, err: str, *fragments: str) -> None:
    """A user error: non-zero status, one ``medtune: error:`` line with ``fragments``, no trace."""
    assert status != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("medtune: error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
