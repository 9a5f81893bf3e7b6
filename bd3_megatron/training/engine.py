"""The optimizer engine behind the training loop.

``LocalEngine`` is the single-process engine (torch AdamW, global-norm clipping). The distributed engine (DeepSpeed
ZeRO over megatron-core's data-parallel group) implements the same four methods, so the loop does not change.
"""
from __future__ import annotations

import math

import torch

from bd3_megatron.config import OptimConfig


class LocalEngine:
    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, fused: bool = False):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        kwargs = {"fused": True} if fused else {}
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                           weight_decay=cfg.weight_decay, **kwargs)
        self.grad_clip = cfg.grad_clip

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, lr: float) -> tuple[float, bool]:
        """Clip and apply the accumulated gradients. Returns (grad norm, applied); a non-finite norm skips."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()
        if not math.isfinite(norm):
            self.zero_grad()
            return norm, False
        if self.grad_clip > 0 and norm > self.grad_clip:
            scale = self.grad_clip / (norm + 1e-6)
            for g in grads:
                g.mul_(scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.zero_grad()
        return norm, True

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
