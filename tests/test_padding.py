"""`--pad` data: padding is known per row, travels with the global-index stream, and reaches neither the loss, its
gradients, the validation NELBO nor the clip-search block estimates (the reference masks LM1B padding the same way).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bd3_megatron.config import Config
from bd3_megatron.diffusion import masks
from bd3_megatron.diffusion.variance import block_has_tokens, block_means
from bd3_megatron.training.batches import BatchMaker
from bd3_megatron.training.step import kept_blocks, loss_from_head
from data_pipeline.dataset import InMemoryRows, ShuffledStream, padding_mask
from tests.helpers import MASK_ID, VOCAB, random_tokens, tiny_model

SEQ, BLOCK = 16, 4
PAD = 7  # the pad id of these synthetic rows (as EOS, it also closes each document)


def padded_rows(lengths: list[int], seed: int = 0, bos: int = 3) -> torch.Tensor:
    """--pad rows: BOS, text without the pad id, the closing EOS (= PAD), then PAD up to SEQ; `lengths` count BOS
    through EOS (SEQ: a truncated document, which fills its row)."""
    x = random_tokens(len(lengths), SEQ, seed=seed)
    x = torch.where(x == PAD, x + 1, x)
    x[:, 0] = bos
    for i, n in enumerate(lengths):
        x[i, n - 1 :] = PAD
    return x


def from_lengths(lengths: list[int]) -> torch.Tensor:
    return torch.arange(SEQ)[None, :] >= torch.tensor(lengths)[:, None]


def test_padding_mask_is_the_tail_after_the_closing_eos():
    rows = padded_rows([16, 9, 2, 5])
    assert torch.equal(padding_mask(rows, PAD), from_lengths([16, 9, 2, 5]))
    # the pad id inside the text (BERT encodes a literal "[SEP]" as 102) and as BOS (GPT-2's BOS is its EOS)
    rows[1, 3] = PAD
    rows[2:, 0] = PAD
    assert torch.equal(padding_mask(rows, PAD), from_lengths([16, 9, 2, 5]))
    assert padding_mask(padded_rows([16, 16]), PAD) is None  # truncated documents only: nothing to mask
    assert padding_mask(rows, None) is None  # wrapped data: never a mask


def test_prepared_pad_rows_carry_their_padding_through_the_stream(tmp_path):
    from data_pipeline.prepare import PrepareSettings, prepare
    from data_pipeline.readers import open_rows
    from data_pipeline.tokenizers import get_tokenizer

    tok = get_tokenizer("bert-base-uncased")
    texts = ["alpha beta", "a [SEP] b gamma", " ".join(["delta"] * 40), "epsilon zeta eta", "theta"]
    (tmp_path / "docs").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "docs" / f"{i}.txt").write_text(t)
    prepare(
        PrepareSettings(
            input=str(tmp_path / "docs"),
            output=str(tmp_path / "out"),
            tokenizer=tok.name,
            seq_len=SEQ,
            pack="pad",
            val_docs=1,
            progress=False,
        )
    )
    rows = open_rows(str(tmp_path / "out"), "train", tok.name, SEQ)
    assert rows.pad_token_id == tok.eos_token_id
    stream = ShuffledStream(rows, seed=3)
    x0, padding = stream.get_with_padding(np.arange(8))  # two epochs of 4 rows
    lengths = {t: min(len(tok.encode(t)) + 2, SEQ) for t in texts[:4]}  # BOS text EOS, truncated to the row
    for row, pad in zip(x0, padding):
        text = next(t for t in texts[:4] if row[1:3].tolist() == tok.encode(t)[:2])
        assert torch.equal(pad, torch.arange(SEQ) >= lengths[text])
    wrapped = ShuffledStream(InMemoryRows(np.arange(64).reshape(4, SEQ)), seed=3)
    assert wrapped.pad_token_id is None and wrapped.get_with_padding(np.arange(4))[1] is None


def batch_maker(mode: str = "bd3") -> BatchMaker:
    cfg = Config()
    cfg.model.seq_len, cfg.model.block_size, cfg.model.mode = SEQ, BLOCK if mode == "bd3" else 1, mode
    cfg.train.global_batch_size = 4
    return BatchMaker(cfg, MASK_ID, torch.device("cpu"))


def loss_and_grads(model, batch, block_size: int = BLOCK, use_padding: bool = True):
    model.zero_grad(set_to_none=True)
    out = model(batch.xt, batch.x0, batch.masked, batch.weight, batch.padding if use_padding else None)
    loss, report = loss_from_head(batch, block_size, out)
    loss.backward()
    return loss.detach(), report, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["bd3", "ar"])
def test_padding_values_change_neither_loss_nor_gradients(mcore, mode):
    """The same rows with other values at padded positions (pad id vs random ids, mask id included): equal loss and
    equal gradient of every parameter (fp32). Without the key-padding mask they differ, so the test can fail."""
    model = tiny_model(SEQ, BLOCK if mode == "bd3" else 1, noisy_half_last_layer=mode == "bd3")
    model.spec = dataclasses.replace(model.spec, mode=mode)
    lengths = [16, 9, 6, 2]
    clean = padded_rows(lengths)
    padding = padding_mask(clean, PAD)
    garbage = torch.where(
        padding, torch.randint(0, VOCAB, clean.shape, generator=torch.Generator().manual_seed(5)), clean
    )
    maker, idx = batch_maker(mode), torch.arange(4)
    a = maker.corrupt(clean, idx, 3, padding=padding)
    b = maker.corrupt(garbage, idx, 3, padding=padding)
    assert not a.masked[padding].any() and not (a.weight[padding] != 0).any()
    assert torch.equal(a.masked, b.masked) and a.masked.any()
    loss_a, report, grads_a = loss_and_grads(model, a, model.spec.block_size)
    loss_b, _, grads_b = loss_and_grads(model, b, model.spec.block_size)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)
    assert float(report["tokens"]) == sum(lengths)
    if mode == "bd3":  # (ar is causal and padding comes last: no real token could see it anyway)
        unmasked_b, _, _ = loss_and_grads(model, b, model.spec.block_size, use_padding=False)
        assert not torch.allclose(loss_a, unmasked_b)


def naive_document_ce(model, xt: torch.Tensor, x0: torch.Tensor, n: int) -> torch.Tensor:
    """Independent reference for one row's first n (real) tokens: block by block, the model over clean x0[<lo] then
    noisy xt[lo:hi] (hi = min(block end, n)) at positions 0.. under an ordinary block-causal mask; no 2L layout and
    no padding at all. Returns the CE [n] of the masked tokens (0 elsewhere)."""
    ce = torch.zeros(n)
    for lo in range(0, n, BLOCK):
        hi = min(lo + BLOCK, n)
        blk = torch.arange(hi) // BLOCK
        hidden = model.encode(torch.cat([x0[:lo], xt[lo:hi]])[None], torch.arange(hi), blk[:, None] >= blk[None, :])
        masked = xt[lo:hi] == MASK_ID
        if masked.any():
            ce[lo:hi][masked] = model.output_layer(hidden[lo:hi, 0][masked], labels=x0[lo:hi][masked]).ce
    return ce


def test_padded_rows_score_as_their_documents_alone(mcore):
    """Each row's CE at every real token equals the naive reference over the document alone (partial last blocks
    included), and the validation NELBO sums (weighted_sum / tokens) and the clip-search block estimates count real
    tokens only."""
    model = tiny_model(SEQ, BLOCK)
    lengths = [16, 9, 6, 12]
    x0 = padded_rows(lengths, seed=1)
    batch = batch_maker().corrupt(x0, torch.arange(4), 0, padding=padding_mask(x0, PAD))
    with torch.no_grad():
        out = model(batch.xt, batch.x0, batch.masked, batch.weight, batch.padding)
        ce = out.ce
        _, report = loss_from_head(batch, BLOCK, out)
        want_sum = 0.0
        every_row = tiny_model(SEQ, BLOCK, noisy_half_last_layer=False)  # same weights; encode returns every row
        for i, n in enumerate(lengths):
            alone = naive_document_ce(every_row, batch.xt[i], x0[i], n)
            torch.testing.assert_close(ce[i, :n], alone, rtol=1e-5, atol=1e-5)
            assert not ce[i, n:].any()
            want_sum += float((alone * batch.weight[i, :n]).sum())
    assert float(report["weighted_sum"]) == pytest.approx(want_sum, rel=1e-5)
    assert float(report["tokens"]) == sum(lengths)
    weighted = ce * batch.weight
    keep = report["block_keep"]
    assert keep.tolist() == [[True] * 4, [True, True, True, False], [True, True, False, False], [True] * 3 + [False]]
    for i, n in enumerate(lengths):  # the mean over each block's real tokens
        for k in range(-(-n // BLOCK)):
            lo, hi = k * BLOCK, min((k + 1) * BLOCK, n)
            assert float(report["block_losses"][i, k]) == pytest.approx(float(weighted[i, lo:hi].mean()), rel=1e-6)
    assert kept_blocks(report, "block_losses").numel() == int(keep.sum()) == 12


def test_block_means_over_real_tokens():
    terms = torch.arange(8.0)[None]
    real = torch.tensor([[True, True, True, True, True, False, False, False]])
    assert torch.equal(block_means(terms, 4, real), torch.tensor([[1.5, 4.0]]))  # (4) / 1 real token
    assert torch.equal(block_has_tokens(real, 4), torch.tensor([[True, True]]))
    assert torch.equal(block_means(terms, 4, torch.ones_like(real)), block_means(terms, 4))


@pytest.mark.skipif(not masks.flex_available(), reason="FlexAttention not available")
def test_padded_flex_forward_equals_padded_sdpa_on_cpu(mcore):
    """The per-batch flex BlockMask with padding keys (eager, forward only on CPU) gives the dense SDPA path's CE."""
    from bd3_megatron.diffusion import ClipWindow, corrupt

    seq, block = 128, 8
    sdpa, flex = tiny_model(seq, block, backend="sdpa"), tiny_model(seq, block, backend="flex")
    x0 = random_tokens(2, seq, seed=7)
    padding = torch.arange(seq)[None, :] >= torch.tensor([[37], [128]])
    c = corrupt(
        x0,
        torch.arange(2),
        step=3,
        seed=2,
        block_size=block,
        window=ClipWindow(),
        mask_token_id=MASK_ID,
        global_batch_size=2,
    )
    masked = c.masked & ~padding
    with torch.no_grad():
        torch.testing.assert_close(
            flex(c.xt, x0, masked, None, padding).ce, sdpa(c.xt, x0, masked, None, padding).ce, rtol=1e-4, atol=1e-5
        )


