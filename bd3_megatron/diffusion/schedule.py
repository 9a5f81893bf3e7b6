"""Noise schedules and clip windows. BD3-LM uses the log-linear schedule: alpha_t = 1 - t, mask probability t,
NELBO weight -alpha'_t / (1 - alpha_t) = 1 / t."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClipWindow:
    """t is drawn from [eps_min, eps_max]; (1e-3, 1) is the unclipped default, (1, 1) gives t = 1 (all masked)."""

    eps_min: float = 1e-3
    eps_max: float = 1.0

    def __post_init__(self):
        if not (0.0 < self.eps_min <= self.eps_max <= 1.0):
            raise ValueError(f"clip window needs 0 < eps_min <= eps_max <= 1, got [{self.eps_min}, {self.eps_max}]")

    @property
    def is_default(self) -> bool:
        return self.eps_min <= 1e-3 and self.eps_max >= 1.0


class LogLinearSchedule:
    name = "loglinear"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / t


_SCHEDULES = {"loglinear": LogLinearSchedule}


def get_schedule(name: str):
    if name not in _SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; available: {', '.join(_SCHEDULES)}")
    return _SCHEDULES[name]()
