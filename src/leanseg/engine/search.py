"""The FasterSeg search loop (shared/methods/fasterseg.md §4): pretrain, then search.

- **Split.** The training split is shuffled with ``search.split_seed`` and halved: A trains the
  weights, B the architecture parameters; each half has its own resumable loader.
- **Pretrain** (``search.pretrain_epochs``): weight steps only, on A
  (:meth:`Supernet.pretrain_loss`), SGD at ``search.pretrain_lr``. At its end ``pretrain.pt``
  is written; a later search can start from it (``search.pretrained``) with the same weights
  and random state.
- **Search** (``search.epochs``), each iteration: an architecture step on a B batch (Adam per
  architecture on the search loss plus lambda x the student's decoupled latency), every
  gradient zeroed, then an SGD weight step on an A batch with the weight gradients (only) clipped.
- **Each epoch**: the weight lr is ``lr * lr_gamma ** epoch``; both architectures are validated
  (all five predictions, gamma's arg-max widths); in the search phase the architecture
  parameters go to ``arch/epoch_NNN.json``, the derived specs to ``specs/epoch_NNN_ARCH.json``,
  and lambda adapts to the derived students' LUT FPS. ``last.pt`` after every epoch and when
  stopped, so that ``--resume`` continues exactly.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from leanseg.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from leanseg.config import Config, to_dict
from leanseg.data.build import build_datasets, train_loader, val_loader
from leanseg.data.sampler import seeded
from leanseg.engine.metrics import ConfusionMatrix
from leanseg.engine.objective import loss_criterion
from leanseg.engine.progress_log import bar_wanted
from leanseg.engine.run_dir import write_text_atomic
from leanseg.engine.run_log import RunLog, check_loggers, open_run_log
from leanseg.engine.runtime import rng_state, seed_everything, select_device, set_rng_state
from leanseg.engine.stop_signal import StopOnSignal
from leanseg.engine.trainer import Interrupted, TrainingDiverged
from leanseg.errors import CheckpointError, ConfigError
from leanseg.methods.fasterseg.handover import PREDICTION_INDEX, candidates, choose
from leanseg.methods.fasterseg.latency import load_lut
from leanseg.methods.fasterseg.lut_measure import check_table_matches
from leanseg.methods.fasterseg.supernet import ArchSetting, SearchSpace, Supernet
from leanseg.methods.fasterseg.supernet_latency import (
    SupernetLatency,
    adapt_lambda,
    check_table,
    head_keys,
)
from leanseg.models.fasterseg.spec import dumps_spec

PREDICTIONS = ("8", "16", "32", "8+32", "16+32")
ARCH_FORMAT = "leanseg.fasterseg.search_arch"


def search_space(cfg: Config) -> SearchSpace:
    """The config's search space (teacher and student as in the original)."""
    s = cfg.search
    return SearchSpace(layers=s.layers, fch=s.fch, width_choices=tuple(s.width_choices))


