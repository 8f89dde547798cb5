"""``leanseg train | eval | predict``: one entry point; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leanseg import __version__, cli_config, cli_export, cli_report, cli_search
from leanseg.errors import LeansegError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(cli_search.rewrite(list(sys.argv[1:] if argv is None else argv)))
    try:
        return args.func(args)
    except LeansegError as err:
        print(f"leanseg: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # disk full, permissions, a file where a directory should be
        where = f"'{err.filename}': " if err.filename else ""
        reason = err.strerror or one_line(err)
        print(f"leanseg: error: {where}{reason}; free space or fix the path", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("leanseg: interrupted; nothing was written by this command", file=sys.stderr)
        return EXIT_INTERRUPTED


def one_line(err: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it with a trace."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    last = lines[-1].strip()
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last.removeprefix(prefix) if len(lines) > 1 else last


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leanseg", description="Lean semantic segmentation: train, evaluate, predict."
    )
    parser.add_argument("--version", action="version", version=f"leanseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model (defaults: the built-in synthetic dataset)")
    _config_args(train)
    train.add_argument("--resume", metavar="RUN", help="continue a run directory (or its last.pt)")
    train.add_argument(
        "--stop-at", type=int, metavar="ITER", help="stop at this iteration, leaving a last.pt"
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the recipe: build everything, run 2 batches of generated data, print it",
    )
    train.set_defaults(func=run_train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on the validation split")
    _config_args(evaluate)
    evaluate.add_argument(
        "--checkpoint", required=True, help="a best.pt or last.pt, or a leanseg export .onnx"
    )
    evaluate.add_argument("--out", help="also write the metrics as JSON to this file")
    evaluate.add_argument(
        "--report",
        action="store_true",
        help="keep the metrics in the checkpoint's run directory and rewrite its report.html",
    )
    evaluate.set_defaults(func=run_eval)

    predict = sub.add_parser("predict", help="write label maps for images")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    predict.add_argument("--checkpoint", required=True, help="a best.pt or last.pt")
    predict.add_argument("-o", "--output-dir", default="predictions", help="where PNGs go")
    predict.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for inference, e.g. --set eval.flip=true (repeatable)",
    )
    _progress_args(predict)
    predict.set_defaults(func=run_predict)

    bench = sub.add_parser("bench", help="measure a config's model")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    memory = bench_sub.add_parser(
        "memory", help="saved-activation bytes (measured and analytic) and peak memory of a step"
    )
    _config_args(memory)
    memory.add_argument(
        "--checkpoint",
        help="use this checkpoint's config (and keep the result in its run directory)",
    )
    memory.set_defaults(func=run_bench_memory)
    bench_model = bench_sub.add_parser(
        "model", help="parameters, FLOPs and forward latency (eval mode) as JSON"
    )
    _config_args(bench_model)
    bench_model.add_argument(
        "--checkpoint", help="bench this checkpoint's model (default: build it from the config)"
    )
    bench_model.add_argument(
        "--size",
        nargs="+",
        type=int,
        metavar="N",
        help="input H W, or N for N x N (default: the config's crop size)",
    )
    bench_model.add_argument("--batch", type=int, default=1, help="images per forward")
    bench_model.add_argument("--runs", type=int, default=20, help="timed forward passes")
    bench_model.add_argument("--warmup", type=int, default=5, help="untimed forwards first")
    bench_model.add_argument(
        "--threads",
        type=int,
        help="intra-op threads of torch / onnxruntime (default: torch's current number)",
    )
    bench_model.add_argument(
        "--backend",
        nargs="+",
        choices=["torch", "fused", "onnxruntime"],
        default=["torch"],
        help="one or more, timed side by side: torch eager, fused (BN folded, channels_last) "
        "or the exported model in onnxruntime (the [deploy] extra); speed-ups vs the first",
    )
    bench_model.set_defaults(func=run_bench_model)

    shrink = sub.add_parser(
        "shrink", help="remove the channels an ACoSP run pruned: a smaller checkpoint"
    )
    shrink.add_argument("--checkpoint", required=True, help="a best.pt or last.pt of an ACoSP run")
    shrink.add_argument("-o", "--output", required=True, help="where the shrunk checkpoint goes")
    shrink.set_defaults(func=run_shrink)

    cli_search.add_parsers(sub, _config_args)
    cli_config.add_parsers(sub, _config_args)
    cli_export.add_parsers(sub)
    cli_report.add_parsers(sub)

    data = sub.add_parser("data", help="check or prepare a dataset")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = data_sub.add_parser("check", help="scan a dataset split for problems before training")
    _config_args(check)
    check.add_argument("--split", help="split to scan (default: the training split)")
    check.set_defaults(func=run_data_check)
    prepare = data_sub.add_parser("prepare", help="convert a dataset's labels to training form")
    prepare.add_argument("name", choices=["voc-aug", "cityscapes"])
    prepare.add_argument("root", help="VOC2012 directory, or the Cityscapes root")
    prepare.add_argument("--sbd", help="voc-aug: the SBD benchmark_RELEASE directory")
    prepare.add_argument("--overwrite", action="store_true", help="rewrite existing label PNGs")
    prepare.set_defaults(func=run_data_prepare)
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        help="a YAML file or a recipe name from `leanseg configs` (default: built-in defaults)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.iterations=500",
    )
    _progress_args(parser)


def _progress_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress bars (default: when writing to a terminal)",
    )


def run_train(args: argparse.Namespace) -> int:
    from leanseg.config import load_config
    from leanseg.engine.distributed import cleanup, init_distributed
    from leanseg.engine.run_dir import write_text_atomic
    from leanseg.engine.train_run import resume_paths, start_training
    from leanseg.engine.trainer import Interrupted

    resume = Path(args.resume) if args.resume else None
    if resume is not None:
        run_dir, _ = resume_paths(resume)
        if args.config:
            print("leanseg: note: -c is ignored with --resume (the run's config.yaml is used)")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        return _dry_run(cfg)
    info = init_distributed(cfg.train.device)
    say = _say if info.is_main else _silent
    try:
        result = start_training(
            cfg, resume=resume, stop_at=args.stop_at, progress=args.progress, say=say
        )
    except Interrupted as stop:
        say(
            f"leanseg: {stop.signal_name} at iteration {stop.iteration}: {stop.checkpoint} "
            f"written; continue with: leanseg train --resume {stop.checkpoint.parent}"
        )
        return EXIT_INTERRUPTED
    finally:
        cleanup(info)
    trainer, metrics = result.trainer, result.metrics
    if metrics is not None and info.is_main:
        print(metrics.format_table(trainer.class_names))
        report = metrics.to_dict(trainer.class_names)
        report["confusion_matrix"] = trainer.confusion.matrix.tolist()
        write_text_atomic(result.run_dir / "final_metrics.json", json.dumps(report, indent=2))
    best = f"{trainer.best_miou:.4f}" if trainer.best_miou > float("-inf") else "none yet"
    say(f"best val mIoU: {best}")
    if info.is_main:
        cli_report.refresh_report(result.run_dir)
    say(f"run directory: {result.run_dir}")
    return 0


def _dry_run(cfg) -> int:
    from leanseg.data.build import dataset_num_classes
    from leanseg.engine.dry_run import dry_run

    num_classes = cfg.data.num_classes or dataset_num_classes(cfg.data.dataset)
    print(dry_run(cfg, num_classes, classification=cfg.data.dataset == "cifar10"))
    return 0


def _say(text: str) -> None:
    print(text, flush=True)


def _silent(*args: object, **kwargs: object) -> None:
    """print() for ranks other than 0."""


def _checkpoint_config(payload: dict, config_path: str | None, overrides: list[str]):
    from leanseg.config import load_config

    return load_config(config_path, overrides, base=None if config_path else payload["config"])


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint or an ``.onnx`` export on the config's validation split, through
    the Predictor (model, inference settings); sharded over processes under torchrun."""
    from leanseg.data.build import build_dataset, val_loader
    from leanseg.engine.distributed import cleanup, init_distributed, process_device
    from leanseg.engine.evaluate import evaluate
    from leanseg.engine.run_dir import check_output_file
    from leanseg.engine.runtime import select_device
    from leanseg.errors import CheckpointError
    from leanseg.predictor import Predictor

    out = Path(args.out) if args.out else None
    if out is not None:
        check_output_file(out, "--out")  # before the evaluation, not after it
    if args.report and cli_report.run_dir_of(args.checkpoint) is None:
        raise CheckpointError(
            f"--report: '{args.checkpoint}' is not in a run directory (no config.yaml beside "
            "it); evaluate a run's best.pt or last.pt, or drop --report"
        )
    onnx = args.checkpoint.endswith(".onnx")
    predictor = Predictor.from_checkpoint(  # a torch model moves to its process's device below
        args.checkpoint,
        device="auto" if onnx else "cpu",
        config=args.config,
        overrides=args.overrides,
    )
    cfg = predictor.config
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    if dataset.num_classes != predictor.num_classes:
        raise CheckpointError(
            f"'{args.checkpoint}' predicts {predictor.num_classes} classes but the dataset has "
            f"{dataset.num_classes}: set data.num_classes or use a matching "
            f"{'export' if onnx else 'checkpoint'}"
        )
    info = init_distributed(cfg.train.device)
    try:
        device = process_device(select_device(cfg.train.device), info)
        predictor.to(device)
        loader = val_loader(
            dataset,
            cfg.data,
            pin_memory=device.type == "cuda",
            rank=info.rank,
            world_size=info.world_size,
        )
        matrix = evaluate(
            predictor.model,
            loader,
            num_classes=dataset.num_classes,
            ignore_index=cfg.data.ignore_index,
            device=device,
            amp_dtype=predictor.compute.autocast_dtype,
            channels_last=predictor.compute.channels_last,
            progress=info.is_main and args.progress is not False,
            **predictor.inference,
        )
    finally:
        cleanup(info)
    if info.is_main:
        report = _report(matrix, dataset.class_names, out)
        if args.report:
            report["checkpoint"] = str(args.checkpoint)
            cli_report.record_in_run(args.checkpoint, "eval_metrics", report)
            cli_report.refresh_report(cli_report.run_dir_of(args.checkpoint))
    return 0


