"""Recipes by name, ``leanseg configs`` and ``_base_`` inheritance (leanseg.recipes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from leanseg.cli import main
from leanseg.config import load_config
from leanseg.errors import ConfigError
from leanseg.recipes import RECIPE_DIR, find_recipe, list_recipes, read_recipe


def test_recipes_live_inside_the_package():
    import leanseg

    assert RECIPE_DIR.parent == Path(leanseg.__file__).parent
    names = [recipe.name for recipe in list_recipes()]
    assert "pspnet50_cityscapes_713" in names and len(names) >= 14


def test_a_recipe_is_found_by_name_with_or_without_yaml():
    by_name = load_config("pspnet50_cityscapes_713")
    by_file = load_config(RECIPE_DIR / "pspnet50_cityscapes_713.yaml")
    assert by_name == by_file == load_config("pspnet50_cityscapes_713.yaml")
    assert by_name.model.name == "pspnet50" and by_name.data.crop_size == 713


def test_a_file_wins_over_a_recipe_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pspnet50_cityscapes_713.yaml").write_text("train:\n  iterations: 7\n")
    assert load_config("pspnet50_cityscapes_713.yaml").train.iterations == 7


def test_an_unknown_name_suggests_the_closest_recipe():
    with pytest.raises(ConfigError, match="did you mean 'pspnet50_cityscapes_713'") as info:
        find_recipe("pspnet50_cityscape_713")
    assert "leanseg configs" in str(info.value) and "\n" not in str(info.value)


def test_every_recipe_but_the_unpublished_names_its_target():
    published = {recipe.name: recipe.published for recipe in list_recipes()}
    assert published["pspnet50_cityscapes_713"] == "77.30 mIoU single scale + flip"
    assert published["resnet18_cifar10_32"] == "89.68 accuracy"
    unpublished = {name for name, target in published.items() if not target}
    assert unpublished == {
        "deeplabv3_resnet50-aspp_voc-aug_513",
        "fasterseg_search_cityscapes",
        "fasterseg_search_synthetic",
    }


def test_configs_command_lists_each_recipe_with_model_and_target(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("pspnet50_cityscapes_713 "))
    assert row.split()[1:4] == ["pspnet50", "cityscapes", "77.30"]
    assert sum(
        1 for line in lines if line.split() and line.split()[0] in {r.name for r in list_recipes()}
    ) == len(list_recipes())


def test_base_extends_a_packaged_recipe(tmp_path):
    child = tmp_path / "short.yaml"
    child.write_text("_base_: pspnet50_cityscapes_713\ntrain:\n  iterations: 100\n")
    cfg = load_config(child)
    base = load_config("pspnet50_cityscapes_713")
    assert cfg.train.iterations == 100 and cfg.train.val_interval == base.train.val_interval
    assert cfg.data == base.data and cfg.optim == base.optim and cfg.model == base.model


def test_bases_merge_in_order_and_relative_paths_are_beside_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("data:\n  crop_size: 50\n  batch_size: 4\n")
    (tmp_path / "b.yaml").write_text("data:\n  crop_size: 60\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "c.yaml"
    child.write_text("_base_: [../a.yaml, ../b.yaml]\ndata:\n  scale_max: 1.25\n")
    data = read_recipe(child)["data"]
    assert data == {"crop_size": 60, "batch_size": 4, "scale_max": 1.25}


def test_another_model_in_the_child_drops_the_base_model_options(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model:\n  name: deeplabv3_resnet18\n  options: {channels: 32}\n"
    )
    same = tmp_path / "same.yaml"
    same.write_text("_base_: base.yaml\nmodel:\n  aux: true\n")
    other = tmp_path / "other.yaml"
    other.write_text("_base_: base.yaml\nmodel:\n  name: segnet\n")
    assert load_config(same).model.options == {"channels": 32}
    assert load_config(other).model.options == {}


def test_a_base_cycle_is_one_clear_error(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle \(a.yaml -> b.yaml -> a.yaml\)") as info:
        load_config(tmp_path / "a.yaml")
    assert "\n" not in str(info.value)


def test_an_unknown_base_names_the_file_and_the_base(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("_base_: pspnet50_cityscape_713\n")
    with pytest.raises(ConfigError) as info:
        load_config(child)
    message = str(info.value)
    assert f"'{child}'" in message and "'pspnet50_cityscape_713' not found" in message
    assert "did you mean 'pspnet50_cityscapes_713'" in message
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: {a: 1}\n")
    with pytest.raises(ConfigError, match="_base_ must be a recipe name or path"):
        load_config(bad)


def test_cli_train_by_recipe_name_with_a_bad_base_exits_2(tmp_path, capsys):
    child = tmp_path / "child.yaml"
    child.write_text("_base_: nope\n")
    assert main(["train", "-c", str(child), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("leanseg: error: config file") and "\n" not in err
