"""One optimizer step: the step's micro-batches, forward and backward, the engine's update, the EMA, statistics.

Shape legend (as in megatron-core): b = micro-batch size, L = sequence length, L' = block size, n = L / L' blocks,
S = streams·L tokens the backbone reads (2L for x_t ⊕ x0), h = hidden size, G = global batch size.

Optimizer step s consumes global samples [s·G, (s+1)·G) (``batches.sample_indices``); the mode turns each row x0
[b, L] into a :class:`MicroBatch` (inputs, predicted positions, NELBO weights); the model's head returns the
per-token cross-entropy [b, L] and Σ weight·CE; :func:`loss_from_head` turns them into the NELBO per token
(``diffusion.loss.nelbo``) and the per-block estimates [b, n] the statistics read.
"""

from __future__ import annotations

from functools import partial

import torch

from bd3_megatron.config import Config
from bd3_megatron.diffusion.loss import nelbo
from bd3_megatron.diffusion.variance import block_has_tokens, block_means
from bd3_megatron.model.bd3_model import HeadOutput
from bd3_megatron.modes import get_mode
from bd3_megatron.parallel.collectives import gather_data_parallel, sum_data_parallel
from bd3_megatron.parallel.device import device_redirect
from bd3_megatron.parallel.state import ParallelContext
from bd3_megatron.training.batches import BatchMaker, MicroBatch, sample_indices
from bd3_megatron.training.engine import DeepSpeedEngine
from bd3_megatron.training.optim import EMA, lr_at
from bd3_megatron.training.state import TrainState


def loss_from_head(batch: MicroBatch, block_size: int, out: HeadOutput):
    """megatron schedule loss_func: the NELBO per token of the micro-batch (all real tokens, padding excluded;
    reference convention) and a report of the per-block estimates the clip-window search and the variance monitor
    score; with padding also ``block_keep`` [b, n], the blocks that hold real tokens (the others have no estimate).

    ``out.nelbo_sum`` (Σ weight·CE over the predicted tokens, differentiable) carries the gradient; the per-token
    terms ``out.ce · batch.weight`` [b, L] (no gradient) feed the statistics."""
    objective = nelbo(out.ce, batch.weight, batch.num_tokens, weighted_sum=out.nelbo_sum)
    report = {
        "loss": objective.loss.detach().clone(),
        "weighted_sum": objective.terms.sum(),
        "tokens": torch.as_tensor(batch.num_tokens).float(),
        "block_t": batch.t,
    }
    if batch.padding is None:
        return objective.loss, {**report, "block_losses": block_means(objective.terms, block_size)}
    real = ~batch.padding
    return objective.loss, {
        **report,
        "block_losses": block_means(objective.terms, block_size, real),
        "block_keep": block_has_tokens(real, block_size),
    }


def kept_blocks(report: dict, key: str) -> torch.Tensor:
    """A report's per-block values (block_losses or block_t), flat, without the blocks of padding only."""
    keep = report.get("block_keep")
    return report[key].flatten() if keep is None else report[key][keep]


def nelbo_statistics(reports: list[dict], dp: int, buckets: int = 10) -> dict:
    """Cheap live variance monitoring: mean and variance of the step's per-block NELBO estimates over all
    micro-batches and data-parallel ranks (``nelbo_block_mean``, ``nelbo_block_var``), and the mean loss per t bucket
    (``loss_t/a-b``), from the reports of :func:`loss_from_head` with one small all-reduce."""
    bl = torch.cat([kept_blocks(r, "block_losses") for r in reports]).double()
    bt = torch.cat([kept_blocks(r, "block_t") for r in reports]).to(bl.device)
    idx = torch.clamp((bt * buckets).long(), 0, buckets - 1)
    zeros = torch.zeros(buckets, dtype=bl.dtype, device=bl.device)
    count = torch.tensor(float(bl.numel()), dtype=bl.dtype, device=bl.device)
    vec = torch.cat(
        [
            torch.stack([bl.sum(), (bl * bl).sum(), count]),
            zeros.clone().index_add_(0, idx, bl),
            zeros.clone().index_add_(0, idx, torch.ones_like(bl)),
        ]
    )
    sum_data_parallel(vec, dp)
    s1, s2, n = float(vec[0]), float(vec[1]), float(vec[2])
    out = {"nelbo_block_mean": s1 / n, "nelbo_block_var": (s2 - s1 * s1 / n) / max(n - 1.0, 1.0)}
    for b in range(buckets):
        in_bucket = float(vec[3 + buckets + b])
        if in_bucket:
            out[f"loss_t/{b / buckets:.1f}-{(b + 1) / buckets:.1f}"] = float(vec[3 + b]) / in_bucket
    return out


