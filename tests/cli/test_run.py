"""``medtune run``: lookup, override checks, in-process runs, and a 2-rank torchrun launch on CPU."""

from __future__ import annotations

import json
import sys

import pytest
from cli_helpers import DIST_RECIPE, assert_user_error, run_cli, run_main

from medtune._cli.main import main


def _received(workdir, name="received.json"):
    return json.loads((workdir / name).read_text())


# ----------------------------------------------------------------------------- in-process


def test_run_in_process_applies_overrides(recipes_root, workdir, capsys):
    argv_before, path_before = sys.argv[:], sys.path[:]
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "demo_recipe", "--config", "tiny", "lr=0.5", "+extra.k=3", "~drop"])
    assert exit_info.value.code in (0, None)
    cfg = _received(workdir)
    assert cfg["lr"] == 0.5 and cfg["optimizer"]["lr"] == 0.5  # interpolation follows
    assert cfg["extra"] == {"k": 3}  # added with '+', which medtune stripped for torchtune
    assert "drop" not in cfg
    assert cfg["layers"] == [1, 2, 3]
    assert (sys.argv, sys.path) == (argv_before, path_before)  # restored after the run


def test_run_propagates_the_recipe_exit_status(recipes_root, workdir):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "demo_recipe", "--config", "tiny", "exit_code=3"])
    assert exit_info.value.code == 3


def test_run_config_lookup_order(recipes_root, workdir):
    # bare name ambiguous globally (demo_recipe/tiny, plain_recipe/tiny): the recipe's own wins
    with pytest.raises(SystemExit):
        main(["run", "plain_recipe", "--config", "tiny"])
    assert _received(workdir, "plain.json")["out_file"] == "plain.json"
    # <recipe>/<config> of another recipe and --config=VALUE
    with pytest.raises(SystemExit):
        main(["run", "plain_recipe", "--config=demo_recipe/other"])
    assert _received(workdir, "other.json")["x"] == 1
    # an existing .yaml path wins over a registered name with the same stem
    (workdir / "tiny.yaml").write_text("out_file: mine.json\nlr: 9\n")
    with pytest.raises(SystemExit):
        main(["run", "demo_recipe", "--config", "tiny.yaml", "lr=8"])
    assert _received(workdir, "mine.json")["lr"] == 8


def test_run_copied_recipe_and_config_through_console_script(recipes_root, workdir):
    assert run_cli("cp", "light_recipe", "mine/", "--make-parents", cwd=workdir).returncode == 0
    assert run_cli("cp", "light_recipe/tiny", "my.yaml", cwd=workdir).returncode == 0
    text = (workdir / "my.yaml").read_text().replace("lr: 0.3", "lr: 0.25")
    (workdir / "my.yaml").write_text(text)
    proc = run_cli("run", "mine/light_recipe.py", "--config", "my.yaml", "exit_code=4", cwd=workdir)
    assert proc.returncode == 4, proc.stderr
    cfg = _received(workdir)
    assert cfg["lr"] == 0.25 and cfg["exit_code"] == 4
    # 'tiny' is ambiguous among all recipes, but a copy keeps its own recipe's configs by short
    # name (same file stem as the registered recipe).
    (workdir / "received.json").unlink()
    proc = run_cli("run", "mine/light_recipe.py", "--config", "tiny", cwd=workdir, module=True)
    assert proc.returncode == 0, proc.stderr
    assert _received(workdir)["lr"] == 0.3


