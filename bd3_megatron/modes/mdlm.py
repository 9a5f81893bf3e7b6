"""MDLM (Sahoo et al., 2024): masked diffusion of the whole sequence, BD3-LM's L' = L case without the clean copy."""

from __future__ import annotations

from bd3_megatron.diffusion import masks
from bd3_megatron.modes.base import MaskedDiffusionMode


class MDLM(MaskedDiffusionMode):
    """x_t alone under full bidirectional attention (the noisy half of the BD3 mask at L' = L); one t per sequence."""

    name = "mdlm"

    def validate(self, cfg):
        m = cfg.model
        if m.block_size != m.seq_len:
            return f"model.mode=mdlm needs model.block_size = model.seq_len ({m.seq_len}), got {m.block_size}"
        return None

    def input_ids(self, xt, x0):
        return xt

    def attention_mask(self, seq_len, block_size, backend, device):
        return masks.bd3_mask(seq_len, seq_len, device=device)[:seq_len, :seq_len]
