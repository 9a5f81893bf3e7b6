"""bench/train_step.py: the bench runs end to end, its CPU memory accounting is exact on a known allocation pattern,
and the reference-equivalent baseline computes the SUBS NELBO of the reference network (checked by brute force)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import train_step
from bench.reference_model import ReferenceBD3, random_batch

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "bench/train_step.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.slow
def test_bench_runs_end_to_end_with_baseline(data_cache):
    proc = run_bench(
        "--layers",
        "2",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--seq-len",
        "16",
        "--block-size",
        "4",
        "--batch",
        "4",
        "--vocab",
        "bert-base-uncased",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--baseline",
        "model.dropout=0",
        f"data.cache_dir={data_cache}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    info = result["info"]
    assert info["device"] == "cpu" and info["vocab_size"] == 30522 and info["steps"] == 2 and info["commit"]
    assert info["config"]["model"]["num_layers"] == 2 and info["config"]["train"]["global_batch_size"] == 4
    useful = train_step.useful_flops(4, 2, 32, 128, 30522, 16, 4)
    for name in ("project", "baseline"):
        s = result[name]
        assert len(s["ms_all"]) == 2 and 0 < s["ms_min"] <= s["ms_median"] <= s["ms_max"]
        assert s["tokens_per_s"] == pytest.approx(4 * 16 / (s["ms_median"] / 1e3))
        assert s["flops_useful"] == useful and s["flops_executed"] > 0
        assert s["peak_memory_bytes"] > s["owned_bytes"] > 0
        assert s["mfu"] is None  # CPU: no matmul rate to compare with
    # the baseline runs the head on all 2L positions, the project on masked noisy ones: at V=30522 and d=32 the head
    # dominates, so the baseline must execute at least twice the project's FLOPs
    assert 0 < result["ratios"]["flops_executed"] < 0.5
    assert result["ratios"]["tokens_per_s_pair_median"] > 0 and result["ratios"]["peak_memory"] > 0
    assert "| this project" in proc.stdout and "| reference-equivalent" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_error_line():
    proc = run_bench("--device", "cuda", "--steps", "1")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no CUDA device" in errors[0], proc.stderr[-2000:]


def test_useful_flops_formula():
    # 6 P 2L + 6 V d L + 12 d n (L^2 + L L') per sequence, P = n (4 d^2 + 2 d ffn)
    p = 3 * (4 * 8 * 8 + 2 * 8 * 32)
    per_sequence = 6 * p * 32 + 6 * 50 * 8 * 16 + 12 * 8 * 3 * (256 + 64)
    assert train_step.useful_flops(2, 3, 8, 32, 50, 16, 4) == 2 * per_sequence


def test_cpu_memory_accounting_on_a_known_pattern():
    """A step that frees the block its previous call kept, allocates 1 MiB and 3 MiB, frees them and keeps a new
    1 MiB block: the live bytes rise at most 3 MiB above the step's start."""
    mib, kept = 2**20, {}

    def step():
        kept.pop("old", None)
        a = torch.empty(mib, dtype=torch.uint8).fill_(1)
        b = torch.empty(3 * mib, dtype=torch.uint8).fill_(1)
        del a, b
        kept["old"] = torch.empty(mib, dtype=torch.uint8)

    step()
    assert train_step.step_peak_above_start(step, torch.device("cpu")) == 3 * mib
    lin = torch.nn.Linear(64, 32)  # 64*32 + 32 floats, plus a gradient of the weight only
    lin(torch.randn(2, 64)).sum().backward()
    lin.bias.grad = None
    assert train_step.owned_tensor_bytes([lin], torch.device("cpu")) == 4 * (2 * 64 * 32 + 32)


