"""The CLI under the one error policy: override hints, recipes' own errors, library errors."""

from __future__ import annotations

import textwrap

import pytest
from cli_helpers import assert_user_error, run_main, write

NESTED_YAML = textwrap.dedent(
    """\
    out_file: received.json
    checkpointer:
      checkpoint_dir: ckpt
      checkpoint_files: [a.safetensors, b.safetensors]
    blocks:
      - name: one
        size: 1
    """
)

# A recipe the way medtune's recipes end: run_entry around the config.parse entry point.
ENTRY_RECIPE = textwrap.dedent(
    '''\
    """Recipe under run_entry."""
    import sys

    from torchtune import config

    from medtune.utils.errors import run_entry
    from medtune.utils.config import cfg_get


    @config.parse
    def recipe_main(cfg):
        return cfg_get(cfg, "epochs", int)


    if __name__ == "__main__":
        sys.exit(run_entry("entry_recipe", recipe_main))
    '''
)


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("checkpointer.checkpoint_files.0=x", "checkpointer.checkpoint_files='[...]'"),
        ("checkpointer.checkpoint_files[1]=x", "checkpointer.checkpoint_files='[...]'"),
        ("blocks.0.size=2", "(blocks='[...]')"),
    ],
)
def test_list_element_override_names_the_lists_own_key(
    recipes_root, workdir, capsys, override, hint
):
    cfg = write(workdir / "nested.yaml", NESTED_YAML)
    status, _, err = run_main(capsys, "run", "demo_recipe", "--config", str(cfg), override)
    assert_user_error(status, err, "inside a list", hint)
    assert "checkpointer='[...]'" not in err
    assert not (workdir / "received.json").exists()


def test_recipe_under_run_entry_reports_its_own_errors(recipes_root, workdir, capsys):
    recipe = write(workdir / "entry_recipe.py", ENTRY_RECIPE)
    write(workdir / "c.yaml", "epochs: 1\n")
    with pytest.raises(SystemExit) as e:
        main_args = ["run", str(recipe), "--config", str(workdir / "c.yaml"), "epochs=abc"]
        run_main(capsys, *main_args)
    assert e.value.code == 1
    assert (
        capsys.readouterr().err.strip()
        == "entry_recipe: error: epochs: expected an integer, got 'abc'"
    )
    # a config that does not parse is refused by `medtune run` before the recipe starts
    write(workdir / "bad.yaml", "epochs: [1\n")
    status, _, err = run_main(capsys, "run", str(recipe), "--config", str(workdir / "bad.yaml"))
    assert status == 1
    err = err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"medtune: error: cannot parse config {workdir / 'bad.yaml'}: line 2"
    )


def test_medtune_handlers_run_under_the_policy(workdir, capsys, monkeypatch):
    # A library error standing for a user error, raised by a handler: one medtune line.
    from medtune._cli import cat

    def boom(args):
        raise FileNotFoundError(2, "No such file or directory", "cfg.yaml")

    monkeypatch.setattr(cat, "_cat", boom)  # main() registers the handler on each call
    status, _, err = run_main(capsys, "cat", "anything")
    assert_user_error(status, err, "cfg.yaml: No such file or directory")
