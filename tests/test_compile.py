"""torch.compile of the transformer layers (model.compile) and compiled FlexAttention against the eager paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bd3_megatron.diffusion import ClipWindow, corrupt, masks
from bd3_megatron.model.build import compile_layers
from tests.helpers import MASK_ID, random_tokens, tiny_model

pytestmark = pytest.mark.slow  # one compile of each layer kind: tens of seconds on 2 cores


def test_compiled_layers_give_the_eager_loss_and_every_gradient(mcore):
    eager, compiled = tiny_model(16, 4), tiny_model(16, 4)
    compile_layers(compiled)
    x0 = random_tokens(3, 16, seed=2)
    c = corrupt(
        x0,
        torch.arange(3),
        step=1,
        seed=9,
        block_size=4,
        window=ClipWindow(),
        mask_token_id=MASK_ID,
        global_batch_size=3,
    )
    weight = torch.where(c.masked, 1.0 / c.t_tokens, torch.zeros_like(c.t_tokens))
    for model in (eager, compiled):
        model.train()
        model(c.xt, x0, c.masked, weight).nelbo_sum.backward()
    out_e, out_c = eager(c.xt, x0, c.masked, weight), compiled(c.xt, x0, c.masked, weight)
    torch.testing.assert_close(out_c.nelbo_sum, out_e.nelbo_sum, rtol=1e-5, atol=0)
    torch.testing.assert_close(out_c.ce, out_e.ce, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert dict(eager.state_dict()).keys() == dict(compiled.state_dict()).keys()  # checkpoints keep their names


@pytest.mark.skipif(not masks.flex_available(), reason="FlexAttention not available")
def test_compiled_flex_equals_dense_sdpa_on_cpu():
    """The cached BlockMask (full tiles marked full) through compiled flex_attention gives SDPA's output with the
    dense mask, for the whole x_t ⊕ x stream and for the noisy-query rows the last layer uses. (torch 2.14 has no
    CPU flex backward: CPU training runs SDPA, CUDA runs compiled flex.)"""
    from torch.nn.attention.flex_attention import flex_attention

    seq, block = 64, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 2 * seq, 16, generator=gen) for _ in range(3))
    flex = torch.compile(flex_attention, dynamic=False)
    full = masks.flex_block_mask(seq, block, "cpu", block_tile=32)
    dense = masks.bd3_mask(seq, block)
    torch.testing.assert_close(
        flex(q, k, v, block_mask=full), F.scaled_dot_product_attention(q, k, v, attn_mask=dense), rtol=1e-5, atol=1e-5
    )
    rows = masks.noisy_query_rows(full, seq)
    torch.testing.assert_close(
        flex(q[:, :, :seq], k, v, block_mask=rows),
        F.scaled_dot_product_attention(q[:, :, :seq], k, v, attn_mask=dense[:seq]),
        rtol=1e-5,
        atol=1e-5,
    )
