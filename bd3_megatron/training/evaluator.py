"""Validation: the NELBO per token of the first ``train.eval_rows`` validation rows under fixed noise, and the
data-driven clip-window search (the reference's var_min). Needs a model, not an optimizer: ``tools/eval_ppl.py``
runs it on loaded weights alone.

Every row is scored exactly once whatever the micro-batch size and TP/PP/DP layout; row j's noise is keyed by
(seed, j, noise draw) only (``batches.EVAL_NOISE_GROUP``), so the figure is identical under any layout.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from megatron.core import parallel_state

from bd3_megatron.config import Config
from bd3_megatron.diffusion.schedule import ClipWindow
from bd3_megatron.diffusion.variance import clip_window_grid, search_clip_window
from bd3_megatron.parallel.collectives import gather_data_parallel, sum_data_parallel
from bd3_megatron.parallel.state import ParallelContext
from bd3_megatron.training.batches import BatchMaker, MicroBatch
from bd3_megatron.training.optim import EMA
from bd3_megatron.training.step import run_schedule


class Evaluator:
    """Validation NELBO and clip-window search over ``val_rows`` (a ``rows(idx) -> [b, L]`` dataset) with
    ``model``'s weights, or its EMA weights when ``ema`` is given (swapped in for the evaluation, then back)."""

    def __init__(
        self,
        cfg: Config,
        ctx: ParallelContext,
        model: torch.nn.Module,
        batches: BatchMaker,
        val_rows,
        dtype: torch.dtype,
        ema: EMA | None = None,
    ):
        self.cfg, self.ctx, self.model, self.batches, self.val_rows = cfg, ctx, model, batches, val_rows
        self.dtype, self.ema = dtype, ema
        self.named = dict(model.named_parameters())

    def rows_scored(self) -> int:
        """Validation rows every evaluation scores: the first ``train.eval_rows`` of the split (0 = all of it),
        whatever the micro-batch size and the TP/PP/DP layout. Raises ValueError for an empty split."""
        n_rows, want = len(self.val_rows), self.cfg.train.eval_rows
        if n_rows == 0:
            raise ValueError("the validation split is empty; raise data.val_docs")
        return min(n_rows, want) if want else n_rows

    def evaluate(self, step: int, noise_draw: int = 0, window: ClipWindow | None = None) -> dict:
        """``val_nelbo`` (nats/token) and ``val_ppl`` (its exp, an upper bound on the perplexity) under window
        [1e-3, 1] unless ``window``, token-weighted over the scored rows (real tokens only); with
        ``diffusion.clip_search`` due at ``step`` also the search's ``clip_window`` and ``clip_var/*``.
        ``noise_draw`` selects another fixed noise stream. Collective; the figures on the last stage ({} elsewhere)."""
        with self._eval_weights():
            micro = self._micro_batches(self.rows_scored(), window or ClipWindow(), noise_draw=noise_draw)
            reports = run_schedule(self.model, micro, self.cfg, self.ctx, self.dtype, forward_only=True)
            search = self.clip_search() if self.clip_search_due(step) else {}
        # "tokens" counts real tokens of real rows only (MicroBatch.num_tokens): padding rows and --pad padding weigh 0
        sums = torch.tensor(
            [sum(float(r["weighted_sum"]) for r in reports), sum(float(r["tokens"]) for r in reports)],
            dtype=torch.float64,
            device=self.ctx.runtime.device,
        )
        sum_data_parallel(sums, self.ctx.dp)
        if not self.ctx.is_last_stage:
            return {}
        value = float(sums[0] / sums[1])
        return {"val_nelbo": value, "val_ppl": math.exp(min(value, 50.0)), **search}

    def clip_search_due(self, step: int) -> bool:
        """At evaluations after step 0 (the reference skips its sanity-check validation: the variance of an
        untrained model says nothing about the schedule), every ``clip_search_interval`` steps if set."""
        d = self.cfg.diffusion
        return d.clip_search and step > 0 and (not d.clip_search_interval or step % d.clip_search_interval == 0)

    def clip_search(self) -> dict:
        """Score every window of the grid by the variance of per-block NELBO estimates on the validation batches
        (gathered over data-parallel ranks), pick the minimiser on the last stage, share it with every rank and, unless
        ``fix_clipping``, train with it from now on (``batches.window``). Call inside ``_eval_weights``."""
        d = self.cfg.diffusion
        windows = clip_window_grid(d.clip_search_widths, d.clip_search_delta, self.cfg.model.block_size)
        n_rows = min(d.clip_search_rows or self.rows_scored(), self.rows_scored())

        def estimates(window: ClipWindow) -> list[torch.Tensor]:
            micro = self._micro_batches(n_rows, window, resample=d.resample)
            reports = run_schedule(self.model, micro, self.cfg, self.ctx, self.dtype, forward_only=True)
            return [self._gathered_block_losses(r, b) for r, b in zip(reports, micro)]

        device = self.ctx.runtime.device
        if self.ctx.is_last_stage:
            best, scores = search_clip_window(windows, estimates)
            choice = torch.tensor([windows.index(best)], device=device)
        else:  # earlier stages run the same forward passes for the pipeline; the last stage decides
            for window in windows:
                estimates(window)
            scores, choice = {}, torch.zeros(1, dtype=torch.long, device=device)
        if self.ctx.pp > 1:
            torch.distributed.broadcast(
                choice,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        best = windows[int(choice.item())]
        if not d.fix_clipping:
            self.batches.window = best
        return {
            "clip_window": [best.eps_min, best.eps_max],
            **{f"clip_var/{label}": score for label, score in scores.items()},
        }

    def _micro_batches(
        self, n_rows: int, window: ClipWindow, resample: bool = False, noise_draw: int = 0
    ) -> list[MicroBatch]:
        """This rank's fixed-noise micro-batches over validation rows [0, n_rows): pass i covers rows
        [i·mb·dp, (i+1)·mb·dp), rank r its r-th slice of mb rows. The last pass is padded with weight-0 rows, so every
        rank runs ceil(n_rows / (mb·dp)) equal micro-batches (no collective waits on a rank with fewer)."""
        mb, dp = self.cfg.train.micro_batch_size, self.ctx.dp
        per_pass = mb * dp
        starts = range(self.ctx.dp_rank * mb, math.ceil(n_rows / per_pass) * per_pass, per_pass)
        return [
            self.batches.eval_batch(
                self.val_rows, np.arange(s, s + mb), n_rows, window, resample=resample, noise_draw=noise_draw
            )
            for s in starts
        ]

    def _gathered_block_losses(self, report: dict, batch: MicroBatch) -> torch.Tensor:
        """A validation report's per-block estimates over all data-parallel ranks, without the blocks that hold no
        real token: those of padding rows of a short last batch, and with padded data those of padding only (the
        keep mask is gathered like the estimates, so the gathers match on every rank)."""
        keep = report.get("block_keep", torch.ones_like(report["block_losses"], dtype=torch.bool))
        if batch.valid is not None:
            keep = keep & batch.valid[:, None]
        losses = gather_data_parallel(report["block_losses"], self.ctx.dp)
        return losses[gather_data_parallel(keep.to(torch.uint8), self.ctx.dp).bool()]  # gloo gathers no bool

    @contextlib.contextmanager
    def _eval_weights(self):
        """Evaluate with the EMA weights (as the reference does), restoring the training weights afterwards."""
        self.model.eval()
        if self.ema is not None:
            self.ema.swap_into(self.named)
        try:
            with torch.no_grad():
                yield
        finally:
            if self.ema is not None:
                self.ema.swap_into(self.named)
