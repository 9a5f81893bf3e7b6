"""The global gradient norm (fp32 partial norms, fp64 sum) against an all-fp64 reference."""

from __future__ import annotations

import torch

from bd3_megatron.training.engine import global_grad_norm


def test_piecewise_fp32_norm_equals_the_fp64_norm(mcore):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    # an embedding-like gradient: 30K x 256 with few non-zero rows and a wide dynamic range, where a whole-tensor
    # fp32 norm drifts by ~1e-5; plus dense layer-sized gradients
    model.emb = torch.nn.Parameter(torch.zeros(30592, 256))
    model.w1 = torch.nn.Parameter(torch.zeros(768, 256))
    model.w2 = torch.nn.Parameter(torch.zeros(1024, 256))
    model.ln = torch.nn.Parameter(torch.zeros(256))
    model.unused = torch.nn.Parameter(torch.zeros(3))  # no gradient: skipped
    emb_grad = torch.zeros(30592, 256)
    rows = torch.randint(0, 30592, (900,), generator=gen)
    emb_grad[rows] = torch.randn(900, 256, generator=gen) * torch.logspace(-6, 0, 900)[:, None]
    model.emb.grad = emb_grad
    model.w1.grad = torch.randn(768, 256, generator=gen) * 1e-2
    model.w2.grad = torch.randn(1024, 256, generator=gen) * 1e-3
    model.ln.grad = torch.randn(256, generator=gen)
    reference = sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None).sqrt().item()
    assert abs(global_grad_norm(model) - reference) / reference < 1e-6
