"""FasterSeg training pieces in the trainer (issue 12 items 4-6): the loss and distill config,
OHEM + weighted outputs, KD from a frozen teacher (FasterSeg and other compositions), exact
resume of a distilled run, self-contained FasterSeg checkpoints, the exponential schedule and
the dry run's stand-in teacher."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from leanseg.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from leanseg.cli import main
from leanseg.config import load_config
from leanseg.data.synthetic import ensure_synthetic
from leanseg.engine import trainer as trainer_module
from leanseg.engine.dry_run import GeneratedDataset
from leanseg.engine.objective import PixelCriterion, loss_criterion, loss_weights
from leanseg.engine.optim import lr_factor, set_lr
from leanseg.engine.trainer import Trainer
from leanseg.errors import ConfigError
from leanseg.models.fasterseg import packaged_spec, save_spec
from leanseg.models.fasterseg.spec import spec_to_dict

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.options.width_mult=0.25", "model.options.channels=16"]  # DeepLab widths
RUN = ["data.workers=0", "train.loggers=[]", "train.sample_images=0", "data.batch_size=2"]
FASTERSEG_LOSS = [
    "model.aux=true",
    "model.options.width_mult=0.25",
    "loss.name=ohem",
    "loss.ohem_min_kept=500",  # below the 2 x 32 x 32 valid pixels: the mining branch runs
    "loss.weights={out: 1.0, aux16: 0.2, aux32: 0.2}",
]


def _config(*overrides: str):
    return load_config(None, [*RUN, "data.crop_size=32", *overrides])


def _datasets() -> tuple[GeneratedDataset, GeneratedDataset]:
    shape = dict(size=(32, 32), num_classes=7)
    return GeneratedDataset(4, **shape), GeneratedDataset(2, **shape)


def _train(cfg, run_dir: Path, **kwargs) -> Trainer:
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir, progress=False, datasets=_datasets(), **kwargs)
    trainer.fit()
    return trainer


class TeacherProbe:
    """Records, at every teacher forward, its mode and whether autograd was on."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.calls: list[tuple[bool, bool]] = []
        teacher.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.calls.append((module.training, torch.is_grad_enabled()))


