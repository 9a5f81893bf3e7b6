"""Invariant 4: every TP×PP×DP×ZeRO layout trains like the single process (same losses, same weights)."""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.dist_workers import merge_full_weights, train_layout

STEPS = 3
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(data_cache, tmp_path_factory):
    res = run_ranks(train_layout, 1, (1, 1, 1, 0), data_cache, str(tmp_path_factory.mktemp("ref")), STEPS)
    return res[0], merge_full_weights(res)


LAYOUTS = [
    (2, 1, 1, 0),
    (1, 2, 1, 0),
    (1, 1, 2, 1),
    (1, 1, 2, 2),
    (2, 2, 1, 0),
    (2, 1, 2, 1),
    (1, 2, 2, 1),
    (1, 1, 2, 0),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "tp{}_pp{}_dp{}_zero{}".format(*l))
def test_layout_matches_single_process(layout, reference, data_cache, tmp_path):
    ref, ref_weights = reference
    tp, pp, dp, _ = layout
    results = run_ranks(train_layout, tp * pp * dp, layout, data_cache, str(tmp_path), STEPS)
    last = next(r for r in results if r["last_stage"] and r["tp_rank"] == 0 and r["dp_rank"] == 0)
    torch.testing.assert_close(torch.tensor(last["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(last["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=0)
    assert last["val"]["val_nelbo"] == pytest.approx(ref["val"]["val_nelbo"], rel=1e-5)
    # the gradient-variance probe sees the same per-micro-batch gradients under every layout
    torch.testing.assert_close(torch.tensor(last["grad_vars"]), torch.tensor(ref["grad_vars"]), rtol=1e-4, atol=0)
    weights = merge_full_weights(results)
    assert set(weights) == set(ref_weights)
    for name, w in weights.items():
        # tensor-wise relative error: Adam's first updates are ~lr*g/sqrt(v), which magnifies the round-off of small
        # gradients (TP reduces in another order); the tensor as a whole must agree to 3e-4. Measured 2026-11-30 with
        # the Feistel data order: up to 1.4e-4 on zero-initialised LayerNorm biases and fc2 under TP=2 (the losses
        # above agree to 1e-5); with the earlier permutation order the largest was just under 1e-4
        rel = (w - ref_weights[name]).norm() / ref_weights[name].norm()
        assert rel < 3e-4, (name, float(rel))
    # data-parallel replicas hold identical weights
    for r in results:
        if r["dp_rank"] != 0:
            twin = next(
                o
                for o in results
                if o["dp_rank"] == 0 and o["tp_rank"] == r["tp_rank"] and o["pp_rank"] == r["pp_rank"]
            )
            for name, t in r["params"].items():
                assert torch.equal(t, twin["params"][name]), name


@pytest.mark.parametrize(
    "extra",
    [["model.mode=mdlm", "model.block_size=16"], ["model.mode=ar", "model.block_size=1"]],
    ids=["mdlm", "ar"],
)
def test_single_stream_modes_under_pipeline_parallelism(extra, data_cache, tmp_path):
    """The stages of mdlm and ar exchange [L, b, h] activations (one stream), not bd3's [2L, b, h]: the schedule's
    p2p shape comes from the mode. PP=2 trains like the single process."""
    ref = run_ranks(train_layout, 1, (1, 1, 1, 0), data_cache, str(tmp_path / "ref"), STEPS, extra)[0]
    results = run_ranks(train_layout, 2, (1, 2, 1, 0), data_cache, str(tmp_path / "pp2"), STEPS, extra)
    last = next(r for r in results if r["last_stage"])
    torch.testing.assert_close(torch.tensor(last["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    assert last["val"]["val_nelbo"] == pytest.approx(ref["val"]["val_nelbo"], rel=1e-5)
