"""Small builders shared by tests (not fixtures: plain functions)."""

from __future__ import annotations

import torch

from bd3_megatron.model.bd3_model import BD3Model, BD3Spec, build_transformer_config, init_parameters

VOCAB = 61  # small fake vocabulary; id 60 is the mask token
MASK_ID = 60


def tiny_model(
    seq_len: int = 16,
    block_size: int = 4,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    seed: int = 0,
    backend: str = "sdpa",
    noisy_half_last_layer: bool = True,
    recompute: bool = False,
    dropout: float = 0.0,
    mode: str = "bd3",
    arch: str = "megatron",
    cond_dim: int = 0,
) -> BD3Model:
    """A 2-layer megatron-core BD3 model on a 61-token vocabulary, weights keyed by ``seed``. With
    ``noisy_half_last_layer=False`` the last layer returns every row, so ``encode`` can run arbitrary sequences
    (the naive references) with the same weights."""
    cfg = build_transformer_config(
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        ffn_hidden_size=None,
        dropout=dropout,
        tp=1,
        pp=1,
        add_bias_linear=arch == "bd3lms",
    )
    spec = BD3Spec(
        vocab_size=VOCAB,
        mask_token_id=MASK_ID,
        seq_len=seq_len,
        block_size=block_size,
        attention_backend=backend,
        noisy_half_last_layer=noisy_half_last_layer,
        recompute=recompute,
        mode=mode,
        arch=arch,
        cond_dim=cond_dim,
    )
    model = BD3Model(cfg, spec)
    init_parameters(model, seed)
    return model.eval()


def random_tokens(b: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MASK_ID, (b, seq_len), generator=torch.Generator().manual_seed(seed))


def sorted_nucleus_filter(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Reference top-p by a full sort: the smallest set of tokens whose mass reaches p (always the top one),
    renormalised. The sampler's partial-ordering nucleus is tested against it."""
    if p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    keep = (cum - sorted_p) < p  # tokens before which the mass is still below p
    keep[..., 0] = True
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return filtered / filtered.sum(-1, keepdim=True)
