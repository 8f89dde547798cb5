"""Knowledge distillation: the KD loss against its formula, and the frozen teacher."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanseg.checkpoint import save_checkpoint
from leanseg.config import Config, to_dict
from leanseg.data.cifar10 import CIFAR_MEAN, CIFAR_STD
from leanseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from leanseg.engine.losses import distillation_loss
from leanseg.engine.runtime import rng_state
from leanseg.engine.teacher import load_teacher, teacher_logits
from leanseg.errors import CheckpointError
from leanseg.models import build_model

OPTIONS = {"width_mult": 0.25, "channels": 16}


def kd_reference(student: torch.Tensor, teacher: torch.Tensor, t: float, reduction: str) -> float:
    """KL(teacher || student) * T^2, one pixel at a time in float64."""
    s, q = student.double().numpy() / t, teacher.double().numpy() / t
    b, c, h, w = s.shape
    total = 0.0
    for n, i, j in np.ndindex(b, h, w):
        ls = s[n, :, i, j] - s[n, :, i, j].max()
        ls = ls - math.log(np.exp(ls).sum())
        lq = q[n, :, i, j] - q[n, :, i, j].max()
        lq = lq - math.log(np.exp(lq).sum())
        total += sum(math.exp(lq[k]) * (lq[k] - ls[k]) for k in range(c))
    count = b * c * h * w if reduction == "mean" else b * h * w
    return total / count * t * t


@pytest.mark.parametrize("reduction", ["mean", "pixel"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_loss_formula(reduction: str, temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 4, 6, generator=gen) * 3
    teacher = torch.randn(2, 5, 4, 6, generator=gen) * 3
    got = distillation_loss(student, teacher, temperature=temperature, reduction=reduction)
    assert got.dtype == torch.float32
    expected = kd_reference(student, teacher, temperature, reduction)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_distillation_mean_is_fasterseg_kldiv_and_pixel_is_c_times() -> None:
    gen = torch.Generator().manual_seed(1)
    student, teacher = (
        torch.randn(2, 7, 5, 5, generator=gen),
        torch.randn(2, 7, 5, 5, generator=gen),
    )
    original = nn.KLDivLoss()(F.log_softmax(student, 1), F.softmax(teacher, 1))
    mean = distillation_loss(student, teacher)
    assert mean.item() == pytest.approx(original.item(), rel=1e-5)
    pixel = distillation_loss(student, teacher, reduction="pixel")
    assert pixel.item() == pytest.approx(7 * mean.item(), rel=1e-5)
    bf16 = distillation_loss(student.bfloat16(), teacher.bfloat16())
    assert bf16.dtype == torch.float32


def test_distillation_resizes_teacher_and_never_grads_it() -> None:
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(1, 3, 8, 8, generator=gen, requires_grad=True)
    teacher = torch.randn(1, 3, 4, 4, generator=gen, requires_grad=True)
    loss = distillation_loss(student, teacher, reduction="pixel")
    resized = F.interpolate(teacher.detach(), size=(8, 8), mode="bilinear", align_corners=False)
    assert loss.item() == pytest.approx(kd_reference(student.detach(), resized, 1.0, "pixel"))
    loss.backward()
    assert student.grad is not None and teacher.grad is None
    assert distillation_loss(student, student.detach()).item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="class count"):
        distillation_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="reduction"):
        distillation_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), reduction="sum")


# -- teacher ----------------------------------------------------------------------------------
def _save(path: Path, model: nn.Module, config: dict) -> Path:
    """A checkpoint with the keys of Trainer._payload."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    save_checkpoint(
        path,
        {
            "model": "deeplabv3plus_resnet18",
            "num_classes": 7,
            "model_options": OPTIONS,
            "class_names": [f"c{i}" for i in range(7)],
            "config": config,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
            "iteration": 3,
            "best_miou": 0.5,
            "rng": rng_state(),
        },
    )
    return path


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = build_model("deeplabv3plus_resnet18", 7, **OPTIONS)
    with torch.no_grad():  # non-trivial BN statistics, so a train-mode pass would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    config = to_dict(Config())
    return _save(tmp_path_factory.mktemp("teacher") / "best.pt", model, config), model


def _load(path: Path, **overrides) -> nn.Module:
    kwargs = dict(num_classes=7, mean=IMAGENET_MEAN, std=IMAGENET_STD, device="cpu")
    return load_teacher(path, **{**kwargs, **overrides})


def test_load_teacher_is_frozen_eval_and_exact(teacher_file, one_thread) -> None:
    path, original = teacher_file
    teacher = _load(path)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    for key, value in original.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value), key
    images = torch.randn(1, 3, 32, 32)
    original.eval()
    with torch.no_grad():
        assert torch.equal(teacher_logits(teacher, images), original(images)["out"])


def test_teacher_logits_no_grad_and_eval_after_parent_train(teacher_file, one_thread) -> None:
    teacher = _load(teacher_file[0])
    parent = nn.ModuleDict({"student": nn.Conv2d(3, 7, 1), "teacher": teacher})
    parent.train()
    assert teacher.training  # what teacher_logits has to undo
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    logits = teacher_logits(teacher, images)
    assert logits.shape == (2, 7, 32, 32) and not logits.requires_grad
    assert not teacher.training
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched


def test_load_teacher_wrong_class_count_is_one_line(teacher_file) -> None:
    path = teacher_file[0]
    with pytest.raises(CheckpointError) as err:
        _load(path, num_classes=19)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "7 classes" in message


def test_load_teacher_wrong_normalisation(teacher_file, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:  # student normalised like CIFAR-10
        _load(teacher_file[0], mean=CIFAR_MEAN, std=CIFAR_STD)
    assert "\n" not in str(err.value) and str(teacher_file[0]) in str(err.value)
    model = teacher_file[1]
    config = to_dict(Config())
    config["data"]["dataset"] = "cifar10"
    cifar = _save(tmp_path / "cifar.pt", model, config)
    with pytest.raises(CheckpointError, match="normalised"):
        _load(cifar)
    assert _load(cifar, mean=CIFAR_MEAN, std=CIFAR_STD) is not None
    config["data"].update(dataset="voc", mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    recorded = _save(tmp_path / "recorded.pt", model, config)
    with pytest.raises(CheckpointError, match="normalised"):
        _load(recorded)
    assert _load(recorded, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) is not None


def test_load_teacher_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        _load(tmp_path / "nope.pt")
