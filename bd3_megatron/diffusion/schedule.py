"""Noise schedules and clip windows.

BD3-LM uses the log-linear schedule: alpha_t = 1 - t, so a token is masked with probability t and the NELBO weight
-alpha'_t / (1 - alpha_t) is 1 / t. A schedule is a small class with these three maps so another one (cosine, …) can
be registered without touching the loss or the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The reference treats (1e-3, 1) as "no clipping": its resampling and bounds compare against these exact values.
DEFAULT_EPS_MIN = 1e-3
DEFAULT_EPS_MAX = 1.0


@dataclass(frozen=True)
class ClipWindow:
    """t is drawn from [eps_min, eps_max]; (1e-3, 1) is the unclipped default, (1, 1) gives t = 1 (all masked)."""

    eps_min: float = DEFAULT_EPS_MIN
    eps_max: float = DEFAULT_EPS_MAX

    def __post_init__(self) -> None:
        if not (0.0 < self.eps_min <= self.eps_max <= 1.0):  # also rejects NaN: every comparison is False
            raise ValueError(
                f"clip window needs 0 < eps_min <= eps_max <= 1, got [{self.eps_min}, {self.eps_max}]; "
                "set diffusion.eps_min/eps_max inside that range"
            )

    @property
    def is_default(self) -> bool:
        """True for the unclipped window, where block resampling is a no-op (as in the reference)."""
        return self.eps_min <= DEFAULT_EPS_MIN and self.eps_max >= DEFAULT_EPS_MAX


class LogLinearSchedule:
    """alpha(t) = 1 - t: the masking probability is t itself, and the NELBO weight is 1/t."""

    name = "loglinear"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still clean at time t."""
        return 1.0 - t

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time t (1 - alpha)."""
        return t

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)), the factor in front of the masked-token cross-entropy."""
        return 1.0 / t


_SCHEDULES: dict[str, type] = {"loglinear": LogLinearSchedule}


def get_schedule(name: str) -> LogLinearSchedule:
    """The schedule registered under ``name``."""
    if name not in _SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; available: {', '.join(sorted(_SCHEDULES))}")
    return _SCHEDULES[name]()
