"""``leanseg configs`` (the packaged recipes) and ``leanseg config show`` (a resolved config).

Neither imports torch: both answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_parsers(sub: argparse._SubParsersAction, config_args: Callable) -> None:
    """Add ``configs`` and ``config show`` to the CLI's sub-parsers."""
    configs = sub.add_parser(
        "configs", help="list the recipes inside the package (use a name with -c)"
    )
    configs.set_defaults(func=run_configs)
    config = sub.add_parser("config", help="show the resolved config of a recipe and overrides")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser(
        "show", help="print the resolved, validated config as YAML (defaults <- -c <- overrides)"
    )
    config_args(show)
    show.set_defaults(func=run_config_show)


def run_configs(args: argparse.Namespace) -> int:
    from leanseg.recipes import list_recipes, read_recipe

    rows = [("RECIPE", "MODEL", "DATASET", "PUBLISHED")]
    for recipe in list_recipes():
        data = read_recipe(recipe.path)
        model = data.get("model", {}).get("name", "-")
        rows.append(
            (recipe.name, model, data.get("data", {}).get("dataset", "-"), recipe.published)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(
            "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=False)), row[3] or "-"
        )
    print("\nleanseg train -c NAME [key=value ...]; leanseg config show -c NAME to see one")
    return 0


def run_config_show(args: argparse.Namespace) -> int:
    from leanseg.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0
