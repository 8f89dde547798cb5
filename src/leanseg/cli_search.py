"""``leanseg search``, ``leanseg search lut`` and ``leanseg search derive`` (FasterSeg).

argparse cannot mix a command's ``KEY=VALUE`` positionals with optional sub-commands, so
:func:`rewrite` turns ``search lut ...`` / ``search derive ...`` into the commands named
``"search lut"`` / ``"search derive"`` before parsing.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

ACTIONS = ("lut", "derive")
EXIT_INTERRUPTED = 130


def rewrite(argv: list[str]) -> list[str]:
    """``["search", "lut", ...]`` -> ``["search lut", ...]``; anything else unchanged."""
    if len(argv) >= 2 and argv[0] == "search" and argv[1] in ACTIONS:
        return [f"search {argv[1]}", *argv[2:]]
    return argv


def add_parsers(sub: argparse._SubParsersAction, config_args: Callable) -> None:
    """Add the three search commands to the CLI's sub-parsers."""
    search = sub.add_parser(
        "search",
        help="FasterSeg: latency-aware architecture search (then `search lut`, `search derive`)",
    )
    config_args(search)
    search.add_argument("--resume", metavar="RUN", help="continue a search run directory")
    search.add_argument("--stop-at", type=int, metavar="STEP", help="stop after this step")
    search.set_defaults(func=run_search)

    lut = sub.add_parser(
        "search lut", help="measure the latency lookup table of a search space on this machine"
    )
    config_args(lut)
    lut.add_argument("-o", "--output", required=True, help="the LUT JSON to write")
    lut.add_argument("--backend", choices=["torch", "onnxruntime"], default="onnxruntime")
    lut.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    lut.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    lut.add_argument("--warmup", type=int, default=10, help="untimed calls per entry")
    lut.add_argument("--target-seconds", type=float, default=0.2, help="length of one timed loop")
    lut.add_argument("--repeats", type=int, default=5, help="timed loops per entry (median)")
    lut.add_argument("--force", action="store_true", help="replace an existing output file")
    lut.set_defaults(func=run_search_lut)

    derive = sub.add_parser(
        "search derive", help="write the teacher and student spec files of a search run"
    )
    derive.add_argument("run_dir", help="a search run directory")
    derive.add_argument("--epoch", type=int, help="search epoch (default: the last saved)")
    derive.add_argument("-o", "--output-dir", help="default: RUN/derived/epoch_NNN")
    derive.set_defaults(func=run_search_derive)


def run_search(args: argparse.Namespace) -> int:
    from leanseg.config import load_config
    from leanseg.engine.search_run import start_search
    from leanseg.engine.train_run import resume_paths
    from leanseg.engine.trainer import Interrupted

    resume = Path(args.resume) if args.resume else None
    if resume is not None:
        run_dir, _ = resume_paths(resume)
        cfg = load_config(run_dir / "config.yaml", args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    try:
        run_dir, _, summary = start_search(
            cfg, resume=resume, stop_at=args.stop_at, progress=args.progress
        )
    except Interrupted as stop:
        print(
            f"leanseg: {stop.signal_name} at step {stop.iteration}: {stop.checkpoint} written; "
            f"continue with: leanseg search --resume {stop.checkpoint.parent}"
        )
        return EXIT_INTERRUPTED
    if summary:
        print(json.dumps(summary, indent=2))
    print(f"derive the networks with: leanseg search derive {run_dir}")
    return 0


def run_search_lut(args: argparse.Namespace) -> int:
    import torch

    from leanseg.config import load_config
    from leanseg.data.build import dataset_num_classes
    from leanseg.engine.search import search_space
    from leanseg.errors import ConfigError
    from leanseg.methods.fasterseg.lut_measure import lut_metadata, measure_entries, write_lut
    from leanseg.methods.fasterseg.supernet_latency import lut_keys

    cfg = load_config(args.config, args.overrides)
    output = Path(args.output)
    if output.exists() and not args.force:
        raise ConfigError(f"'{output}' exists; pass --force to replace it or choose another -o")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here; measure on the deployment GPU")
    size = (int(cfg.search.latency_size[0]), int(cfg.search.latency_size[1]))
    num_classes = cfg.data.num_classes or dataset_num_classes(cfg.data)
    keys = lut_keys(search_space(cfg), size, num_classes)
    timing = {"warmup": args.warmup, "target_seconds": args.target_seconds, "repeats": args.repeats}
    device = torch.device(args.device)
    print(f"measuring {len(keys)} entries at {size[0]}x{size[1]} with {args.backend} on {device}")
    entries = measure_entries(
        keys,
        backend=args.backend,
        device=device,
        threads=args.threads,
        progress=args.progress is not False,
        **timing,
    )
    meta = lut_metadata(
        backend=args.backend,
        device=device,
        threads=args.threads,
        size=size,
        num_classes=num_classes,
        extra={"search_space": search_space(cfg).to_dict()},
        **timing,
    )
    write_lut(output, entries, meta, overwrite=args.force)
    print(f"wrote {output} ({len(entries)} entries)")
    return 0


def run_search_derive(args: argparse.Namespace) -> int:
    from leanseg.engine.search_run import derive_run

    output = Path(args.output_dir) if args.output_dir else None
    written = derive_run(Path(args.run_dir), output, args.epoch)
    for name, path in written.items():
        print(f"{name}: {path}")
    teacher, student = written.get("teacher"), written.get("student")
    if teacher and student:
        print(
            "train them with:\n"
            f"  leanseg train model.name=fasterseg model.options.arch={teacher} ...\n"
            f"  leanseg train model.name=fasterseg model.options.arch={student} "
            "distill.teacher=TEACHER_RUN/last.pt ..."
        )
    return 0
