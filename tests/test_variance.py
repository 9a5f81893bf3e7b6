"""Clip-window search: the estimator, the grid, the search, and layout independence on a real model."""

from __future__ import annotations

import pytest
import torch

from bd3_megatron.diffusion.schedule import ClipWindow
from bd3_megatron.diffusion.variance import (
    block_means,
    clip_window_grid,
    search_clip_window,
    variance_score,
    window_label,
)


def test_variance_score_closed_form():
    a = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    b = torch.tensor([[2.0, 2.0], [2.0, 4.0]])
    # pooled values 1,3,5,7,2,2,2,4: mean 3.25, squared deviations sum 27.5, unbiased variance 27.5 / 7
    assert variance_score([a, b]) == pytest.approx(27.5 / 7)
    assert variance_score([torch.cat([a.flatten(), b.flatten()])]) == variance_score([a, b])  # grouping-free
    with pytest.raises(ValueError):
        variance_score([torch.tensor([1.0])])


def test_block_means():
    terms = torch.arange(8.0).view(1, 8)
    assert torch.equal(block_means(terms, 4), torch.tensor([[1.5, 5.5]]))


def test_grid_matches_the_reference():
    grid = clip_window_grid([0.5, 0.6, 0.7, 0.8, 0.9], 0.05)
    assert len(grid) == 36 and grid[0] == ClipWindow()
    assert ClipWindow(0.5, 1.0) in grid and ClipWindow(1e-3, 0.5) in grid and ClipWindow(0.1, 1.0) in grid
    assert all(w.eps_max - w.eps_min <= 0.9 + 1e-9 for w in grid[1:])
    assert window_label(ClipWindow(0.3, 0.8)) == "0.3-0.8"
    # L'=1 (the reference): the unclipped window against (1, 1), in which the NELBO is the AR NLL
    assert clip_window_grid([0.5, 0.6], 0.05, block_size=1) == [ClipWindow(), ClipWindow(1.0, 1.0)]
    assert clip_window_grid([0.5], 0.05, block_size=4) == clip_window_grid([0.5], 0.05)


def test_search_picks_the_known_minimiser():
    """Synthetic estimates whose spread grows with the distance of the window centre from 0.4."""
    grid = clip_window_grid([0.5, 0.7], 0.1)
    gen = torch.Generator().manual_seed(0)
    noise = [torch.randn(64, 16, generator=gen) for _ in range(4)]  # common random numbers across windows

    def estimates(w: ClipWindow):
        spread = abs((w.eps_min + w.eps_max) / 2 - 0.4) + 0.1
        return [n * spread for n in noise]

    best, scores = search_clip_window(grid, estimates)
    want = min(grid, key=lambda w: abs((w.eps_min + w.eps_max) / 2 - 0.4))
    assert best == want and len(scores) == len(grid)
    assert scores[window_label(best)] == min(scores.values())


@pytest.mark.slow
def test_search_is_the_same_on_one_and_two_data_parallel_ranks(data_cache, tmp_path):
    from tests.dist_harness import run_ranks
    from tests.dist_workers import clip_search_once

    one = run_ranks(clip_search_once, 1, (1, 1, 1, 0), data_cache, str(tmp_path / "a"))[0]
    two = run_ranks(clip_search_once, 2, (1, 1, 2, 1), data_cache, str(tmp_path / "b"))
    assert all(r["window"] == one["window"] for r in two)  # every rank trains with the chosen window
    scores1 = {k: v for k, v in one["result"].items() if k.startswith("clip_var/")}
    scores2 = {k: v for k, v in two[0]["result"].items() if k.startswith("clip_var/")}
    assert len(scores1) == len(clip_window_grid([0.5, 0.8], 0.25)) and scores1.keys() == scores2.keys()
    for k in scores1:
        assert scores2[k] == pytest.approx(scores1[k], rel=1e-5), k
    assert one["result"]["clip_window"] == one["window"]


def test_live_statistics_are_exact_pooled_moments(mcore):
    """The trainer's per-step block statistics equal a direct computation on the same reports."""
    from bd3_megatron.training.step import nelbo_statistics

    reports = [
        {"block_losses": torch.tensor([[1.0, 2.0], [3.0, 10.0]]), "block_t": torch.tensor([[0.05, 0.5], [0.55, 0.99]])},
        {"block_losses": torch.tensor([[4.0, 6.0]]), "block_t": torch.tensor([[0.51, 0.02]])},
    ]
    out = nelbo_statistics(reports, dp=1)
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 4.0, 6.0], dtype=torch.float64)
    assert out["nelbo_block_mean"] == pytest.approx(values.mean().item())
    assert out["nelbo_block_var"] == pytest.approx(values.var().item())
    assert out["loss_t/0.0-0.1"] == pytest.approx((1.0 + 6.0) / 2)
    assert out["loss_t/0.5-0.6"] == pytest.approx((2.0 + 3.0 + 4.0) / 3)
    assert out["loss_t/0.9-1.0"] == pytest.approx(10.0)
    assert "loss_t/0.3-0.4" not in out


