"""The autoregressive baseline on the same backbone: x0 under a causal mask, token l predicted from the state at l-1."""

from __future__ import annotations

import torch

from bd3_megatron.diffusion import masks
from bd3_megatron.modes.base import ModelMode


class AR(ModelMode):
    """Causal next-token prediction (the clean half of the BD3 mask at L' = 1); no noise, no diffusion settings."""

    name = "ar"
    diffusion = False
    sampler_net = True  # as a scorer of samples (generative perplexity)

    def validate(self, cfg):
        if cfg.diffusion.clip_search:
            return "diffusion.clip_search has no meaning for model.mode=ar"
        return None

    def input_ids(self, xt, x0):
        return x0

    def attention_mask(self, seq_len, block_size, backend, device):
        return masks.block_causal_mask(seq_len, 1, device=device)

    def head_inputs(self, out, loss_mask):
        out = torch.cat([out[:, :1], out[:, :-1]], dim=1)  # the state at l-1 predicts token l
        loss_mask = loss_mask.clone()
        loss_mask[:, 0] = False  # position 0 has no prefix
        return out, loss_mask

    def make_batch(self, maker, x0, sample_index, step, *, window, resample, global_batch, seed, padding):
        """Predict every real token but the first from its prefix. The weight (tokens averaged over) / (tokens
        predicted), L/(L-1) without padding, makes the loss (Σ weight·CE / tokens) the mean NLL of the predicted
        tokens."""
        from bd3_megatron.training.batches import MicroBatch

        b, seq = x0.shape
        predicted = torch.ones_like(x0, dtype=torch.bool)
        predicted[:, 0] = False
        if padding is None:
            weight = predicted.float() * (seq / max(seq - 1, 1))
        else:
            predicted &= ~padding
            weight = predicted.float() * ((~padding).sum() / predicted.sum().clamp_min(1))
        t = torch.ones(b, seq // maker.cfg.model.block_size, device=x0.device)
        return MicroBatch(
            x0=x0, xt=x0, masked=predicted, weight=weight, t=t, sample_index=sample_index, padding=padding
        )
