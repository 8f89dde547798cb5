"""The CLI answers --help, --version, configs and config show without importing torch."""

from __future__ import annotations

import subprocess
import sys

import leanseg
from leanseg.config import load_config, to_yaml

SCRIPT = """
import sys
from leanseg.cli import main
try:
    code = main({argv!r})
except SystemExit as done:  # argparse's --help / --version
    code = done.code
print("TORCH" if "torch" in sys.modules else "NO-TORCH")
sys.exit(code)
"""


def _run(*argv: str) -> tuple[int, list[str], str]:
    """``leanseg ARGV`` in a fresh interpreter: exit code, stdout lines (the last says whether
    torch was imported), stderr."""
    script = SCRIPT.format(argv=list(argv))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    return done.returncode, done.stdout.splitlines(), done.stderr


def test_version_without_torch():
    assert _run("--version") == (0, [f"leanseg {leanseg.__version__}", "NO-TORCH"], "")


def test_help_without_torch():
    code, lines, _ = _run("--help")
    assert code == 0 and lines[-1] == "NO-TORCH"
    assert any("configs" in line for line in lines) and any("train" in line for line in lines)


def test_config_show_prints_the_resolved_config_without_torch():
    code, lines, err = _run(
        "config", "show", "-c", "pspnet50_cityscapes_713", "train.iterations=10"
    )
    assert code == 0, err
    assert lines[-1] == "NO-TORCH"
    expected = to_yaml(load_config("pspnet50_cityscapes_713", ["train.iterations=10"]))
    assert lines[:-1] == expected.splitlines()


def test_config_show_validates_like_train():
    code, _, err = _run("config", "show", "model.options.nope=1")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "'model.options.nope'" in err


def test_configs_without_torch():
    code, lines, _ = _run("configs")
    assert code == 0 and lines[-1] == "NO-TORCH"
    assert any(line.startswith("pspnet50_cityscapes_713 ") for line in lines)


def test_export_tolerance_help_matches_the_export_default():
    from leanseg.cli_export import TOLERANCE_HELP
    from leanseg.export import DEFAULT_TOLERANCE

    assert float(TOLERANCE_HELP) == DEFAULT_TOLERANCE
