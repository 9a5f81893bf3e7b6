"""Optimizer pieces that do not depend on the parallel engine: LR schedule and the EMA of weights."""

from __future__ import annotations

import math

import torch

from bd3_megatron.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then constant or cosine decay to ``min_lr`` at max_steps.

    ``step`` counts optimizer steps already taken (the LR used for update number step+1)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of this rank's parameter shards (so it is sharded exactly like the model).

    Decay warm-up as in the reference: ``min(decay, (1 + n) / (10 + n))`` after n updates."""

    def __init__(self, named_params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.restart(named_params)

    def restart(self, named_params: dict[str, torch.Tensor]) -> None:
        """Start over from the current weights (no updates yet), e.g. after loading another run's weights."""
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items()}

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor]) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        # one fused pass over all tensors; the same two ops per element as shadow.mul_(d).add_(p, alpha=1-d)
        shadows = [self.shadow[name] for name in named_params]
        params = [p.detach().float() for p in named_params.values()]
        torch._foreach_mul_(shadows, d)
        torch._foreach_add_(shadows, params, alpha=1.0 - d)

    @torch.no_grad()
    def swap_into(self, named_params: dict[str, torch.Tensor]) -> None:
        """Exchange model weights and EMA weights in place (call twice to restore)."""
        for name, p in named_params.items():
            tmp = p.detach().clone()
            p.copy_(self.shadow[name].to(p.dtype))
            self.shadow[name].copy_(tmp.float())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model (differing tensors: {sorted(missing)[:5]})")
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        for name, t in state["shadow"].items():
            self.shadow[name].copy_(t)