def _assert_kd_run(trainer: Trainer, teacher_ckpt: Path, probe: TeacherProbe, steps: int) -> None:
    """The teacher ran once per step, frozen and in eval mode, and is in no student state."""
    teacher = trainer.teacher
    assert probe.calls == [(False, False)] * steps
    assert not teacher.training and all(m.training is False for m in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    saved = load_checkpoint(teacher_ckpt)["state_dict"]
    for key, value in teacher.state_dict().items():  # BN statistics untouched as well
        assert torch.equal(value, saved[key]), key
    teacher_ids = {id(p) for p in teacher.parameters()}
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert not teacher_ids & {id(p) for p in optimized}
    last = load_checkpoint(trainer.run_dir / "last.pt")
    assert set(last["state_dict"]) == set(trainer.model.state_dict())
    assert not any("teacher" in key for key in last)


@pytest.fixture(scope="module")
def dense_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DeepLabV3+-R18 (tiny) checkpoint of one training iteration on 7 classes."""
    run = tmp_path_factory.mktemp("dense_teacher")
    _train(_config(*TINY, "train.iterations=1"), run)
    return run / "last.pt"


# ------------------------------------------------------------------ config and schedule


def test_loss_and_distill_defaults_are_todays_training():
    cfg = load_config()
    assert (cfg.loss.name, cfg.loss.ohem_thresh, cfg.loss.ohem_min_kept) == ("ce", 0.7, 100000)
    assert cfg.loss.weights is None and cfg.distill.teacher is None
    assert (cfg.distill.weight, cfg.distill.temperature, cfg.distill.reduction) == (1, 1, "mean")
    assert (cfg.optim.gamma, cfg.optim.decay_every) == (0.992, 1000)
    assert loss_weights(cfg) == {"out": 1.0, "aux": cfg.model.aux_weight}
    assert loss_criterion(cfg) == PixelCriterion(ohem=None, align_corners=False)
    ohem = loss_criterion(load_config(None, ["loss.name=ohem", "loss.ohem_min_kept=7"]), True)
    assert ohem == PixelCriterion(ohem=(0.7, 7), align_corners=True, name="ohem")
    assert cfg.loss.fused_upsampling is True


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loss.name=lovasz", "'loss.name': 'lovasz' is not one of ['ce', 'ohem', 'dice'"),
        ("loss.ohem_thresh=1.5", "'loss.ohem_thresh': must be in [0, 1]"),
        ("loss.ohem_min_kept=-1", "'loss.ohem_min_kept': must be >= 0"),
        ("loss.weights={out: 1.0, aux: -0.2}", "'loss.weights.aux': must be >= 0"),
        ("loss.weights={}", "'loss.weights': empty"),
        ("distill.weight=0", "'distill.weight': must be > 0"),
        ("distill.temperature=0", "'distill.temperature': must be > 0"),
        ("distill.reduction=sum", "'distill.reduction': 'sum' is not one of"),
        ("distill.teacher_model=unet", "'distill.teacher_model': unknown model 'unet'"),
        ("optim.schedule=step", "'optim.schedule': 'step' is not one of"),
        ("optim.gamma=0", "'optim.gamma': must be in (0, 1]"),
        ("optim.gamma=1.01", "'optim.gamma': must be in (0, 1]"),
        ("optim.decay_every=0", "'optim.decay_every': must be > 0"),
    ],
)
def test_bad_loss_distill_and_schedule_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_exponential_schedule_factor_table():
    factor = functools.partial(lr_factor, total=600_000, schedule="exponential")
    table = {0: 1.0, 999: 1.0, 1000: 0.992, 1999: 0.992, 2000: 0.992**2, 599_999: 0.992**599}
    assert {i: factor(i) for i in table} == table  # piecewise constant: epoch boundaries only
    warm = functools.partial(factor, warmup_iters=4, gamma=0.5, decay_every=3)
    assert [warm(i) for i in range(10)] == [0.25, 0.5, 0.75, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]
    optimizer = torch.optim.SGD([{"params": [torch.zeros(1)], "initial_lr": 0.01}], lr=0.01)
    assert set_lr(optimizer, factor(599_999), 0.0) == pytest.approx(0.01 * 0.992**599)
    assert set_lr(optimizer, factor(599_999), 1e-4) == 1e-4  # min_lr floors it
    cfg = _config(*TINY, "optim.schedule=exponential", "optim.gamma=0.5", "optim.decay_every=1")
    cfg.optim.warmup_iters, cfg.optim.min_lr, cfg.train.iterations = 0, 0.0, 3
    trainer = Trainer(cfg, None, progress=False, datasets=_datasets())
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(7, (2, 32, 32))
    for _ in range(3):
        trainer.train_step(images, masks)
        trainer.iteration += 1
    assert trainer.optimizer.param_groups[-1]["lr"] == cfg.optim.lr * 0.25  # iteration 2


# ------------------------------------------------------------------ loss weights


def test_output_without_a_weight_fails_before_anything_is_read_or_written(tmp_path, capsys):
    cfg = _config("model.name=fasterseg_student", "model.aux=true", "model.options.width_mult=0.25")
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, None, progress=False, datasets=_datasets())
    message = str(info.value)
    assert "config key 'loss.weights'" in message and "['out', 'aux16', 'aux32']" in message
    work, cache = tmp_path / "work", tmp_path / "cache"
    args = ["model.name=fasterseg_student", "model.aux=true", "model.options.width_mult=0.25"]
    assert main(["train", *args, f"train.work_dir={work}", f"data.root={cache}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss.weights" in err[0]
    assert not cache.exists() and not work.exists()  # no data generated, no run directory


# ------------------------------------------------------------------ FasterSeg teacher -> student


def test_fasterseg_teacher_distils_student_with_ohem(tmp_path, monkeypatch):
    """The recipes' path at tiny widths: the teacher from a spec file (its checkpoint must not
    need the file), then the student with OHEM, three weighted outputs and KD."""
    arch = tmp_path / "teacher.json"
    save_spec(packaged_spec("teacher"), arch)
    teacher_run = tmp_path / "teacher"
    teacher_cfg = _config(
        "model.name=fasterseg", f"model.options.arch={arch}", *FASTERSEG_LOSS, "train.iterations=1"
    )
    trained = _train(teacher_cfg, teacher_run)
    payload = load_checkpoint(teacher_run / "last.pt")
    assert payload["model_options"]["arch"] == spec_to_dict(packaged_spec("teacher"))
    assert payload["config"]["model"]["options"]["arch"] == str(arch)  # the config as given
    arch.unlink()  # self-contained: rebuilt from the recorded spec
    rebuilt = model_from_checkpoint(payload, "teacher").eval()
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(image)["out"], trained.model.eval()(image)["out"])

    kd_calls = []

    def recording(student, teacher, **kwargs):
        kd_calls.append((tuple(student.shape), tuple(teacher.shape), kwargs))
        return distillation_loss(student, teacher, **kwargs)

    distillation_loss = trainer_module.distillation_loss
    monkeypatch.setattr(trainer_module, "distillation_loss", recording)
    student_cfg = _config(
        "model.name=fasterseg_student",
        *FASTERSEG_LOSS,
        f"distill.teacher={teacher_run / 'last.pt'}",
        "distill.reduction=pixel",
        "train.iterations=2",
        "train.val_interval=1",  # the student switches eval / train between the steps
    )
    (tmp_path / "student").mkdir()
    student = Trainer(student_cfg, tmp_path / "student", progress=False, datasets=_datasets())
    probe = TeacherProbe(student.teacher)
    student.fit()
    assert (
        kd_calls
        == [((2, 7, 32, 32), (2, 7, 32, 32), {"temperature": 1.0, "reduction": "pixel"})] * 2
    )
    _assert_kd_run(student, teacher_run / "last.pt", probe, steps=2)


# ------------------------------------------------------------------ compositions


@pytest.mark.parametrize("method", ["acosp.sparsity=0.5", "backrazor.ratio=0.9"])
def test_compressed_student_distilled_from_its_dense_parent(dense_teacher, tmp_path, method):
    cfg = _config(*TINY, method, f"distill.teacher={dense_teacher}", "train.iterations=2")
    student = Trainer(cfg, tmp_path, progress=False, datasets=_datasets())
    probe = TeacherProbe(student.teacher)
    student.fit()
    _assert_kd_run(student, dense_teacher, probe, steps=2)
    assert all(torch.isfinite(v).all() for v in student.model.state_dict().values())


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    ensure_synthetic(path, num_train=8, num_val=2)
    return path


def _cli(cache: Path, work: Path, *extra: str) -> list[str]:
    return [
        *RUN,
        "data.crop_size=48",
        "data.synthetic_train=8",
        "data.synthetic_val=2",
        f"data.root={cache}",
        f"train.work_dir={work}",
        *extra,
    ]


def _only_run(work: Path) -> Path:
    (run,) = [p for p in work.iterdir() if p.is_dir()]
    return run


def test_distilled_resume_is_exact_r101_teacher_mobilenetv2_student(cache, tmp_path):
    teacher = ["model.name=deeplabv3_resnet101", *TINY, "train.iterations=1"]
    assert main(["train", *_cli(cache, tmp_path / "teacher", *teacher)]) == 0
    teacher_ckpt = _only_run(tmp_path / "teacher") / "last.pt"
    student = [
        "model.name=deeplabv3_mobilenetv2",
        *TINY,
        f"distill.teacher={teacher_ckpt}",
        "distill.temperature=2.0",
        "train.iterations=4",
        "train.val_interval=2",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *_cli(cache, straight, *student)]) == 0
    assert main(["train", *_cli(cache, split, *student), "--stop-at", "2"]) == 0
    halfway = load_checkpoint(_only_run(split) / "last.pt")
    assert halfway["iteration"] == 2
    assert main(["train", "--resume", str(_only_run(split))]) == 0
    a = load_checkpoint(_only_run(straight) / "last.pt")
    b = load_checkpoint(_only_run(split) / "last.pt")
    assert b["iteration"] == 4 and set(a["state_dict"]) == set(b["state_dict"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert any(not torch.equal(halfway["state_dict"][k], v) for k, v in a["state_dict"].items())


# ------------------------------------------------------------------ teacher errors, dry run


def _edited(source: Path, dest: Path, edit) -> Path:
    payload = load_checkpoint(source)
    edit(payload)
    save_checkpoint(dest, {k: v for k, v in payload.items() if k not in ("format", "version")})
    return dest


def test_bad_teacher_is_one_line_exit_2_before_any_work(dense_teacher, tmp_path, capsys):
    def classes(p):
        p["num_classes"] = 5

    def normalisation(p):
        p["config"]["data"]["dataset"] = "cifar10"

    cases = {
        _edited(dense_teacher, tmp_path / "classes.pt", classes): "predicts 5 classes",
        _edited(dense_teacher, tmp_path / "norm.pt", normalisation): "normalised with mean",
        tmp_path / "missing.pt": "config key 'distill.teacher'",
    }
    work, cache = tmp_path / "work", tmp_path / "cache"
    for path, expected in cases.items():
        args = [*TINY, f"distill.teacher={path}", f"train.work_dir={work}", f"data.root={cache}"]
        assert main(["train", *RUN, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert not cache.exists() and not work.exists()


def test_dry_run_stands_in_a_teacher_only_when_told(dense_teacher, tmp_path, capsys):
    base = ["train", "--dry-run", *TINY, "data.crop_size=32"]
    missing = f"distill.teacher={tmp_path / 'not_yet.pt'}"
    assert main([*base, missing, "distill.teacher_model=deeplabv3plus_resnet18"]) == 0
    out = capsys.readouterr().out
    assert "randomly initialised deeplabv3plus_resnet18 (distill.teacher_model) stood in" in out
    assert main([*base, missing]) == 2
    assert "config key 'distill.teacher'" in capsys.readouterr().err
    assert main([*base, f"distill.teacher={dense_teacher}"]) == 0
    assert f"distill: teacher {dense_teacher} loaded and checked" in capsys.readouterr().out
