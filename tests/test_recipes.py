"""Every packaged recipe (src/leanseg/configs, linked as configs/) loads, validates and passes
--dry-run.

The dry run here shrinks the crop to 65 px and evaluates whole images so that the ten
recipes fit CI on a CPU; everything else (model and its options, norm, optimizer, schedule,
AMP, classes) is the recipe's own. The full-size dry runs are `leanseg train -c X --dry-run`.
"""

from __future__ import annotations

import pytest

from leanseg.cli import main
from leanseg.config import load_config
from leanseg.recipes import list_recipes

CONFIGS = [  # the search recipes (leanseg search) are tested in test_fasterseg_search.py
    recipe.path for recipe in list_recipes() if not recipe.name.startswith("fasterseg_search_")
]
SMALL = ["data.crop_size=65", "data.crop_width=null", "eval.mode=whole", "eval.base_size=null"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_there_are_recipes():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_dry_run(path, capsys):
    cfg = load_config(path)
    assert cfg.data.dataset != "synthetic", "a recipe names its real dataset"
    small = [s for s in SMALL if not (s.startswith("data.crop_size") and cfg.data.crop_size < 65)]
    if cfg.data.dataset == "cifar10":
        small = ["data.crop_size=32"]
    assert main(["train", "-c", str(path), "--dry-run", *small]) == 0
    out = capsys.readouterr().out
    assert "resolved recipe:" in out and f"name: {cfg.model.name}" in out
    assert f"(recipe batch {cfg.data.batch_size})" in out
