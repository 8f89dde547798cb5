"""When the soft masks anneal and harden, as a pure function of the training iteration."""

from __future__ import annotations

from dataclasses import dataclass

from leanseg.methods.acosp.soft_topk import temperature


@dataclass(frozen=True)
class MaskSchedule:
    """The temperature of training iteration ``i`` (0-based) and whether masks are hard by then.

    ``unit="iteration"``: iteration ``i`` trains at ``tau(i)``; masks harden at ``i == end``.
    ``unit="epoch"``: the original's timing (acosp.md section 6). ``tau`` is updated at the end
    of each epoch, so soft epoch ``e`` trains at ``tau(max(e - 1, 0))``, and masks harden at the
    start of epoch ``end``.
    """

    start: int
    end: int
    unit: str = "iteration"
    tau0: float = 1.0
    tau_final: float = 1e-3
    iterations_per_epoch: int = 1

    def _time(self, iteration: int) -> int:
        if self.unit == "epoch":
            return iteration // max(self.iterations_per_epoch, 1)
        return iteration

    def is_hard(self, iteration: int) -> bool:
        return self._time(iteration) >= self.end

    def tau(self, iteration: int) -> float:
        t = self._time(iteration)
        if self.unit == "epoch":
            t = max(t - 1, 0)
        return temperature(t, self.start, self.end, self.tau0, self.tau_final)
