"""Block-autoregressive sampling without a KV cache (the cached single-GPU sampler builds on the same updates).

For block s the model sees x_t ⊕ x0 truncated to the first (s+1) blocks: the clean half holds the tokens decoded
so far and the noisy half holds the current block's partially masked state. Under the BD3 mask noisy block s
attends only to itself and to clean blocks < s, so the other noisy blocks never influence it. Each block is
denoised in ``steps`` DDPM-style steps on a linear t grid from 1 to 0 (SUBS: decoded tokens are carried over; at
t -> s each still-masked token is revealed with probability (t - s) / t). Beyond ``model.seq_len`` the context
slides forward one block at a time, re-based to position 0.
"""
from __future__ import annotations

from typing import Callable

import torch

# logits_fn(xt [b, P], x0 [b, P], start, end) -> logits [b, end-start, V] of noisy positions [start, end)
LogitsFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def nucleus_filter(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose mass reaches p (always the top one), renormalised."""
    if p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    keep = (cum - sorted_p) < p  # tokens before which the mass is still below p
    keep[..., 0] = True
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return filtered / filtered.sum(-1, keepdim=True)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flat = probs.reshape(-1, probs.shape[-1]).double()
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def denoise_block(logits_fn: LogitsFn, prefix: torch.Tensor, block_size: int, mask_id: int, steps: int,
                  nucleus_p: float, generator: torch.Generator) -> torch.Tensor:
    """Denoise one block that follows the clean ``prefix`` [b, P]; returns the block's tokens [b, L']."""
    b, p_len = prefix.shape
    block = torch.full((b, block_size), mask_id, dtype=torch.long, device=prefix.device)
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for i in range(steps):
        masked = block == mask_id
        if not masked.any():
            break
        t, s = ts[i], ts[i + 1]
        xt = torch.cat([prefix, block], dim=1)
        x0 = torch.cat([prefix, block], dim=1)  # the current clean block is never read by noisy block s
        logits = logits_fn(xt, x0, p_len, p_len + block_size).float()
        probs = nucleus_filter(torch.softmax(logits, dim=-1), nucleus_p)
        proposal = sample_categorical(probs.cpu(), generator).to(block.device)
        reveal_u = torch.rand(block.shape, generator=generator).to(block.device)
        reveal = masked & (reveal_u < (t - s) / t)
        block = torch.where(reveal, proposal, block)
    return block


@torch.no_grad()
def sample(logits_fn: LogitsFn, *, num_samples: int, length: int, block_size: int, context_len: int, mask_id: int,
           steps: int, nucleus_p: float = 1.0, seed: int = 0, device: torch.device | str = "cpu",
           prompt: torch.Tensor | None = None) -> torch.Tensor:
    """Generate ``num_samples`` sequences of ``length`` tokens (a multiple of block_size)."""
    if length % block_size:
        raise ValueError(f"length {length} must be a multiple of block_size {block_size}")
    if context_len % block_size:
        raise ValueError(f"context length {context_len} must be a multiple of block_size {block_size}")
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty((num_samples, 0), dtype=torch.long, device=device) if prompt is None else prompt.to(device)
    while out.shape[1] < length:
        keep = context_len - block_size  # the context holds whole previous blocks
        start = max(0, out.shape[1] - keep)
        start += (out.shape[1] - start) % block_size  # align the window to block boundaries
        block = denoise_block(logits_fn, out[:, start:], block_size, mask_id, steps, nucleus_p, gen)
        out = torch.cat([out, block], dim=1)
    return out[:, :length]
