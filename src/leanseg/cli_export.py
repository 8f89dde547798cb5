"""``leanseg export``: a checkpoint as an ONNX file, checked against torch in onnxruntime."""

from __future__ import annotations

import argparse

TOLERANCE_HELP = "1e-4"  # leanseg.export.DEFAULT_TOLERANCE, not imported: it needs torch


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` command to the CLI's sub-parsers."""
    export = sub.add_parser(
        "export",
        help="write a checkpoint's model as ONNX (the [deploy] extra), checked in onnxruntime",
    )
    export.add_argument("--checkpoint", required=True, help="a best.pt or last.pt")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    shape = export.add_mutually_exclusive_group()
    shape.add_argument(
        "--size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="fixed input size (default: the checkpoint config's crop size)",
    )
    shape.add_argument(
        "--dynamic",
        action="store_true",
        help="dynamic batch, height and width (refused for models that need a fixed size)",
    )
    export.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: torch's)")
    export.add_argument(
        "--tolerance",
        type=float,
        help="max |logit diff| onnxruntime vs torch, times max(1, max |logit|), to keep the "
        f"file (default {TOLERANCE_HELP})",
    )
    export.add_argument("--force", action="store_true", help="replace an existing output file")
    export.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from leanseg.export import DEFAULT_TOLERANCE, export_checkpoint

    report = export_checkpoint(
        args.checkpoint,
        args.output,
        size=tuple(args.size) if args.size else None,
        dynamic=args.dynamic,
        opset=args.opset,
        tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
        force=args.force,
    )
    print(report.format())
    return 0