@pytest.mark.slow
def test_variance_report_renders_a_real_run(tmp_path, data_cache):
    import subprocess
    import sys

    from tests.test_train_e2e import ROOT, metrics, run, tiny_args

    proc = run(
        tiny_args(
            tmp_path,
            data_cache,
            "train.max_steps=6",
            "train.eval_interval=3",
            "checkpoint.dir=null",
            "sample.after_train=false",
            "diffusion.clip_search=true",
            "diffusion.clip_search_widths=[0.5]",
            "diffusion.clip_search_delta=0.25",
            "diffusion.clip_search_interval=6",
        )
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = metrics(tmp_path / "log")
    # evaluations at 0, 3 and 6; the search only at 6 (never on the untrained model, then every 6 steps)
    assert all("val_nelbo" in recs[s] for s in (0, 3, 6))
    assert not any(k.startswith("clip_var/") for s in (0, 3) for k in recs[s])
    assert "nelbo_block_var" in recs[6] and any(k.startswith("loss_t/") for k in recs[6])
    assert len([k for k in recs[6] if k.startswith("clip_var/")]) == 4  # (1e-3,1) + 3 windows of width 0.5
    rep = subprocess.run(
        [sys.executable, "tools/variance_report.py", str(tmp_path / "log")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rep.returncode == 0, rep.stderr
    assert "grad_var" in recs[6] and recs[6]["grad_noise_ratio"] > 0  # 2 micro-batches per step: a variance exists
    for name in (
        "loss.png",
        "block_variance.png",
        "gradient_variance.png",
        "clip_windows.png",
        "loss_by_t.png",
        "overview.png",
    ):
        png = tmp_path / "log/report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "window" in rep.stdout.splitlines()[0] and len(rep.stdout.splitlines()) >= 3
    bad = subprocess.run(
        [sys.executable, "tools/variance_report.py", str(tmp_path / "nothing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "metrics.jsonl" in bad.stderr


# ---------------------------------------------------------------------------------------------- the variance warning
def simulated_block_variances(
    steps: int, seed: int, rows: int = 8, blocks: int = 32, block_size: int = 4, blow_up=(), factor: float = 1.0
) -> list[float]:
    """Per-step variance of per-block NELBO estimates as a healthy tiny-config run (8 rows x 32 blocks of L'=4)
    produces them: antithetic t over [1e-3, 1], tokens masked with probability t, exponential token CE slowly
    falling, estimate = Σ masked CE / (t L'). Steps in ``blow_up`` have their estimates scaled by sqrt(factor)."""
    g = torch.Generator().manual_seed(seed)
    n, out = rows * blocks, []
    for s in range(steps):
        t = 1e-3 + (1 - 1e-3) * (torch.randperm(n, generator=g) + torch.rand(n, generator=g)) / n
        masked = torch.rand(n, block_size, generator=g) < t[:, None]
        ce = 6.0 * (1 - s / (2 * steps)) * -torch.log(torch.rand(n, block_size, generator=g))
        est = (masked * ce).sum(-1) / (t * block_size) * (factor**0.5 if s in blow_up else 1.0)
        out.append(float(est.var()))
    return out


def warnings_of(values: list[float], factor: float = 10.0) -> list[int]:
    from bd3_megatron.training.metrics import VarianceWatch

    watch = VarianceWatch(factor)
    return [i for i, v in enumerate(values) if watch.update(v)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_variance_watch_is_quiet_on_a_healthy_heavy_tailed_run(seed):
    values = simulated_block_variances(600, seed)
    median = sorted(values)[300]
    assert max(values) > 50 * median  # single steps are heavy-tailed, as in the field report (3.7e4 vs ~50)
    assert warnings_of(values) == []
    assert warnings_of([float("nan")] * 3 + values) == []  # skipped (non-finite) steps are ignored


def test_variance_watch_warns_once_on_a_sustained_rise_and_rearms():
    values = simulated_block_variances(600, 0, blow_up=range(300, 330), factor=100.0)
    assert warnings_of(values) in ([302], [303], [304])  # within 3 steps of the rise, once while it lasts
    twice = simulated_block_variances(600, 0, blow_up=set(range(200, 230)) | set(range(450, 480)), factor=100.0)
    assert len(warnings_of(twice)) == 2  # it re-arms once the variance is back to normal
    assert warnings_of(values, factor=0.0) == []  # log.variance_warn_factor=0 turns it off
    one_spike = simulated_block_variances(600, 0, blow_up=range(300, 301), factor=1e4)
    assert warnings_of(one_spike) == []  # a single 10^4 x step is the heavy tail, not a blow-up
