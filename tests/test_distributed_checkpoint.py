"""Multi-rank checkpoints: exact resume under ZeRO/TP/PP, refusal of mismatched layouts."""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.dist_workers import resume_and_continue, save_then_continue

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("layout", [(1, 1, 2, 1), (2, 1, 1, 0), (1, 2, 1, 0)],
                         ids=lambda l: "tp{}_pp{}_dp{}_zero{}".format(*l))
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