def run_schedule(
    model, micro_batches: list[MicroBatch], cfg: Config, ctx: ParallelContext, dtype, forward_only: bool
) -> list[dict]:
    """megatron-core's forward(-backward) schedule over ``micro_batches`` (1F1B under pipeline parallelism); returns
    the last stage's :func:`loss_from_head` reports (empty on other stages)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        with ctx.runtime.autocast(dtype):
            out = model(batch.xt, batch.x0, batch.masked, batch.weight, batch.padding, batch.sigma)
        return out, partial(loss_from_head, batch, cfg.model.block_size)

    with device_redirect():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=model,
            num_microbatches=len(micro_batches),
            seq_length=get_mode(cfg.model.mode).streams * cfg.model.seq_len,  # the activations sent between stages
            micro_batch_size=cfg.train.micro_batch_size,
            forward_only=forward_only,
        )


class TrainStep:
    """Forward, backward and update of one optimizer step, and its statistics.

    Under pipeline parallelism megatron's 1F1B schedule runs the micro-batches and DeepSpeed reduces and steps once;
    otherwise DeepSpeed drives each micro-batch (any ZeRO stage). The update is skipped on every rank alike when the
    global gradient norm is not finite (``engine.step``), and the EMA follows applied updates only."""

    def __init__(
        self,
        cfg: Config,
        ctx: ParallelContext,
        engine: DeepSpeedEngine,
        batches: BatchMaker,
        stream,
        ema: EMA | None,
        state: TrainState,
        dtype: torch.dtype,
    ):
        self.cfg, self.ctx, self.engine, self.batches, self.stream = cfg, ctx, engine, batches, stream
        self.ema, self.state, self.dtype = ema, state, dtype
        t = cfg.train
        self.micro_batches = t.global_batch_size // (t.micro_batch_size * ctx.dp)
        self.model = engine.module
        self.named = dict(self.model.named_parameters())
        # gradient-variance probe: the final LayerNorm weight's gradient of each micro-batch (a small tensor every
        # last-stage rank holds in full) is captured by a tensor hook, before any accumulation or reduction
        self._probe_grads: list[torch.Tensor] = []
        if ctx.is_last_stage:
            self.model.decoder.final_layernorm.weight.register_hook(self._capture_probe_grad)

    def micro_batches_of(self, step: int) -> list[MicroBatch]:
        """This rank's micro-batches of optimizer step ``step`` (rows and noise keyed by global sample index)."""
        t = self.cfg.train
        out = []
        for m in range(self.micro_batches):
            idx = sample_indices(step, m, self.ctx.dp_rank, self.ctx.dp, t.micro_batch_size, t.global_batch_size)
            x0, padding = self.stream.get_with_padding(idx)
            out.append(self.batches.corrupt(x0, torch.from_numpy(idx), step, padding=padding))
        return out

    def __call__(self) -> dict:
        """Run step ``state.step`` and advance it. Returns the step's record: loss (NELBO per token, mean over
        micro-batches and data-parallel ranks; NaN off the last stage), lr, grad_norm, skipped_steps and, on the
        last stage, the NELBO and gradient statistics."""
        state = self.state
        self.model.train()
        lr = lr_at(state.step, self.cfg.optim, self.cfg.train.max_steps)
        self.engine.set_lr(lr)
        micro = self.micro_batches_of(state.step)
        if self.ctx.pp > 1:  # megatron's 1F1B schedule accumulates; DeepSpeed reduces and steps once
            reports = run_schedule(self.model, micro, self.cfg, self.ctx, self.dtype, forward_only=False)
        else:  # DeepSpeed drives the micro-batches (any ZeRO stage)
            reports = []
            for batch in micro:
                with self.ctx.runtime.autocast(self.dtype):
                    out = self.engine.engine(batch.xt, batch.x0, batch.masked, batch.weight, batch.padding, batch.sigma)
                loss, report = loss_from_head(batch, self.cfg.model.block_size, out)
                self.engine.backward(loss)
                reports.append(report)
        grad_norm, applied = self.engine.step()
        loss = self._mean_loss(reports)
        stats = (
            {**nelbo_statistics(reports, self.ctx.dp), **self._gradient_statistics()} if self.ctx.is_last_stage else {}
        )
        if applied:  # decided from the global grad norm, so identical on every rank (the loss lives on the last stage)
            state.bad_steps = 0
            if self.ema is not None:
                self.ema.update(self.named)
        else:
            state.bad_steps += 1
            state.skipped_steps += 1
        state.step += 1
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped_steps": state.skipped_steps, **stats}

    def _capture_probe_grad(self, grad: torch.Tensor) -> None:
        self._probe_grads.append(grad.detach().float().clone())

    def _gradient_statistics(self) -> dict:
        """Variance of per-micro-batch gradients on the probe tensor across micro-batches and data-parallel ranks:
        ``grad_var`` (mean over coordinates of the unbiased variance) and ``grad_noise_ratio`` = trace of the
        covariance / squared norm of the mean gradient (large = noise-dominated steps)."""
        grads, self._probe_grads = self._probe_grads, []
        if not grads:
            return {}
        g = gather_data_parallel(torch.stack(grads) * len(grads), self.ctx.dp)  # undo the 1/micro_batches scaling
        if g.shape[0] < 2:
            return {}
        var = g.double().var(dim=0, unbiased=True)
        mean = g.double().mean(dim=0)
        return {
            "grad_var": float(var.mean()),
            "grad_noise_ratio": float(var.sum() / mean.pow(2).sum().clamp_min(1e-30)),
        }

    def _mean_loss(self, reports: list[dict]) -> float:
        """The step's loss averaged over micro-batches and data-parallel ranks (meaningful on the last stage)."""
        if not reports:
            return float("nan")
        local = torch.stack([r["loss"].float() for r in reports]).mean().reshape(1).to(self.ctx.runtime.device)
        return float(sum_data_parallel(local, self.ctx.dp) / self.ctx.dp)
