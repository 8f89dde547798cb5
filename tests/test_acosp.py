"""ACoSP masks: soft top-k, kept counts, schedule, hardening, state dict and exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from leanseg.checkpoint import model_from_checkpoint
from leanseg.cli import main
from leanseg.config import load_config
from leanseg.engine.trainer import acosp_schedule
from leanseg.errors import ConfigError
from leanseg.methods import acosp
from leanseg.models import build_model

TINY = [
    "model.name=deeplabv3plus_resnet18",
    "model.options.channels=16",
    "model.options.width_mult=0.25",
    "data.crop_size=48",
    "data.batch_size=2",
    "data.workers=0",
    "train.loggers=[]",
    "train.log_interval=1",
]


@pytest.mark.parametrize("channels", [8, 13, 64, 256])
@pytest.mark.parametrize("tau", [1.0, 0.1, 1e-3])
def test_exactly_k_channels_above_one_half(channels: int, tau: float) -> None:
    gen = torch.Generator().manual_seed(channels)
    for sparsity in (0.5, 0.75, 0.875):
        k = acosp.kept_channels(channels, sparsity, min_keep=2)
        mask = acosp.soft_mask(torch.randn(channels, generator=gen), k, tau)
        assert int((mask > 0.5).sum()) == k


def test_soft_mask_sharpens_as_temperature_falls() -> None:
    scores = torch.randn(64, generator=torch.Generator().manual_seed(0))
    blurry, sharp = acosp.soft_mask(scores, 16, 1.0), acosp.soft_mask(scores, 16, 1e-3)
    assert ((sharp - 0.5).abs() > 0.49).float().mean() > (
        (blurry - 0.5).abs() > 0.49
    ).float().mean()
    assert torch.equal(acosp.soft_mask(scores, 64, 0.1), torch.ones(64))  # k == C: all ones


@pytest.mark.parametrize(
    ("channels", "expected"),
    [(64, [32, 16, 8, 8]), (512, [256, 128, 64, 32]), (2048, [1024, 512, 256, 128]), (5, [5] * 4)],
)
def test_kept_channels_table(channels: int, expected: list[int]) -> None:
    got = [acosp.kept_channels(channels, s) for s in (0.5, 0.75, 0.875, 0.9375)]
    assert got == expected


def test_epoch_schedule_reproduces_the_original_timing() -> None:
    schedule = acosp.MaskSchedule(start=0, end=30, unit="epoch", iterations_per_epoch=10)
    taus = {e: schedule.tau(10 * e) for e in (0, 1, 2, 11, 16, 21, 29)}
    expected = {0: 1.0, 1: 1.0, 2: 0.794, 11: 0.1, 16: 0.0316, 21: 0.01, 29: 0.00158}
    for epoch, tau in expected.items():
        assert taus[epoch] == pytest.approx(tau, rel=5e-3), epoch  # 3 digits
    assert not schedule.is_hard(299) and schedule.is_hard(300)


def test_iteration_schedule_follows_the_formula() -> None:
    schedule = acosp.MaskSchedule(start=10, end=110, tau0=2.0, tau_final=1e-2)
    assert schedule.tau(5) == 2.0 and schedule.tau(10) == 2.0
    assert schedule.tau(60) == pytest.approx(2.0 * (1e-2 / 2.0) ** 0.5)
    assert schedule.tau(110) == pytest.approx(1e-2)
    assert not schedule.is_hard(109) and schedule.is_hard(110)


def test_apply_skips_classifiers_and_counts_pspnet50_convs() -> None:
    model = acosp.apply(build_model("pspnet50", num_classes=5), 0.75)
    names = [name for name, _ in acosp.masked_convs(model)]
    assert len(names) == 61  # acosp.md section 2
    assert all(
        conv not in dict(acosp.masked_convs(model)).values() for conv in acosp.output_convs(model)
    )
    assert "classifier.5" not in names and "aux_classifier.4" not in names


def test_harden_keeps_the_top_k_scores_and_masks_the_output() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16))
    acosp.apply(model, 0.5)
    conv = model[0]
    acosp.set_temperature(model, 1e-3)
    soft = acosp.channel_mask(conv).detach()
    assert acosp.harden(model) == 1 and acosp.is_hard(model)
    top = set(conv.acosp_score.topk(8).indices.tolist())
    assert set(conv.acosp_mask.nonzero().flatten().tolist()) == top
    assert set((soft > 0.5).nonzero().flatten().tolist()) == top
    x = torch.randn(2, 3, 5, 5)
    out = conv(x)
    assert torch.equal(out[:, conv.acosp_mask == 0], torch.zeros_like(out[:, conv.acosp_mask == 0]))
    assert acosp.harden(model) == 0  # already hard


def test_masked_model_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = acosp.apply(build_model("deeplabv3_mobilenetv2", num_classes=3), 0.75)
    acosp.harden(model)
    payload = {
        "model": "deeplabv3_mobilenetv2",
        "num_classes": 3,
        "config": {"acosp": {"sparsity": 0.75, "min_keep": 8}},
        "state_dict": model.state_dict(),
    }
    rebuilt = model_from_checkpoint(payload, "test").eval()
    x = torch.randn(1, 3, 40, 40)
    assert torch.equal(rebuilt(x)["out"], model.eval()(x)["out"])


def test_bad_sparsity_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="acosp.sparsity"):
        acosp.apply(nn.Conv2d(3, 4, 1), 1.0)
    with_crf = build_model("deeplabv3_mobilenetv2", num_classes=3, crf="ddd")
    with pytest.raises(ConfigError, match="model.crf"):
        acosp.apply(with_crf, 0.5)
    with pytest.raises(ConfigError, match="acosp.end"):
        load_config(None, ["acosp.sparsity=0.5", "acosp.start=5", "acosp.end=2"])


def test_schedule_from_config_in_epochs() -> None:
    cfg = load_config(None, ["acosp.sparsity=0.5", "acosp.unit=epoch", "acosp.end=3"])
    schedule = acosp_schedule(cfg, train_size=100, world_size=2)
    assert schedule is not None and schedule.iterations_per_epoch == 100 // (16 * 2)
    assert schedule.is_hard(3 * 3) and not schedule.is_hard(3 * 3 - 1)


def _run(root: Path, work: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={root}", f"train.work_dir={work}", *extra]


def test_resume_mid_pruning_continues_at_the_same_temperature(synthetic_root, tmp_path) -> None:
    steps = [
        "train.iterations=6",
        "train.val_interval=6",
        "acosp.sparsity=0.5",
        "acosp.end=4",
        "optim.warmup_iters=0",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *_run(synthetic_root, straight, *steps)]) == 0
    assert main(["train", *_run(synthetic_root, split, *steps), "--stop-at", "3"]) == 0
    run = next(p for p in split.iterdir() if p.is_dir())
    halfway = torch.load(run / "last.pt", weights_only=True)["state_dict"]
    tau_at_2 = acosp.temperature(2, 0, 4)
    assert halfway["backbone.conv1.acosp_tau"].item() == pytest.approx(tau_at_2)
    assert not halfway["backbone.conv1.acosp_hard"].item()
    assert main(["train", "--resume", str(run)]) == 0
    a = torch.load(next(p for p in straight.iterdir() if p.is_dir()) / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert b["state_dict"]["backbone.conv1.acosp_hard"].item()
    assert not torch.equal(
        halfway["backbone.conv1.acosp_score"], b["state_dict"]["backbone.conv1.acosp_score"]
    )


def test_coupled_scores_are_one_parameter_through_training_and_checkpoints():
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet18", 3, width_mult=0.25)
    acosp.apply(model, 0.5, min_keep=2, coupled_residual=True)
    layer2 = model.backbone.layer2
    writers = [layer2[0].downsample[0], layer2[0].conv2, layer2[1].conv2]
    assert all(c.acosp_score is writers[0].acosp_score for c in writers)
    assert layer2[0].conv1.acosp_score is not writers[0].acosp_score  # inside a block: its own
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # the shared score once
    model.train()(torch.randn(2, 3, 33, 33))["out"].square().mean().backward()
    optimizer.step()
    state = model.state_dict()
    assert all(f"backbone.layer2.{k}.acosp_score" in state for k in ("0.conv2", "1.conv2"))
    other = build_model("deeplabv3_resnet18", 3, width_mult=0.25)
    acosp.apply(other, 0.5, min_keep=2, coupled_residual=True)
    other.load_state_dict(state)
    assert other.backbone.layer2[1].conv2.acosp_score is other.backbone.layer2[0].conv2.acosp_score
    assert torch.equal(other.backbone.layer2[1].conv2.acosp_score, writers[0].acosp_score)
    acosp.harden(model)
    assert all(torch.equal(c.acosp_mask, writers[0].acosp_mask) for c in writers)


def test_coupled_residual_needs_a_traceable_model():
    model = build_model("deeplabv3_resnet18", 3, width_mult=0.25, norm="gn_ws")
    with pytest.raises(ConfigError, match="acosp.coupled_residual"):
        acosp.apply(model, 0.5, coupled_residual=True)
