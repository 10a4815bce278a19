"""``medtune ls``, ``cp``, ``cat``, the help texts, and the fast (no torch) import path."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from cli_helpers import TINY_YAML, assert_user_error, console_script, run_cli, run_main

from medtune._cli import registry


def _table(out: str) -> list[tuple[str, str]]:
    """Parse ls output into (recipe, config) rows; a blank recipe cell continues the one above."""
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split()
        rows.append(("", parts[0]) if line.startswith(" ") else (parts[0], parts[1]))
    return rows


def test_ls_lists_recipes_and_configs(recipes_root, capsys):
    status, out, _ = run_main(capsys, "ls")
    assert status == 0
    assert out.splitlines()[0].split() == ["RECIPE", "CONFIG"]
    assert _table(out) == [
        ("demo_recipe", "demo_recipe/other"),
        ("", "demo_recipe/tiny"),
        ("dist_recipe", "dist_recipe/dist"),
        ("light_recipe", "light_recipe/tiny"),
        ("no_configs", "-"),
        ("plain_recipe", "plain_recipe/nested/deep"),
        ("", "plain_recipe/tiny"),
    ]
    assert "ghost" not in out and "_private_helper" not in out


def test_ls_empty_recipes_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDTUNE_RECIPES_DIR", str(tmp_path))
    status, out, err = run_main(capsys, "ls")
    assert status == 0
    assert out.split() == ["RECIPE", "CONFIG"]
    assert "no recipes found" in err


def test_recipes_dir_env_must_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDTUNE_RECIPES_DIR", str(tmp_path / "missing"))
    status, _, err = run_main(capsys, "ls")
    assert_user_error(status, err, "MEDTUNE_RECIPES_DIR", "is not a directory")


def test_supports_distributed_is_read_without_importing(recipes_root, tmp_path):
    assert registry.get_recipe("dist_recipe").supports_distributed is True
    assert registry.get_recipe("demo_recipe").supports_distributed is False
    assert registry.get_recipe("plain_recipe").supports_distributed is None
    odd = tmp_path / "odd.py"
    odd.write_text(
        "import sys\nSUPPORTS_DISTRIBUTED: bool = True\nsys.exit(1)\n"
        "def f():\n    SUPPORTS_DISTRIBUTED = False\n"
    )
    assert registry.read_supports_distributed(odd) is True  # module level only, never executed
    odd.write_text("SUPPORTS_DISTRIBUTED = True\nSUPPORTS_DISTRIBUTED = False\n")
    assert registry.read_supports_distributed(odd) is False
    odd.write_text("SUPPORTS_DISTRIBUTED = True\nthis is not python(\n")
    assert registry.read_supports_distributed(odd) is None


def test_ls_cat_cp_do_not_import_heavy_modules(recipes_root, workdir):
    code = (
        "import sys\n"
        "from medtune._cli.main import main\n"
        "assert main(['ls']) == 0\n"
        "assert main(['cat', 'demo_recipe/tiny']) == 0\n"
        "assert main(['cp', 'demo_recipe', 'copy.py']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'torchtune', 'omegaconf', 'yaml') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout


def test_ls_console_script_is_fast(recipes_root, workdir):
    cmd = [*console_script(), "ls"]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=60)
        best = min(best, time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr
        assert "demo_recipe/tiny" in proc.stdout
    assert best < 1.0, f"medtune ls took {best:.2f}s"


@pytest.mark.parametrize("command", [[], ["ls"], ["cp"], ["cat"], ["validate"], ["run"]])
def test_help_shows_an_example(command, workdir):
    proc = run_cli(*command, "--help", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "usage: medtune" in proc.stdout
    assert "example" in proc.stdout and "$ medtune" in proc.stdout


def test_no_command_prints_help_and_unknown_command_errors(workdir):
    proc = run_cli(cwd=workdir)
    assert proc.returncode == 0 and "<command>" in proc.stdout
    proc = run_cli("frobnicate", cwd=workdir)
    assert proc.returncode == 2
    assert "medtune: error: argument <command>: invalid choice: 'frobnicate'" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- cat


def test_cat_prints_the_file_verbatim(recipes_root, capsys):
    status, out, _ = run_main(capsys, "cat", "demo_recipe/tiny")
    assert status == 0
    assert out == TINY_YAML  # comments and interpolations kept


def test_cat_nested_config_name(recipes_root, capsys):
    status, out, _ = run_main(capsys, "cat", "plain_recipe/nested/deep")
    assert status == 0 and out == "out_file: deep.json\n"


def test_cat_unknown_config_suggests(recipes_root, capsys):
    status, _, err = run_main(capsys, "cat", "demo_recipe/tinyy")
    assert_user_error(status, err, "unknown config 'demo_recipe/tinyy'", "'demo_recipe/tiny'")


def test_cat_ambiguous_bare_name(recipes_root, capsys):
    status, _, err = run_main(capsys, "cat", "tiny")
    assert_user_error(status, err, "ambiguous", "demo_recipe/tiny", "plain_recipe/tiny")
    status, out, _ = run_main(capsys, "cat", "other")  # unique bare name is fine
    assert status == 0 and "other.json" in out


def test_cat_error_through_console_script(recipes_root, workdir):
    proc = run_cli("cat", "demo_recip/tiny", cwd=workdir)
    assert proc.returncode == 1
    assert proc.stderr.startswith("medtune: error: unknown config 'demo_recip/tiny'")
    assert "did you mean 'demo_recipe/tiny'" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- cp


def test_cp_recipe_into_existing_dir_keeps_name(recipes_root, workdir, capsys):
    (workdir / "mine").mkdir()
    status, out, _ = run_main(capsys, "cp", "demo_recipe", "mine")
    assert status == 0
    copied = workdir / "mine" / "demo_recipe.py"
    assert copied.read_text() == (recipes_root / "demo_recipe.py").read_text()
    assert f"to {copied.relative_to(workdir)}" in out
    assert "medtune run mine/demo_recipe.py --config demo_recipe/other" in out


def test_cp_adds_suffix_when_missing(recipes_root, workdir, capsys):
    assert run_main(capsys, "cp", "demo_recipe", "my_recipe")[0] == 0
    assert (workdir / "my_recipe.py").is_file()
    assert run_main(capsys, "cp", "demo_recipe/tiny", "my_cfg")[0] == 0
    assert (workdir / "my_cfg.yaml").read_text() == TINY_YAML
    assert run_main(capsys, "cp", "demo_recipe/tiny", "keep.yml")[0] == 0
    assert (workdir / "keep.yml").is_file() and not (workdir / "keep.yml.yaml").exists()
    assert run_main(capsys, "cp", "demo_recipe/tiny", "v.2")[0] == 0
    assert (workdir / "v.2.yaml").is_file()  # a foreign suffix is kept, the right one appended


def test_cp_missing_parent_needs_make_parents(recipes_root, workdir, capsys):
    status, _, err = run_main(capsys, "cp", "demo_recipe/tiny", "a/b/c.yaml")
    assert_user_error(status, err, "does not exist", "--make-parents")
    assert not (workdir / "a").exists()
    status, _, err = run_main(capsys, "cp", "demo_recipe", "newdir/")
    assert_user_error(status, err, "destination folder 'newdir/' does not exist", "--make-parents")
    assert run_main(capsys, "cp", "demo_recipe/tiny", "a/b/c.yaml", "--make-parents")[0] == 0
    assert (workdir / "a" / "b" / "c.yaml").read_text() == TINY_YAML
    assert run_main(capsys, "cp", "demo_recipe", "newdir/", "--make-parents")[0] == 0
    assert (workdir / "newdir" / "demo_recipe.py").is_file()


def test_cp_no_clobber_skips_and_exits_zero(recipes_root, workdir, capsys):
    dest = workdir / "cfg.yaml"
    dest.write_text("mine: 1\n")
    status, out, _ = run_main(capsys, "cp", "demo_recipe/tiny", "cfg.yaml", "-n")
    assert status == 0
    assert "Not copied" in out and "already exists" in out
    assert dest.read_text() == "mine: 1\n"
    status, _, _ = run_main(capsys, "cp", "demo_recipe/tiny", "cfg.yaml", "--no-clobber")
    assert status == 0 and dest.read_text() == "mine: 1\n"
    # Without -n an existing file is overwritten, like cp.
    assert run_main(capsys, "cp", "demo_recipe/tiny", "cfg.yaml")[0] == 0
    assert dest.read_text() == TINY_YAML


def test_cp_unknown_source_suggests(recipes_root, workdir, capsys):
    status, _, err = run_main(capsys, "cp", "demo_recpe", "x.py")
    assert_user_error(status, err, "nothing to copy called 'demo_recpe'", "'demo_recipe'")
    assert not (workdir / "x.py").exists()


def test_cp_errors_through_console_script(recipes_root, workdir):
    proc = run_cli("cp", "demo_recipe/tiny", "no/such/dir/x.yaml", cwd=workdir)
    assert proc.returncode == 1
    assert proc.stderr.startswith("medtune: error: cannot copy to 'no/such/dir/x.yaml'")
    assert "Traceback" not in proc.stderr
    proc = run_cli("cp", "demo_recipe/tiny", cwd=workdir)  # missing destination: usage error
    assert proc.returncode == 2
    assert "medtune: error: the following arguments are required: <dest>" in proc.stderr