# ----------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["demo_recipee", "--config", "tiny"], ["unknown recipe 'demo_recipee'", "'demo_recipe'"]),
        (["nofile.py", "--config", "tiny"], ["recipe file not found: nofile.py"]),
        (
            ["demo_recipe/other"],
            ["'demo_recipe/other' is a config", "medtune run demo_recipe --config other"],
        ),
        (["demo_recipe"], ["missing --config", "its configs: other, tiny"]),
        (["demo_recipe", "--config"], ["--config needs a value"]),
        (["demo_recipe", "--config", "a", "--config", "b"], ["--config given more than once"]),
        (
            ["demo_recipe", "--config", "tinyy"],
            ["unknown config 'tinyy' for recipe 'demo_recipe'", "did you mean 'tiny'"],
        ),
        (["demo_recipe", "--config", "nope.yaml"], ["config file not found: nope.yaml"]),
        (["demo_recipe", "--config", "tiny", "lr"], ["malformed override 'lr'", "key=value"]),
        (["demo_recipe", "--config", "tiny", "=3"], ["malformed override '=3'"]),
        (["demo_recipe", "--config", "tiny", "a..b=3"], ["malformed override 'a..b=3'"]),
        (["demo_recipe", "--config", "tiny", "~drop=1"], ["malformed override '~drop=1'"]),
        (
            ["demo_recipe", "--config", "tiny", "lrr=1"],
            ["has no key 'lrr'", "did you mean 'lr'", "'+lrr=1'"],
        ),
        (
            ["demo_recipe", "--config", "tiny", "optimizer.momentum=0.9"],
            ["has no key 'optimizer.momentum'", "'+optimizer.momentum=0.9'"],
        ),
        (["demo_recipe", "--config", "tiny", "lr=a=b"], ["cannot contain '='"]),
        (["demo_recipe", "--config", "tiny", "layers.0=5"], ["inside a list", "layers='[...]'"]),
        (["demo_recipe", "--config", "tiny", "layers[1]=5"], ["inside a list"]),
        (["demo_recipe", "--config", "tiny", "~nothere"], ["cannot remove 'nothere'"]),
        (["demo_recipe", "--config", "tiny", "~optimizer"], ["cannot remove a component"]),
        (
            ["demo_recipe", "--config", "tiny", "--nproc_per_node", "2"],
            ["unexpected option '--nproc_per_node'", "torchrun flags go before the recipe"],
        ),
        ([], ["missing recipe"]),
    ],
)
def test_run_user_errors(recipes_root, workdir, capsys, args, fragments):
    status, _, err = run_main(capsys, "run", *args)
    assert_user_error(status, err, *fragments)
    assert not (workdir / "received.json").exists()  # nothing ran


@pytest.mark.parametrize("recipe", ["demo_recipe", "plain_recipe"])
def test_torchrun_flags_refused_for_non_distributed_recipe(recipes_root, workdir, capsys, recipe):
    # demo_recipe says SUPPORTS_DISTRIBUTED = False; plain_recipe (registered) does not say.
    status, _, err = run_main(
        capsys, "run", "--nproc_per_node", "2", recipe, "--config", f"{recipe}/tiny"
    )
    assert_user_error(status, err, f"recipe '{recipe}' does not support distributed runs")
    assert "distributed recipes: dist_recipe" in err


def test_torchrun_flag_errors(recipes_root, workdir, capsys):
    status, _, err = run_main(capsys, "run", "--nproc_per_node", "2")
    assert_user_error(status, err, "missing recipe after the torchrun flags")
    status, _, err = run_main(capsys, "run", "--bogus_flag=1", "dist_recipe", "--config", "dist")
    assert_user_error(status, err, "unrecognized arguments: --bogus_flag=1")
    status, _, err = run_main(capsys, "run", "-m", "dist_recipe", "--config", "dist")
    assert_user_error(status, err, "--module and --no-python are not supported")


