"""Start-up time of the CLI: ``leanseg --help``, ``--version``, ``configs`` and ``config show``.

Each command runs in a fresh interpreter, round-robin with the others, ``--rounds`` times;
``python -c pass`` (the interpreter alone) and ``python -c "import torch"`` (what every command
paid when ``import leanseg`` imported torch) run in the same rounds. ``--before SRC`` adds
``leanseg --help`` from another source tree (e.g. a checkout of an older commit's ``src``).

    python benchmarks/cli_startup.py --rounds 20 --before /tmp/old/src
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from result_file import machine, summary_ms, write_result

LEANSEG = [sys.executable, "-m", "leanseg"]
COMMANDS: dict[str, list[str]] = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "leanseg --help": [*LEANSEG, "--help"],
    "leanseg --version": [*LEANSEG, "--version"],
    "leanseg configs": [*LEANSEG, "configs"],
    "leanseg config show -c pspnet50_cityscapes_713": [
        *LEANSEG,
        "config",
        "show",
        "-c",
        "pspnet50_cityscapes_713",
    ],
}


def time_once(command: list[str], env: dict[str, str] | None = None) -> float:
    """Wall-clock seconds of one run (output discarded; a failure stops the benchmark)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--before", type=Path, help="a src/ tree to time `--help` of, too")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cli_startup.json"))
    args = parser.parse_args()
    runs: list[tuple[str, list[str], dict[str, str] | None]] = [
        (name, command, None) for name, command in COMMANDS.items()
    ]
    if args.before is not None:
        env = {**os.environ, "PYTHONPATH": str(args.before.resolve())}
        runs.append(("leanseg --help (before)", [*LEANSEG, "--help"], env))
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for _name, command, env in runs:  # warm the file cache once
        time_once(command, env)
    for _ in range(args.rounds):
        for name, command, env in runs:
            times[name].append(time_once(command, env))
    results = {name: summary_ms(seconds) for name, seconds in times.items()}
    torch_ms = results["python -c 'import torch'"]["median_ms"]
    for summary in results.values():
        summary["vs_import_torch"] = round(summary["median_ms"] / torch_ms, 3)
    write_result(
        {
            "benchmark": "cli_startup",
            "rounds": args.rounds,
            "machine": machine(python=sys.version.split()[0]),
            "commands": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
