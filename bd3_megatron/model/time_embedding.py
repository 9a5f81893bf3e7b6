"""The time embedding of time-conditioned models (SEDD): sigma -> the adaLN conditioning vector c. torch only, so
the single-device sampler network shares it without megatron-core."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TIMESTEP_DIM = 256  # the reference TimestepEmbedder's sinusoid width
# the training model's name of its TimeEmbedding, a module replicated on every pipeline stage (checkpoints hold one
# copy per stage; readers keep the first stage's)
PIPELINE_REPLICATED_PREFIX = "time_embedding."


class TimeEmbedding(torch.nn.Module):
    """The reference ``TimestepEmbedder`` followed by silu (``c = F.silu(self.sigma_map(sigma))`` in its DiT):
    sigma [b] (total noise, any float dtype) -> c [b, cond_dim] = silu(mlp(cos ⊕ sin of sigma·10000^(-k/128))).

    The same module (and parameter names ``mlp.0``, ``mlp.2``) serves the training model, where it is replicated on
    every tensor- and pipeline-parallel rank (its gradients are summed over the pipeline; see
    ``bd3_model.mark_pipeline_replicated``), and the single-device sampler network."""

    def __init__(self, cond_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(TIMESTEP_DIM, cond_dim, dtype=dtype),
            torch.nn.SiLU(),
            torch.nn.Linear(cond_dim, cond_dim, dtype=dtype),
        )

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = TIMESTEP_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma[:, None].float() * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype)
        return F.silu(self.mlp(features))
