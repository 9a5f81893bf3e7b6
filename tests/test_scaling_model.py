"""bench/scaling_model.py: the cost formulas against hand-computed values, and every collective the real gloo training
step makes (DeepSpeed ZeRO-1/2 gradients and parameters, megatron TP all-reduces, pipeline p2p, our scalars) against
the model's prediction, byte for byte, at 2 and 4 processes."""

from __future__ import annotations

import pytest

from bench.scaling_model import (
    GLOO_LAYOUTS,
    Layout,
    Links,
    ModelShape,
    allgather_time,
    allreduce_time,
    bubble_fraction,
    format_check,
    gloo_check,
    group_link,
    main,
    step_time,
)

SHAPE = ModelShape(layers=12, hidden=768, ffn=3072, vocab=50258, seq_len=1024, mean_t=0.5)


def test_ring_costs_by_hand():
    # 1 GB over 8 ranks at 100 GB/s: all-reduce sends 2 x 7/8 GB per rank, all-gather 7/8 GB; plus one latency each
    assert allreduce_time(1e9, 8, 100e9, 1e-5) == pytest.approx(2 * 7 / 8 * 1e-2 + 1e-5)
    assert allgather_time(1e9, 8, 100e9, 1e-5) == pytest.approx(7 / 8 * 1e-2 + 1e-5)
    assert allreduce_time(1e9, 1, 100e9, 1e-5) == 0.0
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)


def test_group_links():
    links = Links()
    assert group_link(8, 1, links) == pytest.approx((450e9, 10e-6))  # a full node: NVLink
    assert group_link(16, 1, links) == pytest.approx((400e9, 30e-6))  # 2 nodes, 8 members each: 8 NICs' worth of rings
    assert group_link(16, 8, links) == pytest.approx((50e9, 30e-6))  # one member per node: one NIC
    assert group_link(16, 2, Links(flat_ib=True)) == pytest.approx((50e9, 30e-6))


def test_step_time_limits():
    """With free links only compute and the pipeline bubble remain: efficiency 1 without a pipeline, m/(m+p-1) with."""
    free = Links(nvlink_gbps=1e12, ib_gbps=1e12, intra_latency_us=0, inter_latency_us=0)
    r = step_time(SHAPE, Layout(1, 1, 128, 1, 4, 1), free, 0.01)
    assert r["efficiency"] == pytest.approx(1.0, abs=1e-6)
    assert r["ideal_s"] == pytest.approx(0.04)
    assert r["tokens_per_s"] == pytest.approx(128 * 4 * 1024 / r["step_s"])
    r = step_time(SHAPE, Layout(1, 4, 32, 1, 4, 8), free, 0.01)
    assert r["efficiency"] == pytest.approx(8 / 11, rel=1e-6)


def test_bad_input_is_one_error_line(capsys):
    assert main(["--step-ms", "0"]) == 2
    assert capsys.readouterr().err.count("error:") == 1
    assert main(["--gpus", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: global batch 512") and err.count("\n") == 1


@pytest.mark.slow
def test_gloo_bytes_match_model(data_cache, tmp_path):
    """Every kind of collective on every rank: the counted calls and payload bytes of one real training step equal the
    model's, exactly (sizes include the vocabulary padding per tp and DeepSpeed's flat-buffer alignment)."""
    rows = gloo_check(data_cache, str(tmp_path), GLOO_LAYOUTS)
    assert {r["layout"] for r in rows} == set(GLOO_LAYOUTS) and len(rows) == 16
    kinds = set().union(*(r["counted"] for r in rows))
    # the counter saw DeepSpeed's, megatron's and the trainer's collectives
    assert kinds == {"dp_grad_allreduce", "dp_param_allgather", "tp_allreduce", "pp_send", "pp_recv", "scalars"}
    for r in rows:
        assert r["counted"] == r["predicted"], format_check([r])