def _report(matrix, class_names: list[str], out: Path | None) -> dict:
    """Print an evaluation's per-class table; with ``--out`` also write it (and the confusion
    matrix) as JSON. Returns that record."""
    from leanseg.engine.run_dir import write_text_atomic

    metrics = matrix.compute()
    print(metrics.format_table(class_names))
    report = metrics.to_dict(class_names)
    report["confusion_matrix"] = matrix.matrix.tolist()
    if out is not None:
        write_text_atomic(out, json.dumps(report, indent=2))
    return report


def run_bench_memory(args: argparse.Namespace) -> int:
    from leanseg.bench import memory_report
    from leanseg.checkpoint import load_checkpoint
    from leanseg.config import load_config
    from leanseg.data.build import dataset_num_classes
    from leanseg.engine.runtime import select_device

    if args.checkpoint:
        payload = load_checkpoint(args.checkpoint)
        cfg = _checkpoint_config(payload, args.config, args.overrides)
        num_classes = int(payload["num_classes"])
    else:
        cfg = load_config(args.config, args.overrides)
        num_classes = cfg.data.num_classes or dataset_num_classes(cfg.data.dataset)
    report = memory_report(cfg, num_classes, select_device(cfg.train.device))
    print(json.dumps(report, indent=2))
    _keep_bench(args.checkpoint, "bench_memory", report)
    return 0


