"""Rotary position embeddings (RoPE, Su et al. 2021) in the rotate-half layout megatron-core and bd3lms use.

One table for the training model (``bd3_model.SharedRotary``), the single-device sampler network and the bd3lms HF
layout's ``rotary_emb.inv_freq``, so all three rotate by exactly the same angles.
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] fp32: base^(-2i / head_dim) for i < head_dim / 2 (head_dim even)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotation angles [S, head_dim] fp32 of integer positions [S], both halves repeated (rotate-half layout)."""
    freqs = torch.outer(positions.to(inv_freq.device, torch.float32), inv_freq)
    return torch.cat((freqs, freqs), dim=-1)
