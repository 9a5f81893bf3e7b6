"""MDLM and causal-AR baselines on the same megatron-core backbone."""

from __future__ import annotations

import torch

from bd3_megatron.diffusion import ClipWindow, block_causal_mask, corrupt
from bd3_megatron.model.bd3_model import BD3Model, BD3Spec, build_transformer_config, init_parameters
from tests.helpers import MASK_ID, VOCAB, random_tokens


def model(mode: str, seq_len: int, block_size: int) -> BD3Model:
    cfg = build_transformer_config(
        num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=None, dropout=0.0, tp=1, pp=1
    )
    m = BD3Model(
        cfg,
        BD3Spec(
            vocab_size=VOCAB,
            mask_token_id=MASK_ID,
            seq_len=seq_len,
            block_size=block_size,
            attention_backend="sdpa",
            mode=mode,
        ),
    )
    init_parameters(m, seed=0)
    return m.eval()


def test_mdlm_equals_bd3_with_one_block(mcore):
    """With L'=L the BD3 noisy half attends only to itself, so dropping the clean copy (MDLM) changes nothing."""
    x0 = random_tokens(2, 16)
    c = corrupt(
        x0, torch.arange(2), 0, seed=1, block_size=16, window=ClipWindow(), mask_token_id=MASK_ID, global_batch_size=2
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model("mdlm", 16, 16)(c.xt, x0, c.masked).ce,
            model("bd3", 16, 16)(c.xt, x0, c.masked).ce,
            rtol=1e-5,
            atol=1e-6,
        )


def test_ar_is_next_token_prediction(mcore):
    """The AR baseline's CE at l equals running the causal network on x0[:l] and reading the last state."""
    ar = model("ar", 12, 1)
    x0 = random_tokens(2, 12, seed=4)
    predicted = torch.ones_like(x0, dtype=torch.bool)
    with torch.no_grad():
        ce = ar(x0, x0, predicted).ce
        assert torch.all(ce[:, 0] == 0)
        for pos in range(1, 12):
            hidden = ar.encode(x0[:, :pos], torch.arange(pos), block_causal_mask(pos, 1))
            torch.testing.assert_close(
                ce[:, pos], ar.output_layer(hidden[pos - 1], labels=x0[:, pos]).ce, rtol=1e-5, atol=1e-6
            )


def test_baselines_train_and_evaluate(tmp_path, data_cache):
    import pytest

    from tests.test_train_e2e import metrics, run, tiny_args

    for mode, extra in (
        ("ar", ["model.block_size=1", "sample.length=16"]),
        ("mdlm", ["model.block_size=32", "sample.length=32"]),
    ):
        out = tmp_path / mode
        proc = run(
            tiny_args(
                out,
                data_cache,
                f"model.mode={mode}",
                *extra,
                "train.max_steps=12",
                "train.eval_interval=12",
                "checkpoint.interval=0",
            )
        )
        assert proc.returncode == 0, (mode, proc.stderr[-2000:])
        recs = metrics(out / "log")
        assert recs[12]["val_nelbo"] < recs[0]["val_nelbo"] - 0.5, mode  # it learns (nats per token)
        assert "samples: skipped" in proc.stdout
    with pytest.raises(Exception, match="block_size = model.seq_len"):
        from bd3_megatron.config import config_from_dict

        config_from_dict({}, ["model.mode=mdlm", "model.seq_len=32", "model.block_size=4"])