def _keep_bench(checkpoint: str | None, name: str, report: dict) -> None:
    """A bench of a run's checkpoint is kept in its run directory for ``leanseg report``."""
    kept = cli_report.record_in_run(checkpoint, name, report) if checkpoint else None
    if kept is not None:
        print(f"kept in {kept}", file=sys.stderr)


def run_bench_model(args: argparse.Namespace) -> int:
    from leanseg.bench_model import model_report
    from leanseg.checkpoint import load_checkpoint, model_from_checkpoint
    from leanseg.config import load_config
    from leanseg.data.build import dataset_num_classes
    from leanseg.engine.precision import resolve_compute
    from leanseg.engine.runtime import select_device
    from leanseg.engine.trainer import model_options
    from leanseg.errors import ConfigError
    from leanseg.models import build_model

    if args.size is not None and (len(args.size) not in (1, 2) or min(args.size) < 1):
        raise ConfigError(
            f"--size {' '.join(map(str, args.size))}: give --size N or --size H W, positive"
        )
    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: must be >= 1")
    if args.checkpoint:
        payload = load_checkpoint(args.checkpoint)
        cfg = _checkpoint_config(payload, args.config, args.overrides)
        name, model = payload["model"], model_from_checkpoint(payload, args.checkpoint)
    else:
        cfg = load_config(args.config, args.overrides)
        num_classes = cfg.data.num_classes or dataset_num_classes(cfg.data.dataset)
        name = cfg.model.name
        model = build_model(name, num_classes, **model_options(cfg))
    size = args.size or [cfg.data.crop_size, cfg.data.crop_width or cfg.data.crop_size]
    height, width = size if len(size) == 2 else size * 2
    device = select_device(cfg.train.device)
    model = model.to(device)
    compute = resolve_compute(cfg.train.precision, cfg.train.channels_last, device, model)
    report = model_report(
        model,
        (args.batch, 3, height, width),
        args.runs,
        args.warmup,
        args.threads,
        backends=args.backend,
        autocast_dtype=compute.autocast_dtype,
        channels_last=compute.channels_last,
    )
    header = {"model": name, "checkpoint": args.checkpoint, "compute": compute.to_dict()}
    print(json.dumps({**header, **report}, indent=2))
    _keep_bench(args.checkpoint, "bench_model", {**header, **report})
    return 0


