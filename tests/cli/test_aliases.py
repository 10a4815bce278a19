"""Old recipe names are aliases: ``full_finetune_{single_device,distributed}`` and
``lora_finetune_{single_device,distributed}`` run ``full_finetune`` / ``lora_finetune`` with the
config the old name meant, say so, and every documented ``<old recipe>/<old config>`` still names a
config (``medtune ls``, ``run``, ``cp``, ``validate``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtune._cli import registry
from medtune._cli.main import main
from medtune._cli.run import resolve_config, resolve_recipe

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "configs"

# every (old recipe, old config) the old configs folders held -> the file it runs now
OLD_COMMANDS = {
    ("full_finetune_single_device", "demo"): "full_finetune/demo",
    ("full_finetune_single_device", "demo_text"): "full_finetune/demo_text",
    ("full_finetune_single_device", "slake"): "full_finetune/slake_single_device",
    ("full_finetune_single_device", "vqa_rad"): "full_finetune/vqa_rad_single_device",
    ("full_finetune_distributed", "demo"): "full_finetune/demo",
    ("full_finetune_distributed", "slake"): "full_finetune/slake",
    ("full_finetune_distributed", "vqa_rad"): "full_finetune/vqa_rad",
    ("lora_finetune_single_device", "demo"): "lora_finetune/demo",
    ("lora_finetune_single_device", "demo_qlora"): "lora_finetune/demo_qlora",
    ("lora_finetune_single_device", "demo_text"): "lora_finetune/demo_text",
    ("lora_finetune_single_device", "slake"): "lora_finetune/slake_single_device",
    ("lora_finetune_single_device", "vqa_rad"): "lora_finetune/vqa_rad_single_device",
    ("lora_finetune_distributed", "demo"): "lora_finetune/demo",
    ("lora_finetune_distributed", "slake"): "lora_finetune/slake",
    ("lora_finetune_distributed", "vqa_rad"): "lora_finetune/vqa_rad",
}


def test_ls_shows_three_training_recipes_and_the_aliases(capsys):
    assert main(["ls"]) == 0
    recipes, _, aliases = capsys.readouterr().out.partition("\n\n")
    names = {line.split()[0] for line in recipes.splitlines()[1:] if not line.startswith(" ")}
    # the three LLM fine-tuning recipes (mavl_finetune tunes MAVL's classifier / ResUNet: another model)
    finetune = {n for n in names if n.endswith("finetune") and not n.startswith("mavl")}
    assert finetune == {"vision_finetune", "full_finetune", "lora_finetune"}
    assert not any(n.endswith(("_single_device", "_distributed")) for n in names)
    rows = [line.split() for line in aliases.splitlines()]
    assert rows[0] == ["ALIAS", "RUNS"]
    assert dict(rows[1:]) == {
        "full_finetune_single_device": "full_finetune",
        "full_finetune_distributed": "full_finetune",
        "lora_finetune_single_device": "lora_finetune",
        "lora_finetune_distributed": "lora_finetune",
    }


@pytest.mark.parametrize(("old", "config"), sorted(OLD_COMMANDS))
def test_old_command_resolves_to_the_new_recipe_and_config(old, config):
    script, recipe = resolve_recipe(old)
    want_recipe, want_config = OLD_COMMANDS[(old, config)].split("/")
    assert script == REPO / "recipes" / f"{want_recipe}.py" and recipe.name == want_recipe
    path = resolve_config(config, script, recipe, registry.get_alias(old))
    assert path == CONFIGS / want_recipe / f"{want_config}.yaml"
    # <old recipe>/<old config> names the same file everywhere (cp, cat, validate)
    assert registry.find_config(f"{old}/{config}").path == path


def test_a_copied_script_with_an_old_name_finds_the_old_configs(tmp_path):
    copy = tmp_path / "lora_finetune_single_device.py"
    copy.write_text("# a user's copy\n")
    assert resolve_config("slake", copy, None) == CONFIGS / "lora_finetune/slake_single_device.yaml"


def test_cp_of_an_alias_copies_the_recipe_it_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["cp", "full_finetune_single_device", "mine.py"]) == 0
    assert "full_finetune_single_device is an alias of recipe full_finetune" in (
        capsys.readouterr().out
    )
    assert (tmp_path / "mine.py").read_text() == (REPO / "recipes/full_finetune.py").read_text()
    assert main(["cp", "lora_finetune_single_device/slake", "old.yaml"]) == 0
    assert (tmp_path / "old.yaml").read_text() == (
        CONFIGS / "lora_finetune/slake_single_device.yaml"
    ).read_text()


def test_an_unknown_name_still_suggests_aliases():
    err = registry.unknown_recipe_error("lora_finetune_single_devic")
    assert "lora_finetune_single_device" in str(err)


def test_known_keys_union_with_a_shared_set_is_read_without_import():
    from medtune.training.run import FINETUNE_KEYS

    read = registry.read_known_keys
    assert read(REPO / "recipes/full_finetune.py") == FINETUNE_KEYS
    assert read(REPO / "recipes/lora_finetune.py") == FINETUNE_KEYS | {"save_merged"}
    assert read(REPO / "recipes/vision_finetune.py") == FINETUNE_KEYS | {"init_from", "shard_llm"}


def test_run_through_an_alias_says_which_recipe_and_config_it_runs(tmp_path, capsys):
    """The alias line comes before the recipe starts: here the recipe then stops at an unknown
    key, naming itself by its new name."""
    with pytest.raises(SystemExit) as e:
        main(["run", "full_finetune_single_device", "--config", "slake", "+bogus=1"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert (
        "medtune: full_finetune_single_device is an alias: running recipe full_finetune with "
        "config full_finetune/slake_single_device" in err
    )
    assert "full_finetune: error: config key(s) not known to full_finetune: bogus" in err
