"""Training-loop options: gradient clipping, accumulation, weight EMA and the csv / tensorboard
loggers, each against a hand-computed reference, and exact resume with them."""

from __future__ import annotations

import copy
import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from leanseg.checkpoint import load_checkpoint, model_from_checkpoint
from leanseg.cli import main
from leanseg.config import load_config
from leanseg.data.build import train_loader
from leanseg.data.synthetic import ensure_synthetic
from leanseg.engine import trainer as trainer_module
from leanseg.engine.losses import segmentation_loss
from leanseg.engine.optim import lr_factor
from leanseg.engine.run_log import LoggerMissing, check_loggers, truncate_csv
from leanseg.engine.trainer import Trainer
from leanseg.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "model.options.channels=8",
    "model.options.width_mult=0.25",
    "data.crop_size=32",
    "data.batch_size=2",
    "data.synthetic_train=8",
    "data.synthetic_val=2",
    "data.workers=0",
    "train.loggers=[]",
    "train.log_interval=1",
    "train.sample_images=0",
    "train.precision=fp32",
    "train.channels_last=false",
    "train.device=cpu",
]
# plain SGD at a constant LR: a step is exactly ``param - lr * grad``
PLAIN_SGD = [
    "optim.name=sgd",
    "optim.momentum=0",
    "optim.weight_decay=0",
    "optim.warmup_iters=0",
    "optim.schedule=constant",
    "optim.lr=0.05",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    ensure_synthetic(path, num_train=8, num_val=2)
    return path


def overrides(cache: Path, work: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={cache}", f"train.work_dir={work}", *extra]


def make_trainer(cache: Path, work: Path, *extra: str) -> Trainer:
    return Trainer(load_config(None, overrides(cache, work, *extra)), work, progress=False)


def batches(trainer: Trainer, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` batches of the run's training loader (what fit() reads)."""
    cfg = trainer.cfg
    loader = train_loader(
        trainer.train_set, cfg.data, seed=cfg.train.seed, start_iteration=0, pin_memory=False
    )
    stream = iter(loader)
    return [next(stream) for _ in range(count)]


def loss_of(trainer: Trainer, model: torch.nn.Module, images, masks) -> torch.Tensor:
    return segmentation_loss(
        model(images),
        masks,
        ignore_index=trainer.cfg.data.ignore_index,
        weights=trainer.loss_weights,
        criterion=trainer.criterion,
    )


def sgd_step(model: torch.nn.Module, grads: list[torch.Tensor], lr: float) -> None:
    with torch.no_grad():
        for param, grad in zip(model.parameters(), grads, strict=True):
            param.sub_(lr * grad)


def assert_weights_close(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-6) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if x.is_floating_point():
            assert torch.allclose(x, y, atol=atol, rtol=1e-5), name
        else:
            assert torch.equal(x, y), name


# ------------------------------------------------------------------ clipping


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "loss-scaled"])
def test_clipping_matches_a_hand_clipped_sgd_step(cache, tmp_path, scaled):
    max_norm = 0.05
    trainer = make_trainer(cache, tmp_path, *PLAIN_SGD, f"optim.clip_grad_norm={max_norm}")
    if scaled:  # as with fp16: the clip must see the unscaled gradient
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    reference = copy.deepcopy(trainer.model)
    images, masks = batches(trainer, 1)[0]
    params = list(reference.parameters())
    rng = torch.get_rng_state()  # the same dropout masks in both forwards
    grads = torch.autograd.grad(loss_of(trainer, reference, images, masks), params)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > 4 * max_norm  # the clip is active
    sgd_step(reference, [g * (max_norm / (norm + 1e-6)) for g in grads], 0.05)

    unclipped = copy.deepcopy(trainer.model)
    torch.set_rng_state(rng)
    trainer.train_step(images, masks)
    assert_weights_close(trainer.model, reference)
    # the unclipped step lands elsewhere, so the comparison above can fail
    sgd_step(unclipped, list(grads), 0.05)
    moved = [not torch.allclose(p, q) for p, q in zip(unclipped.parameters(), params, strict=True)]
    assert any(moved)


# ------------------------------------------------------------------ accumulation


def test_accumulation_is_one_step_on_the_mean_gradient(cache, tmp_path):
    k, steps = 3, 2
    extra = [*PLAIN_SGD, "optim.schedule=poly", f"train.accumulate={k}"]
    trainer = make_trainer(cache, tmp_path, *extra, f"train.iterations={steps}")
    assert trainer.images_per_iteration == 2 * k
    reference = copy.deepcopy(trainer.model)
    micro = batches(trainer, k * steps)  # consecutive micro-batches of data.batch_size
    rng = torch.get_rng_state()  # the same dropout masks in both runs
    losses = []
    for step in range(steps):
        lr = 0.05 * lr_factor(step, steps, schedule="poly", power=0.9)  # per optimizer step
        params = list(reference.parameters())
        mean = [torch.zeros_like(p) for p in params]
        step_loss = 0.0
        for images, masks in micro[step * k : (step + 1) * k]:
            loss = loss_of(trainer, reference, images, masks)
            for total, grad in zip(mean, torch.autograd.grad(loss, params), strict=True):
                total.add_(grad / k)
            step_loss += loss.item() / k
        sgd_step(reference, mean, lr)
        losses.append(step_loss)

    torch.set_rng_state(rng)
    trainer.fit()
    assert trainer.iteration == steps
    assert_weights_close(trainer.model, reference, atol=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in rows if r["kind"] == "train"]
    assert logged == pytest.approx(losses, rel=1e-5)


def test_a_non_finite_micro_batch_skips_the_whole_step(cache, tmp_path, monkeypatch):
    trainer = make_trainer(cache, tmp_path, "train.accumulate=2", "train.on_nonfinite=skip")
    before = copy.deepcopy(trainer.model.state_dict())
    (a, ma), (b, mb) = batches(trainer, 2)
    calls = []
    real = trainer_module.segmentation_loss

    def first_is_nan(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(trainer_module, "segmentation_loss", first_is_nan)
    assert torch.isnan(torch.tensor(trainer.train_step([a, b], [ma, mb])))
    for key, value in trainer.model.state_dict().items():  # weights and BN statistics
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in trainer.model.parameters())
    assert len(calls) == 1  # the rest of the step is not computed


# ------------------------------------------------------------------ EMA


def test_ema_follows_the_reference_recursion(cache, tmp_path):
    decay = 0.8
    trainer = make_trainer(cache, tmp_path, f"train.ema={decay}", "optim.lr=0.02")
    expected = {k: v.clone() for k, v in trainer.model.named_parameters()}
    for images, masks in batches(trainer, 3):
        trainer.train_step(images, masks)
        for name, param in trainer.model.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * param.detach()
    ema = dict(trainer.ema.module.named_parameters())
    for name, value in expected.items():
        assert torch.allclose(ema[name], value, atol=1e-7, rtol=1e-6), name
        assert not ema[name].requires_grad
    raw = dict(trainer.model.named_parameters())
    assert any(not torch.allclose(ema[n], raw[n]) for n in raw)  # an average, not a copy
    for ours, theirs in zip(trainer.ema.module.buffers(), trainer.model.buffers(), strict=True):
        assert torch.equal(ours, theirs)  # BN running statistics are copied


def test_checkpoints_hold_the_ema_and_eval_uses_it(cache, tmp_path, monkeypatch, capsys):
    evaluated = []
    real = trainer_module.evaluate

    def spy(model, *args, **kwargs):
        evaluated.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", spy)
    extra = ["train.ema=0.5", "train.iterations=2", "train.val_interval=2", "optim.lr=0.02"]
    trainer = make_trainer(cache, tmp_path, *extra)
    trainer.fit()
    assert evaluated == [trainer.ema.module]
    last = load_checkpoint(tmp_path / "last.pt")
    best = load_checkpoint(tmp_path / "best.pt")
    ema, raw = trainer.ema.module.state_dict(), trainer.model.state_dict()
    for key in raw:
        assert torch.equal(last["state_dict"][key], ema[key]), key
        assert torch.equal(best["state_dict"][key], ema[key]), key
        assert torch.equal(last["train_state_dict"][key], raw[key]), key
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    rebuilt = model_from_checkpoint(best, "best.pt")  # what eval / predict / export build
    for key, value in rebuilt.state_dict().items():
        assert torch.equal(value, ema[key]), key

    out = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "best.pt"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())  # eval of best.pt sees what validation saw
    assert report["confusion_matrix"] == trainer.confusion.matrix.tolist()


# ------------------------------------------------------------------ exact resume, csv


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def only_run(work: Path) -> Path:
    (run,) = [p for p in work.iterdir() if p.is_dir()]
    return run


def test_resume_is_exact_with_accumulation_and_ema_and_csv_rows_appear_once(cache, tmp_path):
    steps = [
        "train.iterations=4",
        "train.val_interval=2",
        "train.accumulate=2",
        "train.ema=0.7",
        "train.loggers=[csv]",
        "optim.lr=0.02",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *overrides(cache, straight, *steps)]) == 0
    assert main(["train", *overrides(cache, split, *steps), "--stop-at", "3"]) == 0
    run = only_run(split)
    assert [r[0] for r in read_csv(run / "metrics_train.csv")[1:]] == ["1", "2", "3"]
    # resume from best.pt (iteration 2): iteration 3 is replayed and must be logged once
    assert load_checkpoint(run / "best.pt")["iteration"] == 2
    assert main(["train", "--resume", str(run / "best.pt")]) == 0

    a = torch.load(only_run(straight) / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    assert b["iteration"] == 4 and b["micro_batches"] == a["micro_batches"] == 8
    for part in ("state_dict", "train_state_dict"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)

    ours, theirs = (
        read_csv(run / "metrics_train.csv"),
        read_csv(only_run(straight) / "metrics_train.csv"),
    )
    assert ours[0] == ["iteration", "loss", "lr", "time"]
    assert [r[:3] for r in ours] == [r[:3] for r in theirs]  # time differs
    assert [r[0] for r in ours[1:]] == ["1", "2", "3", "4"]
    val = read_csv(run / "metrics_val.csv")
    assert val[0] == ["iteration", "mIoU", "mAcc", "allAcc"]
    assert [r[0] for r in val[1:]] == ["2", "4"]
    assert not (run / "tensorboard").exists()


def test_truncate_csv_drops_later_and_partial_rows(tmp_path):
    path = tmp_path / "metrics_train.csv"
    path.write_text("iteration,loss\n1,0.5\n2,0.4\n3,0.3\n4,0.")
    assert truncate_csv(path, 2) == 2
    assert path.read_text() == "iteration,loss\n1,0.5\n2,0.4\n"


# ------------------------------------------------------------------ loggers


def test_missing_tensorboard_is_one_error_line_before_any_work(
    cache, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    with pytest.raises(LoggerMissing, match="pip install 'leanseg\\[tensorboard\\]'"):
        check_loggers(["tensorboard"])
    assert check_loggers(["csv"]) == ["csv"]  # without tensorboard in the list: no import
    work = tmp_path / "runs"
    args = overrides(cache, work, "train.loggers=[csv,tensorboard]")
    capsys.readouterr()
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("leanseg: error: train.loggers: tensorboard is not installed"), err
    assert not work.exists() or not any(work.iterdir())  # nothing was written


def test_old_tensorboard_key_and_unknown_loggers(tmp_path):
    assert check_loggers(["csv", "tensorboard", "csv"]) == ["csv", "tensorboard"]
    assert load_config(None).train.loggers == ["csv"]  # tensorboard is an extra: opt in
    old = load_config(None, base={"train": {"tensorboard": False, "iterations": 3}})
    assert old.train.loggers == [] and old.train.iterations == 3
    old_run = tmp_path / "config.yaml"  # a run directory of an older leanseg, resumed
    old_run.write_text("train:\n  tensorboard: true\n")
    assert load_config(old_run).train.loggers == ["csv", "tensorboard"]
    with pytest.raises(ConfigError, match="'train.tensorboard' is now train.loggers"):
        load_config(None, ["train.tensorboard=false"])
    with pytest.raises(ConfigError, match="'train.loggers': 'wandb' is not one of"):
        load_config(None, ["train.loggers=[csv,wandb]"])