def split_halves(size: int, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint halves (A, B) of ``range(size)`` from a shuffle seeded with ``seed``."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    half = size // 2
    return sorted(order[:half]), sorted(order[half:])


class _Split(Subset):
    """A Subset that keeps the dataset's class names and palette, and takes the resumable
    sampler's ``(index, seed)`` items."""

    seeded_items = True  # takes the training sampler's (index, seed) items

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, tuple):
            return self.dataset[(self.indices[item[0]], *item[1:])]
        return self.dataset[self.indices[item]]

    def __getitems__(self, items: list) -> list:
        return [self[item] for item in items]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class Searcher:
    """Owns the supernet, its optimizers and the A/B data of one search run directory."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path | None,
        *,
        progress: bool | None = None,
        datasets: tuple[Dataset, Dataset] | None = None,
    ) -> None:
        """Nothing is written before :meth:`fit`; a missing or mismatched latency table fails
        before the data is read."""
        self.cfg, self.run_dir, self.progress = cfg, run_dir, bar_wanted(progress)
        self.loggers = check_loggers(cfg.train.loggers)  # before any work
        s = cfg.search
        self.device = select_device(cfg.train.device)
        seed_everything(cfg.train.seed)
        self.space = search_space(cfg)
        self.latency_size = (int(s.latency_size[0]), int(s.latency_size[1]))
        self.table = self._table()
        self.train_set, self.val_set = datasets or build_datasets(cfg.data)
        self.num_classes = cfg.data.num_classes or self.train_set.num_classes
        self.class_names = list(self.train_set.class_names)
        half_a, half_b = split_halves(len(self.train_set), s.split_seed)
        if not half_a or len(half_a) < cfg.data.batch_size:
            raise ConfigError(
                f"search: split A has {len(half_a)} images, fewer than data.batch_size="
                f"{cfg.data.batch_size}; use a larger training split or a smaller batch"
            )
        if self.table is not None:  # the derived networks' heads, before any step
            check_table(self.table, head_keys(self.space, self.latency_size, self.num_classes))
        base = seeded(self.train_set)  # a dataset of plain indices: seeded per sample
        self.split_a, self.split_b = _Split(base, half_a), _Split(base, half_b)
        self.supernet = Supernet(self.num_classes, self.space).to(self.device)
        self.latency = (
            SupernetLatency(
                self.supernet,
                self.table,
                self.latency_size,
                legacy=s.latency_legacy,
                weights=[w / sum(s.latency_terms) for w in s.latency_terms],
            )
            if self.table is not None
            else None
        )
        self.criterion = functools.partial(loss_criterion(cfg), ignore_index=cfg.data.ignore_index)
        self.arch_optimizers = {
            a.name: torch.optim.Adam(
                self.supernet.arch_parameters(a.name), lr=s.arch_lr, betas=(0.5, 0.999)
            )
            for a in self.space.archs
        }
        self.phase = "pretrain" if s.pretrain_epochs > 0 and s.pretrained is None else "search"
        self.weight_optimizer = self._weight_optimizer()
        self.epoch = 0  # epochs done in the current phase
        self.in_epoch = 0  # iterations done in the current epoch
        self.step = 0  # iterations done in all
        self.a_steps = self.b_steps = 0  # batches drawn from each half
        self.lam = s.latency_weight
        self.log_window: list[dict[str, float]] = []
        self.log: RunLog | None = None
        if s.pretrained is not None:
            self._load_pretrained(Path(s.pretrained))

    # -- setup --------------------------------------------------------------------------------
    def _table(self):
        s = self.cfg.search
        if s.latency_table is None:
            if s.latency_weight > 0:
                raise ConfigError(
                    "config key 'search.latency_table': required when search.latency_weight > 0;"
                    " measure one on the deployment hardware with `leanseg search lut -c CONFIG`"
                )
            return None
        table = load_lut(s.latency_table)
        check_table_matches(table, backend=s.latency_backend, device=s.latency_device)
        return table

    def _weight_optimizer(self) -> torch.optim.SGD:
        s = self.cfg.search
        return torch.optim.SGD(
            self.supernet.weight_parameters(),
            lr=s.pretrain_lr if self.phase == "pretrain" else s.lr,
            momentum=s.momentum,
            weight_decay=s.weight_decay,
        )

    def _load_pretrained(self, path: Path) -> None:
        """Start the search from a finished pretraining (weights, data position, RNG)."""
        payload = load_checkpoint(path)
        if payload.get("kind") != "fasterseg_pretrain":
            raise CheckpointError(
                f"search.pretrained '{path}': not a search run's pretrain.pt; give the "
                "pretrain.pt a `leanseg search` run wrote"
            )
        if payload["space"] != self.space.to_dict() or payload["num_classes"] != self.num_classes:
            raise CheckpointError(
                f"search.pretrained '{path}': pretrained for another search space or class "
                "count; use the same search.layers / fch / width_choices and data"
            )
        load_model_state(self.supernet, payload["state_dict"], str(path))
        self.a_steps = int(payload["a_steps"])
        set_rng_state(payload["rng"])

    # -- one iteration ------------------------------------------------------------------------
    def _arch_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        net = self.supernet
        loss = net.search_loss(images, labels, self.criterion)
        record = {"arch_loss": loss.item()}
        if self.latency is not None and self.lam > 0:
            priced = [a.name for a in self.space.archs if _priced(a)]
            terms = [self.latency.decoupled(name) for name in priced]
            latency = sum(t.weighted for t in terms)
            loss = loss + self.lam * latency
            record["latency_loss_ms"] = latency.item()
        _check_finite(loss, "architecture", self.step)
        for optimizer in self.arch_optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in self.arch_optimizers.values():
            optimizer.step()
        net.zero_grad(set_to_none=True)  # every gradient, weights included (quirk 8)
        return record

    def _weight_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        net = self.supernet
        if self.phase == "pretrain":
            loss = net.pretrain_loss(images, labels, self.criterion)
        else:
            loss = net.search_loss(images, labels, self.criterion)
        _check_finite(loss, "weight", self.step)
        self.weight_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.weight_parameters(), self.cfg.search.grad_clip)
        self.weight_optimizer.step()
        net.zero_grad(set_to_none=True)  # the architecture parameters got gradients too
        return {"weight_loss": loss.item()}

    # -- the loop -----------------------------------------------------------------------------
    def epochs_of(self, phase: str) -> int:
        s = self.cfg.search
        return s.pretrain_epochs if phase == "pretrain" else s.epochs

    def per_epoch(self) -> int:
        s = self.cfg.search
        if s.iterations_per_epoch is not None:
            return s.iterations_per_epoch
        return max(len(self.split_a) // self.cfg.data.batch_size, 1)

    def total_steps(self) -> int:
        s = self.cfg.search
        pretrain = s.pretrain_epochs if s.pretrained is None else 0
        return (pretrain + s.epochs) * self.per_epoch()

    def _loaders(self):
        data, pin = self.cfg.data, self.device.type == "cuda"
        seed = self.cfg.train.seed
        a = train_loader(
            self.split_a, data, seed=seed, start_iteration=self.a_steps, pin_memory=pin
        )
        b = train_loader(
            self.split_b, data, seed=seed + 1, start_iteration=self.b_steps, pin_memory=pin
        )
        return iter(a), iter(b)

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Run to the end of the search (or stop after global step ``stop_at``)."""
        total = self.total_steps()
        end = min(total, stop_at) if stop_at is not None else total
        self.open_log()
        bar = tqdm(total=total, initial=self.step, disable=not self.progress, dynamic_ncols=True)
        batches_a, batches_b = self._loaders()
        self.supernet.train()
        start = time.perf_counter()
        summary: dict[str, Any] = {}
        with StopOnSignal("stopping after this iteration; last.pt will be written") as stop:
            try:
                while self.step < end and not stop.requested:
                    if self.epoch >= self.epochs_of(self.phase):
                        self._next_phase()
                        continue
                    self._set_lr()
                    record: dict[str, float] = {}
                    if self.phase == "search":
                        images, labels = (t.to(self.device) for t in next(batches_b))
                        self.b_steps += 1
                        record.update(self._arch_step(images, labels))
                    images, labels = (t.to(self.device) for t in next(batches_a))
                    self.a_steps += 1
                    record.update(self._weight_step(images, labels))
                    self.step += 1
                    self.in_epoch += 1
                    self.log_window.append(record)
                    bar.update(1)
                    bar.set_description(f"{self.phase} {self.epoch + 1}")
                    if self.step % self.cfg.train.log_interval == 0:
                        self._log_train(time.perf_counter() - start)
                    if self.in_epoch == self.per_epoch():
                        summary = self._end_epoch()
                if self.step < total:
                    self._save("last.pt")
            finally:
                bar.close()
                self.log.close()
        if stop.requested and self.step < end:
            raise Interrupted(stop.signal_name or "signal", self.step, self.run_dir / "last.pt")
        return summary

    def _next_phase(self) -> None:
        """Pretraining done: the search phase starts with a fresh weight optimizer."""
        self.phase, self.epoch, self.in_epoch = "search", 0, 0
        self.weight_optimizer = self._weight_optimizer()

    def _set_lr(self) -> None:
        s = self.cfg.search
        base = s.pretrain_lr if self.phase == "pretrain" else s.lr
        for group in self.weight_optimizer.param_groups:
            group["lr"] = base * s.lr_gamma**self.epoch

    def _end_epoch(self) -> dict[str, Any]:
        self.epoch += 1
        self.in_epoch = 0
        summary = self.validate()
        if self.phase == "search":
            self._write_arch(summary)
        elif self.epoch == self.epochs_of("pretrain"):
            self._save("pretrain.pt", kind="fasterseg_pretrain")
        self._save("last.pt")
        self.supernet.train()
        return summary

    # -- validation and per-epoch results ------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """mIoU of the five predictions of each architecture; in the search phase also the
        derived candidates, their LUT latency and the adapted lambda."""
        net = self.supernet
        net.eval()
        loader = val_loader(self.val_set, self.cfg.data, pin_memory=False)
        matrices = {
            (a.name, p): ConfusionMatrix(self.num_classes, self.cfg.data.ignore_index)
            for a in self.space.archs
            for p in PREDICTIONS
        }
        for images, masks in loader:
            images = images.to(self.device)
            for arch in self.space.archs:
                for p, logits in zip(PREDICTIONS, net.predict(images, arch.name), strict=True):
                    matrices[(arch.name, p)].update(logits.argmax(1).cpu(), masks)
        mious = {key: m.compute().miou for key, m in matrices.items()}
        summary: dict[str, Any] = {
            "phase": self.phase,
            "epoch": self.epoch,
            "lambda": self.lam,
            **{f"mIoU/{a}/{p}": v for (a, p), v in mious.items()},
        }
        if self.phase == "search":
            summary.update(self._derived(mious))
        self.log.write(summary, step=self.step, prefix="val")
        student = f"mIoU/{self.space.archs[-1].name}/8+32"
        tqdm.write(
            f"[{self.phase} epoch {self.epoch}] val mIoU teacher/8+32 "
            f"{summary['mIoU/teacher/8+32']:.4f} {student} {summary[student]:.4f}"
            + (f" lambda {summary['lambda']:g} -> {self.lam:g}" if self.phase == "search" else "")
        )
        return summary

    def _derived(self, mious: dict[tuple[str, str], float]) -> dict[str, Any]:
        """Derive each architecture's candidates, choose, price; adapt lambda."""
        s = self.cfg.search
        out: dict[str, Any] = {}
        self.chosen: dict[str, Any] = {}
        fps = []
        for arch in self.space.archs:
            pair_mious = {
                pair: mious[(arch.name, PREDICTIONS[i])] for pair, i in PREDICTION_INDEX.items()
            }
            found = candidates(
                self.space,
                arch.name,
                self.supernet.arch_tensors(arch.name),
                pair_mious,
                table=self.table,
                size=self.latency_size,
                num_classes=self.num_classes,
            )
            priced = _priced(arch)
            best = choose(found, priced=priced, target_ms=s.target_latency_ms)
            self.chosen[arch.name] = (best, found)
            for c in found:
                if c.latency_ms is not None:
                    out[f"latency_ms/{arch.name}/{c.pair}"] = c.latency_ms
                    if priced:
                        fps.append(1000.0 / c.latency_ms)
            if self.latency is not None:
                rows = self.latency.rows(arch.name, widths="argmax")
                out[f"supernet_latency_ms/{arch.name}"] = float(sum(rows))
        if s.adapt_lambda and fps and self.lam > 0:
            self.lam = adapt_lambda(self.lam, fps, s.fps_low, s.fps_high)
        out["lambda_next"] = self.lam
        return out

    def _write_arch(self, summary: dict[str, Any]) -> None:
        """``arch/epoch_NNN.json`` (plain lists) and ``specs/epoch_NNN_ARCH.json``."""
        name = f"epoch_{self.epoch:03d}"
        archs = {}
        for arch in self.space.archs:
            best, found = self.chosen[arch.name]
            archs[arch.name] = {
                "tensors": self.supernet.arch_tensors(arch.name),
                "recorded": {
                    **{f"mIoU{c.pair}": c.miou for c in found},
                    **{f"latency{c.pair}": c.latency_ms for c in found},
                },
                "branches": list(best.spec.meta["branches"]),
            }
            spec_dir = self.run_dir / "specs"
            spec_dir.mkdir(exist_ok=True)
            write_text_atomic(spec_dir / f"{name}_{arch.name}.json", dumps_spec(best.spec) + "\n")
        record = {
            "format": ARCH_FORMAT,
            "version": 1,
            "epoch": self.epoch,
            "lambda": summary["lambda"],
            "space": self.space.to_dict(),
            "num_classes": self.num_classes,
            "latency_size": list(self.latency_size),
            "target_latency_ms": self.cfg.search.target_latency_ms,
            "archs": archs,
        }
        (self.run_dir / "arch").mkdir(exist_ok=True)
        write_text_atomic(self.run_dir / "arch" / f"{name}.json", json.dumps(record, indent=1))

    # -- logs and checkpoints -----------------------------------------------------------------
    def open_log(self) -> None:
        self.log = open_run_log(self.run_dir, self.loggers, start=self.step, enabled=True)

    def _log_train(self, elapsed: float) -> None:
        window, self.log_window = self.log_window, []
        keys = sorted({k for r in window for k in r})
        record = {k: sum(r[k] for r in window if k in r) / len(window) for k in keys}
        lr = self.weight_optimizer.param_groups[0]["lr"]
        self.log.write(
            {**record, "lr": lr, "lambda": self.lam, "phase": self.phase, "time": elapsed},
            step=self.step,
            prefix="train",
        )

    def _payload(self, kind: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "model": "fasterseg_supernet",  # not a registered model: eval / predict refuse it
            "config": to_dict(self.cfg),
            "space": self.space.to_dict(),
            "num_classes": self.num_classes,
            "state_dict": self.supernet.state_dict(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "arch_optimizers": {k: o.state_dict() for k, o in self.arch_optimizers.items()},
            "phase": self.phase,
            "epoch": self.epoch,
            "in_epoch": self.in_epoch,
            "step": self.step,
            "a_steps": self.a_steps,
            "b_steps": self.b_steps,
            "lambda": self.lam,
            "log_window": [dict(r) for r in self.log_window],
            "rng": rng_state(),
        }

    def _save(self, name: str, kind: str = "fasterseg_search") -> None:
        save_checkpoint(self.run_dir / name, self._payload(kind))

    def resume(self, checkpoint: Path) -> None:
        """Continue exactly where ``checkpoint`` (a search run's last.pt) stopped."""
        payload = load_checkpoint(checkpoint)
        if payload.get("kind") != "fasterseg_search":
            raise CheckpointError(f"cannot resume '{checkpoint}': not a search run's last.pt")
        load_model_state(self.supernet, payload["state_dict"], str(checkpoint))
        self.phase = payload["phase"]
        self.weight_optimizer = self._weight_optimizer()
        self.weight_optimizer.load_state_dict(payload["weight_optimizer"])
        for name, state in payload["arch_optimizers"].items():
            self.arch_optimizers[name].load_state_dict(state)
        self.epoch, self.in_epoch = int(payload["epoch"]), int(payload["in_epoch"])
        self.step = int(payload["step"])
        self.a_steps, self.b_steps = int(payload["a_steps"]), int(payload["b_steps"])
        self.lam = float(payload["lambda"])
        self.log_window = [dict(r) for r in payload["log_window"]]
        set_rng_state(payload["rng"])


def _priced(arch: ArchSetting) -> bool:
    """The width-searching architecture (the student) carries the latency loss."""
    return arch.search_widths


def _check_finite(loss: torch.Tensor, which: str, step: int) -> None:
    if not math.isfinite(loss.item()):
        raise TrainingDiverged(
            f"the {which} loss is {loss.item()} at step {step + 1}: the search diverged and "
            "nothing of it was saved; lower search.lr / search.arch_lr"
        )
