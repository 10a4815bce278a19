"""``medtune validate``: components import, arguments bind, every problem with its key path."""

from __future__ import annotations

import textwrap

import pytest
from cli_helpers import assert_user_error, run_cli, run_main

from medtune._cli.validate import check_component, locate

USER_MODULE = textwrap.dedent(
    """\
    def build(a, b=1, *, c=2):
        return a


    class Thing:
        def __init__(self, x, y=0):
            self.x = x


    def anything(**kwargs):
        return kwargs
    """
)

GOOD = textwrap.dedent(
    """\
    output_dir: /tmp/out
    model:
      _component_: cli_validate_mod.Thing
      x:
        _component_: cli_validate_mod.build   # nested component counts as a given argument
        b: 2
    parts:
      - _component_: cli_validate_mod.anything
        whatever: 1
      - _component_: collections.OrderedDict
    loss:
      _component_: cli_validate_mod.build     # 'a' missing: the recipe may pass it
      c: ${output_dir}
    """
)

BAD = textwrap.dedent(
    """\
    model:
      _component_: cli_validate_mod.Thing
      x: 1
      encoder:
        _component_: foo.bar.Baz
    optimizer:
      _component_: cli_validate_mod.build
      bb: 0.1
    loss:
      _component_: cli_validate_mod.nothere
    parts:
      - _component_: cli_validate_mod.anything
        ok: 1
      - _component_: cli_validate_mod.Thing
        zz: 1
    """
)


@pytest.fixture
def user_dir(workdir):
    """A work dir holding the user's own component module (importable only from the cwd)."""
    (workdir / "cli_validate_mod.py").write_text(USER_MODULE)
    (workdir / "good.yaml").write_text(GOOD)
    (workdir / "bad.yaml").write_text(BAD)
    return workdir


def test_valid_config_with_user_components_in_cwd(user_dir):
    proc = run_cli("validate", "good.yaml", cwd=user_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Config is well-formed!")


def test_every_problem_is_reported_with_its_key_path(user_dir):
    proc = run_cli("validate", "bad.yaml", cwd=user_dir)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "medtune: error: bad.yaml has 5 problems:"
    assert [line.strip() for line in lines[1:]] == [
        "model: unexpected argument 'encoder'",
        "model.encoder: no module named 'foo'",
        "optimizer: unexpected argument 'bb' (did you mean 'b'?)",
        "loss: 'cli_validate_mod' has no attribute 'nothere'",
        "parts[1]: unexpected argument 'zz'",
    ]


def test_registered_config_by_name(recipes_root, capsys):
    status, out, _ = run_main(capsys, "validate", "demo_recipe/tiny")  # torch.optim.SGD, lr
    assert status == 0
    assert "Config is well-formed!" in out


def test_validate_lookup_errors(recipes_root, workdir, capsys):
    status, _, err = run_main(capsys, "validate", "missing.yaml")
    assert_user_error(status, err, "config file not found: missing.yaml")
    status, _, err = run_main(capsys, "validate", "demo_recipe/tinny")
    assert_user_error(status, err, "unknown config 'demo_recipe/tinny'", "'demo_recipe/tiny'")
    (workdir / "broken.yaml").write_text("a: [1, 2\n")
    status, _, err = run_main(capsys, "validate", "broken.yaml")
    assert_user_error(status, err, "cannot parse config broken.yaml")


def test_locate_and_bind_units():
    import collections

    assert locate("collections.OrderedDict") is collections.OrderedDict
    assert locate("os.path.join").__name__ == "join"
    with pytest.raises(LookupError, match="no module named 'nope_pkg_xyz'"):
        locate("nope_pkg_xyz.mod.Thing")
    with pytest.raises(LookupError, match="invalid dotted path"):
        locate(".relative")

    def f(a, /, b, *args, c=1, **kw):
        return a

    def g(a, /, b, *args, c=1):
        return a

    assert check_component(f, {"b": 1, "zzz": 2}) == []  # **kw takes anything
    assert check_component(g, {"b": 1, "c": 2}) == []
    assert check_component(g, {"a": 1}) == ["unexpected argument 'a'"]  # positional-only
    assert check_component(g, {"args": 1}) == ["unexpected argument 'args'"]
    assert check_component(3, {}) == ["'3' is not callable"]


def test_recipe_key_check_and_builder_choices(workdir, capsys, monkeypatch):
    """A config that ``run`` would refuse for a config reason does not validate: an unknown
    top-level key of the recipe, and a connector kind the builders do not have (in this process:
    the key check is what is tested, not the CLI's start-up)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    text = (repo / "recipes" / "configs" / "vision_finetune" / "demo.yaml").read_text()
    bad = text.replace("\nepochs: 6", "\nepochz: 6").replace("connector: mlp", "connector: mlpx")
    assert bad != text
    (workdir / "bad_vision.yaml").write_text(bad)
    monkeypatch.setenv("MEDTUNE_RECIPES_DIR", str(repo / "recipes"))
    status, _, err = run_main(capsys, "validate", "bad_vision.yaml", "--recipe", "vision_finetune")
    assert status == 1 and "Traceback" not in err, err
    assert "epochz: not a key of vision_finetune (did you mean 'epochs'?)" in err
    assert "model: argument 'connector': 'mlpx' is not one of 'linear', 'mlp'" in err
    (workdir / "good_vision.yaml").write_text(text)
    status, _, err = run_main(capsys, "validate", "good_vision.yaml", "--recipe", "vision_finetune")
    assert status == 0, err


def test_every_shipped_config_validates(capsys, monkeypatch):
    """Every config in recipes/configs passes validate with its own recipe's key check (in this
    process: one torch import for all of them)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("MEDTUNE_RECIPES_DIR", str(repo / "recipes"))
    monkeypatch.chdir(repo)
    configs = sorted((repo / "recipes" / "configs").glob("*/*.yaml"))
    assert len(configs) > 20
    for path in configs:
        status, _, err = run_main(capsys, "validate", str(path))
        assert status == 0, f"{path}: {err}"
