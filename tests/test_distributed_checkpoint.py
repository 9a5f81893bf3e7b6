"""Multi-rank checkpoints: exact resume under ZeRO/TP/PP, refusal of mismatched layouts."""

from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.dist_workers import resume_and_continue, save_then_continue

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "layout", [(1, 1, 2, 1), (2, 1, 1, 0), (1, 2, 1, 0)], ids=lambda l: "tp{}_pp{}_dp{}_zero{}".format(*l)
)
def test_resume_continues_bit_identically(layout, data_cache, tmp_path):
    world = layout[0] * layout[1] * layout[2]
    ref = run_ranks(save_then_continue, world, layout, data_cache, str(tmp_path))
    got = run_ranks(resume_and_continue, world, layout, data_cache, str(tmp_path))
    assert all(g["step"] == 2 for g in got)
    for r, g in zip(ref, got):
        if r["last_stage"]:
            assert g["losses"] == r["losses"] and g["norms"] == r["norms"]
        for name, t in r["params"].items():
            assert torch.equal(g["params"][name], t), name


def test_resume_with_another_layout_is_refused(data_cache, tmp_path):
    run_ranks(save_then_continue, 2, (1, 1, 2, 1), data_cache, str(tmp_path))
    with pytest.raises(AssertionError, match="was saved with tp=1 pp=1 dp=2"):
        run_ranks(resume_and_continue, 1, (1, 1, 1, 1), data_cache, str(tmp_path))


@pytest.mark.parametrize(
    "saved,loaded",
    [((2, 2, 1, 0), (1, 1, 1, 0)), ((1, 1, 1, 0), (2, 1, 1, 0)), ((2, 1, 1, 0), (1, 2, 1, 0))],
    ids=["tp2pp2_to_1", "1_to_tp2", "tp2_to_pp2"],
)
def test_weights_reshard_across_layouts(saved, loaded, data_cache, tmp_path):
    from tests.dist_workers import reshard_and_eval, save_and_eval

    before = run_ranks(save_and_eval, saved[0] * saved[1] * saved[2], saved, data_cache, str(tmp_path))
    after = run_ranks(reshard_and_eval, loaded[0] * loaded[1] * loaded[2], loaded, data_cache, str(tmp_path))
    want = next(r["val"] for r in before if r["last_stage"])
    got = next(r for r in after if r["last_stage"])
    assert got["step"] == 2
    assert got["val"]["val_nelbo"] == pytest.approx(want["val_nelbo"], rel=1e-5)  # EMA weights resharded too


@pytest.mark.parametrize("layout", [(1, 1, 2, 1), (1, 2, 1, 0)], ids=["dp2_zero1", "pp2_zero0"])
def test_non_finite_steps_are_skipped_then_training_stops(layout, data_cache, tmp_path):
    from tests.dist_workers import nan_steps

    for r in run_ranks(nan_steps, layout[0] * layout[1] * layout[2], layout, data_cache, str(tmp_path)):
        assert r["skipped"] == 1 and r["unchanged"]
        assert "consecutive non-finite steps" in r["stopped"]
        if r["last_stage"]:
            assert r["good_loss"] == r["good_loss"]  # finite again after the poisoned step


@pytest.mark.parametrize("layout", [(1, 1, 1, 0), (1, 1, 2, 1), (1, 1, 2, 2)], ids=["zero0", "dp2_zero1", "dp2_zero2"])
def test_an_update_that_overflows_the_weights_is_not_applied(layout, data_cache, tmp_path):
    from tests.dist_workers import guarded_normal_steps, overflow_steps

    world = layout[0] * layout[1] * layout[2]
    for r in run_ranks(overflow_steps, world, layout, data_cache, str(tmp_path)):
        assert r["refused"] == 3 and r["grads_finite"]  # refused for the update alone, until max_bad_steps
        assert r["kept"]  # bit for bit: weights and optimizer state
        assert r["exact_steps"] == 3 and r["finite"] and 0 < r["moved"] < 1  # decay back to 0: applied again
    for r in run_ranks(guarded_normal_steps, world, layout, data_cache, str(tmp_path)):
        assert r["exact_steps"] == 0  # ordinary steps: proven finite on the host, no copy, no extra sync
        assert all(m <= b for m, b in zip(r["measured"], r["bound"]))  # the bound holds the real maxima