# ---------------------------------------------------------------------------------------------- the baseline
def brute_force_logits(model: ReferenceBD3, xt: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The reference network in float64, query by query, with the BD3 mask written out from its definition
    (spec §1): same block and same half; noisy query -> clean keys of earlier blocks; clean -> clean blocks <= own."""
    w = {k: v.double() for k, v in model.state_dict().items()}
    n, bs, d = model.seq_len, model.block_size, model.vocab_embed.shape[1]
    heads, hd = model.blocks[0].heads, model.head_dim

    def ln(x, weight):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * weight

    def linear(x, name, bias=True):
        return x @ w[name + ".weight"].T + (w[name + ".bias"] if bias else 0)

    t_emb = torch.cat([torch.ones(128), torch.zeros(128)]).double()  # cos(0), sin(0) of the sigma = 0 embedding
    c = torch.nn.functional.silu(linear(torch.nn.functional.silu(linear(t_emb, "sigma_map.0")), "sigma_map.2"))
    inv = 1.0 / 10_000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)

    def rope(v, pos):  # v [heads, hd] at position pos, rotate-half
        ang = torch.cat([pos * inv, pos * inv])
        rot = torch.cat([-v[:, hd // 2 :], v[:, : hd // 2]], dim=-1)
        return v * torch.cos(ang) + rot * torch.sin(ang)

    def allowed(q, k):
        qc, kc, qb, kb = q >= n, k >= n, (q % n) // bs, (k % n) // bs
        return (qb == kb and qc == kc) or (not qc and kc and kb < qb) or (qc and kc and kb <= qb)

    out = []
    for b in range(xt.shape[0]):
        x = w["vocab_embed"][torch.cat([xt[b], x0[b]])]  # [2n, d]
        for i in range(len(model.blocks)):
            p = f"blocks.{i}."
            sh1, sc1, g1, sh2, sc2, g2 = linear(c, p + "adaLN_modulation").chunk(6)
            h = ln(x, w[p + "norm1.weight"]) * (1 + sc1) + sh1
            qkv = linear(h, p + "attn_qkv", bias=False).view(2 * n, 3, heads, hd)
            q = torch.stack([rope(qkv[j, 0], j % n) for j in range(2 * n)])
            k = torch.stack([rope(qkv[j, 1], j % n) for j in range(2 * n)])
            v = qkv[:, 2]
            att = torch.zeros(2 * n, heads, hd, dtype=torch.float64)
            for qi in range(2 * n):
                keys = [ki for ki in range(2 * n) if allowed(qi, ki)]
                scores = torch.einsum("hd,khd->hk", q[qi], k[keys]) / math.sqrt(hd)
                att[qi] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[keys])
            x = x + g1 * linear(att.reshape(2 * n, d), p + "attn_out", bias=False)
            m = ln(x, w[p + "norm2.weight"]) * (1 + sc2) + sh2
            hidden = torch.nn.functional.gelu(linear(m, p + "mlp.0"), approximate="tanh")
            x = x + g2 * linear(hidden, p + "mlp.2")
        shift, scale = linear(c, "final_adaLN").chunk(2)
        out.append(linear(ln(x, w["norm_final.weight"]) * (1 + scale) + shift, "linear")[:n])
    return torch.stack(out)


def test_baseline_loss_is_the_subs_nelbo_of_the_reference_network():
    torch.manual_seed(0)
    vocab, mask_id, n, bs = 13, 12, 8, 4
    model = ReferenceBD3(
        vocab, mask_id, num_layers=2, hidden_size=16, num_heads=2, seq_len=n, block_size=bs, cond_dim=8
    ).double()
    with torch.no_grad():  # non-trivial adaLN and head, so every term of the network matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    xt, x0, t = random_batch(torch.Generator().manual_seed(3), 3, n, bs, vocab, mask_id)
    assert (xt == mask_id).any() and (xt != mask_id).any()
    logits = brute_force_logits(model, xt, x0)
    torch.testing.assert_close(model.logits(xt, x0), logits, rtol=1e-9, atol=1e-9)
    # SUBS NELBO by hand: -log p(x0)/t at masked positions under a softmax without the mask token, 0 elsewhere,
    # averaged over all b*L tokens
    total = 0.0
    for b in range(xt.shape[0]):
        for pos in range(n):
            if xt[b, pos] == mask_id:
                z = torch.cat([logits[b, pos, :mask_id], logits[b, pos, mask_id + 1 :]]).logsumexp(0)
                total += -(float(logits[b, pos, x0[b, pos]]) - float(z)) / float(t[b, pos])
    expected = total / xt.numel()
    assert float(model.loss(xt, x0, t.double()).detach()) == pytest.approx(expected, rel=1e-9)
