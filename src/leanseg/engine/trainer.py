"""The iteration-based training loop: LR schedule, weighted (OHEM) loss with optional KD from a
frozen teacher, validation, best/last checkpoints, exact resume.

``train_step`` calls the module-level name ``segmentation_loss`` at each step (tests/fault_inject.py
replaces it to inject faults).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from leanseg.checkpoint import (
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    self_contained_options,
)
from leanseg.config import Config, inference_options, to_dict
from leanseg.data.build import build_datasets, dataset_num_classes, train_loader, val_loader
from leanseg.data.normalization import data_normalization
from leanseg.engine.compile import compile_or_eager
from leanseg.engine.distributed import any_rank, barrier, current, process_device, wrap_model
from leanseg.engine.ema import ModelEma
from leanseg.engine.evaluate import NonFiniteOutputError, evaluate
from leanseg.engine.losses import distillation_loss, segmentation_loss
from leanseg.engine.metrics import ConfusionMatrix, SegMetrics
from leanseg.engine.objective import (
    check_loss_weights,
    loss_criterion,
    loss_upsamples,
    loss_weights,
    training_outputs,
)
from leanseg.engine.optim import build_optimizer, lr_factor, set_lr
from leanseg.engine.precision import resolve_compute
from leanseg.engine.progress_log import PlainProgress, bar_wanted
from leanseg.engine.run_facts import write_samples
from leanseg.engine.run_log import RunLog, check_loggers, open_run_log
from leanseg.engine.runtime import (
    rng_state,
    seed_everything,
    select_device,
    set_rng_state,
)
from leanseg.engine.stop_signal import StopOnSignal
from leanseg.engine.teacher import configured_teacher, freeze, teacher_logits
from leanseg.errors import DataError, LeansegError
from leanseg.methods import acosp, backrazor
from leanseg.models import build_model
from leanseg.models import model_options as accepted_options
from leanseg.models.base import model_outputs, set_training_logits_upsampled
from leanseg.models.pretrained import load_pretrained
from leanseg.viz import prediction_panels


def model_options(cfg: Config) -> dict[str, Any]:
    """Keyword options of the model builder, as recorded in checkpoints.

    ``model.output_stride`` and ``model.aux`` apply to the models that have them; ``model.crf``
    (with ``crf_iters`` / ``crf_gamma``) is passed when set, and is a ConfigError for a model
    without a CRF head. Options naming a file hold its content instead (a FasterSeg ``arch``
    spec path: the spec dict), so that a checkpoint rebuilds its model on its own.
    """
    options = dict(cfg.model.options)
    accepted = accepted_options(cfg.model.name)
    if "output_stride" in accepted:
        options.setdefault("output_stride", cfg.model.output_stride)
    if "aux" in accepted:
        options.setdefault("aux", cfg.model.aux)
    if cfg.model.crf is not None:
        if "crf" not in accepted:
            from leanseg.errors import ConfigError

            raise ConfigError(
                f"config key 'model.crf': model {cfg.model.name!r} has no CRF head; use a "
                "deeplabv3 / deeplabv3plus model or set model.crf=null"
            )
        options.setdefault("crf", cfg.model.crf)
        options.setdefault("crf_iters", cfg.model.crf_iters)
        options.setdefault("crf_gamma", cfg.model.crf_gamma)
    return self_contained_options(cfg.model.name, options)


def acosp_schedule(cfg: Config, train_size: int, world_size: int) -> acosp.MaskSchedule | None:
    """The config's ACoSP mask schedule (None when ACoSP is off)."""
    if cfg.acosp.sparsity is None:
        return None
    per_epoch = max(train_size // (cfg.data.batch_size * world_size * cfg.train.accumulate), 1)
    total = (
        cfg.train.iterations
        if cfg.acosp.unit == "iteration"
        else -(-cfg.train.iterations // per_epoch)
    )
    end = cfg.acosp.end if cfg.acosp.end is not None else total
    return acosp.MaskSchedule(
        start=cfg.acosp.start,
        end=end,
        unit=cfg.acosp.unit,
        tau0=cfg.acosp.tau0,
        tau_final=cfg.acosp.tau_final,
        iterations_per_epoch=per_epoch,
    )


class TrainingDiverged(LeansegError):
    """The loss (or a gradient) became NaN or infinite; nothing of that state was saved."""


class Interrupted(Exception):
    """A signal stopped training at an iteration boundary, after ``last.pt`` was written."""

    def __init__(self, signal_name: str, iteration: int, checkpoint: Path) -> None:
        super().__init__(f"{signal_name} at iteration {iteration}")
        self.signal_name, self.iteration, self.checkpoint = signal_name, iteration, checkpoint


class Trainer:
    """Owns the model, optimizer and data of one run directory."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path | None,
        *,
        progress: bool | None = None,
        datasets: tuple[Dataset, Dataset] | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        """``datasets`` replaces the config's (train, val) datasets, e.g. for ``--dry-run``;
        ``teacher`` replaces the checkpoint ``distill.teacher`` names (the dry run's stand-in;
        used only when ``distill.teacher`` is set).

        Nothing is written to ``run_dir`` before :meth:`fit`; the model and the teacher are
        built before the data is read (or generated), so a bad model option, a missing or
        mismatched teacher, or a model output without a loss weight fails in seconds.
        """
        self.cfg, self.run_dir = cfg, run_dir
        self.dist = current()
        self.loggers = check_loggers(cfg.train.loggers)  # before any work
        self.progress = bar_wanted(progress) if self.dist.is_main else False
        self.device = process_device(select_device(cfg.train.device), self.dist)
        seed_everything(cfg.train.seed)
        self.options = model_options(cfg)
        num_classes = (
            datasets[0].num_classes if datasets is not None else dataset_num_classes(cfg.data)
        )
        model = build_model(cfg.model.name, num_classes, **self.options)
        self.compute = resolve_compute(
            cfg.train.precision, cfg.train.channels_last, self.device, model
        )
        self.amp_dtype = self.compute.autocast_dtype
        if loss_upsamples(cfg):
            set_training_logits_upsampled(model, False)
        align_corners = bool(getattr(model, "align_corners", False))
        self.loss_weights = loss_weights(cfg)
        self.criterion = loss_criterion(cfg, align_corners, num_classes=num_classes)
        self.outputs_checked = self._check_outputs(model)  # on the CPU, before any data
        self.teacher = self._teacher(teacher, num_classes)
        if not self.dist.is_main:
            barrier(self.dist)  # rank 0 downloads the weights and prepares the data first
        if cfg.model.pretrained:  # before the data: a missing or undownloadable file fails fast
            report = load_pretrained(model, cfg.model.pretrained, model_name=cfg.model.name)
            if self.dist.is_main:
                tqdm.write(f"pretrained weights: {report.summary()}")
        self.train_set, self.val_set = datasets or build_datasets(cfg.data)
        if self.dist.is_main:
            barrier(self.dist)
        if self.train_set.num_classes != num_classes:
            raise DataError(
                f"dataset '{cfg.data.root}' has {self.train_set.num_classes} classes, the "
                f"config says {num_classes}: set data.num_classes={self.train_set.num_classes}"
            )
        self.num_classes = num_classes
        self.class_names = list(self.train_set.class_names)
        if cfg.acosp.sparsity is not None:  # before the optimizer: the scores are parameters
            acosp.apply(model, cfg.acosp.sparsity, cfg.acosp.min_keep, cfg.acosp.coupled_residual)
        self.mask_schedule = acosp_schedule(cfg, len(self.train_set), self.dist.world_size)
        if cfg.backrazor.ratio is not None:
            backrazor.apply_config(model, cfg.backrazor)
        model = self.compute.prepare(model.to(self.device))
        self.net = wrap_model(model, self.device, self.dist)  # DDP + SyncBN when distributed
        self.model = self.net.module if self.net is not model else model
        if cfg.train.compile:
            self.net = compile_or_eager(self.net, say=tqdm.write if self.dist.is_main else None)
        self.optimizer = build_optimizer(
            self.model,
            name=cfg.optim.name,
            lr=cfg.optim.lr,
            backbone_lr_mult=cfg.optim.backbone_lr_mult,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        # the weight average that validation and the checkpoints' state_dict use (train.ema)
        self.ema = ModelEma(self.model, cfg.train.ema) if cfg.train.ema is not None else None
        self.iteration = 0
        self.micro_batches = 0  # loader batches trained on (train.accumulate per iteration)
        self.best_miou = float("-inf")
        self.log_window: list[float] = []  # losses since the last train row of metrics.jsonl
        self.log: RunLog | None = None  # opened by fit(), so a failed start writes nothing
        self.confusion: ConfusionMatrix | None = None  # of the latest validation

    def _teacher(self, given: nn.Module | None, num_classes: int) -> nn.Module | None:
        """The frozen KD teacher (None without ``distill.teacher``); never part of the student's
        state dict, optimizer or checkpoints, and loaded again from the config on resume."""
        if self.cfg.distill.teacher is None:
            return None
        if given is not None:
            return freeze(given, self.device)
        return configured_teacher(
            self.cfg.distill.teacher,
            num_classes=num_classes,
            student_config=to_dict(self.cfg),
            device=self.device,
        )

    def _check_outputs(self, model: nn.Module) -> bool:
        """Check the loss weights against the model's training outputs (a probe forward, before
        anything is written); False when the probe could not run: the first step checks."""
        data = self.cfg.data
        size = (data.crop_size, data.crop_width or data.crop_size)
        try:
            outputs = training_outputs(model, size, torch.device("cpu"))
        except Exception:  # e.g. a model that needs larger inputs: checked at the first step
            return False
        unused = check_loss_weights(outputs, self.loss_weights, self.cfg.model.name)
        if unused and self.cfg.loss.weights is not None and self.dist.is_main:
            tqdm.write(
                f"note: loss.weights {unused} unused: model {self.cfg.model.name!r} returns "
                f"{outputs} in training"
            )
        return True

    def _update_masks(self) -> None:
        """Set the ACoSP temperature of this iteration; harden the masks when it is time."""
        if self.mask_schedule is None:
            return
        if self.mask_schedule.is_hard(self.iteration):
            if acosp.harden(self.model) and self.dist.is_main:
                tqdm.write(f"acosp: masks hardened at iteration {self.iteration}")
        else:
            acosp.set_temperature(self.model, self.mask_schedule.tau(self.iteration))

    def _save(self, name: str) -> None:
        if not self.dist.is_main:
            return
        payload = self._payload()
        weights = [payload["state_dict"], payload.get("train_state_dict", {})]
        bad = next(
            (
                k
                for state in weights
                for k, v in state.items()
                if v.is_floating_point() and not torch.isfinite(v).all()
            ),
            None,
        )
        if bad is not None:  # never replace a good checkpoint with a diverged one
            raise TrainingDiverged(
                f"'{bad}' holds NaN or infinite values at iteration {self.iteration}: training "
                f"diverged; {name} was not written (the last good one is kept); "
                f"{DIVERGENCE_FIX}"
            )
        save_checkpoint(self.run_dir / name, payload)

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        """The weights that validation, samples and the checkpoints' ``state_dict`` use: the
        EMA with ``train.ema``, else the training model."""
        return self.ema.module if self.ema is not None else self.model

    def _payload(self) -> dict[str, Any]:
        """What best.pt / last.pt hold. With ``train.ema``, ``state_dict`` is the EMA (what
        eval / predict / export / a KD teacher load) and ``train_state_dict`` the raw weights
        that resume continues from."""
        raw = {"train_state_dict": self.model.state_dict()} if self.ema is not None else {}
        return {
            "model": self.cfg.model.name,
            "num_classes": self.num_classes,
            "model_options": self.options,
            "class_names": self.class_names,
            "palette": _palette_tensor(self.train_set),
            "config": to_dict(self.cfg),
            "state_dict": self.eval_model.state_dict(),
            **raw,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "micro_batches": self.micro_batches,
            "best_miou": self.best_miou,
            "log_window": list(self.log_window),
            "rng": rng_state(),
        }

    def resume(self, checkpoint: Path) -> None:
        """Continue exactly where ``checkpoint`` (a last.pt) stopped.

        The raw weights are its ``train_state_dict`` when it has one (an EMA run), else its
        ``state_dict``; with ``train.ema`` the average is its ``state_dict``, or starts at the
        raw weights when the checkpoint had none.
        """
        payload = load_checkpoint(checkpoint)
        raw = payload.get("train_state_dict", payload["state_dict"])
        load_model_state(self.model, raw, str(checkpoint))
        if self.ema is not None:
            had_ema = "train_state_dict" in payload
            average = payload["state_dict"] if had_ema else self.model.state_dict()
            load_model_state(self.ema.module, average, str(checkpoint))
        configured = [
            {k: v for k, v in group.items() if k != "params"}
            for group in self.optimizer.param_groups
        ]
        self.optimizer.load_state_dict(payload["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(settings)  # the config wins: optim.lr=... given with --resume applies
        self.scaler.load_state_dict(payload["scaler"])
        self.iteration = int(payload["iteration"])
        saved_accumulate = payload.get("config", {}).get("train", {}).get("accumulate", 1)
        self.micro_batches = int(payload.get("micro_batches", self.iteration * saved_accumulate))
        self.best_miou = float(payload["best_miou"])
        self.log_window = [float(v) for v in payload.get("log_window", [])]
        set_rng_state(payload["rng"])

    # -- loop ----------------------------------------------------------------------------------
    def train_step(
        self,
        images: torch.Tensor | list[torch.Tensor],
        masks: torch.Tensor | list[torch.Tensor],
    ) -> float:
        """One optimizer step at the scheduled LR; returns the loss.

        ``images`` / ``masks`` are one batch, or lists of the micro-batches of one accumulated
        step (``train.accumulate``): each micro-batch's loss is divided by their count and
        backpropagated (under DDP's ``no_sync`` but the last), so the step uses the mean of their
        mean losses; the returned loss is that mean. ``optim.clip_grad_norm`` then clips the
        (accumulated, unscaled) gradient, the optimizer steps and the EMA (``train.ema``)
        follows.

        The loss is ``segmentation_loss`` over the model's outputs (``loss.weights``, CE or OHEM)
        plus ``distill.weight`` x the KD loss of the ``"out"`` logits against the frozen
        teacher's on the same (augmented) batch, under the same autocast.

        A non-finite loss stops training (:class:`TrainingDiverged`, nothing saved) or, with
        ``train.on_nonfinite=skip``, skips the whole step (all its micro-batches): no update,
        and the BatchNorm statistics its forwards moved are put back. Returns NaN for a skipped
        step.
        """
        cfg = self.cfg
        skip = cfg.train.on_nonfinite == "skip"
        buffers = [b.detach().clone() for b in self.model.buffers()] if skip else None
        factor = lr_factor(
            self.iteration,
            cfg.train.iterations,
            schedule=cfg.optim.schedule,
            power=cfg.optim.power,
            warmup_iters=cfg.optim.warmup_iters,
            gamma=cfg.optim.gamma,
            decay_every=cfg.optim.decay_every,
        )
        set_lr(self.optimizer, factor, cfg.optim.min_lr)
        batches = (
            list(zip(images, masks, strict=True)) if isinstance(images, list) else [(images, masks)]
        )
        self.optimizer.zero_grad(set_to_none=True)
        total, finite = None, True
        for index, (micro_images, micro_masks) in enumerate(batches):
            last = index == len(batches) - 1
            with self._no_sync(not last):
                loss = self._micro_loss(micro_images, micro_masks)
                finite = bool(any_rank(torch.isfinite(loss).logical_not(), self.dist).logical_not())
                if not finite and not skip:
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at iteration {self.iteration + 1}: training "
                        f"diverged and nothing of it was saved; {DIVERGENCE_FIX}{SKIP_HINT}"
                    )
                if not finite:
                    break
                self.scaler.scale(loss / len(batches)).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if finite and skip and self.amp_dtype != torch.float16:  # fp16: the scaler skips inf
            finite = _grads_finite(self.model, self.dist)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
            if self.dist.is_main:
                tqdm.write(f"skipped batch of iteration {self.iteration + 1}: non-finite loss")
            return float("nan")
        if cfg.optim.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradient (a no-op but fp16)
            grads = [p for p in self.model.parameters() if p.grad is not None]
            nn.utils.clip_grad_norm_(grads, cfg.optim.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        return (total / len(batches)).item()

    def _micro_loss(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The training loss of one (micro-)batch: forward, segmentation loss and KD."""
        cfg = self.cfg
        images = self.compute.images(images)
        with self.compute.autocast(self.device):
            outputs = model_outputs(self.net(images))
            target = teacher_logits(self.teacher, images) if self.teacher is not None else None
        if not self.outputs_checked:
            check_loss_weights(outputs, self.loss_weights, cfg.model.name)
            self.outputs_checked = True
        loss = segmentation_loss(
            outputs,
            masks,
            ignore_index=cfg.data.ignore_index,
            weights=self.loss_weights,
            criterion=self.criterion,
        )
        if target is not None:
            kd = distillation_loss(
                outputs["out"],
                target,
                temperature=cfg.distill.temperature,
                reduction=cfg.distill.reduction,
            )
            loss = loss + cfg.distill.weight * kd
        return loss

    def _no_sync(self, wanted: bool) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync`` (gradients are reduced at the last micro-batch only) when
        ``wanted`` and the model is DDP-wrapped; otherwise nothing."""
        no_sync = getattr(self.net, "no_sync", None)
        return no_sync() if wanted and no_sync is not None else contextlib.nullcontext()

    def fit(self, stop_at: int | None = None) -> SegMetrics | None:
        """Train to ``train.iterations`` (or stop early at ``stop_at``, resumable from last.pt)."""
        cfg = self.cfg
        total = cfg.train.iterations
        end = min(total, stop_at) if stop_at is not None else total
        pin = self.device.type == "cuda"
        accumulate = cfg.train.accumulate
        loader = train_loader(  # its "iterations" are micro-batches: accumulate per step
            self.train_set,
            cfg.data,
            seed=cfg.train.seed,
            start_iteration=self.micro_batches,
            pin_memory=pin,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.net.train()
        bar = tqdm(
            total=total,
            initial=self.iteration,
            desc="train",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        self.open_log()
        metrics, start = None, time.perf_counter()
        plain = None  # no bar (not a terminal): a plain line every log_interval instead
        if self.dist.is_main and not self.progress:
            plain = PlainProgress(self.iteration, total, self.device)
        batches = iter(loader)
        with StopOnSignal("stopping after this iteration; last.pt will be written") as stop:
            try:
                while self.iteration < end:
                    if bool(any_rank(torch.tensor(stop.requested), self.dist)):
                        break
                    self._update_masks()
                    micro = [next(batches) for _ in range(accumulate)]
                    images = [i.to(self.device, non_blocking=pin) for i, _ in micro]
                    masks = [m.to(self.device, non_blocking=pin) for _, m in micro]
                    loss = self.train_step(images, masks)
                    self.iteration += 1
                    self.micro_batches += accumulate
                    if np.isfinite(loss):
                        self.log_window.append(loss)
                    bar.update(1)
                    lr = self.optimizer.param_groups[-1]["lr"]
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                    if self.iteration % cfg.train.log_interval == 0:
                        window_loss = self._log_train(lr, time.perf_counter() - start)
                        if plain is not None:
                            images = (self.iteration - plain.first) * self.images_per_iteration
                            line = plain.line(self.iteration, images, loss=window_loss, lr=lr)
                            print(line, flush=True)
                    if self.iteration % cfg.train.val_interval == 0 or self.iteration == total:
                        metrics = self.validate()
                        self.net.train()
                if self.iteration < total:  # stopped early: leave a resumable checkpoint
                    self._save("last.pt")
                elif self.mask_schedule is not None and acosp.harden(self.model):
                    if self.ema is not None:
                        self.ema.copy_buffers(self.model)  # the hard masks
                    self._save("last.pt")  # masks still soft at the end (acosp.end past the run)
            finally:
                bar.close()
                self.log.close()
        if stop.requested and self.iteration < end:
            raise Interrupted(
                stop.signal_name or "signal", self.iteration, self.run_dir / "last.pt"
            )
        return metrics

    def open_log(self) -> None:
        """Open metrics.jsonl and the ``train.loggers`` (tensorboard, csv), dropping what a
        previous process logged past the iteration this run starts from (replayed iterations
        are logged once)."""
        self.log = open_run_log(
            self.run_dir, self.loggers, start=self.iteration, enabled=self.dist.is_main
        )

    def _log_train(self, lr: float, elapsed: float) -> float:
        """Write a train row of the losses since the last one; returns their mean."""
        window, self.log_window = self.log_window, []
        loss = sum(window) / len(window) if window else float("nan")
        record = {"loss": loss, "lr": lr, "time": elapsed}
        self.log.write(record, step=self.iteration, prefix="train")
        return loss

    @property
    def images_per_iteration(self) -> int:
        """Training images of one iteration (one optimizer step), over all processes and
        micro-batches: ``data.batch_size x processes x train.accumulate``."""
        return self.cfg.data.batch_size * self.dist.world_size * self.cfg.train.accumulate

    def validate(self) -> SegMetrics:
        """Evaluate on the val split (the EMA weights with ``train.ema``), log, and write
        last.pt (and best.pt on a new best mIoU)."""
        cfg = self.cfg
        loader = val_loader(
            self.val_set,
            cfg.data,
            pin_memory=self.device.type == "cuda",
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        try:
            matrix = evaluate(
                self.eval_model,
                loader,
                num_classes=self.num_classes,
                ignore_index=cfg.data.ignore_index,
                device=self.device,
                amp_dtype=self.amp_dtype,
                channels_last=self.compute.channels_last,
                **inference_options(cfg.eval),
                progress=False,
            )
        except NonFiniteOutputError:
            raise TrainingDiverged(
                f"validation at iteration {self.iteration} predicts NaN or infinite scores: "
                f"training diverged and nothing of it was saved; {DIVERGENCE_FIX}"
            ) from None
        self.confusion = matrix
        metrics = matrix.compute()
        summary = {"mIoU": metrics.miou, "mAcc": metrics.mean_acc, "allAcc": metrics.all_acc}
        self.log.write(
            {**summary, "per_class": metrics.to_dict(self.class_names)},
            step=self.iteration,
            prefix="val",
        )
        self._log_samples()
        if self.dist.is_main:
            tqdm.write(
                f"[iter {self.iteration}/{cfg.train.iterations}] val mIoU {metrics.miou:.4f} "
                f"mAcc {metrics.mean_acc:.4f} allAcc {metrics.all_acc:.4f}"
            )
        if metrics.miou > self.best_miou:
            self.best_miou = metrics.miou
            self._save("best.pt")
        self._save("last.pt")
        return metrics

    def _log_samples(self) -> None:
        """Prediction panels of the first val images: to tensorboard and ``samples/``."""
        count = min(self.cfg.train.sample_images, len(self.val_set))
        if count == 0 or not self.dist.is_main:
            return
        samples = [self.val_set[i] for i in range(count)]
        if samples[0][1].ndim < 2:  # classification targets: nothing to paint
            return
        normalization = data_normalization(self.cfg.data)
        panels = prediction_panels(
            self.eval_model, samples, self.device, self.val_set.palette, normalization
        )
        self.log.images("val/samples", panels, self.iteration)
        write_samples(self.run_dir, panels)


DIVERGENCE_FIX = "lower optim.lr, raise optim.warmup_iters, or train in fp32 (train.precision=fp32)"
SKIP_HINT = "; or set train.on_nonfinite=skip to skip such batches"


def _grads_finite(model: nn.Module, dist: Any) -> bool:
    """True when every gradient is finite (on every rank)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bad = torch.stack([g.isfinite().all().logical_not() for g in grads]).any() if grads else False
    return not bool(any_rank(torch.as_tensor(bad), dist))


def _palette_tensor(dataset: Dataset) -> torch.Tensor:
    """The dataset's colours (row i: class i) for ``predict`` to paint with."""
    palette = np.asarray(getattr(dataset, "palette", np.zeros((0, 3))), np.uint8).reshape(-1, 3)
    return torch.from_numpy(palette.copy())


def model_summary(model: nn.Module) -> str:
    """One line: parameter count in millions."""
    params = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}: {params / 1e6:.2f}M parameters"