@pytest.mark.slow
def test_trainer_on_pad_data_trains_evaluates_and_searches(tmp_path, data_cache):
    """`--pad` shards through the real trainer (DeepSpeed step, validation, clip search): finite and learning."""
    import json

    from data_pipeline.corpus import embedded_corpus_files
    from data_pipeline.prepare import PrepareSettings, prepare
    from tests.test_train_e2e import metrics, run, tiny_args

    lines = [ln.strip() for f in embedded_corpus_files()[:3] for ln in f.read_text().splitlines() if ln.strip()]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": ln}) + "\n" for ln in lines))
    shards = tmp_path / "pad"
    manifest = prepare(
        PrepareSettings(
            input=str(tmp_path / "docs.jsonl"),
            output=str(shards),
            tokenizer="bert-base-uncased",
            seq_len=32,
            pack="pad",
            val_docs=16,
            progress=False,
        )
    )
    assert manifest["splits"]["train"]["truncated_docs"] < manifest["splits"]["train"]["docs"]  # real padding
    proc = run(
        tiny_args(
            tmp_path,
            data_cache,
            f"data.path={shards}",
            "data.tokenizer=bert-base-uncased",
            "train.max_steps=6",
            "train.eval_interval=3",
            "diffusion.clip_search=true",
            "diffusion.clip_search_widths=[0.5]",
            "diffusion.clip_search_delta=0.25",
            "sample.after_train=false",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = metrics(tmp_path / "log")
    assert all(np.isfinite(recs[s]["loss"]) for s in range(1, 7))
    assert np.isfinite(recs[6]["val_nelbo"]) and recs[6]["val_nelbo"] < recs[0]["val_nelbo"]
    assert "clip_window" in recs[6] and all(np.isfinite(v) for k, v in recs[6].items() if k.startswith("clip_var/"))