def test_user_errors_through_console_script(recipes_root, workdir):
    proc = run_cli("run", "demo_recipe", "--config", "tiny", "lrr=2", cwd=workdir)
    assert proc.returncode == 1
    assert proc.stderr.startswith("medtune: error: override 'lrr=2'")
    assert "Traceback" not in proc.stderr
    proc = run_cli("run", "vision_finetun", "--config", "x", cwd=workdir, module=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "medtune: error: unknown recipe 'vision_finetun'" in proc.stderr


def test_recipe_help_prints_its_docstring(recipes_root, workdir, capsys):
    status, out, _ = run_main(capsys, "run", "demo_recipe", "--help")
    assert status == 0
    assert "Demo recipe for the CLI tests" in out


def test_errors_inside_the_recipe_are_not_swallowed(recipes_root, workdir):
    # out_file points into a missing folder: the recipe's own error, with its traceback.
    proc = run_cli(
        "run", "light_recipe", "--config", "tiny", "out_file=no/such/dir/x.json", cwd=workdir
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


# ----------------------------------------------------------------------------- torchrun


def test_run_two_ranks_on_cpu_with_gloo(recipes_root, workdir, medtune_cli, capsys, monkeypatch):
    """One real torchrun launch (each rank a fresh ``python -m medtune._cli.launch``) of a user's
    recipe file; then a registered recipe with the other flag spellings: its torchrun flags parsed
    in this process up to the launch, and its 2 ranks run forked from the fork server."""
    # A user's recipe file (copied, without SUPPORTS_DISTRIBUTED) and a user's YAML path.
    recipe = workdir / "my_dist.py"
    recipe.write_text(DIST_RECIPE.replace("SUPPORTS_DISTRIBUTED = True\n", ""))
    (workdir / "cwd_helper.py").write_text("VALUE = 7\n")  # imported by every rank from the cwd
    out_dir = workdir / "ranks"
    out_dir.mkdir()
    (workdir / "cfg.yaml").write_text(f"out_dir: {out_dir}\nscale: 1.0\n")
    # the CLI process is forked (no import cost); torchrun and its 2 workers are real processes
    proc = medtune_cli.run(
        "run", "--nproc_per_node", "2", "my_dist.py", "--config", "cfg.yaml", "scale=2.5",
        cwd=workdir, env={"MEDTUNE_RECIPES_DIR": str(recipes_root)}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "medtune: launching my_dist.py with torchrun" in proc.stderr
    assert "note: my_dist.py does not set SUPPORTS_DISTRIBUTED" in proc.stderr
    ranks = sorted(p.name for p in out_dir.iterdir())
    assert ranks == ["rank0.txt", "rank1.txt"]
    for rank in (0, 1):
        got = json.loads((out_dir / f"rank{rank}.txt").read_text())
        assert got == {"rank": rank, "world_size": 2, "sum": 2.5 * (1 + 2), "helper": 7}

    # registered distributed recipe, `--nnodes=1 --nproc-per-node=2`: what reaches torchrun
    import medtune._cli.run as cli_run

    launched = []
    monkeypatch.setattr(cli_run, "_run_distributed", lambda *a: launched.append(a) or 0)
    status, _, err = run_main(
        capsys, "run", "--nnodes=1", "--nproc-per-node=2", "dist_recipe", "--config", "dist"
    )
    assert status == 0, err
    assert "note:" not in err  # the registered recipe declares SUPPORTS_DISTRIBUTED
    [(ns, script, argv)] = launched
    assert (ns.nnodes, int(ns.nproc_per_node), ns.standalone) == ("1", 2, True)
    assert script == recipes_root / "dist_recipe.py"
    assert argv == ["--config", str(recipes_root / "configs" / "dist_recipe" / "dist.yaml")]
    # and its 2 ranks (as torchrun's standalone launch sets them up) agree
    (workdir / "cwd_helper.py").write_text("VALUE = 1\n")
    proc = medtune_cli.run(
        "run", "dist_recipe", "--config", "dist", cwd=workdir, nproc=2,
        env={"MEDTUNE_RECIPES_DIR": str(recipes_root), "PYTHONPATH": str(workdir)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note:" not in proc.stderr
    for rank in (0, 1):
        got = json.loads((workdir / f"rank{rank}.txt").read_text())
        assert (got["rank"], got["world_size"], got["sum"]) == (rank, 2, 3.0)
