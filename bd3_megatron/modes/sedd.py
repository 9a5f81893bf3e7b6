"""SEDD (Lou et al., 2024) with the absorbing state: the reference's SEDD baseline on the shared backbone.

Score entropy discrete diffusion of the whole sequence (one t per sequence, no clean copy, full attention, as MDLM)
whose backbone is conditioned on the total noise sigma (the reference's ``algo.time_conditioning: True``: the
``model.arch=bd3lms`` adaLN layers with a time embedding) and whose head outputs log concrete scores, trained on the
denoising score entropy weighted by dsigma (``bd3_megatron.diffusion.sedd`` has the math and its derivation).

A micro-batch carries the mask drawn as for MDLM (masking probability t, t ~ U[eps_min, eps_max]; SEDD's
``LogLinearNoise`` moves a token with probability t, like the log-linear schedule), ``sigma`` [b] =
min(-log(1 - t), sigma_max) for the conditioning, and NELBO weights dsigma = expm1(sigma) / t on masked tokens; the
head (``model.head``) turns logits into the per-token score entropy in its fused pass, so Σ weight·value / tokens is
SEDD's NELBO per token: the training loss and, over test rows and K draws, the perplexity bound.
"""

from __future__ import annotations

import torch

from bd3_megatron.diffusion.sedd import SEDDLogLinearNoise
from bd3_megatron.modes.base import MaskedDiffusionMode
from bd3_megatron.modes.mdlm import MDLM


class SEDD(MaskedDiffusionMode):
    """x_t alone under full bidirectional attention, conditioned on sigma; score-entropy head."""

    name = "sedd"
    sampler_net = True  # tools/convert.py exports it; tools/sample.py runs the reference's analytic sampler
    time_conditioned = True
    score_entropy = True
    noise = SEDDLogLinearNoise()

    def validate(self, cfg):
        m, d = cfg.model, cfg.diffusion
        if m.block_size != m.seq_len:
            return f"model.mode=sedd needs model.block_size = model.seq_len ({m.seq_len}), got {m.block_size}"
        if m.arch != "bd3lms":
            return "model.mode=sedd needs model.arch=bd3lms (time conditioning lives in the adaLN layers)"
        if d.clip_search:
            return "model.mode=sedd trains on the full window: set diffusion.clip_search=false"
        return None

    def input_ids(self, xt, x0):
        return xt

    attention_mask = MDLM.attention_mask

    def make_batch(self, maker, x0, sample_index, step, *, window, resample, global_batch, seed, padding):
        """The MDLM draw (keyed by seed, sample index and step), then sigma [b] and the weights dsigma [b, L]."""
        batch = super().make_batch(
            maker,
            x0,
            sample_index,
            step,
            window=window,
            resample=resample,
            global_batch=global_batch,
            seed=seed,
            padding=padding,
        )
        t = batch.t[:, 0].float()  # one t per sequence (block size L)
        sigma, dsigma = self.noise.sigma_dsigma(t)
        batch.weight = torch.where(batch.masked, dsigma[:, None], torch.zeros_like(batch.weight))
        batch.sigma = sigma
        return batch
