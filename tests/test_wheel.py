"""The built wheel carries the recipes: installed into a fresh venv (not editable), ``leanseg
configs`` lists them and ``leanseg train -c NAME --dry-run`` runs the smallest one."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from leanseg.recipes import list_recipes

ROOT = Path(__file__).parents[1]
SMALLEST = "resnet18_cifar10_32"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("leanseg-*.whl")
    return path


def test_the_wheel_holds_every_recipe_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {name for name in names if name.startswith("leanseg/configs/")}
    assert recipes == {f"leanseg/configs/{recipe.name}.yaml" for recipe in list_recipes()}
    assert any(name.startswith("leanseg/models/fasterseg/archs/") for name in names)
    assert any(name.startswith("leanseg/methods/fasterseg/luts/") for name in names)


def test_an_installed_wheel_lists_and_dry_runs_a_recipe(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    # torch and the other dependencies come from this environment's site-packages, listed in a
    # .pth file (whose own .pth files, such as an editable leanseg's, are not run); leanseg
    # itself comes only from the wheel (checked below)
    inner = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(inner, "outer_environment.pth").write_text("".join(f"{p}\n" for p in sorted(outer)))
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    work = tmp_path / "elsewhere"  # not the repository: no configs/ or src/ beside it
    work.mkdir()

    def leanseg(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(env / "bin" / "leanseg"), *argv], cwd=work, capture_output=True, text=True
        )

    where = subprocess.run(
        [str(python), "-c", "import leanseg; print(leanseg.__file__)"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(env), f"leanseg imported from {where}, not the wheel"

    listed = leanseg("configs")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    assert {recipe.name for recipe in list_recipes()} <= rows

    dry = leanseg("train", "-c", SMALLEST, "--dry-run", "data.workers=0")
    assert dry.returncode == 0, dry.stderr
    assert "name: resnet18_cifar" in dry.stdout and "dry run: 2 iterations" in dry.stdout
    assert not (work / "runs").exists(), "a dry run writes no run directory"
