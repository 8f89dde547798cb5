"""train.precision / train.channels_last / train.compile: the choice per device kind (the
capability queries stubbed), old checkpoints' amp keys, bf16 + channels_last training with each
method, and compile against eager."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from leanseg.checkpoint import save_checkpoint
from leanseg.config import load_config, to_dict
from leanseg.engine import compile as compile_module
from leanseg.engine import precision
from leanseg.engine.compile import compile_or_eager
from leanseg.engine.dry_run import GeneratedDataset
from leanseg.engine.precision import resolve_compute
from leanseg.engine.trainer import Trainer
from leanseg.errors import ConfigError
from leanseg.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
TINY = ["model.options.width_mult=0.25", "model.options.channels=16"]
RUN = [
    "data.workers=0",
    "train.loggers=[]",
    "train.sample_images=0",
    "data.batch_size=2",
    "data.crop_size=32",
    "train.iterations=2",
    "train.val_interval=2",
]


@pytest.fixture
def cpu_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flag", lambda: "avx512_bf16")


@pytest.fixture
def cpu_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flag", lambda: None)


@pytest.fixture
def gpu(monkeypatch):
    """A stand-in CUDA device: ``gpu(bf16=...)`` sets what it supports."""

    def make(bf16: bool) -> None:
        monkeypatch.setattr(precision, "cuda_bf16", lambda device: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stub GPU")

    return make


# ------------------------------------------------------------------ the choice
def test_auto_on_a_cpu_with_native_bf16(cpu_bf16):
    compute = resolve_compute("auto", "auto", CPU)
    assert (compute.precision, compute.channels_last) == ("bf16", True)
    assert compute.autocast_dtype is torch.bfloat16
    assert compute.describe() == "bf16 autocast + channels_last (auto: CPU with avx512_bf16)"


def test_auto_on_a_cpu_without_bf16_is_fp32_contiguous(cpu_fp32):
    compute = resolve_compute("auto", "auto", CPU)
    assert (compute.precision, compute.channels_last, compute.autocast_dtype) == (
        "fp32",
        False,
        None,
    )
    assert "no native bf16" in compute.describe()


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda(gpu, bf16, expected):
    gpu(bf16)
    compute = resolve_compute("auto", "auto", CUDA)
    assert (compute.precision, compute.channels_last) == (expected, True)
    assert "Stub GPU" in compute.reason


def test_group_norm_models_stay_contiguous_on_the_cpu(cpu_bf16, gpu):
    model = build_model("deeplabv3_resnet18", 3, norm="gn_ws", width_mult=0.25)
    cpu = resolve_compute("auto", "auto", CPU, model)
    assert (cpu.precision, cpu.channels_last) == ("bf16", False)
    gpu(True)
    assert resolve_compute("auto", "auto", CUDA, model).channels_last is True


def test_explicit_settings_win(cpu_bf16, cpu_fp32):
    assert resolve_compute("fp32", "auto", CPU).channels_last is False
    assert resolve_compute("bf16", "auto", CPU).channels_last is True  # even without native bf16
    assert resolve_compute("bf16", "false", CPU).channels_last is False
    assert resolve_compute("fp32", "true", CPU).channels_last is True
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_compute("fp16", "auto", CPU)


@pytest.mark.parametrize(
    "value, expected", [("true", "true"), ("True", "true"), ("false", "false")]
)
def test_channels_last_accepts_yaml_booleans(value, expected, tmp_path):
    assert load_config(None, [f"train.channels_last={value}"]).train.channels_last == expected
    (tmp_path / "c.yaml").write_text(f"train:\n  channels_last: {value.lower()}\n")
    assert load_config(tmp_path / "c.yaml").train.channels_last == expected


@pytest.mark.parametrize(
    "train, expected",
    [
        ({"amp": False, "amp_dtype": "auto"}, "fp32"),
        ({"amp": True, "amp_dtype": "auto"}, "auto"),
        ({"amp": True, "amp_dtype": "bf16"}, "bf16"),
    ],
)
def test_an_older_checkpoints_amp_keys_become_precision(train, expected):
    saved = to_dict(load_config(None, []))
    del saved["train"]["precision"]
    saved["train"].update(train)
    assert load_config(None, [], base=saved).train.precision == expected


# ------------------------------------------------------------------ training under bf16 + CL
def _datasets() -> tuple[GeneratedDataset, GeneratedDataset]:
    shape = dict(size=(32, 32), num_classes=7)
    return GeneratedDataset(4, **shape), GeneratedDataset(2, **shape)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A random checkpoint of the default model (7 classes) to distill from."""
    cfg = load_config(None, [*RUN, *TINY])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, 7, **dict(cfg.model.options))
    path = tmp_path_factory.mktemp("teacher") / "best.pt"
    payload = {"model": cfg.model.name, "num_classes": 7, "model_options": cfg.model.options}
    save_checkpoint(path, {**payload, "config": to_dict(cfg), "state_dict": model.state_dict()})
    return path


