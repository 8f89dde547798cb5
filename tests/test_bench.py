"""leanseg bench memory: measured and analytic saved bytes, and BackRazor shrinks them."""

import json

import torch

from leanseg.bench import memory_report, peak_rss_bytes
from leanseg.cli import main
from leanseg.config import load_config

TINY = [
    "model.options.width_mult=0.25",
    "model.options.channels=16",
    "data.crop_size=48",
    "data.batch_size=2",
    "train.precision=fp32",  # the figures below are fp32's
]


def test_memory_report_fields_and_backrazor_saves_less():
    dense = memory_report(load_config(None, TINY), 7, torch.device("cpu"))
    sparse_cfg = load_config(None, [*TINY, "backrazor.ratio=0.9", "backrazor.scope=all"])
    sparse = memory_report(sparse_cfg, 7, torch.device("cpu"))
    for report in (dense, sparse):
        assert report["saved_activation_bytes"] > 0
        assert report["analytic_saved_bytes"] > 0
        assert report["step_seconds_median"] > 0
    # measured 0.38 of dense at this toy size (upsampling and loss tensors stay dense)
    assert sparse["saved_activation_bytes"] < 0.5 * dense["saved_activation_bytes"]
    assert sparse["analytic_saved_bytes"] < dense["analytic_saved_bytes"]
    if peak_rss_bytes() is not None:
        assert dense["peak_rss_bytes"] > 0


def test_bench_memory_cli_prints_json(capsys):
    assert main(["bench", "memory", *TINY, "backrazor.ratio=0.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backrazor_ratio"] == 0.5
    assert report["input"] == [2, 3, 48, 48]
