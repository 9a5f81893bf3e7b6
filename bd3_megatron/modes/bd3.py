"""BD3-LM (Arriola et al., 2025): block diffusion over x_t ⊕ x0 with the block-causal x_t ⊕ x mask (paper §3)."""

from __future__ import annotations

import torch

from bd3_megatron.modes.base import MaskedDiffusionMode, dense_or_flex


class BD3(MaskedDiffusionMode):
    """Noisy block b attends its own noisy block and the clean blocks < b; clean blocks attend clean blocks <= b
    (the mask of paper Fig. 2 / bd3lms ``block_diff_mask``), so one forward scores every block's NELBO term."""

    name = "bd3"
    streams = 2
    block_sampler = True
    sampler_net = True
    noisy_half_last_layer = True  # nothing reads the clean half of the last layer's output

    def input_ids(self, xt, x0):
        return torch.cat([xt, x0], dim=1)

    def attention_mask(self, seq_len, block_size, backend, device):
        return dense_or_flex(seq_len, block_size, backend, device)