@pytest.mark.parametrize(
    "method",
    [
        [],
        ["backrazor.ratio=0.9", "backrazor.scope=all"],
        ["acosp.sparsity=0.5"],
        ["model.crf=ddd"],
        ["distill.teacher={teacher}"],
        ["model.name=fasterseg_student", "model.options.width_mult=0.25"],
    ],
    ids=["dense", "backrazor", "acosp", "ddd", "distill", "fasterseg"],
)
def test_bf16_channels_last_training_with_each_method(method, teacher, tmp_path):
    overrides = [m.format(teacher=teacher) for m in method]
    if not any(m.startswith("model.name=") for m in overrides):
        overrides = [*TINY, *overrides]
    cfg = load_config(None, [*RUN, *overrides, "train.precision=bf16", "train.channels_last=true"])
    trainer = Trainer(cfg, tmp_path, progress=False, datasets=_datasets())
    assert (trainer.compute.precision, trainer.compute.channels_last) == ("bf16", True)
    weight = next(p for p in trainer.model.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.fit()
    state = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert all(v.dtype == before[k].dtype for k, v in state.items())  # weights stay fp32
    assert any(not torch.equal(v, before[k]) for k, v in state.items())  # it trained
    assert metrics is not None and 0 <= metrics.miou <= 1


def test_the_choice_is_printed_and_recorded(tmp_path, capsys):
    from leanseg.cli import main

    work = tmp_path / "runs"
    argv = ["train", *RUN, *TINY, f"train.work_dir={work}", f"data.root={tmp_path / 'd'}"]
    argv += ["data.synthetic_train=4", "data.synthetic_val=2", "train.precision=fp32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "compute: fp32 (train.precision)" in out
    (run,) = [p for p in work.iterdir() if p.is_dir()]
    recorded = json.loads((run / "compute.json").read_text())
    assert recorded == {
        "precision": "fp32",
        "channels_last": False,
        "reason": "train.precision",
        "device": "cpu",
    }


# ------------------------------------------------------------------ compile
def test_compile_failure_warns_once_and_runs_eager(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("backend compiler failed\nlong C++ log")

    monkeypatch.setattr(compile_module.torch, "compile", lambda module: broken)
    said: list[str] = []
    model = nn.Conv2d(3, 4, 3)
    wrapped = compile_or_eager(model, say=said.append)
    x = torch.randn(1, 3, 8, 8)
    for _ in range(2):
        torch.testing.assert_close(wrapped(x), model(x))
    assert len(calls) == 1 and len(said) == 1
    assert "torch.compile failed (RuntimeError: backend compiler failed)" in said[0]
    assert "\n" not in said[0]
    assert list(wrapped.state_dict()) == ["module.weight", "module.bias"]


def test_compiled_training_step_equals_eager(tmp_path):
    """One SGD step of a small conv net, compiled (inductor where it works) against eager."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    eager.append(nn.Conv2d(8, 5, 1))
    twin = copy.deepcopy(eager)
    said: list[str] = []
    compiled = compile_or_eager(twin, say=said.append)
    x = torch.randn(2, 3, 16, 16)
    y = torch.randint(0, 5, (2, 16, 16))
    for net, params in ((eager, eager.parameters()), (compiled, twin.parameters())):
        optimizer = torch.optim.SGD(params, lr=0.1)
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
    if said:
        pytest.skip(f"torch.compile is not available here: {said[0]}")
    for a, b in zip(eager.state_dict().values(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
