"""Run the leanseg CLI with one injected fault: ``python fault_inject.py POINT:N:SIGNAL[:REPEAT]
-- leanseg args``.

The process sends itself SIGNAL (``INT``, ``TERM`` or ``KILL``, ``REPEAT`` times) the N-th time
(1-based) it reaches POINT:

- ``loss``: inside a training step, after the forward and before backward / the update;
- ``save``: inside a checkpoint write, after the bytes are written and before the rename;
- ``validate``: inside validation, before the evaluation runs;
- ``sample``: while a dataset reads a sample (training or validation; ``data.workers=0``).

Two points inject something else than a signal (SIGNAL is then ignored):

- ``nanloss``: the N-th training loss is NaN;
- ``nospace``: every checkpoint write from the N-th on fails with ENOSPC, as torch reports it.

Used by tests/test_faults.py; not a test module itself.
"""

from __future__ import annotations

import errno
import os
import signal
import sys


def _fire(sig: signal.Signals, repeat: int) -> None:
    for _ in range(repeat):
        os.kill(os.getpid(), sig)


def _counting(fn, n: int, sig: signal.Signals, repeat: int, after: bool):
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += 1
        if not after and calls == n:
            _fire(sig, repeat)
        result = fn(*args, **kwargs)
        if after and calls == n:
            _fire(sig, repeat)
        return result

    return wrapped


def _nan_at(fn, n: int):
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += 1
        loss = fn(*args, **kwargs)
        return loss * float("nan") if calls == n else loss

    return wrapped


def _no_space_from(fn, n: int):
    calls = 0

    def wrapped(obj, handle, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls < n:
            return fn(obj, handle, *args, **kwargs)
        handle.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:  # torch's writer wraps the OSError in a RuntimeError like this
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    return wrapped


def install(spec: str) -> None:
    point, n, name, *rest = spec.split(":")
    sig, n, repeat = signal.Signals[f"SIG{name}"], int(n), int(rest[0]) if rest else 1
    import torch

    from leanseg.engine import trainer

    if point == "nanloss":
        trainer.segmentation_loss = _nan_at(trainer.segmentation_loss, n)
    elif point == "nospace":
        torch.save = _no_space_from(torch.save, n)
    elif point == "loss":
        trainer.segmentation_loss = _counting(trainer.segmentation_loss, n, sig, repeat, True)
    elif point == "save":
        torch.save = _counting(torch.save, n, sig, repeat, True)
    elif point == "validate":
        trainer.evaluate = _counting(trainer.evaluate, n, sig, repeat, False)
    elif point == "sample":
        from leanseg.data.pairs import SegmentationDataset

        cls = SegmentationDataset
        cls.__getitem__ = _counting(cls.__getitem__, n, sig, repeat, False)
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    separator = sys.argv.index("--")
    install(sys.argv[1])
    from leanseg.cli import main

    sys.exit(main(sys.argv[separator + 1 :]))
