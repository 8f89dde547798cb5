"""leanseg bench model: parameters, FLOPs of one forward and latency, from config or checkpoint."""

import json

import pytest
from torch import nn

from leanseg.bench_model import model_report
from leanseg.checkpoint import save_checkpoint
from leanseg.cli import main
from leanseg.config import load_config, to_dict
from leanseg.data.build import dataset_num_classes
from leanseg.engine.trainer import model_options
from leanseg.errors import ConfigError
from leanseg.methods import acosp
from leanseg.models import build_model

TINY = ["model.options.width_mult=0.25", "model.options.channels=16", "data.crop_size=48"]
FAST = ["--runs", "2", "--warmup", "1", "--threads", "1"]


def _num_classes(cfg) -> int:
    return cfg.data.num_classes or dataset_num_classes(cfg.data.dataset)


def _latency_ok(report: dict, backend: str = "torch") -> None:
    entry = report["backends"][backend]
    p10, median, p90 = (entry[f"latency_seconds_{k}"] for k in ("p10", "median", "p90"))
    assert 0 < p10 <= median <= p90
    assert entry["images_per_second"] > 0
    first = report["backends"][report["speedup_relative_to"]]["latency_seconds_median"]
    assert entry["speedup"] == pytest.approx(first / median)


def test_model_report_counts_a_single_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    conv.bias.requires_grad_(False)
    report = model_report(conv, (1, 3, 16, 16), runs=3, warmup=1, threads=1)
    # flop_counter: 2 FLOPs per multiply-add, bias adds not counted
    assert report["flops"] == 2 * 8 * 3 * 9 * 16 * 16
    assert report["parameters"] == 8 * 3 * 9 + 8
    assert report["trainable_parameters"] == 8 * 3 * 9
    assert report["threads"] == 1 and report["runs"] == 3 and report["input"] == [1, 3, 16, 16]
    _latency_ok(report)
    assert not conv.training  # measured in eval mode


def test_bench_model_cli_matches_the_built_model(capsys):
    assert main(["bench", "model", *TINY, *FAST]) == 0
    report = json.loads(capsys.readouterr().out)
    cfg = load_config(None, TINY)
    model = build_model(cfg.model.name, _num_classes(cfg), **model_options(cfg))
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["model"] == cfg.model.name and report["checkpoint"] is None
    assert report["input"] == [1, 3, 48, 48] and report["threads"] == 1
    assert report["flops"] > 0
    _latency_ok(report)


def test_bench_model_cli_checkpoint_and_size(tmp_path, capsys):
    cfg = load_config(None, [*TINY, "acosp.sparsity=0.5"])
    model = build_model(cfg.model.name, 5, **model_options(cfg))
    path = tmp_path / "best.pt"
    save_checkpoint(
        path,
        {
            "model": cfg.model.name,
            "num_classes": 5,
            "model_options": model_options(cfg),
            "config": to_dict(cfg),
            "state_dict": acosp.apply(model, 0.5).state_dict(),
        },
    )
    assert main(["bench", "model", "--checkpoint", str(path), "--size", "32", "40", *FAST]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"] == str(path) and report["input"] == [1, 3, 32, 40]
    assert report["parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "{tmp}/missing.pt"], "not found"),
        (["--size", "0"], "--size"),
        (["--size", "8", "8", "8"], "--size"),
        (["--runs", "0"], "--runs"),
    ],
)
def test_bench_model_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    assert main(["bench", "model", *TINY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("leanseg: error:") and message in err and "\n" not in err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_bench_model_times_torch_fused_and_onnxruntime_side_by_side(capsys):
    pytest.importorskip("onnxruntime")
    backends = ["torch", "fused", "onnxruntime"]
    assert main(["bench", "model", *TINY, *FAST, "--backend", *backends]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["backends"]) == backends and report["speedup_relative_to"] == "torch"
    for backend in backends:
        _latency_ok(report, backend)
    assert report["backends"]["torch"]["speedup"] == 1.0
    fused = report["backends"]["fused"]["backend"]
    assert fused["batchnorms_before"] > 0 and fused["batchnorms_left"] == 0
    assert fused["channels_last"] is True
    assert report["backends"]["onnxruntime"]["backend"]["name"] == "onnxruntime"


def test_model_report_speedups_are_relative_to_the_first_backend():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    report = model_report(
        model, (1, 3, 16, 16), runs=2, warmup=0, threads=1, backends=("fused", "torch")
    )
    assert report["speedup_relative_to"] == "fused"
    assert report["backends"]["fused"]["speedup"] == 1.0
    _latency_ok(report, "torch")


@pytest.mark.parametrize("backends", [(), ("torch", "torch"), ("tensorrt",)])
def test_model_report_refuses_bad_backend_lists(backends):
    with pytest.raises(ConfigError, match="--backend"):
        model_report(nn.Conv2d(3, 4, 1), (1, 3, 8, 8), runs=1, warmup=0, backends=backends)
