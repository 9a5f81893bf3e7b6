"""Sampling a SEDD model (``model.mode=sedd``) with the reference's analytic sampler, through the sampler network.

SEDD denoises the whole context at once: the sequence is the prompt followed by masked positions up to the model's
context L (``seq_len``), and ``steps`` Tweedie tau-leaping steps from t = 1 to 1e-5 plus one denoising step unmask
it (``diffusion.sedd.analytic_sample``; the reference's SEDD baseline runs 1000 steps for L = 1024). Every sample
makes steps + 1 network calls (NFE), whatever its length. With ``var_length`` a sample ends at its first EOS after
the prompt or where the entropy of its last tokens collapses, like the block sampler's samples, so at most L tokens.
Sample i draws from the generator (seed, i) alone, so the batch size changes speed, not samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from bd3_megatron.diffusion.sedd import analytic_sample, sedd_log_score
from bd3_megatron.sampling.kv_sampler import (
    SampleOptions,
    SampleResult,
    SampleStats,
    prompt_rows,
    sample_generator,
    stop_check,
)
from bd3_megatron.sampling.net import BD3Net


@torch.inference_mode()
def generate_sedd(
    net: BD3Net,
    num_samples: int,
    opts: SampleOptions,
    prompt: Sequence[int] | torch.Tensor | None = None,
    first_index: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> SampleStats:
    """``num_samples`` samples of ``opts.length`` tokens after ``prompt`` (ids [p] shared, or [n, p]) from a
    time-conditioned sampler network. ``opts.steps`` analytic steps (default: the context length L), nucleus
    ``opts.nucleus_p`` as the reference's ``get_score``; block size, schedule and KV cache do not apply.
    Raises ValueError when prompt + length exceed the context or the prompt holds invalid ids."""
    opts.validate()
    cfg = net.cfg
    if not cfg.time_conditioning:
        raise ValueError(f"the SEDD sampler needs a time-conditioned model; this one is model.mode={cfg.mode}")
    device = next(net.parameters()).device
    mask_id = cfg.mask_token_id
    prompt_t = prompt_rows(prompt, num_samples, cfg)
    p = prompt_t.shape[1]
    if p + opts.length > cfg.seq_len:
        raise ValueError(
            f"SEDD generates inside its context of {cfg.seq_len} tokens: prompt ({p}) + length ({opts.length}) "
            f"must be <= {cfg.seq_len}"
        )
    steps = opts.steps or cfg.seq_len
    x = torch.full((num_samples, cfg.seq_len), mask_id, dtype=torch.long)
    x[:, :p] = prompt_t
    gens = [sample_generator(opts.seed, first_index + i, device) for i in range(num_samples)]

    def log_scores(xt: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        dtype = next(net.parameters()).dtype
        logits = net.full_logits(xt, sigma.to(dtype))
        return sedd_log_score(logits, xt, sigma, mask_id, valid_vocab=cfg.vocab_size)

    t0 = time.perf_counter()
    out = analytic_sample(
        log_scores, x.to(device), steps, mask_id, nucleus_p=opts.nucleus_p, generator=gens, progress=progress
    )
    seconds = time.perf_counter() - t0
    stats = SampleStats(model_calls=steps + 1, seconds=seconds)
    for i, row in enumerate(out[:, : p + opts.length].tolist()):
        reason, keep = "length", len(row)
        if opts.var_length:
            found, cut = stop_check(row, p, opts, p)
            if found is not None:
                reason, keep = found, cut
        stats.results.append(SampleResult(first_index + i, row[:keep], p, steps + 1, reason, seconds))
    stats.tokens = sum(len(r.generated) for r in stats.results)
    return stats
