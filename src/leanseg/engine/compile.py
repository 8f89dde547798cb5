"""``train.compile``: the training model through ``torch.compile``, eager where that fails.

The first forward compiles (the warm-up cost: tens of seconds on a CPU, see
benchmarks/train_speed.py); a backend that cannot compile (no C++ compiler, an unsupported
op) is one warning line and the run goes on in eager mode with the same module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__


class CompileOrEager(nn.Module):
    """Runs ``torch.compile(module)``; on the first failure warns once and runs ``module``.

    ``module`` is the only registered child, so state dicts and ``train()`` / ``eval()`` are
    those of the eager module (the compiled one shares its parameters).
    """

    def __init__(self, module: nn.Module, say: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.module = module
        self.say = say
        # not a registered child: its parameters are the module's (no duplicate state dict keys)
        object.__setattr__(self, "compiled", torch.compile(module))
        self.failure: str | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # dynamo / inductor raise many types
                self.compiled, self.failure = None, _reason(err)
                if self.say is not None:
                    self.say(
                        f"leanseg: warning: torch.compile failed ({self.failure}); "
                        "training goes on in eager mode (train.compile=false hides this)"
                    )
        return self.module(*args, **kwargs)


def compile_or_eager(module: nn.Module, say: Callable[[str], None] | None = None) -> CompileOrEager:
    """``module`` wrapped in :class:`CompileOrEager` (``say``: where the warning goes)."""
    return CompileOrEager(module, say)