def run_shrink(args: argparse.Namespace) -> int:
    from leanseg.methods.acosp import shrink_checkpoint

    print(shrink_checkpoint(args.checkpoint, args.output).format())
    return 0


def run_data_check(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from leanseg.config import load_config
    from leanseg.data.check import check_dataset

    cfg = load_config(args.config, args.overrides)
    bar = tqdm(desc="check", disable=None if args.progress is None else not args.progress)

    def advance(index: int, total: int) -> None:
        bar.total = total
        bar.update(1)

    report = check_dataset(cfg.data, args.split, on_sample=advance)
    bar.close()
    print(report.format())
    return 0 if report.ok else 1


def run_data_prepare(args: argparse.Namespace) -> int:
    from leanseg.errors import ConfigError

    if args.name == "voc-aug":
        from leanseg.data.voc_aug import prepare_voc_aug

        if not args.sbd:
            raise ConfigError("leanseg data prepare voc-aug needs --sbd PATH (benchmark_RELEASE)")
        print(prepare_voc_aug(args.root, args.sbd, overwrite=args.overwrite))
    else:
        from leanseg.data.cityscapes import prepare_cityscapes

        print(prepare_cityscapes(args.root, overwrite=args.overwrite))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Predict images; the output directory is checked (never an input's) before any work."""
    from leanseg.engine.predict import collect_images, predict_files, prepare_outputs
    from leanseg.predictor import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, overrides=args.overrides)
    paths = collect_images(args.inputs)
    out_dir = Path(args.output_dir)
    stems = prepare_outputs(paths, out_dir)
    predict_files(
        predictor,
        paths,
        out_dir,
        palette=predictor.palette,
        progress=args.progress,
        stems=stems,
    )
    print(f"wrote {len(paths)} predictions (index, colour, overlay PNGs) to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
